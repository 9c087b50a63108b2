"""`serve --workers N`: several processes on one address, one limit through a real Redis.

Which process answered a request is read from /proc: the server side of the request's
connection (found in /proc/net/tcp by the client's port) is a socket one of the gateway's
processes holds open.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import signal
import socket
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.conftest import HOST, TUTORIAL, chat, run_cli
from tests.test_observability import _metric

FOLLOWER = "tokengateway.runtime.workers"
COUNTERS = "/counters/default/trlp-tutorial-llm-sim"


# --- processes and connections, from /proc ------------------------------------------------


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, parent pid), or None when the process is gone."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = text.rpartition(")")[2].split()
    return fields[0], int(fields[1])


def _alive(pid: int) -> bool:
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"  # a zombie has exited, only not reaped yet


def _followers(leader: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        stat = _stat(int(entry))
        if stat is None or stat[1] != leader or stat[0] == "Z":
            continue
        try:
            cmdline = Path(f"/proc/{entry}/cmdline").read_bytes()
        except OSError:
            continue
        if FOLLOWER.encode() in cmdline:
            found.append(int(entry))
    return sorted(found)


def _wait_workers(gw, workers: int, timeout: float = 30) -> list[int]:
    """The pids of every worker (the leader first) once each follower said it serves."""
    leader = gw.proc.pid
    deadline = time.monotonic() + timeout
    while True:
        followers = _followers(leader)
        serving = {f"(pid {pid}) serving" in gw.output() for pid in followers}
        if len(followers) == workers - 1 and serving == {True}:
            return [leader, *followers]
        if time.monotonic() > deadline or gw.proc.poll() is not None:
            raise AssertionError(f"{workers} workers did not start: {gw.output()}")
        time.sleep(0.05)


def _socket_inodes(pid: int) -> set[str]:
    inodes = set()
    try:
        fds = os.listdir(f"/proc/{pid}/fd")
    except OSError:
        return inodes
    for fd in fds:
        try:
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
        except OSError:
            continue
        if link.startswith("socket:["):
            inodes.add(link[len("socket:[") : -1])
    return inodes


def _server_side(port: int, client_port: int) -> str | None:
    """The inode of the gateway's end of the connection from `client_port`."""
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        try:
            lines = Path(table).read_text().splitlines()[1:]
        except OSError:
            continue
        for line in lines:
            fields = line.split()
            local, remote = fields[1], fields[2]
            if (
                int(local.rpartition(":")[2], 16) == port
                and int(remote.rpartition(":")[2], 16) == client_port
            ):
                return fields[9]
    return None


def _post(gw, pids: list[int], key: str = "iamafreeuser", max_tokens: int = 20):
    """One request on a new connection: (pid of the worker that answered, status, body)."""
    conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
    try:
        conn.connect()
        client_port = conn.sock.getsockname()[1]
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(chat(max_tokens=max_tokens)),
            headers={
                "Host": HOST,
                "Authorization": f"APIKEY {key}",
                "Content-Type": "application/json",
            },
        )
        resp = conn.getresponse()
        body = json.loads(resp.read() or b"{}")
        inode = _server_side(gw.port, client_port)  # the connection is still open
        served_by = next((pid for pid in pids if inode in _socket_inodes(pid)), None)
        return served_by, resp.status, body
    finally:
        conn.close()


def _until_each_answered(gw, pids: list[int], attempts: int = 300) -> list[tuple[int, int]]:
    """Requests on new connections until every worker answered one: [(pid, status)]."""
    seen = []
    for _ in range(attempts):
        pid, status, _ = _post(gw, pids)
        seen.append((pid, status))
        if {p for p, _ in seen} >= set(pids):
            return seen
    raise AssertionError(f"not every worker of {pids} answered in {attempts} requests: {seen}")


def _charged(redis_server, prefix: str) -> int:
    """Every token counted under `prefix`, read in Redis itself."""
    script = (
        "local n = 0 for _, k in ipairs(redis.call('KEYS', ARGV[1])) do "
        "if redis.call('TYPE', k).ok == 'string' then n = n + tonumber(redis.call('GET', k)) "
        "end end return n"
    )
    out = redis_server.cli("EVAL", script, "0", prefix + "{*").strip()
    return int(out.rpartition(" ")[2])


