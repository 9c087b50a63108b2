"""Reading token usage out of upstream responses, JSON bodies and SSE streams alike.

Shapes understood (non-streaming and streaming):

- OpenAI chat/completions/embeddings: `usage.{prompt_tokens, completion_tokens, total_tokens,
  prompt_tokens_details.cached_tokens}`; streamed as a last chunk with `choices: []` when
  `stream_options.include_usage` is set.
- OpenAI Responses: `usage.{input_tokens, output_tokens, total_tokens,
  input_tokens_details.cached_tokens}`; streamed in the `response.completed` event.
- Anthropic Messages: `usage.{input_tokens, output_tokens, cache_creation_input_tokens,
  cache_read_input_tokens}` (input excludes the cache); streamed over `message_start` and
  `message_delta` (whose output count is cumulative).

Counts that are not numbers or are negative are ignored (a total is then prompt +
completion), fractions are rounded down, and absurd ones (sums included) are capped at
MAX_COUNT so that no store ever overflows (docs/counting.md). JSON nested too deeply to
decode is read as no JSON at all, never as an error.
"""

from __future__ import annotations

import re
from typing import Any

import msgspec

from tokengateway.wire.tokens import Usage, text_of

__all__ = ["SSEStream", "ask_for_usage", "completion_text_of", "usage_from_json", "usage_of"]


class _Body(msgspec.Struct):
    usage: dict[str, Any] | None = None


_decode_body = msgspec.json.Decoder(_Body).decode
#: what decoding an answer may raise: msgspec's errors (ValueErrors only since some release),
#: UnicodeDecodeError on bad UTF-8 in older releases, RecursionError when nested too deep
_DECODE_ERRORS = (msgspec.MsgspecError, ValueError, RecursionError)


#: the most tokens one count may claim (a trillion): more is an upstream's bug, not usage
MAX_COUNT = 10**12


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    if value != value or value < 0:  # NaN, negatives
        return None
    if value >= MAX_COUNT:  # infinities included
        return MAX_COUNT
    return int(value)


def _details(raw: dict[str, Any], key: str) -> int:
    details = raw.get(key)
    if isinstance(details, dict):
        return _count(details.get("cached_tokens")) or 0
    return 0


def usage_of(raw: Any) -> Usage | None:
    """A `usage` object of any supported shape, or None when it holds no counts."""
    if not isinstance(raw, dict):
        return None
    if "prompt_tokens" in raw or "completion_tokens" in raw:
        prompt = _count(raw.get("prompt_tokens"))
        completion = _count(raw.get("completion_tokens"))
        cached = _details(raw, "prompt_tokens_details")
    elif "input_tokens" in raw or "output_tokens" in raw:
        prompt = _count(raw.get("input_tokens"))
        completion = _count(raw.get("output_tokens"))
        cache_read = _count(raw.get("cache_read_input_tokens"))
        cache_write = _count(raw.get("cache_creation_input_tokens"))
        if cache_read is not None or cache_write is not None:  # Anthropic: input excludes cache
            prompt = min((prompt or 0) + (cache_read or 0) + (cache_write or 0), MAX_COUNT)
            cached = cache_read or 0
        else:
            cached = _details(raw, "input_tokens_details")
    else:
        prompt = completion = None
        cached = 0
    total = _count(raw.get("total_tokens"))
    if prompt is None and completion is None and total is None:
        return None
    if total is None:
        total = min((prompt or 0) + (completion or 0), MAX_COUNT)
    return Usage(prompt or 0, completion or 0, total, cached)


def usage_from_json(body: bytes) -> Usage | None:
    """The `usage` of a JSON response body, or None when absent or unreadable."""
    try:
        return usage_of(_decode_body(body).usage)
    except _DECODE_ERRORS:
        return None


def _list(value: Any) -> list[Any]:
    """`value` when it is a JSON array, else nothing to walk (an upstream may send
    `"choices": 1`)."""
    return value if isinstance(value, list) else []


