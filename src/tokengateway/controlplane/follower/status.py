"""Status written back to the API server by the one replica that holds the Lease.

What is written is what this replica computed for the objects it serves (the same
conditions `kubectl get` shows on a gateway that is its own control plane): Gateways'
Accepted/Programmed, listeners and address, HTTPRoutes' parents, policies'
Accepted/Enforced with Kuadrant's reasons. An object that does not validate gets
Accepted=False with reason Invalid. Objects of another GatewayClass are never touched.

A status is written (merge patch of the `status` subresource) when it differs from what
the server shows and from what this replica last wrote: a server that prunes or rewrites a
field therefore costs one write per change, never a loop.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from lightkube import ApiError
from lightkube.types import PatchType

from tokengateway.config.status import now

from .informer import ObjectKey, resource_class
from .kinds import WATCHED, WatchedKind

__all__ = ["StatusWriter", "desired_statuses"]

log = logging.getLogger("tokengateway.follower")

WRITTEN: dict[str, WatchedKind] = {k.kind: k for k in WATCHED if k.writes_status}


def _invalid(obj: Mapping[str, Any], problem: str) -> dict[str, Any]:
    generation = int((obj.get("metadata") or {}).get("generation") or 1)
    return {
        "conditions": [
            {
                "type": "Accepted",
                "status": "False",
                "reason": "Invalid",
                "message": problem,
                "lastTransitionTime": now(),
                "observedGeneration": generation,
            }
        ]
    }


def desired_statuses(
    statuses: Mapping[Any, Any],
    skipped: Mapping[ObjectKey, str],
    objects: Mapping[ObjectKey, Mapping[str, Any]],
    address: str | None,
) -> dict[ObjectKey, dict[str, Any]]:
    """What each object whose status we own should show."""
    out: dict[ObjectKey, dict[str, Any]] = {}
    for key, status in statuses.items():
        if key[0] not in WRITTEN or key not in objects:
            continue
        shown = status.as_dict() if hasattr(status, "as_dict") else dict(status)
        if key[0] == "Gateway" and address:
            shown["addresses"] = [{"type": "IPAddress", "value": address}]
        out[key] = shown
    for key, problem in skipped.items():
        if key[0] in WRITTEN and key in objects:
            out[key] = _invalid(objects[key], problem)
    return out


def _same(desired: Mapping[str, Any], shown: Mapping[str, Any] | None) -> bool:
    """Whether `shown` already says what `desired` says (transition times aside)."""
    if not isinstance(shown, Mapping):
        return False
    return all(_strip(shown.get(k)) == _strip(v) for k, v in desired.items())


def _strip(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {k: _strip(v) for k, v in value.items() if k != "lastTransitionTime"}
    if isinstance(value, list):
        return [_strip(v) for v in value]
    return value


class StatusWriter:
    def __init__(self, client: Any) -> None:
        self.client = client
        self.writes = 0
        self.errors = 0
        self._written: dict[ObjectKey, Any] = {}
        self._res = {kind: resource_class(k) for kind, k in WRITTEN.items()}

    def forget(self) -> None:
        """Leadership was lost or taken anew: compare with the server afresh."""
        self._written.clear()

    async def write(
        self,
        desired: Mapping[ObjectKey, dict[str, Any]],
        objects: Mapping[ObjectKey, Mapping[str, Any]],
    ) -> int:
        """Patch every status that needs it; how many were written."""
        count = 0
        for key, status in desired.items():
            wanted = _strip(status)
            if self._written.get(key) == wanted:
                continue
            if _same(status, objects.get(key, {}).get("status")):
                self._written[key] = wanted
                continue
            kind, namespace, name = key
            try:
                await self.client.patch(
                    self._res[kind].Status,
                    name,
                    {"status": status},
                    namespace=namespace or None,
                    patch_type=PatchType.MERGE,
                )
            except ApiError as exc:
                self.errors += 1
                if exc.status.code != 404:  # deleted meanwhile: nothing to say
                    log.warning("status of %s %s/%s: %s", kind, namespace, name, exc)
                continue
            self._written[key] = wanted
            self.writes += 1
            count += 1
        return count
