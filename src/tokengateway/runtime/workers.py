"""`serve --workers N`: N processes serve one address and enforce one limit.

The process `serve` starts, the *leader*, is the single-process gateway unchanged: control
plane, watched files, admin API, simulators, and it serves gateway traffic too. It starts
N-1 *followers* (`python -m tokengateway.runtime.workers`) and hands each, by file
descriptor:

* a listen socket of its own, bound to the leader's address with SO_REUSEPORT (set on the
  leader's socket too, which Linux accepts after its bind): the kernel spreads new
  connections over the processes by their addresses' hash. One shared socket, accepted on
  by every process, let the first process awake take every connection of a burst (libuv
  accepts until the backlog is empty): with 32 keep-alive connections opened at once, one
  worker served them all and the other idled, in most runs. When the kernel refuses the
  group (no SO_REUSEPORT, a Unix socket), the follower shares the leader's socket as
  before. A follower that dies takes the connections waiting in its own backlog with it
  (they are reset); its replacement joins with a new socket;
* with `--listen-https`, an HTTPS socket too, joined the same way. Each follower
  serves TLS on it with its own `SniListener` (http/tls.py), fed the certificates of every
  configuration it compiles, so a rotated certificate reaches every worker's next
  handshake once the follower has confirmed that configuration (below);
* one end of a socketpair, the *channel*. The leader first sends the `WorkerSettings`
  (runtime/process.py: store URI, `--on-storage-error`, `--access-log`, body and connection
  limits, ...) it serves with itself, then, each time it publishes a configuration, the
  documents that configuration was compiled from and the backend URLs it resolved (simulators
  run in the leader only). The follower compiles the same `CompiledConfig`, swaps it in with
  one assignment (as the leader does), and answers with the message's generation number.
  The leader's publish waits (bounded by `ACK_TIMEOUT`) until every live follower answered,
  so when `apply` returns or a file reload is logged, every worker enforces the change.

Messages, both ways, are a 4-byte length and a pickle: of plain data (dicts, lists, strings,
numbers), the documents exactly as the leader's YAML loader produced them, which JSON could
not always carry unchanged (a YAML mapping may have integer keys); and of the settings, a
frozen dataclass of the same code. The channel is a private socketpair between the leader and
a child it started from the same code; nothing else can write to it. After the settings, each
message is a dict with a `type`:

* leader to follower: `config` (`generation`, `documents`, `backends`) and `metrics` (`id`);
* follower to leader: `ack` (`generation`) and `metrics` (the request's `id`, `snapshot`).

A reply names what it answers (a generation, a request id), so a publish and a scrape in
flight at once cannot take each other's answers, and an answer that comes too late is
dropped. `/metrics` on the leader (`WorkerPool.snapshots`) asks every serving follower for
a snapshot of its metrics (observability/metrics.py); the follower takes it on its event
loop (a copy of a few dicts) and its writer thread sends it, so its requests never wait. The
leader waits `METRICS_TIMEOUT` at most and sums what came; the followers that did not answer
are counted in `tokengateway_workers_unreported`.

Followers have no control plane, admin API, file watcher nor simulators; they run the
limiter's replay loop. Their counters are shared through the store, so only stores that
several processes share (Redis) are accepted (`storage_problem`); removing the counters of
deleted limits (`store.retain`) is left to the leader.

Stopping: SIGINT/SIGTERM to the leader stops its server and sends SIGTERM to every follower;
each finishes its requests as the leader does, and the leader waits for them. A leader that
dies outright takes them along: PR_SET_PDEATHSIG (Linux) and, anywhere, the channel's end of
file. A follower that exits while the leader serves is logged and started again after 1 s;
one that keeps dying soon after its start waits twice as long each time, up to 30 s.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import pickle
import queue
import signal
import socket
import ssl
import struct
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping
from typing import Any

from tokengateway.config.compile import CompiledConfig, compile_config
from tokengateway.http.tls import SniListener
from tokengateway.observability.metrics import Snapshot, process_snapshot
from tokengateway.resources import Document, parse_resources
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
from tokengateway.storage import SCHEMES, open_store

__all__ = ["SHARED_SCHEMES", "WorkerPool", "storage_problem"]

log = logging.getLogger("tokengateway.workers")

#: counter stores several processes share: every Redis form (server, TLS, Cluster, Sentinel)
SHARED_SCHEMES = tuple(s for s in SCHEMES if s.startswith("redis"))
#: how long a publish waits for the followers to confirm the new configuration
ACK_TIMEOUT = 10.0
#: how long a scrape of the leader's /metrics waits for the followers' snapshots
METRICS_TIMEOUT = 1.0
#: a follower that ran this long before exiting is restarted after the shortest delay
STABLE_AFTER = 30.0
RESTART_DELAY_MIN = 1.0
RESTART_DELAY_MAX = 30.0

_LENGTH = struct.Struct("!I")


def storage_problem(uri: str, workers: int) -> str | None:
    """Why `--workers` cannot run on this store, in one line; None when it can."""
    scheme = uri.partition("://")[0].lower()
    if workers <= 1 or scheme in SHARED_SCHEMES:
        return None
    if scheme == "memory":
        why = (
            "with memory:// each worker process would keep its own counters "
            f"and let through up to {workers} times the limit"
        )
    elif scheme == "sqlite":
        why = "a sqlite:// file is held by one process"
    else:
        why = f"{scheme}:// is not a store several processes share"
    return (
        f"--workers {workers} needs a counter store shared by the workers: {why}; "
        "use --storage redis://HOST:PORT/DB"
    )


# --- the channel --------------------------------------------------------------------------


def _frame(message: Any) -> bytes:
    blob = pickle.dumps(message, protocol=pickle.HIGHEST_PROTOCOL)
    return _LENGTH.pack(len(blob)) + blob


def _sibling(sock: socket.socket | None) -> socket.socket | None:
    """A new listening socket on `sock`'s address in its SO_REUSEPORT group, or None when
    the kernel refuses one (then the follower shares `sock` itself)."""
    if sock is None or not hasattr(socket, "SO_REUSEPORT") or sock.family == socket.AF_UNIX:
        return None
    sibling = socket.socket(sock.family, socket.SOCK_STREAM)
    try:
        # a socket handed to `serve` already bound (`--fd`) joins too: Linux forms the
        # group when the second socket binds
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sibling.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sibling.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sibling.bind(sock.getsockname())
        sibling.listen(2048)
    except OSError:
        sibling.close()
        return None
    sibling.set_inheritable(True)
    return sibling


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    """`size` bytes, or None at end of file (or a broken channel)."""
    chunks = []
    while size:
        try:
            chunk = sock.recv(min(size, 1 << 20))
        except OSError:
            return None
        if not chunk:
            return None
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


def _receive(sock: socket.socket) -> Any:
    head = _read_exactly(sock, _LENGTH.size)
    if head is None:
        return None
    blob = _read_exactly(sock, _LENGTH.unpack(head)[0])
    return None if blob is None else pickle.loads(blob)  # our own child: trusted


def config_message(config: CompiledConfig, backends: Mapping[str, str]) -> dict[str, Any]:
    """What a follower needs to compile `config` again: its documents and backend URLs."""
    return {
        "documents": [(r.source, r.raw) for r in config.resources],
        "backends": dict(backends),
    }


def compile_message(
    message: Mapping[str, Any], previous: CompiledConfig | None = None, https: bool = False
) -> CompiledConfig:
    """The leader's configuration, compiled again. `https` is whether HTTPS listeners are
    served, as in the leader: a follower is given the HTTPS socket exactly when the leader
    serves one."""
    resources = parse_resources([Document(s, d) for s, d in message["documents"]])
    return compile_config(resources, message["backends"], previous=previous, https=https)


# --- the leader's side --------------------------------------------------------------------


class _Follower:
    def __init__(self, number: int, proc: subprocess.Popen[bytes], channel: socket.socket):
        self.number = number  # the leader is worker 1
        self.proc = proc
        self.channel = channel
        self.started = time.monotonic()
        self.acked = 0  # the last generation it confirmed; > 0 once it serves
        self.connected = True  # False once its channel ended
        self.outbox: queue.SimpleQueue[bytes | None] = queue.SimpleQueue()

    @property
    def serving(self) -> bool:
        return self.connected and self.acked > 0 and self.proc.poll() is None


class WorkerPool:
    """The leader's followers: started, kept up to date, restarted, stopped.

    Spawn and restart from the main thread only: PR_SET_PDEATHSIG fires when the *thread*
    that started the child ends, not the process."""

    def __init__(self, followers: int, settings: WorkerSettings) -> None:
        self.followers = followers
        self._settings = _frame(settings)
        self._cond = threading.Condition()
        self._generation = 0
        self._latest: bytes | None = None
        self._running: dict[int, _Follower] = {}
        self._delays: dict[int, float] = {}
        self._sock: socket.socket | None = None
        self._https: socket.socket | None = None
        self.stopping = False
        # metrics requests in flight: id -> where the reader threads hand each answer
        self._replies = threading.Lock()
        self._request = 0
        self._waiting: dict[int, Callable[[int, Snapshot], None]] = {}

    def publish(self, config: CompiledConfig, backends: Mapping[str, str]) -> None:
        """Send a new configuration to every follower and wait until each live one serves it
        (any thread; the control plane calls it from worker threads)."""
        with self._cond:
            self._generation += 1
            generation = self._generation
            message = {"type": "config", "generation": generation}
            self._latest = _frame({**message, **config_message(config, backends)})
            for follower in self._running.values():
                follower.outbox.put(self._latest)
            deadline = time.monotonic() + ACK_TIMEOUT
            while True:
                behind = [
                    f
                    for f in self._running.values()
                    if f.connected and f.acked < generation and not self.stopping
                ]
                if not behind:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    log.warning(
                        "worker %s did not confirm the new configuration within %gs",
                        ", ".join(str(f.number) for f in behind),
                        ACK_TIMEOUT,
                    )
                    return
                self._cond.wait(left)

    async def snapshots(self, timeout: float = METRICS_TIMEOUT) -> tuple[list[Snapshot], int]:
        """Every serving follower's metrics (metrics.process_snapshot): (the snapshots that
        came within `timeout`, how many serving followers did not answer). On the leader's
        event loop; it never waits for a publish in progress."""
        loop = asyncio.get_running_loop()
        answers: asyncio.Queue[tuple[int, Snapshot]] = asyncio.Queue()

        def deliver(number: int, snapshot: Snapshot) -> None:  # in a reader thread
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                loop.call_soon_threadsafe(answers.put_nowait, (number, snapshot))

        # _running changes on this loop only (start, supervise): no lock to read it
        asked = [f for f in self._running.values() if f.serving and not self.stopping]
        if not asked:
            return [], 0
        with self._replies:
            self._request += 1
            request = self._request
            self._waiting[request] = deliver
        try:
            frame = _frame({"type": "metrics", "id": request})
            for follower in asked:
                follower.outbox.put(frame)
            got: dict[int, Snapshot] = {}
            deadline = loop.time() + timeout
            while len(got) < len(asked):
                left = deadline - loop.time()
                if left <= 0:
                    break
                try:
                    number, snapshot = await asyncio.wait_for(answers.get(), left)
                except TimeoutError:
                    break
                got[number] = snapshot
        finally:
            with self._replies:
                del self._waiting[request]
        missing = [f.number for f in asked if f.number not in got]
        if missing:
            log.warning(
                "worker %s sent no metrics within %gs; /metrics leaves them out",
                ", ".join(map(str, missing)),
                timeout,
            )
        return list(got.values()), len(missing)

    def start(self, sock: socket.socket, https: socket.socket | None = None) -> None:
        """Start every follower on the leader's listen socket, and on its HTTPS socket when
        it serves one (main thread)."""
        self._sock = sock
        self._https = https
        for number in range(2, self.followers + 2):
            self._spawn(number)

    def _spawn(self, number: int) -> None:
        assert self._sock is not None
        ours, theirs = socket.socketpair()
        listen, https = _sibling(self._sock), _sibling(self._https)
        own = [s for s in (listen, https) if s is not None]
        listen_fd = (listen or self._sock).fileno()
        cmd = [sys.executable, "-m", "tokengateway.runtime.workers"]
        cmd += [str(listen_fd), str(theirs.fileno()), f"{number}/{self.followers + 1}"]
        fds = [listen_fd, theirs.fileno()]
        if self._https is not None:
            https_fd = (https or self._https).fileno()
            cmd.append(str(https_fd))
            fds.append(https_fd)
        try:
            proc = subprocess.Popen(
                cmd,
                pass_fds=fds,
                stdin=subprocess.DEVNULL,
                preexec_fn=die_with_parent,
            )
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()  # so that its end of file reaches us when the follower ends
            for sock in own:  # the follower's now: a dead one's must leave the group
                sock.close()
        follower = _Follower(number, proc, ours)
        with self._cond:
            follower.outbox.put(self._settings)
            if self._latest is not None:
                follower.outbox.put(self._latest)
            self._running[number] = follower
        threading.Thread(
            target=self._send_loop, args=(follower,), name=f"worker-{number}-send", daemon=True
        ).start()
        threading.Thread(
            target=self._read_loop, args=(follower,), name=f"worker-{number}-read", daemon=True
        ).start()

    @staticmethod
    def _send_loop(follower: _Follower) -> None:
        while True:
            frame = follower.outbox.get()
            if frame is None:
                return
            try:
                follower.channel.sendall(frame)
            except OSError:
                return  # the follower is gone; the supervisor starts it again

    def _read_loop(self, follower: _Follower) -> None:
        """The follower's messages: confirmations of configurations, metrics snapshots."""
        while True:
            try:
                message = _receive(follower.channel)
            except Exception:  # not our framing: end the channel, the follower stops
                log.exception("worker %d: unreadable message; closing its channel", follower.number)
                with contextlib.suppress(OSError):
                    follower.channel.shutdown(socket.SHUT_RDWR)
                message = None
            kind = message.get("type") if isinstance(message, dict) else None
            if kind == "metrics":
                with self._replies:
                    deliver = self._waiting.get(message["id"])
                if deliver is not None:  # else asked by a scrape that gave up waiting
                    deliver(follower.number, message["snapshot"])
                continue
            with self._cond:
                if message is None:
                    follower.connected = False
                elif kind == "ack":
                    follower.acked = max(follower.acked, message["generation"])
                self._cond.notify_all()
            if message is None:
                return

    async def supervise(self, stopping: Callable[[], bool], interval: float = 0.2) -> None:
        """Start again the followers that exit while the leader serves; once `stopping()`,
        ask every follower to stop (they finish their requests while the leader finishes
        its own) and return."""
        restart_at: dict[int, float] = {}
        while not stopping():
            await asyncio.sleep(interval)
            now = time.monotonic()
            for number, follower in list(self._running.items()):
                code = follower.proc.poll()
                if code is None or stopping():
                    continue
                if number not in restart_at:
                    previous = self._delays.get(number)
                    quick = now - follower.started < STABLE_AFTER
                    delay = (
                        min(previous * 2, RESTART_DELAY_MAX)
                        if quick and previous
                        else RESTART_DELAY_MIN
                    )
                    self._delays[number] = delay
                    restart_at[number] = now + delay
                    log.error(
                        "worker %d (pid %d) %s; starting it again in %gs",
                        number,
                        follower.proc.pid,
                        _how_it_ended(code),
                        delay,
                    )
                elif now >= restart_at[number]:
                    del restart_at[number]
                    self._retire(follower)
                    try:
                        self._spawn(number)
                    except OSError as exc:
                        log.error("worker %d could not be started: %s", number, exc)
                        restart_at[number] = now + self._delays[number]
        self.terminate()

    def _retire(self, follower: _Follower) -> None:
        follower.outbox.put(None)
        with contextlib.suppress(OSError):
            follower.channel.shutdown(socket.SHUT_RDWR)
        follower.channel.close()

    def terminate(self) -> None:
        """SIGTERM to every follower still running; does not wait."""
        with self._cond:
            self.stopping = True
            self._cond.notify_all()
        for follower in self._running.values():
            if follower.proc.poll() is None:
                follower.proc.send_signal(signal.SIGTERM)

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every follower: SIGTERM, then SIGKILL for those still there after `timeout`."""
        self.terminate()
        deadline = time.monotonic() + timeout
        for follower in self._running.values():
            try:
                follower.proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.error("worker %d did not stop within %gs: killed", follower.number, timeout)
                follower.proc.kill()
                follower.proc.wait()
            self._retire(follower)


def _how_it_ended(code: int) -> str:
    if code < 0:
        with contextlib.suppress(ValueError):
            return f"was killed by {signal.Signals(-code).name}"
    return f"exited with code {code}"


# --- the follower's side ------------------------------------------------------------------


def run_follower(listen_fd: int, channel_fd: int, name: str, https_fd: int | None = None) -> int:
    """Serve gateway traffic on the inherited socket (and TLS on the inherited HTTPS socket,
    when given) with the configurations the leader sends, until SIGTERM/SIGINT or the
    leader's end; the exit code."""
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, raise_stop)
    channel = socket.socket(fileno=channel_fd)
    failed: list[str] = []
    try:
        settings = _receive(channel)
        first = _receive(channel)
        if settings is None or first is None:
            return 0  # the leader ended before we started
        if not isinstance(settings, WorkerSettings):
            raise TypeError(f"the leader's first message is not WorkerSettings: {settings!r}")
        https = https_fd is not None
        config = compile_message(first, https=https)
        store = open_store(settings.storage)
        app = gateway_app(config, store, settings)
        server = make_server(app, settings.connections)
        sockets = [socket.socket(fileno=listen_fd)]
        sni = SniListener(config.certificates)
        tls: dict[socket.socket, ssl.SSLContext] = {}
        if https_fd is not None:
            sockets.append(socket.socket(fileno=https_fd))
            tls[sockets[-1]] = sni.context

        def stop(reason: str | None = None) -> None:
            if reason is not None:
                failed.append(reason)
            server.should_exit = True

        # what goes to the leader: one writer thread, so that frames never interleave and
        # the event loop never waits on the socket
        outbox: queue.SimpleQueue[dict[str, Any] | None] = queue.SimpleQueue()

        def write() -> None:
            while True:
                message = outbox.get()
                if message is None:
                    return
                try:
                    channel.sendall(_frame(message))
                except OSError:
                    return  # the leader is gone: `follow` sees the end of file and stops us

        def answer_metrics(request: int) -> None:
            """On the event loop, where the figures change: copy them, hand them over."""
            snapshot = process_snapshot(app)
            outbox.put({"type": "metrics", "id": request, "snapshot": snapshot})

        def follow(loop: asyncio.AbstractEventLoop) -> None:
            """The leader's messages, until its end: compile, swap, confirm; snapshots."""
            while True:
                message = _receive(channel)
                if message is None:
                    break
                if message.get("type") == "metrics":
                    try:
                        loop.call_soon_threadsafe(answer_metrics, message["id"])
                    except RuntimeError:  # the loop is closed: we are stopping
                        break
                    continue
                try:
                    new = compile_message(message, previous=app.config, https=https)
                except Exception as exc:  # never serve a configuration the leader does not
                    log.exception("worker %s: cannot build the leader's configuration", name)
                    loop.call_soon_threadsafe(stop, f"configuration refused: {exc}")
                    return
                sni.swap(new.certificates)  # before the ack: `apply` returns after it
                app.swap(new, loop)
                outbox.put({"type": "ack", "generation": message["generation"]})
            with contextlib.suppress(RuntimeError):  # the loop may be closed already
                loop.call_soon_threadsafe(stop)

        async def main() -> None:
            await store.start()  # an unreachable store stops us here, with its reason
            task = asyncio.create_task(server.serve(sockets, tls))
            while not server.started and not task.done():
                await asyncio.sleep(0.01)
            replayer = background(app.limiter.replay_loop(), "replay the missed counts")
            if server.started:
                threading.Thread(target=write, name="leader-write", daemon=True).start()
                outbox.put({"type": "ack", "generation": first["generation"]})
                threading.Thread(
                    target=follow, args=(asyncio.get_running_loop(),), daemon=True
                ).start()
                print(f"worker {name} (pid {os.getpid()}) serving", file=sys.stderr, flush=True)
            try:
                await task
            finally:
                replayer.cancel()
                outbox.put(None)

        run_loop(main())
    except Stop:
        pass
    except Exception as exc:
        print(f"error: worker {name}: {exc}", file=sys.stderr, flush=True)
        return 1
    if failed:
        print(f"error: worker {name}: {failed[0]}", file=sys.stderr, flush=True)
        return 1
    return 0


if (
    __name__ == "__main__"
):  # the leader starts: python -m ... LISTEN_FD CHANNEL_FD N/TOTAL [HTTPS_FD]
    https_fd = int(sys.argv[4]) if len(sys.argv) > 4 else None
    sys.exit(run_follower(int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], https_fd))
