"""The built-in simulator, spoken to over real loopback sockets by the official OpenAI SDK."""

from __future__ import annotations

import itertools
import json
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import httpx
import openai
import pytest

from tokengateway.simulator import SimOptions, create_server, parse_sim_args

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
ALIAS = "llama"
TUTORIAL_ARGS = ["--model", MODEL, "--port", "8000"]


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(128)
    return sock


class _Running:
    """A simulator served by uvicorn in a background thread on a socket bound here."""

    def __init__(self, opts: SimOptions) -> None:
        self.sock = _listening_socket()
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.server = create_server(opts, fd=self.sock.fileno())
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 5
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError("simulator did not start")
            time.sleep(0.005)

    def client(self) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key="x", max_retries=0)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(5)
        self.sock.close()


@pytest.fixture(scope="module")
def start() -> Iterator[Callable[..., _Running]]:
    """Start simulators with given options; every one is stopped when the module ends."""
    running: list[_Running] = []

    def _start(**kwargs: Any) -> _Running:
        kwargs.setdefault("model", MODEL)
        sim = _Running(SimOptions(**kwargs))
        running.append(sim)
        return sim

    yield _start
    for sim in running:
        sim.stop()


@pytest.fixture(scope="module")
def echo(start: Callable[..., _Running]) -> _Running:
    return start(mode="echo", served_model_names=[ALIAS], max_model_len=128)


@pytest.fixture(scope="module")
def rand(start: Callable[..., _Running]) -> _Running:
    return start(mode="random", seed=7)


def _post(sim: _Running, path: str, **kwargs: Any) -> httpx.Response:
    return httpx.post(f"{sim.url}{path}", timeout=5, **kwargs)


def _fault(spec: str) -> dict[str, str]:
    return {"x-sim-fault": spec}


def _sse(raw: str) -> list[tuple[str | None, Any]]:
    """(event name, decoded data) of each SSE event; data `[DONE]` stays a string."""
    events: list[tuple[str | None, Any]] = []
    for block in raw.split("\n\n"):
        if not block:
            continue
        name, data = None, None
        for line in block.split("\n"):
            if line.startswith("event: "):
                name = line.removeprefix("event: ")
            elif line.startswith("data: "):
                data = line.removeprefix("data: ")
        assert data is not None, block
        events.append((name, data if data == "[DONE]" else json.loads(data)))
    return events


def _stream_raw(sim: _Running, path: str, body: dict[str, Any], **kwargs: Any) -> str:
    with httpx.stream("POST", f"{sim.url}{path}", json=body, timeout=5, **kwargs) as resp:
        assert resp.status_code == 200, resp.read()
        assert resp.headers["content-type"] == "text/event-stream"
        return resp.read().decode()


def _read_until_cut(sim: _Running, path: str, body: dict[str, Any], spec: str) -> str:
    """What arrives of a response before the connection drops; fails if it does not drop."""
    received: list[str] = []
    with (
        pytest.raises(httpx.RemoteProtocolError),
        httpx.stream(
            "POST", f"{sim.url}{path}", json=body, headers=_fault(spec), timeout=5
        ) as resp,
    ):
        for text in resp.iter_text():
            received.append(text)
    return "".join(received)


CHAT_BODY: dict[str, Any] = {
    "model": MODEL,
    "messages": [{"role": "user", "content": "one two three four"}],
}
MESSAGES_BODY: dict[str, Any] = {
    "model": MODEL,
    "max_tokens": 50,
    "messages": [{"role": "user", "content": "one two three four"}],
}


# --- /v1/models ---------------------------------------------------------------------------------


def test_models_lists_model_and_served_names(echo: _Running) -> None:
    models = echo.client().models.list()
    assert [m.id for m in models.data] == [MODEL, ALIAS]
    assert all(m.object == "model" and m.owned_by == "tokengateway-sim" for m in models.data)
    raw = httpx.get(f"{echo.url}/v1/models").json()
    assert raw["object"] == "list"
    assert [m["root"] for m in raw["data"]] == [MODEL, MODEL]
    assert echo.client().models.retrieve(ALIAS).id == ALIAS
    # a model id with "/", sent plain or escaped: the server keeps "%2F", the simulator
    # decodes the id once
    for sent in (MODEL, MODEL.replace("/", "%2F"), MODEL.replace("/", "%2f")):
        got = httpx.get(f"{echo.url}/v1/models/{sent}")
        assert (got.status_code, got.json()["id"]) == (200, MODEL), sent


# --- chat completions, echo mode: exact words and usage -----------------------------------------


def test_tutorial_request_is_answered_with_word_usage(echo: _Running) -> None:
    # The tutorial's body, including its non-OpenAI "usage": true, which must be ignored.
    resp = _post(
        echo,
        "/v1/chat/completions",
        json={
            "model": MODEL,
            "messages": [{"role": "user", "content": "What is Kubernetes?"}],
            "max_tokens": 100,
            "stream": False,
            "usage": True,
        },
    )
    assert resp.status_code == 200
    assert resp.headers["content-type"] == "application/json"
    body = resp.json()
    assert body["object"] == "chat.completion"
    assert body["id"].startswith("chatcmpl-")
    assert body["model"] == MODEL
    assert body["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "What is Kubernetes?"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    assert body["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}


