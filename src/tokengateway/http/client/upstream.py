"""The client itself: `Upstream`, a pool per origin, an exchange per try of a request."""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Coroutine, Sequence
from typing import Any
from urllib.parse import urlsplit

from tokengateway.http.client.connection import Connection, Pool
from tokengateway.http.client.errors import (
    BadTarget,
    UpstreamAborted,
    UpstreamClosed,
)
from tokengateway.http.client.exchange import Exchange, Stage, UpstreamResponse
from tokengateway.http.client.request import (
    DEFAULT_LIMITS,
    DEFAULT_TIMEOUTS,
    JOIN_BODY,
    URL_CONTROL,
    Origin,
    Timeouts,
    check_target,
    request_head,
)

__all__ = ["Upstream"]

#: URLs (and targets) whose origin and target are remembered (then forgotten all at once).
_URLS_KEPT = 4096
#: Methods sent once more after the keep-alive race (RFC 9110 section 9.2.2); never POST.
_IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "TRACE", "PUT", "DELETE"})
_INF = float("inf")
_HEAD = Stage.HEAD


class Upstream:
    """The client: `send_to` (or `send`) a request, get an `UpstreamResponse` once its head
    has come. It keeps a `Pool` per origin, whose connections idle for `keepalive` seconds
    are closed."""

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
        self._pools: dict[str, Pool] = {}  # Origin.key -> its connections
        self._origins: dict[str, Origin] = {}  # for `send`: scheme://authority -> Origin
        self._urls: dict[str, tuple[Origin, str]] = {}  # for `send`: url -> origin, target
        self._targets: set[str] = set()  # targets checked lately
        self._loop: asyncio.AbstractEventLoop | None = None

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            if self._loop is not None:  # connections of another loop are of no use here
                self._pools.clear()
            self._loop = loop

    async def close(self) -> None:
        """Close every connection: the idle ones, and those of exchanges in progress."""
        for pool in self._pools.values():
            pool.close()
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
        """One request: an exchange on a connection of the origin's pool, and, after the
        keep-alive race on a reused connection, for an idempotent method, one more on a new
        connection (a fresh exchange, under the same deadlines)."""
        loop = self._loop
        if loop is None or loop is not asyncio.get_running_loop():
            await self.start()
            loop = self._loop
            assert loop is not None
        limits = timeouts or self.timeouts
        pool = self._pools.get(origin.key)
        if pool is None:
            pool = self._pool(origin, loop)

        head = request_head(method, target, headers, body, origin)
        if len(body) <= JOIN_BODY:
            head += body
            rest = b""
        else:
            rest = body

        now = loop.time()
        exchange = Exchange(
            loop,
            origin.label,
            limits,
            timeout,
            self.max_response_bytes,
            _INF if limits.first_byte is None else now + limits.first_byte,
            _INF if timeout is None else now + timeout,
            now,
        )
        is_head = method == "HEAD"
        fresh = False  # the second try goes on a new connection
        try:
            while True:
                conn: Connection | None = None if fresh else pool.take()
                if conn is None:
                    conn = await pool.acquire(exchange, limits.connect, fresh)
                conn.begin(exchange, is_head)
                conn.transport.write(head)  # type: ignore[union-attr]
                if rest:
                    await conn.write_body(exchange, rest)
                while exchange.stage is _HEAD:
                    await exchange.waiter()
                error = exchange.error
                if error is None:
                    return exchange
                if exchange.retryable:  # the server closed it as the request went out
                    if method in _IDEMPOTENT and not fresh:  # once more, anew
                        fresh = True
                        exchange = exchange.again(loop.time())
                        continue
                    error = exchange.error = UpstreamClosed(
                        f"upstream {origin.label} closed a kept-alive connection without "
                        f"answering; the {method} request is not sent again, as it may have "
                        "reached the upstream"
                    )
                raise error
        except BaseException:  # cancelled, most likely: the connection is not left half-used
            exchange.fail(UpstreamAborted())
            raise

    # --- connections ----------------------------------------------------------------------------

    def _parse(self, url: str) -> tuple[Origin, str]:
        """The origin of `url` and its request target (both checked); the last few thousand
        URLs are remembered."""
        if URL_CONTROL.search(url) is not None:
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

    def _pool(self, origin: Origin, loop: asyncio.AbstractEventLoop) -> Pool:
        # pools left empty are dropped as a new one is made (rarely: a new origin, or new TLS
        # settings after a reload), so CA rotations do not pile up pools and their contexts
        for key in [k for k, p in self._pools.items() if p.open == 0 and not p.waiters]:
            del self._pools[key]
        context = None
        if origin.tls is not None:
            context = origin.tls.context
        elif origin.scheme == "https":
            if self._ssl_context is None:
                self._ssl_context = ssl.create_default_context()
            context = self._ssl_context
        pool = self._pools[origin.key] = Pool(
            origin, context, loop, self.max_connections, self.max_response_bytes, self.keepalive
        )
        return pool
