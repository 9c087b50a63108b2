"""The cached Redis store (`redis+cached://`) against real redis-server processes: the
behavioural scenarios shared with every store, then what only it does — replicas that
converge at each flush, an overshoot bounded by one flush period, windows decided by Redis
TTLs, a bounded cache, an outage that loses no pending count, and `serve` end to end."""

from __future__ import annotations

import asyncio
import inspect
import itertools
import time
from collections.abc import AsyncIterator

import httpx
import pytest

import tests.test_storage_redis as shared
from tests.conftest import TUTORIAL, chat
from tests.redis_server import RedisServer, free_port
from tests.test_storage_redis import Backend, ref
from tokengateway.storage import CounterRef, StorageError, StorageURIError, open_store
from tokengateway.storage.redis_cached import (
    DEFAULT_FLUSH_PERIOD,
    DEFAULT_MAX_CACHED,
    CachedRedisStore,
    parse_cached_uri,
)

NS = shared.NS
_prefixes = itertools.count()

# Every scenario of tests/test_storage_redis.py that takes only a `backend` runs here too,
# against the `backend` fixture below (pytest resolves it in this module).
for _name, _scenario in list(vars(shared).items()):
    if _name.startswith("test_") and list(inspect.signature(_scenario).parameters) == ["backend"]:
        globals()[_name] = _scenario
SCENARIOS = [n for n in globals() if n.startswith("test_")]


def test_the_shared_scenarios_are_collected() -> None:
    assert "test_check_and_update_is_all_or_nothing" in SCENARIOS
    assert "test_concurrent_reservations_admit_exactly_what_fits" in SCENARIOS


def cached_url(url: str, prefix: str | None = None, **options: object) -> str:
    """The `+cached` form of a redis:// URL, with a key prefix of its own."""
    scheme, _, rest = url.partition("://")
    prefix = prefix or f"c{next(_prefixes)}-{time.monotonic_ns()}:"
    opts = {"prefix": prefix, **options}
    return f"{scheme}+cached://{rest}?" + "&".join(f"{k}={v}" for k, v in opts.items())


async def opened(url: str, **options: object) -> CachedRedisStore:
    store = open_store(cached_url(url, **options))  # type: ignore[arg-type]
    assert isinstance(store, CachedRedisStore)
    await store.start()
    return store


@pytest.fixture(params=["redis", "cluster"])
async def backend(request: pytest.FixtureRequest) -> AsyncIterator[Backend]:
    """A started cached store flushing every 10 ms; at the end, what it shows after a flush
    must be exactly what Redis holds."""
    fixture = "redis_server" if request.param == "redis" else "redis_cluster"
    server = request.getfixturevalue(fixture)
    store = await opened(server.url, flush_period=0.01)
    try:
        yield Backend(f"cached-{request.param}", store, asyncio.sleep, 0.15)
    finally:
        await store.close()


async def redis_value(store: CachedRedisStore, r: CounterRef) -> int | None:
    """The counter's value in Redis itself (None: no key)."""
    raw = await store.redis.client.get(store.redis.redis_key(r.key))
    return None if raw is None else int(raw)


async def redis_pttl(store: CachedRedisStore, r: CounterRef) -> int:
    return int(await store.redis.client.pttl(store.redis.redis_key(r.key)))


# --- URIs ---------------------------------------------------------------------------------


def test_cached_uris_are_parsed_and_the_options_taken_out() -> None:
    inner, period, most = parse_cached_uri(
        "redis+cached://:p%40ss?w@h:7000/2?flush_period=0.25&timeout=1&max_cached=50"
    )
    assert inner == "redis://:p%40ss?w@h:7000/2?timeout=1"
    assert (period, most) == (0.25, 50)
    assert parse_cached_uri("rediss+cluster+cached://a:1,b:2") == (
        "rediss+cluster://a:1,b:2",
        DEFAULT_FLUSH_PERIOD,
        DEFAULT_MAX_CACHED,
    )
    sentinel = open_store("redis+sentinel+cached://s:26379/master/1?flush_period=2")
    assert isinstance(sentinel, CachedRedisStore) and sentinel.flush_period == 2
    assert sentinel.redis.config.service == "master"
    cluster = open_store("redis+cluster+cached://10.0.0.1:7000")
    assert isinstance(cluster, CachedRedisStore) and cluster.redis.cluster
    assert open_store("REDIS+CACHED://h").uri == "REDIS+CACHED://h"


