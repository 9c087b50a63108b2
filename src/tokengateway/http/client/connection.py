"""Connections to an origin: the `Pool` that keeps them, the `Connection` that is one.

A `Connection` is the asyncio protocol of one TCP (or TLS) connection: it writes a request,
feeds what comes back to llhttp, and tells the `Exchange` it carries what the parser found
(`headers_done`, `feed`, `finish`, `fail`, `lost`). The parse of the current answer (where
it is, its framing, its transfer decoders) is the connection's; the header list and the body
queue it fills are the exchange's. One exchange at a time; after a complete answer the
connection goes back to its pool, or is closed.

A `Pool` holds the connections to one origin (scheme, host, port): the idle ones, most
recently used first, how many are open (busy, idle or connecting: at most
`max_connections`), and the requests waiting for one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import zlib
from collections import deque

import httptools

from tokengateway.http.client.errors import (
    INCOMPLETE,
    UpstreamAborted,
    UpstreamBroken,
    UpstreamBusy,
    UpstreamClosed,
    UpstreamError,
    UpstreamInvalid,
    UpstreamTimeout,
    UpstreamTLSError,
    UpstreamTooLarge,
    UpstreamUnreachable,
)
from tokengateway.http.client.exchange import Exchange, Stage
from tokengateway.http.client.request import HOP_BY_HOP, Origin
from tokengateway.http.client.tls import name_problem, tls_reason

__all__ = ["MAX_HEAD", "Connection", "Pool"]

#: The most an answer's status line and headers (1xx answers included) may take.
MAX_HEAD = 1024 * 1024
#: A large request body is written in slices of this size, waiting while the transport is full.
_WRITE_SLICE = 256 * 1024
#: Transfer codings decoded here (zlib's window bits for each); `chunked` is llhttp's.
_TRANSFER_CODINGS = {b"gzip": 31, b"x-gzip": 31, b"deflate": 15, b"identity": 0}
#: Not passed back to the client: the gateway's server writes its own.
_RESPONSE_OWN = frozenset({"date"})
#: Response header names (lower-case bytes) left out of an answer's headers.
_DROPPED = frozenset(name.encode() for name in HOP_BY_HOP | _RESPONSE_OWN)
_INF = float("inf")
_HEAD, _BODY, _DONE = Stage.HEAD, Stage.BODY, Stage.DONE


class Connection(asyncio.Protocol):
    """One connection to an origin, one exchange at a time (`exchange`).

    `closed`: closing or closed, by either side: never to be used again. `reused`: it
    served an exchange before this one. `paused`: reading paused (the reader is behind).
    """

    __slots__ = (
        "body",
        "chunked",
        "closed",
        "coding",
        "connection",
        "counted",
        "ctype",
        "decoders",
        "eof_body",
        "exchange",
        "got",
        "head",
        "head_bytes",
        "headers",
        "idle_since",
        "informational",
        "keep",
        "length",
        "nbody",
        "parser",
        "paused",
        "pool",
        "pooled",
        "reusable",
        "reused",
        "stage",
        "te",
        "transport",
        "wpaused",
    )

    def __init__(self, pool: Pool) -> None:
        self.pool = pool
        self.counted = False  # counted in `pool.open`
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.closed = False
        self.pooled = False
        self.reused = False
        self.paused = False
        self.wpaused = False  # writing paused: the transport's buffer is full
        self.idle_since = 0.0
        self.body: list[bytes] = []
        self.headers: list[tuple[bytes, bytes]] = []
        self.begin(None, False)

    def begin(self, exchange: Exchange | None, head: bool) -> None:
        """Carry `exchange` (its request is about to be written); `head`: a HEAD request,
        whose answer has no body."""
        self.exchange = exchange
        if exchange is not None:
            exchange.conn = self
            self.body = exchange.body  # the body's pieces, for the reader
            self.headers = exchange.headers
        self.stage = _HEAD  # of the answer's parse
        self.got = False  # any byte of the answer
        self.head_bytes = 0  # of the answer's head so far
        self.head = head
        self.ctype: bytes | None = None
        self.coding: str | None = None  # Content-Encoding, when not identity
        self.length = False
        self.chunked = False
        self.te: bytes | None = None  # Transfer-Encoding, all of it
        self.connection: bytes | None = None  # Connection, all of it
        self.decoders: list[zlib._Decompress] | None = None  # for transfer codings
        self.nbody = 0  # body bytes so far (decoded)
        self.eof_body = False  # the body ends when the connection does
        self.informational = False
        self.keep = False
        self.reusable = True

    async def write_body(self, exchange: Exchange, body: bytes) -> None:
        """A large request body, in slices, waiting while the transport's buffer is full;
        given up when the answer came (or the exchange failed) first."""
        transport = self.transport
        assert transport is not None
        view = memoryview(body)
        for i in range(0, len(body), _WRITE_SLICE):
            while self.wpaused and exchange.stage is _HEAD:
                await exchange.waiter()
            if exchange.stage is not _HEAD:  # answered (or failed) before the body was sent
                self.reusable = False
                return
            transport.write(view[i : i + _WRITE_SLICE])

    # --- transport callbacks ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.pool.conns.add(self)

    def data_received(self, data: bytes) -> None:
        exchange = self.exchange
        if exchange is None:  # bytes nobody asked for (an idle connection): never use it again
            self._drop()
            return
        self.got = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            error = exc.__context__  # raised by a callback of ours: an answer refused
            if not isinstance(error, UpstreamError):
                raise
            exchange.fail(error)
            return
        except httptools.HttpParserUpgrade:
            self.reusable = False  # a 101 answer: what follows is another protocol
        except httptools.HttpParserError as exc:
            if self.stage is not _DONE:
                if self.stage is _HEAD:
                    message = f"upstream {self.pool.label} failed: invalid response: {exc}"
                else:
                    message = f"upstream answer broken: {exc}"
                exchange.fail(UpstreamBroken(message))
                return
            self.reusable = False  # bytes after the end of the answer
        stage = self.stage
        if stage is _DONE:
            self._finish(exchange)
        elif stage is _HEAD:
            self.head_bytes += len(data)
            if self.head_bytes > MAX_HEAD:
                label = self.pool.label
                message = f"upstream {label} failed: an answer head over {MAX_HEAD} bytes"
                exchange.fail(UpstreamBroken(message))
        elif exchange.feed(len(data), self.nbody) and not self.paused:
            self.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]

    def eof_received(self) -> bool:
        self._ended(None)
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self._ended(exc)
        self.pool.forget(self)

    def pause_writing(self) -> None:
        self.wpaused = True

    def resume_writing(self) -> None:
        self.wpaused = False
        if self.exchange is not None:
            self.exchange.wake()

    # --- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        if self.stage is _DONE:  # a second answer to one request
            self.reusable = False

    def on_header(self, name: bytes, value: bytes) -> None:
        if self.stage is not _HEAD:  # trailers, or bytes after the end
            return
        name = name.lower()
        if name in _DROPPED:
            if name == b"content-length":
                self.length = True
            elif name == b"transfer-encoding":
                self.te = value if self.te is None else self.te + b"," + value
            elif name == b"connection":
                self.connection = (
                    value if self.connection is None else self.connection + b"," + value
                )
            return
        if name == b"content-type" and self.ctype is None:
            self.ctype = value
        elif name == b"content-encoding":
            coding = value.strip().lower().decode("latin-1")
            if coding and coding != "identity":
                self.coding = coding
        self.headers.append((name, value))

    def on_headers_complete(self) -> None:
        if self.stage is not _HEAD:
            return
        status = self.parser.get_status_code()
        if 100 <= status < 200 and status != 101:  # 100 Continue, 103 Early Hints...: read on
            self.headers.clear()
            self.coding = None
            self.ctype = self.te = self.connection = None
            self.length = False
            self.informational = True
            return
        label = self.pool.label
        if status == 101:  # raised: the parser stops here, the connection is closed
            raise UpstreamInvalid(
                f"upstream {label} switched protocols (101) though the request asked for no upgrade"
            )
        if not 100 <= status <= 599:
            raise UpstreamInvalid(
                f"upstream {label} answered with status {status}, outside 100-599"
            )
        if self.te is not None:
            self._codings(self.te)
        if self.connection is not None:
            self._strip_named(self.connection)
        self.exchange.headers_done(status, _media_type(self.ctype), self.coding)  # type: ignore[union-attr]
        self.stage = _BODY
        self.eof_body = not (self.length or self.chunked)
        if self.head:
            self.stage = _DONE
            self.reusable = False

    def _codings(self, value: bytes) -> None:
        """Transfer-Encoding: chunked last is llhttp's; gzip or deflate before it are decoded
        here; any other coding is refused (the body could not be passed on honestly)."""
        codings = [c.strip().lower() for c in value.split(b",") if c.strip()]
        self.chunked = bool(codings) and codings[-1] == b"chunked"
        if self.chunked:
            codings.pop()
        decoders = []
        for coding in reversed(codings):
            wbits = _TRANSFER_CODINGS.get(coding)
            if wbits is None:
                raise UpstreamInvalid(
                    f"upstream {self.pool.label} sent Transfer-Encoding "
                    f"{value.decode('latin-1')!r}: the gateway decodes gzip and deflate only"
                )
            if wbits:
                decoders.append(zlib.decompressobj(wbits))
        self.decoders = decoders or None

    def _strip_named(self, value: bytes) -> None:
        """Headers the answer's Connection header names are hop-by-hop (RFC 9110 7.6.1)."""
        named = {t.strip().lower() for t in value.split(b",")} - {b"close", b"keep-alive", b""}
        if named:
            self.headers[:] = [(n, v) for n, v in self.headers if n not in named]

    def _decode(self, data: bytes) -> bytes:
        """Body bytes through the transfer decoders; each step at most the cap (+1)."""
        assert self.decoders is not None
        cap = self.pool.cap
        try:
            for decoder in self.decoders:
                data = decoder.decompress(data, cap + 1)
                if decoder.unconsumed_tail:
                    raise UpstreamTooLarge.over(self.pool.label, cap)
        except zlib.error as exc:
            raise UpstreamBroken(
                f"upstream answer broken: its transfer coding does not decode ({exc})"
            ) from None
        return data

    def _decoded_end(self) -> bytes:
        """What the transfer decoders still hold; an error if a coding was cut short."""
        assert self.decoders is not None
        tail = b""
        for decoder in self.decoders:
            try:
                tail = decoder.decompress(tail) + decoder.flush() if tail else decoder.flush()
            except zlib.error as exc:
                raise UpstreamBroken(
                    f"upstream answer broken: its transfer coding does not decode ({exc})"
                ) from None
            if not decoder.eof:
                raise UpstreamBroken(
                    "upstream answer broken: its transfer coding ends before its data"
                )
        return tail

    def on_body(self, body: bytes) -> None:
        if self.stage is _BODY:
            if self.decoders is not None:
                body = self._decode(body)
            self.body.append(body)
            self.nbody += len(body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
        elif self.stage is _BODY:
            if self.decoders is not None:
                tail = self._decoded_end()
                if tail:
                    self.body.append(tail)
                    self.nbody += len(tail)
            self.stage = _DONE
            self.keep = self.parser.should_keep_alive()

    # --- the connection's life ----------------------------------------------------------------

    def _finish(self, exchange: Exchange) -> None:
        """The answer is over: hand it to the reader, pool or close the connection."""
        self.exchange = None
        exchange.finish()
        if self.keep and self.reusable and not self.closed:
            if self.paused:
                self.paused = False
                self.transport.resume_reading()  # type: ignore[union-attr]
            self.reused = True
            self.stage = _HEAD
            self.pool.release(self)
        else:
            self.closed = True
            self.transport.close()  # type: ignore[union-attr]

    def _ended(self, exc: Exception | None) -> None:
        """The server closed (or reset) the connection."""
        self.closed = True
        if self.pooled:
            self.pool.unpool(self)
        exchange = self.exchange
        if exchange is None:
            return
        if self.stage is _BODY and self.eof_body and exc is None:  # a body ended by the close
            if self.decoders is not None:
                try:
                    tail = self._decoded_end()
                except UpstreamError as error:
                    self.exchange = None
                    exchange.lost(error)
                    return
                if tail:
                    self.body.append(tail)
            self.stage = _DONE
            self._finish(exchange)
            return
        self.exchange = None
        if self.stage is _HEAD:
            reason = "Server disconnected" if exc is None else str(exc)
            closed = UpstreamClosed(f"upstream {self.pool.label} failed: {reason}")
            # the server's keep-alive timeout raced the request: it may go again
            exchange.lost(closed, retryable=not self.got and self.reused)
        else:
            exchange.lost(UpstreamClosed(INCOMPLETE))
        if self.transport is not None:
            self.transport.close()

    def resume(self) -> None:
        """Read again (the reader caught up)."""
        self.paused = False
        if not self.closed:
            self.transport.resume_reading()  # type: ignore[union-attr]

    def abort(self) -> None:
        """Close at once, the exchange on it (if any) no longer its business."""
        self.closed = True
        self.exchange = None
        if self.transport is not None:
            self.transport.abort()

    def _drop(self) -> None:
        self.closed = True
        if self.pooled:
            self.pool.unpool(self)
        if self.transport is not None:
            self.transport.close()


class Pool:
    """The connections to one origin: the idle ones (`idle`, oldest first; the newest is
    used first), how many are open or opening (`open`, busy or idle, at most
    `max_connections`), every open one (`conns`), and who waits for one (`waiters`).

    `cap` is the most a body read whole may take (the client's `max_response_bytes`). A
    connection idle for `keepalive` seconds is closed (by `sweep`, a timer of the pool's
    while it has idle connections).
    """

    __slots__ = (
        "cap",
        "conns",
        "host",
        "idle",
        "keepalive",
        "label",
        "loop",
        "max_connections",
        "open",
        "port",
        "server_name",
        "ssl",
        "sweeper",
        "tls",
        "waiters",
    )

    def __init__(
        self,
        origin: Origin,
        ssl_context: ssl.SSLContext | None,
        loop: asyncio.AbstractEventLoop,
        max_connections: int,
        cap: int,
        keepalive: float,
    ) -> None:
        self.host = origin.host
        self.port = origin.port
        self.ssl = ssl_context
        self.tls = origin.tls
        tls = origin.tls
        self.server_name = (
            None if ssl_context is None else tls.server_name if tls is not None else origin.host
        )
        self.label = origin.label
        self.loop = loop
        self.max_connections = max_connections
        self.cap = cap
        self.keepalive = keepalive
        self.sweeper: asyncio.TimerHandle | None = None
        self.idle: list[Connection] = []
        self.open = 0
        self.conns: set[Connection] = set()
        self.waiters: deque[asyncio.Future[None]] = deque()

    def take(self) -> Connection | None:
        """The most recently used idle connection still open, if any (without waiting)."""
        idle = self.idle
        while idle:
            conn = idle.pop()
            conn.pooled = False
            if not conn.closed and not conn.transport.is_closing():  # type: ignore[union-attr]
                return conn
        return None

    async def acquire(self, exchange: Exchange, connect: float | None, fresh: bool) -> Connection:
        """An idle connection (unless `fresh`), else a new one if the cap allows, else the
        first freed within the connect timeout (`UpstreamBusy` otherwise), all within the
        exchange's deadlines."""
        loop = self.loop
        at = connect_at = _INF
        while True:
            if exchange.error is not None:  # the exchange's own timer, while it waited
                raise exchange.error
            if not fresh:
                conn = self.take()
                if conn is not None:
                    return conn
            if self.open < self.max_connections:
                return await self.connect(exchange, connect)
            if at == _INF:
                connect_at = _INF if connect is None else loop.time() + connect
                at = min(connect_at, exchange.first_byte_at, exchange.deadline)
            waiter: asyncio.Future[None] = loop.create_future()
            self.waiters.append(waiter)
            try:
                async with asyncio.timeout_at(None if at == _INF else at):
                    await waiter
            except TimeoutError:
                if waiter.done() and not waiter.cancelled():
                    self.wake()  # woken as time ran out: the turn passes on
                if exchange.error is not None:
                    raise exchange.error from None
                error: UpstreamError
                if at == connect_at:
                    error = UpstreamBusy(
                        f"upstream {self.label}: all {self.max_connections} connections "
                        f"(the cap per backend) stayed busy for {connect:g}s"
                    )
                else:
                    error = exchange.expired(at)
                exchange.fail(error)
                raise error from None
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    self.wake()
                raise
            finally:
                with contextlib.suppress(ValueError):
                    self.waiters.remove(waiter)

    async def connect(self, exchange: Exchange, connect: float | None) -> Connection:
        """A new connection, within the connect timeout and the exchange's deadlines."""
        loop = self.loop
        connect_at = _INF if connect is None else loop.time() + connect
        at = min(connect_at, exchange.first_byte_at, exchange.deadline)
        tls = self.tls
        error: UpstreamError
        if tls is not None and tls.refusal is not None:
            error = UpstreamTLSError(f"upstream {self.label}: {tls.refusal}")
            exchange.fail(error)
            raise error
        conn = Connection(self)
        self.open += 1
        conn.counted = True
        try:
            async with asyncio.timeout_at(None if at == _INF else at):
                await loop.create_connection(
                    lambda: conn,
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.server_name,
                )
        except TimeoutError:
            self.given_up(conn)
            if exchange.error is not None:  # the exchange's own timer was first
                raise exchange.error from None
            if at == connect_at:
                error = UpstreamTimeout(f"upstream {self.label}: no connection within {connect:g}s")
            else:
                error = exchange.expired(at)
            exchange.fail(error)
            raise error from None
        except ssl.SSLError as exc:
            self.given_up(conn)
            error = UpstreamTLSError(
                f"upstream {self.label}: TLS with {self.server_name} failed: {tls_reason(exc)}"
            )
            exchange.fail(error)
            raise error from None
        except OSError as exc:
            self.given_up(conn)
            error = UpstreamUnreachable(f"upstream {self.label} unreachable: {_reason(exc)}")
            exchange.fail(error)
            raise error from None
        except BaseException:
            self.given_up(conn)
            raise
        if exchange.error is not None:  # timed out just as it connected
            conn.abort()
            raise exchange.error
        if tls is not None and tls.names:
            transport = conn.transport
            assert transport is not None
            problem = name_problem(transport.get_extra_info("peercert"), tls.names)
            if problem is not None:
                conn.abort()
                error = UpstreamTLSError(
                    f"upstream {self.label}: TLS with {self.server_name} failed: "
                    f"certificate verify failed: {problem}"
                )
                exchange.fail(error)
                raise error
        return conn

    def given_up(self, conn: Connection) -> None:
        """A connection attempt abandoned: it stops counting against the cap (at once, or
        when its transport, if it has one, is closed)."""
        if conn.transport is None:
            conn.closed = True
            self.forget(conn)
        else:
            conn.abort()

    def release(self, conn: Connection) -> None:
        """`conn` is idle again, kept for the next request."""
        conn.idle_since = now = self.loop.time()
        conn.pooled = True
        self.idle.append(conn)
        if self.waiters:
            self.wake()
        if self.sweeper is None:
            self.sweeper = self.loop.call_at(now + self.keepalive, self.sweep)

    def unpool(self, conn: Connection) -> None:
        """`conn`, idle, closed: it is no longer offered."""
        conn.pooled = False
        with contextlib.suppress(ValueError):
            self.idle.remove(conn)

    def forget(self, conn: Connection) -> None:
        """`conn` is closed: it no longer counts against the cap."""
        self.conns.discard(conn)
        if conn.counted:
            conn.counted = False
            self.open -= 1
            self.wake()

    def wake(self) -> None:
        """A connection was freed (pooled or closed): the longest waiting request may go."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def sweep(self) -> None:
        """Close the connections idle for `keepalive` seconds; come back for the next."""
        self.sweeper = None
        keepalive = self.keepalive
        now = self.loop.time()
        idle = self.idle
        while idle and now - idle[0].idle_since >= keepalive:
            conn = idle.pop(0)
            conn.pooled = False
            conn.closed = True
            conn.transport.close()  # type: ignore[union-attr]
        if idle:
            self.sweeper = self.loop.call_at(idle[0].idle_since + keepalive, self.sweep)

    def close(self) -> None:
        """Close every connection: the idle ones, and those of exchanges in progress."""
        if self.sweeper is not None:
            self.sweeper.cancel()
            self.sweeper = None
        self.idle.clear()
        for conn in list(self.conns):
            conn.pooled = False
            if conn.exchange is not None:
                conn.exchange.fail(UpstreamAborted())
            elif not conn.closed:
                conn.closed = True
                conn.transport.close()  # type: ignore[union-attr]
        self.conns.clear()


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