def completion_text_of(body: bytes) -> str:
    """The generated text of a JSON response of any supported shape, for an estimate."""
    try:
        doc = msgspec.json.decode(body)
    except (msgspec.MsgspecError, ValueError):  # not JSON, or bad UTF-8
        return body.decode("utf-8", "replace")
    except RecursionError:  # nested too deeply to be an answer
        return ""
    if not isinstance(doc, dict):
        return ""
    parts = []
    try:
        for choice in _list(doc.get("choices")):  # chat / completions
            if isinstance(choice, dict):
                parts.append(text_of([choice.get("message"), choice.get("text")]))
        parts.append(text_of(doc.get("output")))  # responses
        parts.append(text_of(doc.get("content")))  # messages
    except RecursionError:  # text_of recurses: a document nested nearly as deep as allowed
        return ""
    return "".join(parts)


_STREAMED_COMPLETIONS = ("/chat/completions", "/completions")


def ask_for_usage(path: str, body: bytes, doc: Any = None) -> tuple[bytes, bool]:
    """A streamed chat/completions request with `stream_options.include_usage` added when
    the client did not ask; True when the gateway added it (and must hide the answer).
    `doc` is the body already decoded, when the caller has it (it is not changed); without
    it the body is decoded here."""
    if b'"stream"' not in body or not path.endswith(_STREAMED_COMPLETIONS):
        return body, False
    if doc is None:
        try:
            doc = msgspec.json.decode(body)
        except _DECODE_ERRORS:
            return body, False
    if not isinstance(doc, dict) or doc.get("stream") is not True:
        return body, False
    options = doc.get("stream_options")
    if options is None:
        options = {}
    if not isinstance(options, dict) or options.get("include_usage") is True:
        return body, False
    asked = {**doc, "stream_options": {**options, "include_usage": True}}
    try:
        return msgspec.json.encode(asked), True
    except RecursionError:  # decoded at the very limit of the stack: leave it as it came
        return body, False


# the `"usage": null` member (with the separator it leaves behind) in one line of JSON
_USAGE_NULL = re.compile(
    rb',[ \t]*"usage"[ \t]*:[ \t]*null|"usage"[ \t]*:[ \t]*null[ \t]*(?:,[ \t]*)?'
)
_JSON_SPACE = b" \t\r\n"
#: `"usage"` with any of its letters written as a `\u` escape: decoded, the same key
_ESCAPED_USAGE = re.compile(rb'"(?:u|\\u0075)(?:s|\\u0073)(?:a|\\u0061)(?:g|\\u0067)(?:e|\\u0065)"')


class _AnyObject(msgspec.Struct):
    """Any JSON object: decoding into it checks the syntax and skips every member."""


_check_object = msgspec.json.Decoder(_AnyObject).decode

#: the raw events kept for an estimate before their text is taken out (and they are let go)
_KEPT_BYTES = 64 * 1024


def _without_null_usage(raw: bytes) -> bytes:
    """`raw` without its `"usage": null` members. The usual case, one compact member after
    another, is a plain replace (what the pattern would do, ~5x faster)."""
    if raw.count(b'"usage"') == 1 and b',"usage":null' in raw:
        return raw.replace(b',"usage":null', b"", 1)
    return _USAGE_NULL.sub(b"", raw)


def _data_of(raw: bytes) -> tuple[bytes, int]:
    """The data of one event (its `data` fields joined, as the HTML SSE spec reads them)
    and how many `data` lines it has."""
    data = []
    for line in raw.splitlines():
        if line.startswith(b"data:"):
            value = line[5:]
            data.append(value[1:] if value[:1] == b" " else value)
        elif line == b"data":  # a field without a colon has an empty value
            data.append(b"")
    return b"\n".join(data), len(data)


def _is_object(data: bytes) -> bool:
    return data[:1] == b"{" or data.lstrip(_JSON_SPACE)[:1] == b"{"


