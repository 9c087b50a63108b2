"""Fetching the identity providers' keys for `jwt` rules, off the request path; and the
calls to token introspection endpoints (`post`) for `oauth2Introspection` rules and to
the services of `metadata` rules (`send`).

Verifying a token is synchronous and reads only the key sets in memory (auth/jwt.py); this
module fills them on the gateway's event loop, with the upstream HTTP client:

- at start-up, before the first request is served, every key set of the configuration
  is fetched (each within its rule's timeout, 5 s by default);
- then, once a second, any set that is due is fetched again: every `ttl` seconds when the
  rule has one, and, while a set has no keys or its last fetch failed, with a backoff of
  1 s doubling up to 30 s. A set that a reloaded configuration brings is fetched at the
  next tick; a reload keeps the sets whose source did not change, keys and all;
- a request whose token names a key the set does not have (the provider rotated its
  keys) waits for one refresh of that set, at most one per 10 s per set, shared by the
  requests that need it, and is decided again (`GatewayApp._authorize`).

A failed fetch keeps the keys the set had: tokens keep verifying while the provider is
down. A set that never got keys answers every token with a 401 saying so.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable

from tokengateway.auth import KeySet
from tokengateway.http.client import BadTarget, Timeouts, Upstream, UpstreamError

__all__ = ["KeyFetcher"]

log = logging.getLogger("tokengateway.gateway")

#: seconds between two looks at which key sets are due
TICK = 1.0


class KeyFetcher:
    """Fetches discovery documents and JWKS for the key sets of the configuration in force."""

    def __init__(self, upstream: Upstream) -> None:
        self.upstream = upstream
        self._task: asyncio.Task[None] | None = None

    async def fetch(self, url: str, timeout: float) -> bytes:
        """The body of a 200 answer to `GET url` (auth/jwt.py's `Fetch`)."""
        timeouts = Timeouts(connect=timeout, first_byte=timeout, idle=timeout)
        try:
            response = await self.upstream.send(
                "GET", url, [("accept", "application/json")], b"", timeout, timeouts
            )
            body = await response.read()
        except (UpstreamError, BadTarget) as exc:
            raise OSError(f"GET {url}: {exc}") from None
        if response.status != 200:
            raise OSError(f"GET {url}: HTTP {response.status}")
        return body

    async def post(
        self, url: str, headers: list[tuple[str, str]], body: bytes, timeout: float
    ) -> tuple[int, bytes]:
        """POST `body` to `url`: the answer's status and body (auth/introspection.py's
        `Post`, for token introspection)."""
        timeouts = Timeouts(connect=timeout, first_byte=timeout, idle=timeout)
        try:
            response = await self.upstream.send("POST", url, headers, body, timeout, timeouts)
            return response.status, await response.read()
        except (UpstreamError, BadTarget) as exc:
            raise OSError(f"POST {url}: {exc}") from None

    async def send(
        self, method: str, url: str, headers: list[tuple[str, str]], body: bytes, timeout: float
    ) -> tuple[int, str, bytes]:
        """Any request: the answer's status, media type and body (auth/metadata.py's
        `Send`, for metadata rules)."""
        timeouts = Timeouts(connect=timeout, first_byte=timeout, idle=timeout)
        try:
            response = await self.upstream.send(method, url, headers, body, timeout, timeouts)
            return response.status, response.content_type, await response.read()
        except (UpstreamError, BadTarget) as exc:
            raise OSError(f"{method} {url.split('?')[0]}: {exc}") from None

    async def load(self, key_sets: Iterable[KeySet]) -> None:
        """Fetch every set that has no keys yet, together; failures are logged, not raised."""
        pending = [keys for keys in key_sets if not keys.loaded]
        if pending:
            await asyncio.gather(*(keys.refresh(self.fetch) for keys in pending))
            for keys in pending:
                if not keys.loaded:
                    log.warning("jwt: no keys from %s yet: %s", keys.source, keys.error)

    def start(self, key_sets: Callable[[], Iterable[KeySet]]) -> None:
        """Refresh the sets `key_sets()` names (the configuration in force) as they fall due."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(key_sets))

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def _run(self, key_sets: Callable[[], Iterable[KeySet]]) -> None:
        while True:
            await asyncio.sleep(TICK)
            due = [keys for keys in key_sets() if keys.due() <= 0]
            for keys, ok in zip(
                due, await asyncio.gather(*(k.refresh(self.fetch) for k in due)), strict=True
            ):
                if keys.error is not None:
                    log.warning(
                        "jwt: refreshing the keys of %s failed (%s); %s",
                        keys.source,
                        keys.error,
                        "the keys fetched before stay in use" if ok else "no keys yet",
                    )

    async def refresh_for(self, key_sets: Iterable[KeySet]) -> bool:
        """One rate-limited refresh of each set a token found lacking; True when any of
        them was fetched (the decision may change)."""
        sets = list(dict.fromkeys(key_sets))
        before = [keys.generation for keys in sets]
        await asyncio.gather(*(keys.refresh(self.fetch, forced=True) for keys in sets))
        return any(keys.generation != old for keys, old in zip(sets, before, strict=True))
