"""Objects as Kubernetes keeps them: server-set metadata in, server-set metadata out.

The control plane keeps each manifest as applied, with uid, creationTimestamp and generation.
Here the rest is added for clients that read it (`resourceVersion`), and stripped again from
what a client writes, so a GET → edit → PUT round trip stores only the manifest.
"""

from __future__ import annotations

import copy
import hashlib
import json
import threading
import time
from typing import Any

__all__ = ["SERVER_METADATA", "ResourceVersions", "writable"]

#: metadata the server sets; ignored in what a client sends
SERVER_METADATA = (
    "uid",
    "creationTimestamp",
    "generation",
    "resourceVersion",
    "managedFields",
    "selfLink",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
)


def writable(obj: dict[str, Any]) -> dict[str, Any]:
    """What a create, update or patch stores: the object without status (a subresource
    here, as on Kubernetes for Kuadrant's CRDs) and without server-set or null metadata."""
    out = {k: copy.deepcopy(v) for k, v in obj.items() if k != "status"}
    meta = out.get("metadata")
    if isinstance(meta, dict):
        out["metadata"] = {
            k: v for k, v in meta.items() if k not in SERVER_METADATA and v is not None
        }
    return out


class ResourceVersions:
    """A monotonic `resourceVersion` per object, bumped whenever what a GET shows changes.

    Versions start from the clock in microseconds, so they keep increasing across restarts
    without being stored (unless the clock goes back). Stamped when an object is read: an
    object changed twice between two reads gets one new version, which a client cannot tell.
    """

    def __init__(self) -> None:
        self._last = time.time_ns() // 1000
        self._seen: dict[tuple[str, str, str], tuple[str, int]] = {}
        self._lock = threading.Lock()

    @property
    def current(self) -> str:
        return str(self._last)

    def stamp(self, key: tuple[str, str, str], obj: dict[str, Any]) -> None:
        meta = obj.setdefault("metadata", {})
        meta.pop("resourceVersion", None)
        digest = hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()
        with self._lock:
            seen = self._seen.get(key)
            if seen is None or seen[0] != digest:
                self._last += 1
                seen = (digest, self._last)
                self._seen[key] = seen
        meta["resourceVersion"] = str(seen[1])
