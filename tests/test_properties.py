"""Property-based tests (hypothesis) of what the gateway parses and counts.

Each property holds for every input hypothesis makes up: the SSE reader at any split of the
stream, usage of any shape, JSON pointers and GJSON selectors over any document, window
strings, counter keys, fixed windows against a reference model, request-body checks, and a
bounded run of the request fuzz target (tests/fuzz_request.py). Every test is bounded
(`max_examples`) so the file runs in seconds; PROPERTY_SCALE=20 runs twenty times as many
examples, for a soak. The `test_regression_*` examples are bugs these properties found.
"""

from __future__ import annotations

import contextlib
import itertools
import json
import math
import os
import re
import subprocess
import sys
from collections.abc import Coroutine
from pathlib import Path
from typing import Any

import msgspec
import pytest
from hypothesis import HealthCheck, assume, example, given, settings
from hypothesis import strategies as st

from tests.fuzz_request import check_usage, fuzz_one
from tokengateway.auth.selector import MISSING, SelectorError, compile_selector
from tokengateway.dataplane.body import JSON_ENDPOINTS, MAX_TOKENS_BOUND, BodyProblem, check_body
from tokengateway.expr import cel
from tokengateway.limits import Limit, Rate, parse_counter_key
from tokengateway.limits import parse_window as limit_window
from tokengateway.resources import parse_window
from tokengateway.storage import CounterRef, MemoryStore
from tokengateway.wire import usage as usage_module
from tokengateway.wire.tokens import Usage
from tokengateway.wire.usage import (
    MAX_COUNT,
    SSEStream,
    ask_for_usage,
    completion_text_of,
    usage_from_json,
    usage_of,
)

#: multiplies every test's examples, for a longer soak: PROPERTY_SCALE=20 pytest ...
_SCALE = max(1, int(os.environ.get("PROPERTY_SCALE", "1")))


def bounded(n: int) -> Any:
    return settings(
        max_examples=n * _SCALE,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    )


# --------------------------------------------------------------------------------------------
# shared strategies

#: JSON scalars as decoders give them (no NaN: it is not JSON and breaks equality)
json_scalars = (
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(max_size=8)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=12,
)


def _pieces(data: st.DataObject, stream: bytes) -> list[bytes]:
    """`stream` cut anywhere, empty pieces included (a read may return nothing)."""
    if data.draw(st.integers(0, 9), label="bytewise") == 0:
        return [stream[i : i + 1] for i in range(len(stream))]
    cuts = sorted(data.draw(st.lists(st.integers(0, len(stream)), max_size=12), label="cuts"))
    bounds = [0, *cuts, len(stream)]
    return [stream[a:b] for a, b in itertools.pairwise(bounds)]


# --------------------------------------------------------------------------------------------
# 1. the SSE reader

_EOL = re.compile(rb"\r\n|\r|\n")


def _blank_line_ends(stream: bytes) -> list[int]:
    """Where each empty line (an event's end) of `stream` ends; a final CR ends a line."""
    ends, start = [], 0
    for m in _EOL.finditer(stream):
        if m.start() == start:
            ends.append(m.end())
        start = m.end()
    return ends


def reference_events(stream: bytes, complete: bool = True) -> list[bytes]:
    """The data of every event an HTML-spec SSE parser dispatches from the whole stream (no
    BOM handling, as the reader), keeping those that look like JSON objects."""
    events: list[bytes] = []
    data: list[bytes] | None = None
    start = 0

    def line(text: bytes) -> None:
        nonlocal data
        if text.startswith(b":"):
            return
        name, colon, value = text.partition(b":")
        if name != b"data":
            return
        if colon and value.startswith(b" "):
            value = value[1:]
        data = [*(data or []), value]

    for m in _EOL.finditer(stream):
        text = stream[start : m.start()]
        start = m.end()
        if text:
            line(text)
        else:
            if data is not None:
                events.append(b"\n".join(data))
            data = None
    if complete:
        if stream[start:]:
            line(stream[start:])
        if data is not None:
            events.append(b"\n".join(data))
    return [e for e in events if e.lstrip(b" \t\r\n").startswith(b"{")]


class Recorder(SSEStream):
    """An SSEStream that also records the data of each JSON event it decodes (only those
    that may carry usage are)."""

    def __init__(self, hide_usage: bool = False) -> None:
        super().__init__(hide_usage)
        self.seen: list[bytes] = []

    def _event(self, data: bytes) -> bool:
        self.seen.append(data)
        return super()._event(data)


