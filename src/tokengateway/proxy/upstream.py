"""The upstream client: HTTP/1.1 on asyncio protocols, parsed by httptools (llhttp).

A general client (aiohttp's was measured at 40-50 us of CPU per proxied request) does much
this gateway never needs: cookies, redirects, decompression, multipart, tracing hooks. This
one sends a request head built with one join, parses the answer with llhttp in C, and hands
the body on as it arrives; it costs a fraction of that. Foreign exceptions are translated
here, once, into `UpstreamError` with a kind the gateway maps to 502 or 504.

Three timeouts, each settable per backend (`Timeouts`): connecting (TCP and TLS), the first
byte of the answer (its status line and headers: for a non-streamed completion, the whole
generation) and the silence between two chunks of the body. The route's `timeouts.request`
bounds the whole exchange on top. One timer per exchange enforces all of them: it is moved
lazily (when it fires it re-arms itself at the deadline now in force) rather than replaced
at every chunk.

Connections are kept alive in a pool per (scheme, host, port), most recently used first,
without a limit on how many are open at once; one idle for `keepalive` seconds (30) is
closed. A connection returns to the pool only when its answer has been parsed to the end,
the server did not ask to close it (`Connection: close`, HTTP/1.0 without keep-alive, a body
delimited by the close) and the exchange was not cut short (a failure, a timeout, `close()`,
a cancelled request, an answer that came before the request was written, a HEAD request).
One that the server closed while it sat in the pool is dropped, never used.

A request sent on a *reused* connection that fails before any byte of the answer arrived,
because the server had closed that connection (its keep-alive timeout raced our request),
is sent once more on a new connection. That is safe enough even for a POST: a server that
closes an idle keep-alive connection has not read a request from it, and nothing was
answered. A failure on a new connection, or after any byte of the answer, is never retried.

Flow control: reading pauses while more than `READ_HIGH` bytes of the body wait for the
reader, and resumes when it takes them; a large request body is written in slices, waiting
whenever the transport asks us to pause.

What differs from aiohttp, knowingly: an answer to HEAD closes its connection (llhttp cannot
be told that such an answer has no body); a chunk encoding that breaks after the headers is
reported at once (aiohttp waited for the idle timeout); bytes after the end of an answer
close the connection; the route's timeout ending during the body says so (aiohttp called
it a silence); header text goes out as Latin-1, the client's own bytes (aiohttp re-encoded
them UTF-8), and only text beyond Latin-1 as UTF-8. As with aiohttp: no User-Agent, Accept,
Accept-Encoding or Content-Type of our own, no redirects, no decompression, no cookies.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import socket
import ssl
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from urllib.parse import quote, unquote

import httptools

__all__ = ["DEFAULT_TIMEOUTS", "Timeouts", "Upstream", "UpstreamError", "UpstreamResponse"]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; None waits forever."""

    connect: float | None = 10.0
    first_byte: float | None = 600.0
    idle: float | None = 300.0  # between two chunks of the body


DEFAULT_TIMEOUTS = Timeouts()

#: Never forwarded in either direction (RFC 9110 section 7.6.1) or recomputed by us.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "accept-encoding",
    }
)

#: Not passed back to the client: the gateway's server writes its own.
_RESPONSE_OWN = frozenset({"date"})

#: Response header names (lower-case bytes) left out of `UpstreamResponse.headers`.
_DROPPED = frozenset(name.encode() for name in HOP_BY_HOP | _RESPONSE_OWN)

#: Unread body bytes at which reading from the upstream pauses until the reader catches up.
READ_HIGH = 256 * 1024
#: A request body up to this size goes out in the same write as the head.
_JOIN_BODY = 64 * 1024
#: A larger body is written in slices of this size, waiting while the transport is full.
_WRITE_SLICE = 256 * 1024
#: The most an answer's status line and headers (1xx answers included) may take.
MAX_HEAD = 1024 * 1024
#: URLs whose origin and target are remembered (then forgotten all at once).
_URLS_KEPT = 4096
#: Methods whose empty body gets no Content-Length (as aiohttp).
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "CONNECT", "TRACE"})
_INF = float("inf")

_INCOMPLETE = "upstream closed the connection before the response was complete"
_CLOSED = "upstream answer broken: Connection closed"

