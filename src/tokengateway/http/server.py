"""The gateway's HTTP/1.1 server: asyncio protocols and httptools' parser, speaking ASGI 3.

One `HttpProtocol` per connection parses requests with httptools and runs each in one task
of the ASGI app (`Server.app`), answering strictly in order; `Server` listens on the given
sockets, runs the app's lifespan around them and stops gracefully. It does what the apps
need of an ASGI server and no more (no WebSocket, no HTTP/2, no proxy headers: the client is
the TCP peer), and it bounds everything a client controls, per connection:

* **header timeout**: the request line and headers must all arrive within `header_timeout`
  of the connection's start, and of the first byte of each later request on it (between
  requests, the keep-alive timeout applies: `KEEP_ALIVE` seconds, then a silent close).
  Then 408, or a bare close when the client sent nothing at all (a browser's spare
  connection).
* **head size**: at most `max_header_bytes` of request line and headers: 431.
* **connection cap**: at most `max_connections` open connections per listening socket and
  process; the next one is answered 503 and closed at once, without reading anything.
* **body timeout**: each wait of the app for the next part of the body is bounded by
  `body_timeout`: the server answers 408, closes the connection, and
  the app's `receive` raises `RequestAborted`.
* **early answers**: an answer that starts before the whole request body arrived (413, 404)
  closes the connection after it, instead of reading and dropping the rest of the body for
  as long as it comes; the app's `receive` is an `asgi.SizedReceive` that knows the
  declared Content-Length, so that `read_body` answers 413 before reading a body that
  announces itself too large.
* **slow readers**: a client that takes none of its answer for `body_timeout` while data
  waits for it is cut off (`abort`: a close would wait forever for the data to drain, and
  the answer would stay in memory). A client that reads, however slowly, is not.
* **trailers** of a chunked request are dropped: httptools reports them as headers once the
  body ended; added to the request's headers, anything (`Authorization`, `Host`) would pass
  unseen by a proxy in front that checks headers.
* **upgrades** (WebSocket, h2c, CONNECT): httptools stops parsing after their head and
  would read what follows as new requests. They are answered as plain HTTP/1.1 and the
  connection closes, nothing after the head parsed; one with a body is refused (400).
* **one request line, one Host** (`target.py`): origin- and absolute-form targets only (the
  authority of an absolute one replaces Host), `OPTIONS *` answered here; the path handed on
  (`scope["path"]`, equal to `raw_path` decoded) is normalised and stays percent-encoded;
  Host is required (HTTP/1.1), single and `host[:port]`; header values lose trailing
  whitespace (llhttp drops the leading); Transfer-Encoding other than `chunked` is refused.
  All are 400 (501 for an unsupported coding) naming what was wrong.
* **clear answers**: the parser's refusals (request smuggling attempts such as both
  Content-Length and Transfer-Encoding, bad chunk sizes, CR/LF in a header) are a 400 with
  the parser's reason.
* **lingering close**: a connection closed before the client's request was entirely read
  (any of the errors above, an early 413) first sends its answer and a FIN, then reads and
  drops what still comes for up to `LINGER` seconds: closing at once with unread data would
  send a reset, which may destroy the answer before the client reads it.
* **flow control**: reading pauses while more than `READ_HIGH_WATER` bytes of body wait for
  the app (and while a pipelined request waits for the answer before it); the app's `send`
  waits while the transport's write buffer is full.

An exception from the app before its answer started is a 500 (the traceback goes to the log
only); after it started, the connection is closed. A `RequestAborted` from the app ends its
request quietly: the client is gone, or has its 408.

Every answer the server gives itself (400, 408, 431, 500, 501, 503) is JSON, its body made
by `Server.error_body` from the status, a message and a short code: `{"error": {"message",
"code"}}` unless the app's owner gives its own envelope (the gateway gives OpenAI's, so that
clients read one shape whoever answered). The server knows no API's vocabulary.

The request path is kept lean (the server's CPU per request is part of every refusal's
cost, see benchmarks/floor.py): one `_Cycle` per request (the app's `receive`, with `send`),
one task, timers armed only when something actually waits, the head written with the first
part of the body in one `write`.
"""

from __future__ import annotations

import asyncio
import contextlib
import email.utils
import functools
import http
import json
import logging
import signal
import socket
import ssl
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import httptools

from tokengateway.http.asgi import ASGIApp, Message, RequestAborted, Scope, SizedReceive
from tokengateway.http.target import (
    ALLOWED_METHODS,
    TargetError,
    normalize_path,
    split_target,
    valid_host,
)
from tokengateway.http.tlsport import TlsPort

__all__ = [
    "ConnectionLimits",
    "ErrorBody",
    "HttpProtocol",
    "Server",
    "plain_error_body",
    "raise_open_file_limit",
]

log = logging.getLogger("tokengateway.connections")

#: how long a connection closed in the middle of a request keeps dropping what comes in
LINGER = 2.0
#: at most one "connection limit reached" warning per listening address in this many seconds
_WARN_EVERY = 10.0
#: how long a connection may stay idle between two requests
KEEP_ALIVE = 30.0
#: how long a graceful stop waits for the requests in flight before closing their connections
GRACEFUL_TIMEOUT = 10.0
#: how long an idle connection closed by the stop may take to answer TLS's close_notify
CLOSE_NOTIFY_WAIT = 1.0
#: reading pauses while more than this many bytes of request body wait for the app
READ_HIGH_WATER = 64 * 1024

_ASGI = {"version": "3.0", "spec_version": "2.3"}
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
#: the lengths of the response header names the server looks at (content-length,
#: transfer-encoding, connection, date): the others are not even lower-cased
_SPECIAL_LENGTHS = frozenset((14, 17, 10, 4))
#: the ioctl that tells how many bytes a socket's send queue holds (Linux: SIOCOUTQ)
_SIOCOUTQ: int | None
try:
    import fcntl
    import termios

    _SIOCOUTQ = termios.TIOCOUTQ if sys.platform.startswith("linux") else None