_line_text = st.text(
    st.characters(blacklist_characters="\r\n", blacklist_categories=("Cs",)), max_size=12
)
_json_events = st.sampled_from(
    [
        {"choices": [{"index": 0, "delta": {"content": "Hi é"}}], "usage": None},
        {"choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5}},
        {"type": "message_start", "message": {"usage": {"input_tokens": 4, "output_tokens": 1}}},
        {"type": "message_delta", "usage": {"output_tokens": 9}},
        {"type": "content_block_delta", "delta": {"text": "ok"}},
        {"type": "response.output_text.delta", "delta": "yes"},
        {"type": "response.completed", "response": {"usage": {"input_tokens": 1}}},
    ]
) | st.dictionaries(st.sampled_from(["usage", "choices", "type"]), json_values, max_size=3)


@st.composite
def _data_lines(draw: st.DrawFn) -> list[bytes]:
    """One field's lines: JSON on one line or spread over several `data:` lines."""
    doc = draw(_json_events)
    if draw(st.booleans()):
        return [b"data: " + json.dumps(doc, ensure_ascii=draw(st.booleans())).encode()]
    lines = json.dumps(doc, indent=1).encode().split(b"\n")
    return [b"data:" + draw(st.sampled_from([b"", b" ", b"  "])) + line for line in lines]


_field_lines = st.one_of(
    _line_text.map(lambda t: ("data: " + t).encode()),
    _line_text.map(lambda t: ("data:" + t).encode()),
    st.sampled_from([b"data", b"data:", b"data: ", b"data : x", b"data: [DONE]", b"retry: 10"]),
    _line_text.map(lambda t: (":" + t).encode()),
    _line_text.map(lambda t: ("event: " + t).encode()),
    _line_text.map(lambda t: ("id: " + t).encode()),
    _line_text.map(lambda t: ("x-" + t).encode()),
    st.binary(max_size=8).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    _data_lines().map(b"\n".join),  # the \n become line ends like the others below
).map(lambda line: line.split(b"\n"))
_eols = st.sampled_from([b"\n", b"\r", b"\r\n"])


@st.composite
def sse_streams(draw: st.DrawFn) -> bytes:
    out = []
    for _ in range(draw(st.integers(0, 6))):
        for lines in draw(st.lists(_field_lines, max_size=4)):
            for line in lines:
                out.append(line + draw(_eols))
        out.append(draw(_eols))  # the empty line that ends the event
    if draw(st.booleans()):  # an unterminated tail
        out.extend(draw(_field_lines))
    return b"".join(out)


def _is_subsequence(part: list[bytes], whole: list[bytes]) -> bool:
    rest = iter(whole)
    return all(any(item == other for other in rest) for item in part)


def _assert_at_an_event_boundary(fed: bytes, sent: bytes) -> None:
    """What was sent for the bytes fed so far is every complete event, and nothing more."""
    assert fed.startswith(sent)
    assert not sent or _blank_line_ends(sent)[-1:] == [len(sent)], (fed, sent)
    rest = fed[len(sent) :]
    if sent.endswith(b"\r") and rest.startswith(b"\n"):  # the LF of a CRLF split across reads
        rest = rest[1:]
    assert not _blank_line_ends(rest), (fed, sent)


@bounded(250)
@given(stream=sse_streams(), data=st.data())
@example(stream=b"data: {}\r\ndata: {}\n\n", data=None).via("an empty read after a CR")
def test_sse_stream_is_passed_on_byte_for_byte_at_any_split(
    stream: bytes, data: st.DataObject | None
) -> None:
    pieces = (
        _pieces(data, stream)
        if data is not None
        else [stream[:9], stream[9:9], stream[9:10], stream[10:]]
    )
    reader = Recorder()
    fed, sent = b"", b""
    for piece in pieces:
        fed += piece
        sent += reader.feed(piece)
        assert len(sent) <= len(fed)
        _assert_at_an_event_boundary(fed, sent)
    sent += reader.close(complete=True)
    assert sent == stream

    whole = Recorder()
    assert whole.feed(stream) + whole.close() == stream
    assert reader.seen == whole.seen
    assert _is_subsequence(whole.seen, reference_events(stream))
    assert reader.usage == whole.usage
    assert reader.text == whole.text


@bounded(150)
@given(stream=sse_streams(), data=st.data())
def test_a_broken_stream_never_sends_part_of_an_event(stream: bytes, data: st.DataObject) -> None:
    end = data.draw(st.integers(0, len(stream)), label="broken at")
    for hide in (False, True):
        reader = SSEStream(hide_usage=hide)
        sent = b"".join(reader.feed(p) for p in _pieces(data, stream[:end]))
        assert reader.close(complete=False) == b""
        if not hide:
            _assert_at_an_event_boundary(stream[:end], sent)
        assert not sent or _blank_line_ends(sent)[-1:] == [len(sent)]


# the stream a chat upstream sends with and without `stream_options.include_usage`

_contents = st.text(max_size=10) | st.sampled_from(
    ['"usage":null', '", "usage": null, "', "usage", "\\", "é\u2028", '{"usage": null}']
)


@st.composite
def chat_streams(draw: st.DrawFn) -> tuple[bytes, bytes, Usage]:
    """(stream with usage asked, the same stream not asked, the usage it reports)."""
    separators = draw(st.sampled_from([(",", ":"), (", ", ": ")]))
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    chunks: list[dict[str, Any]] = []
    if draw(st.booleans()):  # Azure's first chunk: no choices, content filter results
        chunks.append({**base, "choices": [], "prompt_filter_results": []})
    chunks.append({**base, "choices": [{"index": 0, "delta": {"role": "assistant"}}]})
    for text in draw(st.lists(_contents, max_size=4)):
        chunks.append({**base, "choices": [{"index": 0, "delta": {"content": text}}]})
    chunks.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]})

    def event(doc: dict[str, Any], eol: bytes, ascii_only: bool, extra: list[bytes]) -> bytes:
        text = json.dumps(doc, separators=separators, ensure_ascii=ascii_only).encode()
        return b"".join(line + eol for line in [*extra, b"data: " + text, b""])

    extras = st.lists(st.sampled_from([b": keep-alive", b"id: 7", b"event: chunk"]), max_size=2)
    with_usage, without = [], []
    for chunk in chunks:
        at = draw(st.integers(0, len(chunk)), label="usage member at")
        items = list(chunk.items())
        asked = dict([*items[:at], ("usage", None), *items[at:]])
        eol, ascii_only, extra = draw(_eols), draw(st.booleans()), draw(extras)
        with_usage.append(event(asked, eol, ascii_only, extra))
        without.append(event(chunk, eol, ascii_only, extra))
        if draw(st.booleans()):  # a keep-alive comment between events
            ping_eol = draw(_eols)  # one style: a CR then a LF would be one line end
            ping = b": ping" + ping_eol + ping_eol
            with_usage.append(ping)
            without.append(ping)
    prompt, completion = draw(st.integers(0, 10**6)), draw(st.integers(0, 10**6))
    counts = {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }
    last = dict(draw(st.permutations([*base.items(), ("choices", []), ("usage", counts)])))
    with_usage.append(event(last, draw(_eols), draw(st.booleans()), draw(extras)))
    done = b"data: [DONE]" + draw(_eols) + draw(_eols)
    with_usage.append(done)
    without.append(done)
    return b"".join(with_usage), b"".join(without), Usage(prompt, completion, prompt + completion)


