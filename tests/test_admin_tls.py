"""The admin API over TLS with a token (`serve --admin-tls`, always so beyond loopback):
the certificate and token the gateway makes and keeps, `tokengateway kubeconfig` writing
them for kubectl, the real kubectl and the official kubernetes client over real TLS, and
what a wrong token, no token or plain HTTP get. Servers listen on loopback only, so TLS is
asked for with the flag rather than by an address beyond loopback."""

from __future__ import annotations

import base64
import os
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml
from kubernetes import client as k8s

from tests.conftest import TUTORIAL, run_cli
from tests.test_kubeapi import KUBECTL
from tokengateway.runtime.admin_tls import names_for

POLICY = "trlp-tutorial-token-limits"


def wait_for(check: Callable[[], bool], seconds: float = 10) -> bool:
    """Whether `check` holds within `seconds` (the banner is written just after the
    sockets accept, so a moment after the gateway first answers)."""
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def https(url: str) -> str:
    return url.replace("http://", "https://", 1)


def kubectl_with(config: Path, tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    if not os.access(KUBECTL, os.X_OK):
        pytest.fail(f"{KUBECTL} (kubectl 1.32) is required by this test")
    env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KUBECONFIG": str(config)}
    return subprocess.run(
        [KUBECTL, "--cache-dir", str(tmp_path / "cache"), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )


def test_kubectl_and_the_kubernetes_client_over_tls_with_a_kept_token(
    start_gateway, tmp_path
) -> None:
    state = tmp_path / "state"
    gw = start_gateway(TUTORIAL, args=("--admin-tls",), state_dir=state)
    banner = f"admin API on https://{gw.admin_url.removeprefix('http://')}"
    assert wait_for(lambda: banner in gw.output()), gw.output()
    token = (state / "admin-token").read_text().strip()
    assert len(token) >= 32 and (state / "admin-token").stat().st_mode & 0o777 == 0o600
    assert (state / "tls" / "admin.key").stat().st_mode & 0o777 == 0o600

    made = run_cli("kubeconfig", "--admin", gw.admin_url, "--state-dir", str(state))
    assert made.returncode == 0, made.stderr
    config = yaml.safe_load(made.stdout)
    cluster = config["clusters"][0]["cluster"]
    assert cluster["server"] == https(gw.admin_url)
    ca = base64.b64decode(cluster["certificate-authority-data"])
    assert ca == (state / "tls" / "admin.crt").read_bytes()
    assert config["users"][0]["user"] == {"token": token}
    path = tmp_path / "kubeconfig.yaml"
    path.write_text(made.stdout)

    listed = kubectl_with(path, tmp_path, "get", "trlp", "-n", "gateway-system")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].split()[:3] == [POLICY, "True", "True"]

    # a wrong token: kubectl's own words for a 401
    wrong = tmp_path / "wrong.yaml"
    wrong.write_text(made.stdout.replace(token, "not-the-token"))
    refused = kubectl_with(wrong, tmp_path, "get", "trlp", "-A")
    assert refused.returncode == 1 and "You must be logged in to the server" in refused.stderr

    # the official client, trusting the CA, with the token
    (tmp_path / "ca.pem").write_bytes(ca)
    conf = k8s.Configuration()
    conf.host = https(gw.admin_url)
    conf.ssl_ca_cert = str(tmp_path / "ca.pem")
    conf.api_key = {"authorization": f"Bearer {token}"}
    custom = k8s.CustomObjectsApi(k8s.ApiClient(conf))
    got = custom.get_namespaced_custom_object(
        "kuadrant.io", "v1alpha1", "gateway-system", "tokenratelimitpolicies", POLICY
    )
    assert got["metadata"]["name"] == POLICY

    # no token at all, over TLS: a 401 Status
    verify = ssl.create_default_context(cadata=ca.decode())
    none = httpx.get(f"{https(gw.admin_url)}/api/v1/namespaces", verify=verify)
    assert none.status_code == 401 and none.json()["reason"] == "Unauthorized"
    # a client that does not trust the certificate does not get through
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{https(gw.admin_url)}/version")

    # plain HTTP to the TLS port: a 400 that says so, and nothing of the API leaks
    host, port = gw.admin_url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(b"GET /api/v1/secrets HTTP/1.1\r\nHost: x\r\n\r\n")
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    assert answer.startswith(b"HTTP/1.1 400 "), answer
    assert b"plain_http_on_https_port" in answer and b"api_key" not in answer

    # the data path stays plain HTTP, as the Gateway's listener says
    with gw.client() as c:
        assert c.get("/v1/models").status_code == 200


def test_a_restart_keeps_the_certificate_and_the_token(start_gateway, tmp_path) -> None:
    state = tmp_path / "state"
    first = start_gateway(TUTORIAL, args=("--admin-tls",), state_dir=state)
    cert = (state / "tls" / "admin.crt").read_bytes()
    token = (state / "admin-token").read_text()
    first.stop()
    second = start_gateway(TUTORIAL, args=("--admin-tls",), state_dir=state)
    assert wait_for(lambda: "admin API on https://" in second.output()), second.output()
    assert (state / "tls" / "admin.crt").read_bytes() == cert  # kubeconfigs keep working
    assert (state / "admin-token").read_text() == token


def test_a_given_certificate_and_token(start_gateway, tmp_path) -> None:
    made = subprocess.run(
        ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
         "-subj", "/CN=admin.test", "-addext", "subjectAltName=IP:127.0.0.1",
         "-keyout", str(tmp_path / "k.pem"), "-out", str(tmp_path / "c.pem")],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert made.returncode == 0, made.stderr
    args = ("--admin-cert", str(tmp_path / "c.pem"), "--admin-key", str(tmp_path / "k.pem"))
    gw = start_gateway(TUTORIAL, args=(*args, "--admin-token", "given-token"))
    verify = ssl.create_default_context(cafile=str(tmp_path / "c.pem"))
    ok = httpx.get(
        f"{https(gw.admin_url)}/version",
        headers={"Authorization": "Bearer given-token"},
        verify=verify,
    )
    assert ok.status_code == 200 and ok.json()["minor"] == "32"
    config = run_cli(
        "kubeconfig", "--admin", gw.admin_url, "--ca-file", str(tmp_path / "c.pem"),
        "--token", "given-token", "--state-dir", str(tmp_path / "none"),
    )  # fmt: skip
    path = tmp_path / "kubeconfig.yaml"
    path.write_text(config.stdout)
    version = kubectl_with(path, tmp_path, "version")
    assert version.returncode == 0 and "Server Version: v1.32.0" in version.stdout

    alone = run_cli("serve", "--admin-cert", str(tmp_path / "c.pem"), "--listen", "127.0.0.1:0")
    assert alone.returncode == 1 and "--admin-cert and --admin-key go together" in alone.stderr


def test_the_gateways_own_verbs_over_tls(start_gateway, tmp_path) -> None:
    state = tmp_path / "state"
    gw = start_gateway(TUTORIAL, args=("--admin-tls",), state_dir=state)
    token = (state / "admin-token").read_text().strip()
    env = {**os.environ, "TOKENGATEWAY_ADMIN": https(gw.admin_url)}
    env["TOKENGATEWAY_ADMIN_TOKEN"] = token

    def cli(*args: str, ca: bool = True) -> subprocess.CompletedProcess[str]:
        extra = {"TOKENGATEWAY_ADMIN_CA": str(state / "tls" / "admin.crt")} if ca else {}
        return subprocess.run(
            [sys.executable, "-m", "tokengateway", *args],
            capture_output=True, text=True, timeout=60, check=False, env={**env, **extra},
        )  # fmt: skip

    listed = cli("get", "trlp", "-n", "gateway-system")
    assert listed.returncode == 0, listed.stderr
    assert listed.stdout.splitlines()[1].split()[:3] == [POLICY, "True", "True"]
    untrusted = cli("get", "trlp", "-n", "gateway-system", ca=False)
    assert untrusted.returncode == 1 and "CERTIFICATE_VERIFY_FAILED" in untrusted.stderr


def test_a_wildcard_address_gets_a_certificate_for_the_machine() -> None:
    assert names_for("0.0.0.0") == [socket.gethostname(), "127.0.0.1", "::1"]
    assert names_for("10.0.0.5") == ["10.0.0.5"]
