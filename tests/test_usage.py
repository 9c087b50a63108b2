"""Reading usage from every response shape, JSON and SSE, and estimates when there is none."""

import msgspec
import pytest

from tokengateway.wire.tokens import Usage, count_tokens, estimate_usage
from tokengateway.wire.usage import (
    SSEStream,
    ask_for_usage,
    completion_text_of,
    usage_from_json,
    usage_of,
)

# A chat stream as an upstream sends it when asked for usage (OpenAI's API shape).
WITH_USAGE = (
    b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant"}}],"usage":null}\n\n'
    b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"Hello"}}],"usage":null}\r\n\r\n'
    b'data: {"id":"c","choices":[{"index":0,"delta":{"content":" world"}}], "usage": null}\r\r'
    b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}],"usage":null}\n\n'
    b'data: {"id":"c","choices":[],"usage":{"prompt_tokens":3,"completion_tokens":2,"total_tokens":5}}\n\n'
    b"data: [DONE]\n\n"
)
# The same stream as the upstream sends it when not asked.
WITHOUT_USAGE = (
    b'data: {"id":"c","choices":[{"index":0,"delta":{"role":"assistant"}}]}\n\n'
    b'data: {"id":"c","choices":[{"index":0,"delta":{"content":"Hello"}}]}\r\n\r\n'
    b'data: {"id":"c","choices":[{"index":0,"delta":{"content":" world"}}]}\r\r'
    b'data: {"id":"c","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
    b"data: [DONE]\n\n"
)

RESPONSES = (
    b"event: response.created\n"
    b'data: {"type":"response.created","sequence_number":0,"response":{"usage":null}}\n\n'
    b"event: response.output_text.delta\n"
    b'data: {"type":"response.output_text.delta","sequence_number":1,"delta":"Hi there"}\n\n'
    b"event: response.completed\n"
    b'data: {"type":"response.completed","sequence_number":2,"response":{"usage":'
    b'{"input_tokens":7,"input_tokens_details":{"cached_tokens":2},"output_tokens":2,"total_tokens":9}}}\n\n'
)

MESSAGES = (
    b"event: message_start\n"
    b'data: {"type":"message_start","message":{"id":"m","usage":{"input_tokens":11,"output_tokens":1,'
    b'"cache_creation_input_tokens":0,"cache_read_input_tokens":4}}}\n\n'
    b'event: content_block_delta\ndata: {"type":"content_block_delta","index":0,"delta":{"type":"text_delta","text":"Hey"}}\n\n'
    b'event: message_delta\ndata: {"type":"message_delta","delta":{"stop_reason":"end_turn"},"usage":{"output_tokens":6}}\n\n'
    b'event: message_stop\ndata: {"type":"message_stop"}\n\n'
)


def run(stream: bytes, cuts: list[int], hide: bool) -> tuple[bytes, SSEStream]:
    reader = SSEStream(hide_usage=hide)
    out = []
    last = 0
    for cut in [*cuts, len(stream)]:
        out.append(reader.feed(stream[last:cut]))
        last = cut
    out.append(reader.close())
    return b"".join(out), reader


def test_usage_shapes() -> None:
    chat = usage_of(
        {
            "prompt_tokens": 5,
            "completion_tokens": 95,
            "total_tokens": 100,
            "prompt_tokens_details": {"cached_tokens": 3},
        }
    )
    assert chat == Usage(5, 95, 100, 3)
    assert usage_of({"prompt_tokens": 8, "total_tokens": 8}) == Usage(8, 0, 8)  # embeddings
    responses = usage_of(
        {
            "input_tokens": 7,
            "output_tokens": 2,
            "total_tokens": 9,
            "input_tokens_details": {"cached_tokens": 2},
        }
    )
    assert responses == Usage(7, 2, 9, 2)
    anthropic = usage_of(
        {
            "input_tokens": 11,
            "output_tokens": 6,
            "cache_creation_input_tokens": 5,
            "cache_read_input_tokens": 4,
        }
    )
    assert anthropic == Usage(20, 6, 26, 4)  # Anthropic's input excludes the cache


@pytest.mark.parametrize(
    ("raw", "total"),
    [
        ({"total_tokens": -5}, None),  # no usable count: as if no usage (an estimate)
        ({"total_tokens": -5, "prompt_tokens": 2, "completion_tokens": 3}, 5),
        ({"total_tokens": 10**40}, 10**12),
        ({"total_tokens": float("inf")}, 10**12),
        ({"total_tokens": 12.9}, 12),
        ({"total_tokens": "lots", "prompt_tokens": 2, "completion_tokens": 3}, 5),
        ({"prompt_tokens": True, "completion_tokens": 4}, 4),
        ({"total_tokens": float("nan"), "prompt_tokens": 1}, 1),
    ],
)
def test_odd_counts(raw: dict, total: int | None) -> None:
    usage = usage_of(raw)
    if total is None:
        assert usage is None
    else:
        assert usage is not None and usage.total_tokens == total


