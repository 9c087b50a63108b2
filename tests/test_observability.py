"""What clients and operators see: rate-limit headers, request ids, metrics, the access log."""

from __future__ import annotations

import re
import time
import uuid

import httpx
import openai
import pytest

from tests.conftest import TUTORIAL, chat
from tests.test_openai_sdk import ask, sdk
from tests.test_policies import rlp
from tokengateway.dataplane.ratelimit_headers import go_duration

ROUTE = "default/trlp-tutorial-llm-sim"
FREE = "gateway-system/trlp-tutorial-token-limits/free"


def _reset_seconds(text: str) -> float:
    """OpenAI's reset text back to seconds."""
    if text.endswith("ms"):
        return float(text[:-2]) / 1000
    total = 0.0
    for number, unit in re.findall(r"([\d.]+)([hms])", text):
        total += float(number) * {"h": 3600, "m": 60, "s": 1}[unit]
    return total


def _spend_free(client: httpx.Client) -> tuple[list[httpx.Response], httpx.Response]:
    """Free-user requests until the first 429: (the admitted, the refusal)."""
    admitted = []
    for _ in range(20):
        r = client.post("/v1/chat/completions", json=chat())
        if r.status_code == 429:
            return admitted, r
        assert r.status_code == 200, r.text
        admitted.append(r)
    raise AssertionError("the free limit never refused")


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.25, "250ms"), (1, "1s"), (1.5, "1.5s"), (60, "1m0s"), (360, "6m0s"), (3723, "1h2m3s")],
)
def test_go_duration(seconds: float, text: str) -> None:
    assert go_duration(seconds) == text


def test_token_headers_on_successes_and_the_429(start_gateway) -> None:
    gw = start_gateway(TUTORIAL)
    with gw.client() as client:
        admitted, refused = _spend_free(client)
    used = 0
    for r in admitted:
        used += r.json()["usage"]["total_tokens"]
        assert r.headers["x-ratelimit-limit-tokens"] == "50"
        # after this request's own usage
        assert int(r.headers["x-ratelimit-remaining-tokens"]) == max(0, 50 - used)
        assert 0 < _reset_seconds(r.headers["x-ratelimit-reset-tokens"]) <= 60
    assert refused.headers["x-ratelimit-limit-tokens"] == "50"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    retry = int(refused.headers["retry-after"])
    assert 1 <= retry <= 60
    assert abs(int(refused.headers["retry-after-ms"]) / 1000 - retry) <= 1
    assert refused.headers["x-should-retry"] == "true"
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_exceeded" and "50 tokens per 1m" in error["message"]
    # the body is made once per (limit, wait): it must still say this refusal's own wait
    assert error["message"].endswith(f"reached; retry in {retry}s"), error["message"]


def test_headers_on_a_stream(start_gateway) -> None:
    gw = start_gateway(TUTORIAL)
    with gw.client("iamagolduser") as client:
        first = client.post("/v1/chat/completions", json=chat())
        used = first.json()["usage"]["total_tokens"]
        with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
            assert r.headers["content-type"].startswith("text/event-stream")
            assert r.headers["x-ratelimit-limit-tokens"] == "200"
            # sent before the stream's usage is known: what was left when it started
            assert int(r.headers["x-ratelimit-remaining-tokens"]) == 200 - used
            assert "x-ratelimit-reset-tokens" in r.headers
            assert "data: [DONE]" in r.read().decode()


def test_request_limit_headers_and_a_long_quota(start_gateway, manifests) -> None:
    free_only = 'auth.identity.userid == "user-1"'
    extra = rlp(
        "per-route",
        "trlp-tutorial-llm-sim",
        {"calls": 3},
        kind="HTTPRoute",
        namespace="default",
        when=free_only,
    )
    gold_quota = {
        "- limit: 200 # 200 tokens per minute for gold users (small for testing)\n          window: 1m": (
            "- limit: 200\n          window: 720h"
        )
    }
    gw = start_gateway(manifests(gold_quota, extra=extra))
    with gw.client() as client:
        small = chat(max_tokens=3)  # 3 requests stay far below the free token limit
        first = client.post("/v1/chat/completions", json=small)
        assert first.headers["x-ratelimit-limit-requests"] == "3"
        assert first.headers["x-ratelimit-remaining-requests"] == "2"
        assert 0 < _reset_seconds(first.headers["x-ratelimit-reset-requests"]) <= 60
        assert first.headers["x-ratelimit-limit-tokens"] == "50"
        statuses = [client.post("/v1/chat/completions", json=small).status_code for _ in range(3)]
        assert statuses == [200, 200, 429]
        refused = client.post("/v1/chat/completions", json=small)
        assert refused.headers["x-ratelimit-limit-requests"] == "3"
        assert refused.headers["x-ratelimit-remaining-requests"] == "0"
        assert refused.json()["error"]["type"] == "rate_limit_exceeded"
        assert "3 requests per 1m" in refused.json()["error"]["message"]
    with gw.client("iamagolduser") as client:
        first = client.post("/v1/chat/completions", json=chat())
        assert "x-ratelimit-limit-requests" not in first.headers  # the RLP is the free user's
        assert _reset_seconds(first.headers["x-ratelimit-reset-tokens"]) > 700 * 3600
        for _ in range(20):
            quota = client.post("/v1/chat/completions", json=chat())
            if quota.status_code == 429:
                break
    assert quota.status_code == 429
    assert quota.json()["error"]["type"] == "insufficient_quota"
    assert quota.json()["error"]["code"] == "insufficient_quota"
    assert quota.headers["x-should-retry"] == "false"
    assert int(quota.headers["retry-after"]) > 700 * 3600


