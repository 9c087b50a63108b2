"""Replicas that follow a Kubernetes API (`serve --kubeconfig`): a control-plane gateway and
follower replicas on one Redis, all real processes, changed with the real kubectl.

The followers use lightkube's own list and watch against the control plane's Kubernetes API:
nothing between our processes is a protocol of our own.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import HOST, TUTORIAL, chat, free_socket, require

TRLP = "trlp-tutorial-token-limits"
TRLP_PATH = "/apis/kuadrant.io/v1alpha1/namespaces/gateway-system/tokenratelimitpolicies/" + TRLP


class Process:
    """`tokengateway serve ...` on fixed loopback ports, so that it can be killed and started
    again at the same address."""

    def __init__(self, name: str, args: list[str], folder: Path, env: dict[str, str]) -> None:
        self.name = name
        self.args = args
        self.folder = folder
        self.env = env
        self.port = _port()
        self.admin_port = _port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, wait: bool = True) -> Process:
        """Start; on a first start whose ports another process took meanwhile (a port is
        picked free, then bound later by the gateway), pick new ones and start again."""
        first = self.starts == 0
        for _ in range(3):
            self._spawn()
            if not first or not self._lost_its_port():
                break
            self.port, self.admin_port = _port(), _port()
            self.url = f"http://127.0.0.1:{self.port}"
            self.admin_url = self.admin_url.rsplit(":", 1)[0] + f":{self.admin_port}"
        if wait:
            self.wait_ready()
        return self

    def _lost_its_port(self, timeout: float = 20) -> bool:
        """Whether the process exited because its address was in use (else it listens)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc is not None
            if self.proc.poll() is not None:
                log = self.folder / f"{self.name}-{self.starts}.log"
                return "Address already in use" in log.read_text(errors="replace")
            with socket.socket() as probe:
                if probe.connect_ex(("127.0.0.1", self.admin_port)) == 0:
                    return False
            time.sleep(0.05)
        return False

    def _spawn(self) -> None:
        self.starts += 1
        log = open(self.folder / f"{self.name}-{self.starts}.log", "wb")  # noqa: SIM115
        cmd = [sys.executable, "-m", "tokengateway", "serve", "--no-access-log"]
        cmd += ["--listen", f"127.0.0.1:{self.port}", "--admin", f"127.0.0.1:{self.admin_port}"]
        if "--state-dir" not in self.args:
            cmd += ["--state-dir", str(self.folder / f"{self.name}-state")]
        self.proc = subprocess.Popen(
            cmd + self.args,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=log,
            env={**os.environ, **self.env},
        )
        log.close()

    def output(self) -> str:
        return "\n".join(
            p.read_text(errors="replace") for p in sorted(self.folder.glob(f"{self.name}-*.log"))
        )

    def wait_ready(self, timeout: float = 40) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited: {self.output()}")
            try:
                if httpx.get(self.admin_url + "/healthz", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"{self.name} did not start: {self.output()}")
            time.sleep(0.05)

    def health(self) -> dict:
        return httpx.get(self.admin_url + "/healthz", timeout=5).json()

    def figures(self) -> dict[str, float]:
        text = httpx.get(self.admin_url + "/metrics", timeout=5).text
        out = {}
        for line in text.splitlines():
            if line.startswith("tokengateway_") and " " in line and "{" not in line:
                name, value = line.rsplit(" ", 1)
                out[name.removeprefix("tokengateway_")] = float(value)
        return out

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def _port() -> int:
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    return port


@pytest.fixture
def processes(tmp_path: Path):
    made: list[Process] = []

    def make(name: str, args: list[str], env: dict[str, str] | None = None) -> Process:
        proc = Process(name, args, tmp_path, env or {})
        made.append(proc)
        return proc

    yield make
    for proc in made:
        proc.stop()


