"""The Redis store's own pipelined connections (storage/resp.py) against real redis-server
processes: replies matched to their commands under concurrency, a broken connection replaced
without ever sending a command twice, a silent server timed out, a Cluster slot resharded
under the store (MOVED and ASK), and TLS with verification."""

from __future__ import annotations

import asyncio
import itertools
import subprocess
import time
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from redis.crc import key_slot

from tokengateway.storage import CounterRef, StorageError, open_store
from tokengateway.storage.redis import RedisStore

pytest.register_assert_rewrite("tests.redis_server")
from tests.redis_server import (  # noqa: E402
    HOST,
    RedisClusterProcesses,
    RedisServer,
    free_port,
    require_redis,
)

SEP = "\x1f"
_prefixes = itertools.count()


def ref(user: str, ns: str = "default/route", limit: int = 10**9) -> CounterRef:
    return CounterRef(SEP.join([ns, "lim", "60000", user]), limit, 60)


async def started(url: str) -> RedisStore:
    joiner = "&" if "?" in url else "?"
    store = open_store(f"{url}{joiner}prefix=c{next(_prefixes)}:")
    assert isinstance(store, RedisStore)
    await store.start()
    return store


class Proxy:
    """A TCP relay in front of Redis that can stall, or cut a connection right after the
    server answered (the command ran, its reply never arrives)."""

    def __init__(self, target_port: int) -> None:
        self.target_port = target_port
        self.stall = False
        self.cut_after_reply = False
        self.connections = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, HOST, 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection(HOST, self.target_port)

        async def upstream() -> None:
            while data := await reader.read(65536):
                if self.stall:
                    continue  # swallowed: the server never sees it
                up_writer.write(data)
            up_writer.close()

        async def downstream() -> None:
            while data := await up_reader.read(65536):
                if self.cut_after_reply:
                    writer.transport.abort()  # the reply is lost with the connection
                    return
                writer.write(data)
            writer.close()

        await asyncio.gather(upstream(), downstream(), return_exceptions=True)
        up_writer.close()

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()


@pytest.fixture
async def proxied(redis_server: RedisServer) -> AsyncIterator[tuple[Proxy, RedisStore]]:
    proxy = Proxy(redis_server.port)
    await proxy.start()
    store = await started(f"redis://{HOST}:{proxy.port}/0?timeout=0.5")
    try:
        yield proxy, store
    finally:
        await store.close()
        await proxy.stop()


async def test_concurrent_commands_share_one_connection_and_get_their_own_replies(
    redis_server: RedisServer,
) -> None:
    store = await started(redis_server.url)
    try:
        refs = [ref(f"user-{i}") for i in range(300)]
        await asyncio.gather(*(store.update([r], [i + 1]) for i, r in enumerate(refs)))
        results = await asyncio.gather(*(store.check([r], 0) for r in refs))
        assert [res.states[0].value for res in results] == [i + 1 for i in range(300)]
        assert len(store._conns) == 1  # every command of the 600 went over one connection
    finally:
        await store.close()


async def test_a_reply_lost_with_its_connection_is_an_error_and_never_counted_twice(
    proxied: tuple[Proxy, RedisStore],
) -> None:
    proxy, store = proxied
    r = ref("once")
    await store.update([r], [5])
    proxy.cut_after_reply = True
    with pytest.raises(StorageError, match="closed the connection"):
        await store.update([r], [7])  # it ran in Redis; its reply was lost
    proxy.cut_after_reply = False
    result = await store.check([r], 0)  # a new connection, made for this call
    assert result.states[0].value == 12  # 5 + 7, the 7 exactly once
    assert proxy.connections >= 2


async def test_a_silent_server_is_a_timeout_naming_it(proxied: tuple[Proxy, RedisStore]) -> None:
    proxy, store = proxied
    proxy.stall = True
    began = time.monotonic()
    with pytest.raises(StorageError, match=r"no reply in 0\.5s"):
        await store.check([ref("silent")], 0)
    assert time.monotonic() - began < 2.5  # one watch period, at most two
    proxy.stall = False
    assert (await store.check([ref("silent")], 0)).states[0].value == 0


async def test_a_restarted_server_is_reconnected_before_the_next_command(tmp_path: Path) -> None:
    port = free_port()
    server = RedisServer(tmp_path / "a", port=port)
    store = await started(server.url)
    try:
        await store.update([ref("x")], [3])
        server.stop()
        server = RedisServer(tmp_path / "b", port=port)  # back, empty, same address
        await asyncio.sleep(0.1)  # the old connection's close reaches the loop
        await store.update([ref("x")], [4])  # scripts reloaded (NOSCRIPT) on a new connection
        assert (await store.check([ref("x")], 0)).states[0].value == 4
    finally:
        await store.close()
        server.stop()


def _node_ids(cluster: RedisClusterProcesses) -> dict[int, str]:
    return {n.port: n.cli("cluster", "myid").strip() for n in cluster.nodes}


def _owner(cluster: RedisClusterProcesses, slot: int) -> RedisServer:
    for node in cluster.nodes:
        for line in node.cli("cluster", "nodes").splitlines():
            fields = line.split()
            if "myself" not in fields[2]:
                continue
            for span in fields[8:]:
                lo, _dash, hi = span.partition("-")
                if not lo.startswith("[") and int(lo) <= slot <= int(hi or lo):
                    return node
    raise AssertionError(f"no node owns slot {slot}")


