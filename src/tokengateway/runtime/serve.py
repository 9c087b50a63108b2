"""Putting a gateway together: load manifests, plan backends, start simulators, serve."""

from __future__ import annotations

import asyncio
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

from tokengateway.config.backends import BackendPlan, plan_backends
from tokengateway.config.compile import CompiledConfig, needed_services
from tokengateway.controlplane.admin import AdminApp
from tokengateway.controlplane.control import ControlPlane
from tokengateway.controlplane.follower.follow import Follower, FollowOptions
from tokengateway.dataplane.app import DEFAULT_MAX_BODY, RESERVATION_CLAMPS, GatewayApp
from tokengateway.http.client import DEFAULT_LIMITS, UpstreamLimits
from tokengateway.http.server import ConnectionLimits
from tokengateway.http.tls import SniListener
from tokengateway.limits import OnError, counter_scope
from tokengateway.observability.metrics import Snapshot, merge, process_snapshot
from tokengateway.resources import load_paths, parse_resources
from tokengateway.runtime.process import (
    Stop,
    WorkerSettings,
    background,
    die_with_parent,
    gateway_app,
    make_server,
    raise_stop,
    run_loop,
)
from tokengateway.runtime.workers import WorkerPool
from tokengateway.storage import open_store

__all__ = [
    "LoadedConfig",
    "ServeOptions",
    "Simulators",
    "bind_socket",
    "load",
    "metrics_source",
    "parse_listen",
    "serve_gateway",
]


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


def parse_listen(text: str, flag: str = "--listen") -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        raise ValueError(f"{flag} {text!r}: expected HOST:PORT, e.g. 127.0.0.1:8080")
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
    descriptor, so there is no race for the port. A simulator is kept across reloads while
    some Service still needs it with the same args.
    """

    def __init__(self) -> None:
        self.running: dict[tuple[str, tuple[str, ...]], tuple[subprocess.Popen[bytes], str]] = {}
        self._lock = threading.Lock()

    def start(self, plans: Mapping[str, BackendPlan], timeout: float = 20.0) -> dict[str, str]:
        """Addresses for every plan, starting the simulators not running yet."""
        urls = {k: p.url for k, p in plans.items() if p.url is not None}
        pending = []
        with self._lock:
            for key, plan in plans.items():
                if not plan.needs_simulator:
                    continue
                ident = (key, plan.sim_args)
                if ident in self.running and self.running[ident][0].poll() is None:
                    urls[key] = self.running[ident][1]
                    continue
                proc, url = self._spawn(plan)
                self.running[ident] = (proc, url)
                urls[key] = url
                pending.append((ident, proc, url))
        deadline = time.monotonic() + timeout
        for ident, proc, url in pending:
            problem = _wait_ready(proc, url, deadline)
            if problem:
                self._stop([ident])
                raise RuntimeError(
                    f"simulator for Service {ident[0]} {problem} (timeout {timeout:g}s)"
                )
        return urls

    @staticmethod
    def _spawn(plan: BackendPlan) -> tuple[subprocess.Popen[bytes], str]:
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
            cmd, pass_fds=(sock.fileno(),), stdin=subprocess.DEVNULL, preexec_fn=die_with_parent
        )
        sock.close()
        return proc, f"http://127.0.0.1:{port}"

    def prune(self, plans: Mapping[str, BackendPlan]) -> None:
        """Stop the simulators no plan needs any more."""
        wanted = {(k, p.sim_args) for k, p in plans.items() if p.needs_simulator}
        self._stop([ident for ident in list(self.running) if ident not in wanted])

    def stop(self) -> None:
        self._stop(list(self.running))

    def _stop(self, idents: list[tuple[str, tuple[str, ...]]]) -> None:
        with self._lock:
            procs = [self.running.pop(i)[0] for i in idents if i in self.running]
        for proc in procs:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc in procs:
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_ready(proc: subprocess.Popen[bytes], url: str, deadline: float) -> str | None:
    while True:
        if proc.poll() is not None:
            return f"exited with code {proc.returncode}"
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=1) as r:
                if r.status == 200:
                    return None
        except OSError:
            pass
        if time.monotonic() > deadline:
            return "did not start"
        time.sleep(0.05)


@dataclass
class ServeOptions:
    paths: list[str]
    listen: tuple[str, int] | socket.socket
    admin: tuple[str, int] | socket.socket
    storage: str = "memory://"
    overrides: dict[str, str] = field(default_factory=dict)
    admin_token: str | None = None
    #: the admin listener serves HTTPS with this context (runtime/admin_tls.py); None: HTTP
    admin_tls: ssl.SSLContext | None = None
    #: where every HTTPS listener of the Gateways is served, one TLS socket whose
    #: certificate is chosen by SNI (docs/tls.md); None: HTTPS listeners are not served
    listen_https: tuple[str, int] | socket.socket | None = None
    state_dir: Path | None = None
    access_log: bool = True
    watch_interval: float = 1.0
    on_storage_error: OnError = "allow"
    #: processes serving the listen socket; more than 1 needs a shared store (runtime/workers.py)
    workers: int = 1
    #: request bodies over this many bytes are answered 413
    max_body_size: int = DEFAULT_MAX_BODY
    #: the largest hold of a reservation (fraction of a counter's limit) and its longest life
    reservation_clamps: tuple[float, float] = RESERVATION_CLAMPS
    #: timeouts and caps at the connection level (http/server.py)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    #: what the upstream client holds: connections per backend, keep-alive, answer size
    upstream: UpstreamLimits = DEFAULT_LIMITS
    #: serve only Gateways of this GatewayClass (controlplane/classes.py); None: all
    gateway_class: str | None = None
    #: take the resources from a Kubernetes API instead of `paths` (controlplane/follower/)
    follow: FollowOptions | None = None
    #: how long a follower waits for its first list before it serves anyway
    first_sync_seconds: float = 30.0

    def worker_settings(self) -> WorkerSettings:
        """What every worker process serves with, the leader's own included."""
        return WorkerSettings(
            storage=self.storage,
            on_storage_error=self.on_storage_error,
            access_log=self.access_log,
            max_body_bytes=self.max_body_size,
            reservation_clamps=self.reservation_clamps,
            connections=self.connections,
            upstream=self.upstream,
        )