def test_chat_echo_counts_all_messages_and_echoes_last_user(echo: _Running) -> None:
    completion = echo.client().chat.completions.create(
        model=ALIAS,
        messages=[
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "first question here"},
            {"role": "assistant", "content": "an answer"},
            {"role": "user", "content": [{"type": "text", "text": "Explain cloud native"}]},
        ],
    )
    assert completion.model == ALIAS
    assert completion.choices[0].message.content == "Explain cloud native"
    assert completion.choices[0].finish_reason == "stop"
    assert completion.usage is not None
    assert (completion.usage.prompt_tokens, completion.usage.completion_tokens) == (11, 3)
    assert completion.usage.total_tokens == 14


@pytest.mark.parametrize(
    ("limits", "content", "finish"),
    [
        ({"max_tokens": 2}, "one two", "length"),
        ({"max_tokens": 4}, "one two three four", "length"),  # all of max_tokens used
        ({"max_tokens": 5}, "one two three four", "stop"),
        ({"max_tokens": 5, "max_completion_tokens": 1}, "one", "length"),  # the newer name wins
    ],
)
def test_chat_echo_honours_max_tokens(
    echo: _Running, limits: dict[str, int], content: str, finish: str
) -> None:
    completion = echo.client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "one two three four"}], **limits
    )
    assert completion.choices[0].message.content == content
    assert completion.choices[0].finish_reason == finish
    assert completion.usage is not None
    assert completion.usage.completion_tokens == len(content.split())


# --- text completions -----------------------------------------------------------------------------


def test_completions_echo_string_and_list_prompt(echo: _Running) -> None:
    client = echo.client()
    one = client.completions.create(model=MODEL, prompt="say this back please", max_tokens=3)
    assert one.object == "text_completion"
    assert one.id.startswith("cmpl-")
    assert one.choices[0].text == "say this back"
    assert one.choices[0].finish_reason == "length"
    assert one.usage is not None
    assert (one.usage.prompt_tokens, one.usage.completion_tokens, one.usage.total_tokens) == (
        4,
        3,
        7,
    )
    many = client.completions.create(model=MODEL, prompt=["alpha beta", "gamma"])
    assert many.choices[0].text == "alpha beta gamma"
    assert many.usage is not None
    assert (many.usage.prompt_tokens, many.usage.completion_tokens) == (3, 3)


# --- random mode ----------------------------------------------------------------------------------


def test_random_chat_respects_max_tokens(rand: _Running) -> None:
    client = rand.client()
    seen = set()
    for _ in range(25):
        completion = client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "Tell me a story"}], max_tokens=6
        )
        text = completion.choices[0].message.content or ""
        usage = completion.usage
        assert usage is not None
        assert usage.prompt_tokens == 4
        assert usage.completion_tokens == len(text.split())
        assert 1 <= usage.completion_tokens <= 6
        assert usage.total_tokens == 4 + usage.completion_tokens
        expected = "length" if usage.completion_tokens == 6 else "stop"
        assert completion.choices[0].finish_reason == expected
        seen.add(expected)
    assert seen == {"stop", "length"}


def test_random_without_max_tokens_fits_the_context_window(start: Callable[..., _Running]) -> None:
    sim = start(mode="random", seed=3, max_model_len=12)
    client = sim.client()
    for _ in range(20):
        completion = client.completions.create(model=MODEL, prompt="four words of prompt")
        usage = completion.usage
        assert usage is not None
        assert usage.completion_tokens == len(completion.choices[0].text.split())
        assert 1 <= usage.completion_tokens <= 12 - 4


# --- streaming ------------------------------------------------------------------------------------