#: Anything a request target may not carry as it is: outside RFC 3986's characters, or a
#: `%` that does not start an escape.
_UNSAFE_TARGET = re.compile(r"[^A-Za-z0-9\-._~!$&'()*+,;=:@/?%]|%(?![0-9A-Fa-f]{2})")
_LONE_PERCENT = re.compile(r"%(?![0-9A-Fa-f]{2})")


class UpstreamError(Exception):
    """`kind` is "unreachable" (502), "timeout" (504) or "broken" (502 / stream error)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class UpstreamResponse:
    """One exchange: the status and headers of the answer, and its body as it arrives.

    `headers` are lower-cased, in arrival order, repeats kept, without hop-by-hop ones and
    `date`. `content_type` is the media type alone, lower-case ("application/octet-stream"
    when there is none, as aiohttp). Made directly (a fake, in tests and benchmarks), the
    response is complete and `body` is all it reads.
    """

    __slots__ = (
        "_all",
        "_buf",
        "_conn",
        "_deadline",
        "_error",
        "_first_byte",
        "_label",
        "_limits",
        "_loop",
        "_since",
        "_size",
        "_stage",
        "_stale",
        "_timeout",
        "_timer",
        "_timer_at",
        "_waiter",
        "_waiting",
        "content_type",
        "headers",
        "idle",
        "status",
    )

    def __init__(
        self,
        status: int = 0,
        headers: list[tuple[bytes, bytes]] | None = None,
        content_type: str = "",
        body: bytes | None = b"",
        idle: float | None = None,
    ) -> None:
        self.status = status
        self.headers: list[tuple[bytes, bytes]] = [] if headers is None else headers
        self.content_type = content_type
        self.idle = idle  # the longest silence allowed between two chunks
        self._buf: list[bytes] = [body] if body else []
        self._size = len(body) if body else 0
        # 0: waiting for the head; 1: the body is coming; 2: over (complete, or `_error`)
        self._stage = 2 if body is not None else 0
        self._error: UpstreamError | None = None
        self._stale = False  # failed on a reused connection before any byte: may be retried
        self._conn: _Conn | None = None
        self._waiter: asyncio.Future[None] | None = None
        self._waiting = False  # the reader waits for body bytes (the idle timeout runs)
        self._all = False  # read(): the reader takes the whole body, no wake-up per chunk
        self._since = 0.0  # when the current silence began
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _INF
        self._deadline = _INF  # the route's timeout
        self._first_byte = _INF
        self._timeout: float | None = None
        self._limits = DEFAULT_TIMEOUTS
        self._label = ""
        self._loop: asyncio.AbstractEventLoop | None = None

    # --- the reader's side ------------------------------------------------------------------

    async def read(self) -> bytes:
        """The whole body (the same timeouts and errors as `chunks`)."""
        if self._stage != 2:
            self._all = True
            conn = self._conn
            if conn is not None and conn.paused:
                conn.resume()
            while self._stage != 2:
                await self._wait_body()
        if self._error is not None:
            raise self._error
        buf = self._buf
        data = buf[0] if len(buf) == 1 else b"".join(buf)
        buf.clear()
        self._size = 0
        return data

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (all that is buffered, at each step); `idle` bounds the
        silence before each chunk. Left unfinished, the exchange is aborted when this
        iterator is closed or collected."""
        buf = self._buf
        try:
            while True:
                if buf:
                    data = buf[0] if len(buf) == 1 else b"".join(buf)
                    buf.clear()
                    self._size = 0
                    conn = self._conn
                    if conn is not None and conn.paused:
                        conn.resume()
                    yield data
                elif self._stage == 2:
                    if self._error is not None:
                        raise self._error
                    return
                else:
                    await self._wait_body()
        finally:
            if self._stage != 2:
                self._fail(UpstreamError("broken", _CLOSED))

    def close(self) -> None:
        """Abort the exchange now (the client went away): the connection is closed, a read
        in progress ends with an error. Nothing to do once the answer is complete."""
        if self._stage != 2:
            self._buf.clear()
            self._size = 0
            self._fail(UpstreamError("broken", _CLOSED))

    async def _wait_body(self) -> None:
        idle = self.idle
        loop = self._loop
        assert loop is not None
        if idle is not None:
            now = loop.time()
            self._since = now
            at = now + idle
            if at < self._timer_at:
                self._arm(min(at, self._deadline))
        self._waiting = True
        waiter = self._waiter = loop.create_future()
        try:
            await waiter
        except asyncio.CancelledError:
            self._fail(UpstreamError("broken", _CLOSED))
            raise
        finally:
            self._waiting = False

    # --- the exchange's machinery -----------------------------------------------------------

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _arm(self, at: float) -> None:
        """Have the timer fire at `at` at the latest (an earlier one is left alone)."""
        timer = self._timer
        if timer is not None:
            if self._timer_at <= at:
                return
            timer.cancel()
        if at == _INF:
            self._timer = None
            self._timer_at = _INF
            return
        assert self._loop is not None
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = _INF
        if self._stage == 2:
            return
        assert self._loop is not None
        now = self._loop.time()
        deadline = self._deadline
        if self._stage == 0:
            first_byte = self._first_byte
            if now >= min(first_byte, deadline):
                if first_byte < deadline:
                    self._fail(UpstreamError("timeout", self._no_answer()))
                else:
                    self._fail(UpstreamError("timeout", self._route_timeout()))
            else:
                self._arm(min(first_byte, deadline))
            return
        if now >= deadline:
            self._fail(UpstreamError("timeout", self._route_timeout()))
            return
        at = deadline
        idle = self.idle
        if self._waiting and idle is not None:
            quiet_until = self._since + idle
            if now >= quiet_until:
                self._fail(UpstreamError("timeout", f"upstream sent nothing for {idle:g}s"))
                return
            at = min(at, quiet_until)
        self._arm(at)

    def _no_answer(self) -> str:
        return f"upstream {self._label} sent no answer within {self._limits.first_byte:g}s"

    def _route_timeout(self) -> str:
        return f"upstream {self._label} timed out (route timeout {self._timeout:g}s)"

    def _fail(self, error: UpstreamError) -> None:
        """End the exchange with `error`: its connection is aborted, never pooled."""
        if self._stage == 2:
            return
        self._stage = 2
        self._error = error
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
            self._timer_at = _INF
        conn = self._conn
        if conn is not None:
            self._conn = None
            conn.resp = None
            conn.abort()
        self._wake()

    def _complete(self) -> None:
        """The answer was parsed to its end (the connection is released by its owner)."""
        self._stage = 2
        self._conn = None
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
            self._timer_at = _INF
        self._wake()


