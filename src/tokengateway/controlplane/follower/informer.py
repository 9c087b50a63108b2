"""One kind of a Kubernetes API, kept as a local copy: list, then watch from the list's
resourceVersion, as a client-go informer does.

- The watch asks for bookmarks, so a quiet kind's resourceVersion stays recent and a
  reconnect rarely finds it expired.
- A watch that ends (the server's timeout) is opened again from the last version seen.
- `410 Gone` (the version left the server's history) lists again and replaces the copy,
  so an object deleted meanwhile is dropped too: nothing is missed.
- Any other failure (the server away, a refused connection, an error answer) is counted,
  waited out with a growing backoff, and followed by a new list. The copy is kept
  meanwhile: what it held is what the gateway serves.

The client is lightkube's (`AsyncClient`); `Informer` only knows which objects it holds.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import random
import time
from collections.abc import Callable, Mapping
from typing import Any

from lightkube import ALL_NS, ApiError, AsyncClient
from lightkube.generic_resource import create_global_resource, create_namespaced_resource
from lightkube.types import on_error_raise

from .kinds import WatchedKind

__all__ = ["Informer", "ObjectKey", "resource_class"]

log = logging.getLogger("tokengateway.follower")

ObjectKey = tuple[str, str, str]  # (kind, namespace, name); namespace "" when cluster-scoped

#: how long one watch request may stay open before the server ends it (and we open another)
WATCH_SECONDS = 290
BACKOFF_FIRST = 0.2
BACKOFF_MAX = 5.0


@functools.cache
def resource_class(kind: WatchedKind) -> Any:
    """lightkube's generic resource for a kind: objects come back as plain dicts. Made once
    per process: lightkube's registry refuses a second class for a core kind."""
    if kind.namespaced:
        return create_namespaced_resource(kind.group, kind.version, kind.kind, kind.plural)
    return create_global_resource(kind.group, kind.version, kind.kind, kind.plural)