except ImportError:  # pragma: no cover - not on this platform
    _SIOCOUTQ = None
#: every request's task has this name: Python 3.11 formats a new "Task-N" for each otherwise.
#: The task is made directly (`loop.create_task` is slower by a call and, on uvloop, names
#: the task twice); no task factory is ever installed here.
_TASK_NAME = "tokengateway-http-request"
_Task = asyncio.Task
#: the same for the request headers the server reads (content-length, transfer-encoding,
#: expect, host)
_REQUEST_SPECIAL_LENGTHS = frozenset((14, 17, 6, 4))
#: answers that never have a body, nor Content-Length or Transfer-Encoding (RFC 9110 8.6,
#: 6.4.1; a 304's Content-Length would have to be the 200's, which the server cannot know)
_BARE = frozenset((100, 101, 102, 103, 204, 304))
#: optional whitespace around a field value (RFC 9110 5.6.3), as bytes' integers
_OWS = frozenset(b" \t")
_METHODS = {m.encode(): m for m in ("GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS")}


@dataclass(frozen=True)
class ConnectionLimits:
    """The bounds on what one client can hold: `serve`'s --header-timeout, --body-timeout,
    --max-connections and --max-header-size."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 10_000
    max_header_bytes: int = 32 * 1024


#: the body of an answer the server gives itself: (status, message, code) -> JSON bytes
ErrorBody = Callable[[int, str, str], bytes]


def plain_error_body(status: int, message: str, code: str) -> bytes:
    """`{"error": {"message": ..., "code": ...}}`: the server's own answers when its owner gives
    no envelope of its own."""
    return json.dumps({"error": {"message": message, "code": code}}).encode()


def _response(error_body: ErrorBody, status: int, message: str, code: str) -> bytes:
    """A complete JSON answer, its body made by `error_body`, that closes the connection."""
    body = error_body(status, message, code)
    head = (
        f"HTTP/1.1 {status} {_reason(status)}\r\ncontent-type: application/json\r\n"
        f"content-length: {len(body)}\r\nconnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


def _reason(status: int) -> str:
    try:
        return http.HTTPStatus(status).phrase
    except ValueError:
        return ""


_STATUS_LINES: dict[int, bytes] = {}


def _status_line(status: int) -> bytes:
    line = _STATUS_LINES.get(status)
    if line is None:
        if not isinstance(status, int) or not 100 <= status <= 999:
            raise RuntimeError(f"invalid HTTP status {status!r}")
        line = f"HTTP/1.1 {status} {_reason(status)}\r\n".encode("ascii")  # SP even if no reason
        if len(_STATUS_LINES) < 1000:
            _STATUS_LINES[status] = line
    return line


def _date_line(now: float | None = None) -> bytes:
    return b"date: " + email.utils.formatdate(now, usegmt=True).encode("ascii") + b"\r\n"


class _HeadTooLarge(Exception):
    """Raised from a parser callback to stop parsing a head over the size limit."""


class _BadHead(Exception):
    """Raised from a parser callback to refuse a request head (400 unless told, with this
    message)."""

    def __init__(self, message: str, status: int = 400, code: str = "invalid_request") -> None:
        super().__init__(message)
        self.status = status
        self.code = code


# --- one request ---------------------------------------------------------------------------


class _Cycle(SizedReceive):
    """One request and its answer: the app's `receive` (the instance is called) and `send`.

    `content_length` is the declared Content-Length (None without one, or chunked)."""

    __slots__ = (
        "body_done",
        "buffered",
        "chunked",
        "chunks",
        "complete",
        "conn",
        "content_length",
        "delivered",
        "disconnected",
        "expect",
        "keep_alive",
        "method_head",
        "no_body",
        "pending",
        "remaining",
        "scope",
        "started",
        "task",
        "timed_out",
        "waiter",
    )

    # set by `_start`, before `send` reads them
    chunked: bool
    no_body: bool
    #: bytes of the declared Content-Length still to send (None: not counted)
    remaining: int | None
    #: the response head, written with the first part of the body
    pending: bytes | None
    # set as the request starts (at once, or after the requests before it)
    task: asyncio.Task[None]

    def __init__(
        self,
        conn: HttpProtocol,
        scope: Scope,
        content_length: int | None,
        keep_alive: bool,
        expect: bool,
        method_head: bool,
    ) -> None:
        self.conn = conn
        self.scope = scope
        self.content_length = content_length
        self.keep_alive = keep_alive
        self.expect = expect
        self.method_head = method_head
        #: body parts received and not yet handed to the app
        self.chunks: list[bytes] | None = None
        self.buffered = 0
        #: the parser reached the end of the request (its whole body is here)
        self.body_done = False
        #: the app received the last part of the body
        self.delivered = False
        self.started = False
        self.complete = False
        self.disconnected = False
        self.timed_out = False
        self.waiter: asyncio.Future[None] | None = None

    # --- receive -----------------------------------------------------------------------

    async def __call__(self) -> Message:
        while True:
            if self.disconnected or self.complete:
                if self.timed_out:
                    raise RequestAborted("request body timeout", timed_out=True)
                return {"type": "http.disconnect"}
            chunks = self.chunks
            if chunks is not None:
                self.chunks = None
                body = chunks[0] if len(chunks) == 1 else b"".join(chunks)
                if self.buffered > READ_HIGH_WATER:
                    self.buffered = 0
                    self.conn.resume_for_body()
                else:
                    self.buffered = 0
                done = self.body_done
                if done:
                    self.delivered = True
                return {"type": "http.request", "body": body, "more_body": not done}
            if self.body_done:
                if not self.delivered:
                    self.delivered = True
                    return {"type": "http.request", "body": b"", "more_body": False}
                await self._wait(None)  # until the client leaves or the answer ends
                continue
            conn = self.conn
            if self.expect:
                self.expect = False
                if not self.started and conn.writable():
                    conn.transport.write(_CONTINUE)  # type: ignore[union-attr]
            conn.resume_for_body()
            await self._wait(conn.limits.body_timeout)

    async def _wait(self, timeout: float | None) -> None:
        loop = self.conn.loop
        self.waiter = waiter = loop.create_future()
        timer = None if timeout is None else loop.call_later(timeout, self._body_timed_out)
        try:
            await waiter
        finally:
            self.waiter = None
            if timer is not None:
                timer.cancel()

    def wake(self) -> None:
        waiter = self.waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _body_timed_out(self) -> None:
        """No part of the body for `body_timeout`: 408 (unless the answer started), the
        connection closed, and the app's receive raises RequestAborted."""
        self.timed_out = True
        conn = self.conn
        if not self.started and conn.writable():
            timeout = conn.limits.body_timeout
            conn.transport.write(  # type: ignore[union-attr]
                _response(
                    conn.server.error_body,
                    408,
                    f"no part of the request body arrived for {timeout:g}s",
                    "request_timeout",
                )
            )
        self.started = self.complete = self.disconnected = True
        conn.cycle_ended(self, close=True)
        self.wake()

    # --- send --------------------------------------------------------------------------

    async def send(self, message: Message) -> None:
        if self.disconnected:
            return  # the client is gone (or has its 408): nobody to tell
        kind = message["type"]
        if not self.started:
            if kind != "http.response.start":
                raise RuntimeError(f"expected 'http.response.start', got {kind!r}")
            self._start(message)
            return
        if kind != "http.response.body":
            raise RuntimeError(f"expected 'http.response.body', got {kind!r}")
        if self.complete:
            raise RuntimeError("'http.response.body' sent after the response completed")
        conn = self.conn
        if conn.write_paused:
            await conn.drain()
            if self.disconnected:
                return
        body: bytes = message.get("body", b"")
        more: bool = message.get("more_body", False)
        if self.no_body:
            data = b""
        elif self.chunked:
            if body:
                data = b"%x\r\n%b\r\n" % (len(body), body)
                if not more:
                    data += b"0\r\n\r\n"
            else:
                data = b"" if more else b"0\r\n\r\n"
        else:
            data = body
            if self.remaining is not None:
                self.remaining -= len(body)
                if self.remaining < 0:
                    self.complete = True
                    conn.cycle_ended(self, close=True)
                    raise RuntimeError("response body longer than its Content-Length")
        pending = self.pending
        if pending is not None:
            self.pending = None
            data = pending + data
        if data:
            conn.transport.write(data)  # type: ignore[union-attr]
        if not more:
            self.complete = True
            if self.remaining:
                conn.cycle_ended(self, close=True)
                raise RuntimeError("response body shorter than its Content-Length")
            conn.cycle_ended(self, close=not self.keep_alive)
            if self.waiter is not None:
                self.wake()  # a receive waiting for the client to leave: the answer ended

    def _start(self, message: Message) -> None:
        status = message["status"]
        parts = [_STATUS_LINES.get(status) or _status_line(status)]  # lines, CR LF included
        length: bytes | None = None
        close = has_date = chunked = False
        remaining = None
        bare = status in _BARE
        for name, value in message.get("headers") or ():
            if len(name) in _SPECIAL_LENGTHS:
                low = name.lower()
                if low == b"content-length":
                    if bare:
                        continue  # never on 1xx, 204, 304, whatever the app says
                    length = value
                elif low == b"transfer-encoding":
                    continue  # the framing is ours to choose
                elif low == b"connection":
                    if b"close" in value.lower():
                        close = True
                elif low == b"date":
                    has_date = True
            parts.append(b"%b: %b\r\n" % (name, value))
        keep_alive = self.keep_alive and not close and self.body_done
        http10 = self.scope["http_version"] == "1.0"
        no_body = bare or self.method_head or status < 200
        if length is not None:
            if not no_body:
                remaining = int(length)
        elif not no_body:
            if http10:
                keep_alive = False  # the end of the connection ends the body
            else:
                chunked = True
                parts.append(b"transfer-encoding: chunked\r\n")
        if not keep_alive:
            if not close:
                parts.append(b"connection: close\r\n")
        elif http10:
            parts.append(b"connection: keep-alive\r\n")
        if not has_date:
            parts.append(self.conn.server.date)
        parts.append(b"\r\n")
        head = b"".join(parts)
        lines = len(parts)
        if head.count(b"\n") != lines or head.count(b"\r") != lines:
            raise RuntimeError("CR or LF in a response header")
        self.keep_alive = keep_alive
        self.no_body = no_body
        self.chunked = chunked
        self.remaining = remaining
        self.started = True
        self.expect = False
        if length is None and not no_body:
            # a stream: its head goes out now, before the first event arrives
            self.pending = None
            self.conn.transport.write(head)  # type: ignore[union-attr]
        else:
            self.pending = head  # written with the body, in one write


