"""The benchmark suite behind `make bench` (docs/benchmarks.md).

The gateway on the tutorial's full policy path, against the upstream alone, a bare
pass-through proxy on the same stack, and the LiteLLM proxy; beside it, in the same run, the
other paths (HTTPS, JWT, a follower of a control plane), the server's fixed-429 floor and
the counters in Redis (redis:// and redis+cached://, 1 and 2 workers).

    .venv/bin/python benchmarks/bench.py [--no-litellm] [--no-micro] [--no-profile]
        [--duration 6] [--warmup 2] [--connections 32] [--rate 1000] [--no-pin]
        [--only GROUP,...] [--flush-period 0.1]

Prints a Markdown table and writes it to benchmarks/results/latest.md (and everything
measured to latest.json). Loopback only; every process started here is stopped at the end,
also on Ctrl-C or failure. See docs/benchmarks.md for what each figure means.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import datetime as dt
import functools
import http.client
import json
import os
import platform
import re
import resource
import shutil
import signal
import ssl
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (
    BENCH,
    CHAT_BODY,
    HOST,
    MODEL,
    ROOT,
    Proc,
    Redis,
    cmdline,
    cpu_seconds,
    free_port,
    http_get,
    http_post,
    machine_cpu,
    parse_wrk,
    stop_all,
    wait_http,
)

PY = sys.executable
TUTORIAL = ROOT / "src" / "tokengateway" / "tutorial"
SERVICE = "trlp-tutorial-llm-sim"  # the tutorial's Service, reached through --backend
ROUTE_NS = "default/trlp-tutorial-llm-sim"  # the route, also the counters' namespace
GW_HOST = "trlp-tutorial.example.com"
GOLD = "APIKEY iamagolduser"
LITELLM_KEY = "sk-bench-gold"
LITELLM_VENV = BENCH / ".litellm-venv"
LITELLM_LOCK = BENCH / "litellm.lock"
LITELLM_STAMP = LITELLM_VENV / "installed.lock"
TOKENS_PER_ANSWER = 13  # the fixed upstream's usage.total_tokens
HIGH_LIMIT = 10**12  # tokens per hour: never reached in a run
CHAT_PATH = "/v1/chat/completions"


# --- results -----------------------------------------------------------------------------------


@dataclass
class Row:
    group: str
    name: str
    rps: float | None = None
    p50_ms: float | None = None
    p99_ms: float | None = None
    cpu_ms: float | None = None  # the system under test, per request
    upstream_cpu_ms: float | None = None
    rss_mb: float | None = None  # the system under test's peak (VmHWM)
    notes: list[str] = field(default_factory=list)
    error: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Results:
    rows: list[Row] = field(default_factory=list)
    ttfb: dict[str, dict[str, Any]] = field(default_factory=dict)
    micro: list[dict[str, Any]] = field(default_factory=list)
    micro_note: str = ""
    profile: list[tuple[str, float]] = field(default_factory=list)
    profile_note: str = ""
    meta: dict[str, Any] = field(default_factory=dict)

    def row(self, name: str) -> Row | None:
        for r in self.rows:
            if r.name == name and r.error is None:
                return r
        return None


# --- helpers -----------------------------------------------------------------------------------


def log(message: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def write_manifests(folder: Path, replace: dict[str, str]) -> Path:
    """A copy of the tutorial's manifests with text replaced (as tests/conftest.py does)."""
    folder.mkdir(parents=True, exist_ok=True)
    for src in sorted(TUTORIAL.glob("*.yaml")):
        text = src.read_text()
        for old, new in replace.items():
            text = text.replace(old, new)
        (folder / src.name).write_text(text)
    return folder


#: the scenario groups `--only` picks from, in the order they run
GROUPS = (
    "nonstream", "stream", "tls", "jwt", "follower", "rate", "ttfb", "429", "floor", "storage",
    "litellm", "micro",
)  # fmt: skip
#: the groups that need the memory:// gateway's API-key row (the base of their ratios)
MEMORY_GATEWAY_GROUPS = ("nonstream", "stream", "tls", "jwt", "follower", "rate", "ttfb", "storage")
GW_ROW = "gateway, tutorial policies, memory://"
HTTPS_ROW = "gateway, tutorial policies, memory://, over HTTPS (keep-alive)"
FOLLOWER_ROW = "gateway, tutorial policies, memory://, follower of a control plane"
FLOOR_ROW = "server alone, fixed 429 (gateway's server)"
REFUSED_ROW = "gateway, limit spent: every request refused"
REDIS_1 = "gateway, redis://, 1 worker"
REDIS_2 = "gateway, redis://, 2 workers"
CACHED_1 = "gateway, redis+cached://, 1 worker"
CACHED_2 = "gateway, redis+cached://, 2 workers"
HTTPS_LISTENER = (
    "  - name: https\n    protocol: HTTPS\n    port: 443\n"
    "    tls: {mode: Terminate, certificateRefs: [{name: bench-cert}]}\n"
    "    allowedRoutes: {namespaces: {from: All}}\n"
)


def tls_secret(folder: Path) -> str:
    """A `kubernetes.io/tls` Secret with a self-signed P-256 certificate for the host."""
    folder.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "2", "-subj", f"/CN={GW_HOST}",
            "-addext", f"subjectAltName=DNS:{GW_HOST}",
            "-keyout", str(folder / "tls.key"), "-out", str(folder / "tls.crt"),
        ],
        check=True,
        capture_output=True,
    )  # fmt: skip
    data = {
        name: base64.b64encode((folder / name).read_bytes()).decode()
        for name in ("tls.crt", "tls.key")
    }
    doc = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "bench-cert", "namespace": "gateway-system"},
        "type": "kubernetes.io/tls",
        "data": data,
    }
    return json.dumps(doc) + "\n"


JWT_ROW = "gateway, tutorial policies, memory://, JWT identity (RS256)"


def jwt_identity(folder: Path) -> str:
    """A new RSA key's JWKS written to `folder/jwks.json`, and a gold user's token signed
    with the key (valid a day)."""
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.asymmetric import padding, rsa

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    def uint(n: int) -> str:
        return b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))

    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    public = key.public_key().public_numbers()
    folder.mkdir(parents=True, exist_ok=True)
    jwk = {"kty": "RSA", "kid": "bench", "alg": "RS256", "use": "sig"}
    keys = [{**jwk, "n": uint(public.n), "e": uint(public.e)}]
    (folder / "jwks.json").write_text(json.dumps({"keys": keys}))
    header = b64(json.dumps({"alg": "RS256", "kid": "bench", "typ": "JWT"}).encode())
    claims = {"sub": "bench-gold-user", "groups": "gold", "exp": int(time.time()) + 86400}
    signing = f"{header}.{b64(json.dumps(claims).encode())}"
    signature = key.sign(signing.encode(), padding.PKCS1v15(), hashes.SHA256())
    return f"{signing}.{b64(signature)}"


def jwt_policy(jwks_url: str) -> str:
    """The tutorial's AuthPolicy with a `jwt` rule instead of API keys: `sub` is the user,
    the `groups` claim the tier, as the tutorial's TokenRateLimitPolicy reads them."""
    return (
        "apiVersion: kuadrant.io/v1\nkind: AuthPolicy\n"
        "metadata: {name: trlp-tutorial-llm-api-keys, namespace: gateway-system}\n"
        "spec:\n"
        "  targetRef: {group: gateway.networking.k8s.io, kind: Gateway, "
        "name: trlp-tutorial-gateway}\n"
        "  rules:\n"
        "    authentication:\n"
        f"      oidc: {{jwt: {{jwksUrl: '{jwks_url}'}}}}\n"
        "    response:\n"
        "      success:\n"
        "        filters:\n"
        "          identity:\n"
        "            json:\n"
        "              properties:\n"
        "                groups: {selector: auth.identity.groups}\n"
        "                userid: {selector: auth.identity.sub}\n"
    )


def check_https_chat(port: int) -> None:
    """One request over TLS before measuring (the certificate is not verified: wrk does not
    verify either)."""
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    conn = http.client.HTTPSConnection(HOST, port, timeout=10, context=context)
    try:
        conn.request("POST", CHAT_PATH, CHAT_BODY, gateway_headers())
        answer = conn.getresponse()
        payload = answer.read()
    finally:
        conn.close()
    if answer.status != 200 or b'"usage"' not in payload:
        raise RuntimeError(f"sanity request over HTTPS got {answer.status}: {payload[:300]!r}")


def open_limits() -> dict[str, str]:
    """Both tutorial limits raised out of reach, their windows an hour (so the counters
    only grow during a run and the tokens counted can be checked)."""
    return {
        "limit: 50 ": f"limit: {HIGH_LIMIT} ",
        "limit: 200 ": f"limit: {HIGH_LIMIT} ",
        "window: 1m": "window: 1h",
    }


def spent_limits() -> dict[str, str]:
    """The gold user's limit tiny (1 token an hour): spent by the first answer."""
    return {"limit: 200 ": "limit: 1 ", "window: 1m": "window: 1h"}


def gateway_headers(auth: str = GOLD) -> dict[str, str]:
    return {"Host": GW_HOST, "Authorization": auth, "Content-Type": "application/json"}


