"""Refusals by spent counters, kept by the limiter (limits/limiter.py `SpentCounters`): a
kept refusal never refuses a request the store would admit."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import httpx

from tests.conftest import chat
from tests.test_gateway import GATEWAY, TOKEN_LIMIT, completion, write
from tests.test_limits import _reserving, activation
from tests.test_policies import admin_apply
from tokengateway.limits import Limiter, compile_limits
from tokengateway.storage import CheckResult, CounterRef, MemoryStore
from tokengateway.wire.tokens import Usage


class CountingStore(MemoryStore):
    """A memory store that counts the checks it answers."""

    def __init__(self) -> None:
        super().__init__()
        self.asked = 0

    async def check(self, counters: Sequence[CounterRef], delta: int) -> CheckResult:
        self.asked += 1
        return await super().check(counters, delta)

    async def check_and_update(self, counters: Sequence[CounterRef], delta: int) -> CheckResult:
        self.asked += 1
        return await super().check_and_update(counters, delta)

    async def reserve(
        self,
        counters: Sequence[CounterRef],
        amounts: Sequence[int],
        ttls: Sequence[float],
        reservation: str,
    ) -> CheckResult:
        self.asked += 1
        return await super().reserve(counters, amounts, ttls, reservation)


def token_limit(limit: int, window: str = "1m") -> list:
    return compile_limits(
        "TokenRateLimitPolicy",
        "ns/p",
        {
            "l": {
                "rates": [{"limit": limit, "window": window}],
                "counters": ["auth.identity.userid"],
            }
        },
    )


async def test_a_spent_counter_refuses_again_without_the_store_with_the_same_answer() -> None:
    store = CountingStore()
    limiter = Limiter(store)
    limits = token_limit(10)
    first = limiter.applicable(limits, "ns/r", activation("/", None, "u"))
    assert not (await limiter.check(first)).limited
    await limiter.report(first, Usage(5, 10, 15))
    refused = await limiter.check(limiter.applicable(limits, "ns/r", activation("/", None, "u")))
    assert refused.limited and store.asked == 2
    await asyncio.sleep(0.01)
    store_before = await store.check(first.tokens, 1)
    store.asked -= 1
    again = await limiter.check(limiter.applicable(limits, "ns/r", activation("/", None, "u")))
    assert store.asked == 2 and limiter.spent.hits == 1  # answered from the kept refusal
    assert again.limited and again.limiting == refused.limiting
    assert again.states[0].value == 15 and again.states[0].ref == refused.states[0].ref
    # its window counted down, never past what the store says
    assert again.retry_after < refused.retry_after
    assert again.retry_after <= store_before.retry_after
    # another user's counters are the store's to answer
    other = limiter.applicable(limits, "ns/r", activation("/", None, "v"))
    assert not (await limiter.check(other)).limited


async def test_a_kept_refusal_ends_with_the_window() -> None:
    store = CountingStore()
    limiter = Limiter(store)
    limits = token_limit(10, "300ms")
    first = limiter.applicable(limits, "ns/r", activation("/", None, "u"))
    await limiter.check(first)
    await limiter.report(first, Usage(5, 10, 15))
    assert (await limiter.check(first)).limited
    assert (await limiter.check(first)).limited and limiter.spent.hits == 1
    await asyncio.sleep(0.32)
    assert not (await limiter.check(first)).limited


async def test_a_larger_limit_is_not_refused_by_the_smaller_ones_kept_refusal() -> None:
    store = CountingStore()
    limiter = Limiter(store)
    small = limiter.applicable(token_limit(10), "ns/r", activation("/", None, "u"))
    await limiter.check(small)
    await limiter.report(small, Usage(5, 10, 15))
    assert (await limiter.check(small)).limited
    # the same counter key with a larger limit (a configuration applied since)
    large = limiter.applicable(token_limit(100), "ns/r", activation("/", None, "u"))
    assert large.tokens[0].key == small.tokens[0].key
    assert not (await limiter.check(large)).limited


async def test_forget_empties_the_kept_refusals() -> None:
    store = CountingStore()
    limiter = Limiter(store)
    limits = token_limit(10)
    first = limiter.applicable(limits, "ns/r", activation("/", None, "u"))
    await limiter.report(first, Usage(5, 10, 15))
    assert (await limiter.check(first)).limited and len(limiter.spent) == 1
    limiter.spent.forget()
    await store.retain(set())  # the limit went: its counters with it
    assert not (await limiter.check(first)).limited


async def test_a_counter_reset_outside_the_gateway_is_seen_after_the_recheck() -> None:
    store = CountingStore()
    limiter = Limiter(store)
    limiter.spent.recheck = 0.05
    limits = token_limit(10)
    first = limiter.applicable(limits, "ns/r", activation("/", None, "u"))
    await limiter.report(first, Usage(5, 10, 15))
    assert (await limiter.check(first)).limited
    await store.retain(set())  # as a flush of a shared store would
    assert (await limiter.check(first)).limited  # believed, for at most the recheck
    await asyncio.sleep(0.06)
    assert not (await limiter.check(first)).limited


async def test_refusals_by_holds_are_never_kept() -> None:
    store = CountingStore()
    limiter = Limiter(store)
    limiter.max_reservation_fraction = 1.0
    limits = _reserving({"amount": "600"}, rates=[{"limit": 1000, "window": "1m"}])
    holder = limiter.applicable(limits, "ns/r", activation("/", None, "u"))
    assert not (await limiter.check(holder)).limited
    blocked = limiter.applicable(limits, "ns/r", activation("/", None, "u"))
    result = await limiter.check(blocked)
    assert result.limited and result.held_only and len(limiter.spent) == 0
    await limiter.report(holder, None)  # the hold is given back
    assert not (await limiter.check(blocked)).limited


async def test_a_reservation_too_large_for_what_is_left_is_not_kept() -> None:
    store = CountingStore()
    limiter = Limiter(store)
    limiter.max_reservation_fraction = 1.0
    big = _reserving({"amount": "600"}, rates=[{"limit": 1000, "window": "1m"}])
    small = _reserving({"amount": "100"}, rates=[{"limit": 1000, "window": "1m"}])
    first = limiter.applicable(big, "ns/r", activation("/", None, "u"))
    assert not (await limiter.check(first)).limited
    await limiter.report(first, Usage(300, 400, 700))
    refused = await limiter.check(limiter.applicable(big, "ns/r", activation("/", None, "u")))
    assert refused.limited and not refused.held_only and len(limiter.spent) == 0
    fits = limiter.applicable(small, "ns/r", activation("/", None, "u"))
    assert fits.tokens == first.tokens
    assert not (await limiter.check(fits)).limited


async def test_a_spent_request_limit_is_kept_and_adds_nothing() -> None:
    store = CountingStore()
    limiter = Limiter(store)
    limits = compile_limits(
        "RateLimitPolicy", "ns/q", {"rq": {"rates": [{"limit": 2, "window": "1m"}]}}
    )
    statuses = []
    for _ in range(5):
        applicable = limiter.applicable(limits, "ns/r", activation("/", None, "u"))
        statuses.append((await limiter.check(applicable)).limited)
    assert statuses == [False, False, True, True, True]
    assert store.asked == 3 and limiter.spent.hits == 2
    assert next(iter(store.snapshot().values()))[0] == 2


async def test_no_kept_refusal_during_a_store_outage() -> None:
    store = CountingStore()
    limiter = Limiter(store)
    limits = token_limit(10)
    first = limiter.applicable(limits, "ns/r", activation("/", None, "u"))
    await limiter.report(first, Usage(5, 10, 15))
    assert (await limiter.check(first)).limited
    limiter._outage = True  # a store call failed: the failure mode decides, not the kept refusal
    store.asked = 0
    assert (await limiter.check(first)).limited and store.asked == 1


# --- through the gateway ------------------------------------------------------------------


def limited(limit: int) -> str:
    """test_gateway's token limit, with a 2 s window so that a test sees it end."""
    return TOKEN_LIMIT.replace("LIMIT", str(limit)).replace("window: 1m", "window: 2s")