class _Dispatch:
    """One server, two sockets: requests to the admin socket go to the admin API."""

    def __init__(self, gateway: GatewayApp, admin: AdminApp, admin_port: int) -> None:
        self.gateway = gateway
        self.admin = admin
        self.admin_port = admin_port

    def __call__(self, scope: Any, receive: Any, send: Any) -> Awaitable[None]:
        # the chosen app's own coroutine, not one more around it (one frame less a request)
        server = scope.get("server")
        if scope["type"] == "http" and server is not None and server[1] == self.admin_port:
            return self.admin(scope, receive, send)
        return self.gateway(scope, receive, send)


def metrics_source(
    app: GatewayApp,
    pool: WorkerPool | None,
    extra: Callable[[], Mapping[str, float]] | None = None,
) -> Callable[[], Awaitable[Snapshot]]:
    """What the admin API's /metrics shows: this process's metrics alone, or with
    `--workers` the sum over the leader and every follower that answers in time (the others
    are counted in `workers_unreported`, and in `workers` as they serve all the same).
    `extra` adds figures of this process alone (a follower's, controlplane/follower/)."""

    def with_extra(snap: Snapshot) -> Snapshot:
        if extra is not None:
            snap["figures"].update(extra())
        return snap

    async def own() -> Snapshot:
        return with_extra(process_snapshot(app))

    if pool is None:
        return own

    async def every() -> Snapshot:
        mine = process_snapshot(app)
        theirs, unreported = await pool.snapshots()
        merged = merge([mine, *theirs])
        merged["figures"]["workers"] += unreported
        merged["figures"]["workers_unreported"] = unreported
        return with_extra(merged)

    return every