def test_chat_stream_with_include_usage(echo: _Running) -> None:
    stream = echo.client().chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "stream these five words please"}],
        max_tokens=4,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert len({c.id for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert "".join(deltas) == "stream these five words"
    assert [d for d in deltas if d] == ["stream", " these", " five", " words"]
    finish = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finish == [None] * (len(finish) - 1) + ["length"]
    last = chunks[-1]
    assert last.choices == []
    assert last.usage is not None
    assert (last.usage.prompt_tokens, last.usage.completion_tokens) == (5, 4)
    assert last.usage.total_tokens == 9
    assert all(c.usage is None for c in chunks[:-1])


def test_stream_raw_events_end_with_done_and_no_usage_unless_asked(echo: _Running) -> None:
    body = {"model": MODEL, "prompt": "a b c", "stream": True}
    with httpx.stream("POST", f"{echo.url}/v1/completions", json=body, timeout=5) as resp:
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "text/event-stream"
        raw = resp.read().decode()
    events = [e for e in raw.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert all(e.startswith("data: ") for e in events)
    assert "usage" not in raw
    assert len(events) == 3 + 1 + 1  # one per word, the finish chunk, [DONE]


def test_completions_stream_with_usage_via_sdk(echo: _Running) -> None:
    stream = echo.client().completions.create(
        model=MODEL, prompt="x y", stream=True, stream_options={"include_usage": True}
    )
    chunks = list(stream)
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "x y"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage is not None
    assert chunks[-1].usage.total_tokens == 4


def test_chat_stream_without_include_usage_has_no_usage_key(echo: _Running) -> None:
    chunks = list(
        echo.client().chat.completions.create(
            model=MODEL, messages=CHAT_BODY["messages"], stream=True
        )
    )
    assert all(c.usage is None for c in chunks)
    assert all(c.choices for c in chunks)  # no extra usage chunk
    raw = _stream_raw(echo, "/v1/chat/completions", {**CHAT_BODY, "stream": True})
    assert "usage" not in raw
    assert _sse(raw)[-1] == (None, "[DONE]")


@pytest.mark.parametrize("path", ["/v1/chat/completions", "/v1/completions"])
def test_include_usage_raw_chunks_carry_null_usage_then_a_usage_chunk(
    echo: _Running, path: str
) -> None:
    body: dict[str, Any] = {
        "model": MODEL,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    body.update(
        {"messages": CHAT_BODY["messages"]} if "chat" in path else {"prompt": "one two three four"}
    )
    events = _sse(_stream_raw(echo, path, body))
    assert events[-1] == (None, "[DONE]")
    chunks = [data for _, data in events[:-1]]
    assert all(list(c)[-1] == "usage" for c in chunks)  # stable key order: usage last
    assert all(c["usage"] is None and len(c["choices"]) == 1 for c in chunks[:-1])
    assert chunks[-1]["choices"] == []
    assert chunks[-1]["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}


# --- embeddings -----------------------------------------------------------------------------------


def test_embeddings_via_sdk_default_base64_and_float(echo: _Running) -> None:
    client = echo.client()
    # The SDK asks for base64 unless told otherwise and decodes it back to floats.
    got = client.embeddings.create(model=MODEL, input=["one two three", "four"])
    assert got.object == "list"
    assert got.model == MODEL
    assert [(e.object, e.index) for e in got.data] == [("embedding", 0), ("embedding", 1)]
    assert all(len(e.embedding) == 8 for e in got.data)
    assert all(
        math.isclose(math.fsum(v * v for v in e.embedding), 1, rel_tol=1e-5) for e in got.data
    )
    assert (got.usage.prompt_tokens, got.usage.total_tokens) == (4, 4)
    floats = client.embeddings.create(
        model=MODEL, input=["one two three", "four"], encoding_format="float"
    )
    assert [e.embedding for e in floats.data] == [e.embedding for e in got.data]
    again = client.embeddings.create(model=MODEL, input="four", encoding_format="float")
    assert again.data[0].embedding == got.data[1].embedding  # deterministic per input
    assert got.data[0].embedding != got.data[1].embedding
    short = client.embeddings.create(model=MODEL, input="four", dimensions=3)
    assert len(short.data[0].embedding) == 3


def test_embeddings_count_token_ids_as_tokens(echo: _Running) -> None:
    client = echo.client()
    one = client.embeddings.create(model=MODEL, input=[11, 12, 13])
    assert len(one.data) == 1
    assert one.usage.prompt_tokens == 3
    many = client.embeddings.create(model=MODEL, input=[[1, 2, 3], [4, 5]])
    assert [e.index for e in many.data] == [0, 1]
    assert (many.usage.prompt_tokens, many.usage.total_tokens) == (5, 5)
    raw = _post(echo, "/v1/embeddings", json={"model": MODEL, "input": "a b"}).json()
    assert raw["usage"] == {"prompt_tokens": 2, "total_tokens": 2}
    assert isinstance(raw["data"][0]["embedding"], list)  # float is the API default


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"model": MODEL}, "input"),
        ({"model": MODEL, "input": ""}, "input"),
        ({"model": MODEL, "input": []}, "input"),
        ({"model": MODEL, "input": ["a", 5]}, "input"),
        ({"model": MODEL, "input": "a", "dimensions": 0}, "dimensions"),
        ({"model": MODEL, "input": "a", "encoding_format": "hex"}, "encoding_format"),
        ({"model": MODEL, "input": " ".join(["w"] * 129)}, "input"),
    ],
)
def test_embeddings_invalid_requests_are_400(
    echo: _Running, body: dict[str, Any], param: str
) -> None:
    resp = _post(echo, "/v1/embeddings", json=body)
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == param


# --- Responses API --------------------------------------------------------------------------------


def test_responses_non_streaming_via_sdk(echo: _Running) -> None:
    resp = echo.client().responses.create(
        model=MODEL, input="What is Kubernetes?", instructions="Answer very briefly"
    )
    assert resp.object == "response"
    assert resp.id.startswith("resp_")
    assert resp.status == "completed"
    assert resp.incomplete_details is None
    assert resp.output_text == "What is Kubernetes?"
    assert [(o.type, o.role, o.status) for o in resp.output] == [
        ("message", "assistant", "completed")
    ]
    assert resp.output[0].content[0].type == "output_text"
    usage = resp.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (6, 3, 9)
    assert usage.input_tokens_details.cached_tokens == 0
    assert usage.output_tokens_details.reasoning_tokens == 0


def test_responses_message_items_and_max_output_tokens(echo: _Running) -> None:
    items: list[Any] = [
        {"role": "user", "content": "first question"},
        {"role": "assistant", "content": [{"type": "output_text", "text": "an answer"}]},
        {
            "type": "message",
            "role": "user",
            "content": [{"type": "input_text", "text": "say these four words"}],
        },
    ]
    resp = echo.client().responses.create(model=MODEL, input=items, max_output_tokens=2)
    assert resp.output_text == "say these"
    assert resp.status == "incomplete"  # as OpenAI: cut at max_output_tokens
    assert resp.incomplete_details is not None
    assert resp.incomplete_details.reason == "max_output_tokens"
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens) == (8, 2)


