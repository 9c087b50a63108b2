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
