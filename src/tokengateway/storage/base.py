"""The counter store interface: where counts live, kept apart from what is counted.

The three verbs follow Limitador's: `check` (is any counter spent for this delta?),
`update` (add without checking) and `check_and_update` (both, atomically). Two more hold
capacity for requests in flight (Kuadrant's RFC 0021): `reserve` (atomically: admit when
`value + held + amount <= limit` on every counter, then hold the amounts) and `commit` (drop
the hold, add the real usage). A hold never touches a counter's value: one that is never
committed simply expires. A store is async because the shared ones (Redis) are; the
in-memory one never awaits.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
from dataclasses import dataclass

__all__ = [
    "CACHED_REDIS_SCHEMES",
    "REDIS_SCHEMES",
    "CheckResult",
    "CounterRef",
    "CounterState",
    "CounterStore",
    "StorageError",
    "checked",
]

#: URI schemes of the Redis store (storage/redis.py), known here without importing redis-py
REDIS_SCHEMES = (
    "redis",
    "rediss",
    "redis+cluster",
    "rediss+cluster",
    "redis+sentinel",
    "rediss+sentinel",
)
#: the same, cached in each process and flushed in batches (storage/redis_cached.py)
CACHED_REDIS_SCHEMES = tuple(f"{s}+cached" for s in REDIS_SCHEMES)


class StorageError(RuntimeError):
    """The store could not be reached or answered wrongly."""


@dataclass(frozen=True, slots=True)
class CounterRef:
    """One counter: a key that identifies (namespace, limit, window, values) and its rate."""

    key: str
    limit: int
    window: float  # seconds


@dataclass(frozen=True, slots=True)
class CounterState:
    """A counter as seen by a check: its value and the seconds until its window ends."""

    ref: CounterRef
    value: int
    expires_in: float  # seconds; the full window for a counter that has not started
    #: tokens held by reservations of requests still in flight (reserve only)
    held: int = 0

    @property
    def remaining(self) -> int:
        return max(0, self.ref.limit - self.value - self.held)


@dataclass(frozen=True, slots=True)
class CheckResult:
    """What a check saw: whether a counter is spent, and every counter's state."""

    limited: bool
    states: tuple[CounterState, ...]
    #: index into `states` of the counter that refused (the one reopening last), or None
    limiting: int | None = None
    #: refused only by the holds of requests in flight: without them every counter had room
    #: for this request (`value + amount <= limit`); the limiter sets it (limits/limiter.py)
    held_only: bool = False
    #: when the request is expected to pass, if sooner than the window's end (holds settle)
    retry_in: float | None = None

    @property
    def retry_after(self) -> float:
        """Seconds until the request could pass: the refusing counter's window end, or
        sooner when only holds refused it."""
        if self.limiting is None:
            return 0.0
        if self.retry_in is not None:
            return self.retry_in
        return self.states[self.limiting].expires_in


def checked(states: tuple[CounterState, ...], delta: int) -> CheckResult:
    """The answer to a check adding `delta` to counters in `states`: limited when a counter
    would pass its limit; the limiting one is the refusing counter whose window ends last
    (the wait it gives is the one that lets the request through)."""
    limiting: int | None = None
    for i, state in enumerate(states):
        if state.value + delta > state.ref.limit and (
            limiting is None or state.expires_in > states[limiting].expires_in
        ):
            limiting = i
    return CheckResult(limiting is not None, states, limiting)


class CounterStore(ABC):
    """Counters with fixed windows that open at the first hit and expire `window` later."""

    uri: str = ""

    def figures(self) -> dict[str, float]:
        """What the store has to say in `/metrics` (series `tokengateway_<name>`; see
        observability/metrics.py's FIGURES): nothing, unless a store keeps state of its own."""
        return {}

    @abstractmethod
    async def check(self, counters: Sequence[CounterRef], delta: int) -> CheckResult:
        """Limited when `value + delta > limit` for any counter; changes nothing."""

    @abstractmethod
    async def update(self, counters: Sequence[CounterRef], deltas: Sequence[int]) -> None:
        """Add `deltas[i]` to `counters[i]`, with no check (Kuadrant's report)."""

    @abstractmethod
    async def check_and_update(self, counters: Sequence[CounterRef], delta: int) -> CheckResult:
        """Atomically: if no counter is spent for `delta`, add it to all of them."""

    @abstractmethod
    async def reserve(
        self,
        counters: Sequence[CounterRef],
        amounts: Sequence[int],
        ttls: Sequence[float],
        reservation: str,
    ) -> CheckResult:
        """Atomically: when `value + held + max(amounts[i], 1) <= limit` for every counter,
        hold `amounts[i]` on `counters[i]` under the id `reservation` until the earlier of
        `ttls[i]` seconds and the counter's window end (a counter with no window yet gets
        one). The states report what was seen before holding."""

    @abstractmethod
    async def commit(
        self, counters: Sequence[CounterRef], deltas: Sequence[int], reservation: str
    ) -> None:
        """Release the hold `reservation` on each counter (if still there) and add
        `deltas[i]` as `update` does; a delta of 0 adds nothing."""

    @abstractmethod
    async def counters(self) -> list[tuple[str, int, float]]:
        """Every live counter as (key, value, seconds until its window ends)."""

    @abstractmethod
    async def retain(self, scopes: set[str]) -> int:
        """Drop the counters whose limit (their key's scope) is not in `scopes`; how many.

        A limit removed from the configuration takes its counters with it; one whose value
        changed keeps them (its scope does not include the value), as Limitador does."""

    async def start(self) -> None:  # noqa: B027 - optional hook
        """Connect, if the store needs to."""

    async def close(self) -> None:  # noqa: B027 - optional hook
        """Release connections."""
