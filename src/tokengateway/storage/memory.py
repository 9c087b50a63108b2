"""In-memory counters for one process (the default, `memory://`).

What a live counter costs (CPython 3.11, a tutorial-shaped key of about 100 characters; see
benchmarks/memory.py): about 215 bytes, against 360 (390 once values pass 256) for a dict of
`[value, expires_at]` lists beside a heap of `(expires_at, key)` tuples. Where it goes:

* The key, once: the string the dict holds (about 145 bytes), and the dict's slot (about 30).
* The entry: one `complex(value, expires_at)`, 32 bytes holding both numbers, where a list,
  a boxed float and (past 256) a boxed int took 100 to 130. A float holds every integer in
  [0, 2**53) exactly; a value outside that range (a report of an absurd size, a negative
  delta) is kept as a `_Big`, a complex carrying the exact value, so every value reads back
  exactly as it was added.
* Expiry: 8 bytes. A window opens at a write and lasts the counter's window, so the counters
  of one window length end in the order they were opened: each window length has a queue
  (`_Order`) of its keys in that order, and expiry only ever looks at the fronts. A small heap
  holds one entry per queue (`_due`: when its front ends). A counter that would end before
  the newest one already queued (the clock stepped back) is a stray, with an entry of its
  own in the heap `_strays`.

(Keeping each limit's long key prefix once, and only the values per counter, brings a counter
down to about 135 bytes, but finding a counter then takes cutting its key and two lookups:
some 200 ns more per verb, which the request path pays on every call.)

Memory stays bounded by the live counters: every write first drops what has ended (the queue
fronts due and the strays due), so a counter whose window ended is gone within one write of
its end; lookups ignore it before. Never awaits, so each verb is atomic on the event loop.
"""

from __future__ import annotations

import heapq
import math
import time
from collections import deque
from collections.abc import Callable, Sequence

from tokengateway.storage.base import CheckResult, CounterRef, CounterState, CounterStore

__all__ = ["MemoryStore"]

_EXACT = 2.0**53  # floats hold every integer in [0, 2**53) exactly
_INF = math.inf
#: the queue of counters loaded by `_load` (SqliteStore): no window length is negative
_LOADED = -1.0


class _Big(complex):
    """An entry whose value a float does not hold exactly: the exact value beside the window
    end. Its own real part is NaN, so that arithmetic on it fails the fast path's range check
    and goes through `_sum`; `.real` reads the exact value."""

    __slots__ = ("exact",)
    exact: int | float

    def __new__(cls, value: int | float, expires: float) -> _Big:
        self = super().__new__(cls, math.nan, expires)
        self.exact = value
        return self

    @property
    def real(self) -> int | float:
        return self.exact


def _entry(value: int | float, expires: float) -> complex:
    if 0 <= value < _EXACT:
        return complex(value, expires)
    return _Big(value, expires)


def _sum(entry: complex, delta: int | float) -> complex:
    """`entry` plus `delta`, exactly (the slow path of `_add`)."""
    value = entry.real
    if type(value) is float and value.is_integer():
        value = int(value)
    return _entry(value + delta, entry.imag)


class _Order:
    """The keys of the counters of one window length, in the order their windows opened (so
    the order they end in); a key whose counter has gone is skipped at the front."""

    __slots__ = ("due", "keys", "last")

    def __init__(self) -> None:
        self.keys: deque[str] = deque()
        self.last = -_INF  # the window end of the newest key queued
        self.due = _INF  # the time of this queue's live entry in `_due` (inf: none)


