"""The limiter verbs on top of a counter store, with Kuadrant's semantics.

- `check` before forwarding (token limits): refused when `counter + 1 > limit`; adds nothing.
- `report` after the response: adds the tokens to every counter, unchecked; 0 counts as 1.
- `hit` for request limits (RateLimitPolicy): check and add 1 atomically.

Reservations (Kuadrant RFC 0021, for token limits that have a `reservation`): `check`
reserves each limit's amount atomically across all the request's counters instead of only
checking, and `report` commits: the hold is released and the real usage added. A request that
never reports (a crash, a lost connection) holds nothing past its TTL, and its counters are
never charged for it. Concurrent requests thus cannot race past a limit by more than what
their estimates missed.

A reservation refused only because of other requests' holds (`value + amount <= limit <
value + held + amount` on every refusing counter) is not a spent limit: its `CheckResult`
says `held_only`, and its retry time is when holds are expected to settle (the median time
this process's recent holds lasted, bounded by the hold TTL and the window), not the
window's end. A limit with `reservation.wait` lets such a request wait up to that long for
holds to settle, retrying its reservation each time one settles here (a commit or release
in this process) or every `WAIT_POLL` seconds (holds of other replicas, expired holds); at
most `MAX_WAITERS` wait at once per process, and a wait ends when the client leaves. Every
admission is still the store's atomic reservation, so waiting never admits past the limit.

When the store fails, `on_error` decides, as Kuadrant's failure mode does: "allow" (the
default) lets requests through and keeps their reports (bounded) to replay once the store
answers again, so an outage of seconds to minutes loses no accounting; "deny" refuses with
StorageUnavailable (503 at the gateway).
"""

from __future__ import annotations

import asyncio
import logging
import os
import statistics
import time
from collections import deque
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace
from typing import Any, Literal

import msgspec

from tokengateway.expr import cel
from tokengateway.expr.kept import keep
from tokengateway.limits.counting import Counting
from tokengateway.limits.limit import Limit
from tokengateway.storage import (
    CheckResult,
    CounterRef,
    CounterState,
    CounterStore,
    StorageError,
)
from tokengateway.wire.tokens import Usage, max_completion_tokens, prompt_tokens

__all__ = ["Applicable", "Estimate", "Limiter", "OnError", "StorageUnavailable"]

log = logging.getLogger("tokengateway.limits")

MAX_PENDING_REPORTS = 100_000
#: what a failing store means for a request: let it through, or refuse it (503)
OnError = Literal["allow", "deny"]
#: Limitador's defaults for its `--max-reservation-fraction` / `--max-reservation-ttl`
MAX_RESERVATION_FRACTION = 0.5
MAX_RESERVATION_TTL = 60.0
#: requests of one process waiting for holds to settle at once; more are refused at once
MAX_WAITERS = 1024
#: how often a waiting request retries when nothing settles in this process
WAIT_POLL = 0.1
#: the settle time assumed before any hold has settled here, and the bounds of the estimate
DEFAULT_SETTLE = 1.0
MIN_SETTLE = 0.05
#: recent hold durations kept for the estimate
SETTLE_SAMPLES = 256
#: refusals kept (by the counters they were for), and the longest a kept one is believed
#: before the store is asked again: bounds what a counter reset outside the gateway costs
KEPT_REFUSALS = 4096
SPENT_RECHECK = 1.0
#: the counters that apply, kept per selector values (per sequence of limits)
KEPT_APPLICABLE = 4096


class StorageUnavailable(RuntimeError):
    """The store failed and the failure mode is "deny"."""


class Applicable:
    """The counters of one request, split by what counts them; `countings[i]` says which
    tokens `tokens[i]` counts. Its lists may be shared with other requests (`copy`):
    read-only."""

    __slots__ = (
        "amounts",
        "countings",
        "names",
        "request_limits",
        "requests",
        "reservation",
        "reserved_at",
        "token_limits",
        "tokens",
        "ttls",
        "waits",
    )

    def __init__(self) -> None:
        self.tokens: list[CounterRef] = []
        self.countings: list[Counting] = []
        self.requests: list[CounterRef] = []
        #: the identifier of the limit each of `tokens` / `requests` counts for
        self.token_limits: list[str] = []
        self.request_limits: list[str] = []
        #: each limit once, token limits first (made by `Limiter.applicable`)
        self.names: tuple[str, ...] = ()
        #: tokens to hold on each of `tokens` (None: no limit reserves, check instead)
        self.amounts: list[int] | None = None
        self.ttls: list[float] = []
        #: seconds a hold-refused request may wait, per token counter (`reservation.wait`)
        self.waits: list[float] = []
        #: the id of the hold `check` made, until `report` commits it, and when it was made
        self.reservation: str | None = None
        self.reserved_at = 0.0

    def __bool__(self) -> bool:
        return bool(self.tokens or self.requests)

    def copy(self) -> Applicable:
        """A new Applicable on the same counters (the lists are shared: read-only), for a
        request of its own (its reservation)."""
        out = Applicable.__new__(Applicable)
        out.tokens, out.countings, out.requests = self.tokens, self.countings, self.requests
        out.token_limits, out.request_limits = self.token_limits, self.request_limits
        out.names = self.names
        out.amounts, out.ttls, out.waits = self.amounts, self.ttls, self.waits
        out.reservation, out.reserved_at = None, 0.0
        return out