def test_responses_stream_via_sdk_usage_in_completed_event(echo: _Running) -> None:
    stream = echo.client().responses.create(model=MODEL, input="stream these words", stream=True)
    events = list(stream)
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        *["response.output_text.delta"] * 3,
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    deltas = [e.delta for e in events if e.type == "response.output_text.delta"]
    assert deltas == ["stream", " these", " words"]
    assert events[0].response.status == "in_progress"
    assert events[0].response.usage is None
    completed = events[-1]
    assert completed.type == "response.completed"
    assert completed.response.output_text == "stream these words"
    usage = completed.response.usage
    assert usage is not None
    assert (usage.input_tokens, usage.output_tokens, usage.total_tokens) == (3, 3, 6)


def test_responses_raw_stream_names_events_and_ends_incomplete_when_cut(echo: _Running) -> None:
    body = {"model": MODEL, "input": "a b c d", "stream": True, "max_output_tokens": 2}
    events = _sse(_stream_raw(echo, "/v1/responses", body))
    assert all(name == data["type"] for name, data in events)  # `event:` matches the data
    assert "[DONE]" not in [data for _, data in events]
    name, last = events[-1]
    assert name == "response.incomplete"
    assert last["response"]["status"] == "incomplete"
    assert last["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    assert last["response"]["usage"]["output_tokens"] == 2
    item_done = events[-2][1]
    assert item_done["item"]["status"] == "incomplete"


# --- Anthropic Messages ---------------------------------------------------------------------------


def test_messages_non_streaming(echo: _Running) -> None:
    body = {**MESSAGES_BODY, "system": [{"type": "text", "text": "You are terse."}]}
    resp = _post(echo, "/v1/messages", json=body, headers={"anthropic-version": "2023-06-01"})
    assert resp.status_code == 200
    msg = resp.json()
    assert msg.pop("id").startswith("msg_")
    assert msg == {
        "type": "message",
        "role": "assistant",
        "model": MODEL,
        "content": [{"type": "text", "text": "one two three four"}],
        "stop_reason": "end_turn",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 3 + 4,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": 4,
        },
    }
    cut = _post(echo, "/v1/messages", json={**MESSAGES_BODY, "max_tokens": 3}).json()
    assert cut["stop_reason"] == "max_tokens"
    assert cut["content"][0]["text"] == "one two three"
    assert cut["usage"]["output_tokens"] == 3


def test_messages_stream_event_order_and_usage(echo: _Running) -> None:
    body = {**MESSAGES_BODY, "system": "Be brief", "stream": True}
    events = _sse(_stream_raw(echo, "/v1/messages", body))
    assert all(name == data["type"] for name, data in events)
    assert [name for name, _ in events] == [
        "message_start",
        "content_block_start",
        "ping",
        *["content_block_delta"] * 4,
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]
    start = events[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"] == {
        "input_tokens": 6,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": 0,
        "output_tokens": 1,
    }
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    deltas = [data["delta"] for name, data in events if name == "content_block_delta"]
    assert all(d["type"] == "text_delta" for d in deltas)
    assert "".join(d["text"] for d in deltas) == "one two three four"
    delta = events[-2][1]
    assert delta["delta"] == {"stop_reason": "end_turn", "stop_sequence": None}
    assert delta["usage"]["output_tokens"] == 4  # cumulative
    assert delta["usage"]["input_tokens"] == 6


@pytest.mark.parametrize(
    ("body", "status", "kind", "needle"),
    [
        (
            {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
            400,
            "invalid_request_error",
            "max_tokens",
        ),
        ({"model": MODEL, "max_tokens": 5}, 400, "invalid_request_error", "messages"),
        (
            {"max_tokens": 5, "messages": [{"role": "user", "content": "hi"}]},
            400,
            "invalid_request_error",
            "model",
        ),
        ({**MESSAGES_BODY, "max_tokens": 0}, 400, "invalid_request_error", "max_tokens"),
        (
            {**MESSAGES_BODY, "messages": [{"role": "robot", "content": "hi"}]},
            400,
            "invalid_request_error",
            "role",
        ),
        ({**MESSAGES_BODY, "max_tokens": 125}, 400, "invalid_request_error", "context limit"),
        ({**MESSAGES_BODY, "model": "claude-nope"}, 404, "not_found_error", "claude-nope"),
    ],
)
def test_messages_errors_use_anthropic_envelope(
    echo: _Running, body: dict[str, Any], status: int, kind: str, needle: str
) -> None:
    resp = _post(echo, "/v1/messages", json=body)
    assert resp.status_code == status
    error = resp.json()
    assert error["type"] == "error"
    assert error["error"]["type"] == kind
    assert needle in error["error"]["message"]
    assert error["request_id"].startswith("req_")


def test_messages_wrong_method_uses_anthropic_envelope(echo: _Running) -> None:
    resp = httpx.get(f"{echo.url}/v1/messages")
    assert resp.status_code == 405
    assert resp.json()["error"]["type"] == "invalid_request_error"


# --- faults ---------------------------------------------------------------------------------------


def test_drop_usage_removes_usage_everywhere(echo: _Running) -> None:
    drop = _fault("drop-usage")
    assert "usage" not in _post(echo, "/v1/chat/completions", json=CHAT_BODY, headers=drop).json()
    assert (
        "usage"
        not in _post(
            echo, "/v1/embeddings", json={"model": MODEL, "input": "a"}, headers=drop
        ).json()
    )
    assert (
        "usage"
        not in _post(
            echo, "/v1/responses", json={"model": MODEL, "input": "a"}, headers=drop
        ).json()
    )
    assert "usage" not in _post(echo, "/v1/messages", json=MESSAGES_BODY, headers=drop).json()
    with_usage = {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}}
    raw = _stream_raw(echo, "/v1/chat/completions", with_usage, headers=drop)
    assert "usage" not in raw
    assert _sse(raw)[-1] == (None, "[DONE]")
    for path, body in [
        ("/v1/responses", {"model": MODEL, "input": "a b", "stream": True}),
        ("/v1/messages", {**MESSAGES_BODY, "stream": True}),
    ]:
        raw = _stream_raw(echo, path, body, headers=drop)
        assert "usage" not in raw
        assert _sse(raw)[-1][0] in ("response.completed", "message_stop")


