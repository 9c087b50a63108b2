"""Limits compiled from policy specs, and the limiter verbs with Kuadrant's semantics."""

import pytest

from tokengateway.expr import cel
from tokengateway.limits import (
    LimitCompileError,
    Limiter,
    compile_limits,
    parse_counting,
    parse_window,
)
from tokengateway.storage import MemoryStore
from tokengateway.wire.tokens import Usage

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
    free = Limiter(MemoryStore()).applicable(
        limits, "default/route", activation("/v1/chat/completions", "free", "user-1")
    )
    assert [r.limit for r in free.tokens] == [50]
    gold = Limiter(MemoryStore()).applicable(
        limits, "default/route", activation("/v1/chat/completions", "gold", "user-2")
    )
    assert [r.limit for r in gold.tokens] == [200]
    models = Limiter(MemoryStore()).applicable(
        limits, "default/route", activation("/v1/models", "free", "user-1")
    )
    assert not models  # the path predicate keeps /v1/models unlimited
    no_user = Limiter(MemoryStore()).applicable(
        limits, "default/route", activation("/v1/chat/completions", "free", None)
    )
    assert not no_user  # a counter that cannot be resolved: the limit does not apply
    both = Limiter(MemoryStore()).applicable(
        limits, "default/route", activation("/v1/chat/completions", "free,gold", "u")
    )
    assert sorted(r.limit for r in both.tokens) == [50, 200]


def test_counters_are_per_user_route_and_window() -> None:
    limits = compile_limits("TokenRateLimitPolicy", "ns/p", TUTORIAL_LIMITS)
    a = Limiter(MemoryStore()).applicable(
        limits, "default/r1", activation("/v1/chat/completions", "free", "user-1")
    )
    b = Limiter(MemoryStore()).applicable(
        limits, "default/r1", activation("/v1/chat/completions", "free", "user-3")
    )
    c = Limiter(MemoryStore()).applicable(
        limits, "default/r2", activation("/v1/chat/completions", "free", "user-1")
    )
    keys = {a.tokens[0].key, b.tokens[0].key, c.tokens[0].key}
    assert len(keys) == 3


def test_several_rates_are_independent_counters() -> None:
    spec = {"x": {"rates": [{"limit": 10, "window": "1s"}, {"limit": 100, "window": "1m"}]}}
    limits = compile_limits("TokenRateLimitPolicy", "ns/p", spec)
    refs = Limiter(MemoryStore()).applicable(limits, "ns/r", activation("/", None, None)).tokens
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
    applicable = Limiter(MemoryStore()).applicable(limits, "ns/r", activation("/", None, None))
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
    applicable = Limiter(MemoryStore()).applicable(
        tokens + requests, "ns/route", activation("/", None, None)
    )
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
    applicable = Limiter(MemoryStore()).applicable(limits, "ns/r", activation("/", None, None))
    await Limiter(store).report(applicable, Usage(7, 0, 7))
    values = {k.split("\x1f")[1].rsplit("/", 1)[1]: v for k, (v, _) in store.snapshot().items()}
    assert values == {"total": 7, "out": 1, "cheap": 1}  # 0 counts as 1
    await Limiter(store).report(applicable, Usage(7, 3, 10))
    values = {k.split("\x1f")[1].rsplit("/", 1)[1]: v for k, (v, _) in store.snapshot().items()}
    assert values == {"total": 17, "out": 13, "cheap": 4}


def test_counting_is_ignored_on_request_limits() -> None:
    spec = {"r": {"rates": [{"limit": 1, "window": "1m"}], "counting": "prompt"}}
    assert compile_limits("RateLimitPolicy", "ns/p", spec)[0].counting.total


# --- reservations -------------------------------------------------------------------------


def _reserving(reservation: dict, rates: list | None = None, counting: object = None) -> list:
    spec: dict = {
        "rates": rates or [{"limit": 10000, "window": "1m"}],
        "counters": [{"expression": "auth.identity.userid"}],
        "reservation": reservation,
    }
    if counting is not None:
        spec["counting"] = counting
    return compile_limits("TokenRateLimitPolicy", "ns/p", {"r": spec})


BODY = b'{"messages": [{"role": "user", "content": "What is Kubernetes?"}], "max_tokens": 40}'


