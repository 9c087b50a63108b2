"""The Redis counter store against real redis-server processes (one server and a 3-master
Cluster), with the behavioural scenarios shared with the in-memory store."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot

from tokengateway.limits import counter_scope, parse_counter_key
from tokengateway.storage import (
    CounterRef,
    CounterStore,
    MemoryStore,
    StorageError,
    StorageURIError,
    open_store,
)
from tokengateway.storage.redis import RedisStore, parse_redis_uri

# a plugin module imported by a test module too: registered first, so pytest may rewrite it
pytest.register_assert_rewrite("tests.redis_server")
from tests.redis_server import (  # noqa: E402
    RedisClusterProcesses,
    RedisSentinelProcess,
    RedisServer,
    free_port,
    running_server,
)

# the `redis_server` and `redis_cluster` fixtures (session-scoped real servers)


SEP = "\x1f"
NS = "default/trlp-tutorial-route"
_prefixes = itertools.count()


def ref(limit: int, window: float, *values: str, ns: str = NS, name: str = "lim") -> CounterRef:
    """A counter shaped like limits.Limit.counter_refs makes them."""
    key = SEP.join([counter_scope(ns, name), str(int(window * 1000)), *values])
    return CounterRef(key, limit, window)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@dataclass
class Backend:
    """A store and a way to let time pass: a fake clock in memory, real time in Redis
    (whose server clock decides the windows)."""

    name: str
    store: CounterStore
    advance: Callable[[float], object]
    tolerance: float  # seconds of slack on durations read back


async def _redis_store(url: str) -> RedisStore:
    joiner = "&" if "?" in url else "?"
    store = open_store(f"{url}{joiner}prefix=t{next(_prefixes)}:")
    assert isinstance(store, RedisStore)
    await store.start()
    return store


@pytest.fixture(params=["memory", "redis", "cluster"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    if request.param == "memory":
        clock = Clock()

        async def tick(seconds: float) -> None:
            clock.now += seconds

        yield Backend("memory", MemoryStore(clock=clock), tick, 1e-6)
        return
    fixture = "redis_server" if request.param == "redis" else "redis_cluster"
    server = request.getfixturevalue(fixture)
    store = await _redis_store(server.url)
    try:
        yield Backend(request.param, store, asyncio.sleep, 0.15)
    finally:
        await store.close()


async def value_of(store: CounterStore, key: str) -> int | None:
    return {k: v for k, v, _ in await store.counters()}.get(key)


# --- the scenarios of tests/test_storage.py, on every store -------------------------------


async def test_check_adds_nothing_and_refuses_only_past_the_limit(backend: Backend) -> None:
    store, r = backend.store, ref(50, 60.0, "user-1")
    result = await store.check([r], 1)
    assert not result.limited
    assert result.states[0].value == 0
    assert result.states[0].remaining == 50
    assert result.states[0].expires_in == pytest.approx(60.0)  # not started: the full window
    assert await store.counters() == []  # the check wrote nothing
    await store.update([r], [49])
    assert not (await store.check([r], 1)).limited  # 49 + 1 > 50 is false
    await store.update([r], [1])
    spent = await store.check([r], 1)
    assert spent.limited and spent.limiting == 0
    assert spent.states[0].value == 50
    assert await value_of(store, r.key) == 50


async def test_update_is_unchecked_so_a_report_can_overshoot(backend: Backend) -> None:
    r = ref(50, 60.0, "user-1")
    await backend.store.update([r], [120])
    assert await value_of(backend.store, r.key) == 120


async def test_update_adds_each_counter_its_own_delta(backend: Backend) -> None:
    a, b, c = ref(100, 60, "a"), ref(100, 3600, "a"), ref(100, 60, "b", name="other")
    await backend.store.update([a, b, c], [3, 7, 11])
    await backend.store.update([a, b, c], [1, 2, 0])
    got = {k: v for k, v, _ in await backend.store.counters()}
    assert got == {a.key: 4, b.key: 9, c.key: 11}
    with pytest.raises(ValueError):
        await backend.store.update([a, b], [1])


async def test_window_opens_at_first_report_and_expires(backend: Backend) -> None:
    store, r = backend.store, ref(50, 0.6, "user-1")
    await store.update([r], [50])
    await backend.advance(0.3)
    result = await store.check([r], 1)
    assert result.limited
    assert result.retry_after == pytest.approx(0.3, abs=backend.tolerance)
    await store.update([r], [1])  # a report inside the window does not move its end
    await backend.advance(0.35)
    assert not (await store.check([r], 1)).limited
    assert await store.counters() == []
    await store.update([r], [5])  # a new window starts with this report
    [(key, value, left)] = await store.counters()
    assert (key, value) == (r.key, 5)
    assert left == pytest.approx(0.6, abs=backend.tolerance)


async def test_check_and_update_is_all_or_nothing(backend: Backend) -> None:
    small, big = ref(2, 10, "small"), ref(100, 10, "big")
    store = backend.store
    assert not (await store.check_and_update([small, big], 1)).limited
    second = await store.check_and_update([small, big], 1)
    assert not second.limited
    assert [s.value for s in second.states] == [1, 1]  # what the check saw, before adding
    refused = await store.check_and_update([small, big], 1)
    assert refused.limited and refused.limiting == 0
    assert await value_of(store, big.key) == 2  # the refused request added to neither
    assert await value_of(store, small.key) == 2


async def test_check_and_update_larger_than_the_limit_never_starts_a_window(
    backend: Backend,
) -> None:
    r = ref(5, 10, "u")
    result = await backend.store.check_and_update([r], 6)
    assert result.limited and result.retry_after == pytest.approx(10)
    assert await backend.store.counters() == []


async def test_limiting_counter_is_the_one_reopening_last(backend: Backend) -> None:
    minute, hour = ref(1, 60, "u"), ref(1, 3600, "u")
    await backend.store.update([minute, hour], [1, 1])
    result = await backend.store.check([minute, hour], 1)
    assert result.limited and result.limiting == 1
    assert result.retry_after == pytest.approx(3600, abs=backend.tolerance)


async def test_no_counters_is_never_limited(backend: Backend) -> None:
    assert not (await backend.store.check([], 1)).limited
    assert not (await backend.store.check_and_update([], 1)).limited
    await backend.store.update([], [])


async def test_retain_drops_the_counters_of_removed_limits(backend: Backend) -> None:
    kept = [ref(10, 60, "u1"), ref(10, 3600, "u2")]
    dropped = [ref(10, 60, "u1", name="gone"), ref(10, 60, "u1", ns="other/route")]
    await backend.store.update(kept + dropped[:1], [1, 1, 1])
    await backend.store.update(dropped[1:], [1])
    assert await backend.store.retain({counter_scope(NS, "lim")}) == 2
    assert sorted(k for k, _, _ in await backend.store.counters()) == sorted(r.key for r in kept)
    assert await backend.store.retain({counter_scope(NS, "lim")}) == 0


async def test_counters_round_trip_through_parse_counter_key(backend: Backend) -> None:
    odd = [
        ref(10, 60, "alice"),
        ref(10, 60, "{braces}", "50%", "ünïcødé", ns="ns/{x}%7B"),
        ref(10, 60, "v", ns=""),  # an empty namespace (hash tag written `{%}`)
        ref(10, 3600, "a", "b", "c", name="multi"),
    ]
    for r in odd:
        await backend.store.update([r], [3])
    got = await backend.store.counters()
    assert sorted(k for k, _, _ in got) == sorted(r.key for r in odd)
    for key, value, left in got:
        assert value == 3 and 0 < left <= 3600
        parsed = parse_counter_key(key)
        assert parsed is not None
        original = next(r for r in odd if r.key == key)
        assert SEP.join([*parsed[:2], str(parsed[2]), *parsed[3]]) == original.key


async def test_concurrent_check_and_update_admits_exactly_the_limit(backend: Backend) -> None:
    r = ref(5, 60, "hot")
    other = ref(1000, 3600, "hot")
    results = await asyncio.gather(
        *(backend.store.check_and_update([r, other], 1) for _ in range(100))
    )
    assert sum(not x.limited for x in results) == 5
    assert await value_of(backend.store, r.key) == 5
    assert await value_of(backend.store, other.key) == 5


# --- reservations (Kuadrant RFC 0021): holds beside the counters --------------------------


async def test_reserve_holds_capacity_without_touching_the_value(backend: Backend) -> None:
    store, r = backend.store, ref(100, 60, "u")
    first = await store.reserve([r], [60], [30.0], "rid-1")
    assert not first.limited and first.states[0].held == 0
    second = await store.reserve([r], [60], [30.0], "rid-2")  # 0 + 60 held + 60 > 100
    assert second.limited and second.limiting == 0
    assert second.states[0].value == 0 and second.states[0].held == 60
    assert second.states[0].remaining == 40
    assert await value_of(store, r.key) == 0  # the window is open, the value untouched


async def test_commit_releases_the_hold_and_adds_the_real_usage(backend: Backend) -> None:
    store, r = backend.store, ref(100, 60, "u")
    assert not (await store.reserve([r], [60], [30.0], "rid-1")).limited
    await store.commit([r], [30], "rid-1")
    assert await value_of(store, r.key) == 30
    again = await store.reserve([r], [60], [30.0], "rid-2")  # 30 + 0 held + 60 <= 100
    assert not again.limited and again.states[0].held == 0
    await store.commit([r], [0], "rid-2")  # a release: nothing charged
    assert await value_of(store, r.key) == 30
    assert (await store.reserve([r], [70], [30.0], "rid-3")).states[0].held == 0


async def test_a_commit_without_its_hold_still_charges(backend: Backend) -> None:
    r = ref(100, 60, "u")
    await backend.store.commit([r], [12], "never-reserved")  # degrades to a report
    assert await value_of(backend.store, r.key) == 12


async def test_an_uncommitted_hold_expires_at_its_ttl_and_costs_nothing(backend: Backend) -> None:
    store, r = backend.store, ref(100, 60, "u")
    assert not (await store.reserve([r], [80], [0.3], "lost")).limited
    assert (await store.reserve([r], [80], [30.0], "next")).limited
    await backend.advance(0.5)
    after = await store.reserve([r], [80], [30.0], "next")
    assert not after.limited and after.states[0].held == 0
    assert await value_of(store, r.key) == 0


async def test_a_hold_ends_with_its_counters_window(backend: Backend) -> None:
    store, r = backend.store, ref(100, 0.4, "u")
    assert not (await store.reserve([r], [90], [30.0], "long")).limited  # opens the window
    await backend.advance(0.6)
    fresh = await store.reserve([r], [90], [30.0], "next")  # a new window: nothing held
    assert not fresh.limited and fresh.states[0].held == 0


async def test_reserve_is_all_or_nothing_across_counters(backend: Backend) -> None:
    store = backend.store
    small, large = ref(10, 60, "u"), ref(1000, 3600, "u")
    refused = await store.reserve([large, small], [20, 20], [30.0, 30.0], "too-big")
    assert refused.limited and refused.limiting == 1
    ok = await store.reserve([large, small], [5, 5], [30.0, 30.0], "fits")
    assert not ok.limited and ok.states[0].held == 0  # the refused one held nothing


async def test_a_zero_amount_admits_like_a_check(backend: Backend) -> None:
    store, r = backend.store, ref(50, 60, "u")
    await store.update([r], [49])
    assert not (await store.reserve([r], [0], [30.0], "a")).limited  # 49 + 1 <= 50
    await store.update([r], [1])
    assert (await store.reserve([r], [0], [30.0], "b")).limited


async def test_concurrent_reservations_admit_exactly_what_fits(backend: Backend) -> None:
    r = ref(100, 60, "hot")
    results = await asyncio.gather(
        *(backend.store.reserve([r], [10], [30.0], f"rid-{i}") for i in range(60))
    )
    assert sum(not x.limited for x in results) == 10
    assert await value_of(backend.store, r.key) == 0


# --- Redis only ---------------------------------------------------------------------------


async def test_two_replicas_share_one_limit(redis_server: RedisServer) -> None:
    a = await _redis_store(redis_server.url)
    b = open_store(f"{redis_server.url}?prefix={a.config.prefix}")
    await b.start()
    try:
        r = ref(10, 60, "shared")
        passed = await asyncio.gather(
            *(s.check_and_update([r], 1) for s in [a, b] * 20),
        )
        assert sum(not x.limited for x in passed) == 10
        assert (await b.check([r], 1)).limited
    finally:
        await a.close()
        await b.close()


async def test_window_is_a_redis_ttl_set_once(redis_server: RedisServer) -> None:
    store = await _redis_store(redis_server.url)
    try:
        r = ref(100, 30, "ttl")
        await store.update([r], [1])
        raw = store.redis_key(r.key)
        assert raw == f"{store.config.prefix}{{{NS}}}{SEP}lim{SEP}30000{SEP}ttl".encode()
        first = await store.client.pttl(raw)
        assert 29000 < first <= 30000
        await asyncio.sleep(0.2)
        await store.update([r], [1])
        assert await store.client.pttl(raw) <= first - 150  # a later report keeps the end
    finally:
        await store.close()


async def test_scripts_are_reloaded_after_script_flush(redis_server: RedisServer) -> None:
    store = await _redis_store(redis_server.url)
    try:
        r = ref(3, 60, "flush")
        await store.update([r], [1])
        await store.client.script_flush()  # as after a restart or failover
        assert not (await store.check_and_update([r], 1)).limited
        await store.client.script_flush()
        await store.update([r], [1])
        await store.client.script_flush()
        assert (await store.check([r], 1)).limited
    finally:
        await store.close()


async def test_a_verb_before_start_connects(redis_server: RedisServer) -> None:
    store = open_store(f"{redis_server.url}?prefix=lazy{next(_prefixes)}:")
    try:
        assert not (await store.check([ref(1, 60, "x")], 1)).limited
    finally:
        await store.close()


async def test_cluster_keys_of_one_request_share_a_slot_across_three_masters(
    redis_cluster: RedisClusterProcesses,
) -> None:
    store = await _redis_store(redis_cluster.url)
    try:
        assert isinstance(store.client, RedisCluster)
        assert len(store.client.get_primaries()) == 3
        requests = [
            [ref(10, 60, "u"), ref(100, 3600, "u"), ref(5, 60, "u", name="req")] for _ in range(1)
        ] + [[ref(10, 60, "u", ns=f"ns-{i}/route")] for i in range(30)]
        for counters in requests:
            slots = {key_slot(store.redis_key(c.key)) for c in counters}
            assert len(slots) == 1
            assert not (await store.check_and_update(counters, 1)).limited
        # the namespaces spread over every master, and counters() gathers them all
        pattern = store.config.prefix + "*"
        per_node = [
            len([k for k in n.cli("--scan", "--pattern", pattern).split("\n") if k])
            for n in redis_cluster.nodes
        ]
        assert all(n > 0 for n in per_node), per_node
        assert len(await store.counters()) == sum(per_node) == 33
        assert await store.retain({counter_scope(NS, "lim")}) == 31
        assert len(await store.counters()) == 2
    finally:
        await store.close()


async def test_cluster_verbs_across_namespaces(redis_cluster: RedisClusterProcesses) -> None:
    store = await _redis_store(redis_cluster.url)
    try:
        a, b = ref(1, 60, "u", ns="a/route"), ref(1, 60, "u", ns="b/route")
        assert key_slot(store.redis_key(a.key)) != key_slot(store.redis_key(b.key))
        await store.update([a, b], [1, 2])  # no atomicity needed: one script per namespace
        result = await store.check([a, b], 1)
        assert [s.value for s in result.states] == [1, 2]
        with pytest.raises(StorageError, match="one namespace"):
            await store.check_and_update([a, b], 1)
    finally:
        await store.close()


# --- errors ---------------------------------------------------------------------------------


async def test_wrong_password_is_named_with_the_password_hidden() -> None:
    with running_server(password="right-horse") as server:
        bad = open_store(f"redis://:wrong-battery@127.0.0.1:{server.port}/0")
        with pytest.raises(StorageError) as err:
            await bad.start()
        text = str(err.value)
        assert "wrong-battery" not in text and "right-horse" not in text
        assert f"redis://:***@127.0.0.1:{server.port}/0" in text
        assert "authentication" in text.lower() or "WRONGPASS" in text
        missing = open_store(f"redis://127.0.0.1:{server.port}/0")
        with pytest.raises(StorageError, match=r"(?i)auth"):
            await missing.start()
        good = open_store(server.url)
        await good.start()
        await good.update([ref(1, 60, "x")], [1])
        assert len(await good.counters()) == 1
        await good.close()


async def test_unreachable_redis_is_named_with_the_password_hidden() -> None:
    port = free_port()
    for uri in (
        f"redis://:hunter2@127.0.0.1:{port}/0",
        f"redis+cluster://:hunter2@127.0.0.1:{port}",
    ):
        store = open_store(uri)
        with pytest.raises(StorageError) as err:
            await store.start()
        text = str(err.value)
        assert "hunter2" not in text
        assert ":***@127.0.0.1" in text and str(port) in text


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("redis://:s3cret@h:6379/0?bogus=1", "unknown option 'bogus'"),
        ("redis://:s3cret@h:6379/zero", "database must be a number"),
        ("redis://:s3cret@h:notaport/0", "bad port"),
        ("redis://:s3cret@a:1,b:2/0", r"several hosts need redis\+cluster://"),
        ("redis+cluster://:s3cret@a:1,b:2/3", "only database 0"),
        ("redis://:s3cret@h/0?timeout=-1", "positive number"),
        ("redis://:s3cret@h/0?ssl_ca_certs=x", "unknown option"),  # TLS options need rediss
        ("redis://:s3cret@h/0?prefix={x}", "without braces"),
        ("redis://:s3cret@/0", "host is missing"),
        ("redis://:s3cret@h/0#frag", "fragment"),
        ("rediss://:s3cret@h/0?ssl_cert_reqs=maybe", "ssl_cert_reqs"),
    ],
)
def test_bad_uris_are_refused_with_the_password_hidden(uri: str, message: str) -> None:
    with pytest.raises(StorageURIError, match=message) as err:
        open_store(uri)
    assert "s3cret" not in str(err.value)
    assert ":***@" in str(err.value)


def test_open_store_knows_the_redis_schemes() -> None:
    plain = open_store("redis://127.0.0.1:6379/2?timeout=1.5&max_connections=8")
    assert isinstance(plain, RedisStore)
    assert (plain.config.db, plain.config.timeout, plain.config.max_connections) == (2, 1.5, 8)
    tls = open_store("rediss://user:p%40ss@example.com?ssl_cert_reqs=none")
    assert isinstance(tls, RedisStore) and tls.config.tls
    assert (tls.config.username, tls.config.password) == ("user", "p@ss")
    assert tls.uri == "rediss://user:***@example.com?ssl_cert_reqs=none"
    cluster = open_store("redis+cluster://10.0.0.1:7000,10.0.0.2,[::1]:7002")
    assert isinstance(cluster, RedisStore) and cluster.cluster
    assert cluster.config.nodes == (("10.0.0.1", 7000), ("10.0.0.2", 6379), ("::1", 7002))
    assert isinstance(open_store("memory://"), MemoryStore)
    with pytest.raises(StorageURIError, match=r"unknown scheme 'foo'.*redis\+cluster://") as err:
        open_store("foo://:pw@bar")
    assert "pw" not in str(err.value)


# --- Sentinel -----------------------------------------------------------------------------


async def test_sentinel_finds_the_master_and_counts_there() -> None:
    with running_server(password="s3cret") as master:
        sentinel = RedisSentinelProcess(master)
        try:
            store = open_store(sentinel.url("s3cret"))
            assert isinstance(store, RedisStore)
            assert store.uri == sentinel.url("***")
            await store.start()
            try:
                r = ref(3, 60, "via-sentinel")
                results = [await store.check_and_update([r], 1) for _ in range(4)]
                assert [x.limited for x in results] == [False, False, False, True]
                assert not (await store.reserve([ref(9, 60, "h")], [4], [5.0], "x")).limited
                # the counter is on the master the Sentinel named
                assert master.cli("GET", store.redis_key(r.key).decode()).strip() == "3"
            finally:
                await store.close()
            wrong = open_store(sentinel.url("nope"))
            with pytest.raises(StorageError, match=r"authentication failed") as info:
                await wrong.start()
            assert "nope" not in str(info.value)
        finally:
            sentinel.stop()


def test_sentinel_uris_are_parsed_with_secrets_hidden() -> None:
    cfg = parse_redis_uri("redis+sentinel://:pw@a,b:26380/mymaster/2?sentinel_password=sp")
    assert cfg.nodes == (("a", 26379), ("b", 26380))
    assert (cfg.service, cfg.db, cfg.password, cfg.sentinel_password) == ("mymaster", 2, "pw", "sp")
    assert cfg.shown == "redis+sentinel://:***@a,b:26380/mymaster/2?sentinel_password=***"
    with pytest.raises(StorageURIError, match=r"name the master after the Sentinels"):
        parse_redis_uri("redis+sentinel://a:26379")
    with pytest.raises(StorageURIError, match=r"sentinel_password"):
        parse_redis_uri("redis://a?sentinel_password=x")