def test_zero_usage_reports_zero_counts(echo: _Running) -> None:
    client = echo.client()
    zero = _fault("zero-usage")
    chat = client.chat.completions.create(
        model=MODEL, messages=CHAT_BODY["messages"], extra_headers=zero
    )
    assert chat.choices[0].message.content == "one two three four"
    assert chat.usage is not None
    assert (chat.usage.prompt_tokens, chat.usage.completion_tokens, chat.usage.total_tokens) == (
        0,
        0,
        0,
    )
    resp = client.responses.create(model=MODEL, input="a b", extra_headers=zero)
    assert resp.usage is not None
    assert (resp.usage.input_tokens, resp.usage.output_tokens, resp.usage.total_tokens) == (0, 0, 0)
    emb = client.embeddings.create(model=MODEL, input="a b", extra_headers=zero)
    assert (emb.usage.prompt_tokens, emb.usage.total_tokens) == (0, 0)
    events = _sse(
        _stream_raw(echo, "/v1/messages", {**MESSAGES_BODY, "stream": True}, headers=zero)
    )
    assert events[0][1]["message"]["usage"]["input_tokens"] == 0
    assert events[0][1]["message"]["usage"]["output_tokens"] == 0
    assert events[-2][1]["usage"]["output_tokens"] == 0


# What only the end of a stream carries, in each of the four formats.
_TERMINALS = ("[DONE]", '"usage":{"prompt', "response.completed", "message_delta", "message_stop")


@pytest.mark.parametrize(
    ("path", "body", "content_marker"),
    [
        (
            "/v1/chat/completions",
            {**CHAT_BODY, "stream": True, "stream_options": {"include_usage": True}},
            '"content":"',
        ),
        (
            "/v1/completions",
            {"model": MODEL, "prompt": "one two three four", "stream": True},
            '"finish_reason":null',
        ),
        (
            "/v1/responses",
            {"model": MODEL, "input": "one two three four", "stream": True},
            "event: response.output_text.delta",
        ),
        ("/v1/messages", {**MESSAGES_BODY, "stream": True}, "event: content_block_delta"),
    ],
)
def test_cut_after_drops_the_stream_after_n_content_events(
    echo: _Running, path: str, body: dict[str, Any], content_marker: str
) -> None:
    raw = _read_until_cut(echo, path, body, "cut-after=2")
    assert raw.count(content_marker) - (1 if path == "/v1/chat/completions" else 0) == 2
    for terminal in _TERMINALS:
        assert terminal not in raw
    # More than the reply has: cut after the last word, still without the end.
    raw = _read_until_cut(echo, path, body, "cut-after=99")
    for terminal in _TERMINALS:
        assert terminal not in raw


def test_cut_after_non_streaming_sends_part_of_the_body(echo: _Running) -> None:
    with pytest.raises(httpx.RemoteProtocolError):
        _post(echo, "/v1/chat/completions", json=CHAT_BODY, headers=_fault("cut-after=10"))
    # On the wire: a Content-Length, then exactly N bytes, then the connection closes.
    port = int(echo.url.rsplit(":", 1)[1])
    payload = json.dumps(CHAT_BODY).encode()
    request = (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: sim\r\nContent-Type: application/json\r\n"
        b"x-sim-fault: cut-after=10\r\nContent-Length: "
        + str(len(payload)).encode()
        + b"\r\n\r\n"
        + payload
    )
    with socket.create_connection(("127.0.0.1", port), timeout=5) as conn:
        conn.sendall(request)
        data = b""
        while chunk := conn.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    length = int(
        next(
            line.split(b":")[1]
            for line in head.split(b"\r\n")
            if line.lower().startswith(b"content-length")
        )
    )
    assert head.startswith(b"HTTP/1.1 200")
    assert len(body) == 10 < length


def test_cut_is_not_logged_as_an_application_error(echo: _Running) -> None:
    records: list[logging.LogRecord] = []
    handler = logging.Handler()
    handler.emit = records.append  # type: ignore[method-assign]
    logger = logging.getLogger("uvicorn.error")
    logger.addHandler(handler)
    try:
        _read_until_cut(
            echo,
            "/v1/completions",
            {"model": MODEL, "prompt": "a b", "stream": True},
            "cut-after=1",
        )
        assert (
            _post(echo, "/v1/completions", json={"model": MODEL, "prompt": "a"}).status_code == 200
        )
    finally:
        logger.removeHandler(handler)
    assert [r for r in records if r.levelno >= logging.ERROR] == []


