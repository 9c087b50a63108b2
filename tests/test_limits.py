"""Limits compiled from policy specs, and the limiter verbs with Kuadrant's semantics."""

import pytest

from tokengateway import cel
from tokengateway.limits import (
    LimitCompileError,
    Limiter,
    compile_limits,
    parse_counting,
    parse_window,
)
from tokengateway.storage import MemoryStore
from tokengateway.tokens import Usage

TUTORIAL_LIMITS = {
    "free": {
        "rates": [{"limit": 50, "window": "1m"}],
        "when": [
            {"predicate": 'request.path == "/v1/chat/completions"'},
            {"predicate": 'auth.identity.groups.split(",").exists(g, g == "free")\n'},
        ],
        "counters": [{"expression": "auth.identity.userid"}],
    },
    "gold": {
        "rates": [{"limit": 200, "window": "1m"}],
        "when": [
            {"predicate": 'request.path == "/v1/chat/completions"'},
            {"predicate": 'auth.identity.groups.split(",").exists(g, g == "gold")'},
        ],
        "counters": [{"expression": "auth.identity.userid"}],
    },
}


def activation(path: str, groups: str | None, user: str | None) -> cel.Activation:
    identity = {}
    if groups is not None:
        identity["groups"] = groups
    if user is not None:
        identity["userid"] = user
    return cel.Activation({"request": {"path": path}, "auth": {"identity": identity}})


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1m", 60),
        ("2s", 2),
        ("500ms", 0.5),
        ("1h30m", 5400),
        ("720h", 2592000),
        ("1h1m1s1ms", 3661.001),
    ],
)
def test_parse_window(text: str, seconds: float) -> None:
    assert parse_window(text) == pytest.approx(seconds)


@pytest.mark.parametrize("text", ["1d", "", "m", "1m1", "123456s", "0s"])
def test_parse_window_rejects(text: str) -> None:
    with pytest.raises(ValueError, match=r"does not match|longer than zero"):
        parse_window(text)


def test_applicability_follows_predicates_and_counters() -> None:
    limits = compile_limits("TokenRateLimitPolicy", "gateway-system/trlp", TUTORIAL_LIMITS)
    free = Limiter.applicable(
        limits, "default/route", activation("/v1/chat/completions", "free", "user-1")
    )
    assert [r.limit for r in free.tokens] == [50]
    gold = Limiter.applicable(
        limits, "default/route", activation("/v1/chat/completions", "gold", "user-2")
    )
    assert [r.limit for r in gold.tokens] == [200]
    models = Limiter.applicable(limits, "default/route", activation("/v1/models", "free", "user-1"))
    assert not models  # the path predicate keeps /v1/models unlimited
    no_user = Limiter.applicable(
        limits, "default/route", activation("/v1/chat/completions", "free", None)
    )
    assert not no_user  # a counter that cannot be resolved: the limit does not apply
    both = Limiter.applicable(
        limits, "default/route", activation("/v1/chat/completions", "free,gold", "u")
    )
    assert sorted(r.limit for r in both.tokens) == [50, 200]


def test_counters_are_per_user_route_and_window() -> None:
    limits = compile_limits("TokenRateLimitPolicy", "ns/p", TUTORIAL_LIMITS)
    a = Limiter.applicable(
        limits, "default/r1", activation("/v1/chat/completions", "free", "user-1")
    )
    b = Limiter.applicable(
        limits, "default/r1", activation("/v1/chat/completions", "free", "user-3")
    )
    c = Limiter.applicable(
        limits, "default/r2", activation("/v1/chat/completions", "free", "user-1")
    )
    keys = {a.tokens[0].key, b.tokens[0].key, c.tokens[0].key}
    assert len(keys) == 3


def test_several_rates_are_independent_counters() -> None:
    spec = {"x": {"rates": [{"limit": 10, "window": "1s"}, {"limit": 100, "window": "1m"}]}}
    limits = compile_limits("TokenRateLimitPolicy", "ns/p", spec)
    refs = Limiter.applicable(limits, "ns/r", activation("/", None, None)).tokens
    assert [(r.limit, r.window) for r in refs] == [(10, 1.0), (100, 60.0)]
    assert refs[0].key != refs[1].key


