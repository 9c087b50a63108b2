"""The limiter verbs on top of a counter store, with Kuadrant's semantics.

- `check` before forwarding (token limits): refused when `counter + 1 > limit`; adds nothing.
- `report` after the response: adds the tokens to every counter, unchecked; 0 counts as 1.
- `hit` for request limits (RateLimitPolicy): check and add 1 atomically.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokengateway import cel
from tokengateway.limits.counting import Counting
from tokengateway.limits.limit import Limit
from tokengateway.storage import CheckResult, CounterRef, CounterStore
from tokengateway.tokens import Usage

__all__ = ["Applicable", "Limiter"]


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
    def __init__(self, store: CounterStore) -> None:
        self.store = store

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
        tokens = await self.store.check(applicable.tokens, 1) if applicable.tokens else None
        if tokens is not None and tokens.limited:
            return tokens
        if applicable.requests:
            requests = await self.store.check_and_update(applicable.requests, 1)
            if requests.limited or tokens is None:
                return requests
            return _merge(tokens, requests)
        return tokens or _NOT_LIMITED

    async def report(self, applicable: Applicable, usage: Usage) -> None:
        """Add each counter's cost of `usage`; a cost of 0 counts as 1 (Kuadrant's rule)."""
        if applicable.tokens:
            deltas = [max(c.cost(usage), 1) for c in applicable.countings]
            await self.store.update(applicable.tokens, deltas)


def _merge(a: CheckResult, b: CheckResult) -> CheckResult:
    return CheckResult(a.limited or b.limited, a.states + b.states, None)