@bounded(250)
@given(streams=chat_streams(), data=st.data())
def test_hidden_usage_gives_the_client_the_stream_it_asked_for(
    streams: tuple[bytes, bytes, Usage], data: st.DataObject
) -> None:
    asked, not_asked, usage = streams
    reader = SSEStream(hide_usage=True)
    fed, sent = b"", b""
    for piece in _pieces(data, asked):
        fed += piece
        sent += reader.feed(piece)
        assert len(sent) <= len(fed)
        assert not_asked.startswith(sent)
    sent += reader.close(complete=True)
    assert sent == not_asked
    assert reader.usage == usage

    client_asked = SSEStream()  # a client that asked for usage gets it, untouched
    assert client_asked.feed(asked) + client_asked.close() == asked
    assert client_asked.usage == usage


@bounded(100)
@given(
    counts=st.tuples(*[st.integers(0, 10**6)] * 4),
    deltas=st.lists(st.integers(0, 10**6), min_size=1, max_size=3),
    data=st.data(),
)
def test_anthropic_and_responses_streams_report_their_usage_at_any_split(
    counts: tuple[int, int, int, int], deltas: list[int], data: st.DataObject
) -> None:
    fresh, cache_read, cache_write, first_output = counts
    start = {
        "type": "message_start",
        "message": {
            "usage": {
                "input_tokens": fresh,
                "cache_read_input_tokens": cache_read,
                "cache_creation_input_tokens": cache_write,
                "output_tokens": first_output,
            }
        },
    }
    events = [start] + [{"type": "message_delta", "usage": {"output_tokens": d}} for d in deltas]
    stream = b"".join(
        b"event: " + e["type"].encode() + b"\ndata: " + json.dumps(e).encode() + b"\n\n"
        for e in events
    )
    reader = SSEStream()
    assert b"".join(reader.feed(p) for p in _pieces(data, stream)) + reader.close() == stream
    prompt = fresh + cache_read + cache_write
    assert reader.usage == Usage(prompt, deltas[-1], prompt + deltas[-1], cache_read)

    completed = {
        "type": "response.completed",
        "response": {"usage": {"input_tokens": fresh, "output_tokens": first_output}},
    }
    stream = b"event: response.completed\r\ndata: " + json.dumps(completed).encode() + b"\r\n\r\n"
    reader = SSEStream()
    assert b"".join(reader.feed(p) for p in _pieces(data, stream)) + reader.close() == stream
    assert reader.usage == Usage(fresh, first_output, fresh + first_output, 0)


_sse_fragments = st.sampled_from(
    [
        b"data: ",
        b"data:{",
        b'{"usage":',
        b'"usage": null',
        b'{"choices":[],"usage":{"total_tokens":5}}',
        b"\r",
        b"\n",
        b"\r\n",
        b"\n\n",
        b": comment",
        b"\xff\xfe\x80",
        b"data: " + b"[" * 3000,
        b"data: " + b'{"a":' * 1500,
    ]
)


@bounded(200)
@given(
    pieces=st.lists(st.binary(max_size=40) | _sse_fragments, max_size=12),
    hide=st.booleans(),
    complete=st.booleans(),
)
def test_sse_reader_takes_any_bytes(pieces: list[bytes], hide: bool, complete: bool) -> None:
    reader = SSEStream(hide_usage=hide)
    fed = sent = 0
    out = []
    for piece in pieces:
        got = reader.feed(piece)
        assert isinstance(got, bytes)
        out.append(got)
        fed, sent = fed + len(piece), sent + len(got)
        assert sent <= fed
    out.append(reader.close(complete=complete))
    assert len(b"".join(out)) <= fed
    if not hide and complete:
        assert b"".join(out) == b"".join(pieces)
    assert reader.usage is None or isinstance(reader.usage, Usage)
    assert isinstance(reader.text, str)


