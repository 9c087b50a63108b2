"""SSEStream against a reference reader written the plain way, on random streams cut anywhere.

The reference splits the whole stream into lines (CR, LF or CRLF), groups them into events
at blank lines, joins each event's `data` fields and decodes every JSON event, as the HTML
SSE spec reads a stream and as SSEStream did before it learned to skip events that cannot
carry usage. Both must agree on the bytes the client gets (after every read, not only at
the end), the usage found and the text kept for an estimate.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import dataclass, field
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tokengateway.wire import usage as usage_module
from tokengateway.wire.tokens import Usage
from tokengateway.wire.usage import SSEStream, usage_of

_EOL = re.compile(rb"\r\n|\r|\n")
#: a `"usage": null` member with the separator it leaves behind: what hiding removes
_NULL_MEMBER = re.compile(
    rb',[ \t]*"usage"[ \t]*:[ \t]*null|"usage"[ \t]*:[ \t]*null[ \t]*(?:,[ \t]*)?'
)


@dataclass
class Relayed:
    out: bytes = b""
    usage: Usage | None = None
    text: list[str] = field(default_factory=list)
    anthropic: dict[str, Any] = field(default_factory=dict)


def reference(stream: bytes, hide: bool, complete: bool = True) -> Relayed:
    """What the client gets of `stream`, and what is counted, read event by event. With
    `complete=False` the stream broke (or this is what has arrived so far): an event
    without its blank line is not read."""
    events: list[list[tuple[bytes, bytes]]] = []  # each line: (content, with its end)
    current: list[tuple[bytes, bytes]] = []
    start = 0
    for m in _EOL.finditer(stream):
        content = stream[start : m.start()]
        current.append((content, stream[start : m.end()]))
        start = m.end()
        if not content:
            events.append(current)
            current = []
    if stream[start:]:
        current.append((stream[start:], stream[start:]))
    if current and complete:
        events.append(current)

    result = Relayed()
    out = []
    for lines in events:
        data = []
        for content, _ in lines:
            if content.startswith(b"data:"):
                value = content[5:]
                data.append(value[1:] if value.startswith(b" ") else value)
            elif content == b"data":
                data.append(b"")
        keep, null_usage = _read(b"\n".join(data), hide, result)
        if not keep:
            continue
        for content, raw in lines:
            if null_usage and len(data) == 1 and content.startswith(b"data:"):
                raw = _NULL_MEMBER.sub(b"", raw)
            out.append(raw)
    result.out = b"".join(out)
    return result


def _read(data: bytes, hide: bool, result: Relayed) -> tuple[bool, bool]:
    """(whether the event goes to the client, whether its null usage member goes)"""
    if not data.lstrip(b" \t\r\n").startswith(b"{"):
        return True, False
    try:
        event = msgspec.json.decode(data)
    except (msgspec.MsgspecError, ValueError, RecursionError):
        return True, False
    if not isinstance(event, dict):
        return True, False
    null_usage = hide and "usage" in event and event["usage"] is None
    kind = event.get("type")
    if kind is None or kind == "message_delta":
        usage = event.get("usage")
        if kind == "message_delta" and isinstance(usage, dict):
            _anthropic(result, usage)
        elif usage is not None:
            found = usage_of(usage)
            if found is not None:
                result.usage = found
                if hide and event.get("choices") == []:
                    return False, False
        choices = event.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if isinstance(choice, dict):
                delta = choice.get("delta")
                text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                if isinstance(text, str):
                    result.text.append(text)
    elif kind == "content_block_delta":
        delta = event.get("delta")
        if isinstance(delta, dict):
            text = delta.get("text", delta.get("partial_json"))
            if isinstance(text, str):
                result.text.append(text)
    elif kind == "response.output_text.delta":
        if isinstance(event.get("delta"), str):
            result.text.append(event["delta"])
    elif kind in ("response.completed", "response.incomplete", "response.failed"):
        response = event.get("response")
        if isinstance(response, dict):
            found = usage_of(response.get("usage"))
            if found is not None:
                result.usage = found
    elif kind == "message_start":
        message = event.get("message")
        if isinstance(message, dict) and isinstance(message.get("usage"), dict):
            _anthropic(result, message["usage"])
    return True, null_usage


def _anthropic(result: Relayed, usage: dict[str, Any]) -> None:
    result.anthropic.update({k: v for k, v in usage.items() if v is not None})
    found = usage_of(result.anthropic)
    if found is not None:
        result.usage = found


# --------------------------------------------------------------------------------------------
# random streams

_words = st.text(st.characters(blacklist_categories=["Cs"]), max_size=6) | st.sampled_from(
    ['"usage":null', ',"usage":null}', '"usage"', "\\", "\\u0075", "é", "\u2028", "\n", "data:"]
)
_counts = st.fixed_dictionaries(
    {"prompt_tokens": st.integers(0, 99), "completion_tokens": st.integers(0, 99)}
)
_usage_values = st.one_of(
    st.none(),
    _counts,
    st.builds(lambda n: {"input_tokens": n, "output_tokens": 1}, st.integers(0, 99)),
    st.sampled_from([{}, "lots", 5, [], {"total_tokens": -1}]),
)


@st.composite
def _openai(draw: st.DrawFn) -> dict[str, Any]:
    """A chat or completions chunk; the usage member anywhere, or none."""
    kind = draw(st.sampled_from(["content", "text", "finish", "usage", "odd"]))
    doc: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk"}
    if kind == "content":
        doc["choices"] = [{"index": 0, "delta": {"content": draw(_words)}}]
    elif kind == "text":
        doc["choices"] = [{"index": 0, "text": draw(_words)}]
    elif kind == "finish":
        doc["choices"] = [{"index": 0, "delta": {}, "finish_reason": "stop"}]
    elif kind == "usage":
        doc["choices"] = []
    else:
        doc["choices"] = draw(st.sampled_from([1, None, [{"delta": []}], [3]]))
    if kind in ("content", "text") and draw(st.integers(0, 5)) == 0:  # a nested member
        doc["choices"] = [{**doc["choices"][0], "usage": None}]
    if draw(st.integers(0, 3)):  # mostly with the member, as when usage was asked for
        value = draw(_usage_values) if kind in ("usage", "odd") else None
        items = list(doc.items())
        at = draw(st.sampled_from([len(items), len(items), len(items), 0, 1]))
        doc = dict([*items[:at], ("usage", value), *items[at:]])
    return doc


_anthropic_events = st.one_of(
    st.builds(
        lambda n, r: {"type": "message_start", "message": {"id": "m", "usage": {
            "input_tokens": n, "output_tokens": 1, "cache_read_input_tokens": r}}},
        st.integers(0, 99),
        st.integers(0, 9),
    ),
    st.builds(
        lambda t: {"type": "content_block_delta", "index": 0,
                   "delta": {"type": "text_delta", "text": t}},
        _words,
    ),
    st.builds(
        lambda t: {"type": "content_block_delta", "delta": {"partial_json": t}}, _words
    ),
    st.builds(
        lambda n: {"type": "message_delta", "delta": {}, "usage": {"output_tokens": n}},
        st.integers(0, 99),
    ),
    st.just({"type": "message_delta", "usage": None}),
    st.just({"type": "ping"}),
    st.just({"type": "message_stop"}),
)  # fmt: skip
_responses_events = st.one_of(
    st.just({"type": "response.created", "response": {"id": "r", "usage": None}}),
    st.builds(lambda t: {"type": "response.output_text.delta", "delta": t}, _words),
    st.builds(
        lambda kind, usage: {"type": kind, "response": {"id": "r", "usage": usage}},
        st.sampled_from(["response.completed", "response.incomplete", "response.failed"]),
        _usage_values,
    ),
)


@st.composite
def _chat_chunk(draw: st.DrawFn) -> dict[str, Any]:
    """A chunk as a chat upstream asked for usage sends it: the member last, null."""
    text = draw(_words)
    doc: dict[str, Any] = {"id": "chatcmpl-1", "object": "chat.completion.chunk"}
    doc["choices"] = [{"index": 0, "delta": {"content": text}}]
    if draw(st.integers(0, 9)) == 0:  # a nested member of that name
        doc["choices"][0]["usage"] = None
    return {**doc, "usage": None}


@st.composite
def _json_event(draw: st.DrawFn, chat: bool = False) -> list[bytes]:
    """One event's lines (without their ends), its JSON written in any of the ways seen;
    `chat`: mostly a chat chunk, compact, with the usage member asking added."""
    if chat and draw(st.integers(0, 4)):
        doc = draw(_chat_chunk())
    else:
        doc = draw(st.one_of(_openai(), _anthropic_events, _responses_events))
    lines = []
    if "type" in doc and draw(st.booleans()):
        lines.append(b"event: " + doc["type"].encode())
    if draw(st.integers(0, 9 if chat else 4)) == 0:  # spread over several data lines
        text = json.dumps(doc, indent=1, ensure_ascii=draw(st.booleans())).encode()
        prefix = draw(st.sampled_from([b"data:", b"data: ", b"data:  "]))
        return [*lines, *(prefix + line for line in text.split(b"\n"))]
    compact = draw(st.integers(0, 4)) > 0 if chat else draw(st.booleans())
    text = json.dumps(
        doc,
        separators=(",", ":") if compact else (", ", ": "),
        ensure_ascii=draw(st.booleans()),
    ).encode()
    change = draw(st.sampled_from(range(20)))
    if change == 0:  # the key written with escapes, as some encoders may
        text = text.replace(b'"usage"', b'"us\\u0061ge"')
    elif change == 1:  # cut short
        text = text[: draw(st.integers(0, len(text)))]
    elif change == 2:  # something after the object
        text += draw(st.sampled_from([b"x", b"}", b",", b" ", b"\t"]))
    elif change == 3 and b',"usage":null}' in text:  # the member twice
        text = text.replace(b',"usage":null}', b',"usage":null,"usage":null}')
    lines.append(draw(st.sampled_from([b"data: ", b"data:", b"data:  "])) + text)
    if draw(st.integers(0, 6)) == 0:
        lines.append(draw(st.sampled_from([b'id: "usage":null', b": ping", b"retry: 5"])))
    return lines


_other_event = st.sampled_from(
    [
        [b": ping"],
        [b': "usage":null'],
        [b"data: [DONE]"],
        [b"data"],
        [b"data:"],
        [b"id: 1", b"data: hello"],
        [b"event: error", b'data: {"error":{"message":"x"}}'],
        [b'data: "usage":{"total_tokens":5}'],
        [b"data : x"],
        [],  # a blank line alone
    ]
)
_ends = st.sampled_from([b"\n", b"\n", b"\n", b"\r\n", b"\r"])


_done = [b"data: [DONE]"]


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    """A stream of events, each line ending in LF (mostly), CRLF or CR. Half of them end as
    a chat stream asked for usage does: a usage-only chunk, then `[DONE]`."""
    uniform = draw(st.booleans())  # one line end throughout, as real servers do
    end = draw(_ends)
    chat = draw(st.booleans())
    events = draw(st.lists(_json_event(chat) | _other_event, max_size=8))
    if draw(st.booleans()):
        counts = json.dumps({"choices": [], "usage": draw(_counts)}, separators=(",", ":"))
        events += [[b"data: " + counts.encode()], _done]
    out = []
    for lines in events:
        for line in [*lines, b""]:
            out.append(line + (end if uniform else draw(_ends)))
    if draw(st.integers(0, 3)) == 0:  # an unterminated tail
        tail = b"".join(line + end for line in draw(_json_event()))
        out.append(tail[: draw(st.integers(0, len(tail)))])
    return b"".join(out)


def _pieces(data: st.DataObject, stream: bytes) -> list[bytes]:
    """`stream` cut anywhere: at every byte, after every CR or LF, or at random places,
    empty reads included."""
    how = data.draw(st.integers(0, 5), label="how")
    if how == 0:
        return [stream[i : i + 1] for i in range(len(stream))]
    if how == 1:
        cuts = [i + 1 for i, byte in enumerate(stream) if byte in b"\r\n"]
    else:
        cuts = data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts")
    cuts = sorted(cuts)
    return [stream[a:b] for a, b in zip([0, *cuts], [*cuts, len(stream)], strict=True)]


def _relay(pieces: list[bytes], hide: bool, complete: bool) -> tuple[bytes, SSEStream]:
    reader = SSEStream(hide_usage=hide)
    fed = sent = b""
    for piece in pieces:
        fed += piece
        sent += reader.feed(piece)
        so_far = reference(fed, hide, complete=False)
        assert sent == so_far.out, (fed, sent)  # every whole event, and nothing more
        assert reader.usage == so_far.usage
    sent += reader.close(complete=complete)
    return sent, reader


@settings(
    max_examples=600,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(stream=sse_streams(), hide=st.booleans(), complete=st.booleans(), data=st.data())
def test_the_reader_agrees_with_the_reference_at_any_split(
    stream: bytes, hide: bool, complete: bool, data: st.DataObject
) -> None:
    expected = reference(stream, hide, complete)
    kept = data.draw(st.sampled_from([usage_module._KEPT_BYTES, 0, 150]), label="kept bytes")
    before = usage_module._KEPT_BYTES
    usage_module._KEPT_BYTES = kept  # small bounds: the text is taken out as the stream goes
    try:
        sent, reader = _relay(_pieces(data, stream), hide, complete)
    finally:
        usage_module._KEPT_BYTES = before
    assert sent == expected.out
    assert reader.usage == expected.usage
    assert reader.text == "".join(expected.text)


def _chat_stream(rng: random.Random, events: int, eol: bytes) -> tuple[bytes, bytes]:
    """(a long chat stream with usage asked for, the same as the client asked for it)."""
    asked, plain = [], []
    for i in range(events):
        doc = {"id": "c", "choices": [{"index": 0, "delta": {"content": f" w{i}é\\"}}]}
        line = json.dumps(doc, separators=(",", ":")).encode()
        plain.append(b"data: " + line + eol + eol)
        asked.append(b"data: " + line[:-1] + b',"usage":null}' + eol + eol)
    counts = b'{"prompt_tokens":3,"completion_tokens":%d,"total_tokens":%d}' % (events, events + 3)
    asked.append(b'data: {"id":"c","choices":[],"usage":' + counts + b"}" + eol + eol)
    done = b"data: [DONE]" + eol + eol
    return b"".join([*asked, done]), b"".join([*plain, done])


@pytest.mark.parametrize("eol", [b"\n", b"\r\n", b"\r"])
def test_a_long_stream_keeps_its_text_and_little_raw(eol: bytes) -> None:
    """Past the raw bytes kept for an estimate (64 KiB), the text is taken out of them: all
    of it still counts, and the reader holds no more than the bound of raw events."""
    rng = random.Random(20)
    asked, plain = _chat_stream(rng, 3000, eol)
    assert len(asked) > 3 * usage_module._KEPT_BYTES
    pieces, at = [], 0
    while at < len(asked):
        step = rng.choice([1, 7, 100, 233, 4096])
        pieces.append(asked[at : at + step])
        at += step
    for hide in (True, False):
        reader = SSEStream(hide_usage=hide)
        out = []
        most = 0
        for piece in pieces:
            out.append(reader.feed(piece))
            most = max(most, reader._kept_bytes)
        out.append(reader.close())
        assert b"".join(out) == (plain if hide else asked)
        assert reader.usage == Usage(3, 3000, 3003)
        assert reader.text == "".join(f" w{i}é\\" for i in range(3000))
        assert most <= usage_module._KEPT_BYTES + 4096


def test_the_escaped_key_is_read_as_the_key() -> None:
    """`"us\\u0061ge"` is the key `usage` once decoded: its counts count, and the chunk that
    carries them is hidden like any usage chunk."""
    stream = (
        b'data: {"choices":[{"delta":{"content":"hi"}}],"us\\u0061ge":null}\n\n'
        b'data: {"choices":[],"\\u0075sage":{"prompt_tokens":1,"completion_tokens":2}}\n\n'
    )
    reader = SSEStream(hide_usage=True)
    out = reader.feed(stream) + reader.close()
    assert reader.usage == Usage(1, 2, 3)
    # the escaped null member stays: only the compact spelling is removed without decoding,
    # and the pattern that removes the others is for the key as written
    assert out == reference(stream, hide=True).out == stream.split(b"\n\n")[0] + b"\n\n"


@pytest.mark.parametrize(
    "line",
    [
        b'data: {"choices":[{"index":1e999,"delta":{"content":""}}],"usage":null}',
        b'data: {"choices":[{"index":0,"delta":{"content":"\xc3"}}],"usage":null}',
    ],
)
def test_the_member_goes_from_json_the_decoder_refuses(line: bytes) -> None:
    """The one place the reader differs from decoding every event, on purpose: the member
    asking added is removed from an event that is a JSON object by its syntax, which the
    syntax check (not a decode) finds; msgspec's decoder refuses a number beyond a double's
    range, which JSON allows, and a byte that is not UTF-8 in a string, which clients read
    as U+FFFD. Such an event reaches the client as without the gateway; before, the member
    stayed in it."""
    reader = SSEStream(hide_usage=True)
    assert reader.feed(line + b"\n\n") == line.replace(b',"usage":null', b"") + b"\n\n"
    assert reference(line + b"\n\n", hide=True).out == line + b"\n\n"  # as before
