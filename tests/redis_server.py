"""Real `redis-server` processes for the tests: one server, or a 3-master Redis Cluster.

Each server listens on a free loopback port, keeps its files in a temp dir, persists
nothing (`--save '' --appendonly no`) and is stopped by its fixture. A missing `redis-server`
fails the run with the way to install it: tests never skip silently in CI.

Use the fixtures by importing them into a test module::

    from tests.redis_server import redis_cluster, redis_server  # noqa: F401
"""

from __future__ import annotations

import contextlib
import random
import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = [
    "RedisClusterProcesses",
    "RedisSentinelProcess",
    "RedisServer",
    "redis_cluster",
    "redis_server",
    "require_redis",
]

HOST = "127.0.0.1"


def require_redis(tool: str = "redis-server") -> str:
    """The tool's path; a missing one fails the test (never a skip)."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is required by the Redis tests; `make test` installs it")
    return path


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind((HOST, port))
        except OSError:
            return False
    return True


def free_port(cluster: bool = False) -> int:
    """A free loopback port; for Cluster, its bus port (port + 10000) is free too."""
    if not cluster:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind((HOST, 0))
            return int(sock.getsockname()[1])
    for _ in range(200):
        port = random.randint(20000, 55000)
        if _port_free(port) and _port_free(port + 10000):
            return port
    raise RuntimeError("no free port pair for a Redis Cluster node")


class RedisServer:
    """One `redis-server` on a free loopback port; `url` reaches it, `stop()` ends it."""

    def __init__(
        self,
        directory: Path | None = None,
        *,
        password: str | None = None,
        cluster: bool = False,
        port: int | None = None,
    ) -> None:
        binary = require_redis()
        self.password = password
        self.cluster = cluster
        self._own_dir = directory is None
        self.dir = Path(tempfile.mkdtemp(prefix="redis-")) if directory is None else directory
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port(cluster)
        cmd = [binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly"]
        cmd += ["no", "--dir", str(self.dir), "--daemonize", "no", "--protected-mode", "no"]
        if password:
            cmd += ["--requirepass", password]
        if cluster:
            cmd += ["--cluster-enabled", "yes", "--cluster-config-file", "nodes.conf"]
            cmd += ["--cluster-node-timeout", "2000"]
        self.log = self.dir / "redis.log"
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd, stdin=subprocess.DEVNULL, stdout=self._log, stderr=subprocess.STDOUT
        )
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}{HOST}:{self.port}/0"

    def cli(self, *args: str, timeout: float = 10) -> str:
        """`redis-cli` against this server; its output."""
        cmd = [require_redis("redis-cli"), "-h", HOST, "-p", str(self.port)]
        if self.password:
            cmd += ["--no-auth-warning", "-a", self.password]
        done = subprocess.run(
            [*cmd, *args], capture_output=True, text=True, timeout=timeout, check=False
        )
        return done.stdout + done.stderr

    def ping(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5) as sock:
                if self.password:
                    sock.sendall(f"AUTH {self.password}\r\n".encode())
                    sock.recv(64)
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def _wait_ready(self, timeout: float = 10) -> None:
        deadline = time.monotonic() + timeout
        while not self.ping():
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}: {self.output()}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server did not answer PING: {self.output()}")
            time.sleep(0.02)

    def output(self) -> str:
        self._log.flush()
        return self.log.read_text(errors="replace")[-2000:]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class RedisClusterProcesses:
    """A Redis Cluster of `masters` redis-server processes (no replicas), slots all covered."""

    def __init__(self, masters: int = 3, directory: Path | None = None) -> None:
        require_redis("redis-cli")
        self._own_dir = directory is None
        self.dir = (
            Path(tempfile.mkdtemp(prefix="redis-cluster-")) if directory is None else directory
        )
        self.nodes: list[RedisServer] = []
        try:
            for i in range(masters):
                self.nodes.append(RedisServer(self.dir / f"node-{i}", cluster=True))
            addresses = [f"{HOST}:{n.port}" for n in self.nodes]
            out = self.nodes[0].cli(
                "--cluster", "create", *addresses, "--cluster-replicas", "0", "--cluster-yes",
                timeout=60,
            )  # fmt: skip
            if "[OK] All 16384 slots covered" not in out:
                raise RuntimeError(f"redis-cli --cluster create failed: {out}")
            self._wait_ok()
        except BaseException:
            self.stop()
            raise

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"{HOST}:{n.port}" for n in self.nodes)

    def _wait_ok(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while True:
            infos = [n.cli("cluster", "info") for n in self.nodes]
            if all("cluster_state:ok" in info for info in infos):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"cluster never reached cluster_state:ok: {infos}")
            time.sleep(0.05)

    def stop(self) -> None:
        for node in self.nodes:
            node.stop()
        if self._own_dir:
            shutil.rmtree(self.dir, ignore_errors=True)


class RedisSentinelProcess(RedisServer):
    """A Redis Sentinel (`redis-server --sentinel`) watching `master` as `name` (a server's
    log and stop, its own start and client)."""

    def __init__(self, master: RedisServer, name: str = "tgmaster") -> None:
        binary = require_redis()
        self.name = name
        self.master = master
        self.dir = Path(tempfile.mkdtemp(prefix="sentinel-"))
        self._own_dir = True
        self.password = None
        self.port = free_port()
        conf = self.dir / "sentinel.conf"
        lines = [
            f"port {self.port}",
            f"bind {HOST}",
            f"dir {self.dir}",
            "protected-mode no",
            f"sentinel monitor {name} {HOST} {master.port} 1",
            f"sentinel down-after-milliseconds {name} 2000",
        ]
        if master.password:
            lines.append(f"sentinel auth-pass {name} {master.password}")
        conf.write_text("\n".join(lines) + "\n")
        self.log = self.dir / "sentinel.log"
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [binary, str(conf), "--sentinel"],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 10
        while str(master.port) not in self.cli("SENTINEL", "get-master-addr-by-name", name):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis sentinel did not start: {self.output()}")
            time.sleep(0.05)

    def url(self, password: str | None = None) -> str:
        auth = f":{password}@" if password else ""
        return f"redis+sentinel://{auth}{HOST}:{self.port}/{self.name}/0"

    def cli(self, *args: str) -> str:
        cmd = [require_redis("redis-cli"), "-h", HOST, "-p", str(self.port), *args]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=False)
        return done.stdout + done.stderr


@contextlib.contextmanager
def running_server(**kwargs: object) -> Iterator[RedisServer]:
    server = RedisServer(**kwargs)  # type: ignore[arg-type]
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    """One redis-server for the whole session; tests keep apart by key prefix or FLUSHALL."""
    with running_server() as server:
        yield server


@pytest.fixture(scope="session")
def redis_cluster() -> Iterator[RedisClusterProcesses]:
    """A 3-master Redis Cluster for the whole session."""
    cluster = RedisClusterProcesses(3)
    try:
        yield cluster
    finally:
        cluster.stop()