class _Plan:
    """Limits whose predicates and counters read only selectors (no body): which counters
    apply is a function of those selectors' values, so it is worked out once per values
    (`kept`), as each expression keeps its own answers (expr/cel.py)."""

    __slots__ = ("kept", "reserves", "selectors")

    def __init__(self, selectors: tuple[tuple[str, ...], ...], reserves: bool) -> None:
        self.selectors = selectors
        #: whether some limit reserves (its amount may read the body: not kept then)
        self.reserves = reserves
        self.kept: dict[tuple[Any, ...], Applicable] = {}

    @staticmethod
    def of(limits: Sequence[Limit]) -> _Plan | None:
        selectors: dict[tuple[str, ...], None] = {}
        for limit in limits:
            for expression in (*limit.predicates, *limit.counters):
                read = expression.selectors
                if read is None:
                    return None
                selectors.update(dict.fromkeys(read))
        reserves = any(limit.reservation is not None for limit in limits)
        return _Plan(tuple(selectors), reserves)


class Estimate:
    """A request's likely usage, for reservations: its prompt tokens by the offline tokenizer
    plus the completion tokens it allows. Worked out on first use only."""

    __slots__ = ("_body", "_limit", "_prompt", "_request")

    def __init__(self, body: bytes, request: Any = None) -> None:
        self._body = body
        self._request = request  # the body already decoded, when the caller has it
        self._prompt: int | None = None
        self._limit: int | None = None

    def usage(self, default_completion: int) -> Usage:
        if self._prompt is None:
            request = self._request
            if request is None and self._body:
                try:
                    request = msgspec.json.decode(self._body)
                except (
                    msgspec.MsgspecError,
                    ValueError,
                    RecursionError,
                ):  # not JSON, bad UTF-8, too deep
                    request = None
            self._prompt = prompt_tokens(request)
            self._limit = max_completion_tokens(request)
        completion = default_completion if self._limit is None else self._limit
        return Usage(self._prompt, completion, self._prompt + completion, estimated=True)


_NOT_LIMITED = CheckResult(False, ())


class SpentCounters:
    """Refusals by spent counters, kept until the spent counter's window ends.

    A fixed-window counter whose value has reached its limit refuses every request (each
    adds at least 1: a check's delta, a reservation's `max(amount, 1)`, a hit's 1) until its
    window ends, because within a window a value only grows, on every store and across
    replicas. So the store's refusal for a set of counters is kept by that set, and a later
    request on the same counters is refused without asking the store, with the same answer
    (its windows counted down) until the refusing counter's window ends.

    Never kept: a refusal by holds (`held_only`: holds settle), one whose refusing counter
    has not reached its limit (a reservation larger than what is left: a smaller one fits),
    one by a counter that has not started (value 0: a limit of 0). A counter's `CounterRef`
    holds its limit, so a configuration with another limit never meets a kept refusal; every
    swap empties them all anyway (`forget`), as a limit removed from the configuration loses
    its counters. Counters changed outside the gateway (a Redis flush, an eviction) are
    believed spent at most `SPENT_RECHECK` seconds before the store is asked again."""

    __slots__ = ("_kept", "hits", "recheck", "size")

    def __init__(self, size: int = KEPT_REFUSALS, recheck: float = SPENT_RECHECK) -> None:
        #: counters -> (the refusal, when it was seen, when to ask the store again)
        self._kept: dict[tuple[CounterRef, ...], tuple[CheckResult, float, float]] = {}
        self.size = size
        self.recheck = recheck
        self.hits = 0

    def __len__(self) -> int:
        return len(self._kept)

    def find(self, counters: tuple[CounterRef, ...], now: float) -> CheckResult | None:
        """The kept refusal for `counters`, its windows counted down to `now`; else None."""
        kept = self._kept.get(counters)
        if kept is None:
            return None
        result, seen, recheck = kept
        if now >= recheck:
            self._kept.pop(counters, None)
            return None
        self.hits += 1
        elapsed = now - seen
        states = tuple(
            CounterState(s.ref, s.value, max(0.0, s.expires_in - elapsed), s.held)
            for s in result.states
        )
        return CheckResult(True, states, result.limiting)

    def add(self, counters: tuple[CounterRef, ...], result: CheckResult, seen: float) -> None:
        """Keep `result`, the store's answer for `counters` asked at `seen` (before the
        call: its window ends are never later than the store's), when a spent counter
        refused it."""
        if not result.limited or result.held_only or result.limiting is None:
            return
        state = result.states[result.limiting]
        if state.value <= 0 or state.value < state.ref.limit:
            return
        recheck = seen + min(state.expires_in, self.recheck)
        keep(self._kept, counters, (result, seen, recheck), self.size)

    def forget(self) -> None:
        self._kept.clear()