class Readings:
    """CPU used during a timed run: by the system under test (`tree`: with its children), the
    upstream, other helpers, the load generator (this process's waited-for children) and,
    from /proc/stat, by everything else on the machine (`background_core_pct`). Also, in
    `values["processes"]`, each process's own CPU in cores (CPU seconds / wall seconds),
    and the machine's busy and idle cores (one core fully used for the whole run = 1.0)."""

    def __init__(self, sut: Proc, tree: bool, upstream: Proc | None, others: list[Proc]) -> None:
        self.sut, self.tree, self.upstream, self.others = sut, tree, upstream, others
        self.values: dict[str, Any] = {}
        # who is who, fixed at the start: the system under test's processes, then the rest
        self.labels: dict[int, tuple[str, str]] = {}  # pid: (role, label)
        for i, pid in enumerate(sut.pids(tree)):
            self.labels[pid] = ("sut", process_label(sut.name, pid, i))
        if upstream and upstream is not sut:
            self.labels[upstream.pid] = ("upstream", upstream.name)
        for proc in others:
            if proc is not sut:
                role = "redis" if proc.name.startswith("redis-") else "helper"
                self.labels.setdefault(proc.pid, (role, proc.name))

    def _snapshot(self) -> tuple[tuple[float, ...], dict[int, float]]:
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        machine = machine_cpu()
        totals = (
            time.monotonic(),
            self.sut.cpu(self.tree),
            self.upstream.cpu() if self.upstream and self.upstream is not self.sut else 0.0,
            sum(p.cpu() for p in self.others if p is not self.sut),
            kids.ru_utime + kids.ru_stime,
            machine["busy"],
            machine["idle"],
            machine["steal"],
        )
        return totals, {pid: cpu_seconds(pid) for pid in self.labels}

    def __enter__(self) -> Readings:
        self._start = self._snapshot()
        return self

    def __exit__(self, *exc: object) -> None:
        end, per_pid = self._snapshot()
        start, per_pid0 = self._start
        deltas = (b - a for a, b in zip(start, end, strict=True))
        wall, sut, up, others, load, busy, idle, steal = deltas
        ours = sut + up + others + load
        cores = [
            {
                "role": role,
                "name": label,
                "pid": pid,
                "cores": (per_pid[pid] - per_pid0[pid]) / wall if wall else 0.0,
            }
            for pid, (role, label) in self.labels.items()
        ]
        load_cores = load / wall if wall else 0.0
        cores.append({"role": "load", "name": "load generator", "pid": None, "cores": load_cores})
        self.values = {
            "wall_s": wall,
            "sut_cpu_s": sut,
            "upstream_cpu_s": up,
            "helpers_cpu_s": others,
            "load_generator_cpu_s": load,
            "background_core_pct": max(0.0, busy - ours) / wall * 100 if wall else 0.0,
            "steal_core_pct": steal / wall * 100 if wall else 0.0,
            "processes": cores,
            "machine_busy_cores": busy / wall if wall else 0.0,
            "machine_idle_cores": idle / wall if wall else 0.0,
            "machine_steal_cores": steal / wall if wall else 0.0,
        }


def process_label(name: str, pid: int, index: int) -> str:
    """How the CPU breakdown names a process of the system under test: a gateway's leader
    (which is also worker 1) and its `--workers` followers, by their command lines."""
    if not name.startswith("gw"):
        return name if index == 0 else f"{name} child"
    if index == 0:
        return f"{name} leader (worker 1)"
    if "tokengateway.runtime.workers" in cmdline(pid):
        return f"{name} worker"
    return f"{name} child"


