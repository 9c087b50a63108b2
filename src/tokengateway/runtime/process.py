"""What every gateway process does the same way, the leader (`serve.py`) and its `--workers`
followers (`workers.py`): build the data path, serve it, run the event loop, stop on a
signal, die with its parent, run tasks beside the server."""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any

from tokengateway.config.compile import CompiledConfig
from tokengateway.dataplane.app import DEFAULT_MAX_BODY, RESERVATION_CLAMPS, GatewayApp
from tokengateway.dataplane.errors import http_error_body
from tokengateway.http.client import DEFAULT_LIMITS, Upstream, UpstreamLimits
from tokengateway.http.server import ConnectionLimits, Server, raise_open_file_limit
from tokengateway.limits import OnError
from tokengateway.observability.accesslog import AccessLog
from tokengateway.storage import CounterStore

__all__ = [
    "Stop",
    "WorkerSettings",
    "background",
    "die_with_parent",
    "gateway_app",
    "make_server",
    "raise_stop",
    "run_loop",
]

log = logging.getLogger("tokengateway.runtime")

#: every task `background` started, until it ends
_BACKGROUND: set[asyncio.Task[Any]] = set()


def background(coro: Coroutine[Any, Any, Any], name: str) -> asyncio.Task[Any]:
    """Run `coro` beside the server, on the running loop, in a task named `name`.

    The task is held until it ends (the event loop keeps only weak references to tasks: one
    nobody holds may be collected half way), and its failure is logged as it happens, not
    whenever someone asks for its result (perhaps never). Cancel it to stop it: a cancelled
    task is not logged."""
    task = asyncio.get_running_loop().create_task(coro, name=name)
    _BACKGROUND.add(task)
    task.add_done_callback(_ended)
    return task


def _ended(task: asyncio.Task[Any]) -> None:
    _BACKGROUND.discard(task)
    if not task.cancelled():
        exc = task.exception()
        if exc is not None:
            log.error("%s failed", task.get_name(), exc_info=exc)


def die_with_parent() -> None:
    """In the child: get SIGTERM when the gateway dies, even by SIGKILL (Linux only)."""
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


class Stop(Exception):
    """Raised by our signal handlers so that `finally` blocks (simulators) run."""


def raise_stop(signum: int, frame: Any) -> None:
    raise Stop(signum)


def run_loop(coro: Any) -> None:
    """uvloop when present: on the default loop every response waited ~40 ms for a delayed
    ACK (measured: 44 ms vs 0.3 ms per request on loopback)."""
    try:
        import uvloop
    except ImportError:  # pragma: no cover - uvloop is a dependency off Windows
        asyncio.run(coro)
    else:
        uvloop.run(coro)


@dataclass(frozen=True, slots=True)
class WorkerSettings:
    """How every gateway process serves: the leader (worker 1) and its `--workers`
    followers alike. The leader makes it from its options (`ServeOptions.worker_settings`,
    runtime/serve.py) and sends it, pickled, as the first message on each follower's channel
    (runtime/workers.py)."""

    #: the counter store's URI; with followers, one they all share (`storage_problem`)
    storage: str = "memory://"
    #: what a request gets while the store cannot be reached (`--on-storage-error`)
    on_storage_error: OnError = "allow"
    #: one JSON line per request on stdout
    access_log: bool = True
    #: request bodies over this many bytes are answered 413
    max_body_bytes: int = DEFAULT_MAX_BODY
    #: the largest hold of a reservation (fraction of a counter's limit) and its longest life
    reservation_clamps: tuple[float, float] = RESERVATION_CLAMPS
    #: timeouts and caps at the connection level (http/server.py)
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)
    #: what the upstream client holds: connections per backend, keep-alive, answer size
    upstream: UpstreamLimits = DEFAULT_LIMITS


def gateway_app(
    config: CompiledConfig, store: CounterStore, settings: WorkerSettings
) -> GatewayApp:
    """The data path, as every gateway process builds it (the leader and `--workers`
    followers)."""
    return GatewayApp(
        config,
        store,
        upstream=Upstream(**dataclasses.asdict(settings.upstream)),
        max_body_bytes=settings.max_body_bytes,
        access_log=AccessLog() if settings.access_log else None,
        on_storage_error=settings.on_storage_error,
        reservation_clamps=settings.reservation_clamps,
    )


def make_server(app: Any, limits: ConnectionLimits | None = None) -> Server:
    """How every gateway process serves (the leader and `--workers` followers): our HTTP
    server (http/server.py), which bounds what each client holds, its own answers in OpenAI's
    error envelope. Also raises the process's open-file limit to fit
    `limits.max_connections`."""
    limits = limits or ConnectionLimits()
    raise_open_file_limit(limits.max_connections)
    return Server(app, limits, error_body=http_error_body)