@pytest.mark.parametrize(
    "body", [b"{}", b'{"usage": null}', b"not json", b"[1,2]", b'{"usage": "lots"}', b""]
)
def test_no_usage(body: bytes) -> None:
    assert usage_from_json(body) is None


def test_completion_text_of_each_shape() -> None:
    chat = b'{"choices":[{"message":{"role":"assistant","content":"four words of text"}}]}'
    assert completion_text_of(chat) == "four words of text"
    legacy = b'{"choices":[{"text":"done"}]}'
    assert completion_text_of(legacy) == "done"
    responses = b'{"output":[{"type":"message","content":[{"type":"output_text","text":"yes"}]}]}'
    assert completion_text_of(responses) == "yes"
    messages = b'{"content":[{"type":"text","text":"sure"}]}'
    assert completion_text_of(messages) == "sure"


@pytest.mark.parametrize("stream", [WITH_USAGE, RESPONSES, MESSAGES])
def test_stream_passes_through_untouched_at_every_split(stream: bytes) -> None:
    for cut in range(len(stream) + 1):
        out, reader = run(stream, [cut], hide=False)
        assert out == stream
        assert reader.usage is not None, cut
    assert run(WITH_USAGE, [], False)[1].usage == Usage(3, 2, 5)
    assert run(RESPONSES, [], False)[1].usage == Usage(7, 2, 9, 2)
    assert run(MESSAGES, [], False)[1].usage == Usage(15, 6, 21, 4)


def test_hidden_usage_gives_the_client_the_stream_it_asked_for_at_every_split() -> None:
    for cut in range(len(WITH_USAGE) + 1):
        out, reader = run(WITH_USAGE, [cut], hide=True)
        assert out == WITHOUT_USAGE, cut
        assert reader.usage == Usage(3, 2, 5)
        assert reader.text == "Hello world"


def test_hidden_usage_byte_by_byte() -> None:
    out, reader = run(WITH_USAGE, list(range(1, len(WITH_USAGE))), hide=True)
    assert out == WITHOUT_USAGE
    assert reader.usage == Usage(3, 2, 5)


def test_stream_without_usage_keeps_the_text_for_an_estimate() -> None:
    out, reader = run(WITHOUT_USAGE, [17, 60], hide=False)
    assert out == WITHOUT_USAGE
    assert reader.usage is None and reader.text == "Hello world"


def test_unterminated_last_event_still_counts() -> None:
    cut = WITH_USAGE[: WITH_USAGE.index(b"data: [DONE]") - 2]
    _, reader = run(cut, [], hide=False)
    assert reader.usage is not None and reader.usage.total_tokens == 5


def test_ask_for_usage() -> None:
    body = msgspec.json.encode({"model": "m", "stream": True, "messages": []})
    sent, hidden = ask_for_usage("/v1/chat/completions", body)
    assert hidden and msgspec.json.decode(sent)["stream_options"] == {"include_usage": True}
    asked = msgspec.json.encode({"stream": True, "stream_options": {"include_usage": True}})
    assert ask_for_usage("/v1/chat/completions", asked) == (asked, False)
    off = msgspec.json.encode({"stream": True, "stream_options": {"include_usage": False}})
    sent, hidden = ask_for_usage("/v1/completions", off)
    assert hidden and msgspec.json.decode(sent)["stream_options"]["include_usage"] is True
    plain = msgspec.json.encode({"stream": False})
    assert ask_for_usage("/v1/chat/completions", plain) == (plain, False)
    assert ask_for_usage("/v1/responses", body) == (body, False)
    assert ask_for_usage("/v1/chat/completions", b"{bad") == (b"{bad", False)


def test_estimate_uses_a_real_tokenizer_and_is_never_zero() -> None:
    assert count_tokens("What is Kubernetes?") == 4  # o200k_base
    request = {"messages": [{"role": "user", "content": "What is Kubernetes?"}], "model": "m"}
    usage = estimate_usage(request, "Kubernetes orchestrates containers.")
    assert usage.estimated and usage.prompt_tokens == 4 and usage.completion_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
    assert estimate_usage(None, "").total_tokens == 1
    assert estimate_usage({"input": [1, 2, 3]}, "").prompt_tokens == 3  # token ids
    anthropic = {
        "system": "Be brief.",
        "messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
    }
    assert estimate_usage(anthropic, "").prompt_tokens == count_tokens("Be brief.\nHi")


@pytest.mark.parametrize("choices", [b"1", b"true", b"2.5", b'"text"', b"{}", b"null"])
def test_choices_that_are_not_an_array_are_read_as_none(choices: bytes) -> None:
    """Found by the SSE property test: `"choices": 1` from an upstream raised a TypeError
    in the middle of a relayed stream (and in the estimate of a plain answer)."""
    event = b'data: {"choices": ' + choices + b"}\n\n"
    reader = SSEStream()
    assert reader.feed(event) == event  # passed on as it came
    assert reader.close() == b"" and reader.usage is None and reader.text == ""
    assert completion_text_of(b'{"choices": ' + choices + b"}") == ""