@pytest.mark.parametrize(
    ("uri", "message"),
    [
        ("redis+cached://:s3cret@h/0?flush_period=0", "flush_period must be seconds"),
        ("redis+cached://:s3cret@h/0?flush_period=soon", "flush_period must be seconds"),
        ("redis+cached://:s3cret@h/0?max_cached=-1", "max_cached must be a positive"),
        ("redis+cached://:s3cret@h/0?bogus=1", "unknown option 'bogus'.*flush_period"),
        ("redis+cached://:s3cret@h/zero", "database must be a number"),
        ("memcached+cached://:s3cret@h/0", "unknown scheme"),
    ],
)
def test_bad_cached_uris_are_refused_with_the_password_hidden(uri: str, message: str) -> None:
    with pytest.raises(StorageURIError, match=message) as err:
        open_store(uri)
    assert "s3cret" not in str(err.value)
    assert ":***@" in str(err.value)
    if "unknown scheme" not in message:
        assert "+cached://" in str(err.value)  # named as given, not as the inner URI


# --- replicas -----------------------------------------------------------------------------


async def test_the_request_path_is_local_once_a_counter_is_loaded(tmp_path) -> None:
    redis = RedisServer(tmp_path / "redis")
    store = await opened(redis.url, flush_period=3600)
    r = ref(100, 60, "u")
    try:
        await store.check([r], 1)  # loads it: one round trip
        redis.stop()  # no Redis from now on
        for _ in range(5):  # checks and reports need none
            assert not (await store.check([r], 1)).limited
            await store.update([r], [10])
        assert (await store.check_and_update([r], 51)).limited
        assert (await store.check([r], 51)).states[0].value == 50
        assert store.pending == 1
    finally:
        store._dirty.clear()  # nowhere to send it
        await store.close()
        redis.stop()


def _evalsha_calls(server: RedisServer) -> int:
    stats = server.cli("INFO", "commandstats")
    line = next((x for x in stats.splitlines() if x.startswith("cmdstat_evalsha:")), "")
    return int(line.partition("calls=")[2].partition(",")[0] or 0)


async def test_concurrent_requests_for_a_new_counter_share_one_load(tmp_path) -> None:
    redis = RedisServer(tmp_path / "redis")  # its own: nothing else counts its scripts
    store = await opened(redis.url, flush_period=3600)
    a, b = ref(100, 60, "new"), ref(100, 3600, "new")
    try:
        await store.check([ref(100, 60, "warm")], 1)  # connected, the script loaded
        before = _evalsha_calls(redis)
        results = await asyncio.gather(
            *(store.check([a, b], 1) for _ in range(50)),
            *(store.check_and_update([a], 1) for _ in range(50)),
        )
        assert _evalsha_calls(redis) - before == 1  # one round trip for all hundred
        assert sum(not r.limited for r in results[50:]) == 50
        assert (await store.check([a], 1)).states[0].value == 50
    finally:
        await store.close()
        redis.stop()


async def test_two_replicas_converge_at_each_flush(redis_server: RedisServer) -> None:
    url = cached_url(redis_server.url, flush_period=3600)  # flushed by hand below
    a, b = open_store(url), open_store(url)
    assert isinstance(a, CachedRedisStore) and isinstance(b, CachedRedisStore)
    await a.start()
    await b.start()
    r = ref(1000, 60, "shared")
    try:
        assert (await a.check([r], 1)).states[0].value == 0
        assert (await b.check([r], 1)).states[0].value == 0
        await a.update([r], [30])
        await b.update([r], [20])
        assert (await a.check([r], 1)).states[0].value == 30  # each sees only its own
        assert (await b.check([r], 1)).states[0].value == 20
        assert await redis_value(a, r) is None  # nothing sent yet
        await a.flush()
        await b.flush()
        assert await redis_value(a, r) == 50
        assert (await b.check([r], 1)).states[0].value == 50  # b's flush read a's 30
        assert (await a.check([r], 1)).states[0].value == 30  # a has not flushed since
        await a.flush()  # nothing to send, but a counter checked since is read again
        assert (await a.check([r], 1)).states[0].value == 50
        await a.update([r], [1])
        await a.flush()
        assert (await a.check([r], 1)).states[0].value == 51
        assert [(k, v) for k, v, _ in await a.counters()] == [(r.key, 51)]
        assert [(k, v) for k, v, _ in await b.counters()] == [(r.key, 51)]
    finally:
        await a.close()
        await b.close()


