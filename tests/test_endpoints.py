"""Every endpoint and usage shape, streaming and not, counted through the gateway against
the built-in simulator (which misbehaves on request through `x-sim-fault`)."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from tests.conftest import HOST, MODEL

ALL_PATHS = {'request.path == "/v1/chat/completions"': 'request.path.startsWith("/v1/")'}


@pytest.fixture
def gw(manifests, start_gateway):
    return start_gateway(manifests(replace=ALL_PATHS))


def sdk(gw, fault: str | None = None) -> openai.OpenAI:
    headers = {"Authorization": "APIKEY iamagolduser", "Host": HOST}
    if fault:
        headers["x-sim-fault"] = fault
    return openai.OpenAI(
        base_url=gw.url + "/v1", api_key="x", default_headers=headers, max_retries=0
    )


def raw(gw, fault: str | None = None) -> httpx.Client:
    headers = {"Authorization": "APIKEY iamagolduser", "Host": HOST}
    if fault:
        headers["x-sim-fault"] = fault
    return httpx.Client(base_url=gw.url, headers=headers, timeout=30)


def logged(gw) -> dict:
    return gw.access_log(1)[-1]


def test_embeddings(gw) -> None:
    result = sdk(gw).embeddings.create(model=MODEL, input=["one two three", "four"])
    assert result.usage.prompt_tokens == 4
    entry = logged(gw)
    assert entry["total_tokens"] == 4 and entry["completion_tokens"] == 0
    assert entry["usage_estimated"] is False


def test_responses_api(gw) -> None:
    client = sdk(gw)
    response = client.responses.create(
        model=MODEL, input="What is Kubernetes?", max_output_tokens=5
    )
    assert response.usage.input_tokens == 3
    entry = logged(gw)
    assert entry["total_tokens"] == response.usage.total_tokens
    assert entry["usage_estimated"] is False
    events = list(
        client.responses.create(model=MODEL, input="Hello there", max_output_tokens=4, stream=True)
    )
    # a reply cut by max_output_tokens ends with response.incomplete, which carries usage too
    completed = [e for e in events if e.type in ("response.completed", "response.incomplete")]
    assert completed and completed[0].response.usage.input_tokens == 2
    entry = gw.access_log(2)[-1]
    assert entry["total_tokens"] == completed[0].response.usage.total_tokens
    assert entry["usage_estimated"] is False


def test_anthropic_messages(gw) -> None:
    body = {
        "model": MODEL,
        "max_tokens": 6,
        "messages": [{"role": "user", "content": "Say hello please"}],
    }
    with raw(gw) as c:
        r = c.post("/v1/messages", json=body)
        assert r.status_code == 200
        usage = r.json()["usage"]
        entry = logged(gw)
        assert entry["prompt_tokens"] == usage["input_tokens"] == 3
        assert entry["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
        with c.stream("POST", "/v1/messages", json={**body, "stream": True}) as s:
            text = "".join(s.iter_text())
    deltas = [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: ")]
    final = [d for d in deltas if d["type"] == "message_delta"][-1]["usage"]["output_tokens"]
    entry = gw.access_log(2)[-1]
    assert entry["usage_estimated"] is False
    assert entry["total_tokens"] == 3 + final


def test_legacy_completions_stream_is_counted_without_asking(gw) -> None:
    chunks = list(
        sdk(gw).completions.create(model=MODEL, prompt="one two", max_tokens=3, stream=True)
    )
    assert all(c.usage is None for c in chunks)
    entry = logged(gw)
    assert entry["usage_estimated"] is False and entry["prompt_tokens"] == 2


def test_upstream_dropping_usage_is_estimated(gw) -> None:
    result = sdk(gw, "drop-usage").chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "What is Kubernetes?"}], max_tokens=5
    )
    assert result.usage is None
    entry = logged(gw)
    assert (
        entry["usage_estimated"] is True
        and entry["prompt_tokens"] == 4
        and entry["total_tokens"] > 4
    )
    stream = list(
        sdk(gw, "drop-usage").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5, stream=True
        )
    )
    assert stream
    assert gw.access_log(2)[-1]["usage_estimated"] is True
    metrics = httpx.get(gw.admin_url + "/metrics").text
    assert "tokengateway_usage_estimated_total 2" in metrics


def test_stream_cut_by_the_upstream(gw) -> None:
    with raw(gw, "cut-after=2") as c:
        r = c.post(
            "/v1/chat/completions",
            json={
                "model": MODEL,
                "max_tokens": 10,
                "stream": True,
                "messages": [{"role": "user", "content": "hi"}],
            },
        )
    assert r.status_code == 200
    last = [line for line in r.text.splitlines() if line.startswith("data: ")][-1]
    assert json.loads(last[6:])["error"]["code"] == "upstream_failed"
    entry = logged(gw)
    assert entry["usage_estimated"] is True and entry["total_tokens"] >= 1


def test_upstream_error_status_passes_through_uncharged(gw) -> None:
    with pytest.raises(openai.InternalServerError):
        sdk(gw, "status=503").chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "hi"}]
        )
    entry = logged(gw)
    assert entry["status"] == 503 and "total_tokens" not in entry


def test_non_json_answer_is_charged_an_estimate(gw) -> None:
    with raw(gw, "non-json") as c:
        r = c.post(
            "/v1/chat/completions",
            json={"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
        )
    assert r.status_code == 200
    entry = logged(gw)
    assert entry["usage_estimated"] is True and entry["total_tokens"] >= 1
