"""Reading token usage out of upstream responses (JSON bodies and SSE streams).

Kuadrant counts `usage.total_tokens`; a response that carries no usage is charged by an
estimate here instead of being free (see docs/counting.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

__all__ = ["SSEUsageReader", "Usage", "estimate_tokens", "estimate_usage", "usage_from_json"]


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    estimated: bool = False


class _Body(msgspec.Struct):
    usage: dict[str, Any] | None = None


_decode_body = msgspec.json.Decoder(_Body).decode


def _count(value: Any) -> int | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return max(0, int(value))


def _from_usage(raw: Any) -> Usage | None:
    if not isinstance(raw, dict):
        return None
    prompt = _count(raw.get("prompt_tokens", raw.get("input_tokens")))
    completion = _count(raw.get("completion_tokens", raw.get("output_tokens")))
    total = _count(raw.get("total_tokens"))
    if total is None:
        if prompt is None and completion is None:
            return None
        total = (prompt or 0) + (completion or 0)
    return Usage(prompt or 0, completion or 0, total)


def usage_from_json(body: bytes) -> Usage | None:
    """The `usage` object of a JSON response body, or None when absent or unreadable."""
    try:
        return _from_usage(_decode_body(body).usage)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return None


class SSEUsageReader:
    """Feed it the stream's bytes as they pass; `usage` is the last usage seen in an event.

    Lines may end in CR, LF or CRLF and may be split across reads at any byte.
    """

    __slots__ = ("_buf", "_pending_cr", "text_chars", "usage")

    def __init__(self) -> None:
        self._buf = b""
        self._pending_cr = False
        self.usage: Usage | None = None
        self.text_chars = 0  # characters of content streamed, for an estimate

    def feed(self, chunk: bytes) -> None:
        data = self._buf + chunk
        if self._pending_cr and data.startswith(b"\n"):
            data = data[1:]
        self._pending_cr = False
        lines = data.replace(b"\r\n", b"\n").replace(b"\r", b"\n").split(b"\n")
        self._buf = lines.pop()
        if data.endswith(b"\r"):
            self._pending_cr = True
        for line in lines:
            if line.startswith(b"data:"):
                self._data(line[5:].strip())

    def close(self) -> None:
        if self._buf.startswith(b"data:"):
            self._data(self._buf[5:].strip())
        self._buf = b""

    def _data(self, payload: bytes) -> None:
        if not payload or payload == b"[DONE]" or not payload.startswith(b"{"):
            return
        try:
            event = msgspec.json.decode(payload)
        except msgspec.DecodeError:
            return
        if not isinstance(event, dict):
            return
        usage = _from_usage(event.get("usage"))
        if usage is not None:
            self.usage = usage
        for choice in event.get("choices") or ():
            if isinstance(choice, dict):
                delta = choice.get("delta") or {}
                text = delta.get("content") if isinstance(delta, dict) else None
                if text is None:
                    text = choice.get("text")
                if isinstance(text, str):
                    self.text_chars += len(text)


def estimate_tokens(chars: int) -> int:
    """About four characters a token for English text; never zero."""
    return max(1, (chars + 3) // 4)


def _text_of(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_of(v) for v in value)
    if isinstance(value, dict):
        return sum(_text_of(v) for k, v in value.items() if k in ("content", "text", "prompt"))
    return 0


def estimate_usage(request_body: bytes, completion_chars: int) -> Usage:
    """A fallback when the upstream reported nothing: prompt and completion by length."""
    try:
        req = msgspec.json.decode(request_body) if request_body else {}
    except msgspec.DecodeError:
        req = {}
    prompt_chars = 0
    if isinstance(req, dict):
        prompt_chars = _text_of(req.get("messages")) + _text_of(req.get("prompt"))
        prompt_chars += _text_of(req.get("input"))
    prompt = estimate_tokens(prompt_chars)
    completion = estimate_tokens(completion_chars) if completion_chars else 0
    return Usage(prompt, completion, prompt + completion, estimated=True)


def completion_chars_of(body: bytes) -> int:
    """Characters of generated text in a JSON completion, for an estimate."""
    try:
        doc = msgspec.json.decode(body)
    except msgspec.DecodeError:
        return len(body)
    if not isinstance(doc, dict):
        return 0
    total = 0
    for choice in doc.get("choices") or ():
        if isinstance(choice, dict):
            total += _text_of(choice.get("message")) + _text_of(choice.get("text"))
    return total