async def test_overshoot_across_replicas_is_what_the_flush_periods_admit(
    redis_server: RedisServer,
) -> None:
    """Two replicas serve one user at a steady pace with check-then-report: the tokens used
    past the limit stay within what the other replica admits before it hears of the
    crossing: two flush periods at most (one to send, one to read)."""
    period, pace, cost, limit = 0.1, 0.01, 10, 2000
    url = cached_url(redis_server.url, flush_period=period)
    replicas = [open_store(url), open_store(url)]
    for s in replicas:
        await s.start()
    r = ref(limit, 60, "busy")
    admitted = [0, 0]

    async def serve(i: int) -> None:
        store = replicas[i]
        refused = 0
        while refused < 20:  # keep going a while after the limit: the flush must stop it
            if (await store.check([r], 1)).limited:
                refused += 1
            else:
                admitted[i] += 1
                await store.update([r], [cost])
            await asyncio.sleep(pace)

    try:
        await asyncio.gather(serve(0), serve(1))
        for s in replicas:
            await s.flush()
        used = sum(admitted) * cost
        assert await redis_value(replicas[0], r) == used  # every report reached Redis
        # a report reaches the other replica at most two periods later (one to be sent, one
        # to be read): it admits at its pace meanwhile, plus a request or two of jitter
        two_periods = (2 * period / pace + 2) * cost
        assert limit <= used <= limit + two_periods + cost, (admitted, used)
        assert admitted[0] > 10 and admitted[1] > 10  # both served
    finally:
        for s in replicas:
            await s.close()


async def test_windows_are_redis_ttls_seen_alike_by_every_replica(
    redis_server: RedisServer,
) -> None:
    url = cached_url(redis_server.url, flush_period=3600)
    a, b = open_store(url), open_store(url)
    assert isinstance(a, CachedRedisStore) and isinstance(b, CachedRedisStore)
    r = ref(10, 1.0, "w")
    try:
        await a.update([r], [10])
        await asyncio.sleep(0.3)
        await a.flush()  # the window opens in Redis now, a full second from here
        assert 900 < await redis_pttl(a, r) <= 1000
        assert (await a.check([r], 1)).states[0].expires_in == pytest.approx(1.0, abs=0.1)
        await asyncio.sleep(0.4)
        seen = await b.check([r], 1)  # b loads the counter: Redis's value and TTL
        assert seen.limited and seen.states[0].value == 10
        assert seen.states[0].expires_in == pytest.approx(0.6, abs=0.1)
        await b.update([r], [5])  # in a's window, which b took from Redis
        await asyncio.sleep(0.7)
        assert not (await a.check([r], 1)).limited  # the window has ended for both
        assert not (await b.check([r], 1)).limited
        await b.flush()  # b's 5 belonged to the ended window: counted in none
        assert await redis_value(a, r) is None
        assert b.dropped_expired == 1
        assert await a.counters() == []
    finally:
        await a.close()
        await b.close()


# --- the bound on local state --------------------------------------------------------------


