"""`serve --workers N --listen-https`: every worker serves TLS on the one HTTPS socket, with
the certificates of the configuration it serves, and counts in the same Redis.

Real processes on loopback: the gateway and its followers, a real `redis-server`, and
certificates made by the `openssl` command (tests/test_https_listeners.py). Which process
answered a connection is read from /proc, as in tests/test_workers.py: the gateway's end of
the connection is a socket only the process that accepted it holds.
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import ssl
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import openai

from tests.conftest import HOST, MODEL, chat, run_cli
from tests.test_https_listeners import (
    _SNI,
    PKI,
    common_name,
    curl,
    https_listener,
    tls_secret,
    with_listeners,
)
from tests.test_workers import (
    COUNTERS,
    _charged,
    _followers,
    _server_side,
    _socket_inodes,
    _storage,
    _wait_workers,
)


def _who(port: int, client_port: int, pids: list[int]) -> int | None:
    """The worker holding the gateway's end of the connection from `client_port`."""
    inode = _server_side(port, client_port)
    return next((pid for pid in pids if inode in _socket_inodes(pid)), None)


def _handshake(
    gw: Any, pids: list[int], trust: ssl.SSLContext, name: str = HOST
) -> tuple[int | None, dict[str, Any]]:
    """A TLS handshake on a new connection, SNI `name`, verified by `trust`: (the worker
    that made it, the certificate it showed)."""
    with (
        socket.create_connection(("127.0.0.1", gw.https_port), timeout=10) as raw,
        trust.wrap_socket(raw, server_hostname=name) as tls,
    ):
        return _who(gw.https_port, tls.getsockname()[1], pids), tls.getpeercert() or {}


def _tls_post(
    gw: Any, pids: list[int], trust: ssl.SSLContext, key: str = "iamafreeuser"
) -> tuple[int | None, int, dict[str, Any], dict[str, Any]]:
    """One chat completion over TLS on a new connection: (the worker that answered, status,
    body, the certificate it showed)."""
    raw = socket.create_connection(("127.0.0.1", gw.https_port), timeout=30)
    client_port = raw.getsockname()[1]
    conn = http.client.HTTPConnection("127.0.0.1", gw.https_port, timeout=30)
    try:
        conn.sock = trust.wrap_socket(raw, server_hostname=HOST)
        cert = conn.sock.getpeercert() or {}
        conn.request(
            "POST",
            "/v1/chat/completions",
            body=json.dumps(chat(max_tokens=20)),
            headers={
                "Host": HOST,
                "Authorization": f"APIKEY {key}",
                "Content-Type": "application/json",
            },
        )
        resp = conn.getresponse()
        body = json.loads(resp.read() or b"{}")
        return _who(gw.https_port, client_port, pids), resp.status, body, cert
    finally:
        conn.close()
        raw.close()


def _from_every_worker(
    call: Callable[[], tuple[Any, ...]], pids: list[int], at_least: int = 0, attempts: int = 300
) -> list[Any]:
    """`call()` (its first item the worker's pid) until every worker answered one, and
    `at_least` calls were made."""
    seen = []
    for _ in range(attempts):
        seen.append(call())
        if len(seen) >= at_least and {x[0] for x in seen} >= set(pids):
            return seen
    raise AssertionError(f"not every worker of {pids} answered in {attempts} calls: {seen}")


def _start(
    manifests: Any, start_gateway: Any, redis_server: Any, pki: PKI, limit: int = 1000000
) -> tuple[Any, list[int], str]:
    """The tutorial with two HTTPS listeners (its host's certificate and a wildcard one),
    served by two workers counting in Redis: (gateway, pids, the Redis key prefix)."""
    folder = manifests(
        {
            **with_listeners(
                https_listener("https", "tutorial-cert", HOST),
                https_listener("wildcard", "wildcard-cert", "*.example.com"),
            ),
            "limit: 50 ": f"limit: {limit} ",
        },
        extra=tls_secret("tutorial-cert", pki.leaf(HOST, [HOST]))
        + tls_secret("wildcard-cert", pki.leaf("*.example.com", ["*.example.com"])),
    )
    storage, prefix = _storage(redis_server)
    gw = start_gateway(folder, args=("--workers", "2", "--storage", storage), https=True)
    return gw, _wait_workers(gw, 2), prefix