def _answer(path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    return 200, {"content-type": "application/json"}, completion({"total_tokens": 10})


def test_gateway_kept_refusals_end_with_the_window_and_with_a_larger_limit(
    tmp_path, start_gateway, upstream
) -> None:
    up = upstream(_answer)
    policy = limited(15)
    gw = start_gateway(write(tmp_path, GATEWAY + policy), args=("--backend", f"llm={up.url}"))
    with httpx.Client(base_url=gw.url, headers={"Host": "api.example.com"}, timeout=30) as c:

        def post() -> httpx.Response:
            return c.post("/v1/chat/completions", json=chat())

        started = time.monotonic()
        statuses = [post().status_code for _ in range(2)]
        refusals = [post() for _ in range(3)]
        assert statuses == [200, 200]
        assert [r.status_code for r in refusals] == [429, 429, 429]
        # kept or not, the refusal reads the same, its wait counting down
        first, last = refusals[0], refusals[-1]
        assert first.json() == last.json()
        assert first.headers["x-ratelimit-limit-tokens"] == "15"
        assert last.headers["x-ratelimit-remaining-tokens"] == "0"
        assert int(last.headers["retry-after-ms"]) <= int(first.headers["retry-after-ms"])
        assert len(up.requests) == 2
        metrics = httpx.get(gw.admin_url + "/metrics", timeout=30).text
        assert "tokengateway_limited_kept_total 2" in metrics
        # the window ends: admitted again
        time.sleep(max(0.0, 2.1 - (time.monotonic() - started)))
        assert post().status_code == 200
        while post().status_code == 200:
            pass
        assert post().status_code == 429
        # a larger limit applied: admitted at once
        bigger = limited(100000)
        r = admin_apply(gw, bigger.lstrip("-\n"))
        assert r.status_code == 200, r.text
        deadline = time.monotonic() + 5
        while (status := post().status_code) == 429 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert status == 200