class Limiter:
    def __init__(
        self,
        store: CounterStore,
        on_error: OnError = "allow",
        max_pending: int = MAX_PENDING_REPORTS,
        max_reservation_fraction: float = MAX_RESERVATION_FRACTION,
        max_reservation_ttl: float = MAX_RESERVATION_TTL,
    ) -> None:
        if on_error not in ("allow", "deny"):
            raise ValueError(f"on_error {on_error!r}: use allow or deny")
        if not 0 < max_reservation_fraction <= 1:
            raise ValueError("max_reservation_fraction must be in (0, 1]")
        if not max_reservation_ttl > 0:
            raise ValueError("max_reservation_ttl must be positive")
        self.store = store
        self.max_reservation_fraction = max_reservation_fraction
        self.max_reservation_ttl = max_reservation_ttl
        self.on_error = on_error
        self.pending: deque[tuple[list[CounterRef], list[int]]] = deque(maxlen=max_pending)
        self.storage_errors = 0
        self.replayed = 0
        self.dropped = 0
        self._outage = False
        #: how long recent holds lasted, reserve to commit (for the retry time of a refusal)
        self.hold_times: deque[float] = deque(maxlen=SETTLE_SAMPLES)
        #: requests waiting for holds to settle now, and all that ever waited / got in
        self.waiting = 0
        self.waited = 0
        self.admitted_after_wait = 0
        self.max_waiters = MAX_WAITERS
        #: completed (and replaced) each time a hold of this process settles
        self._settled: asyncio.Future[None] | None = None
        #: refusals by spent counters, answered again without the store
        self.spent = SpentCounters()
        #: (id(limits), namespace) -> (limits, what their answers depend on, kept per
        #: those values): the counters are the namespace's
        self._plans: dict[tuple[int, str], tuple[Sequence[Limit], _Plan | None]] = {}

    def applicable(
        self,
        limits: Sequence[Limit],
        namespace: str,
        activation: cel.Activation,
        *,
        body: bytes = b"",
        request: Any = None,
        reservations: bool = True,
        default_ttl: float | None = None,
    ) -> Applicable:
        """Counters of every limit whose predicates hold and whose counters resolve, and,
        when `reservations` is on, what each token counter should hold: the limit's amount
        clamped to `max_reservation_fraction` of the counter's limit, for the limit's ttl
        (else `default_ttl`) clamped to `max_reservation_ttl`."""
        plan = self._plan(limits, namespace)
        if plan is not None and not (reservations and plan.reserves):
            key = cel.selector_values(activation, plan.selectors)
            if key is not None:
                found = plan.kept.get(key)
                if found is None:
                    found = self._resolve(limits, namespace, activation, body, request, False, None)
                    keep(plan.kept, key, found, KEPT_APPLICABLE)
                return found.copy()
        return self._resolve(
            limits, namespace, activation, body, request, reservations, default_ttl
        )

    def _plan(self, limits: Sequence[Limit], namespace: str) -> _Plan | None:
        """What `limits`' answers are a function of (made once per sequence of limits)."""
        made = self._plans.get((id(limits), namespace))
        if made is not None and made[0] is limits:
            return made[1]
        plan = _Plan.of(limits)
        keep(self._plans, (id(limits), namespace), (limits, plan), KEPT_APPLICABLE)
        return plan

    def forget(self) -> None:
        """A new configuration: the kept refusals and answers of the old one go."""
        self.spent.forget()
        self._plans.clear()

    def _resolve(
        self,
        limits: Sequence[Limit],
        namespace: str,
        activation: cel.Activation,
        body: bytes,
        request: Any,
        reservations: bool,
        default_ttl: float | None,
    ) -> Applicable:
        out = Applicable()
        estimate: Estimate | None = None
        for limit in limits:
            values = limit.resolve(activation)
            if values is None:
                continue
            refs = limit.counter_refs(namespace, values)
            if not limit.counts_tokens:
                out.requests.extend(refs)
                out.request_limits.extend([limit.identifier] * len(refs))
                continue
            held = limit.reservation if reservations else None
            if held is not None and out.amounts is None:
                out.amounts = [0] * len(out.tokens)
                out.ttls = [0.0] * len(out.tokens)
                out.waits = [0.0] * len(out.tokens)
            if out.amounts is not None:
                amount, ttl, wait = 0, 0.0, 0.0
                if held is not None:
                    wait = held.wait
                    estimate = estimate or Estimate(body, request)
                    amount = held.hold(
                        activation, estimate.usage(held.default_completion), limit.counting
                    )
                    ttl = min(
                        held.lifetime(activation) or default_ttl or self.max_reservation_ttl,
                        self.max_reservation_ttl,
                    )
                fraction = self.max_reservation_fraction
                out.amounts.extend(min(amount, int(r.limit * fraction)) for r in refs)
                out.ttls.extend([ttl] * len(refs))
                out.waits.extend([wait] * len(refs))
            out.tokens.extend(refs)
            out.countings.extend([limit.counting] * len(refs))
            out.token_limits.extend([limit.identifier] * len(refs))
        out.names = tuple(dict.fromkeys(out.token_limits + out.request_limits))
        return out

    async def check(
        self,
        applicable: Applicable,
        client_gone: Callable[[], Awaitable[Any]] | None = None,
    ) -> CheckResult:
        """Token limits first (checked, or reserved); request limits are hit (+1) only when
        the token limits leave room. A reservation refused only by holds may wait for them
        (`reservation.wait`) until `client_gone()` (awaited only then) completes."""
        now = time.monotonic()
        if self.spent and not self._outage:
            kept = self.spent.find((*applicable.tokens, *applicable.requests), now)
            if kept is not None:
                return kept
        result = await self._check(applicable, client_gone)
        if result.limited:
            self.spent.add((*applicable.tokens, *applicable.requests), result, now)
        return result

    async def _check(
        self,
        applicable: Applicable,
        client_gone: Callable[[], Awaitable[Any]] | None,
    ) -> CheckResult:
        tokens: CheckResult | None = None
        try:
            if applicable.amounts is not None:
                tokens = await self._reserve(applicable, client_gone)
            elif applicable.tokens:
                tokens = await self.store.check(applicable.tokens, 1)
            if tokens is not None and tokens.limited:
                return tokens
            if applicable.requests:
                requests = await self.store.check_and_update(applicable.requests, 1)
                if requests.limited:
                    await self._release(applicable)
                return requests if tokens is None else _merge(tokens, requests)
            return tokens or _NOT_LIMITED
        except StorageError as exc:
            self._failed(exc)
            if self.on_error == "deny":
                await self._release(applicable)
                raise StorageUnavailable(str(exc)) from None
            return _NOT_LIMITED

    async def _reserve(
        self, applicable: Applicable, client_gone: Callable[[], Awaitable[Any]] | None
    ) -> CheckResult:
        amounts = applicable.amounts
        assert amounts is not None
        reservation = os.urandom(12).hex()
        result = await self.store.reserve(applicable.tokens, amounts, applicable.ttls, reservation)
        if result.limited:
            result = self._classify(result, applicable)
            if result.held_only:
                budget = self._wait_budget(result, applicable)
                if budget > 0 and client_gone is not None:
                    result = await self._wait(applicable, reservation, result, budget, client_gone)
        if not result.limited:
            applicable.reservation = reservation
            applicable.reserved_at = time.monotonic()
        return result

    def _classify(self, result: CheckResult, applicable: Applicable) -> CheckResult:
        """A refused reservation: spent (some counter has no room even without holds:
        that counter refuses, the one reopening last) or held only (retry when holds are
        expected to settle)."""
        amounts = applicable.amounts
        assert amounts is not None
        states = result.states
        spent = [i for i, s in enumerate(states) if s.value + max(amounts[i], 1) > s.ref.limit]
        if spent:
            limiting = max(spent, key=lambda i: states[i].expires_in)
            return replace(result, limiting=limiting, held_only=False, retry_in=None)
        assert result.limiting is not None
        bound = min(
            max(applicable.ttls, default=MAX_RESERVATION_TTL) or MAX_RESERVATION_TTL,
            states[result.limiting].expires_in,
        )
        return replace(result, held_only=True, retry_in=min(self.settle_time(), bound))

    def settle_time(self) -> float:
        """How long a hold of this process lasts, typically (the median of recent ones)."""
        if not self.hold_times:
            return DEFAULT_SETTLE
        return max(MIN_SETTLE, statistics.median(self.hold_times))

    @staticmethod
    def _wait_budget(result: CheckResult, applicable: Applicable) -> float:
        """The shortest `wait` among the limits of the counters the holds refused."""
        amounts = applicable.amounts
        assert amounts is not None
        refusing = [
            applicable.waits[i]
            for i, s in enumerate(result.states)
            if s.value + s.held + max(amounts[i], 1) > s.ref.limit
        ]
        return min(refusing, default=0.0)

    async def _wait(
        self,
        applicable: Applicable,
        reservation: str,
        result: CheckResult,
        budget: float,
        client_gone: Callable[[], Awaitable[Any]],
    ) -> CheckResult:
        """Retry the reservation as holds settle, until admitted, spent, out of time or the
        client left; the last result."""
        if self.waiting >= self.max_waiters:
            return result
        amounts = applicable.amounts
        assert amounts is not None
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget
        gone = asyncio.ensure_future(client_gone())
        self.waiting += 1
        self.waited += 1
        try:
            while True:
                left = deadline - loop.time()
                if left <= 0 or gone.done():
                    return result
                settled = self._settled
                if settled is None or settled.done():
                    settled = self._settled = loop.create_future()
                await asyncio.wait(
                    (settled, gone),
                    timeout=min(left, WAIT_POLL),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if gone.done():
                    return result
                result = await self.store.reserve(
                    applicable.tokens, amounts, applicable.ttls, reservation
                )
                if not result.limited:
                    self.admitted_after_wait += 1
                    return result
                result = self._classify(result, applicable)
                if not result.held_only:
                    return result
        finally:
            self.waiting -= 1
            gone.cancel()

    def _settle(self, applicable: Applicable) -> None:
        """A hold of this process settled: note how long it lasted, wake the waiters."""
        if applicable.reserved_at:
            self.hold_times.append(time.monotonic() - applicable.reserved_at)
            applicable.reserved_at = 0.0
        settled = self._settled
        if settled is not None and not settled.done():
            settled.set_result(None)

    async def report(self, applicable: Applicable, usage: Usage | None) -> list[int]:
        """Add each counter's cost of `usage`; a cost of 0 counts as 1 (Kuadrant's rule).
        A reservation is committed: its hold goes, the usage is added. Without usage (the
        upstream failed), only the hold is released. The deltas added, one per counter."""
        if not applicable.tokens:
            return []
        if usage is None:
            await self._release(applicable)
            return []
        deltas = [max(c.cost(usage), 1) for c in applicable.countings]
        reservation, applicable.reservation = applicable.reservation, None
        if self.pending:  # keep the order: behind what waits for the store
            self._keep(applicable.tokens, deltas)  # (a hold left behind expires alone)
            return deltas
        try:
            if reservation is not None:
                await self.store.commit(applicable.tokens, deltas, reservation)
                self._settle(applicable)
            else:
                await self.store.update(applicable.tokens, deltas)
        except StorageError as exc:
            self._failed(exc)
            self._keep(applicable.tokens, deltas)
        return deltas

    async def _release(self, applicable: Applicable) -> None:
        """Give a reservation's hold back without charging anything."""
        reservation, applicable.reservation = applicable.reservation, None
        if reservation is None:
            return
        try:
            await self.store.commit(applicable.tokens, [0] * len(applicable.tokens), reservation)
        except StorageError as exc:  # the hold expires at its TTL anyway
            self._failed(exc)
        else:
            self._settle(applicable)

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
    """`a`'s states then `b`'s; the limiting counter is `b`'s (only `b` may be limited)."""
    limiting = None if b.limiting is None else len(a.states) + b.limiting
    return CheckResult(a.limited or b.limited, a.states + b.states, limiting)