def test_a_reservation_holds_the_prompt_estimate_plus_max_tokens() -> None:
    limiter = Limiter(MemoryStore())
    got = limiter.applicable(_reserving({}), "ns/r", activation("/", None, "u"), body=BODY)
    from tokengateway.wire.tokens import count_tokens

    assert got.amounts == [count_tokens("What is Kubernetes?") + 40]
    assert got.ttls == [60.0]  # no ttl, no route timeout: the clamp
    # `n` choices multiply the allowance; max_completion_tokens wins over max_tokens
    body = b'{"prompt": "hi", "max_completion_tokens": 10, "max_tokens": 99, "n": 3}'
    got = limiter.applicable(_reserving({}), "ns/r", activation("/", None, "u"), body=body)
    assert got.amounts == [count_tokens("hi") + 30]


def test_without_max_tokens_the_default_completion_is_held() -> None:
    limiter = Limiter(MemoryStore())
    body = b'{"prompt": "hi"}'
    act = activation("/", None, "u")
    assert limiter.applicable(_reserving({}), "ns/r", act, body=body).amounts == [1 + 1024]
    limits = _reserving({"defaultCompletionTokens": 7})
    assert limiter.applicable(limits, "ns/r", act, body=body).amounts == [1 + 7]
    # a body that is not JSON holds only the default
    assert limiter.applicable(limits, "ns/r", act, body=b"{nope").amounts == [7]


def test_a_reservation_counts_the_way_its_limit_counts() -> None:
    limiter = Limiter(MemoryStore())
    limits = _reserving({}, counting="prompt")
    got = limiter.applicable(limits, "ns/r", activation("/", None, "u"), body=b'{"prompt": "hi"}')
    assert got.amounts == [1]


def test_amount_and_ttl_are_cel_and_clamped() -> None:
    limiter = Limiter(MemoryStore(), max_reservation_fraction=0.5, max_reservation_ttl=30)
    limits = _reserving(
        {"amount": "requestBodyJSON('/max_tokens') * 100", "ttl": "duration('5s')"},
        rates=[{"limit": 1000, "window": "1m"}, {"limit": 5000, "window": "1h"}],
    )
    cel.bind_bodies(BODY)
    got = limiter.applicable(limits, "ns/r", activation("/", None, "u"), body=BODY)
    assert got.amounts == [500, 2500]  # 4000 clamped to half of each counter's limit
    assert got.ttls == [5.0, 5.0]
    long = _reserving({"amount": "uint(3)", "ttl": "'2h'"})
    got = limiter.applicable(long, "ns/r", activation("/", None, "u"), default_ttl=10)
    assert got.amounts == [3] and got.ttls == [30]  # the ttl clamp
    # an amount that does not evaluate falls back to the estimate; a bad ttl to the default
    odd = _reserving({"amount": "requestBodyJSON('/missing')", "ttl": "'soon'"})
    got = limiter.applicable(odd, "ns/r", activation("/", None, "u"), body=b"{}", default_ttl=10)
    assert got.amounts == [1024] and got.ttls == [10]


def test_limits_without_a_reservation_hold_nothing_beside_one_that_does() -> None:
    limiter = Limiter(MemoryStore())
    plain = compile_limits(
        "TokenRateLimitPolicy", "ns/p", {"plain": {"rates": [{"limit": 9, "window": "1m"}]}}
    )
    got = limiter.applicable(
        plain + _reserving({"amount": "5"}), "ns/r", activation("/", None, "u")
    )
    assert got.amounts == [0, 5]
    assert limiter.applicable(plain, "ns/r", activation("/", None, "u")).amounts is None
    off = limiter.applicable(
        _reserving({"amount": "5"}), "ns/r", activation("/", None, "u"), reservations=False
    )
    assert off.amounts is None


def test_a_reservation_that_does_not_compile_names_the_field() -> None:
    with pytest.raises(LimitCompileError, match=r"limit 'r' reservation.amount 'uint\(' does not"):
        _reserving({"amount": "uint("})