def test_regression_an_empty_read_between_cr_and_lf_does_not_end_an_event() -> None:
    reader = Recorder()
    first = b'data: {"usage":{"total_tokens":5}}\r'
    out = reader.feed(first) + reader.feed(b"") + reader.feed(b"\ndata: {}\n\n")
    assert out == first + b"\ndata: {}\n\n"
    # one event of two data lines (not JSON), not two events (the first with usage)
    assert reader.seen == [b'{"usage":{"total_tokens":5}}\n{}'] and reader.usage is None


@pytest.mark.parametrize(
    ("asked", "not_asked"),
    [
        # the member first, with spaces after the separators
        (b'data: {"usage": null, "id": "c"}\n\n', b'data: {"id": "c"}\n\n'),
        (b'data: {"usage":null,"id":"c"}\n\n', b'data: {"id":"c"}\n\n'),
        # only a JSON event's own member goes: not a comment, an id, or non-JSON data
        (b': "usage": null\n\ndata: {}\n\n', b': "usage": null\n\ndata: {}\n\n'),
        (b'data: "usage": null\n\n', b'data: "usage": null\n\n'),
        # JSON spread over data lines keeps its member rather than break
        (
            b'data: {"id": "c",\ndata:  "usage": null}\n\n',
            b'data: {"id": "c",\ndata:  "usage": null}\n\n',
        ),
    ],
)
def test_regression_hidden_usage_strips_only_the_member(asked: bytes, not_asked: bytes) -> None:
    reader = SSEStream(hide_usage=True)
    assert reader.feed(asked) + reader.close() == not_asked


def test_regression_spec_data_fields() -> None:
    # `data` without a colon is a data field with an empty value (HTML SSE spec), and JSON
    # may start after whitespace: clients parse both, so the usage in them counts
    reader = SSEStream()
    reader.feed(b'data\ndata:  {"choices":[],"usage":{"total_tokens":5}}\n\n')
    assert reader.usage == Usage(0, 0, 5)


@pytest.mark.parametrize("depth", [999, 1000, 5000, 100_000])
def test_regression_deeply_nested_json_is_not_an_error(depth: int) -> None:
    deep = b'{"stream":true,"usage":' + b"[" * depth + b"]" * depth + b"}"
    assert usage_from_json(deep) is None
    assert ask_for_usage("/v1/chat/completions", deep)[1] in (False, True)
    assert isinstance(completion_text_of(b'{"output":' + b"[" * depth + b"]" * depth + b"}"), str)
    reader = SSEStream(hide_usage=True)
    event = b"data: " + deep + b"\n\n"
    assert reader.feed(event) == event
    problem = check_body("POST", "/v1/chat/completions", "application/json", deep)
    assert problem is None or problem.code == "invalid_json"


# --------------------------------------------------------------------------------------------
# 2. usage of any shape

_count_values = st.one_of(
    json_values,
    st.integers(-(10**13), 10**13),
    st.floats(),
    st.sampled_from([math.inf, -math.inf, math.nan, 10**40, MAX_COUNT, MAX_COUNT - 1, True, -0.0]),
)
_usage_keys = st.sampled_from(
    [
        "prompt_tokens",
        "completion_tokens",
        "total_tokens",
        "input_tokens",
        "output_tokens",
        "cache_read_input_tokens",
        "cache_creation_input_tokens",
    ]
)
_details_keys = st.sampled_from(["prompt_tokens_details", "input_tokens_details"])
usage_objects = st.dictionaries(
    _usage_keys | st.text(max_size=4), _count_values, max_size=8
) | st.builds(
    lambda raw, key, details: {**raw, key: details},
    st.dictionaries(_usage_keys, _count_values, max_size=6),
    _details_keys,
    st.dictionaries(st.just("cached_tokens") | st.text(max_size=3), _count_values, max_size=2)
    | _count_values,
)


def _check_counts(usage: Usage | None) -> None:
    check_usage(usage)  # counts of the right type, in range
    assert usage is None or usage.estimated is False


@bounded(400)
@given(raw=usage_objects | json_values)
def test_usage_of_anything_is_none_or_sane_counts(raw: Any) -> None:
    _check_counts(usage_of(raw))


def test_regression_sums_of_capped_counts_are_capped() -> None:
    huge = MAX_COUNT
    assert usage_of({"prompt_tokens": huge, "completion_tokens": huge}).total_tokens == huge
    anthropic = usage_of(
        {"input_tokens": huge, "cache_read_input_tokens": huge, "cache_creation_input_tokens": 1}
    )
    assert anthropic.prompt_tokens == anthropic.total_tokens == huge


_counts = st.integers(0, 10**9)
_maybe_count = st.none() | _counts


@bounded(200)
@given(
    prompt=_counts,
    completion=_counts,
    total=_maybe_count,
    cached=_maybe_count,
    as_float=st.booleans(),
)
def test_openai_and_responses_usage_read_back(
    prompt: int, completion: int, total: int | None, cached: int | None, as_float: bool
) -> None:
    def number(n: int) -> int | float:
        return n + 0.5 if as_float else n  # fractions are rounded down

    for p_key, c_key, details in [
        ("prompt_tokens", "completion_tokens", "prompt_tokens_details"),
        ("input_tokens", "output_tokens", "input_tokens_details"),
    ]:
        raw: dict[str, Any] = {p_key: number(prompt), c_key: number(completion)}
        if total is not None:
            raw["total_tokens"] = total
        if cached is not None:
            raw[details] = {"cached_tokens": cached}
        expected = Usage(
            prompt, completion, prompt + completion if total is None else total, cached or 0
        )
        assert usage_of(raw) == expected
        body = json.dumps({"id": "x", "usage": raw, "choices": []}).encode()
        assert usage_from_json(body) == expected