def _text_of_event(event: dict[str, Any], out: list[str]) -> None:
    """The generated text one decoded event carries (for an estimate)."""
    kind = event.get("type")
    if kind is None or kind == "message_delta":
        for choice in _list(event.get("choices")):
            if isinstance(choice, dict):
                delta = choice.get("delta")
                text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                if isinstance(text, str):
                    out.append(text)
    elif kind == "content_block_delta":
        delta = event.get("delta")
        if isinstance(delta, dict):
            text = delta.get("text", delta.get("partial_json"))
            if isinstance(text, str):
                out.append(text)
    elif kind == "response.output_text.delta":
        delta = event.get("delta")
        if isinstance(delta, str):
            out.append(delta)


def _texts(pieces: list[bytes]) -> list[str]:
    """The generated text in `pieces`, each a run of whole events, read as the HTML SSE spec
    reads them (an event is dispatched by a blank line, or at a piece's end)."""
    out: list[str] = []
    for piece in pieces:
        if b"\r" not in piece:  # LF only: events end at blank lines, `\n\n`
            for event in piece.split(b"\n\n"):
                if event.startswith(b"data: {") and b"\n" not in event:
                    _text_of_data(event[6:], out)
                elif event:  # several lines, or blank lines before the event
                    _text_of_data(_data_of(event)[0], out)
            continue
        data: list[bytes] = []
        for line in piece.splitlines():
            if not line:
                if data:
                    _text_of_data(b"\n".join(data), out)
                    data = []
            elif line.startswith(b"data:"):
                value = line[5:]
                data.append(value[1:] if value[:1] == b" " else value)
            elif line == b"data":
                data.append(b"")
        if data:  # the unterminated last event of a stream that ended
            _text_of_data(b"\n".join(data), out)
    return out


def _text_of_data(data: bytes, out: list[str]) -> None:
    if _is_object(data):
        try:
            event = msgspec.json.decode(data)
        except _DECODE_ERRORS:
            return
        if isinstance(event, dict):
            _text_of_event(event, out)


def _valid_object(data: bytes) -> bool:
    try:
        _check_object(data)
    except _DECODE_ERRORS:
        return False
    return True


