"""One JSON line per request: who used what, and whether the count was estimated.

Headers are never logged, so neither are API keys.
"""

from __future__ import annotations

import sys
import time
from typing import IO, Any

import msgspec

from tokengateway.gateway.types import Message, Send
from tokengateway.tokens import Usage

__all__ = ["AccessLog", "Entry"]


class Entry:
    """Filled in by the data path as the request goes; written when it ends."""

    __slots__ = ("host", "method", "path", "request_id", "route", "start", "status", "usage")

    def __init__(self, method: str, path: str) -> None:
        self.start = time.perf_counter()
        self.method = method
        self.path = path
        self.host = ""
        self.request_id = ""
        self.route: str | None = None
        self.status = 0
        self.usage: Usage | None = None

    def recording(self, send: Send) -> Send:
        async def wrapped(message: Message) -> None:
            if message["type"] == "http.response.start":
                self.status = message["status"]
            await send(message)

        return wrapped

    def record(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "request_id": self.request_id,
            "method": self.method,
            "host": self.host,
            "path": self.path,
            "route": self.route,
            "status": self.status,
            "duration_ms": round((time.perf_counter() - self.start) * 1000, 3),
        }
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