@bounded(200)
@given(fresh=_counts, output=_counts, read=_maybe_count, write=_maybe_count)
def test_anthropic_usage_adds_the_cache_to_the_prompt(
    fresh: int, output: int, read: int | None, write: int | None
) -> None:
    assume(read is not None or write is not None)
    raw = {"input_tokens": fresh, "output_tokens": output}
    if read is not None:
        raw["cache_read_input_tokens"] = read
    if write is not None:
        raw["cache_creation_input_tokens"] = write
    prompt = fresh + (read or 0) + (write or 0)
    assert usage_of(raw) == Usage(prompt, output, prompt + output, read or 0)


@bounded(300)
@given(
    body=st.binary(max_size=200)
    | st.builds(
        lambda usage, other: json.dumps({**other, "usage": usage}).encode(),
        usage_objects.filter(lambda u: "NaN" not in json.dumps(u)) | json_values,
        st.dictionaries(st.text(max_size=4), json_values, max_size=3),
    )
)
def test_usage_from_json_takes_any_bytes(body: bytes) -> None:
    found = usage_from_json(body)
    _check_counts(found)
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError):
        return
    if isinstance(doc, dict) and b"Infinity" not in body and b"NaN" not in body:
        usage = doc.get("usage")
        assert found == (usage_of(usage) if isinstance(usage, dict) else None)


# --------------------------------------------------------------------------------------------
# 3. JSON pointers (RFC 6901)

_pointer_keys = st.text(st.sampled_from("~/01a-é"), max_size=4) | st.text(max_size=3)
pointer_docs = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_pointer_keys, inner, max_size=4),
    max_leaves=15,
)


@st.composite
def doc_paths(draw: st.DrawFn) -> tuple[Any, list[str], Any]:
    """A document, the tokens of a path that exists in it, and the value there."""
    doc = draw(pointer_docs)
    node, tokens = doc, []
    while isinstance(node, dict | list) and node and draw(st.booleans()):
        if isinstance(node, dict):
            key = draw(st.sampled_from(sorted(node)))
        else:
            key = draw(st.integers(0, len(node) - 1))
        tokens.append(str(key))
        node = node[key]
    return doc, tokens, node


def _pointer(tokens: list[str]) -> str:
    return "".join("/" + t.replace("~", "~0").replace("/", "~1") for t in tokens)


def _resolves(node: Any, token: str) -> bool:
    """Whether one more pointer step `token` exists below `node` (RFC 6901 array indices:
    ASCII digits without a leading zero)."""
    if isinstance(node, dict):
        return token in node
    if isinstance(node, list):
        index = re.fullmatch(r"0|[1-9][0-9]{0,8}", token)
        return index is not None and int(token) < len(node)
    return False


_not_indices = st.sampled_from(
    ["-", "01", "00", "+1", " 1", "1 ", "²", "\u0661", "1.0", "9" * 5000]
)


@bounded(300)
@given(found=doc_paths(), extra=_pointer_keys | _not_indices | st.integers(0, 50).map(str))
def test_json_pointer_resolves_every_path_and_only_those(
    found: tuple[Any, list[str], Any], extra: str
) -> None:
    doc, tokens, value = found
    assert cel.json_pointer(doc, _pointer(tokens)) is value
    missing = not _resolves(value, extra)
    pointer = _pointer([*tokens, extra])
    if missing:
        with pytest.raises(KeyError):
            cel.json_pointer(doc, pointer)
    else:
        step = value[extra] if isinstance(value, dict) else value[int(extra)]
        assert cel.json_pointer(doc, pointer) is step


@bounded(200)
@given(doc=pointer_docs, pointer=st.text(st.sampled_from("/~01a2-²"), max_size=8) | st.text())
def test_json_pointer_raises_only_key_error(doc: Any, pointer: str) -> None:
    with contextlib.suppress(KeyError):
        cel.json_pointer(doc, pointer)


def test_regression_json_pointer_indices_are_ascii_digits() -> None:
    doc = {"a": [10, 11, 12]}
    assert cel.json_pointer(doc, "/a/1") == 11
    for token in ["\u0661", "²", "9" * 5000, "99999999999999999999"]:
        with pytest.raises(KeyError):
            cel.json_pointer(doc, "/a/" + token)


# --------------------------------------------------------------------------------------------
# 4. GJSON selectors

_selector_keys = st.text(st.sampled_from("ab0.|\\*?#@!{[(:é"), min_size=1, max_size=5) | st.text(
    min_size=1, max_size=4
)
selector_docs = st.dictionaries(
    _selector_keys,
    st.recursive(
        json_scalars,
        lambda inner: (
            st.lists(inner, max_size=4) | st.dictionaries(_selector_keys, inner, max_size=4)
        ),
        max_leaves=15,
    ),
    min_size=1,
    max_size=4,
)


