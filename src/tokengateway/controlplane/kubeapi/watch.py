"""What a watch sends besides the objects' events: BOOKMARK and the ERROR of an expired
resourceVersion, as the API server sends them.

The events themselves come from the control plane's history (controlplane/history.py); the
handler replays those after the client's resourceVersion and then follows new ones as they
are recorded.
"""

from __future__ import annotations

from typing import Any

from tokengateway.controlplane.history import Expired

from .status import KubeError

__all__ = ["BOOKMARK_SECONDS", "bookmark", "expired", "next_bookmark"]

#: how often a watch with `allowWatchBookmarks=true` gets a BOOKMARK (the API server's
#: watch cache sends one about every minute, and one shortly before the watch times out)
BOOKMARK_SECONDS = 60.0
#: the bookmark before the end comes this long before `timeoutSeconds` is up
BEFORE_TIMEOUT = 2.0


def next_bookmark(now: float, deadline: float) -> float:
    """When the next BOOKMARK is due: a minute from now, or just before the deadline."""
    before_end = deadline - BEFORE_TIMEOUT
    if before_end <= now:
        return deadline + 1  # too close to the end: none
    return min(now + BOOKMARK_SECONDS, before_end)


def bookmark(kind: str, api_version: str, version: int) -> dict[str, Any]:
    """A BOOKMARK's object: only kind, apiVersion and the resourceVersion reached."""
    return {"kind": kind, "apiVersion": api_version, "metadata": {"resourceVersion": str(version)}}


def expired(exc: Expired) -> dict[str, Any]:
    """The Status of an ERROR event: 410 Expired, so the client lists again."""
    return KubeError(410, str(exc), reason="Expired").status()