class _Origin:
    """Where requests go: one per scheme://authority, with its idle connections."""

    __slots__ = ("auth", "host", "host_header", "idle", "label", "port", "ssl")

    def __init__(self, text: str, ssl_context: ssl.SSLContext | None) -> None:
        scheme, _, authority = text.partition("://")
        scheme = scheme.lower()
        if scheme not in ("http", "https") or not authority:
            raise ValueError(f"not an http:// or https:// URL: {text!r}")
        userinfo, at, hostport = authority.rpartition("@")
        self.auth: str | None = None
        if at:
            user, _, password = userinfo.partition(":")
            token = base64.b64encode(f"{unquote(user)}:{unquote(password)}".encode()).decode()
            self.auth = "Basic " + token
        default = 443 if scheme == "https" else 80
        if hostport.startswith("["):  # an IPv6 literal
            end = hostport.find("]")
            host, rest = hostport[1:end], hostport[end + 1 :]
            port = int(rest[1:]) if rest.startswith(":") and rest[1:] else default
            shown = f"[{host.lower()}]"
        else:
            host, colon, digits = hostport.partition(":")
            port = int(digits) if colon and digits else default
            shown = host.lower()
        if not host:
            raise ValueError(f"no host in {text!r}")
        self.host = host.lower()
        self.port = port
        self.host_header = shown if port == default else f"{shown}:{port}"
        self.ssl = ssl_context if scheme == "https" else None
        self.label = text[: text.find("://") + 3] + hostport  # in messages: no credentials
        self.idle: list[_Conn] = []  # oldest first; the newest is used first