def gjson_escape(key: str) -> str:
    escaped = "".join("\\" + ch if ch in "\\.|*?" else ch for ch in key)
    if escaped[:1] in ("@", "#", "!", "[", "{"):
        escaped = "\\" + escaped
    return escaped


@st.composite
def selector_paths(draw: st.DrawFn) -> tuple[Any, list[str], Any]:
    doc = draw(selector_docs)
    node, keys = doc, []
    while isinstance(node, dict | list) and node and (not keys or draw(st.booleans())):
        if isinstance(node, dict):
            key = draw(st.sampled_from(sorted(node)))
            keys.append(gjson_escape(key))
        else:
            key = draw(st.integers(0, len(node) - 1))
            keys.append(str(key))
        node = node[key]
    return doc, keys, node


@bounded(300)
@given(found=selector_paths(), sep=st.sampled_from([".", "|"]))
def test_selector_from_actual_keys_finds_the_value(
    found: tuple[Any, list[str], Any], sep: str
) -> None:
    doc, keys, value = found
    selector = compile_selector(sep.join(keys))
    assert selector.get(doc) is value


_selector_tokens = st.sampled_from(
    [
        *"ab01.|\\*?#()[]{}@!:\"'%<>=~ ,",
        "#(",
        "#[",
        "@this",
        "@reverse",
        "@keys",
        "@values",
        "@flatten",
        "@join",
        "@tostr",
        "@fromstr",
        "@ugly",
        "@pretty",
        "@valid",
        "@extract",
        "@replace",
        "@case",
        "@base64",
        "@strip",
        "@group",
        "@dig",
        ':{"sep":"-","pos":1}',
        ':{"pos":1e999}',
        ':{"pos":-1e999}',
        ':{"pos":"x"}',
        ':{"old":"a","new":"b"}',
        ':{"deep":true}',
        ":upper",
        ":lower",
        ":encode",
        ":decode",
        "==",
        "!=",
        "<=",
        ">=",
        "!%",
        "~true",
        "~false",
        "~null",
        "~*",
        "1e999",
        "9" * 30,
        "9" * 5000,
        "é",
    ]
)
selector_sources = st.lists(_selector_tokens, max_size=12).map("".join) | st.text(max_size=16)
_hostile_values = st.sampled_from(
    [10**400, -(10**400), 1e308, "[" * 3000, '{"a":' * 3000, "1e999", "9" * 400, "", "a-b"]
)
evaluation_docs = st.recursive(
    json_scalars | _hostile_values,
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.sampled_from(["a", "b", "0", "1", "#"]), inner, max_size=4)
    ),
    max_leaves=12,
)


@bounded(400)
@given(source=selector_sources, doc=evaluation_docs)
def test_any_selector_compiles_or_raises_selector_error_and_never_fails_to_evaluate(
    source: str, doc: Any
) -> None:
    try:
        selector = compile_selector(source)
    except SelectorError:
        return
    value = selector.get(doc)
    if selector.root is not None and isinstance(doc, dict):
        # the value depends on the root key only (what the auth engine relies on)
        only_root = {selector.root: doc[selector.root]} if selector.root in doc else {}
        assert selector.get(only_root) == value or value != value


def test_regression_selector_hostile_inputs() -> None:
    with pytest.raises(SelectorError):
        compile_selector("#(" * 400 + "a" + ")" * 400)  # too deep: an error, not a crash
    assert compile_selector("a." + "9" * 5000).get({"a": [1]}) is MISSING
    assert compile_selector("a.#(b>1)").get({"a": [{"b": 10**400}]}) == {"b": 10**400}
    assert compile_selector("a.#(b<1)#").get({"a": [{"b": -(10**400)}, {"b": 5}]}) == [
        {"b": -(10**400)}
    ]
    assert compile_selector('a|@extract:{"pos":1e999}').get({"a": "x y"}) in ("x", "y", None)
    assert compile_selector("a|@fromstr").get({"a": "[" * 5000}) is MISSING


# --------------------------------------------------------------------------------------------
# 5. windows, counter keys and fixed windows

_UNIT_MS = {"h": 3_600_000, "m": 60_000, "s": 1_000, "ms": 1}
window_parts = st.lists(
    st.tuples(st.integers(0, 99_999), st.sampled_from(sorted(_UNIT_MS)), st.integers(0, 4)),
    min_size=1,
    max_size=4,
)


@bounded(300)
@given(parts=window_parts)
def test_window_is_the_sum_of_its_parts(parts: list[tuple[int, str, int]]) -> None:
    text = "".join(str(n).rjust(min(5, len(str(n)) + pad), "0") + unit for n, unit, pad in parts)
    total_ms = sum(n * _UNIT_MS[unit] for n, unit, _ in parts)
    assert parse_window(text) == total_ms / 1000
    if total_ms:
        assert limit_window(text) == total_ms / 1000
    else:
        with pytest.raises(ValueError):
            limit_window(text)


def _is_window(text: str) -> bool:
    """An independent reading of `^([0-9]{1,5}(h|m|s|ms)){1,4}$`."""
    parts, i = 0, 0
    while i < len(text):
        j = i
        while j < len(text) and text[j] in "0123456789":
            j += 1
        if not 1 <= j - i <= 5:
            return False
        if text.startswith("ms", j):
            j += 2
        elif j < len(text) and text[j] in "hms":
            j += 1
        else:
            return False
        parts, i = parts + 1, j
    return 1 <= parts <= 4


