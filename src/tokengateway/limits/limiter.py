"""The limiter verbs on top of a counter store, with Kuadrant's semantics.

- `check` before forwarding (token limits): refused when `counter + 1 > limit`; adds nothing.
- `report` after the response: adds the tokens to every counter, unchecked; 0 counts as 1.
- `hit` for request limits (RateLimitPolicy): check and add 1 atomically.

When the store fails, `on_error` decides, as Kuadrant's failure mode does: "allow" (the
default) lets requests through and keeps their reports (bounded) to replay once the store
answers again, so an outage of seconds to minutes loses no accounting; "deny" refuses with
StorageUnavailable (503 at the gateway).
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Sequence

from tokengateway import cel
from tokengateway.limits.counting import Counting
from tokengateway.limits.limit import Limit
from tokengateway.storage import CheckResult, CounterRef, CounterStore, StorageError
from tokengateway.tokens import Usage

__all__ = ["Applicable", "Limiter", "StorageUnavailable"]

log = logging.getLogger("tokengateway.limits")

MAX_PENDING_REPORTS = 100_000


class StorageUnavailable(RuntimeError):
    """The store failed and the failure mode is "deny"."""


class Applicable:
    """The counters of one request, split by what counts them; `countings[i]` says which
    tokens `tokens[i]` counts."""

    __slots__ = ("countings", "requests", "tokens")

    def __init__(self) -> None:
        self.tokens: list[CounterRef] = []
        self.countings: list[Counting] = []
        self.requests: list[CounterRef] = []

    def __bool__(self) -> bool:
        return bool(self.tokens or self.requests)


_NOT_LIMITED = CheckResult(False, ())


class Limiter:
    def __init__(
        self, store: CounterStore, on_error: str = "allow", max_pending: int = MAX_PENDING_REPORTS
    ) -> None:
        if on_error not in ("allow", "deny"):
            raise ValueError(f"on_error {on_error!r}: use allow or deny")
        self.store = store
        self.on_error = on_error
        self.pending: deque[tuple[list[CounterRef], list[int]]] = deque(maxlen=max_pending)
        self.storage_errors = 0
        self.replayed = 0
        self.dropped = 0
        self._outage = False

    @staticmethod
    def applicable(
        limits: Sequence[Limit], namespace: str, activation: cel.Activation
    ) -> Applicable:
        """Counters of every limit whose predicates hold and whose counters resolve."""
        out = Applicable()
        for limit in limits:
            values = limit.resolve(activation)
            if values is None:
                continue
            refs = limit.counter_refs(namespace, values)
            if limit.counts_tokens:
                out.tokens.extend(refs)
                out.countings.extend([limit.counting] * len(refs))
            else:
                out.requests.extend(refs)
        return out

    async def check(self, applicable: Applicable) -> CheckResult:
        """Request limits are hit (+1) only when the token limits leave room."""
        try:
            tokens = await self.store.check(applicable.tokens, 1) if applicable.tokens else None
            if tokens is not None and tokens.limited:
                return tokens
            if applicable.requests:
                requests = await self.store.check_and_update(applicable.requests, 1)
                if requests.limited or tokens is None:
                    return requests
                return _merge(tokens, requests)
            return tokens or _NOT_LIMITED
        except StorageError as exc:
            self._failed(exc)
            if self.on_error == "deny":
                raise StorageUnavailable(str(exc)) from None
            return _NOT_LIMITED

    async def report(self, applicable: Applicable, usage: Usage) -> None:
        """Add each counter's cost of `usage`; a cost of 0 counts as 1 (Kuadrant's rule)."""
        if not applicable.tokens:
            return
        deltas = [max(c.cost(usage), 1) for c in applicable.countings]
        if self.pending:  # keep the order: behind what waits for the store
            self._keep(applicable.tokens, deltas)
            return
        try:
            await self.store.update(applicable.tokens, deltas)
        except StorageError as exc:
            self._failed(exc)
            self._keep(applicable.tokens, deltas)

    def _keep(self, refs: list[CounterRef], deltas: list[int]) -> None:
        if len(self.pending) == self.pending.maxlen:
            self.dropped += 1  # the oldest report falls out of the bound
        self.pending.append((list(refs), deltas))

    def _failed(self, exc: StorageError) -> None:
        self.storage_errors += 1
        if not self._outage:
            self._outage = True
            log.warning("counter store failing (%s); on_error=%s", exc, self.on_error)

    async def replay(self) -> int:
        """Apply the reports kept during an outage, oldest first; how many were applied."""
        applied = 0
        while self.pending:
            refs, deltas = self.pending[0]
            try:
                await self.store.update(refs, deltas)
            except StorageError:
                return applied
            self.pending.popleft()
            applied += 1
        self.replayed += applied
        if self._outage:
            self._outage = False
            log.warning("counter store back; %d kept report(s) replayed", applied)
        return applied

    async def replay_loop(self, interval: float = 1.0) -> None:
        while True:
            await asyncio.sleep(interval)
            if self.pending or self._outage:
                await self.replay()


def _merge(a: CheckResult, b: CheckResult) -> CheckResult:
    return CheckResult(a.limited or b.limited, a.states + b.states, None)