async def test_a_resharded_slot_is_followed_through_ask_then_moved() -> None:
    cluster = RedisClusterProcesses(3)
    try:
        store = await started(cluster.url)
        ns = "team-a/route"
        r = ref("u", ns=ns)
        key = store.redis_key(r.key)
        slot = key_slot(key)
        await store.update([r], [10])
        source = _owner(cluster, slot)
        target = next(n for n in cluster.nodes if n is not source)
        ids = _node_ids(cluster)
        # migration begins: the slot is MIGRATING on its owner, IMPORTING on the target, and
        # its existing key moves; the owner now answers ASK for it
        target.cli("cluster", "setslot", str(slot), "importing", ids[source.port])
        source.cli("cluster", "setslot", str(slot), "migrating", ids[target.port])
        out = source.cli("migrate", HOST, str(target.port), key.decode(), "0", "5000")
        assert "OK" in out, out
        assert source.cli("exists", key.decode()).startswith("ASK ")
        await store.update([r], [5])  # ASK: ASKING then the script, on the target
        # migration ends: every node learns the new owner; the store's map is stale (MOVED)
        for node in cluster.nodes:
            node.cli("cluster", "setslot", str(slot), "node", ids[target.port])
        result = await store.check([r], 0)
        assert result.states[0].value == 15  # 10 moved by MIGRATE, 5 added through ASK
        assert int(target.cli("get", key.decode()).strip()) == 15
        assert store._slot_nodes[slot] == (HOST, target.port)  # learnt from MOVED
        await store.close()
    finally:
        cluster.stop()


async def test_a_cluster_node_that_cannot_be_reached_makes_the_slot_map_read_again(
    redis_cluster: RedisClusterProcesses,
) -> None:
    """A primary that failed over leaves the store's map pointing at a dead address: the
    command fails (named), the map is read again from the cluster, the next one goes right."""
    store = await started(redis_cluster.url)
    try:
        r = ref("u", ns="team-b/route")
        slot = key_slot(store.redis_key(r.key))
        await store.update([r], [2])
        right = store._slot_nodes[slot]
        store._slot_nodes[slot] = (HOST, free_port())  # nobody listens there
        with pytest.raises(StorageError, match="cannot connect"):
            await store.update([r], [3])
        assert store._slot_nodes[slot] == right
        await store.update([r], [4])
        assert (await store.check([r], 0)).states[0].value == 6  # the 3 never ran
    finally:
        await store.close()


def _tls_server(directory: Path) -> tuple[subprocess.Popen[bytes], int, Path]:
    directory.mkdir(parents=True, exist_ok=True)
    cert, key = directory / "cert.pem", directory / "key.pem"
    subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2",
         "-subj", f"/CN={HOST}", "-addext", f"subjectAltName=IP:{HOST}"],
        check=True, capture_output=True,
    )  # fmt: skip
    port = free_port()
    proc = subprocess.Popen(
        [require_redis(), "--port", "0", "--tls-port", str(port), "--bind", HOST,
         "--tls-cert-file", str(cert), "--tls-key-file", str(key),
         "--tls-ca-cert-file", str(cert), "--tls-auth-clients", "no",
         "--save", "", "--appendonly", "no", "--dir", str(directory)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    return proc, port, cert


async def test_rediss_verifies_the_server_and_counts_over_tls(tmp_path: Path) -> None:
    proc, port, cert = _tls_server(tmp_path / "tls")
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                store = await started(f"rediss://{HOST}:{port}/0?ssl_ca_certs={cert}")
                break
            except StorageError:
                if time.monotonic() > deadline or proc.poll() is not None:
                    raise
                await asyncio.sleep(0.05)
        try:
            await store.update([ref("tls")], [9])
            assert (await store.check([ref("tls")], 0)).states[0].value == 9
        finally:
            await store.close()
        # a server whose certificate no trusted CA signed is refused, and named
        with pytest.raises(StorageError, match="CERTIFICATE_VERIFY_FAILED"):
            await started(f"rediss://{HOST}:{port}/0")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


async def test_a_sentinel_failover_is_followed_on_readonly(tmp_path: Path) -> None:
    from tests.redis_server import RedisSentinelProcess

    old = RedisServer(tmp_path / "a")
    new = RedisServer(tmp_path / "b")
    sentinel = None
    try:
        old.cli("config", "set", "repl-diskless-sync-delay", "0")  # no 5 s wait for replicas
        new.cli("replicaof", HOST, str(old.port))
        deadline = time.monotonic() + 20
        while "master_link_status:up" not in new.cli("info", "replication"):
            assert time.monotonic() < deadline, new.cli("info", "replication")
            time.sleep(0.05)
        sentinel = RedisSentinelProcess(old)
        store = await started(sentinel.url())
        r = ref("failover")
        await store.update([r], [3])
        key = store.redis_key(r.key).decode()
        while new.cli("get", key).strip() != "3":  # replication is asynchronous
            assert time.monotonic() < deadline, new.cli("info", "replication")
            await asyncio.sleep(0.02)
        # the Sentinel learns of the replica from the master, then promotes it on request
        while sentinel.cli("sentinel", "failover", sentinel.name).strip() != "OK":
            assert time.monotonic() < deadline + 20, sentinel.output()
            await asyncio.sleep(0.2)
        while str(new.port) not in sentinel.cli("sentinel", "get-master-addr-by-name", "tgmaster"):
            assert time.monotonic() < deadline + 40, sentinel.output()
            await asyncio.sleep(0.1)  # the loop runs: the Sentinel's CLIENT KILL is seen
        # the Sentinel demotes the old master when it next hears from it (seconds): done
        # here at once, as it will be done
        old.cli("replicaof", HOST, str(new.port))
        await asyncio.sleep(0.1)
        # the store's connection still reaches the old master, a replica now: READONLY,
        # which ran nothing, so the script goes to the master the Sentinels name
        await store.update([r], [4])
        assert (await store.check([r], 0)).states[0].value == 7
        assert store._master == (HOST, new.port)
        await store.close()
    finally:
        if sentinel is not None:
            sentinel.stop()
        new.stop()
        old.stop()