def test_stall_after_pauses_a_stream_and_delays_a_plain_answer(echo: _Running) -> None:
    body = {**CHAT_BODY, "stream": True}
    arrivals: list[float] = []
    with httpx.stream(
        "POST",
        f"{echo.url}/v1/chat/completions",
        json=body,
        headers=_fault("stall-after=2:300"),
        timeout=5,
    ) as resp:
        for line in resp.iter_lines():
            if '"content":"' in line and '"role"' not in line:
                arrivals.append(time.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(arrivals)]
    assert len(gaps) == 3
    assert gaps[1] >= 0.3 - 0.01  # between the 2nd and 3rd word
    assert gaps[0] < 0.15 and gaps[2] < 0.15
    began = time.monotonic()
    resp = _post(
        echo,
        "/v1/completions",
        json={"model": MODEL, "prompt": "a"},
        headers=_fault("stall-after=0:150"),
    )
    assert resp.status_code == 200
    assert time.monotonic() - began >= 0.15 - 0.01


def test_non_json_answers_200_with_a_json_content_type(echo: _Running) -> None:
    for path, body in [("/v1/chat/completions", CHAT_BODY), ("/v1/messages", MESSAGES_BODY)]:
        resp = _post(echo, path, json={**body, "stream": True}, headers=_fault("non-json"))
        assert resp.status_code == 200
        assert resp.headers["content-type"] == "application/json"
        with pytest.raises(json.JSONDecodeError):
            resp.json()


def test_status_answers_with_the_error_envelope_of_the_api(echo: _Running) -> None:
    with pytest.raises(openai.InternalServerError) as info:
        echo.client().chat.completions.create(
            model=MODEL, messages=CHAT_BODY["messages"], extra_headers=_fault("status=503")
        )
    assert info.value.status_code == 503
    assert isinstance(info.value.body, dict)
    assert info.value.body["code"] == 503
    limited = _post(
        echo, "/v1/embeddings", json={"model": MODEL, "input": "a"}, headers=_fault("status=429")
    )
    assert limited.status_code == 429
    assert limited.json()["error"]["type"] == "RateLimitError"
    overloaded = _post(echo, "/v1/messages", json=MESSAGES_BODY, headers=_fault("status=529"))
    assert overloaded.status_code == 529
    assert overloaded.json()["type"] == "error"
    assert overloaded.json()["error"]["type"] == "overloaded_error"


@pytest.mark.parametrize(
    ("spec", "needle"),
    [
        ("explode", "'explode'"),
        ("drop-usage, teleport", "'teleport'"),
        ("cut-after=x", "'cut-after=x'"),
        ("stall-after=1", "'stall-after=1'"),
        ("status=200", "'status=200'"),
        ("drop-usage,zero-usage", "cannot be combined"),
        ("cut-after=1,cut-after=2", "more than once"),
    ],
)
def test_bad_fault_directive_is_400_naming_it(echo: _Running, spec: str, needle: str) -> None:
    resp = _post(echo, "/v1/chat/completions", json=CHAT_BODY, headers=_fault(spec))
    assert resp.status_code == 400
    assert resp.json()["error"]["param"] == "x-sim-fault"
    assert needle in resp.json()["error"]["message"]
    anthropic = _post(echo, "/v1/messages", json=MESSAGES_BODY, headers=_fault(spec))
    assert anthropic.status_code == 400
    assert needle in anthropic.json()["error"]["message"]


def test_default_faults_apply_unless_the_request_names_its_own(
    start: Callable[..., _Running],
) -> None:
    sim = start(mode="echo", faults=["zero-usage"])
    client = sim.client()
    plain = client.chat.completions.create(model=MODEL, messages=CHAT_BODY["messages"])
    assert plain.usage is not None and plain.usage.total_tokens == 0
    behaving = client.chat.completions.create(
        model=MODEL, messages=CHAT_BODY["messages"], extra_headers=_fault("none")
    )
    assert behaving.usage is not None and behaving.usage.total_tokens == 8
    failing = start(mode="echo", faults=["status=503"])
    assert httpx.get(f"{failing.url}/health").status_code == 200  # never on /health, /v1/models
    assert httpx.get(f"{failing.url}/v1/models").status_code == 200
    assert (
        _post(failing, "/v1/completions", json={"model": MODEL, "prompt": "a"}).status_code == 503
    )


# --- latency --------------------------------------------------------------------------------------


def test_time_to_first_token_and_inter_token_latency(start: Callable[..., _Running]) -> None:
    sim = start(mode="echo", time_to_first_token_ms=60, inter_token_latency_ms=20)
    client = sim.client()
    began = time.monotonic()
    client.completions.create(model=MODEL, prompt="one two three four five six")
    assert time.monotonic() - began >= 0.06 + 5 * 0.02 - 0.005

    began = time.monotonic()
    stream = client.completions.create(model=MODEL, prompt="one two", stream=True)
    first = next(iter(stream))
    assert first.choices[0].text == "one"
    assert time.monotonic() - began >= 0.06 - 0.005
    rest = list(stream)
    assert time.monotonic() - began >= 0.06 + 0.02 - 0.005
    assert rest[-1].choices[0].finish_reason == "stop"