# --- the bench ---------------------------------------------------------------------------------


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="tokengateway-bench-"))
        self.logs = self.tmp / "logs"
        self.logs.mkdir()
        self.results = Results()
        self.groups: set[str] = set(args.groups)
        cpus = sorted(os.sched_getaffinity(0))
        if args.pin and len(cpus) >= 2:
            self.sut_cpus: set[int] | None = {cpus[-1]}
            self.load_cpus: set[int] | None = set(cpus[:-1])
        else:
            self.sut_cpus = self.load_cpus = None
        self.all_cpus = set(cpus)
        self.wrk_threads = max(1, min(4, len(self.load_cpus or cpus)))
        self.upstream: Proc | None = None
        self.upstream_port = 0

    # processes

    def start_upstream(self) -> None:
        self.upstream_port = free_port()
        self.upstream = Proc(
            "upstream",
            [PY, str(BENCH / "upstream.py"), "--port", str(self.upstream_port)],
            self.logs,
            cpus=self.load_cpus,
        )
        wait_http(self.upstream, self.upstream_port, "/health")

    @property
    def upstream_url(self) -> str:
        return f"http://{HOST}:{self.upstream_port}"

    def upstream_requests(self) -> int:
        return int(json.loads(http_get(self.upstream_port, "/__stats"))["requests"])

    def start_gateway(
        self,
        name: str,
        replace: dict[str, str],
        backend: str,
        storage: str = "memory://",
        workers: int = 1,
        https_port: int | None = None,
        files: dict[str, str] | None = None,
        kubeconfig: Path | None = None,
        extra: tuple[str, ...] = (),
        cpus: set[int] | None = None,
    ) -> tuple[Proc, int, int]:
        """The gateway on the tutorial; with `https_port`, also an HTTPS listener (no
        hostname, so any SNI gets its certificate) served there (docs/tls.md); `files`
        replace manifests of the tutorial by name. With `kubeconfig`, no manifests: the
        gateway follows the API server it names (a control plane, docs/control-plane.md).
        `extra`: more `serve` options; `cpus`: other CPUs than the system under test's."""
        if https_port is not None:
            replace = {**replace, "  listeners:\n": "  listeners:\n" + HTTPS_LISTENER}
        port, admin = free_port(), free_port()
        cmd = [PY, "-m", "tokengateway", "serve"]
        if kubeconfig is None:
            manifests = write_manifests(self.tmp / f"manifests-{name}", replace)
            for file_name, text in (files or {}).items():
                (manifests / file_name).write_text(text)
            cmd += ["-f", str(manifests)]
        else:
            cmd += ["--kubeconfig", str(kubeconfig)]
        cmd += ["--listen", f"{HOST}:{port}", "--admin", f"{HOST}:{admin}"]
        if https_port is not None:
            (manifests / "99-tls.yaml").write_text(tls_secret(self.tmp / f"tls-{name}"))
            cmd += ["--listen-https", f"{HOST}:{https_port}"]
        cmd += ["--state-dir", str(self.tmp / f"state-{name}"), "--storage", storage]
        if backend:  # "": the manifests say where the Service is
            cmd += ["--backend", f"{SERVICE}={backend}"]
        cmd.append("--no-access-log")
        if workers > 1:
            cmd += ["--workers", str(workers)]
        cmd += extra
        if cpus is None:
            cpus = self.all_cpus if workers > 1 else self.sut_cpus
        proc = Proc(name, cmd, self.logs, cpus=cpus if self.sut_cpus else None)
        wait_http(proc, port, "/", timeout=60)
        if workers > 1:
            deadline = time.monotonic() + 30
            while len(proc.pids(tree=True)) < workers and time.monotonic() < deadline:
                time.sleep(0.1)
            time.sleep(1)  # followers compile the configuration once started
        return proc, port, admin

    def measure_jwt(self, up: Proc, others: tuple[Proc, ...]) -> None:
        """The tutorial with JWTs (RS256, keys from a JWKS URL) instead of API keys: the
        signature is checked once per token, then its decision is kept until `exp`."""
        folder = self.tmp / "jwks"
        token = jwt_identity(folder)
        jwks_port = free_port()
        jwks = Proc(
            "jwks",
            [PY, "-m", "http.server", str(jwks_port), "--bind", HOST, "--directory", str(folder)],
            self.logs,
            cpus=self.load_cpus,
        )
        try:
            wait_http(jwks, jwks_port, "/jwks.json")
            with self.scenario("non-streaming", JWT_ROW) as row:
                policy = jwt_policy(f"http://{HOST}:{jwks_port}/jwks.json")
                gw, port, admin = self.start_gateway(
                    "gw-jwt", open_limits(), self.upstream_url, files={"05-authpolicy.yaml": policy}
                )
                try:
                    self.check_chat(port, auth=f"Bearer {token}")
                    self.measure_wrk(
                        row,
                        gw,
                        port,
                        auth=f"Bearer {token}",
                        upstream=up,
                        others=(*others, jwks),
                        admin=admin,
                    )
                finally:
                    gw.stop()
        finally:
            jwks.stop()

    def measure_follower(self, up: Proc, others: tuple[Proc, ...]) -> None:
        """A replica whose configuration comes from a control plane: a gateway serving the
        tutorial's manifests (idle during the run, on the load generator's CPUs), and a
        second one started with `serve --kubeconfig` on a kubeconfig for the first's admin
        API (docs/control-plane.md), loaded exactly like the API-key row."""
        cp: Proc | None = None
        try:
            with self.scenario("non-streaming", FOLLOWER_ROW) as row:
                # the Service's address is in the manifests (the annotation), so that the
                # follower gets it with the rest: `--backend` checks its Service at start-up,
                # before a follower has listed anything
                annotated = {
                    **open_limits(),
                    f"kind: Service\nmetadata:\n  name: {SERVICE}\n": (
                        f"kind: Service\nmetadata:\n  name: {SERVICE}\n  annotations:\n"
                        f"    tokengateway.io/backend-url: {self.upstream_url}\n"
                    ),
                }
                cp, _, cp_admin = self.start_gateway(
                    "gw-control-plane", annotated, "", cpus=self.load_cpus
                )
                made = subprocess.run(
                    [PY, "-m", "tokengateway", "kubeconfig", "--admin", f"{HOST}:{cp_admin}"],
                    capture_output=True,
                    text=True,
                    timeout=60,
                    check=True,
                )
                kubeconfig = self.tmp / "control-plane.kubeconfig"
                kubeconfig.write_text(made.stdout)
                gw, port, admin = self.start_gateway("gw-follower", {}, "", kubeconfig=kubeconfig)
                try:
                    deadline = time.monotonic() + 30
                    while True:  # until it has listed and built what the control plane has
                        try:
                            self.check_chat(port)
                            break
                        except (RuntimeError, OSError, http.client.HTTPException):
                            if time.monotonic() > deadline:
                                raise
                            time.sleep(0.2)
                    self.measure_wrk(row, gw, port, upstream=up, others=(*others, cp), admin=admin)
                finally:
                    gw.stop()
        finally:
            if cp is not None:
                cp.stop()

    def floor(self) -> None:
        """The server alone answering a fixed 429 (benchmarks/floor.py's app on the gateway's
        server), loaded like the 429 row: the floor under any refusal, in the same run."""
        import floor  # benchmarks/floor.py

        script = self.tmp / "floor_app.py"
        script.write_text(floor.APP)
        port = free_port()
        with self.scenario("429", FLOOR_ROW) as row:
            proc = Proc(
                "floor-ours", [PY, str(script), str(port), "ours"], self.logs, cpus=self.sut_cpus
            )
            try:
                wait_http(proc, port)
                self.measure_wrk(row, proc, port, expect_refusals=True)
            finally:
                proc.stop()

    def counted_tokens(self, admin: int) -> int:
        counters = json.loads(http_get(admin, f"/counters/{ROUTE_NS}", timeout=10))
        return sum(int(c.get("value", 0)) for c in counters)

    def check_chat(self, port: int, auth: str = GOLD, stream: bool = False) -> None:
        """One request before measuring: it must succeed, with usage, or the run is void."""
        body = CHAT_BODY.replace(b'"stream": false', b'"stream": true') if stream else CHAT_BODY
        status, payload = http_post(port, CHAT_PATH, body, gateway_headers(auth))
        if status != 200:
            raise RuntimeError(f"sanity request got {status}: {payload[:300]!r}")
        if not stream and b'"usage"' not in payload:
            raise RuntimeError(f"sanity request has no usage: {payload[:300]!r}")
        if stream and b"data: " not in payload:
            raise RuntimeError(f"sanity stream has no events: {payload[:300]!r}")

    def pin_for(self, sut: Proc, others: list[Proc | None]) -> None:
        if self.sut_cpus is None:
            return
        for proc in others:
            if proc is not None and proc is not sut:
                proc.pin(self.load_cpus)
        sut.pin(self.sut_cpus)

    def load_env(self, auth: str | None) -> dict[str, str]:
        env = dict(os.environ)
        if auth is not None:
            env["BENCH_AUTH"] = auth
        return env

    def _load_preexec(self) -> Callable[[], None] | None:
        cpus = self.load_cpus
        if not cpus:
            return None

        def pin() -> None:
            os.sched_setaffinity(0, cpus)

        return pin

    def wrk(
        self,
        port: int,
        script: str,
        seconds: float,
        auth: str | None,
        latency: bool,
        scheme: str = "http",
    ) -> str:
        cmd = ["wrk", "-t", str(self.wrk_threads), "-c", str(self.args.connections)]
        cmd += ["-d", f"{seconds:g}s", "--timeout", "5s", "-s", str(BENCH / script)]
        if latency:
            cmd.append("--latency")
        cmd.append(f"{scheme}://{HOST}:{port}{CHAT_PATH}")
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=seconds + 30,
            env=self.load_env(auth),
            preexec_fn=self._load_preexec(),
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"wrk failed ({done.returncode}): {done.stderr or done.stdout}")
        return done.stdout

    # measurements

    def measure_wrk(
        self,
        row: Row,
        sut: Proc,
        port: int,
        *,
        stream: bool = False,
        auth: str | None = None,
        tree: bool = False,
        upstream: Proc | None = None,
        expect_refusals: bool = False,
        others: tuple[Proc | None, ...] = (),
        admin: int | None = None,
        scheme: str = "http",
        settle: float = 0.0,
    ) -> None:
        """wrk against `port`: warm-up, then the timed run with /proc readings around it.
        With --repeat N, the run with the most requests per second of N is kept. wrk keeps
        its connections open, so over https the handshakes are not what is measured.
        `settle`: seconds to wait before each reading of the counters (`admin`), for a
        store that writes them behind (redis+cached:// flushes every --flush-period)."""
        script = "chat_stream.lua" if stream else "chat.lua"
        self.pin_for(sut, [upstream, *others])
        best: dict[str, Any] | None = None
        for _ in range(self.args.repeat):
            if self.args.warmup > 0:
                self.wrk(port, script, self.args.warmup, auth, latency=False, scheme=scheme)
            if admin and settle:
                time.sleep(settle)
            tokens0 = self.counted_tokens(admin) if admin else 0
            rss0 = sut.rss_mb(tree)
            with Readings(sut, tree, upstream, [p for p in others if p]) as readings:
                out = parse_wrk(
                    self.wrk(port, script, self.args.duration, auth, latency=True, scheme=scheme)
                )
            out["rss_growth_mb"] = sut.rss_mb(tree) - rss0
            if admin:
                if settle:
                    time.sleep(settle)
                out["tokens_counted"] = self.counted_tokens(admin) - tokens0
            out["readings"] = readings.values
            if best is None or out["rps"] > best["rps"]:
                best = out
        assert best is not None
        n = best["requests"]
        if n == 0:
            raise RuntimeError(f"no request completed in {self.args.duration:g}s: {best}")
        reading = best["readings"]
        row.rps = best["rps"]
        row.p50_ms = best.get("p50_ms")
        row.p99_ms = best.get("p99_ms")
        row.cpu_ms = reading["sut_cpu_s"] * 1000 / n if n else None
        if upstream is not None:
            row.upstream_cpu_ms = reading["upstream_cpu_s"] * 1000 / n if n else None
        row.rss_mb = sut.hwm_mb(tree)
        row.extra["wrk"] = best
        row.extra["requests"] = n
        if expect_refusals:
            if best["non2xx"] != n:
                row.notes.append(f"✗ only {best['non2xx']} of {n} answers were refusals")
        elif best["non2xx"]:
            row.notes.append(f"✗ {best['non2xx']} non-2xx answers: figures not valid")
        growth = best["rss_growth_mb"]
        if growth >= 2 and n:
            row.extra["rss_growth_kb_per_request"] = growth * 1024 / n
            row.notes.append(
                f"RSS grew {growth:.0f} MB during the run ({growth * 1024 / n:.2f} KB/request)"
            )
        if best.get("socket_errors"):
            row.notes.append(f"socket errors: {best['socket_errors']}")
        if admin and n:
            # Every answer wrk saw was charged 13 tokens; answers in flight when the warm-up
            # or the timed run stopped (one per connection at most) are charged too.
            counted = best["tokens_counted"]
            low = TOKENS_PER_ANSWER * n
            high = TOKENS_PER_ANSWER * (n + 2 * self.args.connections)
            ok = 0.995 * low <= counted <= high
            mark = "✓" if ok else f"✗ expected {TOKENS_PER_ANSWER}"
            row.notes.append(f"{counted / n:.2f} tokens counted per answer {mark}")
        self.note_background(row, reading)

    def note_background(self, row: Row, reading: dict[str, float]) -> None:
        row.extra["readings"] = reading
        other = reading["background_core_pct"]
        if other >= 10 or reading["steal_core_pct"] >= 5:
            steal = reading["steal_core_pct"]
            row.notes.append(
                f"disturbed: other processes used {other:.0f} % of a core"
                + (f", steal {steal:.0f} %" if steal >= 1 else "")
            )

    def measure_rate(
        self, row: Row, sut: Proc, port: int, *, upstream: Proc | None = None, tree: bool = False
    ) -> None:
        """The open-loop pacer at --rate; with --repeat N the run with the lowest p50 wins.
        CPU per request covers the pacer's whole run (its warm-up included)."""
        self.pin_for(sut, [upstream])
        warmup = max(1.0, self.args.warmup)
        cmd = [PY, str(BENCH / "pacer.py"), "--url", f"http://{HOST}:{port}{CHAT_PATH}"]
        cmd += ["--rate", f"{self.args.rate:g}", "--duration", f"{self.args.duration:g}"]
        cmd += ["--warmup", f"{warmup:g}"]
        best: dict[str, Any] | None = None
        for _ in range(self.args.repeat):
            with Readings(sut, tree, upstream, []) as readings:
                done = subprocess.run(
                    cmd,
                    capture_output=True,
                    text=True,
                    timeout=self.args.duration + warmup + 60,
                    preexec_fn=self._load_preexec(),
                    check=False,
                )
            if done.returncode != 0:
                raise RuntimeError(f"pacer failed: {done.stderr[-2000:]}")
            out = json.loads(done.stdout)
            out["readings"] = readings.values
            out["sent_all"] = out["sent"] + int(self.args.rate * warmup)
            if best is None or out["p50_ms"] < best["p50_ms"]:
                best = out
        assert best is not None
        reading = best["readings"]
        row.rps = best["achieved_rps"]
        row.p50_ms = best["p50_ms"]
        row.p99_ms = best["p99_ms"]
        row.cpu_ms = reading["sut_cpu_s"] * 1000 / best["sent_all"]
        if upstream is not None:
            row.upstream_cpu_ms = reading["upstream_cpu_s"] * 1000 / best["sent_all"]
        row.rss_mb = sut.hwm_mb(tree)
        row.extra["pacer"] = best
        bad = {k: v for k, v in best["statuses"].items() if k != "200"}
        if bad:
            row.notes.append(f"✗ non-200 answers: {bad}")
        if best["achieved_rps"] < 0.97 * best["offered_rps"]:
            row.notes.append(f"✗ could not keep up: {best['achieved_rps']:.0f} req/s achieved")
        row.notes.append(
            f"pacer CPU {best['pacer_cpu_pct']:.0f} %, lag p99 {best['lag_p99_ms']:.1f} ms"
        )
        self.note_background(row, reading)

    def measure_ttfb(self, key: str, port: int, sut: Proc, upstream: Proc | None = None) -> None:
        self.pin_for(sut, [upstream])
        cmd = [PY, str(BENCH / "ttfb.py"), "--url", f"http://{HOST}:{port}{CHAT_PATH}"]
        cmd += ["-n", str(self.args.ttfb_n)]
        done = subprocess.run(
            cmd,
            capture_output=True,
            text=True,
            timeout=120,
            preexec_fn=self._load_preexec(),
            check=False,
        )
        if done.returncode != 0:
            raise RuntimeError(f"ttfb client failed: {done.stderr[-2000:]}")
        self.results.ttfb[key] = json.loads(done.stdout)

    @contextlib.contextmanager
    def scenario(self, group: str, name: str) -> Iterator[Row]:
        row = Row(group, name)
        log(f"{group}: {name}")
        try:
            yield row
        except (KeyboardInterrupt, SystemExit):
            raise
        except Exception as exc:
            row.error = f"{type(exc).__name__}: {exc}"[:600]
            log(f"  failed: {row.error}")
            if self.args.verbose:
                traceback.print_exc()
        self.results.rows.append(row)

    # scenario groups

    def want(self, *groups: str) -> bool:
        """Whether any of these scenario groups runs (`--only`; every group by default)."""
        return any(g in self.groups for g in groups)

    def run(self) -> None:
        self.results.meta = machine_info(self)
        with self.scenario("upstream", "start the fixed upstream") as row:
            self.start_upstream()
        if self.upstream is None:
            return
        self.results.rows.pop()  # that was not a measurement
        up = self.upstream
        port = self.upstream_port

        if self.want("nonstream"):
            with self.scenario("non-streaming", "upstream alone (fixed response)") as row:
                self.measure_wrk(row, up, port)
        if self.want("stream"):
            with self.scenario("streaming", "upstream alone (fixed response), stream") as row:
                self.measure_wrk(row, up, port, stream=True)
        sim: Proc | None = None
        sim_port = free_port()
        if self.want("nonstream"):
            with self.scenario("non-streaming", "simulator alone (tokengateway sim, 0 ms)") as row:
                sim = Proc(
                    "sim",
                    [
                        *(PY, "-m", "tokengateway", "sim", "--model", MODEL),
                        *("--port", str(sim_port)),
                        *("--time-to-first-token", "0", "--inter-token-latency", "0"),
                    ],
                    self.logs,
                    cpus=self.load_cpus,
                )
                wait_http(sim, sim_port, "/health")
                self.check_chat(sim_port)
                self.measure_wrk(row, sim, sim_port)

        # the bare pass-through proxies and the gateway, all in front of the fixed upstream:
        # one on the gateway's own server and client (the same stack), one on uvicorn and
        # aiohttp (the reference stack the issue quotes)
        up_url = self.upstream_url
        proxies: list[tuple[str, Proc, int]] = []
        for stack, name in PASSTHROUGHS if self.want("nonstream", "stream", "rate", "ttfb") else ():
            pt_port = free_port()
            proc = Proc(
                f"passthrough-{stack}",
                [
                    *(PY, str(BENCH / "passthrough.py"), "--port", str(pt_port)),
                    *("--upstream", up_url, "--stack", stack),
                ],
                self.logs,
                cpus=self.sut_cpus,
            )
            proxies.append((name, proc, pt_port))
            with self.scenario("non-streaming", name) as row:
                wait_http(proc, pt_port)
                self.check_chat(pt_port)
                if self.want("nonstream"):
                    self.measure_wrk(row, proc, pt_port, upstream=up)
            if not self.want("nonstream") and row.error is None:
                self.results.rows.remove(row)  # started only for the other groups
            if self.want("stream"):
                with self.scenario("streaming", f"{name}, stream") as row:
                    self.measure_wrk(row, proc, pt_port, stream=True, upstream=up)

        # the gateway on memory:// with API keys: the row every other path is compared with
        gw: Proc | None = None
        gw_port = gw_admin = 0
        tls_port = free_port()
        others = tuple(proc for _, proc, _ in proxies)
        if self.want(*MEMORY_GATEWAY_GROUPS):
            with self.scenario("non-streaming", GW_ROW) as row:
                gw, gw_port, gw_admin = self.start_gateway(
                    "gw-memory",
                    open_limits(),
                    self.upstream_url,
                    https_port=tls_port if self.want("tls") else None,
                )
                self.check_chat(gw_port)
                self.measure_wrk(row, gw, gw_port, upstream=up, others=others, admin=gw_admin)
                self.note_children(row, gw)
        if gw is not None and gw.alive() and self.want("tls"):
            with self.scenario("non-streaming", HTTPS_ROW) as row:
                check_https_chat(tls_port)
                self.measure_wrk(
                    row, gw, tls_port, upstream=up, others=others, admin=gw_admin, scheme="https"
                )
        if self.want("jwt"):
            self.measure_jwt(up, others)
        if self.want("follower"):
            self.measure_follower(up, others)
        if gw is not None and gw.alive() and self.want("stream"):
            with self.scenario("streaming", f"{GW_ROW}, stream") as row:
                self.check_chat(gw_port, stream=True)
                self.measure_wrk(row, gw, gw_port, stream=True, upstream=up, admin=gw_admin)
        if gw is not None and gw.alive() and self.args.profile and self.want("nonstream"):
            self.profile(gw, gw_port)

        rate = f"rate {self.args.rate:g} req/s"
        if self.want("rate"):
            with self.scenario(rate, f"upstream alone @ {self.args.rate:g}/s") as row:
                self.measure_rate(row, up, port)
            for name, proc, pt_port in proxies:
                if proc.alive():
                    with self.scenario(rate, f"{name} @ {self.args.rate:g}/s") as row:
                        self.measure_rate(row, proc, pt_port, upstream=up)
            if gw is not None and gw.alive():
                with self.scenario(rate, f"gateway, memory:// @ {self.args.rate:g}/s") as row:
                    self.measure_rate(row, gw, gw_port, upstream=up)

        if self.want("ttfb"):
            with self.scenario("ttfb", "ttfb") as row:
                self.measure_ttfb("upstream alone", port, up)
                for name, proc, pt_port in proxies:
                    if proc.alive():
                        self.measure_ttfb(name.replace(", no policy", ""), pt_port, proc, up)
                if gw is not None and gw.alive():
                    self.measure_ttfb("gateway, memory://", gw_port, gw, up)
            if row.error is None:
                self.results.rows.remove(row)
        if gw is not None:
            self.results.meta["gateway_memory_peak_rss_mb"] = gw.hwm_mb()
            with contextlib.suppress(Exception):
                self.results.meta["gateway_memory_requests"] = gw_served(gw_admin)
            gw.stop()
        for _, proc, _ in proxies:
            proc.stop()

        if sim is not None and sim.alive():
            with self.scenario("non-streaming", "gateway → simulator, memory://") as row:
                gw2, gw2_port, _ = self.start_gateway(
                    "gw-sim", open_limits(), f"http://{HOST}:{sim_port}"
                )
                self.check_chat(gw2_port)
                self.measure_wrk(row, gw2, gw2_port, upstream=sim)
                gw2.stop()
        if sim is not None:
            sim.stop()

        if self.want("429"):
            self.refusals()
        if self.want("floor", "429"):
            self.floor()
        if self.want("storage"):
            self.redis_scenarios()
        if self.want("litellm"):
            self.litellm()

    def note_children(self, row: Row, proc: Proc) -> None:
        kids = proc.pids(tree=True)[1:]
        if kids:
            row.notes.append(f"{len(kids)} child process(es), not counted")

    def refusals(self) -> None:
        with self.scenario("429", REFUSED_ROW) as row:
            gw, port, _ = self.start_gateway("gw-spent", spent_limits(), self.upstream_url)
            status, _ = http_post(port, CHAT_PATH, CHAT_BODY, gateway_headers())
            if status != 200:
                raise RuntimeError(f"the request spending the limit got {status}")
            status, payload = http_post(port, CHAT_PATH, CHAT_BODY, gateway_headers())
            if status != 429:
                raise RuntimeError(f"the next request got {status}, not 429: {payload[:200]!r}")
            before = self.upstream_requests()
            self.measure_wrk(row, gw, port, upstream=self.upstream, expect_refusals=True)
            reached = self.upstream_requests() - before
            row.extra["upstream_requests_during_run"] = reached
            if reached == 0:
                row.notes.append("upstream received 0 requests during the run ✓")
            else:
                row.notes.append(f"✗ upstream received {reached} requests during the run")
            gw.stop()

    def redis_scenarios(self) -> None:
        """redis:// with 1 and 2 workers, then redis+cached:// (counters kept in the process,
        flushed to Redis every --flush-period) with 1 and 2 workers, on one redis-server
        emptied before each row. A row whose `serve` option is missing reads "n/a"."""
        help_text = serve_help()
        flush = f"{self.args.flush_period:g}"
        # a flush period for the last answers to reach Redis, another for a reader's view
        # of them to be refreshed, and a margin
        settle = 2 * self.args.flush_period + 0.5
        rows = [
            (REDIS_1, "redis", 1, (), 0.0, None),
            (REDIS_2, "redis", 2, (), 0.0, None if "--workers" in help_text else "--workers"),
            (CACHED_1, "cached", 1, ("--flush-period", flush), settle, None),
            (CACHED_2, "cached", 2, ("--flush-period", flush), settle, None),
        ]
        missing_cached = "--flush-period" not in help_text
        redis: Redis | None = None
        try:
            for name, kind, workers, extra, wait, missing in rows:
                if missing or (kind == "cached" and missing_cached):
                    why = f"serve has no {missing}" if missing else "no redis+cached"
                    if kind == "cached" and workers > 1 and "--workers" not in help_text:
                        why = "serve has no --workers"
                    self.results.rows.append(Row("storage", name, notes=[f"n/a ({why})"]))
                    log(f"storage: {name}: n/a ({why})")
                    continue
                with self.scenario("storage", name) as row:
                    if redis is None:
                        redis = Redis(self.logs, cpus=self.load_cpus)
                    redis.flush()
                    storage = (
                        redis.url if kind == "redis" else f"redis+cached://{HOST}:{redis.port}"
                    )
                    self.storage_row(row, redis, storage, workers, extra, wait)
                    if kind == "cached":
                        row.notes.append(f"--flush-period {flush}")
        finally:
            if redis is not None:
                redis.stop()

    def storage_row(
        self,
        row: Row,
        redis: Redis,
        storage: str,
        workers: int,
        extra: tuple[str, ...],
        settle: float,
    ) -> None:
        """One gateway on `storage` (and `workers` processes), loaded like the memory:// row;
        with 2 workers or more it is unpinned: every process gets every CPU."""
        slug = "gw-" + storage.split(":", 1)[0].replace("+", "-") + f"-{workers}"
        gw, port, admin = self.start_gateway(
            slug, open_limits(), self.upstream_url, storage=storage, workers=workers, extra=extra
        )
        try:
            self.check_chat(port)
            saved = self.sut_cpus
            try:
                if workers > 1:  # the workers get every CPU: the row is unpinned
                    self.sut_cpus = self.load_cpus = None
                self.measure_wrk(
                    row,
                    gw,
                    port,
                    upstream=self.upstream,
                    tree=workers > 1,
                    others=(redis.proc,),
                    admin=admin,
                    settle=settle,
                )
            finally:
                self.sut_cpus = saved
                self.load_cpus = (self.all_cpus - saved) if saved else None
            if workers > 1:
                row.notes.append(f"{len(gw.pids(tree=True))} processes, CPU and RSS summed")
                row.notes.append("unpinned")
                spread = [
                    p["cores"]
                    for p in row.extra.get("readings", {}).get("processes", [])
                    if p["role"] == "sut" and not p["name"].endswith(" child")
                ]
                if len(spread) > 1 and min(spread) < 0.5 * max(spread):
                    each = ", ".join(f"{c:.2f}" for c in spread)
                    row.notes.append(f"⚠ load not spread: the workers used {each} cores")
        finally:
            gw.stop()

    def profile(self, gw: Proc, port: int) -> None:
        """py-spy on the gateway for 5 s of the non-streaming load (not a measured run)."""
        spy = shutil.which("py-spy", path=str(Path(PY).parent)) or shutil.which("py-spy")
        if spy is None:
            log("py-spy missing: pip install py-spy into the venv")
            done = subprocess.run(
                [PY, "-m", "pip", "install", "--quiet", "py-spy"],
                capture_output=True,
                text=True,
                timeout=180,
                check=False,
            )
            spy = shutil.which("py-spy", path=str(Path(PY).parent))
            if spy is None:
                self.results.profile_note = f"py-spy unavailable: {done.stderr[-300:]}"
                return
        log("profile: py-spy on the gateway, 5 s of non-streaming load")
        out = self.tmp / "py-spy.txt"
        seconds = 5
        cmd = [spy, "record", "--pid", str(gw.pid), "--duration", str(seconds), "--rate", "200"]
        cmd += ["--format", "raw", "--output", str(out), "--nonblocking"]
        self.pin_for(gw, [self.upstream])
        spy_proc = subprocess.Popen(
            cmd,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            preexec_fn=self._load_preexec(),
        )
        try:
            time.sleep(0.3)
            self.wrk(port, "chat.lua", seconds + 1, None, latency=False)
            _, err = spy_proc.communicate(timeout=60)
        except BaseException:
            spy_proc.kill()
            spy_proc.wait()
            raise
        if not out.exists():
            self.results.profile_note = f"py-spy failed: {err.decode(errors='replace')[-300:]}"
            return
        self.results.profile = top_frames(out.read_text(), 10)

    def litellm(self) -> None:
        name = "LiteLLM proxy, per-key tpm_limit (custom_auth)"
        exe = LITELLM_VENV / "bin" / "litellm"
        if not exe.exists() or _read(LITELLM_STAMP) != LITELLM_LOCK.read_text():
            reason = install_litellm(self.logs / "litellm-install.log")
            if reason is not None:
                self.results.rows.append(Row("litellm", name, error=reason))
                log(f"litellm: {reason}")
                return
        self.results.meta["litellm_version"] = litellm_version()
        folder = self.tmp / "litellm"
        folder.mkdir()
        shutil.copy(BENCH / "litellm_auth.py", folder / "litellm_auth.py")
        (folder / "config.yaml").write_text(litellm_config(self.upstream_url))
        (folder / "logging.json").write_text(json.dumps(LITELLM_LOGGING))
        proc: Proc | None = None
        port = free_port()
        env = {
            "LITELLM_LOCAL_MODEL_COST_MAP": "True",  # no download of the price list
            "LITELLM_LOG": "ERROR",
            "HF_HUB_OFFLINE": "1",  # never the hub, whatever else asks for a tokenizer
            "BENCH_TPM_LIMIT": str(HIGH_LIMIT),
            "BENCH_KEY": LITELLM_KEY,
        }
        auth = f"Bearer {LITELLM_KEY}"
        try:
            with self.scenario("litellm", name) as row:
                proc = Proc(
                    "litellm",
                    [
                        *(str(exe), "--config", str(folder / "config.yaml"), "--host", HOST),
                        *("--port", str(port), "--num_workers", "1"),
                        *("--log_config", str(folder / "logging.json")),
                    ],
                    self.logs,
                    cpus=self.sut_cpus,
                    env=env,
                    cwd=folder,
                )
                wait_http(proc, port, "/health/liveliness", timeout=180)
                self.check_chat(port, auth=auth)
                status, _ = http_post(port, CHAT_PATH, CHAT_BODY, gateway_headers("Bearer nope"))
                row.notes.append(f"wrong key → {status}")
                self.measure_wrk(row, proc, port, auth=auth, tree=True, upstream=self.upstream)
                kids = len(proc.pids(tree=True)) - 1
                if kids:
                    row.notes.append(f"{kids + 1} processes, CPU and RSS summed")
                self.note_litellm_network(row, proc)
            if proc is not None and proc.alive():
                with self.scenario("litellm", f"{name}, stream") as row:
                    self.measure_wrk(
                        row, proc, port, stream=True, auth=auth, tree=True, upstream=self.upstream
                    )
                    self.note_litellm_network(row, proc)
        finally:
            if proc is not None:
                proc.stop()

    @staticmethod
    def note_litellm_network(row: Row, proc: Proc) -> None:
        """Flag any attempt of LiteLLM to reach beyond loopback (its log says so)."""
        text = proc.output(tail=200_000)
        for sign in ("huggingface.co", "Name or service not known", "Temporary failure in name"):
            if sign in text:
                row.notes.append(f"✗ LiteLLM tried to reach the network ({sign!r} in its log)")
                return

    def micro(self) -> None:
        log("micro-benchmarks (benchmarks/micro.py)")
        out = self.tmp / "micro.json"
        cmd = [PY, str(BENCH / "micro.py"), "--json", str(out)]
        sut = self.sut_cpus

        def pin() -> None:
            if sut:
                os.sched_setaffinity(0, sut)

        done = subprocess.run(
            cmd, capture_output=True, text=True, timeout=300, preexec_fn=pin, check=False
        )
        if done.returncode != 0 or not out.exists():
            self.results.micro_note = f"micro.py failed: {done.stderr[-1500:]}"
            log(self.results.micro_note)
            return
        data = json.loads(out.read_text())
        self.results.micro = data["results"]
        self.results.micro_note = data.get("note", "")


