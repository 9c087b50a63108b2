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

When the store fails, `on_error` decides, as Kuadrant's failure mode does: "allow" (the
default) lets requests through and keeps their reports (bounded) to replay once the store
answers again, so an outage of seconds to minutes loses no accounting; "deny" refuses with
StorageUnavailable (503 at the gateway).
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections import deque
from collections.abc import Sequence
from typing import Any, Literal

import msgspec

from tokengateway.expr import cel
from tokengateway.limits.counting import Counting
from tokengateway.limits.limit import Limit
from tokengateway.storage import CheckResult, CounterRef, CounterStore, StorageError
from tokengateway.wire.tokens import Usage, max_completion_tokens, prompt_tokens

__all__ = ["Applicable", "Estimate", "Limiter", "OnError", "StorageUnavailable"]

log = logging.getLogger("tokengateway.limits")

MAX_PENDING_REPORTS = 100_000
#: what a failing store means for a request: let it through, or refuse it (503)
OnError = Literal["allow", "deny"]
#: Limitador's defaults for its `--max-reservation-fraction` / `--max-reservation-ttl`
MAX_RESERVATION_FRACTION = 0.5
MAX_RESERVATION_TTL = 60.0


class StorageUnavailable(RuntimeError):
    """The store failed and the failure mode is "deny"."""


class Applicable:
    """The counters of one request, split by what counts them; `countings[i]` says which
    tokens `tokens[i]` counts."""

    __slots__ = (
        "amounts",
        "countings",
        "request_limits",
        "requests",
        "reservation",
        "token_limits",
        "tokens",
        "ttls",
    )

    def __init__(self) -> None:
        self.tokens: list[CounterRef] = []
        self.countings: list[Counting] = []
        self.requests: list[CounterRef] = []
        #: the identifier of the limit each of `tokens` / `requests` counts for
        self.token_limits: list[str] = []
        self.request_limits: list[str] = []
        #: tokens to hold on each of `tokens` (None: no limit reserves, check instead)
        self.amounts: list[int] | None = None
        self.ttls: list[float] = []
        #: the id of the hold `check` made, until `report` commits it
        self.reservation: str | None = None

    def __bool__(self) -> bool:
        return bool(self.tokens or self.requests)


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
            if out.amounts is not None:
                amount, ttl = 0, 0.0
                if held is not None:
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
            out.tokens.extend(refs)
            out.countings.extend([limit.counting] * len(refs))
            out.token_limits.extend([limit.identifier] * len(refs))
        return out

    async def check(self, applicable: Applicable) -> CheckResult:
        """Token limits first (checked, or reserved); request limits are hit (+1) only when
        the token limits leave room."""
        tokens: CheckResult | None = None
        try:
            if applicable.amounts is not None:
                reservation = os.urandom(12).hex()
                tokens = await self.store.reserve(
                    applicable.tokens, applicable.amounts, applicable.ttls, reservation
                )
                if not tokens.limited:
                    applicable.reservation = reservation
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