# --- one connection ------------------------------------------------------------------------


class _Listener:
    """A listening socket's count of open connections (the cap is per socket, per process),
    and its scheme: "https" when it serves TLS."""

    __slots__ = ("open", "scheme", "warned", "where")

    def __init__(self, where: Any, scheme: str = "http") -> None:
        self.where = where
        self.scheme = scheme
        self.open = 0
        self.warned = -_WARN_EVERY


class HttpProtocol(asyncio.Protocol):
    """One client connection: parses its requests and runs each in the server's app."""

    __slots__ = (
        "_chunked",
        "_codings",
        "_content_length",
        "_drain_waiter",
        "_expect",
        "_head_bytes",
        "_head_left",
        "_head_timer",
        "_headers",
        "_host",
        "_hosts",
        "_idle_at",
        "_idle_timer",
        "_in_head",
        "_linger_timer",
        "_max_head",
        "_mid_request",
        "_upgrade_body",
        "_url",
        "_write_backlog",
        "_write_timer",
        "active",
        "app",
        "broken",
        "client",
        "counted",
        "limits",
        "lingering",
        "listener",
        "local",
        "loop",
        "parser",
        "pipeline",
        "read_paused",
        "reading",
        "server",
        "tasks",
        "tls",
        "transport",
        "write_paused",
    )

    def __init__(self, server: Server, listener: _Listener) -> None:
        self.server = server
        self.listener = listener
        self.app = server.app
        self.limits = server.limits
        self.loop = server.loop
        self.tasks = server.tasks
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.client: tuple[str, int] | None = None
        self.local: tuple[str, int] | None = None
        #: ASGI's `tls` extension when the client sent a certificate (read once per connection)
        self.tls: dict[str, Any] | None = None
        self.counted = False
        #: the request being answered; the requests parsed behind it (pipelining)
        self.active: _Cycle | None = None
        self.pipeline: deque[_Cycle] = deque()
        #: the last request whose head was parsed (its body goes to it)
        self.reading: _Cycle | None = None
        self.lingering = False
        #: nothing more is parsed on this connection (a bad request, an ignored upgrade)
        self.broken = False
        self.read_paused = False
        self.write_paused = False
        self._drain_waiter: asyncio.Future[None] | None = None
        self._head_timer: asyncio.TimerHandle | None = None
        self._idle_timer: asyncio.TimerHandle | None = None
        self._idle_at = 0.0
        self._write_timer: asyncio.TimerHandle | None = None
        self._linger_timer: asyncio.TimerHandle | None = None
        self._write_backlog = 0
        #: between a request's first byte and its last (when closing means losing input)
        self._mid_request = False
        #: before the end of the current head (request line and headers)
        self._in_head = True
        #: bytes received while in a head (catches a head that never ends)
        self._head_bytes = 0
        #: bytes the current head's URL and headers may still take, as the parser reports them
        self._max_head = self.limits.max_header_bytes
        self._head_left = self._max_head
        # the request being parsed
        self._url = b""
        self._headers: list[tuple[bytes, bytes]] = []
        #: the Host field lines of the request being parsed
        self._hosts = 0
        self._host = b""
        self._content_length: int | None = None
        self._chunked = False
        #: the Transfer-Encoding values, joined (checked by on_headers_complete)
        self._codings: bytes | None = None
        self._expect = False
        #: an upgrade request with a body, answered 400 instead of being started
        self._upgrade_body = False

    # --- the connection ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)
        listener = self.listener
        if listener.open >= self.limits.max_connections:
            self._refuse(transport)
            return
        listener.open += 1
        self.counted = True
        self.server.connections.add(self)
        sock = transport.get_extra_info("socket")
        if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        peer = transport.get_extra_info("peername")
        if isinstance(peer, tuple | list) and len(peer) >= 2:
            self.client = (str(peer[0]), int(peer[1]))
        local = transport.get_extra_info("sockname")
        if isinstance(local, tuple | list) and len(local) >= 2:
            self.local = (str(local[0]), int(local[1]))
        if self.listener.scheme == "https":
            ssl_object = transport.get_extra_info("ssl_object")
            der = ssl_object.getpeercert(True) if ssl_object is not None else None
            if der:
                # the leaf only: Python (before 3.13) gives no access to the rest of the chain
                self.tls = {"client_cert_chain": [ssl.DER_cert_to_PEM_cert(der)]}
        self._head_timer = self.loop.call_later(self.limits.header_timeout, self._head_timed_out)

    def _refuse(self, transport: asyncio.Transport) -> None:
        listener = self.listener
        count = listener.open
        now = time.monotonic()
        if now - listener.warned >= _WARN_EVERY:
            listener.warned = now
            where = listener.where
            log.warning(
                "%d connections open on %s: refusing new ones (--max-connections)",
                count,
                ":".join(map(str, where)) if isinstance(where, tuple) else where or "?",
            )
        self.broken = True
        transport.write(
            _response(
                self.server.error_body,
                503,
                f"too many connections to this gateway ({count}); retry later",
                "too_many_connections",
            )
        )
        transport.close()  # nothing read: nothing to linger for, and the fd is needed now

    def connection_lost(self, exc: Exception | None) -> None:
        for timer in (self._head_timer, self._idle_timer, self._write_timer, self._linger_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._idle_timer = self._write_timer = self._linger_timer = None
        if self.counted:
            self.counted = False
            self.listener.open -= 1
            self.server.connections.discard(self)
        self.pipeline.clear()
        active = self.active
        if active is not None:
            self.active = None
            active.disconnected = True
            active.wake()
        waiter = self._drain_waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)
        self.reading = None

    def writable(self) -> bool:
        transport = self.transport
        return transport is not None and not transport.is_closing() and not self.lingering

    def close(self) -> None:
        """Close, lingering when the client's request is not entirely read (see the module's
        doc)."""
        transport = self.transport
        if transport is None or transport.is_closing() or self.lingering:
            return
        unread = self._mid_request or self.pipeline
        if not unread or not transport.can_write_eof():
            transport.close()
            return
        self.lingering = True
        self.pipeline.clear()
        for timer in (self._head_timer, self._idle_timer):
            if timer is not None:
                timer.cancel()
        self._head_timer = self._idle_timer = None
        transport.write_eof()  # the answer, then a FIN
        with contextlib.suppress(Exception):
            transport.resume_reading()  # to drop what comes, also when reading was paused
        self.read_paused = False
        self._linger_timer = self.loop.call_later(LINGER, transport.close)

    def _reject(self, status: int, message: str, code: str) -> None:
        """Answer the request being parsed with an error, and close."""
        if not self.writable():
            return
        active = self.active
        if active is not None:
            if active is not self.reading or active.body_done or active.started:
                # a later (pipelined) request is bad while this one is answered: parse no
                # more, and close once that answer is complete
                self.broken = True
                self._mid_request = True
                active.keep_alive = False
                self.pipeline.clear()
                return
            # the request whose body the app reads is bad: to the app, the client left
            active.disconnected = True
            active.wake()
            self.active = None
        self.broken = True
        self.transport.write(  # type: ignore[union-attr]
            _response(self.server.error_body, status, message, code)
        )
        self.close()

    def shutdown(self) -> None:
        """The server stops: close now when idle, else after the answer in progress."""
        active = self.active
        if active is None:  # idle, or in the middle of a head
            transport = self.transport
            if transport is not None and not self.lingering:
                transport.close()
                # over TLS, close() sends close_notify and waits for the client's (up to
                # 30 s): a client that keeps its idle connection without reading would hold
                # the whole stop for GRACEFUL_TIMEOUT; a second is enough for a reply
                self.loop.call_later(CLOSE_NOTIFY_WAIT, self._drop)
            return
        active.keep_alive = False
        for cycle in self.pipeline:
            cycle.keep_alive = False

    def _drop(self) -> None:
        if self.transport is not None and self in self.server.connections:
            self.transport.abort()

    def abort(self) -> None:
        """The graceful stop's time is up: close, and stop the app's task."""
        active = self.active
        transport = self.transport
        if transport is not None:
            transport.abort()
        if active is not None:
            active.task.cancel()

    # --- reading ---------------------------------------------------------------------------

    def data_received(self, data: bytes) -> None:
        if self.lingering or self.broken:
            return  # dropped: the connection closes once its last answer is sent
        if self._in_head:
            self._head_bytes += len(data)
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._ignore_upgrade()
            return
        except httptools.HttpParserError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._head_too_large()
                return
            bad = exc.__context__
            if isinstance(bad, _BadHead):
                log.debug("bad request head from %s: %s", self.client, bad)
                self._reject(bad.status, str(bad), bad.code)
                return
            log.debug("invalid HTTP request from %s: %s", self.client, exc)
            what = (
                "request target"
                if isinstance(exc, httptools.HttpParserInvalidURLError)
                else "HTTP request"
            )
            self._reject(400, f"invalid {what}: {exc}", "invalid_request")
            return
        if self._in_head:
            if self._head_bytes > self.limits.max_header_bytes:
                self._head_too_large()
            elif self._mid_request and self._head_timer is None:
                # a head begun and not finished: its time runs from now
                self._head_timer = self.loop.call_later(
                    self.limits.header_timeout, self._head_timed_out
                )

    def _head_too_large(self) -> None:
        self._reject(
            431,
            f"request line and headers over {self.limits.max_header_bytes} bytes",
            "request_header_too_large",
        )

    def _ignore_upgrade(self) -> None:
        """An Upgrade (or CONNECT) request: httptools stops parsing after its head, as if
        another protocol followed, and would parse what comes next as new requests. We speak
        none: the request is answered as plain HTTP (one with a body, whose body httptools
        skipped, is refused), nothing after it is parsed, and the connection closes."""
        self.broken = True
        self._mid_request = True  # unread input may follow: linger when closing
        if self._upgrade_body:
            self._upgrade_body = False
            self._reject(
                400,
                "an Upgrade request with a body: this server speaks HTTP/1.1 only",
                "invalid_request",
            )
            return
        last = self.reading
        if last is not None and not last.complete:
            last.keep_alive = False  # answered, then closed
        else:
            self.close()

    # httptools' callbacks

    def on_message_begin(self) -> None:
        self._mid_request = True
        self._head_left = self._max_head
        self._url = b""
        self._headers = []
        self._hosts = 0
        self._content_length = None
        self._chunked = False
        self._codings = None
        self._expect = False

    def on_url(self, url: bytes) -> None:
        self._head_left -= len(url)
        if self._head_left < 0:
            raise _HeadTooLarge  # the parser stops; data_received answers 431
        self._url += url

    def on_header(self, name: bytes, value: bytes) -> None:
        if not self._in_head:
            return  # a trailer after a chunked body, dropped
        self._head_left -= len(name) + len(value) + 4
        if self._head_left < 0:
            raise _HeadTooLarge
        name = name.lower()
        if value and value[-1] in _OWS:  # llhttp drops leading whitespace, not trailing
            value = value.rstrip(b" \t")
        self._headers.append((name, value))
        if len(name) in _REQUEST_SPECIAL_LENGTHS:
            if name == b"host":
                self._hosts += 1
                self._host = value
            elif name == b"content-length":
                self._content_length = int(value)  # the parser accepts digits only, and one
            elif name == b"transfer-encoding":
                codings = self._codings
                self._codings = value if codings is None else codings + b", " + value
                self._chunked = True
            elif name == b"expect" and value.lower() == b"100-continue":
                self._expect = True

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._head_bytes = 0
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        parser = self.parser
        if parser.should_upgrade() and (self._chunked or self._content_length):
            self._upgrade_body = True  # httptools will not parse its body: never started
            self.reading = None
            return
        raw_method = parser.get_method()
        method = _METHODS.get(raw_method) or raw_method.decode("ascii")
        version = parser.get_http_version()
        headers = self._headers
        codings = self._codings
        if codings is not None and codings.lower() != b"chunked":
            _refuse_codings(codings)
        try:
            if self._hosts != 1:
                if self._hosts > 1:
                    raise TargetError("more than one Host header")
                if version != "1.0":
                    raise TargetError("an HTTP/1.1 request without a Host header")
            else:
                host = self._host
                if not valid_host(host):
                    shown = host[:100].decode("latin-1")
                    raise TargetError(f"invalid Host header {shown!r}: expected host[:port]")
            url = self._url
            if url[0] == 47 and b"#" not in url:  # "/...": the usual case, parsed inline
                mark = url.find(b"?")
                raw_path, query = (url, b"") if mark < 0 else (url[:mark], url[mark + 1 :])
            else:
                authority, raw_path, query = split_target(url)
                if authority is not None:  # it replaces Host (RFC 9112 3.2.2)
                    headers = [(n, v) for n, v in headers if n != b"host"]
                    headers.append((b"host", authority))
                elif method != "OPTIONS":  # "*"
                    raise TargetError(f"the request target '*' is only for OPTIONS, not {method}")
            if raw_path != b"*":
                raw_path = normalize_path(raw_path)
        except TargetError as exc:
            raise _BadHead(str(exc)) from None
        path = raw_path.decode("ascii")
        scope: dict[str, Any] = {
            "type": "http",
            "asgi": _ASGI,
            "http_version": version,
            "server": self.local,
            "client": self.client,
            "scheme": self.listener.scheme,
            "method": method,
            "root_path": "",
            "path": path,
            "raw_path": raw_path,
            "query_string": query,
            "headers": headers,
        }
        if self.tls is not None:
            scope["extensions"] = {"tls": self.tls}
        cycle = _Cycle(
            self,
            scope,
            None if self._chunked else self._content_length,
            parser.should_keep_alive(),
            self._expect and version == "1.1",
            method == "HEAD",
        )
        self.reading = cycle
        if self.active is None:
            self._run(cycle)
        else:
            # pipelined: answered after the one before; read no more meanwhile
            self.pipeline.append(cycle)
            if not self.read_paused:
                self.read_paused = True
                self.transport.pause_reading()  # type: ignore[union-attr]

    def on_body(self, body: bytes) -> None:
        cycle = self.reading
        if cycle is None:
            return
        if cycle.chunks is None:
            cycle.chunks = [body]
        else:
            cycle.chunks.append(body)
        cycle.buffered += len(body)
        if cycle.waiter is not None:
            cycle.wake()
        if cycle.buffered > READ_HIGH_WATER and not self.read_paused:
            self.read_paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def on_message_complete(self) -> None:
        self._mid_request = False
        self._in_head = True
        if self._upgrade_body:
            return
        cycle = self.reading
        if cycle is not None:
            cycle.body_done = True
            if cycle.waiter is not None:
                cycle.wake()

    def resume_for_body(self) -> None:
        """The app wants more of the body: read again, unless a pipelined request waits."""
        if self.read_paused and not self.pipeline and not self.lingering:
            self.read_paused = False
            transport = self.transport
            if transport is not None:
                transport.resume_reading()

    # --- answering -------------------------------------------------------------------------

    def _run(self, cycle: _Cycle) -> None:
        """Start answering `cycle`: its task is held in `Server.tasks` until it ends."""
        self.active = cycle
        cycle.task = task = _Task(self._run_app(cycle), loop=self.loop, name=_TASK_NAME)
        self.tasks.add(task)

    async def _run_app(self, cycle: _Cycle) -> None:
        """The app on `cycle`; nothing it raises escapes (see the module's docstring)."""
        try:
            if cycle.scope["path"] == "*":
                await _options_asterisk(cycle.send)
            else:
                await self.app(cycle.scope, cycle, cycle.send)
        except RequestAborted:
            if not cycle.complete:
                self.cycle_ended(cycle, close=True)
        except asyncio.CancelledError:
            if not cycle.complete:
                self.cycle_ended(cycle, close=True)
            raise
        except Exception:
            scope = cycle.scope
            log.exception("error in the ASGI app on %s %s", scope["method"], scope["path"])
            self._failed(cycle)
        else:
            if not cycle.complete and not cycle.disconnected:
                log.error(
                    "the ASGI app returned without %s the response to %s %s",
                    "completing" if cycle.started else "starting",
                    cycle.scope["method"],
                    cycle.scope["path"],
                )
                self._failed(cycle)
        finally:  # the task's last step: no done callback (one more loop turn) is needed
            self.tasks.discard(cycle.task)

    def _failed(self, cycle: _Cycle) -> None:
        if cycle.complete or cycle.disconnected:
            return
        if cycle.started:
            cycle.complete = True
            self.cycle_ended(cycle, close=True)  # a half-sent answer: nothing else to do
            return
        cycle.started = cycle.complete = True
        if self.writable():
            self.transport.write(  # type: ignore[union-attr]
                _response(self.server.error_body, 500, "internal gateway error", "internal_error")
            )
        self.cycle_ended(cycle, close=True)

    def cycle_ended(self, cycle: _Cycle, close: bool) -> None:
        """`cycle`'s answer is complete (or abandoned): close, or go on with the next."""
        if self.active is not cycle:
            if close:
                self.close()
            return
        self.active = None
        if close:
            self.close()
            return
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        if self.pipeline:
            self._run(self.pipeline.popleft())
            if not self.pipeline and self.read_paused and not self.broken:
                self.read_paused = False
                transport.resume_reading()
            return
        if self.broken or self.server.stopping:
            self.close()
            return
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()
        self._idle_at = self.loop.time() + KEEP_ALIVE
        if self._idle_timer is None:
            self._idle_timer = self.loop.call_later(KEEP_ALIVE, self._idle_check)

    # --- timers ----------------------------------------------------------------------------

    def _idle_check(self) -> None:
        """The keep-alive timeout: armed once, pushed back by each answer (no timer per
        request)."""
        self._idle_timer = None
        if not self.writable() or self.active is not None or self._mid_request:
            return  # busy: the next answer arms it again (a head has its own timer)
        left = self._idle_at - self.loop.time()
        if left > 0:
            self._idle_timer = self.loop.call_later(left, self._idle_check)
            return
        self.transport.close()  # type: ignore[union-attr]

    def _head_timed_out(self) -> None:
        self._head_timer = None
        if not self.writable():
            return
        if self.active is not None:
            # the next request's head waits behind an answer still being sent: its time
            # starts again (that answer has its own bounds)
            self._head_timer = self.loop.call_later(
                self.limits.header_timeout, self._head_timed_out
            )
            return
        if not self._mid_request:
            self.close()  # not a byte of a request: nobody to tell
            return
        self._reject(
            408,
            f"request headers not received within {self.limits.header_timeout:g}s",
            "request_timeout",
        )

    def pause_writing(self) -> None:
        self.write_paused = True
        self._arm_write_timer()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self._write_timer is not None:
            self._write_timer.cancel()
            self._write_timer = None
        waiter = self._drain_waiter
        if waiter is not None:
            self._drain_waiter = None
            if not waiter.done():
                waiter.set_result(None)

    async def drain(self) -> None:
        """Until the client took enough of what waits for it (or left)."""
        if self.transport is None or self.transport.is_closing():
            return
        waiter = self._drain_waiter
        if waiter is None:
            self._drain_waiter = waiter = self.loop.create_future()
        await waiter

    def _arm_write_timer(self) -> None:
        if self._write_timer is None and self.transport is not None:
            self._write_backlog = self._unsent()
            self._write_timer = self.loop.call_later(
                self.limits.body_timeout, self._write_timed_out
            )

    def _unsent(self) -> int:
        """Bytes of answers the client has not taken: in our buffer, and in the kernel's
        send queue (which can hold megabytes: while it drains, our buffer does not move)."""
        transport = self.transport
        if transport is None:
            return 0
        size = transport.get_write_buffer_size()
        if _SIOCOUTQ is not None:
            sock = transport.get_extra_info("socket")
            if sock is not None:
                with contextlib.suppress(OSError, ValueError):
                    queued = fcntl.ioctl(sock.fileno(), _SIOCOUTQ, b"\0\0\0\0")
                    size += int.from_bytes(queued, sys.byteorder, signed=True)
        return size

    def _write_timed_out(self) -> None:
        self._write_timer = None
        transport = self.transport
        if transport is None or not self.counted:
            return
        if self._unsent() < self._write_backlog:
            self._arm_write_timer()  # slow, but reading
            return
        log.debug("%s read nothing for %gs: aborted", self.client, self.limits.body_timeout)
        transport.abort()