@pytest.mark.parametrize(
    ("path", "body", "marker"),
    [
        (
            "/v1/responses",
            {"model": MODEL, "input": "one two three", "stream": True},
            b"event: response.output_text.delta",
        ),
        (
            "/v1/messages",
            {
                **MESSAGES_BODY,
                "messages": [{"role": "user", "content": "one two three"}],
                "stream": True,
            },
            b"event: content_block_delta",
        ),
    ],
)
def test_latency_flags_pace_responses_and_messages_streams(
    start: Callable[..., _Running], path: str, body: dict[str, Any], marker: bytes
) -> None:
    sim = start(mode="echo", time_to_first_token_ms=100, inter_token_latency_ms=30)
    began = time.monotonic()
    arrivals: list[float] = []
    with httpx.stream("POST", f"{sim.url}{path}", json=body, timeout=5) as resp:
        first_byte = None
        for raw in resp.iter_raw():
            first_byte = first_byte or time.monotonic()
            arrivals.extend([time.monotonic()] * raw.count(marker))
    assert first_byte is not None and first_byte - began < 0.08  # the opening events go at once
    assert len(arrivals) == 3
    assert arrivals[0] - began >= 0.1 - 0.005
    assert arrivals[2] - arrivals[0] >= 2 * 0.03 - 0.005


def test_inherited_socket_has_no_delayed_ack_stall(echo: _Running) -> None:
    # Headers and body are two writes: without TCP_NODELAY each response waits ~40 ms.
    body = {"model": MODEL, "prompt": "ping"}
    with httpx.Client(base_url=echo.url) as client:
        client.post("/v1/completions", json=body)
        times = []
        for _ in range(9):
            began = time.perf_counter()
            client.post("/v1/completions", json=body)
            times.append(time.perf_counter() - began)
    assert sorted(times)[4] < 0.02


# --- errors ---------------------------------------------------------------------------------------


def test_unknown_model_is_404_with_llm_d_envelope(echo: _Running) -> None:
    with pytest.raises(openai.NotFoundError) as info:
        echo.client().chat.completions.create(
            model="gpt-nope", messages=[{"role": "user", "content": "hi"}]
        )
    assert info.value.status_code == 404
    assert info.value.body == {
        "message": "The model `gpt-nope` does not exist.",
        "type": "NotFoundError",
        "param": None,
        "code": 404,
    }
    with pytest.raises(openai.NotFoundError):
        echo.client().completions.create(model="gpt-nope", prompt="hi")


@pytest.mark.parametrize(
    ("path", "body", "param"),
    [
        ("/v1/chat/completions", {"model": MODEL}, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": "hi"}, "messages"),
        ("/v1/chat/completions", {"model": MODEL, "messages": [1]}, "messages"),
        ("/v1/completions", {"model": MODEL}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": 5}, "prompt"),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 0}, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": "5"}, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "max_tokens": 1.5}, "max_tokens"),
        ("/v1/completions", {"model": MODEL, "prompt": "a", "stream": "yes"}, "stream"),
        (
            "/v1/chat/completions",
            {"model": MODEL, "messages": [{"role": "user", "content": "a"}], "max_tokens": True},
            "max_tokens",
        ),
        (
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": [{"role": "user", "content": "a"}],
                "max_completion_tokens": -1,
            },
            "max_completion_tokens",
        ),
    ],
)
def test_invalid_parameters_are_400_naming_the_parameter(
    echo: _Running, path: str, body: dict[str, Any], param: str
) -> None:
    resp = _post(echo, path, json=body)
    assert resp.status_code == 400
    error = resp.json()["error"]
    assert error["type"] == "BadRequestError"
    assert error["code"] == 400
    assert error["param"] == param
    assert param in error["message"]


@pytest.mark.parametrize("content", [b"{not json", b"[1, 2]", b'"text"', b""])
def test_body_that_is_not_a_json_object_is_400(echo: _Running, content: bytes) -> None:
    resp = _post(echo, "/v1/chat/completions", content=content)
    assert resp.status_code == 400
    assert resp.json()["error"]["message"].startswith("Failed to read and parse request body")


def test_context_window_overflow_is_400(echo: _Running) -> None:
    client = echo.client()
    prompt = " ".join(["w"] * 124)  # max_model_len is 128
    with pytest.raises(openai.BadRequestError) as info:
        client.completions.create(model=MODEL, prompt=prompt, max_tokens=5)
    assert info.value.status_code == 400
    assert isinstance(info.value.body, dict)
    assert info.value.body["param"] == "max_tokens"
    assert info.value.body["message"].startswith(
        "This model's maximum context length is 128 tokens. However, you requested 129 tokens "
        "(124 in the prompt, 5 in the completion)."
    )
    ok = client.completions.create(model=MODEL, prompt=prompt, max_tokens=4)
    assert ok.usage is not None
    assert ok.usage.total_tokens == 128
    with pytest.raises(openai.BadRequestError):  # without max_tokens one completion token is due
        client.completions.create(model=MODEL, prompt=" ".join(["w"] * 128))


