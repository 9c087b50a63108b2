"""The rate-limit headers clients read, on successes and refusals alike.

OpenAI's names (its SDKs and many clients read them):

    x-ratelimit-limit-tokens / -remaining-tokens / -reset-tokens       token limits
    x-ratelimit-limit-requests / -remaining-requests / -reset-requests request limits

Values come from the most restrictive applicable counter (least remaining; ties: the one that
reopens last), after this request's own usage when it is known. Resets are written as OpenAI
writes them: `1s`, `6m0s`, `250ms`. A refusal also carries `retry-after` (whole seconds),
`retry-after-ms`, and `x-should-retry` (false when the wait is longer than an SDK waits).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import NamedTuple

from tokengateway.limits import Counting
from tokengateway.storage import CheckResult, CounterState
from tokengateway.wire.tokens import Usage

__all__ = [
    "LONG_QUOTA",
    "MAX_CLIENT_WAIT",
    "Refusal",
    "go_duration",
    "limited_headers",
    "success_headers",
]

#: OpenAI's SDKs honour a retry-after of at most 60 s; past that, tell them not to retry
MAX_CLIENT_WAIT = 60.0
#: a refusal by a window this long or longer is a spent quota, not a rate (insufficient_quota)
LONG_QUOTA = 86400.0

Header = tuple[bytes, bytes]


def go_duration(seconds: float) -> str:
    """OpenAI's (Go's) duration text: `250ms`, `1.5s`, `6m0s`, `1h2m3s`."""
    if seconds < 1:
        return f"{max(0, math.ceil(seconds * 1000))}ms"
    if seconds < 60:  # the common case (windows of a minute), without the divisions
        return f"{seconds:.3f}".rstrip("0").rstrip(".") + "s"
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    text = f"{secs:.3f}".rstrip("0").rstrip(".") + "s"
    if hours >= 1:
        return f"{int(hours)}h{int(minutes)}m{text}"
    if minutes >= 1:
        return f"{int(minutes)}m{text}"
    return text


def _tightest(states: Sequence[CounterState], remaining: Sequence[int]) -> int:
    best = 0
    for i in range(1, len(states)):
        if remaining[i] < remaining[best] or (
            remaining[i] == remaining[best] and states[i].expires_in > states[best].expires_in
        ):
            best = i
    return best


_NAMES = {
    kind: tuple(f"x-ratelimit-{what}-{kind}".encode() for what in ("limit", "remaining", "reset"))
    for kind in ("tokens", "requests")
}


def _triple(kind: str, state: CounterState, remaining: int) -> list[Header]:
    limit, left, reset = _NAMES[kind]
    return [
        (limit, b"%d" % state.ref.limit),
        (left, b"%d" % max(0, remaining)),
        (reset, go_duration(state.expires_in).encode()),
    ]


def success_headers(
    result: CheckResult,
    token_counters: int,
    countings: Sequence[Counting],
    usage: Usage | None,
) -> list[Header]:
    """Headers for an admitted request. `result.states` holds the `token_counters` token
    counters first, then the request counters (as the limiter checks them)."""
    states = result.states
    if not states:
        return []
    out: list[Header] = []
    tokens = states[:token_counters]
    if len(tokens) == 1:  # the common case, without the lists
        state = tokens[0]
        spent = max(countings[0].cost(usage), 1) if usage is not None else 0
        out += _triple("tokens", state, state.ref.limit - state.value - state.held - spent)
    elif tokens:
        remaining = [
            s.ref.limit - s.value - s.held - (max(c.cost(usage), 1) if usage is not None else 0)
            for s, c in zip(tokens, countings, strict=False)
        ]
        best = _tightest(tokens, remaining)
        out += _triple("tokens", tokens[best], remaining[best])
    requests = states[token_counters:]
    if requests:
        remaining = [s.ref.limit - s.value - 1 for s in requests]  # this request's hit
        best = _tightest(requests, remaining)
        out += _triple("requests", requests[best], remaining[best])
    return out


class Refusal(NamedTuple):
    """A refusal as the client hears of it: the headers, and what the message says."""

    headers: list[Header]
    state: CounterState  # the counter that refused
    kind: str  # "tokens" or "requests"
    retry: int  # whole seconds, as in retry-after
    quota: bool  # a long quota rather than a rate (insufficient_quota)


def limited_headers(result: CheckResult, token_counters: int) -> Refusal:
    """The refusal of `result`, whose states hold `token_counters` token counters first."""
    assert result.limiting is not None
    state = result.states[result.limiting]
    kind = "tokens" if result.limiting < token_counters else "requests"
    wait = result.retry_after
    retry = max(1, math.ceil(wait))
    out = _triple(kind, state, state.ref.limit - state.value - state.held)
    out += [
        (b"retry-after", b"%d" % retry),
        (b"retry-after-ms", b"%d" % max(1, math.ceil(wait * 1000))),
        (b"x-should-retry", b"true" if wait <= MAX_CLIENT_WAIT else b"false"),
    ]
    return Refusal(out, state, kind, retry, state.ref.window >= LONG_QUOTA)
