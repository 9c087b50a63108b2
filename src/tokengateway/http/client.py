"""The upstream client: HTTP/1.1 on asyncio protocols, parsed by httptools (llhttp).

A general client (aiohttp's was measured at 40-50 us of CPU per proxied request) does much
this gateway never needs: cookies, redirects, decompression, multipart, tracing hooks. This
one sends a request head built with one join, parses the answer with llhttp in C, and hands
the body on as it arrives; it costs a fraction of that. Foreign exceptions are translated
here, once, into `UpstreamError` with a kind the gateway maps to 502, 503 or 504.

Where a request goes is never read from text a client wrote. `Origin` is a backend's
scheme, host, port, base path and credential, parsed once per configuration; `send_to`
takes one and a request target (a path and query starting with `/`, of RFC 3986's
characters only, `%` only as an escape), checks the target and refuses anything else with
`BadTarget`, never re-quoting or re-reading it. `send(method, url, ...)` is a strict
convenience on top (the URL split once and remembered), for tests and benchmarks.

Three timeouts, each settable per backend (`Timeouts`): connecting (TCP and TLS), the first
byte of the answer (its status line and headers: for a non-streamed completion, the whole
generation) and the silence between two chunks of the body. The route's `timeouts.request`
bounds the whole exchange on top. One timer per exchange enforces all of them: it is moved
lazily (when it fires it re-arms itself at the deadline now in force) rather than replaced
at every chunk.

Connections are kept alive in a pool per origin (scheme, host, port), most recently used
first, at most `max_connections` open at once (busy, idle or connecting): a request that
finds them all busy waits for one within its connect timeout, else fails "busy" (503). One
idle for `keepalive` seconds (4: shorter than the 5 s after which uvicorn, and so vLLM,
close an idle connection) is closed. A connection returns to the pool only when its answer
has been parsed to the end, the server did not ask to close it (`Connection: close`,
HTTP/1.0 without keep-alive, a body delimited by the close) and the exchange was not cut
short (a failure, a timeout, `close()`, a cancelled request, an answer that came before the
request was written, a HEAD request). One that the server closed while it sat in the pool,
or whose transport is closing, is dropped, never written to.

A request sent on a *reused* connection that fails before any byte of the answer arrived
(the server's keep-alive timeout raced our request) is sent once more, on a new connection,
only when its method is idempotent (GET, HEAD, OPTIONS, TRACE, PUT, DELETE). A POST is never
sent twice: the server may have read it before closing, and a completion run twice costs
twice; it fails (502) saying so. (Keeping idle connections for less time than the upstream
does makes that race rare.) A failure on a new connection, or after any byte of the
answer, is never retried.

What an answer may be: 1xx answers (100, 102, 103) are read past, to the final one; a 101
is refused (the client never asks for an upgrade) and its connection closed; a status
outside 100-599 is refused. Hop-by-hop headers, and those the answer's `Connection` header
names, are not passed on. A transfer coding other than chunked is decoded here (gzip,
x-gzip, deflate, with zlib) or refused; a content coding is the client's business and is
passed on as it is, its header with it. A body read whole (`read`) is capped at
`max_response_bytes` (a stream read by `chunks` is not: it is relayed, not kept).

Flow control: reading pauses while more than `READ_HIGH` bytes of the body wait for the
reader, and resumes when it takes them; a large request body is written in slices, waiting
whenever the transport asks us to pause.

What differs from aiohttp, knowingly: an answer to HEAD closes its connection (llhttp cannot
be told that such an answer has no body); a chunk encoding that breaks after the headers is
reported at once (aiohttp waited for the idle timeout); bytes after the end of an answer
close the connection; the route's timeout ending during the body says so (aiohttp called
it a silence); header text goes out as Latin-1, the client's own bytes (aiohttp re-encoded
them UTF-8), and only text beyond Latin-1 as UTF-8; a target is refused rather than
quoted. As with aiohttp: no User-Agent, Accept, Accept-Encoding or Content-Type of our own,
no redirects, no content decompression, no cookies.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import re
import socket
import ssl
import zlib
from collections import deque
from collections.abc import AsyncIterator, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import httptools

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_TIMEOUTS",
    "BadTarget",
    "Origin",
    "Timeouts",
    "Upstream",
    "UpstreamError",
    "UpstreamLimits",
    "UpstreamResponse",
    "check_target",
    "content_decoder",
    "decode_content",
]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; None waits forever."""

    connect: float | None = 10.0
    first_byte: float | None = 600.0
    idle: float | None = 300.0  # between two chunks of the body