# --- LiteLLM -----------------------------------------------------------------------------------

LITELLM_LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "loggers": {
        "uvicorn.access": {"level": "WARNING"},
        "uvicorn.error": {"level": "WARNING"},
    },
}


def litellm_config(upstream: str) -> str:
    # custom_auth: LiteLLM's virtual keys (with a per-key tpm_limit) live in Postgres; the
    # same per-key limit without a database is a custom auth function that returns the key's
    # UserAPIKeyAuth with tpm_limit set, which LiteLLM's own rate limiter then enforces.
    return f"""\
model_list:
  - model_name: {MODEL}
    litellm_params:
      model: openai/{MODEL}
      api_base: {upstream}/v1
      api_key: unused
litellm_settings:
  telemetry: false
  # token counting for a "llama" model would fetch a tokenizer from the Hugging Face hub:
  # use LiteLLM's bundled tiktoken encoding instead (loopback only)
  disable_hf_tokenizer_download: true
general_settings:
  master_key: sk-bench-master-{os.urandom(16).hex()}
  custom_auth: litellm_auth.user_api_key_auth
"""


def install_litellm(log_path: Path, timeout: float = 1200) -> str | None:
    """Create benchmarks/.litellm-venv with exactly benchmarks/litellm.lock (litellm[proxy]
    at the version the published figures used); None, or why it failed."""
    log(f"installing litellm[proxy] into {LITELLM_VENV} (once; slow)")
    with open(log_path, "w") as out:
        try:
            for cmd in (
                [PY, "-m", "venv", "--clear", str(LITELLM_VENV)],
                [
                    str(LITELLM_VENV / "bin" / "python"),
                    "-m",
                    "pip",
                    "install",
                    "--require-hashes",
                    "-r",
                    str(LITELLM_LOCK),
                ],
            ):
                done = subprocess.run(
                    cmd, stdout=out, stderr=subprocess.STDOUT, timeout=timeout, check=False
                )
                if done.returncode != 0:
                    out.flush()
                    tail = log_path.read_text(errors="replace").strip().splitlines()[-1:]
                    return f"install failed ({' '.join(cmd[-2:])}): {' '.join(tail)[:300]}"
        except subprocess.TimeoutExpired:
            return f"install timed out after {timeout:.0f}s"
    if not (LITELLM_VENV / "bin" / "litellm").exists():
        return "install finished but there is no litellm command"
    LITELLM_STAMP.write_text(LITELLM_LOCK.read_text())  # installed: this lock, no other
    return None


