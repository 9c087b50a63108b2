"""Built-in OpenAI-compatible LLM simulator, a stand-in for llm-d-inference-sim.

The tutorial's Deployment runs `ghcr.io/llm-d/llm-d-inference-sim`; this package serves the same
API from the same `args`, so the whole tutorial runs on one machine without containers.
"""

from __future__ import annotations

import os
import signal
import socket
import threading
from types import FrameType

import uvicorn

from tokengateway.simulator.app import build_app
from tokengateway.simulator.faults import FAULT_HEADER, FaultError, Faults, parse_faults
from tokengateway.simulator.options import SimOptions, parse_sim_args

__all__ = [
    "FAULT_HEADER",
    "FaultError",
    "Faults",
    "SimOptions",
    "build_app",
    "create_server",
    "parse_faults",
    "parse_sim_args",
    "run_simulator",
]

#: Seconds in-flight responses (long streams) get to finish after SIGTERM/SIGINT.
GRACEFUL_SHUTDOWN_S = 3


class _SocketServer(uvicorn.Server):
    """A uvicorn server that serves an inherited listening socket.

    uvicorn's own `Config(fd=...)` wraps the descriptor as an AF_UNIX socket whatever it
    really is, so uvloop never sets TCP_NODELAY on the accepted TCP connections: every
    response (headers and body are two writes) then stalls ~40 ms on delayed ACKs.
    Wrapping the descriptor with its real family avoids that.
    """

    def __init__(self, config: uvicorn.Config, fd: int) -> None:
        super().__init__(config)
        self._fd = fd

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        if sockets is None:
            # A duplicate, so that uvicorn closing it on shutdown leaves the caller's fd open.
            sockets = [socket.socket(fileno=os.dup(self._fd))]
        await super().serve(sockets=sockets)


def create_server(opts: SimOptions, fd: int | None = None) -> uvicorn.Server:
    """A configured, not yet started uvicorn server for the simulator.

    Binds `opts.host:opts.port` when started, or serves the already-bound, listening socket
    `fd` (the caller keeps ownership of it). Start it with `server.run()` or, inside a running
    event loop, `await server.serve()`; set `server.should_exit = True` to stop it.
    """
    config = uvicorn.Config(
        build_app(opts),
        host=opts.host,
        port=opts.port,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=GRACEFUL_SHUTDOWN_S,
    )
    return uvicorn.Server(config) if fd is None else _SocketServer(config, fd)


def _ignore_signal(signum: int, frame: FrameType | None) -> None:
    """Stand-in handler while uvicorn re-raises the signal that stopped it."""


def run_simulator(opts: SimOptions, fd: int | None = None) -> None:
    """Serve the simulator until SIGTERM or SIGINT, then return normally.

    Binds `opts.host:opts.port`, or serves the already-bound, listening socket `fd`, which
    lets a parent choose a free port without a race. Blocks.
    """
    server = create_server(opts, fd)
    if threading.current_thread() is not threading.main_thread():
        server.run()  # uvicorn installs no signal handlers off the main thread
        return
    # uvicorn shuts down gracefully on these signals, then re-raises the signal with the handler
    # it found installed; a no-op one turns that into a normal return (no KeyboardInterrupt, no
    # death by SIGTERM), so callers can clean up and exit 0.
    handled = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, _ignore_signal) for sig in handled}
    try:
        server.run()
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
