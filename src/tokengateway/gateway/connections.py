"""Defences at the connection level, under the ASGI apps: what uvicorn leaves unbounded.

uvicorn's httptools protocol bounds nothing a client controls before its request reaches an
app: a connection may stay silent forever, send its headers one byte a minute, send an
endless header, and any number of such connections may be open. `GuardedProtocol` (given to
uvicorn as its `http` class, one instance per connection) adds, per connection:

* **header timeout**: the request line and headers must all arrive within `header_timeout`
  of the connection's start, and of the first byte of each later request on it (between
  requests, uvicorn's keep-alive timeout applies). Then 408, or a bare close when the client
  sent nothing at all (a browser's spare connection).
* **head size**: at most `max_header_bytes` of request line and headers: 431.
* **connection cap**: at most `max_connections` open connections per listening address and
  process; the next one is answered 503 and closed at once, without reading anything.
* **slow readers**: a client that takes none of its answer for `body_timeout` while data
  waits for it is cut off (`abort`: a close would wait forever for the data to drain, and
  the answer would stay in memory).
* **trailers** of a chunked request are dropped: httptools reports them as headers once the
  body ended, and uvicorn would add them to the request's headers, where anything
  (`Authorization`, `Host`) would pass unseen by a proxy in front that checks headers.
* **upgrades** (WebSocket, h2c, CONNECT): httptools stops parsing after their head and
  would read what follows as new requests. They are answered as plain HTTP/1.1 and the
  connection closes, nothing after the head parsed; one with a body is refused (400).
* **clear answers**: the parser's refusals (request smuggling attempts such as both
  Content-Length and Transfer-Encoding, bad chunk sizes, CR/LF in a header) are a 400 in
  OpenAI's error envelope with the parser's reason, like every error this module sends.
* **lingering close**: a connection closed before the client's request was entirely read
  (any of the errors above, an early 413) first sends its answer and a FIN, then reads and
  drops what still comes for up to `LINGER` seconds: closing at once with unread data would
  send a reset, which may destroy the answer before the client reads it.

`RequestGuard` (ASGI middleware around every app) bounds the request body:

* **body timeout**: each wait for the next part of the body is bounded by `body_timeout`:
  408 in OpenAI's envelope, connection closed, the app stopped with `RequestAborted`.
* an answer that starts before the whole body was read (413, 404) closes the connection
  after it, instead of reading and dropping the rest of the body for as long as it comes;
* `receive.content_length` is the declared Content-Length, so that `read_body` answers 413
  before reading a body that announces itself too large.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from dataclasses import dataclass
from typing import Any

import httptools
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

from tokengateway.gateway.errors import error_body
from tokengateway.gateway.types import ASGIApp, Message, Receive, RequestAborted, Scope, Send

__all__ = [
    "ConnectionLimits",
    "GuardedProtocol",
    "RequestGuard",
    "protocol_class",
    "raise_open_file_limit",
]

log = logging.getLogger("tokengateway.connections")

#: how long a connection closed in the middle of a request keeps dropping what comes in
LINGER = 2.0
#: at most one "connection limit reached" warning per listening address in this many seconds
_WARN_EVERY = 10.0


@dataclass(frozen=True)
class ConnectionLimits:
    """The bounds on what one client can hold: `serve`'s --header-timeout, --body-timeout,
    --max-connections and --max-header-size."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 10_000
    max_header_bytes: int = 32 * 1024