# --- tests ----------------------------------------------------------------------------------------


def test_every_worker_serves_the_tutorial_over_https(
    tmp_path, manifests, start_gateway, redis_server
) -> None:
    pki = PKI(tmp_path / "pki")
    gw, pids, _ = _start(manifests, start_gateway, redis_server, pki)
    assert "HTTPS listeners on the given socket (2 certificate(s) chosen by SNI)" in gw.output()

    # each worker answers chat completions over TLS, with the exact name's certificate
    answered = _from_every_worker(lambda: _tls_post(gw, pids, pki.trust()), pids, at_least=10)
    assert {status for _, status, _, _ in answered} == {200}, answered
    assert {common_name(cert) for _, _, _, cert in answered} == {HOST}
    assert all(body["usage"]["total_tokens"] > 0 for _, _, body, _ in answered)
    # and the wildcard listener's for another name of example.com
    other = _from_every_worker(lambda: _handshake(gw, pids, pki.trust(), "a.example.com"), pids)
    assert {common_name(cert) for _, cert in other} == {"*.example.com"}
    # a name no listener has is refused by every worker: none of them serves a default
    for _ in range(20):
        try:
            _handshake(gw, pids, pki.trust(), "unknown.example.org")
        except ssl.SSLError:
            continue
        raise AssertionError("a handshake for an unknown name succeeded")

    # curl, trusting only the test CA, as docs/tls.md shows it
    done = curl(gw.https_port, pki.ca)
    assert done.returncode == 0, done.stderr
    assert done.stdout.rpartition("\n")[2] == "200 0"
    # the plain listener is still served, by the same processes
    with gw.client() as c:
        assert c.get("/v1/models").status_code == 200
    assert "Traceback" not in gw.output() and "error: worker" not in gw.output()


def test_a_rotated_certificate_reaches_every_worker(
    tmp_path, manifests, start_gateway, redis_server
) -> None:
    pki = PKI(tmp_path / "pki")
    gw, pids, _ = _start(manifests, start_gateway, redis_server, pki)
    before = _from_every_worker(lambda: _handshake(gw, pids, pki.trust()), pids)
    assert {("DNS", "rotated.example.com") in cert["subjectAltName"] for _, cert in before} == {
        False
    }
    # a connection to each worker opened before the rotation keeps its certificate, and works
    kept = {}
    for _ in range(300):
        trust = pki.trust()
        raw = socket.create_connection(("127.0.0.1", gw.https_port), timeout=30)
        conn = http.client.HTTPConnection("127.0.0.1", gw.https_port, timeout=30)
        conn.sock = trust.wrap_socket(raw, server_hostname=HOST)
        pid = _who(gw.https_port, conn.sock.getsockname()[1], pids)
        if pid is None or pid in kept:
            conn.close()
            continue
        kept[pid] = conn
        if set(kept) == set(pids):
            break
    assert set(kept) == set(pids)

    # `tokengateway apply` changes the Secret: a new CA too, so only the new one verifies
    rotated = PKI(tmp_path / "rotated")
    secret = tmp_path / "rotated.yaml"
    secret.write_text(
        tls_secret("tutorial-cert", rotated.leaf(HOST, [HOST, "rotated.example.com"]))
    )
    done = run_cli("apply", "-f", str(secret), "--admin", gw.admin_url)
    assert done.returncode == 0, done.stderr
    assert "configured" in done.stdout

    # apply returned once every worker confirmed: from now on, no handshake shows the old one
    after = _from_every_worker(lambda: _handshake(gw, pids, rotated.trust()), pids, at_least=20)
    assert {("DNS", "rotated.example.com") in cert["subjectAltName"] for _, cert in after} == {True}
    for _ in range(10):
        try:
            _handshake(gw, pids, pki.trust())
        except ssl.SSLCertVerificationError:
            continue
        raise AssertionError("a worker still shows the certificate of the old CA")
    for pid, conn in kept.items():
        conn.request("GET", "/v1/models", headers={"Host": HOST, "Authorization": "APIKEY x"})
        resp = conn.getresponse()
        resp.read()
        assert resp.status == 401, pid  # answered (the key is wrong) on the old connection
        conn.close()
    assert "did not confirm" not in gw.output()