class MemoryStore(CounterStore):
    """Fixed-window counters in a dict; expired ones are dropped as time passes."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.uri = "memory://"
        self._clock = clock
        self._counters: dict[str, complex] = {}  # key -> complex(value, expires_at)
        self._orders: dict[float, _Order] = {}  # window (seconds) -> its queue
        # (time, window): that queue's front ends then; an entry whose time is not the
        # queue's `due` (the queue went, or was queued again) is skipped
        self._due: list[tuple[float, float]] = []
        # (expires_at, key) of the counters opened out of their queue's order
        self._strays: list[tuple[float, str]] = []
        self._next_sweep = _INF  # the earliest time in `_due` and `_strays`
        # key -> {reservation id: (amount, expires_at)}; a counter's holds go with it
        self._held: dict[str, dict[str, tuple[int, float]]] = {}

    def __len__(self) -> int:
        return len(self._counters)

    def _states(self, counters: Sequence[CounterRef], delta: int) -> CheckResult:
        now = self._clock()
        get = self._counters.get
        states: list[CounterState] = []
        limiting = None
        for ref in counters:
            entry = get(ref.key)
            if entry is None or (ends := entry.imag) <= now:
                value = 0
                state = CounterState(ref, 0, ref.window)
            else:
                value = int(entry.real)
                state = CounterState(ref, value, ends - now)
            states.append(state)
            if value + delta > ref.limit and (
                limiting is None or state.expires_in > states[limiting].expires_in
            ):
                limiting = len(states) - 1
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
        get = self._counters.get
        holds = self._held
        states: list[CounterState] = []
        window_ends = []
        limiting = None
        for i, ref in enumerate(counters):
            entry = get(ref.key)
            held = self._held_on(ref.key, now) if holds else 0
            if entry is None or (ends := entry.imag) <= now:
                value = 0
                ends = now + ref.window  # where the window opened below ends
                state = CounterState(ref, 0, ref.window, held)
            else:
                value = int(entry.real)
                state = CounterState(ref, value, ends - now, held)
            states.append(state)
            window_ends.append(ends)
            if value + held + max(amounts[i], 1) > ref.limit and (
                limiting is None or state.expires_in > states[limiting].expires_in
            ):
                limiting = i
        if limiting is None:
            self._add(counters, [0] * len(counters), now)  # opens the windows not started yet
            for ref, amount, ttl, ends in zip(counters, amounts, ttls, window_ends, strict=True):
                if amount > 0:
                    holds.setdefault(ref.key, {})[reservation] = (amount, min(now + ttl, ends))
        return CheckResult(limiting is not None, tuple(states), limiting)

    async def commit(
        self, counters: Sequence[CounterRef], deltas: Sequence[int], reservation: str
    ) -> None:
        if self._held:
            for ref in counters:
                holds = self._held.get(ref.key)
                if holds is not None and holds.pop(reservation, None) is not None and not holds:
                    del self._held[ref.key]
        if len(counters) != len(deltas):
            raise ValueError(f"{len(counters)} counters but {len(deltas)} deltas")
        if all(d > 0 for d in deltas):
            self._add(counters, deltas)
        else:
            charged = [(r, d) for r, d in zip(counters, deltas) if d > 0]  # noqa: B905 - checked
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

    # --- adding -----------------------------------------------------------------------------

    def _add(
        self, counters: Sequence[CounterRef], deltas: Sequence[int], now: float | None = None
    ) -> None:
        """Add `deltas[i]` to `counters[i]` at `now` (the clock's, by default)."""
        if len(counters) != len(deltas):
            raise ValueError(f"{len(counters)} counters but {len(deltas)} deltas")
        if now is None:
            now = self._clock()
        if now >= self._next_sweep:
            self._sweep(now)
        entries = self._counters
        for ref, delta in zip(counters, deltas):  # noqa: B905 - checked
            key = ref.key
            entry = entries.get(key)
            if entry is not None and entry.imag > now:  # the fast path: a live counter
                try:
                    new = entry + delta
                except OverflowError:  # a delta past any float
                    pass
                else:
                    if 0.0 <= new.real < _EXACT:
                        entries[key] = new
                        continue
            self._add_one(ref, delta, now)

    def _add_one(self, ref: CounterRef, delta: int, now: float) -> None:
        """Add `delta` to one counter, opening its window if it has none: the general path of
        `_add`, exact for every value."""
        key = ref.key
        entry = self._counters.get(key)
        if entry is not None:
            if entry.imag > now:
                self._counters[key] = _sum(entry, delta)
                return
            del self._counters[key]  # ended and not dropped yet: the new window goes last
        self._counters[key] = entry = _entry(delta, now + ref.window)
        self._enqueue(key, entry.imag, ref.window)
        if self._held:
            self._held.pop(key, None)  # holds end with their window

    def _enqueue(self, key: str, expires: float, window: float) -> None:
        """Queue a counter whose window was just opened for its end: behind the others of its
        window length, or among the strays if it ends before the last of those."""
        order = self._orders.get(window)
        if order is None:
            order = self._orders[window] = _Order()
        if expires >= order.last:
            order.last = expires
            order.keys.append(key)
            if expires < order.due:  # nothing of this queue was due
                order.due = expires
                heapq.heappush(self._due, (expires, window))
        else:
            heapq.heappush(self._strays, (expires, key))
        if expires < self._next_sweep:
            self._next_sweep = expires

    def _sweep(self, now: float) -> None:
        """Drop the counters whose window has ended, with their holds."""
        entries = self._counters
        held = self._held
        due = self._due
        while due and due[0][0] <= now:
            when, window = heapq.heappop(due)
            order = self._orders.get(window)
            if order is None or order.due != when:
                continue  # stale
            order.due = _INF
            keys = order.keys
            while keys:
                key = keys[0]
                entry = entries.get(key)
                if entry is not None:
                    if entry.imag > now:
                        order.due = entry.imag
                        heapq.heappush(due, (entry.imag, window))
                        break
                    del entries[key]
                    if held:
                        held.pop(key, None)
                keys.popleft()
            else:
                del self._orders[window]
        strays = self._strays
        while strays and strays[0][0] <= now:
            when, key = heapq.heappop(strays)
            entry = entries.get(key)
            if entry is not None and entry.imag == when:
                del entries[key]
                if held:
                    held.pop(key, None)
        self._next_sweep = min(due[0][0] if due else _INF, strays[0][0] if strays else _INF)

    def _load(self, rows: list[tuple[str, int, float]]) -> None:
        """Replace every counter with `rows` of (key, value, expires_at) (SqliteStore)."""
        self._counters.clear()
        self._orders.clear()
        self._due.clear()
        self._strays.clear()
        self._next_sweep = _INF
        self._held.clear()
        for key, value, expires in sorted(rows, key=lambda row: row[2]):
            if key not in self._counters:
                self._counters[key] = _entry(value, expires)
                self._enqueue(key, expires, _LOADED)  # in order of their ends: one queue

    # --- reading and dropping ---------------------------------------------------------------

    async def counters(self) -> list[tuple[str, int, float]]:
        now = self._clock()
        return [(k, int(e.real), e.imag - now) for k, e in self._counters.items() if e.imag > now]

    async def retain(self, scopes: set[str]) -> int:
        return len(self._retain(scopes))

    def _retain(self, scopes: set[str]) -> list[str]:
        """Drop the counters whose scope is not in `scopes`; their keys."""
        doomed = [k for k in self._counters if _scope(k) not in scopes]
        if doomed:
            for key in doomed:
                del self._counters[key]
                self._held.pop(key, None)
            # forget the dropped keys' places: a key that comes back queues afresh
            for order in self._orders.values():
                order.keys = deque(k for k in order.keys if k in self._counters)
        return doomed

    def snapshot(self) -> dict[str, tuple[int, float]]:
        """Live counters as {key: (value, seconds left)}, for inspection and tests."""
        now = self._clock()
        return {k: (int(e.real), e.imag - now) for k, e in self._counters.items() if e.imag > now}


def _scope(key: str) -> str:
    """`namespace\x1fidentifier` of a counter key (see limits.counter_scope)."""
    parts = key.split("\x1f", 2)
    return "\x1f".join(parts[:2])
