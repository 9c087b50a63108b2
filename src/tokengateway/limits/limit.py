"""Limits compiled from TokenRateLimitPolicy / RateLimitPolicy specs (what is counted)."""

from __future__ import annotations

import datetime
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from dataclasses import field as dataclass_field
from typing import Any

from tokengateway.expr import cel
from tokengateway.expr.duration import parse_window as _parse_duration
from tokengateway.expr.kept import keep
from tokengateway.limits.counting import TOTAL, Counting, parse_counting
from tokengateway.storage import CounterRef
from tokengateway.wire.tokens import Usage

__all__ = [
    "Limit",
    "LimitCompileError",
    "Rate",
    "Reservation",
    "compile_limits",
    "counter_scope",
    "parse_counter_key",
    "parse_window",
]

_SEP = "\x1f"
#: escapes, in a counter value, the separator ("\x1e1") and itself ("\x1e0"): values are
#: anyone's text (a header, a claim), and one holding the separator must neither read back
#: as two values nor share a key with another tuple of values. Other values are verbatim.
_ESC = "\x1e"
_UNESCAPE = re.compile("\x1e([01])")


def _escape(value: str) -> str:
    if _ESC in value or _SEP in value:
        return value.replace(_ESC, _ESC + "0").replace(_SEP, _ESC + "1")
    return value


def _unescape(value: str) -> str:
    if _ESC in value:
        return _UNESCAPE.sub(lambda m: _ESC if m[1] == "0" else _SEP, value)
    return value


def counter_scope(namespace: str, identifier: str) -> str:
    """The prefix every counter of one limit on one route shares."""
    return f"{namespace}{_SEP}{identifier}"


def parse_counter_key(key: str) -> tuple[str, str, int, tuple[str, ...]] | None:
    """(namespace, limit identifier, window in ms, counter values) of a counter key.

    A key does not say how many values it holds: one empty value reads back as none."""
    parts = key.split(_SEP, 3)
    if len(parts) < 4 or not parts[2].isdigit():
        return None
    values = tuple(_unescape(v) for v in parts[3].split(_SEP)) if parts[3] else ()
    return parts[0], parts[1], int(parts[2]), values


class LimitCompileError(ValueError):
    """A limit that cannot be enforced; the message names the policy and the limit."""


def parse_window(text: str) -> float:
    """Seconds in a window (`"1m"` -> 60.0); a zero window is refused: it would never count."""
    seconds = _parse_duration(text)
    if seconds <= 0:
        raise ValueError(f"window {text!r} must be longer than zero")
    return seconds


@dataclass(frozen=True, slots=True)
class Rate:
    limit: int
    window: float  # seconds
    window_text: str

    @property
    def window_ms(self) -> int:
        """The window in milliseconds, as counter keys carry it (rounded: 1.001 s is 1001)."""
        return round(self.window * 1000)


#: completion tokens assumed for a request that sets no `max_tokens` (reservation estimate)
DEFAULT_COMPLETION_TOKENS = 1024


@dataclass(frozen=True, slots=True)
class Reservation:
    """A limit's `reservation`: how many tokens to hold before forwarding, for how long.

    Without `amount`, the request's estimate (prompt by the tokenizer + its `max_tokens`, or
    `default_completion`) is held, counted the way the limit counts. An `amount` that does
    not evaluate to a non-negative number falls back to that estimate; a `ttl` that does not
    evaluate to a duration falls back to the route's timeout (the limiter's default)."""

    amount: cel.Expression | None = None
    ttl: cel.Expression | None = None
    default_completion: int = DEFAULT_COMPLETION_TOKENS
    #: seconds a request refused only by holds may wait for them to settle (our extension)
    wait: float = 0.0

    def hold(self, activation: cel.Activation, estimate: Usage, counting: Counting) -> int:
        if self.amount is not None:
            value = self.amount.evaluate(activation)
            if isinstance(value, int | float) and not isinstance(value, bool) and value >= 0:
                return int(value)
        return counting.cost(estimate)

    def lifetime(self, activation: cel.Activation) -> float | None:
        if self.ttl is None:
            return None
        value = self.ttl.evaluate(activation)
        if isinstance(value, datetime.timedelta):
            seconds = value.total_seconds()
        elif isinstance(value, str):
            try:
                seconds = _parse_duration(value)
            except ValueError:
                return None
        elif isinstance(value, int | float) and not isinstance(value, bool):
            seconds = float(value)
        else:
            return None
        return seconds if seconds > 0 else None


#: counter lists kept per limit, by values
KEPT_COUNTERS = 4096