DEFAULT_TIMEOUTS = Timeouts()


@dataclass(frozen=True, slots=True)
class UpstreamLimits:
    """What the client holds: `Upstream(**asdict(limits))` (the `serve --upstream-*` flags)."""

    #: open connections per origin (busy, idle or connecting); more requests wait for one
    max_connections: int = 1024
    #: seconds an idle connection is kept (below uvicorn's and vLLM's 5)
    keepalive: float = 4.0
    #: the largest body read whole (a non-streamed answer); a stream is not capped
    max_response_bytes: int = 64 * 1024 * 1024


DEFAULT_LIMITS = UpstreamLimits()

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
#: URLs (and targets) whose origin and target are remembered (then forgotten all at once).
_URLS_KEPT = 4096
#: Methods sent once more after the keep-alive race (RFC 9110 section 9.2.2); never POST.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
#: Transfer codings decoded here (zlib's window bits for each); `chunked` is llhttp's.
_TRANSFER_CODINGS = {b"gzip": 31, b"x-gzip": 31, b"deflate": 15, b"identity": 0}
#: Content codings `decode_content` reads (for the usage in an answer, never for the client).
_CONTENT_CODINGS = {"gzip": 31, "x-gzip": 31, "deflate": 15}
#: Methods whose empty body gets no Content-Length (as aiohttp).
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "CONNECT", "TRACE"})
_INF = float("inf")

_INCOMPLETE = "upstream closed the connection before the response was complete"
_CLOSED = "upstream answer broken: Connection closed"

#: A request target as it may go out: `/`, then RFC 3986's path and query characters, `%`
#: only to start an escape.
_TARGET = re.compile(r"/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")
_TARGET_CHAR = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]")
#: A host name or an address (an IPv6 one without its brackets).
_HOST = re.compile(r"[a-z0-9](?:[a-z0-9\-._]*[a-z0-9])?|[0-9a-f:.]*:[0-9a-f:.]*")
#: Bytes urlsplit would silently remove or cut at: a URL with them is refused.
_URL_CONTROL = re.compile(r"[\x00-\x20\x7f]")