@bounded(300)
@given(
    text=st.text(st.sampled_from("0123456789hms ._-\n\u0661"), max_size=14)
    | st.text(max_size=8)
    | st.sampled_from(["1h\n", "100000s", "1h1m1s1ms1h", "1.5h", "-1h", "1d", "", " 1h", "1H"])
)
def test_only_windows_parse_and_the_rest_raise_value_error(text: str) -> None:
    if _is_window(text):
        assert parse_window(text) >= 0
    else:
        with pytest.raises(ValueError):
            parse_window(text)


@pytest.mark.parametrize("value", [None, 5, 1.5, b"1h", ["1h"]])
def test_a_window_that_is_not_a_string_raises_value_error(value: Any) -> None:
    with pytest.raises(ValueError):
        parse_window(value)


_names = st.from_regex(r"[a-z][a-z0-9-]{0,8}", fullmatch=True)
_counter_values = st.text(max_size=6) | st.text(st.sampled_from("a\x1f\x1e01\\"), max_size=5)


@bounded(300)
@given(
    namespace=_names.map(lambda n: "default/" + n),
    policy=_names,
    name=_names,
    windows=st.lists(st.integers(1, 86_400).map(lambda s: s * 1000), min_size=1, max_size=3),
    values=st.lists(_counter_values, max_size=4).map(tuple),
)
def test_counter_keys_read_back(
    namespace: str, policy: str, name: str, windows: list[int], values: tuple[str, ...]
) -> None:
    # a single empty value reads back as no values: a key does not say how many there were
    assume(values != ("",))
    rates = tuple(Rate(10, ms / 1000, f"{ms}ms") for ms in windows)
    limit = Limit("TokenRateLimitPolicy", f"ns/{policy}", name, rates, (), ())
    for ref, ms in zip(limit.counter_refs(namespace, values), windows, strict=True):
        assert parse_counter_key(ref.key) == (namespace, limit.identifier, ms, values)


def test_regression_separator_in_a_counter_value_does_not_merge_counters() -> None:
    limit = Limit("RateLimitPolicy", "ns/p", "l", (Rate(1, 60.0, "1m"),), (), ())
    one = limit.counter_refs("default/r", ("a\x1fb", "c"))[0].key
    other = limit.counter_refs("default/r", ("a", "b\x1fc"))[0].key
    assert one != other
    assert parse_counter_key(one)[3] == ("a\x1fb", "c")
    assert parse_counter_key(other)[3] == ("a", "b\x1fc")


def test_counter_key_window_is_the_window_in_milliseconds() -> None:
    limit = Limit(
        "RateLimitPolicy", "ns/p", "l", (Rate(1, limit_window("1s1ms"), "1s1ms"),), (), ()
    )
    assert parse_counter_key(limit.counter_refs("default/r", ())[0].key)[2] == 1001


def run(coroutine: Coroutine[Any, Any, Any]) -> Any:
    """Run a MemoryStore verb, which must never await."""
    try:
        coroutine.send(None)
    except StopIteration as stop:
        return stop.value
    coroutine.close()
    raise AssertionError("the memory store awaited")


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


STORE_REFS = [
    CounterRef("ns\x1fp/a\x1f1000\x1fu", limit=10, window=1.0),
    CounterRef("ns\x1fp/a\x1f2500\x1fu", limit=25, window=2.5),
    CounterRef("ns\x1fp/b\x1f60000\x1f", limit=100, window=60.0),
]
_subsets = st.lists(st.sampled_from(range(len(STORE_REFS))), min_size=1, max_size=3, unique=True)
store_ops = st.lists(
    st.one_of(
        st.tuples(st.just("advance"), st.integers(0, 12).map(lambda n: n / 4), st.just(())),
        st.tuples(st.just("update"), st.integers(-5, 40), _subsets),
        st.tuples(st.just("check"), st.integers(0, 40), _subsets),
        st.tuples(st.just("check_and_update"), st.integers(0, 40), _subsets),
    ),
    max_size=30,
)


@bounded(300)
@given(ops=store_ops)
def test_memory_store_matches_a_model_of_fixed_windows(ops: list[tuple[str, Any, Any]]) -> None:
    clock = Clock()
    store = MemoryStore(clock=clock)
    model: dict[str, tuple[int, float]] = {}  # key -> (value, window end)

    def live(ref: CounterRef) -> tuple[int, float] | None:
        entry = model.get(ref.key)
        return entry if entry is not None and entry[1] > clock.now else None

    def add(ref: CounterRef, delta: int) -> None:
        entry = live(ref)
        if entry is None:  # the window opens at the first write
            model[ref.key] = (delta, clock.now + ref.window)
        else:
            model[ref.key] = (entry[0] + delta, entry[1])

    def expected_check(refs: list[CounterRef], delta: int) -> tuple[bool, list[int], int | None]:
        values, lefts, limiting = [], [], None
        for i, ref in enumerate(refs):
            entry = live(ref)
            values.append(entry[0] if entry else 0)
            lefts.append(entry[1] - clock.now if entry else ref.window)
            if values[i] + delta > ref.limit and (limiting is None or lefts[i] > lefts[limiting]):
                limiting = i
        return limiting is not None, values, limiting

    for op, amount, which in ops:
        refs = [STORE_REFS[i] for i in which]
        if op == "advance":
            clock.now += amount
        elif op == "update":
            run(store.update(refs, [amount] * len(refs)))
            for ref in refs:
                add(ref, amount)
        else:
            limited, values, limiting = expected_check(refs, amount)
            if op == "check":
                result = run(store.check(refs, amount))
            else:
                result = run(store.check_and_update(refs, amount))
                if not limited:
                    for ref in refs:
                        add(ref, amount)
            assert result.limited == limited
            assert [s.value for s in result.states] == values
            assert result.limiting == limiting
        expected = {k: v for k, (v, end) in model.items() if end > clock.now}
        assert {k: v for k, (v, _) in store.snapshot().items()} == expected
        for key, (_, left) in store.snapshot().items():
            assert left == model[key][1] - clock.now