def _read(path: Path) -> str | None:
    return path.read_text() if path.exists() else None


def litellm_version() -> str:
    done = subprocess.run(
        [str(LITELLM_VENV / "bin" / "python"), "-m", "pip", "show", "litellm"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    m = re.search(r"^Version: (.+)$", done.stdout, re.M)
    return m.group(1) if m else "?"


# --- misc --------------------------------------------------------------------------------------


def gw_served(admin: int) -> int:
    """Requests the gateway has answered with usage, from its token counters (13 each)."""
    counters = json.loads(http_get(admin, f"/counters/{ROUTE_NS}", timeout=10))
    return sum(int(c.get("value", 0)) for c in counters) // TOKENS_PER_ANSWER


@functools.cache
def serve_help() -> str:
    """`tokengateway serve --help`: which options this tree's `serve` has (--workers,
    --flush-period for redis+cached://)."""
    done = subprocess.run(
        [PY, "-m", "tokengateway", "serve", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    return done.stdout


def top_frames(raw: str, n: int) -> list[tuple[str, float]]:
    """The `n` functions most often on top of the stack in py-spy's raw (collapsed) output,
    with their share of the samples."""
    counts: dict[str, int] = {}
    total = 0
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        leaf = stack.split(";")[-1]
        counts[leaf] = counts.get(leaf, 0) + int(count)
        total += int(count)
    ranked = sorted(counts.items(), key=lambda kv: -kv[1])[:n]
    return [(frame, 100.0 * c / total) for frame, c in ranked] if total else []


def machine_info(bench: Bench) -> dict[str, Any]:
    model = "?"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    wrk = subprocess.run(["wrk", "--version"], capture_output=True, text=True, check=False)
    load = os.getloadavg()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": platform.python_version(),
        "kernel": platform.release(),
        "wrk": (wrk.stdout or wrk.stderr).splitlines()[0] if (wrk.stdout or wrk.stderr) else "?",
        "loadavg_at_start": [round(x, 2) for x in load],
        "pinning": (
            f"system under test on CPU {sorted(bench.sut_cpus)}, load generator and "
            f"upstream on CPU {sorted(bench.load_cpus or [])}"
            if bench.sut_cpus
            else "none"
        ),
        "command": " ".join(["benchmarks/bench.py", *sys.argv[1:]]),
        "duration_s": bench.args.duration,
        "warmup_s": bench.args.warmup,
        "connections": bench.args.connections,
        "wrk_threads": bench.wrk_threads,
    }


# --- report ------------------------------------------------------------------------------------


PT_OWN = "pass-through proxy (gateway's server + client, no policy)"
PT_REF = "pass-through proxy (uvicorn + aiohttp, no policy)"
#: (passthrough.py --stack, row name)
PASSTHROUGHS = (("tokengateway", PT_OWN), ("uvicorn-aiohttp", PT_REF))


def fmt(value: float | None, digits: int = 2) -> str:
    if value is None:
        return "-"
    return f"{value:,.{digits}f}"


def _mark(ok: bool | None) -> str:
    return "-" if ok is None else ("✓" if ok else "✗")


def _tokens_ok(row: Row) -> bool:
    """Whether the row's token check passed (its note says "… tokens counted per answer ✓")."""
    return any("tokens counted per answer ✓" in n for n in row.notes)


def _why_not(res: Results, *names: str) -> str:
    """Why a quotient of these rows has no value: the first row without figures, with its
    "n/a (…)" note, its failure, or that it did not run."""
    for name in names:
        rows = [r for r in res.rows if r.name == name]
        if not rows:
            return f"n/a ({name}: not run)"
        r = rows[-1]
        if r.error:
            return f"n/a ({name}: failed)"
        for note in r.notes:
            if note.startswith("n/a"):
                return note
        if not r.rps or not r.cpu_ms:
            return f"n/a ({name}: no figures)"
    return "n/a"


def _cpu_ratio(res: Results, a: str, b: str) -> tuple[float, Row, Row] | None:
    ra, rb = res.row(a), res.row(b)
    if ra is None or rb is None or not ra.cpu_ms or not rb.cpu_ms:
        return None
    return ra.cpu_ms / rb.cpu_ms, ra, rb


def _rps_ratio(res: Results, a: str, b: str) -> tuple[float, Row, Row] | None:
    ra, rb = res.row(a), res.row(b)
    if ra is None or rb is None or not ra.rps or not rb.rps:
        return None
    return ra.rps / rb.rps, ra, rb


def round_two_targets(res: Results, rate: float) -> list[tuple[str, str, str]]:
    """Issue 20's targets ("performance round two"): (target, measured, ✓/✗, or "-" for a
    figure it asks to report without a bound)."""
    out: list[tuple[str, str, str]] = []

    def cpu_target(label: str, name: str, bound: float | None, base: str = GW_ROW) -> None:
        got = _cpu_ratio(res, name, base)
        if got is None:
            out.append((label, _why_not(res, name, base), "-"))
            return
        ratio, ra, rb = got
        detail = f"{ratio:.2f}x ({ra.cpu_ms:.3f} vs {rb.cpu_ms:.3f} ms)"
        ok: bool | None = None if bound is None else ratio <= bound
        if name in (REDIS_1, CACHED_1):
            counted = _tokens_ok(ra)
            detail += "; counting exact ✓" if counted else "; ✗ counting not exact"
            ok = bool(ok) and counted
        out.append((label, detail, _mark(ok)))

    cpu_target("redis:// CPU per request ≤ 1.5x memory://, counting exact", REDIS_1, 1.5)
    cpu_target("redis+cached:// CPU per request ≤ 1.15x memory://, counting exact", CACHED_1, 1.15)
    for label, two, one, bound in (
        ("`--workers 2` on redis:// ≥ 1.6x the req/s of 1 worker", REDIS_2, REDIS_1, 1.6),
        ("… on redis+cached:// (reported)", CACHED_2, CACHED_1, None),
    ):
        got = _rps_ratio(res, two, one)
        if got is None:
            out.append((label, _why_not(res, two, one), "-"))
            continue
        ratio, ra, rb = got
        detail = f"{ratio:.2f}x ({ra.rps:,.0f} vs {rb.rps:,.0f} req/s)"
        per_core = [per_gateway_core(r) for r in (rb, ra)]
        if None not in per_core:
            detail += f"; {per_core[0]:,.0f} → {per_core[1]:,.0f} req/s per gateway core"
        out.append((label, detail, _mark(None if bound is None else ratio >= bound)))
    cpu_target(
        "streams: gateway CPU per stream ≤ 1.5x the streamed pass-through's (same stack)",
        f"{GW_ROW}, stream",
        1.5,
        f"{PT_OWN}, stream",
    )
    cpu_target(
        "full policy path CPU ≤ 2x the pass-through floor (same stack), non-streaming",
        GW_ROW,
        2.0,
        PT_OWN,
    )
    cpu_target("429 CPU ≤ 1.3x the fixed-429 floor (same run)", REFUSED_ROW, 1.3, FLOOR_ROW)
    up_rate = res.row(f"upstream alone @ {rate:g}/s")
    gw_rate = res.row(f"gateway, memory:// @ {rate:g}/s")
    if up_rate and gw_rate and up_rate.p99_ms is not None and gw_rate.p99_ms is not None:
        d99 = gw_rate.p99_ms - up_rate.p99_ms
        detail = f"{d99:+.2f} ms ({gw_rate.p99_ms:.2f} vs {up_rate.p99_ms:.2f} ms)"
        out.append((f"p99 added at {rate:g} req/s ≤ 1 ms (a quiet run)", detail, _mark(d99 <= 1)))
    else:
        out.append((f"p99 added at {rate:g} req/s", "n/a (not run)", "-"))
    for label, name in (
        ("HTTPS (keep-alive) CPU per request / plain HTTP", HTTPS_ROW),
        ("JWT identity (RS256) CPU per request / API key", JWT_ROW),
        ("follower of a control plane CPU per request / -f manifests", FOLLOWER_ROW),
    ):
        cpu_target(label, name, None)
    return out


def per_gateway_core(row: Row) -> float | None:
    """req/s per core of gateway CPU: what one fully used core serves (1000 / CPU ms)."""
    return 1000 / row.cpu_ms if row.cpu_ms else None


def cpu_breakdown(res: Results) -> list[str]:
    """Where the CPU went during the storage runs: each process's cores, the machine's."""
    rows = [r for r in res.rows if r.group == "storage" and r.error is None and r.rps]
    if not rows:
        return []
    lines = [
        "",
        "Where the CPU went during the storage runs (cores: CPU seconds / wall seconds of the "
        "measured run; machine busy and idle from /proc/stat):",
        "",
        "| run | req/s | gateway processes | gateway | req/s per gateway core | redis-server "
        "| upstream | wrk | everything else | machine busy | machine idle |",
        "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        reading = r.extra.get("readings") or {}
        procs = reading.get("processes") or []

        def cores(role: str, procs: list[dict[str, Any]] = procs) -> float:
            return sum(p["cores"] for p in procs if p["role"] == role)

        each = " + ".join(
            f"{p['cores']:.2f} ({p['name'].split(' ', 1)[-1]})" for p in procs if p["role"] == "sut"
        )
        per_core = per_gateway_core(r)
        busy = reading.get("machine_busy_cores", 0.0)
        rest = max(0.0, busy - sum(p["cores"] for p in procs))  # other engineers' work, say
        lines.append(
            f"| {r.name} | {fmt(r.rps, 0)} | {each} | {cores('sut'):.2f} | {fmt(per_core, 0)} "
            f"| {cores('redis'):.2f} | {cores('upstream'):.2f} | {cores('load'):.2f} "
            f"| {rest:.2f} | {busy:.2f} | {reading.get('machine_idle_cores', 0):.2f} |"
        )
    one, two = res.row(REDIS_1), res.row(REDIS_2)
    if one and two and per_gateway_core(one) and per_gateway_core(two):
        a, b = per_gateway_core(one), per_gateway_core(two)
        assert a is not None and b is not None
        lines += [
            "",
            f"Per core on redis://: {a:,.0f} req/s per gateway core with 1 worker, {b:,.0f} with "
            f"2 ({b / a:.2f}x). With N workers on N otherwise idle cores, expect about "
            f"N x {b:,.0f} req/s, as long as redis-server, the upstream and the clients have "
            "cores of their own (on this machine they share the same two).",
        ]
    return lines


ROUND_TWO = "**issue 20 (performance round two)**"


def targets(res: Results, rate: float) -> list[tuple[str, str, str]]:
    """(target, measured, ✓/✗) for each tracked target: the first round's, then a
    ROUND_TWO line and issue 20's."""
    return [*first_round_targets(res, rate), (ROUND_TWO, "", ""), *round_two_targets(res, rate)]


def first_round_targets(res: Results, rate: float) -> list[tuple[str, str, str]]:
    """The first round's targets: gateway, full policy path, memory://, 1 worker."""
    out: list[tuple[str, str, str]] = []
    gw = res.row(GW_ROW)
    pt = res.row(PT_OWN)
    pt_ref = res.row(PT_REF)
    up_rate = res.row(f"upstream alone @ {rate:g}/s")
    gw_rate = res.row(f"gateway, memory:// @ {rate:g}/s")
    refused = res.row(REFUSED_ROW)

    def mark(ok: bool | None) -> str:
        return "-" if ok is None else ("✓" if ok else "✗")

    cpu = gw.cpu_ms if gw else None
    detail = f" ({fmt(gw_rate.cpu_ms, 3)} ms at {rate:g} req/s)" if gw_rate else ""
    out.append(
        (
            "gateway CPU per request ≤ 0.20 ms",
            f"{fmt(cpu, 3)} ms at saturation{detail}",
            mark(None if cpu is None else cpu <= 0.20),
        )
    )
    for label, base in (
        ("throughput ≥ 70 % of the pass-through proxy", pt),
        ("… of the issue's reference pass-through (uvicorn + aiohttp)", pt_ref),
    ):
        if gw and base and gw.rps and base.rps:
            share = 100 * gw.rps / base.rps
            detail = f"{share:.0f} % ({gw.rps:,.0f} vs {base.rps:,.0f} req/s)"
            out.append((label, detail, mark(share >= 70)))
        else:
            out.append((label, "n/a", "-"))
    if up_rate and gw_rate and None not in (up_rate.p50_ms, gw_rate.p50_ms):
        d50 = gw_rate.p50_ms - up_rate.p50_ms  # type: ignore[operator]
        d99 = gw_rate.p99_ms - up_rate.p99_ms  # type: ignore[operator]
        out.append(
            (f"added latency at {rate:g} req/s, p50 ≤ 1 ms", f"{d50:+.2f} ms", mark(d50 <= 1))
        )
        out.append(
            (f"added latency at {rate:g} req/s, p99 ≤ 3 ms", f"{d99:+.2f} ms", mark(d99 <= 3))
        )
    else:
        out.append((f"added latency at {rate:g} req/s, p50 ≤ 1 ms / p99 ≤ 3 ms", "n/a", "-"))
    ok_refusals = refused is not None and not any(n.startswith("✗") for n in refused.notes)
    rcpu = refused.cpu_ms if refused else None
    out.append(
        (
            "429 refusal CPU ≤ 0.05 ms",
            f"{fmt(rcpu, 3)} ms" + ("" if ok_refusals or refused is None else " (run not valid)"),
            mark(None if rcpu is None else rcpu <= 0.05 and ok_refusals),
        )
    )
    t_up = res.ttfb.get("upstream alone")
    t_gw = res.ttfb.get("gateway, memory://")
    if t_up and t_gw:
        d = t_gw["first_byte_p50_ms"] - t_up["first_byte_p50_ms"]
        out.append(
            (
                "TTFB through the gateway ≤ upstream + 1 ms (p50)",
                f"{t_gw['first_byte_p50_ms']:.2f} vs {t_up['first_byte_p50_ms']:.2f} ms "
                f"({d:+.2f} ms)",
                mark(d <= 1),
            )
        )
    else:
        out.append(("TTFB through the gateway ≤ upstream + 1 ms (p50)", "n/a", "-"))
    peak = res.meta.get("gateway_memory_peak_rss_mb")
    served = res.meta.get("gateway_memory_requests")
    detail = f"{fmt(peak, 1)} MB (VmHWM after all its scenarios"
    detail += f", ~{served:,} requests)" if served else ")"
    first_run = gw.rss_mb if gw else None
    if first_run is not None:
        detail += f"; {first_run:.1f} MB after its first run"
    growth = gw.extra.get("rss_growth_kb_per_request") if gw else None
    if growth:
        detail += f"; RSS grows {growth:.2f} KB per request"
    out.append(("gateway peak RSS ≤ 120 MB", detail, mark(None if peak is None else peak <= 120)))
    return out


def ratios(res: Results, rate: float) -> list[tuple[str, str]]:
    """Quotients of figures of the same run: req/s ("rps") or CPU per request ("cpu")."""
    out = []
    gw, gws = GW_ROW, f"{GW_ROW}, stream"
    lite = "LiteLLM proxy, per-key tpm_limit (custom_auth)"
    pairs = [
        ("gateway / upstream alone, req/s", "rps", gw, "upstream alone (fixed response)"),
        ("gateway / pass-through proxy (same stack), req/s", "rps", gw, PT_OWN),
        ("gateway / pass-through proxy (uvicorn + aiohttp), req/s", "rps", gw, PT_REF),
        ("pass-through: gateway's stack / uvicorn + aiohttp, req/s", "rps", PT_OWN, PT_REF),
        ("gateway / upstream alone, req/s, stream", "rps", gws,
         "upstream alone (fixed response), stream"),
        ("gateway / pass-through proxy (same stack), req/s, stream", "rps", gws,
         f"{PT_OWN}, stream"),
        ("gateway / pass-through proxy (uvicorn + aiohttp), req/s, stream", "rps", gws,
         f"{PT_REF}, stream"),
        ("gateway CPU / pass-through CPU (same stack), per request", "cpu", gw, PT_OWN),
        ("gateway CPU / pass-through CPU (uvicorn + aiohttp), per request", "cpu", gw, PT_REF),
        ("gateway CPU / pass-through CPU (same stack), per stream", "cpu", gws,
         f"{PT_OWN}, stream"),
        ("429 CPU / server alone's fixed 429 (gateway's server), per request", "cpu",
         REFUSED_ROW, FLOOR_ROW),
        ("HTTPS / plain HTTP, CPU per request", "cpu", HTTPS_ROW, gw),
        ("JWT identity / API key, CPU per request", "cpu", JWT_ROW, gw),
        ("follower of a control plane / -f manifests, CPU per request", "cpu", FOLLOWER_ROW, gw),
        ("gateway redis:// / memory://, req/s", "rps", REDIS_1, gw),
        ("gateway redis:// / memory://, CPU per request", "cpu", REDIS_1, gw),
        ("gateway redis+cached:// / memory://, req/s", "rps", CACHED_1, gw),
        ("gateway redis+cached:// / memory://, CPU per request", "cpu", CACHED_1, gw),
        ("gateway redis:// 2 workers / 1 worker, req/s", "rps", REDIS_2, REDIS_1),
        ("gateway redis+cached:// 2 workers / 1 worker, req/s", "rps", CACHED_2, CACHED_1),
        ("LiteLLM / gateway, req/s", "rps", lite, gw),
        ("LiteLLM / gateway, CPU per request", "cpu", lite, gw),
    ]  # fmt: skip
    for label, kind, a, b in pairs:
        got = (_cpu_ratio if kind == "cpu" else _rps_ratio)(res, a, b)
        if got is not None:
            out.append((label, f"{got[0]:.2f}x"))
    up_rate = res.row(f"upstream alone @ {rate:g}/s")
    gw_rate = res.row(f"gateway, memory:// @ {rate:g}/s")
    if up_rate and gw_rate and up_rate.p99_ms is not None and gw_rate.p99_ms is not None:
        d99 = gw_rate.p99_ms - up_rate.p99_ms
        out.append((f"gateway p99 minus upstream alone p99 at {rate:g} req/s", f"{d99:+.2f} ms"))
    return out


def _row_line(r: Row) -> str:
    if r.error:
        error = r.error.replace("|", "\\|").replace("\n", " ")
        return f"| {r.name} | - | - | - | - | - | - | failed: {error} |"
    notes = "; ".join(r.notes).replace("|", "\\|")
    return (
        f"| {r.name} | {fmt(r.rps, 0)} | {fmt(r.p50_ms)} | {fmt(r.p99_ms)} "
        f"| {fmt(r.cpu_ms, 3)} | {fmt(r.upstream_cpu_ms, 3)} | {fmt(r.rss_mb, 1)} | {notes} |"
    )


def markdown(res: Results, args: argparse.Namespace) -> str:
    m = res.meta
    lines = [
        "# tokengateway benchmarks",
        "",
        f"- date: {m.get('date')}; command: `make bench` → `{m.get('command')}`",
        f"- machine: {m.get('cpus')} CPUs, {m.get('cpu_model')}; Python {m.get('python')}; "
        f"Linux {m.get('kernel')}; load average at start {m.get('loadavg_at_start')}",
        f"- pinning: {m.get('pinning')}",
        f"- each load run: {m.get('warmup_s')} s warm-up, then {m.get('duration_s')} s measured; "
        f"{m.get('wrk')}, {m.get('wrk_threads')} thread(s), {m.get('connections')} connections "
        f"(closed loop); rate rows: benchmarks/pacer.py (open loop)",
    ]
    if m.get("litellm_version"):
        lines.append(f"- LiteLLM {m['litellm_version']} (benchmarks/.litellm-venv)")
    lines += [
        "",
        "| scenario | req/s | p50 ms | p99 ms | CPU ms/req | upstream CPU ms/req "
        "| peak RSS MB | notes |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    groups = list(dict.fromkeys(r.group for r in res.rows))
    for group in groups:
        lines.append(f"| **{group}** | | | | | | | |")
        for r in res.rows:
            if r.group == group:
                lines.append(_row_line(r))
    if res.ttfb:
        lines += [
            "",
            f"Time to first byte, streamed chat, {args.ttfb_n} sequential requests (ms):",
            "",
            "| through | headers p50 | first byte p50 | first byte p90 | first byte p99 "
            "| whole stream p50 |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        for key, t in res.ttfb.items():
            lines.append(
                f"| {key} | {t['headers_p50_ms']:.2f} | {t['first_byte_p50_ms']:.2f} "
                f"| {t['first_byte_p90_ms']:.2f} | {t['first_byte_p99_ms']:.2f} "
                f"| {t['complete_p50_ms']:.2f} |"
            )
    rat = ratios(res, args.rate)
    if rat:
        lines += ["", "Ratios (same run):", "", "| ratio | value |", "|---|---:|"]
        lines += [f"| {label} | {value} |" for label, value in rat]
    lines += cpu_breakdown(res)
    lines += [
        "",
        "Targets (the first round's: gateway, full tutorial policy path, memory storage, "
        'non-streaming, 1 worker; then issue 20\'s, "-" where it asks for a figure without '
        "a bound):",
        "",
        "| target | measured | |",
        "|---|---|:-:|",
    ]
    lines += [f"| {t} | {v} | {ok} |" for t, v, ok in targets(res, args.rate)]
    if res.micro or res.micro_note:
        lines += ["", "Micro-benchmarks (benchmarks/micro.py, µs per operation):", ""]
        if res.micro:
            lines += ["| micro-benchmark | µs/op (median) | min | what |", "|---|---:|---:|---|"]
            lines += [
                f"| {r['name']} | {r['us']:.2f} | {r['min_us']:.2f} | {r['what']} |"
                for r in res.micro
            ]
        if res.micro_note:
            lines += ["", res.micro_note]
    if res.profile or res.profile_note:
        lines += ["", "py-spy, gateway under non-streaming load, top 10 by own samples:", ""]
        if res.profile:
            lines += ["| function (file:line) | % of samples |", "|---|---:|"]
            lines += [f"| `{frame}` | {pct:.1f} |" for frame, pct in res.profile]
        else:
            lines.append(res.profile_note)
    return "\n".join(lines) + "\n"


# --- main --------------------------------------------------------------------------------------


class Deadline(Exception):
    pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=float, default=6, help="measured seconds per run")
    parser.add_argument("--warmup", type=float, default=2, help="warm-up seconds per run")
    parser.add_argument("--connections", type=int, default=32, help="wrk connections")
    parser.add_argument("--rate", type=float, default=1000, help="req/s of the rate scenario")
    parser.add_argument(
        "--repeat", type=int, default=1, help="runs per load scenario; the best is kept"
    )
    parser.add_argument("--ttfb-n", type=int, default=300, help="requests per TTFB series")
    parser.add_argument(
        "--no-litellm",
        dest="litellm",
        action="store_false",
        help="skip the LiteLLM side-by-side (and its install)",
    )
    parser.add_argument(
        "--no-micro", dest="micro", action="store_false", help="skip benchmarks/micro.py"
    )
    parser.add_argument(
        "--no-profile",
        dest="profile",
        action="store_false",
        help="skip the py-spy profile of the gateway",
    )
    parser.add_argument("--no-pin", dest="pin", action="store_false", help="no CPU pinning")
    parser.add_argument(
        "--only",
        metavar="NAMES",
        help=f"only these scenario groups, comma-separated, of: {', '.join(GROUPS)} "
        "(the memory:// gateway's API-key row comes with any group compared with it)",
    )
    parser.add_argument(
        "--tls-only",
        action="store_true",
        help="only the gateway over plain HTTP, over HTTPS and with JWTs, side by side "
        "(--only tls,jwt)",
    )
    parser.add_argument(
        "--flush-period",
        type=float,
        default=0.1,
        metavar="SECONDS",
        help="seconds between flushes of redis+cached:// counters (serve --flush-period)",
    )
    parser.add_argument(
        "--out", type=Path, default=BENCH / "results", help="where latest.md/.json go"
    )
    parser.add_argument(
        "--max-minutes", type=float, default=15, help="stop everything after this long"
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="tracebacks of failures")
    args = parser.parse_args()
    if args.only and args.tls_only:
        parser.error("--tls-only is --only tls,jwt: give one of them")
    if args.tls_only:
        args.only = "tls,jwt"
    if args.only:
        args.groups = [g.strip() for g in args.only.split(",") if g.strip()]
        unknown = sorted(set(args.groups) - set(GROUPS))
        if unknown:
            parser.error(f"unknown group(s) {', '.join(unknown)}; known: {', '.join(GROUPS)}")
    else:
        args.groups = list(GROUPS)
    if not args.litellm and "litellm" in args.groups:
        args.groups.remove("litellm")
    if not args.micro and "micro" in args.groups:
        args.groups.remove("micro")

    if shutil.which("wrk") is None:
        print("wrk is missing: run benchmarks/setup.sh (as root) or `make bench`", file=sys.stderr)
        return 2

    def on_signal(signum: int, frame: object) -> None:
        raise SystemExit(128 + signum)

    def on_alarm(signum: int, frame: object) -> None:
        raise Deadline(f"the bench took longer than --max-minutes {args.max_minutes:g}")

    # Ctrl-C stops the bench and every process it started, even when SIGINT was ignored by
    # whoever started us (a background job of a script inherits it ignored).
    signal.signal(signal.SIGINT, signal.default_int_handler)
    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGHUP, on_signal)
    signal.signal(signal.SIGALRM, on_alarm)
    bench = Bench(args)
    started = time.monotonic()
    code = 0
    try:
        signal.alarm(int(args.max_minutes * 60))
        bench.run()
        if bench.want("micro"):
            bench.micro()
    except Deadline as exc:
        log(str(exc))
        bench.results.rows.append(Row("aborted", "deadline", error=str(exc)))
        code = 1
    except KeyboardInterrupt:
        log("interrupted: stopping every process started")
        code = 130
    except SystemExit as exc:  # SIGTERM / SIGHUP
        log("terminated: stopping every process started")
        code = exc.code if isinstance(exc.code, int) else 1
    finally:
        signal.alarm(0)
        stop_all()
    elapsed = time.monotonic() - started
    bench.results.meta["elapsed_s"] = round(elapsed, 1)
    report = markdown(bench.results, args)
    print(report)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.md").write_text(report)
    data = {
        "meta": bench.results.meta,
        "rows": [asdict(r) for r in bench.results.rows],
        "ttfb": bench.results.ttfb,
        "ratios": dict(ratios(bench.results, args.rate)),
        "targets": [
            {"target": t, "measured": v, "ok": ok} for t, v, ok in targets(bench.results, args.rate)
        ],
        "micro": bench.results.micro,
        "profile": bench.results.profile,
    }
    (args.out / "latest.json").write_text(json.dumps(data, indent=2, ensure_ascii=False))
    log(f"done in {elapsed:.0f}s; logs in {bench.logs}; wrote {args.out / 'latest.md'}")
    if code == 0:
        shutil.rmtree(bench.tmp, ignore_errors=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