class _Conn(asyncio.Protocol):
    """One connection to an origin, one exchange at a time (`resp`)."""

    __slots__ = (
        "buf",
        "chunked",
        "closed",
        "ctype",
        "eof_body",
        "got",
        "head",
        "head_bytes",
        "idle_since",
        "informational",
        "keep",
        "length",
        "origin",
        "parser",
        "paused",
        "pooled",
        "resp",
        "reusable",
        "reused",
        "state",
        "transport",
        "up",
        "wpaused",
    )

    def __init__(self, up: Upstream, origin: _Origin) -> None:
        self.up = up
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.resp: UpstreamResponse | None = None
        self.closed = False  # closing or closed, by either side: never to be used again
        self.pooled = False
        self.reused = False  # served an exchange before this one
        self.paused = False  # reading paused: the reader is behind
        self.wpaused = False  # writing paused: the transport's buffer is full
        self.idle_since = 0.0
        self.buf: list[bytes] = []
        self.begin(None, False)

    def begin(self, resp: UpstreamResponse | None, head: bool) -> None:
        self.resp = resp
        if resp is not None:
            resp._conn = self
            self.buf = resp._buf  # the body's pieces, for the reader
        # 0: the head is coming; 1: the body; 2: the answer is over
        self.state = 0
        self.got = False  # any byte of the answer
        self.head_bytes = 0  # of the answer's head so far
        self.head = head  # a HEAD request: the answer has no body
        self.ctype: bytes | None = None
        self.length = False
        self.chunked = False
        self.eof_body = False  # the body ends when the connection does
        self.informational = False
        self.keep = False
        self.reusable = True

    # --- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.up._conns.add(self)

    def data_received(self, data: bytes) -> None:
        resp = self.resp
        if resp is None:  # bytes nobody asked for (an idle connection): never use it again
            self._drop()
            return
        self.got = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self.reusable = False  # a 101 answer: what follows is another protocol
        except httptools.HttpParserError as exc:
            if self.state != 2:
                if self.state == 0:
                    message = f"upstream {self.origin.label} failed: invalid response: {exc}"
                else:
                    message = f"upstream answer broken: {exc}"
                resp._fail(UpstreamError("broken", message))
                return
            self.reusable = False  # bytes after the end of the answer
        if self.state == 2:
            self._finish(resp)
        elif self.state == 0:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD:
                label = self.origin.label
                message = f"upstream {label} failed: an answer head over {MAX_HEAD} bytes"
                resp._fail(UpstreamError("broken", message))
        elif self.state == 1:
            if resp._all:
                if resp._waiting:
                    resp._since = self.up._loop.time()  # type: ignore[union-attr]
            else:
                resp._size += len(data)  # (a little more than the body: near enough)
                if resp._size > READ_HIGH and not self.paused:
                    self.paused = True
                    self.transport.pause_reading()  # type: ignore[union-attr]
                resp._wake()

    def eof_received(self) -> bool:
        self._ended(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)
        self.up._conns.discard(self)

    def pause_writing(self) -> None:
        self.wpaused = True

    def resume_writing(self) -> None:
        self.wpaused = False
        if self.resp is not None:
            self.resp._wake()

    # --- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.state == 2:  # a second answer to one request
            self.reusable = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.state:  # trailers, or bytes after the end
            return
        name = name.lower()
        if name in _DROPPED:
            if name == b"content-length":
                self.length = True
            elif name == b"transfer-encoding":
                self.chunked = value.rstrip().lower().endswith(b"chunked")
                self.length = False
            return
        if name == b"content-type" and self.ctype is None:
            self.ctype = value
        self.resp.headers.append((name, value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        if self.state:
            return
        status = self.parser.get_status_code()
        resp = self.resp
        assert resp is not None
        if status < 200 and status != 101:  # 100 Continue, 103 Early Hints: the answer follows
            resp.headers.clear()
            self.ctype = None
            self.length = self.chunked = False
            self.informational = True
            return
        resp.status = status
        resp.content_type = _media_type(self.ctype)
        resp._stage = 1
        self.state = 1
        self.eof_body = not (self.length or self.chunked)
        if self.head or status == 101:
            self.state = 2
            self.reusable = False

    def on_body(self, body: bytes) -> None:
        if self.state == 1:
            self.buf.append(body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
        elif self.state == 1:
            self.state = 2
            self.keep = self.parser.should_keep_alive()

    # --- the connection's life ----------------------------------------------------------------

    def _finish(self, resp: UpstreamResponse) -> None:
        """The answer is over: hand it to the reader, pool or close the connection."""
        self.resp = None
        resp._complete()
        if self.keep and self.reusable and not self.closed:
            if self.paused:
                self.paused = False
                self.transport.resume_reading()  # type: ignore[union-attr]
            self.reused = True
            self.state = 0
            self.up._release(self)
        else:
            self.closed = True
            self.transport.close()  # type: ignore[union-attr]

    def _ended(self, exc: Exception | None) -> None:
        """The server closed (or reset) the connection."""
        self.closed = True
        if self.pooled:
            self.pooled = False
            with contextlib.suppress(ValueError):
                self.origin.idle.remove(self)
        resp = self.resp
        if resp is None:
            return
        if self.state == 1 and self.eof_body and exc is None:  # a body delimited by the close
            self.state = 2
            self._finish(resp)
            return
        self.resp = None
        resp._conn = None
        if self.state == 0:
            if not self.got and self.reused:
                resp._stale = True
            reason = "Server disconnected" if exc is None else str(exc)
            resp._fail(UpstreamError("broken", f"upstream {self.origin.label} failed: {reason}"))
        else:
            resp._fail(UpstreamError("broken", _INCOMPLETE))
        if self.transport is not None:
            self.transport.close()

    def resume(self) -> None:
        self.paused = False
        if not self.closed:
            self.transport.resume_reading()  # type: ignore[union-attr]

    def abort(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.abort()

    def _drop(self) -> None:
        self.closed = True
        if self.pooled:
            self.pooled = False
            with contextlib.suppress(ValueError):
                self.origin.idle.remove(self)
        if self.transport is not None:
            self.transport.close()


class Upstream:
    """The client: `send` a request, get an `UpstreamResponse` once its head has come."""

    def __init__(
        self,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        *,
        keepalive: float = 30.0,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        self.timeouts = timeouts
        self.keepalive = keepalive  # seconds an idle connection is kept
        self._ssl_context = ssl_context
        self._origins: dict[str, _Origin] = {}
        self._urls: dict[str, tuple[_Origin, str]] = {}  # url -> its origin and target
        self._conns: set[_Conn] = set()  # every open connection, pooled or busy
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:  # connections of another loop are of no use here
                self._origins.clear()
                self._urls.clear()
                self._conns.clear()
                self._sweeper = None
            self._loop = loop

    async def close(self) -> None:
        """Close every connection: the idle ones, and those of exchanges in progress."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for origin in self._origins.values():
            origin.idle.clear()
        for conn in list(self._conns):
            conn.pooled = False
            if conn.resp is not None:
                conn.resp._fail(UpstreamError("broken", _CLOSED))
            elif not conn.closed:
                conn.closed = True
                conn.transport.close()  # type: ignore[union-attr]
        self._conns.clear()
        await asyncio.sleep(0)  # let the transports close

    async def send(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        timeout: float | None = None,
        timeouts: Timeouts | None = None,
    ) -> UpstreamResponse:
        """`timeout` bounds the whole exchange (the route's); `timeouts` are the backend's."""
        loop = self._loop
        if loop is None or loop is not asyncio.get_running_loop():
            await self.start()
            loop = self._loop
            assert loop is not None
        limits = timeouts or self.timeouts

        where = self._urls.get(url)
        if where is None:
            where = self._parse(url)
        origin, target = where
        head = _request_head(method, target, headers, body, origin)
        if len(body) <= _JOIN_BODY:
            head += body
            rest = b""
        else:
            rest = body

        resp = UpstreamResponse(0, [], "", None, limits.idle)
        resp._loop = loop
        resp._label = origin.label
        resp._limits = limits
        resp._timeout = timeout
        now = loop.time()
        if timeout is not None:
            resp._deadline = now + timeout
        if limits.first_byte is not None:
            resp._first_byte = now + limits.first_byte
        first_at = min(resp._first_byte, resp._deadline)
        resp._arm(first_at if limits.idle is None else min(first_at, now + limits.idle))

        is_head = method == "HEAD"
        conn = self._pooled(origin)
        reused = conn is not None
        try:
            while True:
                if conn is None:
                    conn = await self._connect(origin, resp, limits.connect)
                conn.begin(resp, is_head)
                conn.transport.write(head)  # type: ignore[union-attr]
                if rest:
                    await _write_body(conn, resp, rest)
                while resp._stage == 0:
                    waiter = resp._waiter = loop.create_future()
                    await waiter
                error = resp._error
                if error is None:
                    return resp
                if resp._stale and reused:  # the server had closed it: once more, anew
                    reused = False
                    conn = None
                    resp._stale = False
                    resp._error = None
                    resp._stage = 0
                    resp.headers.clear()
                    resp._arm(min(resp._first_byte, resp._deadline))
                    continue
                raise error
        except BaseException:  # cancelled, most likely: the connection is not left half-used
            resp._fail(UpstreamError("broken", _CLOSED))
            raise

    # --- connections ----------------------------------------------------------------------------

    def _parse(self, url: str) -> tuple[_Origin, str]:
        """The origin of `url` (one object per origin, its pool in it) and the request target,
        quoted where it must be; the last few thousand URLs are remembered."""
        scheme_end = url.find("://") + 3
        start = len(url)
        for sep in ("/", "?"):
            i = url.find(sep, scheme_end)
            if 0 <= i < start:
                start = i
        text = url[:start]
        origin = self._origins.get(text)
        if origin is None:
            context = None
            if text[:6].lower() == "https:":
                if self._ssl_context is None:
                    self._ssl_context = ssl.create_default_context()
                context = self._ssl_context
            origin = self._origins[text] = _Origin(text, context)
        target = url[start:]
        if not target.startswith("/"):
            target = "/" + target
        if _UNSAFE_TARGET.search(target) is not None:
            target = quote(_LONE_PERCENT.sub("%25", target), safe="/?&=;:@!$'()*+,~%[]")
        if len(self._urls) >= _URLS_KEPT:
            self._urls.clear()
        where = self._urls[url] = (origin, target)
        return where

    def _pooled(self, origin: _Origin) -> _Conn | None:
        idle = origin.idle
        while idle:
            conn = idle.pop()
            conn.pooled = False
            if not conn.closed:
                return conn
        return None

    async def _connect(
        self, origin: _Origin, resp: UpstreamResponse, connect: float | None
    ) -> _Conn:
        loop = self._loop
        assert loop is not None
        connect_at = _INF if connect is None else loop.time() + connect
        at = min(connect_at, resp._first_byte, resp._deadline)
        conn = _Conn(self, origin)
        try:
            async with asyncio.timeout_at(None if at == _INF else at):
                await loop.create_connection(
                    lambda: conn,
                    origin.host,
                    origin.port,
                    ssl=origin.ssl,
                    server_hostname=origin.host if origin.ssl is not None else None,
                )
        except TimeoutError:
            if resp._error is not None:  # the exchange's own timer was first
                raise resp._error from None
            if at == connect_at:
                message = f"upstream {origin.label}: no connection within {connect:g}s"
            elif at == resp._first_byte:
                message = resp._no_answer()
            else:
                message = resp._route_timeout()
            resp._fail(UpstreamError("timeout", message))
            raise UpstreamError("timeout", message) from None
        except OSError as exc:
            message = f"upstream {origin.label} unreachable: {_reason(exc)}"
            resp._fail(UpstreamError("unreachable", message))
            raise UpstreamError("unreachable", message) from None
        if resp._error is not None:  # timed out just as it connected
            conn.abort()
            raise resp._error
        return conn

    def _release(self, conn: _Conn) -> None:
        loop = self._loop
        assert loop is not None
        conn.idle_since = now = loop.time()
        conn.pooled = True
        conn.origin.idle.append(conn)
        if self._sweeper is None:
            self._sweeper = loop.call_at(now + self.keepalive, self._sweep)

    def _sweep(self) -> None:
        """Close the connections idle for `keepalive` seconds; come back for the next."""
        self._sweeper = None
        loop = self._loop
        assert loop is not None
        now = loop.time()
        keepalive = self.keepalive
        next_at = _INF
        for origin in self._origins.values():
            idle = origin.idle
            while idle and now - idle[0].idle_since >= keepalive:
                conn = idle.pop(0)
                conn.pooled = False
                conn.closed = True
                conn.transport.close()  # type: ignore[union-attr]
            if idle:
                next_at = min(next_at, idle[0].idle_since + keepalive)
        if next_at != _INF:
            self._sweeper = loop.call_at(next_at, self._sweep)


async def _write_body(conn: _Conn, resp: UpstreamResponse, body: bytes) -> None:
    """A large body, in slices, waiting while the transport's buffer is full."""
    transport = conn.transport
    assert transport is not None and resp._loop is not None
    view = memoryview(body)
    for i in range(0, len(body), _WRITE_SLICE):
        while conn.wpaused and resp._stage == 0:
            waiter = resp._waiter = resp._loop.create_future()
            await waiter
        if resp._stage != 0:  # answered (or failed) before the body was sent
            conn.reusable = False
            return
        transport.write(view[i : i + _WRITE_SLICE])


def _request_head(
    method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes, origin: _Origin
) -> bytes:
    """The request line and headers: those given, as given, plus Host (unless given) and
    Content-Length; one join, one encode. A line break in any of it is refused."""
    if origin.auth is None:
        for name, _ in headers:
            if len(name) in _SPECIAL_LENGTHS and name.lower() in _SPECIAL_NAMES:
                break
        else:  # the usual case: nothing given that we write ourselves
            lines = [f"{name}: {value}\r\n" for name, value in headers]
            length = (
                f"Content-Length: {len(body)}\r\n" if body or method not in _NO_BODY_METHODS else ""
            )
            text = (
                f"{method} {target} HTTP/1.1\r\nHost: {origin.host_header}\r\n"
                f"{''.join(lines)}{length}\r\n"
            )
            return _checked(text, len(lines) + (4 if length else 3))
    parts = [method, " ", target, " HTTP/1.1\r\nHost: ", origin.host_header, "\r\n"]
    lines_count = 2
    has_auth = False
    for name, value in headers:
        if len(name) in _SPECIAL_LENGTHS or len(name) == 13:
            low = name.lower()
            if low == "host":
                if parts[4]:
                    parts[3] = " HTTP/1.1\r\n"
                    parts[4] = parts[5] = ""
                    lines_count -= 1
            elif low == "content-length" or low == "transfer-encoding":
                continue  # the body is framed here
            elif low == "authorization":
                has_auth = True
        parts.append(f"{name}: {value}\r\n")
        lines_count += 1
    if origin.auth is not None and not has_auth:
        parts.append(f"Authorization: {origin.auth}\r\n")
        lines_count += 1
    if body or method not in _NO_BODY_METHODS:
        parts.append(f"Content-Length: {len(body)}\r\n")
        lines_count += 1
    parts.append("\r\n")
    return _checked("".join(parts), lines_count + 1)


#: Request header names (lower-case) the head writes itself, and their lengths.
_SPECIAL_NAMES = frozenset({"host", "content-length", "transfer-encoding"})
_SPECIAL_LENGTHS = frozenset({4, 14, 17})


def _checked(text: str, lines: int) -> bytes:
    """`text` encoded, if it has exactly `lines` line ends (none hidden in a value)."""
    if text.count("\n") != lines or text.count("\r") != lines:
        raise ValueError("a line break in the request's method, target or headers")
    try:
        # the client's header bytes were read as Latin-1: the same bytes go upstream
        return text.encode("latin-1")
    except UnicodeEncodeError:  # text of our own beyond Latin-1 (a policy's header value)
        return text.encode("utf-8")


def _reason(exc: OSError) -> str:
    """Why connecting failed, in words: "Connection refused" (not asyncio's "Connect call
    failed"), the resolver's or TLS's own message."""
    if exc.errno and exc.errno > 0 and not isinstance(exc, ssl.SSLError | socket.gaierror):
        return os.strerror(exc.errno)
    return exc.strerror or str(exc)


_MEDIA_TYPES: dict[bytes | None, str] = {None: "application/octet-stream"}


def _media_type(raw: bytes | None) -> str:
    """Content-Type's media type, lower-case, as aiohttp's `content_type`."""
    media = _MEDIA_TYPES.get(raw)
    if media is None:
        assert raw is not None
        media = raw.split(b";", 1)[0].strip().lower().decode("latin-1")
        if "/" not in media:
            media = "application/octet-stream"
        if len(_MEDIA_TYPES) < 256:
            _MEDIA_TYPES[raw] = media
    return media