def _storage(redis_server) -> tuple[str, str]:
    prefix = f"tgw-workers-{uuid.uuid4().hex[:8]}:"  # this test's keys only
    return f"{redis_server.url}?prefix={prefix}", prefix


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# --- tests --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("storage", "named"),
    [(None, "memory://"), ("memory://", "memory://"), ("sqlite:///{tmp}/c.db", "sqlite://")],
)
def test_workers_refuse_a_per_process_store(tmp_path, storage, named) -> None:
    port = _free_port()
    args = ["serve", "-f", str(TUTORIAL), "--workers", "2", "--listen", f"127.0.0.1:{port}"]
    args += ["--admin", "127.0.0.1:0", "--state-dir", str(tmp_path / "state")]
    if storage is not None:
        args += ["--storage", storage.format(tmp=tmp_path)]
    result = run_cli(*args, timeout=30)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert named in lines[0] and "--workers 2" in lines[0]
    assert "--storage redis://" in lines[0]
    assert not (tmp_path / "c.db").exists()  # refused before anything was opened
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", port), timeout=1):
        pass  # nothing listens


def test_workers_share_one_limit(manifests, start_gateway, redis_server) -> None:
    limit, threads, max_tokens = 600, 8, 20
    storage, prefix = _storage(redis_server)
    folder = manifests(replace={"limit: 50 ": f"limit: {limit} "})
    gw = start_gateway(folder, args=("--workers", "2", "--storage", storage))
    pids = _wait_workers(gw, 2)

    def user() -> list[tuple[int | None, int, int]]:
        out = []
        while True:
            pid, status, body = _post(gw, pids, max_tokens=max_tokens)
            assert status in (200, 429), body
            out.append((pid, status, body["usage"]["total_tokens"] if status == 200 else 0))
            if status == 429:
                return out

    with ThreadPoolExecutor(threads) as pool:
        results = [r for batch in pool.map(lambda _: user(), range(threads)) for r in batch]
    used = sum(tokens for _, _, tokens in results)
    # both processes answered, and both let requests through
    assert {pid for pid, status, _ in results if status == 200} == set(pids), results

    # one counter: what Redis holds is exactly what the responses reported, and the
    # limit was crossed once (by the requests in flight then), not once per worker
    deadline = time.monotonic() + 5
    while _charged(redis_server, prefix) != used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _charged(redis_server, prefix) == used
    biggest = max(tokens for _, _, tokens in results)
    assert limit // 2 < used < limit + threads * biggest
    counters = httpx.get(gw.admin_url + COUNTERS).json()
    assert [c["remaining"] for c in counters] == [0]  # the leader's admin API sees it too

    # spent for every worker
    after = _until_each_answered(gw, pids)
    assert {status for _, status in after} == {429}
    # every worker wrote its access log lines to the same output
    assert len(gw.access_log(len(results) + len(after))) == len(results) + len(after)


@pytest.mark.parametrize("how", ["apply", "file"])
def test_a_change_reaches_every_worker(manifests, start_gateway, redis_server, how) -> None:
    storage, _ = _storage(redis_server)
    folder = manifests(replace={"limit: 50 ": "limit: 1000000 "})
    gw = start_gateway(folder, args=("--workers", "3", "--storage", storage))
    pids = _wait_workers(gw, 3)
    before = _until_each_answered(gw, pids)
    assert {status for _, status in before} == {200}  # the user has spent a few tokens

    lowered = (folder / "06-token-limits.yaml").read_text().replace("limit: 1000000 ", "limit: 1 ")
    if how == "apply":
        r = httpx.post(gw.admin_url + "/apis/apply", content=lowered, timeout=30)
        assert r.status_code == 200, r.text
        assert r.json()["results"][0]["action"] == "configured"
    else:
        (folder / "06-token-limits.yaml").write_text(lowered)
        deadline = time.monotonic() + 10
        while "configuration reloaded" not in gw.output():
            assert time.monotonic() < deadline, gw.output()
            time.sleep(0.05)
    # as soon as the change is confirmed, every worker enforces it: no request gets through
    after = _until_each_answered(gw, pids)
    assert {status for _, status in after} == {429}, after
    assert "did not confirm" not in gw.output()


def test_sigterm_to_the_leader_stops_every_worker(start_gateway, redis_server) -> None:
    storage, _ = _storage(redis_server)
    gw = start_gateway(TUTORIAL, args=("--workers", "3", "--storage", storage))
    pids = _wait_workers(gw, 3)
    children = [pid for pid in _all_children(gw.proc.pid)]  # the simulator too
    assert set(pids[1:]) <= set(children)
    started = time.monotonic()
    gw.proc.send_signal(signal.SIGTERM)
    assert gw.proc.wait(timeout=10) == 0
    assert time.monotonic() - started < 5
    assert [pid for pid in children if _alive(pid)] == []
    with pytest.raises(OSError), socket.create_connection(("127.0.0.1", gw.port), timeout=1):
        pass


