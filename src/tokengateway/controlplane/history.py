"""The objects as clients see them, each with its resourceVersion, and what changed lately.

Every change of the control plane (`ControlPlane._commit`, whatever thread it runs in) hands
`History.record` the whole new set of shown objects: manifest, server metadata, status. The
difference with the previous set becomes ADDED, MODIFIED and DELETED events, each with the
object at a new resourceVersion, kept in a bounded ring (`HISTORY_SIZE` events, every kind
together), as the API server's watch cache keeps them. A status change is a change like any
other: a policy turning `Enforced` is a MODIFIED event.

A watch reads `since(N)`: the events after N, or `Expired` when the ring no longer holds
them (its `oldest` is newer than N), then waits on its `Waiter`, which `record` wakes with
`loop.call_soon_threadsafe`: no polling.

resourceVersions are integers that only grow. `start` is where they begin: the last one
given before a restart (kept in the state directory by the control plane) or the clock in
microseconds, whichever is larger.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import threading
import time
from collections import deque
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

__all__ = ["HISTORY_SIZE", "Event", "Expired", "History", "Waiter"]

#: events kept for watches that resume from a resourceVersion (every kind together)
HISTORY_SIZE = 1000

Key = tuple[str, str, str]  # (kind, namespace, name)


@dataclass(frozen=True, slots=True)
class Event:
    version: int
    type: str  # ADDED | MODIFIED | DELETED
    key: Key
    object: dict[str, Any]  # metadata.resourceVersion == str(version); never changed after


class Expired(Exception):
    """The resourceVersion asked for is older than the history holds (HTTP 410 Gone)."""

    def __init__(self, asked: int, oldest: int) -> None:
        super().__init__(f"too old resource version: {asked} ({oldest})")
        self.asked = asked
        self.oldest = oldest


class Waiter:
    """One watch's wake-up: an asyncio.Event set from any thread when an event is recorded."""

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        self.loop = loop
        self.event = asyncio.Event()

    def wake(self) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody waits any more
            self.loop.call_soon_threadsafe(self.event.set)


class History:
    def __init__(self, start: int | None = None, size: int = HISTORY_SIZE) -> None:
        self._last = max(start or 0, time.time_ns() // 1000)
        #: events after this version are all in the ring
        self._oldest = self._last
        self._events: deque[Event] = deque()
        self._size = size
        self._objects: dict[Key, dict[str, Any]] = {}
        self._lock = threading.Lock()
        self._waiters: set[Waiter] = set()
        #: set when the server stops: every watch ends its answer, as the API server's do
        self.closed = False

    @property
    def last(self) -> int:
        """The newest resourceVersion given: what a list is as recent as."""
        return self._last

    @property
    def oldest(self) -> int:
        return self._oldest

    def record(self, objects: Mapping[Key, dict[str, Any]]) -> list[Event]:
        """Make `objects` the current set; every difference becomes an event with a new
        resourceVersion. The objects are taken, not copied: they must not change after."""
        with self._lock:
            events = []
            for key, obj in objects.items():
                before = self._objects.get(key)
                if before is not None and _unversioned(before) == obj:
                    objects_meta(obj)["resourceVersion"] = objects_meta(before)["resourceVersion"]
                    continue
                self._last += 1
                objects_meta(obj)["resourceVersion"] = str(self._last)
                kind = "ADDED" if before is None else "MODIFIED"
                events.append(Event(self._last, kind, key, obj))
            for key, before in self._objects.items():
                if key not in objects:
                    self._last += 1
                    gone = copy.deepcopy(before)
                    objects_meta(gone)["resourceVersion"] = str(self._last)
                    events.append(Event(self._last, "DELETED", key, gone))
            self._objects = dict(objects)
            self._events.extend(events)
            while len(self._events) > self._size:
                self._oldest = self._events.popleft().version
            waiters = list(self._waiters) if events else []
        for waiter in waiters:
            waiter.wake()
        return events

    def objects(self) -> dict[Key, dict[str, Any]]:
        """The current objects (shared: copy before changing one)."""
        return self._objects

    def snapshot(self) -> tuple[int, dict[Key, dict[str, Any]]]:
        """The current objects and the version they are as of, taken together."""
        with self._lock:
            return self._last, self._objects

    def since(self, version: int) -> tuple[int, list[Event]]:
        """The events after `version` and the last version they reach; `Expired` when some
        of them are no longer held."""
        with self._lock:
            if version < self._oldest:
                raise Expired(version, self._oldest)
            found = [e for e in self._events if e.version > version]
            return max(self._last, version), found

    def close(self) -> None:
        """The server is stopping: wake every watch, which then ends (its client reconnects
        elsewhere or later) instead of holding the graceful stop for its whole timeout."""
        with self._lock:
            self.closed = True
            waiters = list(self._waiters)
        for waiter in waiters:
            waiter.wake()

    @contextlib.contextmanager
    def waiter(self) -> Iterator[Waiter]:
        """A Waiter woken at each recorded change, for as long as the `with` lasts."""
        waiter = Waiter(asyncio.get_running_loop())
        with self._lock:
            self._waiters.add(waiter)
        try:
            yield waiter
        finally:
            with self._lock:
                self._waiters.discard(waiter)


def objects_meta(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj.get("metadata")
    if not isinstance(meta, dict):
        meta = obj["metadata"] = {}
    return meta


def _unversioned(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` without its resourceVersion, to compare with a new object not yet given one."""
    meta = {k: v for k, v in (obj.get("metadata") or {}).items() if k != "resourceVersion"}
    return {**obj, "metadata": meta}