async def test_the_cache_is_bounded_and_keeps_what_is_used_and_unsent(
    redis_server: RedisServer,
) -> None:
    store = await opened(redis_server.url, flush_period=3600, max_cached=20)
    refs = [ref(100, 60, f"u{i}") for i in range(60)]
    try:
        await store.update(refs[:5], [1] * 5)  # pending: never evicted before being sent
        for r in refs[5:]:
            await store.check([r], 1)
            await store.check([refs[5]], 1)  # used all along: kept
            assert len(store) <= 20
        assert store.evicted > 0
        cached = set(store._cache)
        assert {r.key for r in refs[:6]} <= cached
        assert refs[6].key not in cached  # least recently used: gone
        assert await redis_value(store, refs[0]) is None
        await store.flush()
        assert [await redis_value(store, r) for r in refs[:5]] == [1] * 5
        # an evicted counter is loaded again, with what Redis says
        await store.redis.client.set(store.redis.redis_key(refs[6].key), 42, px=60_000)
        assert (await store.check([refs[6]], 1)).states[0].value == 42
    finally:
        await store.close()


async def test_many_pending_counters_force_a_flush_before_the_period(
    redis_server: RedisServer,
) -> None:
    store = await opened(redis_server.url, flush_period=3600, max_cached=20)
    refs = [ref(100, 60, f"p{i}") for i in range(10)]  # half the bound
    try:
        await store.update(refs, [2] * 10)
        deadline = time.monotonic() + 5
        while store.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert store.pending == 0 and store.flushes == 1
        assert await redis_value(store, refs[9]) == 2
    finally:
        await store.close()


# --- Redis going away ------------------------------------------------------------------------


async def test_an_outage_keeps_pending_counts_and_sends_them_when_redis_is_back(
    tmp_path, caplog: pytest.LogCaptureFixture
) -> None:
    port = free_port()
    redis = RedisServer(tmp_path / "before", port=port)
    store = await opened(redis.url, flush_period=0.05, max_cached=4)
    known, unknown = ref(1000, 60, "known"), ref(1000, 60, "unknown")
    try:
        await store.update([known], [10])
        await store.check([known], 1)
        deadline = time.monotonic() + 5
        while store.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert await redis_value(store, known) == 10
        redis.stop()  # the outage: Redis and what it held are gone
        for _ in range(3):
            assert not (await store.check([known], 1)).limited  # checks go on locally
            await store.update([known], [5])
        await store.update([unknown], [7])  # a report needs no round trip
        with pytest.raises(StorageError):  # a counter never loaded cannot be checked
            await store.check([ref(1000, 60, "never")], 1)
        others = [ref(1000, 60, f"o{i}") for i in range(3)]
        with pytest.raises(StorageError, match="max_cached"):  # full of unsent counts
            await store.update(others, [1, 1, 1])
        await asyncio.sleep(0.6)  # flushes fail meanwhile, and are retried
        assert store.flush_errors >= 2 and store.pending == 2
        assert "flush failing" in caplog.text
        redis = RedisServer(tmp_path / "after", port=port)  # back, empty
        deadline = time.monotonic() + 10
        while store.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert store.pending == 0
        # the key was lost with the old server: what was sent since is all there
        assert await redis_value(store, known) == 15
        assert await redis_value(store, unknown) == 7
        assert (await store.check([known], 1)).states[0].value == 15
    finally:
        await store.close()
        redis.stop()


async def test_close_flushes_what_is_pending(redis_server: RedisServer) -> None:
    url = cached_url(redis_server.url, flush_period=3600)
    store = open_store(url)
    r = ref(100, 60, "bye")
    await store.start()
    await store.update([r], [9])
    await store.close()
    again = open_store(url)
    assert isinstance(again, CachedRedisStore)
    try:
        assert (await again.check([r], 1)).states[0].value == 9
    finally:
        await again.close()


async def test_a_reservation_is_judged_with_this_replicas_unsent_counts(
    redis_server: RedisServer,
) -> None:
    url = cached_url(redis_server.url, flush_period=3600)
    a, b = open_store(url), open_store(url)
    r = ref(100, 60, "held")
    try:
        await a.update([r], [70])  # not sent yet
        refused = await a.reserve([r], [40], [30.0], "r1")  # 70 + 40 > 100: sent first
        assert refused.limited and refused.states[0].value == 70
        assert not (await a.reserve([r], [30], [30.0], "r2")).limited
        held = await b.reserve([r], [1], [30.0], "r3")  # b sees a's hold at once
        assert held.limited and held.states[0].held == 30
        await a.commit([r], [25], "r2")
        assert (await a.check([r], 1)).states[0].value == 95
        assert (await b.check([r], 1)).states[0].value == 95
    finally:
        await a.close()
        await b.close()