class Informer:
    """The objects of one kind, as of `version`; `on_change()` is called after every
    change to them (a list that replaced them, or one watch event)."""

    def __init__(
        self,
        client: AsyncClient,
        kind: WatchedKind,
        on_change: Callable[[], None],
        keep: Callable[[Mapping[str, Any]], bool] | None = None,
    ) -> None:
        self.client = client
        self.kind = kind
        self.res = resource_class(kind)
        self.on_change = on_change
        #: which objects are held (Secrets: only those a policy selects); None: all
        self.keep = keep
        self.objects: dict[ObjectKey, dict[str, Any]] = {}
        self.version: str | None = None
        self.synced = asyncio.Event()
        self.errors = 0
        self.relists = 0
        self.last_error = ""
        self.connected = False
        #: monotonic time of the first failure since the last good list; None while fine
        self.down_since: float | None = None
        self._relist = asyncio.Event()

    def relist(self) -> None:
        """List again soon (e.g. the selection `keep` makes has changed)."""
        self._relist.set()

    def _key(self, obj: Mapping[str, Any]) -> ObjectKey:
        meta = obj.get("metadata") or {}
        namespace = str(meta.get("namespace") or "") if self.kind.namespaced else ""
        return (self.kind.kind, namespace, str(meta.get("name") or ""))

    def _held(self, obj: Mapping[str, Any]) -> bool:
        return self.keep is None or self.keep(obj)

    async def run(self) -> None:
        """List, then watch, until cancelled. A watch the server ended (its timeout) goes on
        from the last version; after a failure the kind is listed again. A run started
        with a version already known (a restarted informer) watches on from it."""
        backoff = BACKOFF_FIRST
        must_list = self.version is None
        while True:
            try:
                if must_list or self._relist.is_set():
                    await self._list()
                must_list = True  # unless the watch below ends as the server ends it
                backoff = BACKOFF_FIRST
                await self._watch()
                must_list = False
                continue
            except asyncio.CancelledError:
                raise
            except ApiError as exc:
                if exc.status.code == 410:  # expired: list again at once, nothing is missed
                    self.relists += 1
                    log.info("%s: watch expired (410), listing again", self.kind.plural)
                    continue
                self._failed(f"{exc.status.code} {exc.status.message}")
            except _Relist:
                continue
            except Exception as exc:  # the server away, a reset connection, a bad answer
                self._failed(f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(backoff * (0.5 + random.random()))
            backoff = min(BACKOFF_MAX, backoff * 2)

    def _failed(self, message: str) -> None:
        self.errors += 1
        self.connected = False
        if self.down_since is None:
            self.down_since = time.monotonic()
        if message != self.last_error:
            log.warning("%s: %s; serving what was last seen", self.kind.plural, message)
        self.last_error = message

    def _connected(self) -> None:
        self.connected = True
        self.down_since = None
        self.last_error = ""

    async def _list(self) -> None:
        self._relist.clear()
        listing = self.client.list(self.res, namespace=ALL_NS if self.kind.namespaced else None)
        objects: dict[ObjectKey, dict[str, Any]] = {}
        async for item in listing:
            obj = _plain(item, self.kind)
            if self._held(obj):
                objects[self._key(obj)] = obj
        self.version = _list_version(listing)
        self._connected()
        if objects != self.objects or not self.synced.is_set():
            self.objects = objects
            self.synced.set()
            self.on_change()

    async def _watch(self) -> None:
        # lightkube's `watch()` has no parameter for bookmarks; its own request builder
        # and watch driver take any query parameter (the version is pinned in the lock)
        inner = self.client._client
        params: dict[str, Any] = {
            "resourceVersion": self.version,
            "allowWatchBookmarks": "true",
            "timeoutSeconds": WATCH_SECONDS,
        }
        request = inner.prepare_request(
            "list",
            res=self.res,
            namespace=ALL_NS if self.kind.namespaced else None,
            watch=True,
            params=params,
        )
        relist = asyncio.ensure_future(self._relist.wait())
        try:
            async for event, item in _until(inner.watch(request, on_error=on_error_raise), relist):
                if not self.connected:
                    self._connected()
                version = (item.get("metadata") or {}).get("resourceVersion")
                if version:
                    self.version = str(version)
                if event == "BOOKMARK":
                    continue
                obj = _plain(item, self.kind)
                key = self._key(obj)
                if event == "DELETED" or not self._held(obj):
                    if self.objects.pop(key, None) is None:
                        continue
                elif event in ("ADDED", "MODIFIED"):
                    self.objects[key] = obj
                else:
                    continue
                self.on_change()
        finally:
            relist.cancel()


class _Relist(Exception):
    """Raised out of a watch when `relist()` was asked for."""


async def _until(events: Any, stop: asyncio.Future[Any]) -> Any:
    """The events of a watch until `stop` is done (then `_Relist`). Each step runs as a
    task, so it is awaited to its end (cancelled if need be) before the watch is closed:
    a generator cannot be closed while a step of it runs."""
    iterator = events.__aiter__()
    step: asyncio.Future[Any] | None = None
    try:
        while True:
            step = asyncio.ensure_future(iterator.__anext__())
            await asyncio.wait([step, stop], return_when=asyncio.FIRST_COMPLETED)
            if not step.done():
                raise _Relist
            try:
                item = step.result()
            except StopAsyncIteration:
                return
            yield item
    finally:
        if step is not None and not step.done():
            step.cancel()
            await asyncio.gather(step, return_exceptions=True)
        await iterator.aclose()


def _list_version(listing: Any) -> str | None:
    """The list's resourceVersion (lightkube knows it once the first page is read)."""
    try:
        return str(listing.resourceVersion) or None
    except Exception:  # lightkube's NotReadyError: the answer had no version
        return None


def _plain(item: Any, kind: WatchedKind) -> dict[str, Any]:
    """A watched object as a plain dict, with the kind and apiVersion a list's items omit."""
    obj = item.to_dict() if hasattr(item, "to_dict") else dict(item)
    obj["apiVersion"] = obj.get("apiVersion") or kind.api_version
    obj["kind"] = obj.get("kind") or kind.kind
    return obj