def _refuse_codings(codings: bytes) -> None:
    """Transfer-Encoding other than "chunked" alone. llhttp checks it only after
    on_headers_complete, and takes a list ending in chunked ("gzip, chunked"), whose other
    codings nobody would decode: RFC 9112 6.3 wants a 400 when chunked is not last (or
    comes twice: the length cannot be known), 6.1 a 501 for a coding not understood."""
    names = [c.strip().lower() for c in codings.split(b",")]
    shown = codings[:60].decode("latin-1")
    if names[-1] != b"chunked" or names.count(b"chunked") > 1:
        raise _BadHead(f"invalid Transfer-Encoding {shown!r}: 'chunked' must come last, once")
    raise _BadHead(
        f"Transfer-Encoding {shown!r} is not supported: only 'chunked'",
        501,
        "unsupported_transfer_encoding",
    )


async def _options_asterisk(send: Any) -> None:
    """`OPTIONS *`: about the server itself, answered here (never routed nor forwarded)."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [(b"allow", ALLOWED_METHODS), (b"content-length", b"0")],
        }
    )
    await send({"type": "http.response.body", "body": b""})


# --- the server ----------------------------------------------------------------------------


class _Lifespan:
    """The app's lifespan protocol: startup before serving, shutdown after."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.messages: asyncio.Queue[Message] = asyncio.Queue()
        self.started = asyncio.Event()
        self.stopped = asyncio.Event()
        self.failed: str | None = None
        self.supported = True
        self.task: asyncio.Task[None] | None = None

    async def startup(self) -> bool:
        self.task = asyncio.get_running_loop().create_task(self._main())
        await self.messages.put({"type": "lifespan.startup"})
        await self.started.wait()
        return self.failed is None

    async def shutdown(self, timeout: float = GRACEFUL_TIMEOUT) -> None:
        if not self.supported or self.task is None or self.task.done():
            return
        await self.messages.put({"type": "lifespan.shutdown"})
        try:
            await asyncio.wait_for(self.stopped.wait(), timeout)
        except TimeoutError:
            log.warning("the app's shutdown did not end within %gs", timeout)
            self.task.cancel()
        if self.failed is not None:
            log.error("the app's shutdown failed: %s", self.failed)

    async def _main(self) -> None:
        scope = {"type": "lifespan", "asgi": {"version": "3.0", "spec_version": "2.0"}}
        try:
            await self.app(scope, self.messages.get, self._send)
        except BaseException as exc:
            if isinstance(exc, asyncio.CancelledError):
                raise
            if not self.started.is_set():
                log.exception("the app's startup failed")
                self.failed = f"{type(exc).__name__}: {exc}"
            else:
                log.exception("error in the app's lifespan")
        finally:
            if not self.started.is_set():
                self.supported = False  # returned (or failed) before its startup
            self.started.set()
            self.stopped.set()

    async def _send(self, message: Message) -> None:
        kind = message["type"]
        if kind == "lifespan.startup.complete":
            self.started.set()
        elif kind == "lifespan.startup.failed":
            self.failed = message.get("message") or "startup failed"
            self.started.set()
        elif kind == "lifespan.shutdown.complete":
            self.stopped.set()
        elif kind == "lifespan.shutdown.failed":
            self.failed = message.get("message") or "shutdown failed"
            self.stopped.set()