async def test_check_reserves_and_report_commits() -> None:
    store = MemoryStore()
    limiter = Limiter(store)
    limits = _reserving({"amount": "600"}, rates=[{"limit": 1000, "window": "1m"}])
    limiter.max_reservation_fraction = 1.0
    first = limiter.applicable(limits, "ns/r", activation("/", None, "u"))
    assert not (await limiter.check(first)).limited and first.reservation is not None
    second = limiter.applicable(limits, "ns/r", activation("/", None, "u"))
    assert (await limiter.check(second)).limited and second.reservation is None
    await limiter.report(first, Usage(10, 20, 30))
    assert first.reservation is None
    assert next(iter(store.snapshot().values()))[0] == 30
    third = limiter.applicable(limits, "ns/r", activation("/", None, "u"))
    assert not (await limiter.check(third)).limited
    await limiter.report(third, None)  # failed upstream: released, nothing charged
    assert next(iter(store.snapshot().values()))[0] == 30
    assert not (
        await limiter.check(limiter.applicable(limits, "ns/r", activation("/", None, "u")))
    ).limited


async def test_a_request_limit_refusal_releases_the_token_hold() -> None:
    store = MemoryStore()
    limiter = Limiter(store)
    tokens = _reserving({"amount": "400"})
    requests = compile_limits(
        "RateLimitPolicy", "ns/q", {"rq": {"rates": [{"limit": 1, "window": "1m"}]}}
    )
    a = limiter.applicable(tokens + requests, "ns/r", activation("/", None, "u"))
    assert not (await limiter.check(a)).limited
    b = limiter.applicable(tokens + requests, "ns/r", activation("/", None, "u"))
    assert (await limiter.check(b)).limited  # the request limit refused
    assert b.reservation is None
    key = a.tokens[0].key
    assert store._held_on(key, __import__("time").monotonic()) == 400  # only a's hold


def test_counters_that_apply_are_kept_per_selector_values_and_follow_them() -> None:
    limiter = Limiter(MemoryStore())
    limits = compile_limits("TokenRateLimitPolicy", "ns/p", TUTORIAL_LIMITS)
    seen = []
    for groups, user in [("gold", "a"), ("free", "a"), ("gold", "b"), ("gold", "a"), (None, "a")]:
        kept = limiter.applicable(limits, "ns/r", activation("/v1/chat/completions", groups, user))
        fresh = limiter._resolve(
            limits, "ns/r", activation("/v1/chat/completions", groups, user), b"", None, True, None
        )
        assert (kept.tokens, kept.token_limits) == (fresh.tokens, fresh.token_limits)
        seen.append(kept.token_limits)
    assert seen == [["ns/p/gold"], ["ns/p/free"], ["ns/p/gold"], ["ns/p/gold"], []]
    plan = limiter._plan(limits, "ns/r")
    assert plan is not None and len(plan.kept) == 4
    # each request gets its own Applicable (its reservation), on shared read-only lists
    a = limiter.applicable(limits, "ns/r", activation("/v1/chat/completions", "gold", "a"))
    b = limiter.applicable(limits, "ns/r", activation("/v1/chat/completions", "gold", "a"))
    assert a is not b and a.tokens is b.tokens
    # the same limits on another route: that route's counters
    other = limiter.applicable(limits, "ns/s", activation("/v1/chat/completions", "gold", "a"))
    assert other.tokens[0].key.startswith("ns/s") and a.tokens[0].key.startswith("ns/r")


def test_limits_reading_the_body_are_not_kept() -> None:
    limiter = Limiter(MemoryStore())
    limits = compile_limits(
        "TokenRateLimitPolicy",
        "ns/p",
        {
            "m": {
                "rates": [{"limit": 10, "window": "1m"}],
                "counters": ['requestBodyJSON("/model")'],
            }
        },
    )
    assert limiter._plan(limits, "ns/r") is None
    for model in ("a", "b"):
        cel.bind_bodies(b'{"model": "%s"}' % model.encode())
        applicable = limiter.applicable(limits, "ns/r", activation("/", None, "u"))
        assert applicable.tokens[0].key.endswith(model)


def test_a_map_valued_selector_is_evaluated_each_time() -> None:
    limiter = Limiter(MemoryStore())
    limits = compile_limits(
        "TokenRateLimitPolicy",
        "ns/p",
        {"i": {"rates": [{"limit": 10, "window": "1m"}], "counters": ["auth.identity"]}},
    )
    a = limiter.applicable(limits, "ns/r", activation("/", None, "u"))
    plan = limiter._plan(limits, "ns/r")
    assert plan is not None and not plan.kept  # the identity is a map: nothing kept
    assert (
        a.tokens
        == limiter._resolve(
            limits, "ns/r", activation("/", None, "u"), b"", None, True, None
        ).tokens
    )
