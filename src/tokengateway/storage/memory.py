"""In-memory counters for one process (the default, `memory://`)."""

from __future__ import annotations

import heapq
import time
from collections.abc import Callable, Sequence

from tokengateway.storage.base import CheckResult, CounterRef, CounterState, CounterStore

__all__ = ["MemoryStore"]


class MemoryStore(CounterStore):
    """Fixed-window counters in a dict; expired ones are dropped as time passes.

    Memory stays bounded by the live counters: every write also pops the expiry heap, so a
    counter whose window ended is gone within one write of its end (lookups ignore it before).
    Never awaits, so each verb is atomic on the event loop.
    """

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.uri = "memory://"
        self._clock = clock
        self._counters: dict[str, list[float]] = {}  # key -> [value, expires_at]
        self._expiries: list[tuple[float, str]] = []
        # key -> {reservation id: (amount, expires_at)}; a counter's holds go with it
        self._held: dict[str, dict[str, tuple[int, float]]] = {}

    def __len__(self) -> int:
        return len(self._counters)

    def _states(self, counters: Sequence[CounterRef], delta: int) -> CheckResult:
        now = self._clock()
        states = []
        limiting = None
        for i, ref in enumerate(counters):
            entry = self._counters.get(ref.key)
            if entry is None or entry[1] <= now:
                state = CounterState(ref, 0, ref.window)
            else:
                state = CounterState(ref, int(entry[0]), entry[1] - now)
            states.append(state)
            if state.value + delta > ref.limit and (
                limiting is None or state.expires_in > states[limiting].expires_in
            ):
                limiting = i
        return CheckResult(limiting is not None, tuple(states), limiting)

    async def check(self, counters: Sequence[CounterRef], delta: int) -> CheckResult:
        return self._states(counters, delta)

    async def update(self, counters: Sequence[CounterRef], deltas: Sequence[int]) -> None:
        self._add(counters, deltas)

    async def check_and_update(self, counters: Sequence[CounterRef], delta: int) -> CheckResult:
        result = self._states(counters, delta)
        if not result.limited:
            self._add(counters, [delta] * len(counters))
        return result

    async def reserve(
        self,
        counters: Sequence[CounterRef],
        amounts: Sequence[int],
        ttls: Sequence[float],
        reservation: str,
    ) -> CheckResult:
        now = self._clock()
        states = []
        limiting = None
        for i, ref in enumerate(counters):
            entry = self._counters.get(ref.key)
            held = self._held_on(ref.key, now)
            if entry is None or entry[1] <= now:
                state = CounterState(ref, 0, ref.window, held)
            else:
                state = CounterState(ref, int(entry[0]), entry[1] - now, held)
            states.append(state)
            if state.value + held + max(amounts[i], 1) > ref.limit and (
                limiting is None or state.expires_in > states[limiting].expires_in
            ):
                limiting = i
        if limiting is None:
            self._add(counters, [0] * len(counters))  # opens the windows not started yet
            for ref, amount, ttl in zip(counters, amounts, ttls, strict=True):
                if amount > 0:
                    ends = min(now + ttl, self._counters[ref.key][1])
                    self._held.setdefault(ref.key, {})[reservation] = (amount, ends)
        return CheckResult(limiting is not None, tuple(states), limiting)

    async def commit(
        self, counters: Sequence[CounterRef], deltas: Sequence[int], reservation: str
    ) -> None:
        for ref in counters:
            holds = self._held.get(ref.key)
            if holds is not None and holds.pop(reservation, None) is not None and not holds:
                del self._held[ref.key]
        charged = [(r, d) for r, d in zip(counters, deltas, strict=True) if d > 0]
        if charged:
            self._add([r for r, _ in charged], [d for _, d in charged])

    def _held_on(self, key: str, now: float) -> int:
        holds = self._held.get(key)
        if not holds:
            return 0
        total = 0
        for rid, (amount, ends) in list(holds.items()):
            if ends <= now:
                del holds[rid]
            else:
                total += amount
        return total

    def _add(self, counters: Sequence[CounterRef], deltas: Sequence[int]) -> None:
        now = self._clock()
        self._sweep(now)
        for ref, delta in zip(counters, deltas, strict=True):
            entry = self._counters.get(ref.key)
            if entry is None or entry[1] <= now:
                expires = now + ref.window
                self._counters[ref.key] = [delta, expires]
                heapq.heappush(self._expiries, (expires, ref.key))
                self._held.pop(ref.key, None)  # holds end with their window
            else:
                entry[0] += delta

    def _sweep(self, now: float) -> None:
        heap = self._expiries
        while heap and heap[0][0] <= now:
            expires, key = heapq.heappop(heap)
            entry = self._counters.get(key)
            if entry is not None and entry[1] == expires:
                del self._counters[key]
                self._held.pop(key, None)

    async def counters(self) -> list[tuple[str, int, float]]:
        return [(k, v, left) for k, (v, left) in self.snapshot().items()]

    async def retain(self, scopes: set[str]) -> int:
        doomed = [k for k in self._counters if _scope(k) not in scopes]
        for key in doomed:
            del self._counters[key]
            self._held.pop(key, None)
        return len(doomed)

    def snapshot(self) -> dict[str, tuple[int, float]]:
        """Live counters as {key: (value, seconds left)}, for inspection and tests."""
        now = self._clock()
        return {k: (int(v), e - now) for k, (v, e) in self._counters.items() if e > now}


def _scope(key: str) -> str:
    """`namespace\x1fidentifier` of a counter key (see limits.counter_scope)."""
    parts = key.split("\x1f", 2)
    return "\x1f".join(parts[:2])
