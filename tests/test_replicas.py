"""Several gateway processes enforcing one limit through a real Redis."""

from __future__ import annotations

from tests.conftest import TUTORIAL, chat, run_cli


def test_two_gateways_share_one_limit(start_gateway, redis_server) -> None:
    redis_server.cli("FLUSHALL")
    storage = ("--storage", redis_server.url)
    first = start_gateway(TUTORIAL, args=storage)
    second = start_gateway(TUTORIAL, args=storage)
    used = 0
    statuses = []
    with first.client() as a, second.client() as b:
        for i in range(12):
            r = (a if i % 2 == 0 else b).post("/v1/chat/completions", json=chat())
            statuses.append(r.status_code)
            if r.status_code == 429:
                break
            used += r.json()["usage"]["total_tokens"]
        assert statuses[-1] == 429 and used >= 50
        assert (200 in statuses[::2] and 200 in statuses[1::2]) or len(statuses) <= 2
        # both replicas refuse now: one counter, not one per instance
        assert a.post("/v1/chat/completions", json=chat()).status_code == 429
        assert b.post("/v1/chat/completions", json=chat()).status_code == 429
    counters = run_cli(
        "counters", "default/trlp-tutorial-llm-sim", "-o", "json", "--admin", second.admin_url
    )
    assert counters.returncode == 0 and "user-1" in counters.stdout  # the other replica sees it


def test_unreachable_redis_is_a_clear_error(tmp_path) -> None:
    result = run_cli(
        "serve",
        "-f",
        str(TUTORIAL),
        "--storage",
        "redis://:hunter2@127.0.0.1:1/0",
        "--listen",
        "127.0.0.1:0",
        "--admin",
        "127.0.0.1:0",
        "--state-dir",
        str(tmp_path),
    )
    assert result.returncode == 1
    assert "redis://:***@127.0.0.1:1/0" in result.stderr and "hunter2" not in result.stderr
    assert "Traceback" not in result.stderr


def _counter_total(gw) -> int:
    import httpx

    counters = httpx.get(gw.admin_url + "/counters/default/trlp-tutorial-llm-sim").json()
    return sum(c["limit"]["max_value"] - c["remaining"] for c in counters)


def test_outage_with_allow_loses_no_accounting(tmp_path, manifests, start_gateway) -> None:
    import time

    from tests.redis_server import RedisServer, free_port

    port = free_port()
    redis = RedisServer(tmp_path / "redis-a", port=port)
    folder = manifests(replace={"limit: 50 ": "limit: 1000000 "})
    gw = start_gateway(folder, args=("--storage", redis.url, "--on-storage-error", "allow"))
    try:
        with gw.client() as c:
            assert c.post("/v1/chat/completions", json=chat()).status_code == 200
            redis.stop()  # the outage: Redis is gone (with the counter it held)
            statuses = [c.post("/v1/chat/completions", json=chat()).status_code for _ in range(5)]
            assert statuses == [200] * 5  # requests keep flowing
            during = sum(e["total_tokens"] for e in gw.access_log(6)[1:6])
            metrics = httpx_get(gw.admin_url + "/metrics")
            assert "tokengateway_storage_reports_pending 5" in metrics
            redis = RedisServer(tmp_path / "redis-b", port=port)  # back, empty
            deadline = time.monotonic() + 10
            while _counter_total(gw) < during and time.monotonic() < deadline:
                time.sleep(0.2)
            assert _counter_total(gw) == during  # every report kept was replayed
            assert "tokengateway_storage_reports_replayed_total 5" in httpx_get(
                gw.admin_url + "/metrics"
            )
    finally:
        redis.stop()


def test_outage_with_deny_answers_503(tmp_path, start_gateway) -> None:
    from tests.redis_server import RedisServer

    redis = RedisServer(tmp_path / "redis")
    gw = start_gateway(TUTORIAL, args=("--storage", redis.url, "--on-storage-error", "deny"))
    with gw.client() as c:
        assert c.post("/v1/chat/completions", json=chat()).status_code == 200
        redis.stop()
        r = c.post("/v1/chat/completions", json=chat())
    assert r.status_code == 503 and r.headers["retry-after"] == "1"
    assert r.json()["error"]["code"] == "counter_store_unavailable"


def httpx_get(url: str) -> str:
    import httpx

    return httpx.get(url).text


def test_sqlite_counters_survive_a_gateway_restart(tmp_path, start_gateway) -> None:
    storage = ("--storage", f"sqlite:///{tmp_path / 'counters.db'}")
    gw = start_gateway(TUTORIAL, args=storage)
    with gw.client() as c:
        while c.post("/v1/chat/completions", json=chat()).status_code == 200:
            pass
    gw.stop()  # a clean stop writes every counter
    again = start_gateway(TUTORIAL, args=storage)
    with again.client() as c:
        refused = c.post("/v1/chat/completions", json=chat())
    assert refused.status_code == 429  # the user's spent window came back with the gateway
    assert 0 < int(refused.headers["retry-after"]) <= 60
