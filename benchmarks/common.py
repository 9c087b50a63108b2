"""Helpers shared by the benchmark scripts: processes on loopback, /proc readings, stats.

Every process is started in its own session (its own process group), registered, and
stopped by `stop_all()` — on success, on failure and on Ctrl-C alike — by its own id only.
"""

from __future__ import annotations

import contextlib
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
#: the model every benchmark asks for, and the chat completion body most of them send
MODEL = "meta-llama/Llama-3.1-8B-Instruct"
CHAT_BODY = json.dumps(
    {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is Kubernetes?"}],
        "max_tokens": 20,
        "stream": False,
    }
).encode()

HOST = "127.0.0.1"
CLK_TCK = os.sysconf("SC_CLK_TCK")

_STARTED: list[Proc] = []


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return int(sock.getsockname()[1])


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile of an already sorted sequence (q in 0..100)."""
    if not sorted_values:
        return float("nan")
    rank = max(1, min(len(sorted_values), round(q / 100 * len(sorted_values) + 0.5)))
    return sorted_values[rank - 1]


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3, "h": 3600e3}


def parse_wrk(text: str) -> dict[str, Any]:
    """requests, seconds, rps, p50..p99 (ms), non-2xx and socket errors from wrk's output."""
    out: dict[str, Any] = {"non2xx": 0, "socket_errors": None}
    for q, value, unit in re.findall(r"^\s+(50|75|90|99)%\s+([\d.]+)(us|ms|s|m|h)\s*$", text, re.M):
        out[f"p{q}_ms"] = float(value) * _UNITS[unit]
    m = re.search(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m|h)", text, re.M)
    if m:
        out["requests"] = int(m.group(1))
        out["seconds"] = float(m.group(2)) * _UNITS[m.group(3)] / 1000
    m = re.search(r"^Requests/sec:\s+([\d.]+)", text, re.M)
    if m:
        out["rps"] = float(m.group(1))
    m = re.search(r"Non-2xx or 3xx responses:\s+(\d+)", text)
    if m:
        out["non2xx"] = int(m.group(1))
    m = re.search(r"Socket errors: (.*)", text)
    if m:
        out["socket_errors"] = m.group(1).strip()
    if "rps" not in out or "requests" not in out:
        raise RuntimeError(f"could not read wrk's output:\n{text}")
    return out