def test_the_sdk_waits_for_retry_after_and_succeeds(start_gateway, manifests) -> None:
    short = {
        "- limit: 50 # 50 tokens per minute for free users (small for testing)\n          window: 1m": "- limit: 50\n          window: 2s"
    }
    gw = start_gateway(manifests(short))
    client = sdk(gw, "iamafreeuser", max_retries=0)
    with pytest.raises(openai.RateLimitError):
        for _ in range(20):
            ask(client)
    patient = sdk(gw, "iamafreeuser", max_retries=3)
    started = time.monotonic()
    answer = ask(patient)  # 429 with retry-after: 1 or 2, then a success
    waited = time.monotonic() - started
    assert answer.usage is not None and answer.usage.total_tokens > 0
    assert 0.5 <= waited < 10


def test_request_ids_travel_both_ways(start_gateway) -> None:
    gw = start_gateway(TUTORIAL)
    with gw.client() as client:
        mine = client.post("/v1/chat/completions", json=chat(), headers={"x-request-id": "req-abc"})
        assert mine.headers["x-request-id"] == "req-abc"
        made = client.post("/v1/chat/completions", json=chat())
        uuid.UUID(made.headers["x-request-id"])
        denied = httpx.post(
            gw.url + "/v1/chat/completions",
            json=chat(),
            headers={"Host": "trlp-tutorial.example.com"},
        )
        assert denied.status_code == 401 and "x-request-id" in denied.headers
    ids = [line["request_id"] for line in gw.access_log(at_least=3)]
    assert "req-abc" in ids and made.headers["x-request-id"] in ids
    assert denied.headers["x-request-id"] in ids


def _metric(text: str, name: str, **labels: str) -> float:
    want = ",".join(f'{k}="{v}"' for k, v in labels.items())
    pattern = (
        re.escape(f"{name}{{{want}}}") + r" ([\d.e+]+)"
        if want
        else re.escape(name) + r" ([\d.e+]+)"
    )
    found = re.search("^" + pattern + "$", text, re.M)
    assert found, f"{name} {labels} not in /metrics"
    return float(found.group(1))


def test_metrics_after_known_traffic_and_no_key_in_logs(start_gateway) -> None:
    gw = start_gateway(TUTORIAL)
    with gw.client() as client:
        admitted, _refused = _spend_free(client)
        with client.stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
            assert r.status_code == 429
    prompt = sum(r.json()["usage"]["prompt_tokens"] for r in admitted)
    completion = sum(r.json()["usage"]["completion_tokens"] for r in admitted)
    text = httpx.get(gw.admin_url + "/metrics").text
    assert _metric(text, "authorized_calls", limitador_namespace=ROUTE, limit_name=FREE) == len(
        admitted
    )
    assert (
        _metric(text, "authorized_hits", limitador_namespace=ROUTE, limit_name=FREE)
        == prompt + completion
    )
    assert _metric(text, "limited_calls", limitador_namespace=ROUTE, limit_name=FREE) == 2
    assert _metric(text, "tokengateway_requests_total", route=ROUTE, status="200") == len(admitted)
    assert _metric(text, "tokengateway_requests_total", route=ROUTE, status="429") == 2
    assert _metric(text, "tokengateway_tokens_total", route=ROUTE, kind="prompt") == prompt
    assert _metric(text, "tokengateway_tokens_total", route=ROUTE, kind="completion") == completion
    assert _metric(text, "tokengateway_upstream_latency_seconds_count", route=ROUTE) == len(
        admitted
    )
    assert _metric(text, "tokengateway_overhead_seconds_count") == len(admitted)
    assert "user-1" not in text  # user ids are not labels: the series stay bounded
    lines = gw.access_log(at_least=len(admitted) + 2)
    refused_lines = [x for x in lines if x["status"] == 429]
    assert refused_lines and all(x["limited_by"] == FREE for x in refused_lines)
    ok = [x for x in lines if x["status"] == 200]
    assert all(x["user"] == "user-1" and x["upstream_ms"] > 0 for x in ok)
    assert "iamafreeuser" not in gw.output() and "iamafreeuser" not in text


def test_made_request_ids_are_distinct_version_4_uuids() -> None:
    from tokengateway.dataplane.app import new_request_id

    made = [new_request_id() for _ in range(20000)]
    assert len(set(made)) == len(made)
    for text in made[:2000]:
        parsed = uuid.UUID(text)
        assert parsed.version == 4 and parsed.variant == uuid.RFC_4122 and str(parsed) == text