def test_a_killed_leader_takes_its_workers_along(start_gateway, redis_server) -> None:
    storage, _ = _storage(redis_server)
    gw = start_gateway(TUTORIAL, args=("--workers", "2", "--storage", storage))
    pids = _wait_workers(gw, 2)
    gw.proc.kill()  # no chance to stop anything: PR_SET_PDEATHSIG does it
    gw.proc.wait()
    deadline = time.monotonic() + 5
    while _alive(pids[1]) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _alive(pids[1])


def test_a_worker_that_dies_is_started_again(start_gateway, redis_server) -> None:
    storage, _ = _storage(redis_server)
    gw = start_gateway(TUTORIAL, args=("--workers", "2", "--storage", storage))
    leader, follower = _wait_workers(gw, 2)
    os.kill(follower, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        now = _followers(leader)
        if now and now != [follower] and f"(pid {now[0]}) serving" in gw.output():
            break
        assert time.monotonic() < deadline, gw.output()
        time.sleep(0.05)
    assert f"worker 2 (pid {follower}) was killed by SIGKILL; starting it again" in gw.output()
    answered = _until_each_answered(gw, [leader, *now])  # the new one serves
    assert {status for _, status in answered} <= {200, 429}


def test_every_worker_follows_on_storage_error(tmp_path, start_gateway) -> None:
    from tests.redis_server import RedisServer

    redis = RedisServer(tmp_path / "redis")
    try:
        args = ("--workers", "2", "--storage", redis.url, "--on-storage-error", "deny")
        gw = start_gateway(TUTORIAL, args=args)
        pids = _wait_workers(gw, 2)
        redis.stop()
        answered = _until_each_answered(gw, pids)
        assert {status for _, status in answered} == {503}
    finally:
        redis.stop()


ROUTE = "default/trlp-tutorial-llm-sim"
FREE = "gateway-system/trlp-tutorial-token-limits/free"
GOLD = "gateway-system/trlp-tutorial-token-limits/gold"


def test_metrics_cover_every_worker(manifests, start_gateway, redis_server) -> None:
    storage, _ = _storage(redis_server)
    # the free user may spend enough for requests on both workers; the gold user has 200
    folder = manifests(replace={"limit: 50 ": "limit: 100000 "})
    gw = start_gateway(folder, args=("--workers", "2", "--storage", storage))
    pids = _wait_workers(gw, 2)
    free: list[tuple[int | None, int, dict]] = []
    while len(free) < 10 or {pid for pid, _, _ in free} != set(pids):
        assert len(free) < 300, f"not every worker of {pids} answered: {free}"
        free.append(_post(gw, pids, "iamafreeuser", max_tokens=20))
    assert {status for _, status, _ in free} == {200}
    gold: list[tuple[int | None, int, dict]] = []
    while sum(status == 429 for _, status, _ in gold) < 3:
        assert len(gold) < 100, gold
        gold.append(_post(gw, pids, "iamagolduser", max_tokens=20))
    assert {status for _, status, _ in gold} == {200, 429}
    # both workers served some of the requests counted below
    assert {pid for pid, _, _ in free + gold} == set(pids)

    ok = [body for _, status, body in free + gold if status == 200]
    refused = [body for _, status, body in gold if status == 429]
    free_tokens = sum(body["usage"]["total_tokens"] for _, _, body in free)
    gold_tokens = sum(body["usage"]["total_tokens"] for _, status, body in gold if status == 200)
    expected = [
        (("tokengateway_requests_total",), {"route": ROUTE, "status": "200"}, len(ok)),
        (("tokengateway_requests_total",), {"route": ROUTE, "status": "429"}, len(refused)),
        (("authorized_calls",), {"limitador_namespace": ROUTE, "limit_name": FREE}, len(free)),
        (("authorized_hits",), {"limitador_namespace": ROUTE, "limit_name": FREE}, free_tokens),
        (("authorized_hits",), {"limitador_namespace": ROUTE, "limit_name": GOLD}, gold_tokens),
        (("limited_calls",), {"limitador_namespace": ROUTE, "limit_name": GOLD}, len(refused)),
        (
            ("tokengateway_tokens_total",),
            {"route": ROUTE, "kind": "completion"},
            sum(body["usage"]["completion_tokens"] for body in ok),
        ),
        (("tokengateway_upstream_latency_seconds_count",), {"route": ROUTE}, len(ok)),
        (("tokengateway_overhead_seconds_count",), {}, len(ok)),
        (("tokengateway_workers",), {}, 2),
        (("tokengateway_workers_unreported",), {}, 0),
    ]

    def scrape() -> tuple[str, list[tuple[str, dict, float, float]]]:
        text = httpx.get(gw.admin_url + "/metrics", timeout=10).text
        seen = [(n, labels, want, _metric(text, n, **labels)) for (n,), labels, want in expected]
        return text, seen

    # a request's tokens are counted after its answer: wait for the last few
    deadline = time.monotonic() + 10
    text, seen = scrape()
    while any(got != want for _, _, want, got in seen) and time.monotonic() < deadline:
        time.sleep(0.1)
        text, seen = scrape()
    assert [(n, labels, got) for n, labels, _, got in seen] == [
        (n, labels, want) for n, labels, want, _ in seen
    ], text
    # each series once, the histogram's buckets summed too
    assert (
        text.count(
            'tokengateway_requests_total{route="default/trlp-tutorial-llm-sim",status="200"}'
        )
        == 1
    )
    buckets = re.findall(
        r'^tokengateway_upstream_latency_seconds_bucket\{route="[^"]+",le="\+Inf"\} (\d+)$',
        text,
        re.M,
    )
    assert buckets == [str(len(ok))]


def test_metrics_skip_a_worker_that_does_not_answer(start_gateway, redis_server) -> None:
    storage, _ = _storage(redis_server)
    gw = start_gateway(TUTORIAL, args=("--workers", "3", "--storage", storage))
    leader, *followers = _wait_workers(gw, 3)
    answered = _until_each_answered(gw, [leader, *followers])
    os.kill(followers[0], signal.SIGSTOP)  # alive, serving nothing, answering nothing
    try:
        started = time.monotonic()
        text = httpx.get(gw.admin_url + "/metrics", timeout=10).text
        assert time.monotonic() - started < 3  # ~1 s: the scrape does not wait for it
        assert _metric(text, "tokengateway_workers") == 3
        assert _metric(text, "tokengateway_workers_unreported") == 1
        assert re.search(r"worker \d sent no metrics within 1s", gw.output())
    finally:
        os.kill(followers[0], signal.SIGCONT)
    # its late answer is dropped: the next scrape and the next publish get their own
    text = httpx.get(gw.admin_url + "/metrics", timeout=10).text
    assert _metric(text, "tokengateway_workers_unreported") == 0
    assert _metric(text, "tokengateway_workers") == 3
    # every worker's requests, not the leader's alone
    counted = re.findall(
        r'^tokengateway_requests_total\{route="[^"]+",status="\d+"\} (\d+)$', text, re.M
    )
    assert sum(map(int, counted)) == len(answered), text
    lowered = (TUTORIAL / "06-token-limits.yaml").read_text().replace("limit: 50 ", "limit: 1 ")
    r = httpx.post(gw.admin_url + "/apis/apply", content=lowered, timeout=30)
    assert r.status_code == 200, r.text
    assert "did not confirm" not in gw.output()
    assert {status for _, status in _until_each_answered(gw, [leader, *followers])} == {429}


def test_metrics_of_a_single_process(start_gateway) -> None:
    gw = start_gateway(TUTORIAL)
    text = httpx.get(gw.admin_url + "/metrics", timeout=10).text
    assert _metric(text, "tokengateway_workers") == 1
    assert _metric(text, "tokengateway_workers_unreported") == 0


def _all_children(parent: int) -> list[int]:
    out = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = _stat(int(entry))
            if stat is not None and stat[1] == parent:
                out.append(int(entry))
    return out


def test_followers_take_the_connection_options(start_gateway, redis_server) -> None:
    """--max-body-size (like the other connection options) reaches every worker: on one
    kept-alive connection, a small request shows which worker it is, then a large one must
    get 413 from that same worker."""
    storage, _ = _storage(redis_server)
    args = ("--workers", "2", "--storage", storage, "--max-body-size", "400")
    gw = start_gateway(TUTORIAL, args=args)
    pids = _wait_workers(gw, 2)
    headers = {"Host": HOST, "Authorization": "APIKEY iamagolduser"}
    refused_by: set[int] = set()
    for _ in range(300):
        conn = http.client.HTTPConnection("127.0.0.1", gw.port, timeout=30)
        try:
            conn.connect()
            client_port = conn.sock.getsockname()[1]
            conn.request("GET", "/v1/models", headers=headers)
            resp = conn.getresponse()
            resp.read()
            inode = _server_side(gw.port, client_port)
            pid = next((p for p in pids if inode in _socket_inodes(p)), None)
            big = json.dumps(chat(content="word " * 200))
            conn.request("POST", "/v1/chat/completions", body=big, headers=headers)
            assert conn.getresponse().status == 413
            if pid is not None:
                refused_by.add(pid)
        finally:
            conn.close()
        if refused_by == set(pids):
            return
    raise AssertionError(f"only {refused_by} of {pids} answered")


def test_a_background_task_is_held_and_its_failure_logged_at_once(caplog) -> None:
    """`runtime.process.background`: the task lives while nothing else holds it, and its
    exception is logged when it ends, not lost with the task; a cancelled one is quiet."""
    import asyncio
    import gc

    from tokengateway.runtime.process import background

    async def main() -> None:
        gate = asyncio.Event()

        async def fails() -> None:
            await gate.wait()
            raise RuntimeError("the store went away")

        async def waits() -> None:
            await asyncio.get_running_loop().create_future()  # held by nothing else

        background(fails(), "forget old counters")
        quiet = background(waits(), "wait forever")
        del quiet
        await asyncio.sleep(0)
        gc.collect()
        assert {t.get_name() for t in asyncio.all_tasks()} >= {
            "forget old counters",
            "wait forever",
        }
        gate.set()
        await asyncio.sleep(0.01)
        (waiter,) = [t for t in asyncio.all_tasks() if t.get_name() == "wait forever"]
        waiter.cancel()
        await asyncio.sleep(0.01)

    with caplog.at_level("ERROR", logger="tokengateway.runtime"):
        asyncio.run(main())
    failures = [r for r in caplog.records if r.name == "tokengateway.runtime"]
    assert [r.getMessage() for r in failures] == ["forget old counters failed"]
    assert "the store went away" in caplog.text


def test_the_settings_reach_a_follower_whole_and_typed() -> None:
    """The leader's options become one frozen `WorkerSettings`, which crosses the channel
    (a pickle) unchanged: every follower serves with exactly the leader's settings."""
    import dataclasses

    from tokengateway.http.client import UpstreamLimits
    from tokengateway.http.server import ConnectionLimits
    from tokengateway.runtime.process import WorkerSettings
    from tokengateway.runtime.serve import ServeOptions
    from tokengateway.runtime.workers import _frame, _receive

    options = ServeOptions(
        paths=[],
        listen=("127.0.0.1", 0),
        admin=("127.0.0.1", 0),
        storage="redis://127.0.0.1:6379/0",
        access_log=False,
        on_storage_error="deny",
        max_body_size=1234,
        reservation_clamps=(0.25, 60.0),
        connections=ConnectionLimits(max_connections=77),
        upstream=UpstreamLimits(max_connections=9),
    )
    settings = options.worker_settings()
    assert settings == WorkerSettings(
        storage="redis://127.0.0.1:6379/0",
        on_storage_error="deny",
        access_log=False,
        max_body_bytes=1234,
        reservation_clamps=(0.25, 60.0),
        connections=ConnectionLimits(max_connections=77),
        upstream=UpstreamLimits(max_connections=9),
    )
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.storage = "memory://"  # type: ignore[misc]
    leader, follower = socket.socketpair()
    with leader, follower:
        leader.sendall(_frame(settings))
        received = _receive(follower)
    assert isinstance(received, WorkerSettings) and received == settings


def test_a_burst_of_connections_is_spread_over_the_workers(
    manifests, start_gateway, redis_server
) -> None:
    """32 keep-alive connections opened at once, as a load generator or a client pool opens
    them: every worker gets some. libuv alone accepts until the backlog is empty, and the
    first worker awake used to take them all, leaving the other idle for as long as the
    connections lived."""
    storage, _prefix = _storage(redis_server)
    gw = start_gateway(manifests(), args=("--workers", "2", "--storage", storage))
    pids = _wait_workers(gw, 2)
    socks = [socket.create_connection(("127.0.0.1", gw.port)) for _ in range(32)]
    try:
        time.sleep(0.5)  # every connection accepted by now
        owners: dict[int | None, int] = {}
        for sock in socks:
            inode = _server_side(gw.port, sock.getsockname()[1])
            pid = next((p for p in pids if inode in _socket_inodes(p)), None)
            owners[pid] = owners.get(pid, 0) + 1
    finally:
        for sock in socks:
            sock.close()
    assert None not in owners, owners
    assert all(owners.get(pid, 0) >= 4 for pid in pids), owners