def test_workers_share_one_limit_over_https_with_the_openai_sdk(
    tmp_path, manifests, start_gateway, redis_server
) -> None:
    limit, threads = 400, 4
    pki = PKI(tmp_path / "pki")
    gw, pids, prefix = _start(manifests, start_gateway, redis_server, pki, limit=limit)

    def one() -> tuple[int | None, int, int]:
        """A request of the official SDK on a new TLS connection: (worker, status, tokens)."""
        trust = pki.trust()
        with httpx.Client(verify=trust, transport=_SNI(HOST, verify=trust)) as http:
            client = openai.OpenAI(
                base_url=f"https://127.0.0.1:{gw.https_port}/v1",
                api_key="unused",
                default_headers={"Authorization": "APIKEY iamafreeuser", "Host": HOST},
                http_client=http,
                max_retries=0,
            )
            try:
                raw = client.chat.completions.with_raw_response.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=20
                )
            except openai.RateLimitError as exc:
                response, tokens = exc.response, 0
            else:
                response = raw.http_response
                usage = raw.parse().usage
                assert usage is not None
                tokens = usage.total_tokens
            stream = response.extensions["network_stream"]
            client_port = stream.get_extra_info("client_addr")[1]
            return _who(gw.https_port, client_port, pids), response.status_code, tokens

    def user() -> list[tuple[int | None, int, int]]:
        out = []
        while not out or out[-1][1] != 429:
            assert len(out) < 200, out
            out.append(one())
        return out

    with ThreadPoolExecutor(threads) as pool:
        results = [r for batch in pool.map(lambda _: user(), range(threads)) for r in batch]
    assert {status for _, status, _ in results} == {200, 429}
    # both processes let requests through over TLS
    assert {pid for pid, status, _ in results if status == 200} == set(pids), results
    used = sum(tokens for _, _, tokens in results)
    deadline = time.monotonic() + 5
    while _charged(redis_server, prefix) != used and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _charged(redis_server, prefix) == used  # one counter in Redis, for both
    biggest = max(tokens for _, _, tokens in results)
    assert limit // 2 < used < limit + threads * biggest  # crossed once, not once per worker
    counters = httpx.get(gw.admin_url + COUNTERS, timeout=10).json()
    assert [c["remaining"] for c in counters] == [0]

    # spent for every worker, over TLS
    after = _from_every_worker(lambda: one(), pids)
    assert {status for _, status, _ in after} == {429}, after


def test_a_follower_started_again_serves_https_too(
    tmp_path, manifests, start_gateway, redis_server
) -> None:
    pki = PKI(tmp_path / "pki")
    gw, (leader, follower), _ = _start(manifests, start_gateway, redis_server, pki)
    os.kill(follower, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while True:
        now = _followers(leader)
        if now and now != [follower] and f"(pid {now[0]}) serving" in gw.output():
            break
        assert time.monotonic() < deadline, gw.output()
        time.sleep(0.05)
    # the new follower got the HTTPS socket and the certificates of the current configuration
    pids = [leader, *now]
    answered = _from_every_worker(lambda: _tls_post(gw, pids, pki.trust()), pids)
    assert {status for _, status, _, _ in answered} == {200}, answered
    assert {common_name(cert) for _, _, _, cert in answered} == {HOST}