def serve_gateway(
    options: ServeOptions,
    stdin: TextIO | None = None,
    on_ready: Callable[[CompiledConfig, tuple[str, int], tuple[str, int]], None] | None = None,
) -> None:
    """Load, start simulators, serve until SIGINT/SIGTERM, stop simulators. Raises the
    loading errors (ValueError subclasses) before anything listens.

    With `options.workers` > 1 this process is the leader of `workers.WorkerPool`: all of
    the above, plus followers that serve the same sockets (the HTTPS one too) with every
    configuration it publishes (see runtime/workers.py)."""
    sims = Simulators()
    sni = SniListener()
    settings = options.worker_settings()
    store = open_store(settings.storage)
    holder: dict[str, Any] = {}
    pool = None
    if options.workers > 1:
        pool = WorkerPool(options.workers - 1, settings)

    def publish(config: CompiledConfig) -> None:
        sni.swap(config.certificates)  # the next handshake on the HTTPS socket sees it
        app = holder.get("app")
        loop = holder.get("loop")
        if app is not None:
            app.swap(config, loop)
            scopes = {
                counter_scope(t.route, lim.identifier) for t in config.rules for lim in t.limits
            }
            if loop is not None:
                loop.call_soon_threadsafe(
                    lambda: background(store.retain(scopes), "forget the counters of old limits")
                )
        if pool is not None:
            # the control plane sets backend_urls before it publishes; followers compile the
            # same documents with the same URLs, and the store's retain is ours alone
            pool.publish(config, control.backend_urls)

    def start_backends(plans: Mapping[str, BackendPlan]) -> dict[str, str]:
        urls = sims.start(plans)
        holder["plans"] = plans
        return urls

    follower: Follower | None = None
    control = ControlPlane(
        options.paths,
        options.overrides,
        options.state_dir if options.follow is None else None,
        start_backends,
        publish,
        gateway_class=options.gateway_class,
    )
    control.https = options.listen_https is not None
    if options.follow is not None:
        follower = Follower(control, options.follow, options.state_dir)
        control.follows = follower.server
    try:
        config = control.start(stdin=stdin)
        if follower is not None and follower.restore():
            config = control.config or config
        sims.prune(holder.get("plans", {}))
        if config.https_listeners and options.listen_https is None:
            print(
                f"warning: HTTPS listeners not served ({', '.join(config.https_listeners)}): "
                "give serve --listen-https HOST:PORT to serve them",
                file=sys.stderr,
            )
        # with --workers, each follower listens on a socket of its own in these sockets'
        # SO_REUSEPORT group (runtime/workers.py)
        gateway_sock = _socket(options.listen)
        admin_sock = _socket(options.admin)
        https_sock = _socket(options.listen_https) if options.listen_https is not None else None
        if https_sock is not None:
            control.https_address = https_sock.getsockname()[:2]
        app = gateway_app(config, store, settings)
        holder["app"] = app
        admin_port = admin_sock.getsockname()[1]
        control.listen_address = gateway_sock.getsockname()[:2]
        admin = AdminApp(control, app, options.admin_token)
        admin.metrics_snapshot = metrics_source(
            app, pool, follower.figures if follower is not None else None
        )
        if follower is not None:
            admin.health_details = follower.health
            admin.ready = follower.ready.is_set
        server = make_server(_Dispatch(app, admin, admin_port), settings.connections)
        server.on_stop.append(control.history.close)  # watches end with the server

        async def main() -> None:
            holder["loop"] = asyncio.get_running_loop()
            await store.start()  # an unreachable store stops us here, with its reason
            following = None
            if follower is not None:
                following = background(follower.run(), "follow the Kubernetes API")
                await _first_sync(follower, options.first_sync_seconds)
            tls = {admin_sock: options.admin_tls} if options.admin_tls is not None else {}
            sockets = [gateway_sock, admin_sock]
            if https_sock is not None:
                sockets.append(https_sock)
                tls[https_sock] = sni.context
            task = asyncio.create_task(server.serve(sockets, tls))
            while not server.started and not task.done():
                await asyncio.sleep(0.01)
            watcher = (
                background(control.watch(options.watch_interval), "watch the manifests")
                if options.paths
                else None
            )
            replayer = background(app.limiter.replay_loop(), "replay the missed counts")
            supervisor = None
            if pool is not None and server.started:
                pool.start(gateway_sock, https_sock)  # here: the main thread (see WorkerPool)
                supervisor = background(
                    pool.supervise(lambda: server.should_exit), "supervise the workers"
                )
            if server.started and on_ready is not None:
                on_ready(config, gateway_sock.getsockname()[:2], admin_sock.getsockname()[:2])
            try:
                await task
            finally:
                if following is not None:
                    following.cancel()
                    await follower.close()  # type: ignore[union-attr]
                replayer.cancel()
                if watcher is not None:
                    watcher.cancel()
                if supervisor is not None:
                    supervisor.cancel()
                if pool is not None:
                    pool.terminate()

        # While it serves, the server turns SIGINT/SIGTERM into a graceful stop, and puts
        # these handlers back when it returns. Before and after (loading, stopping), a signal
        # raises Stop here, so that the `finally` below still stops the simulators and
        # workers: the default handlers would kill us first.
        previous = {sig: signal.signal(sig, raise_stop) for sig in (signal.SIGINT, signal.SIGTERM)}
        try:
            run_loop(main())
        except Stop:
            pass
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)
    finally:
        if pool is not None:
            pool.stop()  # before the simulators: followers may still be answering
        sims.stop()


async def _first_sync(follower: Follower, seconds: float) -> None:
    """Serve once the first configuration from the API server is in, or after `seconds`
    with what there is (nothing yet: every route answers 404), still following.

    SIGTERM or SIGINT meanwhile stops at once. The handler that raises Stop cannot be
    trusted here: it raises in whatever code runs when the signal lands, and the follower's
    retry loop, which catches failures to keep trying, would swallow it (a replica that
    could not reach its control plane ignored SIGTERM for the whole wait)."""
    loop = asyncio.get_running_loop()
    stopped: asyncio.Future[bool] = loop.create_future()
    sigs = (signal.SIGINT, signal.SIGTERM)
    handling = threading.current_thread() is threading.main_thread()

    def on_signal() -> None:
        if not stopped.done():
            stopped.set_result(True)

    if handling:
        for sig in sigs:
            loop.add_signal_handler(sig, on_signal)
    ready: asyncio.Future[bool] = asyncio.ensure_future(follower.ready.wait())
    try:
        await asyncio.wait({ready, stopped}, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ready.cancel()
        if handling:
            for sig in sigs:
                loop.remove_signal_handler(sig)
                signal.signal(sig, raise_stop)  # what serve() had installed
    if stopped.done():
        raise Stop(signal.SIGTERM)
    if not follower.ready.is_set():
        print(
            f"warning: no configuration from {follower.server} after {seconds:g}s; "
            "serving without it and still trying",
            file=sys.stderr,
        )


def _socket(where: tuple[str, int] | socket.socket) -> socket.socket:
    return where if isinstance(where, socket.socket) else bind_socket(*where)