# --- serve end to end -------------------------------------------------------------------------


def _charged(redis_server: RedisServer, prefix: str) -> int:
    script = (
        "local n = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do "
        "if redis.call('TYPE', k).ok == 'string' then n = n + tonumber(redis.call('GET', k)) "
        "end end return n"
    )
    out = redis_server.cli("EVAL", script, "0", prefix + "{*").strip()
    return int(out.rpartition(" ")[2])


def test_serve_with_a_cached_store_converges_to_the_exact_totals(
    manifests, start_gateway, redis_server: RedisServer
) -> None:
    prefix = f"tgw-cached-{time.monotonic_ns()}:"
    storage = redis_server.url.replace("redis://", "redis+cached://") + f"?prefix={prefix}"
    folder = manifests(replace={"limit: 50 ": "limit: 400 "})
    args = ("--storage", storage, "--flush-period", "0.05")
    first = start_gateway(folder, args=(*args, "--workers", "2"))
    second = start_gateway(folder, args=args)
    assert "flush_period=0.05" in first.output()  # the period every worker opens with
    used, biggest, statuses = 0, 0, []
    with first.client() as a, second.client() as b:
        for i in range(40):
            r = (a if i % 2 == 0 else b).post("/v1/chat/completions", json=chat(max_tokens=20))
            statuses.append(r.status_code)
            if r.status_code == 200:
                used += r.json()["usage"]["total_tokens"]
                biggest = max(biggest, r.json()["usage"]["total_tokens"])
            time.sleep(0.15)  # flush periods between requests: the replicas keep in step
            if r.status_code == 429:
                break
        assert statuses[-1] == 429
        # what Redis holds converges to exactly what the responses reported
        deadline = time.monotonic() + 10
        while _charged(redis_server, prefix) != used and time.monotonic() < deadline:
            time.sleep(0.05)
        assert _charged(redis_server, prefix) == used
        assert 400 <= used <= 400 + 2 * biggest  # crossed by what a request or two cost
        assert a.post("/v1/chat/completions", json=chat()).status_code == 429
        assert b.post("/v1/chat/completions", json=chat()).status_code == 429
    counters = httpx.get(second.admin_url + "/counters/default/trlp-tutorial-llm-sim").json()
    assert [c["limit"]["max_value"] - c["remaining"] for c in counters] == [400]
    # the cache's figures, summed over both workers of the first gateway
    metrics = _series(httpx.get(first.admin_url + "/metrics").text)
    assert metrics["tokengateway_storage_flushes_total"] > 0
    assert metrics["tokengateway_storage_flush_errors_total"] == 0
    assert metrics["tokengateway_storage_cached_counters"] >= 1
    assert metrics["tokengateway_storage_unflushed_counters"] >= 0
    exact = start_gateway(folder, args=("--storage", redis_server.url))
    metrics_text = httpx.get(exact.admin_url + "/metrics").text
    assert "tokengateway_storage_flushes_total" not in metrics_text  # no cache to tell of


def _series(text: str) -> dict[str, float]:
    """`name value` lines of the text format, without labels."""
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if line and not line.startswith("#") and "{" not in name:
            out[name] = float(value)
    return out


def test_flush_period_needs_a_cached_store(tmp_path) -> None:
    from tests.conftest import run_cli

    result = run_cli(
        "serve", "-f", str(TUTORIAL), "--storage", "redis://:hunter2@127.0.0.1:1/0",
        "--flush-period", "0.5", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--state-dir", str(tmp_path),
    )  # fmt: skip
    assert result.returncode == 1
    assert "--flush-period applies to a cached Redis store" in result.stderr
    assert "hunter2" not in result.stderr
    both = run_cli(
        "serve", "-f", str(TUTORIAL), "--storage", "redis+cached://127.0.0.1:1/0?flush_period=1",
        "--flush-period", "0.5", "--listen", "127.0.0.1:0", "--admin", "127.0.0.1:0",
        "--state-dir", str(tmp_path),
    )  # fmt: skip
    assert both.returncode == 1 and "give one" in both.stderr
