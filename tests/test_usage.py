"""Reading usage from JSON bodies and SSE streams, and the estimate when there is none."""

import pytest

from tokengateway.proxy.usage import SSEUsageReader, estimate_usage, usage_from_json

STREAM = (
    b'data: {"choices":[{"delta":{"role":"assistant"}}]}\n\n'
    b'data: {"choices":[{"delta":{"content":"Hello world"}}]}\r\n\r\n'
    b'data: {"choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\r\r'
    b"data: [DONE]\n\n"
)


def test_usage_from_json() -> None:
    body = b'{"id":"x","choices":[],"usage":{"prompt_tokens":5,"completion_tokens":95,"total_tokens":100}}'
    usage = usage_from_json(body)
    assert usage is not None and (
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
    ) == (5, 95, 100)
    assert not usage.estimated


@pytest.mark.parametrize(
    "body",
    [b"{}", b'{"usage": null}', b"not json", b"[1,2]", b'{"usage": "lots"}', b""],
)
def test_no_usage(body: bytes) -> None:
    assert usage_from_json(body) is None


def test_total_missing_is_the_sum_and_negatives_clamp() -> None:
    usage = usage_from_json(b'{"usage":{"prompt_tokens":4,"completion_tokens":6}}')
    assert usage is not None and usage.total_tokens == 10
    usage = usage_from_json(b'{"usage":{"total_tokens":-5}}')
    assert usage is not None and usage.total_tokens == 0


def test_sse_usage_at_every_split() -> None:
    for cut in range(len(STREAM) + 1):
        reader = SSEUsageReader()
        reader.feed(STREAM[:cut])
        reader.feed(STREAM[cut:])
        reader.close()
        assert reader.usage is not None and reader.usage.total_tokens == 5, cut
        assert reader.text_chars == len("Hello world")


def test_sse_byte_by_byte() -> None:
    reader = SSEUsageReader()
    for i in range(len(STREAM)):
        reader.feed(STREAM[i : i + 1])
    reader.close()
    assert reader.usage is not None and reader.usage.total_tokens == 5


def test_estimate_is_never_zero() -> None:
    body = b'{"messages":[{"role":"user","content":"What is Kubernetes?"}]}'
    usage = estimate_usage(body, 0)
    assert usage.estimated and usage.total_tokens >= 1
    assert estimate_usage(b"", 0).total_tokens == 1
    bigger = estimate_usage(body, 400)
    assert bigger.completion_tokens == 100 and bigger.total_tokens > 100