def _response(status: int, reason: str, message: str, code: str) -> bytes:
    body = error_body(message, "invalid_request_error", code)
    head = (
        f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head over the size limit."""


class _Transport:
    """The transport as uvicorn sees it: `close` lingers when a request is half read."""

    __slots__ = ("_protocol", "_transport")

    def __init__(self, transport: asyncio.Transport, protocol: GuardedProtocol) -> None:
        self._transport = transport
        self._protocol = protocol

    def __getattr__(self, name: str) -> Any:
        return getattr(self._transport, name)

    def write(self, data: bytes) -> None:
        self._transport.write(data)

    def is_closing(self) -> bool:
        return self._protocol.lingering or self._transport.is_closing()

    def close(self) -> None:
        self._protocol.close()


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the bounds of `limits` (see the module's doc).

    Use `protocol_class(limits)`: uvicorn creates the instances itself, from a class."""

    limits: ConnectionLimits = ConnectionLimits()
    #: open connections per listening address (host, port), shared by the class's instances
    open_connections: dict[Any, int] = {}
    _warned: dict[Any, float] = {}

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.raw: asyncio.Transport | None = None
        self.lingering = False
        self._counted: Any = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._write_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        #: between a request's first byte and its last (when closing means losing input)
        self._mid_request = False
        #: nothing more is parsed on this connection (a bad request, an ignored upgrade)
        self._broken = False
        #: an upgrade request with a body, answered 400 instead of being started
        self._refused_upgrade = False
        self._write_backlog = 0
        #: before the end of the current head (request line and headers)
        self._in_head = True
        #: bytes received while in a head (catches a head that never ends)
        self._head_bytes = 0
        #: bytes of the current head's URL and headers, as the parser reports them
        self._head_size = 0

    # --- the connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        self.raw = transport
        super().connection_made(_Transport(transport, self))  # type: ignore[arg-type]
        where = self.server
        count = self.open_connections.get(where, 0)
        if count >= self.limits.max_connections:
            self._refuse(where, count)
            return
        self.open_connections[where] = count + 1
        self._counted = where
        self._arm_head_timer()

    def _refuse(self, where: Any, count: int) -> None:
        now = time.monotonic()
        if now - self._warned.get(where, -_WARN_EVERY) >= _WARN_EVERY:
            self._warned[where] = now
            log.warning(
                "%d connections open on %s: refusing new ones (--max-connections)",
                count,
                ":".join(map(str, where)) if where else "?",
            )
        assert self.raw is not None
        self.raw.write(
            _response(
                503,
                "Service Unavailable",
                f"too many connections to this gateway ({count}); retry later",
                "too_many_connections",
            )
        )
        self.raw.close()  # nothing read: nothing to linger for, and the fd is needed now

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._write_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._write_timer = self._linger_timer = None
        if self._counted is not None:
            left = self.open_connections.get(self._counted, 1) - 1
            if left > 0:
                self.open_connections[self._counted] = left
            else:
                self.open_connections.pop(self._counted, None)
            self._counted = None
        super().connection_lost(exc)

    def close(self) -> None:
        """Close, lingering when the client's request is not entirely read (see the module's
        doc); what uvicorn's `transport.close()` calls."""
        raw = self.raw
        if raw is None or raw.is_closing() or self.lingering:
            return
        if not self._mid_request or not raw.can_write_eof():
            raw.close()
            return
        self.lingering = True
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        raw.write_eof()  # the answer, then a FIN
        with contextlib.suppress(Exception):
            raw.resume_reading()  # to drop what comes, also when uvicorn paused reading
        self._linger_timer = self.loop.call_later(LINGER, raw.close)

    def _reject(self, status: int, reason: str, message: str, code: str) -> None:
        """Answer with an error and close."""
        if self.raw is None or self.raw.is_closing() or self.lingering:
            return
        cycle = self.cycle
        if cycle is not None and not cycle.response_complete:
            if not cycle.more_body or cycle.response_started:
                # a later request (pipelined) is bad while this one is answered: parse no
                # more, and close once that answer is complete
                self._broken = True
                cycle.keep_alive = False
                self.pipeline.clear()
                return
            # the request whose body the app reads is bad: to the app, the client left
            cycle.disconnected = True
            cycle.message_event.set()
        self.raw.write(_response(status, reason, message, code))
        self.close()

    # --- reading ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.lingering or self._broken:
            return  # dropped: the connection closes once its last answer is sent
        self._unset_keepalive_if_required()
        if self._in_head:
            self._head_bytes += len(data)
            self._arm_head_timer()  # any byte, even the CR LF httptools skips before a request
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._head_too_large()
                return
            log.debug("invalid HTTP request from %s: %s", self.client, exc)
            self._reject(400, "Bad Request", f"invalid HTTP request: {exc}", "invalid_request")
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._ignore_upgrade()
            return
        if self._in_head and self._head_bytes > self.limits.max_header_bytes:
            self._head_too_large()

    def _head_too_large(self) -> None:
        self._reject(
            431,
            "Request Header Fields Too Large",
            f"request line and headers over {self.limits.max_header_bytes} bytes",
            "request_header_too_large",
        )

    def _ignore_upgrade(self) -> None:
        """An Upgrade (or CONNECT) request: httptools stops parsing after its head, as if
        another protocol followed, and would parse what comes next as new requests. We speak
        none: the request is answered as plain HTTP (one with a body, whose body httptools
        skipped, is refused), nothing after it is parsed, and the connection closes."""
        self._broken = True
        self._mid_request = True  # unread input may follow: linger when closing
        if self._refused_upgrade:
            self._refused_upgrade = False
            self._reject(
                400,
                "Bad Request",
                "an Upgrade request with a body: this server speaks HTTP/1.1 only",
                "invalid_request",
            )
        elif self.cycle is not None and not self.cycle.response_complete:
            self.cycle.keep_alive = False
        else:
            self.close()

    def send_400_response(self, msg: str) -> None:
        self._reject(400, "Bad Request", f"invalid HTTP request: {msg}", "invalid_request")

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._mid_request = True
        self._in_head = True
        self._head_size = 0
        self._arm_head_timer()  # the first request's runs since the connection started

    def on_url(self, url: bytes) -> None:
        self._count_head(len(url))
        super().on_url(url)

    def on_header(self, name: bytes, value: bytes) -> None:
        if self._in_head:
            self._count_head(len(name) + len(value) + 4)
            super().on_header(name, value)
        # else: a trailer after a chunked body, dropped

    def _count_head(self, size: int) -> None:
        self._head_size += size
        if self._head_size > self.limits.max_header_bytes:
            raise _HeadTooLarge  # the parser stops; data_received answers 431

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        if self.parser.should_upgrade() and not self._should_upgrade() and self._has_body():
            self._refused_upgrade = True  # httptools will not parse its body: never started
            return
        super().on_headers_complete()

    def _has_body(self) -> bool:
        for name, value in self.headers:
            if name == b"transfer-encoding" or (name == b"content-length" and value != b"0"):
                return True
        return False

    def on_message_complete(self) -> None:
        self._mid_request = False
        self._in_head = True
        if not self._refused_upgrade:
            super().on_message_complete()

    # --- timers ----------------------------------------------------------------------------

    def _arm_head_timer(self) -> None:
        if self._head_timer is None:
            self._head_timer = self.loop.call_later(
                self.limits.header_timeout, self._head_timed_out
            )

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if self.raw is None or self.raw.is_closing() or self.lingering:
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # the next request's head waits behind an answer still being sent: its time
            # starts again (that answer has its own bounds)
            self._arm_head_timer()
            return
        if not self._mid_request:
            self.close()  # not a byte of a request: nobody to tell
            return
        self._reject(
            408,
            "Request Timeout",
            f"request headers not received within {self.limits.header_timeout:g}s",
            "request_timeout",
        )

    def pause_writing(self) -> None:
        super().pause_writing()
        self._arm_write_timer()

    def _arm_write_timer(self) -> None:
        if self._write_timer is None and self.raw is not None:
            self._write_backlog = self.raw.get_write_buffer_size()
            self._write_timer = self.loop.call_later(
                self.limits.body_timeout, self._write_timed_out
            )

    def resume_writing(self) -> None:
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        super().resume_writing()

    def _write_timed_out(self) -> None:
        self._write_timer = None
        raw = self.raw
        if raw is None or raw.is_closing():
            return
        if raw.get_write_buffer_size() < self._write_backlog:
            self._arm_write_timer()  # slow, but reading
            return
        log.debug("%s read nothing for %gs: aborted", self.client, self.limits.body_timeout)
        raw.abort()


def protocol_class(limits: ConnectionLimits) -> type[GuardedProtocol]:
    """A `GuardedProtocol` class with these limits and its own connection counts."""
    return type(
        "GuardedProtocol",
        (GuardedProtocol,),
        {"limits": limits, "open_connections": {}, "_warned": {}},
    )


# --- the request body ----------------------------------------------------------------------


class _GuardedReceive:
    """One request's `receive` and `send`, as `RequestGuard` hands them to the app."""

    __slots__ = ("_receive", "_send", "_timeout", "body_done", "content_length", "started")

    def __init__(self, scope: Scope, receive: Receive, send: Send, timeout: float | None) -> None:
        self._receive = receive
        self._send = send
        self._timeout = timeout
        length: int | None = None
        chunked = False
        for name, value in scope["headers"]:
            if name == b"content-length":
                length = int(value)  # the parser accepts digits only, and only one of them
            elif name == b"transfer-encoding":
                chunked = True
        #: the declared body size (read_body refuses a body over its limit before reading it)
        self.content_length = length
        self.body_done = not chunked and not length
        self.started = False

    async def __call__(self) -> Message:
        if self.body_done or self._timeout is None:
            message = await self._receive()
        else:
            try:
                async with asyncio.timeout(self._timeout):
                    message = await self._receive()
            except TimeoutError:
                await self._timed_out()
                raise RequestAborted("request body timeout") from None
        if message["type"] == "http.request" and not message.get("more_body", False):
            self.body_done = True
        return message

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            self.started = True
            if not self.body_done:  # the rest of the body is not worth reading
                headers = list(message.get("headers") or ())
                headers.append((b"connection", b"close"))
                message = {**message, "headers": headers}
        await self._send(message)

    async def _timed_out(self) -> None:
        if self.started:
            return
        self.started = True
        body = error_body(
            f"no part of the request body arrived for {self._timeout:g}s",
            "invalid_request_error",
            "request_timeout",
        )
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        await self._send({"type": "http.response.start", "status": 408, "headers": headers})
        await self._send({"type": "http.response.body", "body": body})


class RequestGuard:
    """ASGI middleware: the body timeout, and closing after an answer that did not wait for
    the whole body (see the module's doc). `RequestAborted` from the app ends a request
    quietly: the client is gone, or has its 408."""

    def __init__(self, app: ASGIApp, body_timeout: float | None) -> None:
        self.app = app
        self.body_timeout = body_timeout

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        guarded = _GuardedReceive(scope, receive, send, self.body_timeout)
        with contextlib.suppress(RequestAborted):
            await self.app(scope, guarded, guarded.send)


def raise_open_file_limit(max_connections: int) -> None:
    """Raise this process's soft limit on open files towards the hard limit, so that
    `max_connections` connections fit (and the upstream's, the store's); a warning when they
    cannot (the kernel then holds the extra connections in the listen backlog)."""
    try:
        import resource

        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    except (ImportError, OSError, ValueError):  # pragma: no cover - not on this platform
        return
    wanted = max_connections + 1024  # upstream connections, the store, files
    if hard != resource.RLIM_INFINITY:
        wanted = min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < wanted:
        with contextlib.suppress(OSError, ValueError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))
            soft = wanted
    if soft != resource.RLIM_INFINITY and soft < max_connections + 64:
        log.warning(
            "--max-connections %d is above what the open-file limit (%d) allows: "
            "connections beyond about %d wait to be accepted",
            max_connections,
            soft,
            max(soft - 64, 0),
        )