def test_unknown_path_and_wrong_method(echo: _Running) -> None:
    missing = httpx.get(f"{echo.url}/v1/audio/speech")
    assert missing.status_code == 404
    assert missing.json()["error"]["type"] == "NotFoundError"
    wrong = httpx.get(f"{echo.url}/v1/chat/completions")
    assert wrong.status_code == 405
    assert wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["code"] == 405


# --- parse_sim_args -------------------------------------------------------------------------------


def test_parse_tutorial_args() -> None:
    opts, warnings = parse_sim_args(TUTORIAL_ARGS)
    assert opts == SimOptions(model=MODEL, port=8000)
    assert (opts.mode, opts.max_model_len, opts.seed) == ("random", 1024, None)
    assert warnings == []


def test_parse_equals_form_durations_and_served_names() -> None:
    opts, warnings = parse_sim_args(
        [
            f"--model={MODEL}",
            "--port=9000",
            "--mode=echo",
            "--time-to-first-token=1.5s",
            "--inter-token-latency",
            "20",
            "--max-model-len=2048",
            "--seed=-4",
            "--served-model-name",
            "a",
            "b",
            "--served-model-name=c",
        ]
    )
    assert opts == SimOptions(
        model=MODEL,
        served_model_names=["a", "b", "c"],
        port=9000,
        mode="echo",
        time_to_first_token_ms=1500,
        inter_token_latency_ms=20,
        max_model_len=2048,
        seed=-4,
    )
    assert opts.model_names == [MODEL, "a", "b", "c"]
    assert warnings == []


def test_parse_ignores_unknown_flags_with_a_warning() -> None:
    opts, warnings = parse_sim_args(
        ["--max-loras", "2", "--enforce-eager", "--lora-modules", "{}", "{}", "--model", "m"]
    )
    assert opts.model == "m"
    assert warnings == [
        "ignoring unsupported simulator flag --max-loras",
        "ignoring unsupported simulator flag --enforce-eager",
        "ignoring unsupported simulator flag --lora-modules",
    ]


def test_parse_repeatable_fault_flag() -> None:
    opts, warnings = parse_sim_args(
        ["--model", "m", "--fault", "drop-usage", "--fault=cut-after=3, stall-after=1:20"]
    )
    assert opts.faults == ["drop-usage", "cut-after=3, stall-after=1:20"]
    assert warnings == []
    assert parse_sim_args(["--model", "m"])[0].faults == []


@pytest.mark.parametrize(
    ("argv", "problem"),
    [
        (["--fault", "explode"], "'explode'"),
        (["--fault", "status=99"], "400..599"),
        (["--fault", "drop-usage", "--fault", "zero-usage"], "cannot be combined"),
        (["--fault"], "value"),
    ],
)
def test_parse_rejects_bad_fault_flags(argv: list[str], problem: str) -> None:
    with pytest.raises(ValueError, match="--fault") as info:
        parse_sim_args(["--model", "m", *argv])
    assert problem in str(info.value)


def test_sim_options_check_faults() -> None:
    with pytest.raises(ValueError, match="faults: unknown fault directive 'nope'"):
        SimOptions(model="m", faults=["nope"])


def test_parse_accepts_yaml_numbers() -> None:
    opts, _ = parse_sim_args(["--model", "m", "--port", 8001, "--seed", 5])
    assert (opts.port, opts.seed) == (8001, 5)


def test_parse_takes_model_from_sim_model_env_only_when_flag_absent() -> None:
    assert parse_sim_args([], env={"SIM_MODEL": "from-env"})[0].model == "from-env"
    assert parse_sim_args(["--model", "flag"], env={"SIM_MODEL": "env"})[0].model == "flag"


@pytest.mark.parametrize(
    ("argv", "flag", "problem"),
    [
        (["--port", "8000"], "--model", "required"),
        (["--model="], "--model", "empty"),
        (["--model", "m", "--port", "abc"], "--port", "integer"),
        (["--model", "m", "--port", "70000"], "--port", "at most"),
        (["--model", "m", "--port"], "--port", "value"),
        (["--model", "m", "--mode", "foo"], "--mode", "'foo'"),
        (["--model", "m", "--time-to-first-token", "-5"], "--time-to-first-token", "negative"),
        (["--model", "m", "--inter-token-latency", "10 parsecs"], "--inter-token-latency", "dur"),
        (["--model", "m", "--max-model-len", "0"], "--max-model-len", "at least 1"),
        (["--model", "m", "--seed", "x"], "--seed", "integer"),
        (["--model", "m", "--served-model-name"], "--served-model-name", "name"),
    ],
)
def test_parse_rejects_bad_values_naming_the_flag(argv: list[str], flag: str, problem: str) -> None:
    with pytest.raises(ValueError, match=flag) as info:
        parse_sim_args(argv)
    assert problem in str(info.value)


# --- run_simulator: a real process stopped by a signal ------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_run_simulator_stops_cleanly_on_signal(sig: signal.Signals) -> None:
    sock = _listening_socket()
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    code = textwrap.dedent(
        """
        import sys
        from tokengateway.simulator import SimOptions, run_simulator
        run_simulator(SimOptions(model="m"), fd=int(sys.argv[1]))
        print("stopped")
        """
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", code, str(sock.fileno())],
        pass_fds=[sock.fileno()],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "simulator did not come up"
            time.sleep(0.02)
        proc.send_signal(sig)
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
    assert proc.returncode == 0, err
    assert out.decode().strip() == "stopped"
    assert b"Traceback" not in err
