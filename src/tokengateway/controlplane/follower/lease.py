"""One writer among N replicas: a coordination.k8s.io/v1 Lease, held as client-go's leader
election holds it.

- No Lease: create it with us as holder (a 409 means another replica was first).
- We hold it: renew `renewTime` every `retry` seconds. Every write carries the Lease's
  resourceVersion, so of two replicas writing at once the server lets one through (409 for
  the other).
- Another replica holds it: take it over only when its holder has not renewed it for a
  whole `leaseDurationSeconds`, measured on our own clock from when we last saw the Lease
  change (never by comparing the holder's timestamps with our clock, which may differ).
- We stop counting ourselves the holder a whole duration after our last successful renew,
  even if the API server cannot be reached to say so: by then another replica may hold it.
"""

from __future__ import annotations

import asyncio
import datetime
import logging
import time
from typing import Any

from lightkube import ApiError

from .informer import resource_class
from .kinds import LEASE

__all__ = ["LeaseElector", "micro_time"]

log = logging.getLogger("tokengateway.follower")


def micro_time() -> str:
    """Kubernetes' MicroTime: RFC 3339 in UTC with microseconds."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class LeaseElector:
    def __init__(
        self, client: Any, name: str, namespace: str, identity: str, duration: float
    ) -> None:
        self.client = client
        self.name = name
        self.namespace = namespace
        self.identity = identity
        self.duration = duration
        #: how often the Lease is renewed or looked at (client-go: ~ a third of the duration)
        self.retry = max(0.2, duration / 3)
        self.res = resource_class(LEASE)
        self._renewed = float("-inf")  # monotonic time of our last successful write
        #: what we last saw of the Lease, and when (on our clock) it last changed
        self._seen: tuple[str, str, float] | None = None  # (holder, renewTime, seen at)
        self.changed = asyncio.Event()  # set whenever leadership starts or ends
        self._was_leader = False

    @property
    def is_leader(self) -> bool:
        return time.monotonic() < self._renewed + self.duration

    async def run(self) -> None:
        while True:
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the API server away: keep trying, lose it in time
                log.debug("lease %s/%s: %s", self.namespace, self.name, exc)
            self._note()
            await asyncio.sleep(self.retry)

    def _note(self) -> None:
        leader = self.is_leader
        if leader != self._was_leader:
            self._was_leader = leader
            log.warning(
                "%s %s the status writer (Lease %s/%s)",
                self.identity,
                "is now" if leader else "is no longer",
                self.namespace,
                self.name,
            )
            self.changed.set()

    async def _round(self) -> None:
        try:
            lease = await self.client.get(self.res, self.name, namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code != 404:
                raise
            await self._create()
            return
        spec = dict(lease.get("spec") or {})
        holder = str(spec.get("holderIdentity") or "")
        renew = str(spec.get("renewTime") or "")
        now = time.monotonic()
        if self._seen is None or self._seen[:2] != (holder, renew):
            self._seen = (holder, renew, now)
        if holder and holder != self.identity:
            duration = float(spec.get("leaseDurationSeconds") or self.duration)
            if now < self._seen[2] + duration:
                return  # held by a live replica
        body = lease.to_dict() if hasattr(lease, "to_dict") else dict(lease)
        new_spec = dict(spec)
        stamp = micro_time()
        if holder != self.identity:
            new_spec["acquireTime"] = stamp
            new_spec["leaseTransitions"] = int(spec.get("leaseTransitions") or 0) + (
                1 if holder else 0
            )
        new_spec["holderIdentity"] = self.identity
        new_spec["leaseDurationSeconds"] = max(1, round(self.duration))
        new_spec["renewTime"] = stamp
        body["spec"] = new_spec
        started = time.monotonic()
        try:
            await self.client.replace(self.res.from_dict(body), namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code == 409:  # another replica wrote it first: look again
                return
            raise
        self._renewed = started

    async def _create(self) -> None:
        stamp = micro_time()
        body = {
            "apiVersion": LEASE.api_version,
            "kind": LEASE.kind,
            "metadata": {"name": self.name, "namespace": self.namespace},
            "spec": {
                "holderIdentity": self.identity,
                "leaseDurationSeconds": max(1, round(self.duration)),
                "acquireTime": stamp,
                "renewTime": stamp,
                "leaseTransitions": 0,
            },
        }
        started = time.monotonic()
        try:
            await self.client.create(self.res.from_dict(body), namespace=self.namespace)
        except ApiError as exc:
            if exc.status.code == 409:
                return  # created by another replica a moment ago
            raise
        self._renewed = started

    async def release(self) -> None:
        """On a clean stop: give the Lease up, so another replica takes over at once."""
        if not self.is_leader:
            return
        self._renewed = float("-inf")
        try:
            lease = await self.client.get(self.res, self.name, namespace=self.namespace)
            body = lease.to_dict()
            if (body.get("spec") or {}).get("holderIdentity") != self.identity:
                return
            body["spec"]["holderIdentity"] = None
            body["spec"]["renewTime"] = micro_time()
            await self.client.replace(self.res.from_dict(body), namespace=self.namespace)
        except Exception as exc:
            log.debug("lease release: %s", exc)
