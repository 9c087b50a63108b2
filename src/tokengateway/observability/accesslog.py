"""One JSON line per request: who used what, which limit refused, and whether the count was
estimated.

Headers are never logged, so neither are API keys.
"""

from __future__ import annotations

import functools
import sys
import time
from typing import IO, Any

import msgspec

from tokengateway.http.asgi import Message, Send
from tokengateway.wire.tokens import Usage

__all__ = ["AccessLog", "Entry", "utc_now_text"]


def utc_now_text() -> str:
    """The current UTC time as Envoy's `request.time` and the access log write it
    (`2026-11-27T10:00:00Z`), made once per second rather than per request."""
    return _utc_text(int(time.time()))


@functools.lru_cache(maxsize=1)
def _utc_text(second: int) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(second))


class Entry:
    """Filled in by the data path as the request goes; written when it ends."""

    __slots__ = (
        "first_chunk",
        "forwarded",
        "host",
        "limited_by",
        "method",
        "path",
        "request_id",
        "route",
        "start",
        "status",
        "upstream_done",
        "usage",
        "user",
    )

    def __init__(self, method: str, path: str) -> None:
        self.start = time.perf_counter()
        self.method = method
        self.path = path
        self.host = ""
        self.request_id = ""
        self.route: str | None = None
        self.status = 0
        self.usage: Usage | None = None
        self.user: str | None = None
        self.limited_by: str | None = None
        # perf_counter() times: request sent upstream, first chunk back, answer complete
        self.forwarded: float | None = None
        self.first_chunk: float | None = None
        self.upstream_done: float | None = None

    def recording(self, send: Send) -> Send:
        """`send` that notes the status and gives every answer the request's id (unless the
        upstream answered with its own)."""

        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
                if self.request_id:
                    headers = message.get("headers")
                    if headers is None:
                        message["headers"] = headers = []
                    for name, _ in headers:  # a loop, not any(): ~0.3 us less per answer
                        if name == b"x-request-id":
                            break
                    else:
                        headers.append((b"x-request-id", self.request_id.encode("latin-1")))
            await send(message)

        return wrapped

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "time": utc_now_text(),
            "request_id": self.request_id,
            "method": self.method,
            "host": self.host,
            "path": self.path,
            "route": self.route,
            "status": self.status,
            "duration_ms": round((time.perf_counter() - self.start) * 1000, 3),
        }
        if self.user is not None:
            out["user"] = self.user
        if self.limited_by is not None:
            out["limited_by"] = self.limited_by
        if self.forwarded is not None and self.upstream_done is not None:
            out["upstream_ms"] = round((self.upstream_done - self.forwarded) * 1000, 3)
        if self.usage is not None:
            out["prompt_tokens"] = self.usage.prompt_tokens
            out["completion_tokens"] = self.usage.completion_tokens
            out["total_tokens"] = self.usage.total_tokens
            out["usage_estimated"] = self.usage.estimated
        return out


class AccessLog:
    def __init__(self, stream: IO[str] | None = None) -> None:
        self.stream = stream or sys.stdout
        self._encode = msgspec.json.encode

    def write(self, entry: Entry) -> None:
        self.stream.write(self._encode(entry.record()).decode() + "\n")
        self.stream.flush()