def test_bad_cel_names_policy_and_limit() -> None:
    spec = {
        "free": {
            "rates": [{"limit": 1, "window": "1m"}],
            "when": [{"predicate": "request.path =="}],
        }
    }
    with pytest.raises(
        LimitCompileError, match=r"TokenRateLimitPolicy ns/p: limit 'free' when\[0\]"
    ):
        compile_limits("TokenRateLimitPolicy", "ns/p", spec)
    spec = {
        "free": {"rates": [{"limit": 1, "window": "1m"}], "counters": [{"expression": "auth."}]}
    }
    with pytest.raises(LimitCompileError, match=r"limit 'free' counters\[0\]"):
        compile_limits("TokenRateLimitPolicy", "ns/p", spec)
    with pytest.raises(LimitCompileError, match=r"when\[0\].*must evaluate to a bool"):
        compile_limits("RateLimitPolicy", "ns/p", {}, [{"predicate": "1 + 1"}])


async def test_token_check_then_report_with_zero_counting_as_one() -> None:
    limits = compile_limits(
        "TokenRateLimitPolicy", "ns/p", {"t": {"rates": [{"limit": 3, "window": "1m"}]}}
    )
    limiter = Limiter(MemoryStore())
    applicable = Limiter.applicable(limits, "ns/r", activation("/", None, None))
    assert not (await limiter.check(applicable)).limited
    await limiter.report(applicable, Usage(0, 0, 0))  # counts as 1
    await limiter.report(applicable, Usage(0, 1, 1))
    assert not (await limiter.check(applicable)).limited  # 2 + 1 > 3 is false
    await limiter.report(applicable, Usage(0, 0, 0))
    assert (await limiter.check(applicable)).limited


async def test_request_limits_hit_atomically_and_only_when_tokens_allow() -> None:
    tokens = compile_limits(
        "TokenRateLimitPolicy", "ns/t", {"t": {"rates": [{"limit": 10, "window": "1m"}]}}
    )
    requests = compile_limits(
        "RateLimitPolicy", "ns/r", {"r": {"rates": [{"limit": 2, "window": "1m"}]}}
    )
    store = MemoryStore()
    limiter = Limiter(store)
    applicable = Limiter.applicable(tokens + requests, "ns/route", activation("/", None, None))
    assert len(applicable.tokens) == 1 and len(applicable.requests) == 1
    assert not (await limiter.check(applicable)).limited
    assert not (await limiter.check(applicable)).limited
    assert (await limiter.check(applicable)).limited  # third request in the window
    await limiter.report(applicable, Usage(0, 10, 10))
    refused = await limiter.check(applicable)
    assert refused.limited
    request_key = applicable.requests[0].key
    assert store.snapshot()[request_key][0] == 2


def test_counting_extension() -> None:
    usage = Usage(
        prompt_tokens=100, completion_tokens=10, total_tokens=115, cached_prompt_tokens=40
    )
    assert parse_counting(None).cost(usage) == 115  # Kuadrant: total_tokens as reported
    assert parse_counting("total").cost(usage) == 115
    assert parse_counting("prompt").cost(usage) == 100
    assert parse_counting("completion").cost(usage) == 10
    assert parse_counting({"prompt": 1, "completion": 4}).cost(usage) == 140
    assert parse_counting({"prompt": 1, "cachedPrompt": 0}).cost(usage) == 60
    assert (
        parse_counting({"prompt": 1, "cachedPrompt": 0.5, "completion": 2}).cost(usage)
        == 60 + 20 + 20
    )
    assert parse_counting({"completion": 0.3}).cost(usage) == 3


async def test_report_charges_each_limit_its_own_count() -> None:
    spec = {
        "total": {"rates": [{"limit": 1000, "window": "1m"}]},
        "out": {"rates": [{"limit": 1000, "window": "1m"}], "counting": {"completion": 4}},
        "cheap": {"rates": [{"limit": 1000, "window": "1m"}], "counting": "completion"},
    }
    limits = compile_limits("TokenRateLimitPolicy", "ns/p", spec)
    store = MemoryStore()
    applicable = Limiter.applicable(limits, "ns/r", activation("/", None, None))
    await Limiter(store).report(applicable, Usage(7, 0, 7))
    values = {k.split("\x1f")[1].rsplit("/", 1)[1]: v for k, (v, _) in store.snapshot().items()}
    assert values == {"total": 7, "out": 1, "cheap": 1}  # 0 counts as 1
    await Limiter(store).report(applicable, Usage(7, 3, 10))
    values = {k.split("\x1f")[1].rsplit("/", 1)[1]: v for k, (v, _) in store.snapshot().items()}
    assert values == {"total": 17, "out": 13, "cheap": 4}


def test_counting_is_ignored_on_request_limits() -> None:
    spec = {"r": {"rates": [{"limit": 1, "window": "1m"}], "counting": "prompt"}}
    assert compile_limits("RateLimitPolicy", "ns/p", spec)[0].counting.total