def kubectl(kubeconfig: Path, *args: str, stdin: str | None = None) -> str:
    result = subprocess.run(
        [require("kubectl"), "--kubeconfig", str(kubeconfig), *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def control_plane(processes, tmp_path: Path, folder: Path = TUTORIAL, *extra: str):
    """A gateway serving the tutorial, whose admin API the followers follow, and a
    kubeconfig for it (from `tokengateway kubeconfig`)."""
    state = tmp_path / "cp-state"
    cp = processes("cp", ["-f", str(folder), "--state-dir", str(state), *extra]).start()
    config = tmp_path / "cp.yaml"
    made = subprocess.run(
        [sys.executable, "-m", "tokengateway", "kubeconfig", "--admin", cp.admin_url],
        capture_output=True,
        text=True,
        check=True,
    )
    config.write_text(made.stdout)
    return cp, config


def set_limit(kubeconfig: Path, tier: str, value: int) -> None:
    """`kubectl patch` of the tutorial's token limit for a tier, sent to the control plane."""
    change = [{"op": "replace", "path": f"/spec/limits/{tier}/rates/0/limit", "value": value}]
    kubectl(
        kubeconfig,
        "patch",
        "trlp",
        TRLP,
        "-n",
        "gateway-system",
        "--type=json",
        "-p",
        json.dumps(change),
    )


def limit_of(proc: Process, tier: str = "free") -> int | None:
    r = httpx.get(proc.admin_url + TRLP_PATH, timeout=5)
    if r.status_code != 200:
        return None
    return r.json()["spec"]["limits"][tier]["rates"][0]["limit"]


def wait_for(check, timeout: float = 10.0, step: float = 0.02):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not true within {timeout}s: {check}")
        time.sleep(step)


def post(client: httpx.Client) -> httpx.Response:
    return client.post("/v1/chat/completions", json=chat(max_tokens=20))


def clients(*procs: Process, key: str = "iamafreeuser") -> list[httpx.Client]:
    headers = {"Host": HOST, "Authorization": f"APIKEY {key}"}
    return [httpx.Client(base_url=p.url, headers=headers, timeout=30) for p in procs]


def test_followers_enforce_what_kubectl_applies_to_the_control_plane(
    processes, tmp_path, redis_server
) -> None:
    redis_server.cli("FLUSHALL")
    cp, config = control_plane(processes, tmp_path)
    storage = ["--storage", redis_server.url]
    one = processes("one", ["--kubeconfig", str(config), *storage]).start()
    two = processes("two", ["--kubeconfig", str(config), *storage]).start()
    for f in (one, two):
        health = f.health()["config"]
        assert health["follows"] == cp.admin_url and health["synced"] and health["connected"]
        assert limit_of(f) == 50  # the tutorial's free tier, as the control plane holds it

    # a lower limit, applied with kubectl to the control plane, reaches both replicas
    applied = time.monotonic()
    set_limit(config, "free", 30)
    wait_for(lambda: limit_of(one) == 30 and limit_of(two) == 30)
    took = time.monotonic() - applied
    print(f"both replicas followed in {took:.3f}s")
    assert took < 5, f"replicas took {took:.2f}s to follow"  # measured: ~0.1 s

    # one shared counter: requests spread over both replicas stop at one limit
    a, b = clients(one, two)
    used, codes = 0, []
    for i in range(20):
        r = post(a if i % 2 == 0 else b)
        codes.append(r.status_code)
        if r.status_code == 429:
            break
        assert r.status_code == 200, r.text
        used += r.json()["usage"]["total_tokens"]
    assert codes[-1] == 429 and 30 <= used < 30 + 40, (codes, used)
    assert 200 in codes[::2] and 200 in codes[1::2]  # both served before the limit
    assert post(a).status_code == 429 and post(b).status_code == 429

    # kubectl delete lifts the limits on both
    kubectl(config, "delete", "trlp", TRLP, "-n", "gateway-system")
    wait_for(lambda: limit_of(one) is None and limit_of(two) is None)
    assert post(a).status_code == 200 and post(b).status_code == 200

    # a new API key reaches the replicas; a Secret no policy selects is not held there
    kubectl(
        config,
        "apply",
        "-f",
        "-",
        stdin="""
apiVersion: v1
kind: Secret
metadata:
  name: new-key
  namespace: kuadrant-system
  labels: {authorino.kuadrant.io/managed-by: authorino, app: my-llm}
  annotations: {kuadrant.io/groups: free, secret.kuadrant.io/user-id: user-9}
stringData: {api_key: iamanewuser}
---
apiVersion: v1
kind: Secret
metadata: {name: db-password, namespace: default}
stringData: {password: hunter2}
""",
    )
    (new,) = clients(one, key="iamanewuser")
    wait_for(lambda: post(new).status_code == 200)
    new.close()
    held = httpx.get(one.admin_url + "/api/v1/secrets", timeout=5).json()["items"]
    names = {s["metadata"]["name"] for s in held}
    assert "new-key" in names and "db-password" not in names

    # a write to a replica is refused: it names where changes are made
    refused = subprocess.run(
        [require("kubectl"), "-s", one.admin_url, "delete", "svc", "-n", "gateway-system", "x"],
        capture_output=True,
        text=True,
        check=False,
    )
    assert refused.returncode != 0
    assert "MethodNotAllowed" in refused.stderr and cp.admin_url in refused.stderr
    for c in (a, b):
        c.close()


def test_replicas_serve_through_a_control_plane_restart(processes, tmp_path, redis_server) -> None:
    redis_server.cli("FLUSHALL")
    cp, config = control_plane(processes, tmp_path)
    storage = ["--storage", redis_server.url]
    one = processes("one", ["--kubeconfig", str(config), *storage]).start()
    two = processes("two", ["--kubeconfig", str(config), *storage]).start()
    gold = clients(one, two, key="iamagolduser")  # 200 tokens a minute: room to keep asking
    failures: list[str] = []
    served = [0]
    stop = threading.Event()

    def traffic() -> None:
        i = 0
        while not stop.is_set():
            try:
                r = post(gold[i % 2])
                if r.status_code not in (200, 429):
                    failures.append(f"{r.status_code} {r.text[:200]}")
                served[0] += 1
            except httpx.HTTPError as exc:
                failures.append(repr(exc))
            i += 1
            time.sleep(0.02)

    set_limit(config, "gold", 195)
    wait_for(lambda: limit_of(one, "gold") == 195 and limit_of(two, "gold") == 195)
    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        time.sleep(0.3)
        cp.kill()  # no goodbye: the watches break
        wait_for(lambda: not one.health()["config"]["connected"], timeout=15)
        down = one.health()["config"]
        assert down["watch_errors"] > 0 and down["config_age_seconds"] > 0
        assert one.figures()["config_age_seconds"] > 0
        time.sleep(1.0)  # replicas keep serving the last configuration
        cp.start()  # same state dir, same address: nothing applied before is lost
        assert limit_of(cp, "gold") == 195
        # a change made as soon as it is back reaches both replicas
        set_limit(config, "gold", 190)
        wait_for(lambda: limit_of(one, "gold") == 190 and limit_of(two, "gold") == 190, 20)
        wait_for(lambda: one.health()["config"]["connected"], timeout=15)
        assert one.figures()["config_age_seconds"] == 0
    finally:
        stop.set()
        thread.join()
    assert failures == []
    assert served[0] > 20
    for c in gold:
        c.close()


def test_a_gateway_of_another_class_is_left_alone(processes, tmp_path, manifests) -> None:
    folder = manifests(
        extra="""
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: theirs, namespace: gateway-system}
spec:
  gatewayClassName: someone-else
  listeners: [{name: http, port: 80, protocol: HTTP}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: theirs, namespace: gateway-system}
spec:
  parentRefs: [{name: theirs}]
  hostnames: [theirs.example.com]
  rules: [{backendRefs: [{name: nowhere, port: 80}]}]
""",
    )
    # both leave it alone: the control plane would otherwise refuse its missing Service
    _cp, config = control_plane(processes, tmp_path, folder, "--gateway-class", "istio")
    mine = processes("mine", ["--kubeconfig", str(config), "--gateway-class", "istio"]).start()
    (free,) = clients(mine)
    assert post(free).status_code == 200  # the tutorial's Gateway is of class istio
    theirs = free.post("/v1/chat/completions", json=chat(), headers={"Host": "theirs.example.com"})
    assert theirs.status_code == 404  # not served, and no error about its missing Service
    assert mine.health()["config"].get("skipped") is None
    # the control plane keeps it as an API server does, with no status of ours
    route = json.loads(
        kubectl(config, "get", "httproute", "theirs", "-n", "gateway-system", "-o", "json")
    )
    assert "parents" not in route.get("status", {})
    free.close()


def test_status_is_written_by_one_replica_and_taken_over(processes, tmp_path, manifests) -> None:
    folder = manifests(replace={"gatewayClassName: istio": "gatewayClassName: tokengateway"})
    # the control plane serves another class: like a cluster's API server, it only stores the
    # status the elected replica writes for Gateways of class tokengateway
    _cp, config = control_plane(processes, tmp_path, folder, "--gateway-class", "none")
    args = ["--kubeconfig", str(config), "--gateway-class", "tokengateway"]
    args += ["--lease-duration", "2"]
    one = processes("one", args, {"TOKENGATEWAY_POD_NAME": "replica-one"}).start()
    wait_for(lambda: one.figures().get("status_writer") == 1)
    two = processes("two", args, {"TOKENGATEWAY_POD_NAME": "replica-two"}).start()

    def trlp() -> dict:
        return json.loads(
            kubectl(config, "get", "trlp", TRLP, "-n", "gateway-system", "-o", "json")
        )

    def conditions(obj: dict) -> dict[str, str]:
        return {c["type"]: c["status"] for c in obj.get("status", {}).get("conditions", [])}

    wait_for(lambda: conditions(trlp()) == {"Accepted": "True", "Enforced": "True"})
    gateway = json.loads(kubectl(config, "get", "gateway", "-n", "gateway-system", "-o", "json"))[
        "items"
    ][0]
    assert conditions(gateway)["Programmed"] == "True"
    assert gateway["status"]["addresses"] == [{"type": "IPAddress", "value": "127.0.0.1"}]
    lease = json.loads(kubectl(config, "get", "lease", "tokengateway-status", "-o", "json"))
    assert lease["spec"]["holderIdentity"] == "replica-one"

    # written once, by the holder only
    time.sleep(1.5)
    assert one.figures()["status_writes_total"] >= 3  # Gateway, HTTPRoute, policies
    assert two.figures()["status_writer"] == 0
    assert two.figures()["status_writes_total"] == 0

    # the holder dies; once its Lease runs out the other replica writes
    one.kill()
    wait_for(lambda: two.figures()["status_writer"] == 1, timeout=15)
    set_limit(config, "free", 40)
    generation = trlp()["metadata"]["generation"]
    wait_for(
        lambda: all(c["observedGeneration"] == generation for c in trlp()["status"]["conditions"])
    )
    lease = json.loads(kubectl(config, "get", "lease", "tokengateway-status", "-o", "json"))
    assert lease["spec"]["holderIdentity"] == "replica-two"
    assert lease["spec"]["leaseTransitions"] >= 1
    assert two.figures()["status_writes_total"] >= 1


async def test_an_expired_watch_lists_again_and_misses_nothing(processes, tmp_path) -> None:
    """An informer away while its policy is deleted and 1000 other changes push its version
    out of the server's history: watching on from it is answered 410, and the list that
    follows drops the deleted policy."""
    from tokengateway.controlplane.follower.follow import load_client
    from tokengateway.controlplane.follower.informer import Informer
    from tokengateway.controlplane.follower.kinds import WATCHED

    cp, config = control_plane(processes, tmp_path)
    client, server, _ = load_client(str(config))
    assert server == cp.admin_url
    kind = next(k for k in WATCHED if k.kind == "TokenRateLimitPolicy")
    key = ("TokenRateLimitPolicy", "gateway-system", TRLP)
    informer = Informer(client, kind, lambda: None)
    task = asyncio.create_task(informer.run())
    await asyncio.wait_for(informer.synced.wait(), 10)
    assert key in informer.objects
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    known = informer.version

    kubectl(config, "delete", "trlp", TRLP, "-n", "gateway-system")
    leases = "\n---\n".join(
        f"apiVersion: coordination.k8s.io/v1\nkind: Lease\n"
        f"metadata: {{name: filler-{i}, namespace: default}}\nspec: {{holderIdentity: x}}"
        for i in range(1001)
    )
    async with httpx.AsyncClient() as http:
        r = await http.post(cp.admin_url + "/apis/apply", content=leases, timeout=60)
        assert r.status_code == 200, r.text

    task = asyncio.create_task(informer.run())  # on from `known`, which the server forgot
    try:
        deadline = time.monotonic() + 10
        while key in informer.objects:
            assert time.monotonic() < deadline, "the deleted policy is still held"
            await asyncio.sleep(0.02)
        assert informer.relists == 1 and informer.version != known
        assert informer.errors == 0
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        await client.close()


def test_in_cluster_follows_over_tls_with_the_service_account_token(processes, tmp_path) -> None:
    """`--kubeconfig in-cluster` as in a pod: KUBERNETES_SERVICE_HOST/PORT and a mounted
    service account (token, ca.crt, namespace), against a control plane serving HTTPS with a
    token. A wrong token is refused and said so; nothing is served from it."""
    state = tmp_path / "cp-state"
    cp = processes("cp", ["-f", str(TUTORIAL), "--state-dir", str(state), "--admin-tls"])
    cp.admin_url = cp.admin_url.replace("http://", "https://")
    cp.start(wait=False)
    ca = state / "tls" / "admin.crt"
    wait_for(lambda: (state / "admin-token").exists() and ca.exists(), timeout=30)
    account = tmp_path / "serviceaccount"
    account.mkdir()
    (account / "token").write_text((state / "admin-token").read_text().strip())
    (account / "ca.crt").write_bytes(ca.read_bytes())
    (account / "namespace").write_text("tokengateway-system")
    env = {
        "KUBERNETES_SERVICE_HOST": "127.0.0.1",
        "KUBERNETES_SERVICE_PORT": str(cp.admin_port),
        "TOKENGATEWAY_SERVICE_ACCOUNT_DIR": str(account),
        "TOKENGATEWAY_POD_NAME": "pod-a",
    }
    pod = processes("pod", ["--kubeconfig", "in-cluster"], env)
    pod.start(wait=False)
    wait_for(lambda: _get(pod.admin_url + "/readyz") == 200, timeout=40)
    (free,) = clients(pod)
    assert post(free).status_code == 200
    free.close()
    assert pod.health()["config"]["follows"] == f"https://127.0.0.1:{cp.admin_port}"
    # the Lease is made in the service account's namespace
    token = (state / "admin-token").read_text().strip()
    lease = httpx.get(
        cp.admin_url
        + "/apis/coordination.k8s.io/v1/namespaces/tokengateway-system/leases/tokengateway-status",
        headers={"Authorization": f"Bearer {token}"},
        verify=ssl.create_default_context(cafile=str(ca)),
        timeout=5,
    )
    assert lease.status_code == 200 and lease.json()["spec"]["holderIdentity"] == "pod-a"

    wrong = account.parent / "wrong"
    wrong.mkdir()
    for name in ("ca.crt", "namespace"):
        (wrong / name).write_bytes((account / name).read_bytes())
    (wrong / "token").write_text("not-the-token")
    bad = processes("bad", ["--kubeconfig", "in-cluster"])
    bad.env = {**env, "TOKENGATEWAY_SERVICE_ACCOUNT_DIR": str(wrong)}
    bad.start(wait=False)
    wait_for(lambda: "401" in bad.output(), timeout=20)
    assert "Traceback" not in bad.output()
    assert _get(bad.admin_url + "/readyz") in (503, None)


def _get(url: str) -> int | None:
    try:
        return httpx.get(url, timeout=2, verify=False).status_code
    except httpx.HTTPError:
        return None


def test_a_replica_restarted_while_the_server_is_away_serves_what_it_saved(
    processes, tmp_path
) -> None:
    cp, config = control_plane(processes, tmp_path)
    one = processes("one", ["--kubeconfig", str(config)]).start()
    set_limit(config, "free", 30)
    wait_for(lambda: limit_of(one) == 30)
    saved = tmp_path / "one-state" / "followed.json"
    wait_for(saved.exists)
    assert oct(saved.stat().st_mode & 0o777) == "0o600"  # it holds the selected API keys
    cp.kill()
    one.stop()
    one.start()  # the API server is still away
    (free,) = clients(one)
    assert post(free).status_code == 200
    health = one.health()["config"]
    assert health["restored"] and not health["connected"] and health["config_age_seconds"] > 0
    assert limit_of(one) == 30  # what it served before, not the tutorial's 50
    cp.start()
    wait_for(lambda: "restored" not in one.health()["config"], timeout=20)
    assert one.health()["config"]["connected"]
    assert one.figures()["config_age_seconds"] == 0
    free.close()


def test_stops_are_prompt_with_watches_open_and_before_the_first_sync(processes, tmp_path) -> None:
    """A control plane whose followers hold watches open ends them when it stops, as the
    API server does, instead of waiting its 10 s graceful timeout for them; and a replica
    still waiting for its first configuration stops on SIGTERM at once."""
    cp, config = control_plane(processes, tmp_path)
    one = processes("one", ["--kubeconfig", str(config)]).start()
    wait_for(lambda: _get(one.admin_url + "/readyz") == 200, timeout=30)
    assert cp.proc is not None
    began = time.monotonic()
    cp.stop()  # SIGTERM: the follower's watches are open
    assert cp.proc.returncode == 0
    assert time.monotonic() - began < 5, cp.output()[-2000:]
    assert "still busy" not in cp.output()  # every watch ended before the deadline

    late = processes("late", ["--kubeconfig", str(config)])  # its control plane is gone
    late.start(wait=False)
    assert late.proc is not None
    wait_for(lambda: _get(late.admin_url + "/healthz") is None and late.starts == 1, timeout=5)
    time.sleep(1.0)  # retrying its first sync
    began = time.monotonic()
    late.stop()
    assert time.monotonic() - began < 5, late.output()[-2000:]
    assert "Traceback" not in late.output()


def test_a_replica_sends_a_backend_override_to_its_url(processes, tmp_path, upstream) -> None:
    """`serve --kubeconfig ... --backend SERVICE=URL`: the Service comes from the API server
    after the replica starts, so the override is not refused for naming no Service yet."""
    answer = {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 3, "completion_tokens": 2, "total_tokens": 5},
    }
    up = upstream(
        lambda path, body: (200, {"content-type": "application/json"}, json.dumps(answer).encode())
    )
    _cp, config = control_plane(processes, tmp_path)
    one = processes(
        "one", ["--kubeconfig", str(config), "--backend", f"trlp-tutorial-llm-sim={up.url}"]
    ).start()
    wait_for(lambda: _get(one.admin_url + "/readyz") == 200, timeout=30)
    (free,) = clients(one)
    r = post(free)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["total_tokens"] == 5
    assert [path for path, _, _ in up.requests] == ["/v1/chat/completions"]
