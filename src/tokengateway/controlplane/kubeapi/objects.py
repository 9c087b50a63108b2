"""Objects as Kubernetes keeps them: server-set metadata in, server-set metadata out.

The control plane keeps each manifest as applied, with uid, creationTimestamp and generation,
and its history gives each object its `resourceVersion`. Here that server-set metadata is
stripped again from what a client writes, so a GET → edit → PUT round trip stores only the
manifest.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["SERVER_METADATA", "writable"]

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