@dataclass(frozen=True, slots=True)
class Limit:
    """One named limit of one policy, ready to evaluate per request.

    `predicates` are the policy's top-level `when` followed by the limit's own; `counters`
    are the expressions whose values split the counter (one per user, say).
    """

    policy_kind: str  # "TokenRateLimitPolicy" or "RateLimitPolicy"
    policy: str  # "namespace/name"
    name: str
    rates: tuple[Rate, ...]
    predicates: tuple[cel.Predicate, ...]
    counters: tuple[cel.Expression, ...]
    counting: Counting = TOTAL
    reservation: Reservation | None = None
    #: counters already made, by namespace and values (the same user's come back often)
    _refs: dict[tuple[str, tuple[str, ...]], list[CounterRef]] = dataclass_field(
        default_factory=dict, compare=False, repr=False
    )

    @property
    def identifier(self) -> str:
        return f"{self.policy}/{self.name}"

    @property
    def counts_tokens(self) -> bool:
        return self.policy_kind == "TokenRateLimitPolicy"

    def resolve(self, activation: cel.Activation) -> tuple[str, ...] | None:
        """The counter's variable values, or None when the limit does not apply."""
        for predicate in self.predicates:
            if not predicate.test(activation):
                return None
        values = []
        for expression in self.counters:
            value = expression.evaluate(activation)
            if value is cel.MISSING or value is None:
                return None
            values.append(value if isinstance(value, str) else _stringify(value))
        return tuple(values)

    def counter_refs(self, namespace: str, values: tuple[str, ...]) -> list[CounterRef]:
        """One counter per rate: (namespace, limit, window, values) -> key. The list is
        shared: read-only."""
        made = self._refs.get((namespace, values))
        if made is not None:
            return made
        base = counter_scope(namespace, self.identifier)
        tail = _SEP.join(_escape(v) for v in values)
        made = [
            CounterRef(f"{base}{_SEP}{rate.window_ms}{_SEP}{tail}", rate.limit, rate.window)
            for rate in self.rates
        ]
        keep(self._refs, (namespace, values), made, KEPT_COUNTERS)
        return made


def _stringify(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def compile_limits(
    policy_kind: str,
    policy: str,
    limits: Mapping[str, Mapping[str, Any]],
    when: Sequence[Mapping[str, Any]] | None = None,
) -> list[Limit]:
    """Compile a policy's `limits` map; any bad CEL is an error naming policy and limit."""
    top = _predicates(policy_kind, policy, None, when or ())
    compiled = []
    for name, spec in limits.items():
        rates = tuple(
            Rate(int(r["limit"]), parse_window(str(r["window"])), str(r["window"]))
            for r in spec.get("rates") or ()
        )
        predicates = top + _predicates(policy_kind, policy, name, spec.get("when") or ())
        counters = []
        for i, counter in enumerate(spec.get("counters") or ()):
            source = counter["expression"] if isinstance(counter, Mapping) else str(counter)
            try:
                counters.append(cel.compile_expression(source))
            except cel.CelCompileError as exc:
                raise LimitCompileError(
                    f"{policy_kind} {policy}: limit {name!r} counters[{i}] "
                    f"{source.strip()!r} does not compile: {exc}"
                ) from None
        counting = TOTAL
        if "counting" in spec and policy_kind == "TokenRateLimitPolicy":
            try:
                counting = parse_counting(spec["counting"])
            except ValueError as exc:
                raise LimitCompileError(f"{policy_kind} {policy}: limit {name!r}: {exc}") from None
        reservation = None
        if spec.get("reservation") is not None and policy_kind == "TokenRateLimitPolicy":
            reservation = _reservation(policy_kind, policy, name, spec["reservation"])
        compiled.append(
            Limit(
                policy_kind, policy, name, rates, predicates, tuple(counters), counting, reservation
            )
        )
    return compiled


def _reservation(kind: str, policy: str, limit: str, spec: Mapping[str, Any]) -> Reservation:
    exprs: dict[str, cel.Expression | None] = {}
    for field in ("amount", "ttl"):
        source = spec.get(field)
        if source is None:
            exprs[field] = None
            continue
        try:
            exprs[field] = cel.compile_expression(str(source))
        except cel.CelCompileError as exc:
            raise LimitCompileError(
                f"{kind} {policy}: limit {limit!r} reservation.{field} "
                f"{str(source).strip()!r} does not compile: {exc}"
            ) from None
    default = spec.get("defaultCompletionTokens")
    wait = spec.get("wait")
    try:
        wait_seconds = _parse_duration(str(wait)) if wait else 0.0
    except ValueError:
        raise LimitCompileError(
            f"{kind} {policy}: limit {limit!r} reservation.wait {wait!r} is not a duration "
            "such as 2s or 500ms"
        ) from None
    return Reservation(
        exprs["amount"],
        exprs["ttl"],
        DEFAULT_COMPLETION_TOKENS if default is None else int(default),
        wait_seconds,
    )


def _predicates(
    kind: str, policy: str, limit: str | None, when: Sequence[Mapping[str, Any]]
) -> tuple[cel.Predicate, ...]:
    out = []
    for i, item in enumerate(when):
        source = str(item.get("predicate", ""))
        try:
            out.append(cel.compile_predicate(source))
        except cel.CelCompileError as exc:
            where = f"limit {limit!r} when[{i}]" if limit else f"when[{i}]"
            raise LimitCompileError(
                f"{kind} {policy}: {where} predicate {source.strip()!r} does not compile: {exc}"
            ) from None
    return tuple(out)
