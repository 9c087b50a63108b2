"""Streams through the gateway: passed on as they arrive, always counted, never altered."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import openai
import pytest

from tests.conftest import HOST, MODEL, TUTORIAL, chat
from tests.test_gateway import GATEWAY, TOKEN_LIMIT, client, write
from tests.test_usage import WITH_USAGE, WITHOUT_USAGE


def sdk(gw, key: str = "iamafreeuser") -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gw.url + "/v1",
        api_key="unused",
        default_headers={"Authorization": f"APIKEY {key}", "Host": HOST},
        max_retries=0,
    )


def stream_chat(client: openai.OpenAI, **extra) -> list:
    return list(
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "What is Kubernetes?"}],
            max_tokens=30,
            stream=True,
            **extra,
        )
    )


def test_sdk_streaming_is_limited_like_non_streaming(start_gateway) -> None:
    gw = start_gateway(TUTORIAL)
    client = sdk(gw)
    seen = requests = 0
    while seen < 50:
        chunks = stream_chat(client)
        assert chunks and all(c.usage is None for c in chunks)  # the client did not ask
        assert all(c.choices for c in chunks)  # no usage-only chunk reached it
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        assert text
        requests += 1
        seen = sum(e.get("total_tokens", 0) for e in gw.access_log(requests))
    with pytest.raises(openai.RateLimitError):
        stream_chat(client)
    logged = [e for e in gw.access_log() if e["status"] == 200]
    assert all(e["usage_estimated"] is False and e["total_tokens"] > 0 for e in logged)


def test_sdk_gets_usage_when_it_asks(start_gateway) -> None:
    gw = start_gateway(TUTORIAL)
    chunks = stream_chat(sdk(gw, "iamagolduser"), stream_options={"include_usage": True})
    assert chunks[-1].usage is not None and chunks[-1].choices == []
    assert chunks[-1].usage.total_tokens == gw.access_log(1)[-1]["total_tokens"]


def recorded_upstream(upstream, seen: list[dict]):
    def handler(path: str, body: bytes):
        request = json.loads(body)
        seen.append(request)
        asked = (request.get("stream_options") or {}).get("include_usage")
        return (
            200,
            {"content-type": "text/event-stream"},
            _chunks(WITH_USAGE if asked else WITHOUT_USAGE),
        )

    return upstream(handler)


async def _chunks(stream: bytes, size: int = 7, pause: float = 0.0, fail_after: int | None = None):
    for n, i in enumerate(range(0, len(stream), size)):
        if fail_after is not None and n >= fail_after:
            raise ConnectionResetError("upstream fell over")
        yield stream[i : i + size]
        if pause:
            await asyncio.sleep(pause)


def test_client_gets_the_upstreams_bytes_exactly(tmp_path, start_gateway, upstream) -> None:
    seen: list[dict] = []
    up = recorded_upstream(upstream, seen)
    gw = start_gateway(
        write(tmp_path, GATEWAY + TOKEN_LIMIT.replace("LIMIT", "5")),
        args=("--backend", f"llm={up.url}"),
    )
    c = client(gw)
    r = c.post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 200
    assert r.content == WITHOUT_USAGE  # byte for byte what the upstream sends when not asked
    assert seen[-1]["stream_options"] == {"include_usage": True}  # the gateway asked
    assert gw.access_log(1)[-1]["total_tokens"] == 5
    assert c.post("/v1/chat/completions", json=chat(stream=True)).status_code == 429  # 5 of 5 spent
    # A client that asks gets the usage chunk too, untouched.
    gw2 = start_gateway(write(tmp_path, GATEWAY), args=("--backend", f"llm={up.url}"))
    asked = chat(stream=True, stream_options={"include_usage": True})
    assert client(gw2).post("/v1/chat/completions", json=asked).content == WITH_USAGE


def test_stream_without_usage_is_estimated(tmp_path, start_gateway, upstream) -> None:
    up = upstream(
        lambda path, body: (200, {"content-type": "text/event-stream"}, _chunks(WITHOUT_USAGE))
    )
    gw = start_gateway(
        write(tmp_path, GATEWAY + TOKEN_LIMIT.replace("LIMIT", "10")),
        args=("--backend", f"llm={up.url}"),
    )
    c = client(gw)
    assert c.post("/v1/chat/completions", json=chat(stream=True)).status_code == 200
    entry = gw.access_log(1)[-1]
    assert entry["usage_estimated"] is True
    assert entry["prompt_tokens"] == 4 and entry["completion_tokens"] == 2  # o200k: "Hello world"
    assert c.post("/v1/chat/completions", json=chat(stream=True)).status_code == 200
    assert c.post("/v1/chat/completions", json=chat(stream=True)).status_code == 429


def test_client_disconnect_stops_the_upstream_and_is_charged(
    tmp_path, start_gateway, upstream
) -> None:
    state = {"sent": 0, "finished": False}

    async def slow_stream():
        for i in range(40):
            yield f'data: {{"choices":[{{"index":0,"delta":{{"content":"word{i} "}}}}]}}\n\n'.encode()
            state["sent"] += 1
            await asyncio.sleep(0.05)
        state["finished"] = True
        yield b"data: [DONE]\n\n"

    up = upstream(lambda path, body: (200, {"content-type": "text/event-stream"}, slow_stream()))
    gw = start_gateway(
        write(tmp_path, GATEWAY + TOKEN_LIMIT.replace("LIMIT", "3")),
        args=("--backend", f"llm={up.url}"),
    )
    c = httpx.Client(base_url=gw.url, headers={"Host": "api.example.com"}, timeout=10)
    with c.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
        assert r.status_code == 200
        first = next(r.iter_raw())
        assert b"word0" in first
    c.close()  # closes the connection mid-stream
    entry = gw.access_log(1)[-1]
    assert entry["usage_estimated"] is True and entry["total_tokens"] >= entry["prompt_tokens"] >= 4
    time.sleep(0.3)
    assert not state["finished"] and state["sent"] < 40  # the upstream was stopped
    assert client(gw).post("/v1/chat/completions", json=chat(stream=True)).status_code == 429


def test_upstream_failing_mid_stream_gets_an_error_event(tmp_path, start_gateway, upstream) -> None:
    up = upstream(
        lambda path, body: (
            200,
            {"content-type": "text/event-stream"},
            _chunks(WITHOUT_USAGE, size=40, fail_after=2),
        )
    )
    gw = start_gateway(
        write(tmp_path, GATEWAY + TOKEN_LIMIT.replace("LIMIT", "1000")),
        args=("--backend", f"llm={up.url}"),
    )
    r = client(gw).post("/v1/chat/completions", json=chat(stream=True))
    assert r.status_code == 200
    events = [line for line in r.text.splitlines() if line.startswith("data: ")]
    last = json.loads(events[-1][6:])
    assert last["error"]["type"] == "upstream_error" and last["error"]["code"] == "upstream_failed"
    first_event = WITHOUT_USAGE[: WITHOUT_USAGE.index(b"\n\n") + 2]
    assert r.content.startswith(first_event + b'data: {"error"')  # the half event is dropped
    assert "before the response was complete" in last["error"]["message"]
    assert gw.access_log(1)[-1]["usage_estimated"] is True
    oai = openai.OpenAI(
        base_url=gw.url + "/v1",
        api_key="x",
        default_headers={"Host": "api.example.com"},
        max_retries=0,
    )
    with pytest.raises(openai.APIError):
        list(
            oai.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True
            )
        )


def test_streaming_is_not_buffered(manifests, start_gateway) -> None:
    folder = manifests(
        replace={
            '- "8000"': '- "8000"\n          - --mode\n          - echo'
            '\n          - --time-to-first-token\n          - "400"'
            '\n          - --inter-token-latency\n          - "100"'
        }
    )
    gw = start_gateway(folder)
    body = chat("one two three four five six seven eight nine ten eleven twelve", 12, stream=True)
    with httpx.Client(
        base_url=gw.url, headers={"Host": HOST, "Authorization": "APIKEY iamagolduser"}, timeout=30
    ) as c:
        start = time.perf_counter()
        with c.stream("POST", "/v1/chat/completions", json=body) as r:
            assert r.status_code == 200
            stamps = [
                time.perf_counter() - start
                for line in r.iter_lines()
                if '"content":"' in line and '"content":""' not in line
            ]
    first, last = stamps[0], stamps[-1]
    assert 0.35 < first < 0.9  # the first word: close to the simulator's time to first token
    assert last - first > 0.8  # 11 more words, 100 ms apart, not in one piece
    assert len(stamps) >= 6


WEIGHTED = """
---
apiVersion: kuadrant.io/v1alpha1
kind: TokenRateLimitPolicy
metadata: {name: weighted, namespace: gateway-system}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: gw}
  limits:
    output-heavy:
      rates: [{limit: 20, window: 1m}]
      counting: COUNTING