def machine_cpu() -> dict[str, float]:
    """The whole machine's CPU seconds so far, from /proc/stat's first line: `busy` (user,
    nice, system, irq, softirq), `idle` (idle + iowait) and `steal`."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    user, nice, system, idle, iowait, irq, softirq, steal = fields[:8]
    return {
        "busy": (user + nice + system + irq + softirq) / CLK_TCK,
        "idle": (idle + iowait) / CLK_TCK,
        "steal": steal / CLK_TCK,
    }


def cmdline(pid: int) -> list[str]:
    """The command line of a process; [] when it is gone."""
    try:
        raw = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return []
    return [part.decode(errors="replace") for part in raw.split(b"\0") if part]


def children(pid: int) -> list[int]:
    """Every descendant of `pid` (from /proc/*/stat's ppid)."""
    parents: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat[stat.rindex(")") + 2 :].split()[1])
        parents.setdefault(ppid, []).append(int(entry))
    out: list[int] = []
    todo = [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        out += kids
        todo += kids
    return out


def cpu_seconds(pid: int) -> float:
    """utime + stime of one process (its own threads, not its children), in seconds."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # fields 14 and 15 of stat(5)


def _status_kb(pid: int, field: str) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith(field):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def vm_hwm_kb(pid: int) -> int:
    """Peak resident set size (VmHWM) of one process, in KiB; 0 when gone."""
    return _status_kb(pid, "VmHWM:")


def vm_rss_kb(pid: int) -> int:
    """Resident set size now (VmRSS) of one process, in KiB; 0 when gone."""
    return _status_kb(pid, "VmRSS:")


def set_affinity(pid: int, cpus: set[int] | None) -> None:
    """Pin every thread of `pid` (and of its descendants) to `cpus`; None: every CPU."""
    target = cpus or os.sched_getaffinity(0)
    for p in [pid, *children(pid)]:
        try:
            tids = [int(t) for t in os.listdir(f"/proc/{p}/task")]
        except OSError:
            continue
        for tid in tids:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(tid, target)


class Proc:
    """A started process: its own session, output to a log file, stopped by `stop()`."""

    def __init__(
        self,
        name: str,
        cmd: Sequence[str],
        log_dir: Path,
        *,
        cpus: set[int] | None = None,
        env: dict[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.cmd = list(cmd)
        self.log = log_dir / f"{name}.log"
        self._log = open(self.log, "wb")  # noqa: SIM115 - closed in stop()

        def pin() -> None:
            if cpus:
                os.sched_setaffinity(0, cpus)

        self.popen = subprocess.Popen(
            self.cmd,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            preexec_fn=pin,
            env={**os.environ, **(env or {})},
            cwd=cwd,
        )
        self.pid = self.popen.pid
        _STARTED.append(self)

    def alive(self) -> bool:
        return self.popen.poll() is None

    def output(self, tail: int = 3000) -> str:
        self._log.flush()
        try:
            return self.log.read_text(errors="replace")[-tail:]
        except OSError:
            return ""

    def pids(self, tree: bool = False) -> list[int]:
        return [self.pid, *children(self.pid)] if tree else [self.pid]

    def cpu(self, tree: bool = False) -> float:
        return sum(cpu_seconds(p) for p in self.pids(tree))

    def hwm_mb(self, tree: bool = False) -> float:
        return sum(vm_hwm_kb(p) for p in self.pids(tree)) / 1024

    def rss_mb(self, tree: bool = False) -> float:
        return sum(vm_rss_kb(p) for p in self.pids(tree)) / 1024

    def pin(self, cpus: set[int] | None) -> None:
        set_affinity(self.pid, cpus)

    def stop(self, timeout: float = 10) -> None:
        if self.popen.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, signal.SIGTERM)  # the group we made: this process's own
            try:
                self.popen.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(timeout=5)
        else:  # the leader is gone; stop what it may have left in its group
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.pid, signal.SIGKILL)
        self._log.close()
        if self in _STARTED:
            _STARTED.remove(self)


def stop_all() -> None:
    """Stop every process started here, newest first."""
    for proc in reversed(list(_STARTED)):
        with contextlib.suppress(Exception):
            proc.stop()


def http_get(port: int, path: str = "/", host: str | None = None, timeout: float = 2) -> bytes:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("GET", path, headers={"Host": host} if host else {})
        return conn.getresponse().read()
    finally:
        conn.close()


def http_post(
    port: int, path: str, body: bytes, headers: dict[str, str], timeout: float = 10
) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(HOST, port, timeout=timeout)
    try:
        conn.request("POST", path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def wait_http(proc: Proc, port: int, path: str = "/", timeout: float = 30) -> None:
    """Until `port` answers any HTTP response; raises with the process's log otherwise."""
    deadline = time.monotonic() + timeout
    while True:
        if not proc.alive():
            raise RuntimeError(f"{proc.name} exited {proc.popen.returncode}: {proc.output()}")
        try:
            http_get(port, path, timeout=1)
            return
        except (OSError, http.client.HTTPException):
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{proc.name} did not answer on port {port} in {timeout:.0f}s: {proc.output()}"
                ) from None
            time.sleep(0.05)


class Redis:
    """A redis-server on a free loopback port persisting nothing, in a temp dir."""

    def __init__(self, log_dir: Path, cpus: set[int] | None = None) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server not found (benchmarks/setup.sh installs it)")
        self.dir = Path(tempfile.mkdtemp(prefix="bench-redis-"))
        self.port = free_port()
        cmd = [binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly"]
        cmd += ["no", "--dir", str(self.dir), "--protected-mode", "no", "--daemonize", "no"]
        self.proc = Proc(f"redis-{self.port}", cmd, log_dir, cpus=cpus)
        deadline = time.monotonic() + 10
        while not self.ping():
            if not self.proc.alive() or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"redis-server did not start: {self.proc.output()}")
            time.sleep(0.02)

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def ping(self) -> bool:
        try:
            with socket.create_connection((HOST, self.port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                return sock.recv(64).startswith(b"+PONG")
        except OSError:
            return False

    def flush(self) -> None:
        with socket.create_connection((HOST, self.port), timeout=2) as sock:
            sock.sendall(b"FLUSHALL\r\n")
            sock.recv(64)

    def stop(self) -> None:
        self.proc.stop()
        shutil.rmtree(self.dir, ignore_errors=True)