class Server:
    """Serves `app` (ASGI 3) on listening sockets: `await Server(app, limits).serve(socks)`.

    `started` is set once every socket accepts; setting `should_exit` (from the event loop's
    thread) stops it gracefully: no more connections, idle ones closed, the requests in
    flight given `GRACEFUL_TIMEOUT` seconds, then the app's lifespan shutdown. On the main
    thread SIGINT and SIGTERM set `should_exit` while `serve` runs (a second one cuts the
    wait short); the previous handlers are put back when it returns."""

    def __init__(
        self,
        app: ASGIApp,
        limits: ConnectionLimits | None = None,
        error_body: ErrorBody = plain_error_body,
    ) -> None:
        self.app = app
        self.limits = limits or ConnectionLimits()
        #: the body of every answer the server gives itself (see the module's docstring)
        self.error_body = error_body
        self.started = False
        self.should_exit = False
        self.force_exit = False
        #: set once `serve` stops accepting: connections close after their answer
        self.stopping = False
        self.connections: set[HttpProtocol] = set()
        #: the app's task of every request until it ends, also after its answer (the event
        #: loop holds only weak references to tasks): a graceful stop waits for them
        self.tasks: set[asyncio.Task[None]] = set()
        self.date = _date_line()
        self.loop: asyncio.AbstractEventLoop = None  # type: ignore[assignment]
        self._servers: list[asyncio.AbstractServer] = []
        #: called when a stop begins, before waiting for the requests in flight: how an app
        #: ends answers that would otherwise last (watches, long polls) at once
        self.on_stop: list[Callable[[], None]] = []

    async def serve(
        self,
        sockets: list[socket.socket],
        tls: Mapping[socket.socket, ssl.SSLContext] | None = None,
    ) -> None:
        """Serve until told to stop; a socket in `tls` serves TLS with its context (the
        handshake is asyncio's, before a byte reaches the parser), the others plain HTTP."""
        self.loop = loop = asyncio.get_running_loop()
        signals = self._catch_signals(loop)
        try:
            lifespan = _Lifespan(self.app)
            if not await lifespan.startup():
                raise RuntimeError(f"the app's startup failed: {lifespan.failed}")
            try:
                if not self.should_exit:
                    await self._listen(loop, sockets, tls or {})
                    self.started = True
                    await self._wait_for_exit()
                await self._stop(loop)
            finally:
                await lifespan.shutdown()
        finally:
            self._restore_signals(loop, signals)

    async def _listen(
        self,
        loop: asyncio.AbstractEventLoop,
        sockets: list[socket.socket],
        tls: Mapping[socket.socket, ssl.SSLContext],
    ) -> None:
        for sock in sockets:
            try:
                where: Any = sock.getsockname()
            except OSError:  # pragma: no cover
                where = None
            if isinstance(where, tuple):
                where = where[:2]
            context = tls.get(sock)
            listener = _Listener(where, "https" if context is not None else "http")
            factory: Callable[[], asyncio.Protocol] = functools.partial(
                HttpProtocol, self, listener
            )
            if context is not None:  # the first byte decides: TLS, or a 400 (http/tlsport.py)
                factory = functools.partial(
                    TlsPort, factory, context, self.limits.header_timeout, self._plain_answer
                )
            if sock.family == getattr(socket, "AF_UNIX", None):
                server = await loop.create_unix_server(factory, sock=sock, backlog=2048)
            else:
                server = await loop.create_server(factory, sock=sock, backlog=2048)
            self._servers.append(server)

    @functools.cached_property
    def _plain_answer(self) -> bytes:
        return _response(
            self.error_body,
            400,
            "this port speaks HTTPS, and the request was plain HTTP: send it with https://",
            "plain_http_on_https_port",
        )

    async def _wait_for_exit(self) -> None:
        last = int(time.time())
        while not self.should_exit:
            await asyncio.sleep(0.1)
            now = int(time.time())
            if now != last:
                last = now
                self.date = _date_line(now)

    async def _stop(self, loop: asyncio.AbstractEventLoop) -> None:
        self.stopping = True
        for hook in self.on_stop:
            try:
                hook()
            except Exception:
                log.exception("a stop hook failed")
        for server in self._servers:
            server.close()
        self._servers.clear()
        for conn in list(self.connections):
            conn.shutdown()
        deadline = loop.time() + GRACEFUL_TIMEOUT
        while self.connections and not self.force_exit and loop.time() < deadline:
            await asyncio.sleep(0.05)
        if self.connections:
            log.warning(
                "%d connections still busy after %gs: closed",
                len(self.connections),
                GRACEFUL_TIMEOUT,
            )
        for conn in list(self.connections):
            conn.abort()
        # the apps' tasks (also those that answered and still finish their work) end before
        # the lifespan shutdown closes what they use: given a second, then cancelled
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=1.0)
        if self.tasks:
            left = list(self.tasks)
            log.warning(
                "%d requests still running after their connection closed: cancelled", len(left)
            )
            for task in left:
                task.cancel()
            await asyncio.wait(left, timeout=1.0)

    def _signal(self) -> None:
        if self.should_exit:
            self.force_exit = True
        self.should_exit = True

    def _catch_signals(self, loop: asyncio.AbstractEventLoop) -> list[tuple[int, Any]]:
        if threading.current_thread() is not threading.main_thread():
            return []
        caught: list[tuple[int, Any]] = []
        for sig in (signal.SIGINT, signal.SIGTERM):
            previous = signal.getsignal(sig)
            try:
                loop.add_signal_handler(sig, self._signal)
            except (NotImplementedError, RuntimeError, ValueError):  # pragma: no cover
                continue
            caught.append((sig, previous))
        return caught

    @staticmethod
    def _restore_signals(loop: asyncio.AbstractEventLoop, caught: list[tuple[int, Any]]) -> None:
        for sig, previous in caught:
            with contextlib.suppress(Exception):
                loop.remove_signal_handler(sig)
            with contextlib.suppress(Exception):
                signal.signal(sig, previous if previous is not None else signal.SIG_DFL)


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