"""


@pytest.mark.parametrize(
    ("counting", "passes"), [("total", 4), ("{completion: 4}", 2), ("prompt", 7)]
)
def test_counting_extension_end_to_end(
    tmp_path, start_gateway, upstream, counting: str, passes: int
) -> None:
    usage = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    doc = {
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "a b c"}}],
        "usage": usage,
    }
    up = upstream(
        lambda path, body: (200, {"content-type": "application/json"}, json.dumps(doc).encode())
    )
    path = write(tmp_path, GATEWAY + WEIGHTED.replace("COUNTING", counting))
    gw = start_gateway(path, args=("--backend", f"llm={up.url}"))
    c = client(gw)
    statuses = [c.post("/v1/chat/completions", json=chat()).status_code for _ in range(passes + 1)]
    assert statuses == [200] * passes + [429]


class _BreakingStream:
    """An upstream stream that sends one event, then fails with a bug (not an UpstreamError)."""

    status = 200
    content_type = "text/event-stream"
    content_encoding = None

    def __init__(self) -> None:
        self.headers = [(b"content-type", b"text/event-stream")]
        self.closed = False

    async def chunks(self):
        yield b'data: {"choices": []}\n\n'
        raise RuntimeError("a bug in the middle of a stream")

    def close(self) -> None:
        self.closed = True


class _BreakingUpstream:
    max_response_bytes = 1 << 20

    async def send_to(self, *args, **kwargs) -> _BreakingStream:
        return _BreakingStream()


def test_a_stream_that_fails_after_its_start_gets_no_second_answer(caplog) -> None:
    """Once a stream's head went out, an error in the gateway is logged and the answer cut
    short: no 500 may start a second answer on top of it."""
    from tokengateway.config.backends import parse_backend_overrides
    from tokengateway.config.compile import compile_config
    from tokengateway.dataplane.app import GatewayApp
    from tokengateway.runtime.serve import load
    from tokengateway.storage import MemoryStore

    loaded = load(
        [str(TUTORIAL)], parse_backend_overrides(["trlp-tutorial-llm-sim=http://127.0.0.1:9"])
    )
    urls = {k: p.url or "http://127.0.0.1:9" for k, p in loaded.plans.items()}
    app = GatewayApp(compile_config(loaded.resources, urls), MemoryStore(), _BreakingUpstream())  # type: ignore[arg-type]
    body = json.dumps(chat(stream=True)).encode()
    scope = {
        "type": "http",
        "method": "POST",
        "path": "/v1/chat/completions",
        "query_string": b"",
        "headers": [
            (b"host", HOST.encode()),
            (b"authorization", b"APIKEY iamafreeuser"),
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
        ],
        "client": ("127.0.0.1", 40000),
        "server": ("127.0.0.1", 8080),
    }
    sent: list[dict] = []
    delivered = False

    async def receive() -> dict:
        nonlocal delivered
        if not delivered:
            delivered = True
            return {"type": "http.request", "body": body, "more_body": False}
        await asyncio.sleep(3600)  # the client stays
        raise AssertionError

    async def send(message: dict) -> None:
        sent.append(message)

    asyncio.run(app(scope, receive, send))
    starts = [m for m in sent if m["type"] == "http.response.start"]
    assert [m["status"] for m in starts] == [200]
    assert "a bug in the middle of a stream" in caplog.text