# --------------------------------------------------------------------------------------------
# 6. request bodies

_CHECKED_COUNTS = ("max_tokens", "max_completion_tokens", "max_output_tokens", "n")
_field_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-3, 3),
    st.integers(MAX_TOKENS_BOUND - 1, MAX_TOKENS_BOUND + 1),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=3),
    st.lists(st.integers(), max_size=2),
    st.dictionaries(st.text(max_size=2), st.integers(), max_size=2),
)


def _well_typed(doc: dict[str, Any]) -> bool:
    for name in _CHECKED_COUNTS:
        value = doc.get(name)
        if value is not None and not (type(value) is int and 1 <= value <= MAX_TOKENS_BOUND):
            return False
    if doc.get("stream") is not None and type(doc["stream"]) is not bool:
        return False
    return doc.get("stream_options") is None or type(doc["stream_options"]) is dict


_model_paths = st.sampled_from(
    ["/v1" + p for p in JSON_ENDPOINTS] + ["/openai/v1/chat/completions"]
)


@bounded(400)
@given(
    doc=st.dictionaries(
        st.sampled_from([*_CHECKED_COUNTS, "stream", "stream_options", "model", "messages"]),
        _field_values,
        max_size=6,
    ),
    path=_model_paths,
    content_type=st.sampled_from(["application/json", "", "Application/JSON; charset=utf-8"]),
)
def test_check_body_refuses_exactly_the_ill_typed_fields(
    doc: dict[str, Any], path: str, content_type: str
) -> None:
    problem = check_body("POST", path, content_type, json.dumps(doc).encode())
    if _well_typed(doc):
        assert problem is None
    else:
        assert isinstance(problem, BodyProblem) and problem.param in doc
        assert not _well_typed({problem.param: doc[problem.param]})


@bounded(300)
@given(
    method=st.sampled_from(["POST", "GET", "post"]),
    path=_model_paths | st.sampled_from(["/v1/models", "/health", ""]),
    content_type=st.sampled_from(["application/json", "", "multipart/form-data", "text/plain"])
    | st.text(max_size=12),
    body=st.binary(max_size=80)
    | json_values.map(lambda v: json.dumps(v).encode())
    | st.sampled_from([b" ", b"\xef\xbb\xbf{}", b"[" * 5000, b'{"a":' * 1200, b"{}\x00"]),
)
def test_check_body_takes_any_request(
    method: str, path: str, content_type: str, body: bytes
) -> None:
    problem = check_body(method, path, content_type, body)
    assert problem is None or isinstance(problem, BodyProblem)
    ours = (
        method == "POST"
        and path.endswith(JSON_ENDPOINTS)
        and (not content_type or "json" in content_type.lower())
    )
    if not ours:
        assert problem is None
    elif problem is None:  # passes only as a JSON object with well-typed fields
        doc = msgspec.json.decode(body)
        assert isinstance(doc, dict) and _well_typed(doc)


# --------------------------------------------------------------------------------------------
# 7. the request fuzz target, bounded


_fuzz_inputs = st.binary(max_size=300) | st.builds(
    lambda head, doc: head + json.dumps(doc).encode(),
    st.binary(min_size=3, max_size=3),
    st.fixed_dictionaries(
        {"stream": st.booleans() | json_values},
        optional={"stream_options": json_values, "usage": usage_objects, "max_tokens": json_values},
    ),
)


@bounded(300)
@given(data=_fuzz_inputs)
def test_fuzz_request_parsing(data: bytes) -> None:
    fuzz_one(data)


def test_fuzz_request_with_atheris(tmp_path: Path) -> None:
    script = Path(__file__).with_name("fuzz_request.py")
    env = {**os.environ, "PYTHONPATH": str(script.parent.parent)}
    done = subprocess.run(
        [sys.executable, str(script), "-runs=3000", "-seed=1", "-rss_limit_mb=1024"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-3000:]


@bounded(500)
@given(
    parts=st.lists(
        st.sampled_from(
            [b',"usage":null', b'"usage": null', b'"usage":null,', b"{", b"}", b'"a":1', b",", b" "]
        ),
        max_size=8,
    )
)
def test_dropping_null_usage_quickly_equals_the_pattern(parts: list[bytes]) -> None:
    raw = b"data: " + b"".join(parts) + b"\n\n"
    assert usage_module._without_null_usage(raw) == usage_module._USAGE_NULL.sub(b"", raw)
