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


def _without_null_usage(raw: bytes) -> bytes:
    """`raw` without its `"usage": null` members. The usual case, one compact member after
    another, is a plain replace (what the pattern would do, ~5x faster)."""
    if raw.count(b'"usage"') == 1 and b',"usage":null' in raw:
        return raw.replace(b',"usage":null', b"", 1)
    return _USAGE_NULL.sub(b"", raw)


class SSEStream:
    """An incremental server-sent-events reader that finds usage as the stream passes.

    `feed(chunk)` returns the bytes to send the client now: every event completed by the
    chunk, byte for byte, as soon as it is complete (a partial event waits for its end, so a
    stream that breaks never leaves the client half an event). With `hide_usage` (the gateway
    asked the upstream for usage the client did not ask for) the usage-only chunk and the
    `"usage": null` members that asking added are left out, so the client gets the bytes it
    would have got without the gateway (a member is left in place in an event whose JSON
    spans several `data:` lines, where removing it is not safe). Lines may end in CR, LF or
    CRLF, split at any byte; data fields are read as the HTML SSE spec says.
    """

    __slots__ = (
        "_anthropic_prompt",
        "_cr",
        "_data",
        "_dropped",
        "_line",
        "_null_usage",
        "_raw",
        "_text",
        "events",
        "hide_usage",
        "usage",
    )

    def __init__(self, hide_usage: bool = False) -> None:
        self.hide_usage = hide_usage
        self.usage: Usage | None = None
        self.events = 0
        self._text: list[str] = []
        self._line = b""
        self._raw: list[bytes] = []
        self._data: list[bytes] = []
        self._cr = False
        self._dropped = False
        self._null_usage = False
        self._anthropic_prompt: dict[str, Any] | None = None

    @property
    def text(self) -> str:
        """The content streamed so far (for an estimate when usage never comes)."""
        return "".join(self._text)

    def feed(self, chunk: bytes) -> bytes:
        if not chunk:  # an empty read must not forget a CR that may start a CRLF
            return b""
        out: list[bytes] = []
        i = 0
        if self._cr and chunk[:1] == b"\n":  # the LF of a CRLF split across reads
            i = 1
            if self._raw:  # the CR ended a line of the event being read
                self._raw.append(b"\n")
            elif not self._dropped:  # the CR ended an event already sent: its LF goes too
                out.append(b"\n")
        self._cr = False
        n = len(chunk)
        while i < n:
            lf = chunk.find(b"\n", i)
            cr = chunk.find(b"\r", i, lf if lf >= 0 else n)
            j = cr if cr >= 0 else lf
            if j < 0:
                self._line += chunk[i:]
                self._raw.append(chunk[i:])
                break
            end = j + 1
            if chunk[j] == 13:  # CR
                if end < n and chunk[end] == 10:
                    end += 1
                elif end == n:
                    self._cr = True
            line = self._line + chunk[i:j]
            self._line = b""
            self._raw.append(chunk[i:end])
            i = end
            self._on_line(line, out)
        return out[0] if len(out) == 1 else b"".join(out)

    def close(self, complete: bool = True) -> bytes:
        """End of stream. When it ended normally an unterminated last event still counts and
        its bytes are returned; when it broke (`complete=False`) a partial event is dropped."""
        out: list[bytes] = []
        if complete:
            if self._line:
                self._on_line(self._line, out)
            if self._data or self._raw:
                self._dispatch(out)
        self._line = b""
        self._raw = []
        self._data = []
        return b"".join(out)

    def _on_line(self, line: bytes, out: list[bytes]) -> None:
        if not line:
            self._dispatch(out)
            return
        if line.startswith(b"data:"):
            value = line[5:]
            self._data.append(value[1:] if value.startswith(b" ") else value)
        elif line == b"data":  # a field without a colon has an empty value
            self._data.append(b"")

    def _dispatch(self, out: list[bytes]) -> None:
        raw = b"".join(self._raw)
        lines = len(self._data)
        data = b"\n".join(self._data)
        self._raw = []
        self._data = []
        keep = True
        self._null_usage = False
        if data[:1] == b"{" or data.lstrip(_JSON_SPACE)[:1] == b"{":
            self.events += 1
            keep = self._event(data)
        if keep:
            if self._null_usage and lines == 1:
                raw = _without_null_usage(raw)
            out.append(raw)
        self._dropped = not keep

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
            for choice in _list(event.get("choices")):
                if isinstance(choice, dict):
                    delta = choice.get("delta")
                    text = delta.get("content") if isinstance(delta, dict) else choice.get("text")
                    if isinstance(text, str):
                        self._text.append(text)
        elif kind == "content_block_delta":
            delta = event.get("delta")
            if isinstance(delta, dict):
                text = delta.get("text", delta.get("partial_json"))
                if isinstance(text, str):
                    self._text.append(text)
        elif kind == "response.output_text.delta":
            delta = event.get("delta")
            if isinstance(delta, str):
                self._text.append(delta)
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
