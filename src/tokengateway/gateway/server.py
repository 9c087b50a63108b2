"""Putting a gateway together: load manifests, plan backends, start simulators, serve."""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TextIO

from tokengateway.gateway.accesslog import AccessLog
from tokengateway.gateway.app import GatewayApp
from tokengateway.gateway.backends import BackendPlan, plan_backends
from tokengateway.gateway.config import CompiledConfig, compile_config, needed_services
from tokengateway.resources import load_paths, parse_resources
from tokengateway.storage import open_store

__all__ = ["LoadedConfig", "Simulators", "bind_socket", "load", "parse_listen", "run_gateway"]


@dataclass
class LoadedConfig:
    resources: list[Any]
    plans: dict[str, BackendPlan]
    warnings: list[str] = field(default_factory=list)


def load(
    paths: Sequence[str], overrides: Mapping[str, str], stdin: TextIO | None = None
) -> LoadedConfig:
    """Manifests to validated resources and a backend plan; raises ValueError subclasses."""
    resources = parse_resources(load_paths(paths, stdin=stdin))
    plans = plan_backends(resources, needed_services(resources), overrides)
    return LoadedConfig(list(resources), plans)


def parse_listen(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"--listen {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
    return host.strip("[]") or "127.0.0.1", int(port)


def bind_socket(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(2048)
    sock.set_inheritable(True)
    return sock


class Simulators:
    """Built-in simulators for llm-d-inference-sim Deployments, one process each.

    Each gets a socket bound here to a free loopback port and handed over as a file
    descriptor, so there is no race for the port.
    """

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.urls: dict[str, str] = {}

    def start(self, plans: Mapping[str, BackendPlan], timeout: float = 20.0) -> dict[str, str]:
        urls = {k: p.url for k, p in plans.items() if p.url is not None}
        pending = []
        for key, plan in plans.items():
            if not plan.needs_simulator:
                continue
            sock = bind_socket("127.0.0.1", 0)
            port = sock.getsockname()[1]
            cmd = [
                sys.executable,
                "-m",
                "tokengateway",
                "sim",
                "--fd",
                str(sock.fileno()),
                *plan.sim_args,
            ]
            proc = subprocess.Popen(
                cmd,
                pass_fds=(sock.fileno(),),
                stdin=subprocess.DEVNULL,
                preexec_fn=_die_with_parent,
            )
            sock.close()
            self.procs.append(proc)
            urls[key] = f"http://127.0.0.1:{port}"
            pending.append((key, proc, urls[key]))
        deadline = time.monotonic() + timeout
        for key, proc, url in pending:
            while True:
                if proc.poll() is not None:
                    self.stop()
                    raise RuntimeError(
                        f"simulator for Service {key} exited with code {proc.returncode}"
                    )
                try:
                    with urllib.request.urlopen(f"{url}/v1/models", timeout=1) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"simulator for Service {key} did not start within {timeout:g}s"
                    )
                time.sleep(0.05)
        self.urls = urls
        return urls

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
        self.procs.clear()


def _die_with_parent() -> None:
    """In the child: get SIGTERM when the gateway dies, even by SIGKILL (Linux only)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class _Stop(Exception):
    """Raised by our signal handlers so that `finally` blocks (simulators) run."""


def _raise_stop(signum: int, frame: Any) -> None:
    raise _Stop(signum)


@contextlib.contextmanager
def started(loaded: LoadedConfig) -> Iterator[CompiledConfig]:
    """Start the simulators a configuration needs and compile it; stop them on exit."""
    sims = Simulators()
    urls = sims.start(loaded.plans)
    try:
        yield compile_config(loaded.resources, urls)
    finally:
        sims.stop()


def _run_loop(coro: Any) -> None:
    """uvloop when present: on the default loop every response waited ~40 ms for a delayed
    ACK (measured: 44 ms vs 0.3 ms per request on loopback)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        asyncio.run(coro)
    else:
        uvloop.run(coro)


def run_gateway(
    config: CompiledConfig,
    listen: tuple[str, int] | socket.socket,
    storage: str = "memory://",
    on_ready: Any = None,
    access_log: bool = True,
) -> None:
    """Serve until SIGINT/SIGTERM. `on_ready(host, port)` is called once listening."""
    import uvicorn

    store = open_store(storage)
    app = GatewayApp(config, store, access_log=AccessLog() if access_log else None)
    sock = listen if isinstance(listen, socket.socket) else bind_socket(*listen)
    # The socket goes to serve(sockets=...), not Config(fd=...): uvicorn wraps a bare fd as
    # a Unix socket, so TCP_NODELAY is never set and each response waits ~40 ms for an ACK.
    uv = uvicorn.Config(
        app,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        timeout_keep_alive=30,
        server_header=False,
    )
    server = uvicorn.Server(uv)

    async def main() -> None:
        task = asyncio.create_task(server.serve(sockets=[sock]))
        while not server.started and not task.done():
            await asyncio.sleep(0.01)
        if server.started and on_ready is not None:
            host, port = sock.getsockname()[:2]
            on_ready(host, port)
        await task

    # uvicorn restores the previous handlers after a graceful shutdown and raises the signal
    # again; with the default handlers that would kill us before the simulators are stopped.
    previous = {sig: signal.signal(sig, _raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        _run_loop(main())
    except _Stop:
        pass
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        with contextlib.suppress(OSError):
            sock.close()
