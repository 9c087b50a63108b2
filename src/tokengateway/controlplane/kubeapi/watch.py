"""Watch events from snapshots: what changed between two looks at a kind's objects.

The control plane does not publish events, so a watch looks at the objects every few
hundred milliseconds (`POLL_SECONDS`) and turns the difference into ADDED, MODIFIED and
DELETED events, as Kubernetes would have sent them. Two changes between two looks come out
as one MODIFIED: a client sees the latest state, which is what `kubectl get -w` and
`kubectl wait` need.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["POLL_SECONDS", "Snapshots"]

POLL_SECONDS = 0.25

Key = tuple[str, str]  # (namespace, name)


def _key(obj: dict[str, Any]) -> Key:
    meta = obj.get("metadata") or {}
    return (str(meta.get("namespace", "")), str(meta.get("name", "")))


def _version(obj: dict[str, Any]) -> int:
    return int((obj.get("metadata") or {}).get("resourceVersion") or 0)


class Snapshots:
    """Remembers the last look; `since` says how the next differs from it."""

    def __init__(self, objects: Iterable[dict[str, Any]], after: int | None) -> None:
        """`after`: the resourceVersion a client has seen (from its list); objects newer
        than it are reported at once. None: everything is new (ADDED), as for
        `resourceVersion=0` or none."""
        self._last: dict[Key, dict[str, Any]] = {}
        self.first: list[tuple[str, dict[str, Any]]] = []
        for obj in objects:
            self._last[_key(obj)] = obj
            if after is None:
                self.first.append(("ADDED", obj))
            elif _version(obj) > after:
                self.first.append(("MODIFIED", obj))

    def since(self, objects: Iterable[dict[str, Any]]) -> list[tuple[str, dict[str, Any]]]:
        now = {_key(o): o for o in objects}
        events = []
        for key, obj in now.items():
            before = self._last.get(key)
            if before is None:
                events.append(("ADDED", obj))
            elif _version(before) != _version(obj):
                events.append(("MODIFIED", obj))
        events += [("DELETED", obj) for key, obj in self._last.items() if key not in now]
        self._last = now
        return events