class SSEStream:
    """An incremental server-sent-events reader that finds usage as the stream passes.

    `feed(chunk)` returns the bytes to send the client now: every event completed by the
    chunk, byte for byte, as soon as it is complete (a partial event waits for its end, so a
    stream that breaks never leaves the client half an event). With `hide_usage` (the gateway
    asked the upstream for usage the client did not ask for) the usage-only chunk and the
    `"usage": null` members that asking added are left out, so the client gets the bytes it
    would have got without the gateway (a member is only removed from the `data:` line of an
    event with a single one, holding a JSON object: elsewhere removing it is not safe).
    Lines may end in CR, LF or CRLF, split at any byte; data fields are read as the HTML SSE
    spec says.

    Usage is in the last events, so an event is only decoded when it may carry some: when
    its bytes hold the key `"usage"` (or the key in `\\u` escapes) with a value other than
    `null`. Events are found with `bytes.find` and passed on as slices of the read; the
    `"usage":null` member a compact upstream ends each chunk with is removed after a syntax
    check, not a decode (which would refuse two things the check lets pass: a number beyond
    a double's range, bad UTF-8 in a string; the member goes from those too, as a client
    reads them). The text for an estimate, needed only when usage never comes, is read from
    the kept events when asked for; past `_KEPT_BYTES` of them their text is taken out (each
    decoded, as every event was before) and the events let go, so a long stream holds its
    text (as before) and about 64 KiB of raw events (plus one read).
    """

    __slots__ = (
        "_anthropic_prompt",
        "_cr",
        "_dropped",
        "_held",
        "_kept",
        "_kept_bytes",
        "_null_usage",
        "_text",
        "hide_usage",
        "usage",
    )

    def __init__(self, hide_usage: bool = False) -> None:
        self.hide_usage = hide_usage
        self.usage: Usage | None = None
        self._held: list[bytes] = []  # the event being read, as it came
        self._kept: list[bytes] = []  # runs of whole events not yet read for their text
        self._kept_bytes = 0
        self._text: list[str] = []
        self._cr = False  # the last event ended with a CR at the end of a read
        self._dropped = False  # ... and was not sent (its LF must not be either)
        self._null_usage = False
        self._anthropic_prompt: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        """The content streamed so far (for an estimate when usage never comes)."""
        return "".join(self._text) + "".join(_texts(self._kept))

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:  # an empty read must not forget a CR that may start a CRLF
            return b""
        lf = b""
        if self._cr:
            self._cr = False
            if chunk[0] == 10:  # the LF of a CRLF whose CR ended the last event
                chunk = chunk[1:]
                if not self._dropped:
                    lf = b"\n"
                if not chunk:
                    return lf
        held = self._held
        if held:
            held.append(chunk)
            if b"\n" not in chunk and b"\r" not in chunk:  # no line ends: no event ends
                return lf
            data = b"".join(held)
            held.clear()
        else:
            data = chunk
        out = [lf] if lf else []
        if b"\r" not in data:
            done = self._scan_uniform(data, out, b"\n")
        elif data.count(b"\r") == data.count(b"\n") == data.count(b"\r\n"):
            done = self._scan_uniform(data, out, b"\r\n")
        else:
            done = self._scan(data, out)
        if done == len(data):
            self._keep(data)
        elif done:
            self._keep(data[:done])
            held.append(data[done:])
        else:
            held.append(data)
        return out[0] if len(out) == 1 else b"".join(out)

    def _scan_uniform(self, data: bytes, out: list[bytes], nl: bytes) -> int:
        """`feed`'s work on data whose lines all end in `nl` (LF, or CRLF). What goes out is
        sent as slices of `data` between the bytes left out; where the last whole event ends
        is returned. An event of one line, the usual kind, is checked with single-byte
        searches and fixed-place comparisons, and one search for `"usage"`."""
        n = len(data)
        hide = self.hide_usage
        w = len(nl)
        start = sent = 0  # where the event starts; what of data is in `out`
        while start < n:
            eol = data.find(nl, start)
            if eol < 0:
                break
            if eol == start:  # a blank line alone: an event with no fields
                start += w
                continue
            end = eol + 2 * w
            if end > n:
                break
            if data.startswith(nl, eol + w):  # one line, then the blank line
                at = data.find(b'"usage"', start, eol)
                if at < 0:
                    if data.find(b"\\", start, eol) < 0 or not _ESCAPED_USAGE.search(
                        data, start, eol
                    ):
                        start = end  # no usage in it: as it came
                        continue
                elif (
                    at == eol - 13  # the first "usage" is the last member's: no other
                    and data[at - 1] == 44  # ,
                    and data.startswith(b'"usage":null}', at)
                    and (data.find(b"\\", start, at) < 0 or data.find(b"\\u00", start, at) < 0)
                ):  # the member a compact upstream ends each chunk with
                    if not hide:
                        start = end
                        continue
                    if data.startswith(b"data:", start):
                        try:  # a JSON object? (checked, not decoded)
                            _check_object(
                                data[start + 6 if data[start + 5] == 32 else start + 5 : eol]
                            )
                        except _DECODE_ERRORS:
                            pass
                        else:  # left out
                            out.append(data[sent : at - 1])
                            sent = eol - 1  # from the `}`
                            start = end
                            continue
            else:  # several lines
                end = data.find(nl + nl, eol + w)
                if end < 0:
                    break
                end += 2 * w
            raw = data[start:end]
            got = self._relay(raw)
            if got is not raw:
                if sent < start:
                    out.append(data[sent:start])
                if got:
                    out.append(got)
                sent = end
            start = end
        if sent < start:
            out.append(data if sent == 0 and start == n else data[sent:start])
        return start

    def _scan(self, data: bytes, out: list[bytes]) -> int:
        """`feed`'s work on data with CRs in it, line by line; where the last whole event
        ends is returned."""
        n = len(data)
        start = pos = 0  # the event's start, the line's
        while pos < n:
            c = data[pos]
            if c == 10 or c == 13:  # a blank line: the event ends
                end = pos + 1
                if c == 13:
                    if end < n:
                        if data[end] == 10:
                            end += 1
                    else:
                        self._cr = True
                sent = self._relay(data[start:end])
                self._dropped = not sent
                if sent:
                    out.append(sent)
                start = pos = end
                continue
            lf = data.find(b"\n", pos)
            cr = data.find(b"\r", pos, lf if lf >= 0 else n)
            eol = cr if cr >= 0 else lf
            if eol < 0:
                break
            pos = eol + 1
            if cr >= 0 and pos < n and data[pos] == 10:
                pos += 1
        return start

    def close(self, complete: bool = True) -> bytes:
        """End of stream. When it ended normally an unterminated last event still counts and
        its bytes are returned; when it broke (`complete=False`) a partial event is dropped."""
        held, self._held = self._held, []
        if complete and held:
            raw = b"".join(held)
            self._keep(raw)
            return self._relay(raw)
        return b""

    def _relay(self, raw: bytes) -> bytes:
        """What the client gets of one event (nothing when it must not reach the client):
        `raw` itself when it goes as it came."""
        if b'"usage"' not in raw and (b"\\u00" not in raw or not _ESCAPED_USAGE.search(raw)):
            return raw
        uses = raw.count(b'"usage"')
        if uses != raw.count(b'"usage":null') or (
            b"\\u00" in raw and len(_ESCAPED_USAGE.findall(raw)) != uses
        ):
            return self._read(raw)  # counts, or a key that may hide some
        if not self.hide_usage:
            return raw
        if uses == 1:  # a compact upstream's last member: removed without decoding
            line = raw.rstrip(b"\r\n")
            if line.startswith(b"data:") and b"\n" not in line and b"\r" not in line:
                data = line[6:] if line[5:6] == b" " else line[5:]
                if data.endswith(b',"usage":null}') and _valid_object(data):
                    return raw.replace(b',"usage":null', b"", 1)
        return self._read(raw)

    def _read(self, raw: bytes) -> bytes:
        """`_relay` for an event that is decoded."""
        data, lines = _data_of(raw)
        self._null_usage = False
        if _is_object(data) and not self._event(data):
            return b""
        if self._null_usage and lines == 1:
            return _in_data_line(raw, _without_null_usage)
        return raw

    def _keep(self, piece: bytes) -> None:
        self._kept.append(piece)
        self._kept_bytes += len(piece)
        if self._kept_bytes > _KEPT_BYTES:
            self._text += _texts(self._kept)
            self._kept = []
            self._kept_bytes = 0

    def _event(self, data: bytes) -> bool:
        """Read one JSON event; False when it must not reach the client."""
        try:
            event = msgspec.json.decode(data)
        except _DECODE_ERRORS:
            return True
        if not isinstance(event, dict):
            return True
        if self.hide_usage and "usage" in event and event["usage"] is None:
            self._null_usage = True  # the member asking for usage added: not for the client
        kind = event.get("type")
        if kind is None or kind == "message_delta":
            usage = event.get("usage")
            if kind == "message_delta" and isinstance(usage, dict):
                self._anthropic(usage)
            elif usage is not None:
                found = usage_of(usage)
                if found is not None:
                    self.usage = found
                    if self.hide_usage and event.get("choices") == []:
                        return False
        elif kind in ("response.completed", "response.incomplete", "response.failed"):
            response = event.get("response")
            if isinstance(response, dict):
                found = usage_of(response.get("usage"))
                if found is not None:
                    self.usage = found
        elif kind == "message_start":
            message = event.get("message")
            if isinstance(message, dict) and isinstance(message.get("usage"), dict):
                self._anthropic(message["usage"])
        return True

    def _anthropic(self, usage: dict[str, Any]) -> None:
        """Anthropic spreads usage: input in message_start, cumulative output in deltas."""
        merged = dict(self._anthropic_prompt or {})
        merged.update({k: v for k, v in usage.items() if v is not None})
        self._anthropic_prompt = merged
        found = usage_of(merged)
        if found is not None:
            self.usage = found


def _in_data_line(raw: bytes, change: Any) -> bytes:
    """`raw` with `change` applied to its `data` line only (not to comments or other
    fields of the event)."""
    lines = raw.splitlines(keepends=True)
    return b"".join(change(line) if line.startswith(b"data:") else line for line in lines)