class UpstreamError(Exception):
    """What went wrong upstream; `kind` says how the gateway answers:

    "unreachable" (502), "timeout" (504), "broken" (502, or an error event in a stream),
    "invalid" (502: an answer the client refuses), "too_large" (502: a body over the cap),
    "busy" (503: every connection to the origin in use for the connect timeout)."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


class BadTarget(ValueError):
    """A request target (or URL) that cannot go out as it is; nothing was sent."""


def check_target(target: str) -> None:
    """Raise `BadTarget`, saying why, unless `target` can be a request target as it is: an
    origin-form (RFC 9112 3.2.1) of RFC 3986's characters, `%` only in an escape, and not
    starting with `//` (a network-path reference to a URL parser: another host)."""
    if _TARGET.fullmatch(target) is not None and target[1:2] != "/":
        return
    if not target.startswith("/"):
        raise BadTarget(f"the request target {target[:100]!r} does not start with '/'")
    if target.startswith("//"):  # valid, but read as another authority by too many parsers
        raise BadTarget(f"the request target {target[:100]!r} starts with '//'")
    for i, char in enumerate(target):
        if _TARGET_CHAR.fullmatch(char) is None:
            raise BadTarget(
                f"the request target has a character a URL may not carry ({char!r} at {i})"
            )
    raise BadTarget("the request target has a '%' that does not start an escape (%XX)")


class Origin:
    """A backend's origin, parsed once (per configuration): where to connect, its Host
    header, the base path put before every target, and the credential of its URL (`user:pass@`
    becomes `Authorization: Basic`, unless the request carries its own). `label` names it in
    messages, without the credential."""

    __slots__ = ("auth", "base_path", "host", "host_header", "key", "label", "port", "scheme")

    def __init__(self, url: str) -> None:
        if _URL_CONTROL.search(url) is not None:
            raise ValueError(f"a space or a control character in the URL {url!r}")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"not a URL: {url!r} ({exc})") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"not an http:// or https:// URL: {url!r}")
        host = parts.hostname or ""
        if _HOST.fullmatch(host) is None:
            raise ValueError(f"no valid host in {url!r}")
        if parts.query or parts.fragment or "?" in url or "#" in url:
            raise ValueError(f"a backend URL has no query nor fragment: {url!r}")
        base_path = parts.path.rstrip("/")
        if base_path and _TARGET.fullmatch(base_path) is None:
            raise ValueError(f"the path of {url!r} has characters a URL may not carry as they are")
        default = 443 if scheme == "https" else 80
        if port is None:
            port = default
        elif port == 0:
            raise ValueError(f"port 0 in {url!r}")
        shown = f"[{host}]" if ":" in host else host
        self.scheme = scheme
        self.host = host
        self.port = port
        self.host_header = shown if port == default else f"{shown}:{port}"
        self.base_path = base_path
        self.key = f"{scheme}://{shown}:{port}"  # the pool's: one per scheme, host and port
        self.label = f"{scheme}://{self.host_header}"
        self.auth: str | None = None
        if parts.username is not None:
            user, password = unquote(parts.username), unquote(parts.password or "")
            self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def __repr__(self) -> str:
        return f"Origin({self.label}{self.base_path})"


def content_decoder(coding: str) -> zlib._Decompress | None:
    """An incremental decoder for a gzip or deflate content coding; None for another."""
    wbits = _CONTENT_CODINGS.get(coding.strip().lower())
    return None if wbits is None else zlib.decompressobj(wbits)


def decode_content(coding: str, data: bytes, limit: int) -> bytes | None:
    """`data` decoded from a gzip or deflate content coding, at most `limit` bytes of it; None
    when the coding is another, the data do not decode, or they decode beyond `limit`."""
    wbits = _CONTENT_CODINGS.get(coding.strip().lower())
    if wbits is None:
        return None
    try:
        decoder = zlib.decompressobj(wbits)
        out = decoder.decompress(data, limit + 1)
    except zlib.error:
        return None
    return None if len(out) > limit or decoder.unconsumed_tail else out


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
        "_cap",
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
        "content_encoding",
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
        #: the answer's Content-Encoding, lower-case, when it is not identity (None)
        self.content_encoding: str | None = None
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
        self._cap: float = _INF  # the most `read` takes

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
        if len(data) > self._cap:
            self._error = self._too_large()
            raise self._error
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

    def _too_large(self) -> UpstreamError:
        return UpstreamError(
            "too_large",
            f"upstream {self._label} sent an answer over {self._cap:.0f} bytes, the most "
            "the gateway reads of a non-streamed answer",
        )

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


class _Pool:
    """The connections to one origin: the idle ones, how many are open, who waits for one."""

    __slots__ = ("host", "idle", "label", "open", "port", "ssl", "waiters")

    def __init__(self, origin: Origin, ssl_context: ssl.SSLContext | None) -> None:
        self.host = origin.host
        self.port = origin.port
        self.ssl = ssl_context
        self.label = origin.label
        self.idle: list[_Conn] = []  # oldest first; the newest is used first
        self.open = 0  # connections open or opening, busy or idle
        self.waiters: deque[asyncio.Future[None]] = deque()

    def wake(self) -> None:
        """A connection was freed (pooled or closed): the longest waiting request may go."""
        waiters = self.waiters
        while waiters:
            waiter = waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class _Conn(asyncio.Protocol):
    """One connection to an origin, one exchange at a time (`resp`)."""

    __slots__ = (
        "buf",
        "chunked",
        "closed",
        "connection",
        "counted",
        "ctype",
        "decoders",
        "eof_body",
        "got",
        "head",
        "head_bytes",
        "idle_since",
        "informational",
        "keep",
        "length",
        "nbody",
        "origin",
        "parser",
        "paused",
        "pooled",
        "resp",
        "reusable",
        "reused",
        "state",
        "te",
        "transport",
        "up",
        "wpaused",
    )

    def __init__(self, up: Upstream, origin: _Pool) -> None:
        self.up = up
        self.origin = origin
        self.counted = False  # counted in `origin.open`
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
        self.te: bytes | None = None  # Transfer-Encoding, all of it
        self.connection: bytes | None = None  # Connection, all of it
        self.decoders: list[zlib._Decompress] | None = None  # for transfer codings
        self.nbody = 0  # body bytes so far (decoded)
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
        except httptools.HttpParserCallbackError as exc:
            error = exc.__context__  # raised by a callback of ours: an answer refused
            if not isinstance(error, UpstreamError):
                raise
            resp._fail(error)
            return
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
                if self.nbody > resp._cap:
                    resp._fail(resp._too_large())
                    return
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
        self.uncount()

    def uncount(self) -> None:
        """This connection no longer counts against its origin's cap."""
        if self.counted:
            self.counted = False
            self.origin.open -= 1
            self.origin.wake()

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
                self.resp.content_encoding = coding  # type: ignore[union-attr]
        self.resp.headers.append((name, value))  # type: ignore[union-attr]

    def on_headers_complete(self) -> None:
        if self.state:
            return
        status = self.parser.get_status_code()
        resp = self.resp
        assert resp is not None
        if 100 <= status < 200 and status != 101:  # 100 Continue, 103 Early Hints...: read on
            resp.headers.clear()
            resp.content_encoding = None
            self.ctype = self.te = self.connection = None
            self.length = False
            self.informational = True
            return
        label = self.origin.label
        if status == 101:  # raised: the parser stops here, the connection is closed
            raise UpstreamError(
                "invalid",
                f"upstream {label} switched protocols (101) though the request asked for no "
                "upgrade",
            )
        if not 100 <= status <= 599:
            raise UpstreamError(
                "invalid", f"upstream {label} answered with status {status}, outside 100-599"
            )
        if self.te is not None:
            self._codings(self.te)
        if self.connection is not None:
            self._strip_named(resp, self.connection)
        resp.status = status
        resp.content_type = _media_type(self.ctype)
        resp._stage = 1
        self.state = 1
        self.eof_body = not (self.length or self.chunked)
        if self.head:
            self.state = 2
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
                raise UpstreamError(
                    "invalid",
                    f"upstream {self.origin.label} sent Transfer-Encoding "
                    f"{value.decode('latin-1')!r}: the gateway decodes gzip and deflate only",
                )
            if wbits:
                decoders.append(zlib.decompressobj(wbits))
        self.decoders = decoders or None

    @staticmethod
    def _strip_named(resp: UpstreamResponse, value: bytes) -> None:
        """Headers the answer's Connection header names are hop-by-hop (RFC 9110 7.6.1)."""
        named = {t.strip().lower() for t in value.split(b",")} - {b"close", b"keep-alive", b""}
        if named:
            resp.headers[:] = [(n, v) for n, v in resp.headers if n not in named]

    def _decode(self, data: bytes) -> bytes:
        """Body bytes through the transfer decoders; each step at most the cap (+1)."""
        resp = self.resp
        assert resp is not None and self.decoders is not None
        room = int(min(resp._cap, 1 << 62)) + 1
        try:
            for decoder in self.decoders:
                data = decoder.decompress(data, room)
                if decoder.unconsumed_tail:
                    raise resp._too_large()
        except zlib.error as exc:
            raise UpstreamError(
                "broken", f"upstream answer broken: its transfer coding does not decode ({exc})"
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
                raise UpstreamError(
                    "broken", f"upstream answer broken: its transfer coding does not decode ({exc})"
                ) from None
            if not decoder.eof:
                raise UpstreamError(
                    "broken", "upstream answer broken: its transfer coding ends before its data"
                )
        return tail

    def on_body(self, body: bytes) -> None:
        if self.state == 1:
            if self.decoders is not None:
                body = self._decode(body)
            self.buf.append(body)
            self.nbody += len(body)

    def on_message_complete(self) -> None:
        if self.informational:
            self.informational = False
        elif self.state == 1:
            if self.decoders is not None:
                tail = self._decoded_end()
                if tail:
                    self.buf.append(tail)
                    self.nbody += len(tail)
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
            if self.decoders is not None:
                try:
                    tail = self._decoded_end()
                except UpstreamError as error:
                    self.resp = None
                    resp._conn = None
                    resp._fail(error)
                    return
                if tail:
                    self.buf.append(tail)
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
    """The client: `send_to` (or `send`) a request, get an `UpstreamResponse` once its head
    has come."""

    def __init__(
        self,
        timeouts: Timeouts = DEFAULT_TIMEOUTS,
        *,
        keepalive: float = DEFAULT_LIMITS.keepalive,
        max_connections: int = DEFAULT_LIMITS.max_connections,
        max_response_bytes: int = DEFAULT_LIMITS.max_response_bytes,
        ssl_context: ssl.SSLContext | None = None,
    ) -> None:
        if max_connections < 1 or keepalive < 0 or max_response_bytes < 0:
            raise ValueError("max_connections >= 1, keepalive >= 0, max_response_bytes >= 0")
        self.timeouts = timeouts
        self.keepalive = keepalive  # seconds an idle connection is kept
        self.max_connections = max_connections  # per origin
        self.max_response_bytes = max_response_bytes  # of a body read whole
        self._ssl_context = ssl_context
        self._pools: dict[str, _Pool] = {}  # Origin.key -> its connections
        self._origins: dict[str, Origin] = {}  # for `send`: scheme://authority -> Origin
        self._urls: dict[str, tuple[Origin, str]] = {}  # for `send`: url -> origin, target
        self._targets: set[str] = set()  # targets checked lately
        self._conns: set[_Conn] = set()  # every open connection, pooled or busy
        self._sweeper: asyncio.TimerHandle | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:  # connections of another loop are of no use here
                self._pools.clear()
                self._conns.clear()
                self._sweeper = None
            self._loop = loop

    async def close(self) -> None:
        """Close every connection: the idle ones, and those of exchanges in progress."""
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        for pool in self._pools.values():
            pool.idle.clear()
        for conn in list(self._conns):
            conn.pooled = False
            if conn.resp is not None:
                conn.resp._fail(UpstreamError("broken", _CLOSED))
            elif not conn.closed:
                conn.closed = True
                conn.transport.close()  # type: ignore[union-attr]
        self._conns.clear()
        await asyncio.sleep(0)  # let the transports close

    def send(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        timeout: float | None = None,
        timeouts: Timeouts | None = None,
    ) -> Coroutine[Any, Any, UpstreamResponse]:
        """`send_to` the origin and target of an absolute `url`, which must be one as it is
        (`BadTarget` otherwise, raised by this call: nothing is quoted, a fragment is not
        dropped). Not a coroutine itself: it returns the exchange's (one frame less)."""
        where = self._urls.get(url)
        if where is None:
            where = self._parse(url)
        origin, target = where
        return self._exchange(method, origin, target, headers, body, timeout, timeouts)

    def send_to(
        self,
        method: str,
        origin: Origin,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        timeout: float | None = None,
        timeouts: Timeouts | None = None,
    ) -> Coroutine[Any, Any, UpstreamResponse]:
        """Send `method origin.base_path + target` to `origin`. `target` is a path and query
        as they go out (`check_target`; `BadTarget` otherwise, raised by this call, before
        anything is sent; the exchange itself is the coroutine returned).
        `timeout` bounds the whole exchange (the route's); `timeouts` are the backend's."""
        targets = self._targets
        if target not in targets:
            check_target(target)
            if len(targets) >= _URLS_KEPT:
                targets.clear()
            targets.add(target)
        if origin.base_path:
            target = origin.base_path + target
        return self._exchange(method, origin, target, headers, body, timeout, timeouts)

    async def _exchange(
        self,
        method: str,
        origin: Origin,
        target: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        timeout: float | None,
        timeouts: Timeouts | None,
    ) -> UpstreamResponse:
        loop = self._loop
        if loop is None or loop is not asyncio.get_running_loop():
            await self.start()
            loop = self._loop
            assert loop is not None
        limits = timeouts or self.timeouts
        pool = self._pools.get(origin.key)
        if pool is None:
            pool = self._pool(origin)

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
        resp._cap = self.max_response_bytes
        now = loop.time()
        if timeout is not None:
            resp._deadline = now + timeout
        if limits.first_byte is not None:
            resp._first_byte = now + limits.first_byte
        first_at = min(resp._first_byte, resp._deadline)
        resp._arm(first_at if limits.idle is None else min(first_at, now + limits.idle))

        is_head = method == "HEAD"
        fresh = False  # the second try goes on a new connection
        try:
            idle = pool.idle
            while True:
                conn = None
                while idle and not fresh:  # the usual case, without a coroutine more
                    conn = idle.pop()
                    conn.pooled = False
                    if not conn.closed and not conn.transport.is_closing():  # type: ignore[union-attr]
                        break
                    conn = None
                if conn is None:
                    conn = await self._acquire(pool, resp, limits.connect, fresh)
                reused = conn.reused
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
                if resp._stale and reused:  # the server closed it as the request went out
                    if method in _IDEMPOTENT and not fresh:  # once more, anew
                        fresh = True
                        resp._stale = False
                        resp._error = None
                        resp._stage = 0
                        resp.headers.clear()
                        resp.content_encoding = None
                        resp._arm(min(resp._first_byte, resp._deadline))
                        continue
                    error = resp._error = UpstreamError(
                        "broken",
                        f"upstream {origin.label} closed a kept-alive connection without "
                        f"answering; the {method} request is not sent again, as it may have "
                        "reached the upstream",
                    )
                raise error
        except BaseException:  # cancelled, most likely: the connection is not left half-used
            resp._fail(UpstreamError("broken", _CLOSED))
            raise

    # --- connections ----------------------------------------------------------------------------

    def _parse(self, url: str) -> tuple[Origin, str]:
        """The origin of `url` and its request target (both checked); the last few thousand
        URLs are remembered."""
        if _URL_CONTROL.search(url) is not None:
            raise BadTarget(f"a space or a control character in the URL {url[:200]!r}")
        try:
            parts = urlsplit(url)
        except ValueError as exc:
            raise BadTarget(f"not a URL: {url[:200]!r} ({exc})") from None
        if parts.fragment or "#" in url:
            raise BadTarget(f"a fragment in the URL {url[:200]!r}: it is not sent")
        text = f"{parts.scheme}://{parts.netloc}"
        origin = self._origins.get(text)
        if origin is None:
            try:
                origin = Origin(text)
            except ValueError as exc:
                raise BadTarget(str(exc)) from None
            if len(self._origins) >= _URLS_KEPT:
                self._origins.clear()
            self._origins[text] = origin
        target = parts.path or "/"
        if parts.query or url.endswith("?"):
            target = f"{target}?{parts.query}"
        check_target(target)
        if len(self._urls) >= _URLS_KEPT:
            self._urls.clear()
        where = self._urls[url] = (origin, target)
        return where

    def _pool(self, origin: Origin) -> _Pool:
        context = None
        if origin.scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
            context = self._ssl_context
        pool = self._pools[origin.key] = _Pool(origin, context)
        return pool

    async def _acquire(
        self, pool: _Pool, resp: UpstreamResponse, connect: float | None, fresh: bool
    ) -> _Conn:
        """An idle connection (unless `fresh`), else a new one if the cap allows, else the
        first freed within the connect timeout."""
        loop = self._loop
        assert loop is not None
        idle = pool.idle
        at = connect_at = _INF
        while True:
            if resp._error is not None:  # the exchange's own timer, while it waited
                raise resp._error
            while idle and not fresh:
                conn = idle.pop()
                conn.pooled = False
                if not conn.closed and not conn.transport.is_closing():  # type: ignore[union-attr]
                    return conn
            if pool.open < self.max_connections:
                return await self._connect(pool, resp, connect)
            if at == _INF:
                connect_at = _INF if connect is None else loop.time() + connect
                at = min(connect_at, resp._first_byte, resp._deadline)
            waiter: asyncio.Future[None] = loop.create_future()
            pool.waiters.append(waiter)
            try:
                async with asyncio.timeout_at(None if at == _INF else at):
                    await waiter
            except TimeoutError:
                if waiter.done() and not waiter.cancelled():
                    pool.wake()  # woken as time ran out: the turn passes on
                if resp._error is not None:
                    raise resp._error from None
                if at == connect_at:
                    error = UpstreamError(
                        "busy",
                        f"upstream {pool.label}: all {self.max_connections} connections "
                        f"(the cap per backend) stayed busy for {connect:g}s",
                    )
                elif at == resp._first_byte:
                    error = UpstreamError("timeout", resp._no_answer())
                else:
                    error = UpstreamError("timeout", resp._route_timeout())
                resp._fail(error)
                raise error from None
            except BaseException:
                if waiter.done() and not waiter.cancelled():
                    pool.wake()
                raise
            finally:
                with contextlib.suppress(ValueError):
                    pool.waiters.remove(waiter)

    async def _connect(self, pool: _Pool, resp: UpstreamResponse, connect: float | None) -> _Conn:
        loop = self._loop
        assert loop is not None
        connect_at = _INF if connect is None else loop.time() + connect
        at = min(connect_at, resp._first_byte, resp._deadline)
        conn = _Conn(self, pool)
        pool.open += 1
        conn.counted = True
        try:
            async with asyncio.timeout_at(None if at == _INF else at):
                await loop.create_connection(
                    lambda: conn,
                    pool.host,
                    pool.port,
                    ssl=pool.ssl,
                    server_hostname=pool.host if pool.ssl is not None else None,
                )
        except TimeoutError:
            _given_up(conn)
            if resp._error is not None:  # the exchange's own timer was first
                raise resp._error from None
            if at == connect_at:
                message = f"upstream {pool.label}: no connection within {connect:g}s"
            elif at == resp._first_byte:
                message = resp._no_answer()
            else:
                message = resp._route_timeout()
            resp._fail(UpstreamError("timeout", message))
            raise UpstreamError("timeout", message) from None
        except OSError as exc:
            _given_up(conn)
            message = f"upstream {pool.label} unreachable: {_reason(exc)}"
            resp._fail(UpstreamError("unreachable", message))
            raise UpstreamError("unreachable", message) from None
        except BaseException:
            _given_up(conn)
            raise
        if resp._error is not None:  # timed out just as it connected
            conn.abort()
            raise resp._error
        return conn

    def _release(self, conn: _Conn) -> None:
        loop = self._loop
        assert loop is not None
        conn.idle_since = now = loop.time()
        conn.pooled = True
        pool = conn.origin
        pool.idle.append(conn)
        if pool.waiters:
            pool.wake()
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
        for pool in self._pools.values():
            idle = pool.idle
            while idle and now - idle[0].idle_since >= keepalive:
                conn = idle.pop(0)
                conn.pooled = False
                conn.closed = True
                conn.transport.close()  # type: ignore[union-attr]
            if idle:
                next_at = min(next_at, idle[0].idle_since + keepalive)
        if next_at != _INF:
            self._sweeper = loop.call_at(next_at, self._sweep)


def _given_up(conn: _Conn) -> None:
    """A connection attempt abandoned: it stops counting against the cap (at once, or when
    its transport, if it has one, is closed)."""
    if conn.transport is None:
        conn.closed = True
        conn.uncount()
    else:
        conn.abort()


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
    method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes, origin: Origin
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
