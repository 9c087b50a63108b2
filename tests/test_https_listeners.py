"""HTTPS listeners from the Gateway manifest, over real TLS on loopback (docs/tls.md).

Certificates are made here with the `openssl` command: a CA, and leaves it signs with
subjectAltNames (an expired one with `openssl ca -startdate/-enddate`). The gateway serves
every HTTPS listener on one `--listen-https` socket and picks the certificate by SNI;
curl and the official `openai` SDK check it against the CA.
"""

from __future__ import annotations

import base64
import json
import socket
import ssl
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import HOST, MODEL, chat
from tokengateway.config.compile import compile_config
from tokengateway.resources import load_paths, parse_resources

GATEWAY = (
    "/apis/gateway.networking.k8s.io/v1/namespaces/gateway-system/gateways/trlp-tutorial-gateway"
)
CURL = "/usr/bin/curl"


# --- certificates -------------------------------------------------------------------------------


class PKI:
    """A CA in a folder, and leaf certificates it signs."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        self._openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-days", "2", "-subj", "/CN=tokengateway test CA", "-keyout", "ca.key",
            "-out", "ca.crt", "-addext", "basicConstraints=critical,CA:TRUE",
            "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        )  # fmt: skip
        (folder / "index.txt").write_text("")
        (folder / "serial").write_text("1000\n")
        (folder / "ca.cnf").write_text(
            "[ca]\ndefault_ca = d\n[d]\ndatabase = index.txt\nnew_certs_dir = .\n"
            "serial = serial\ndefault_md = sha256\npolicy = p\ncopy_extensions = copy\n"
            "unique_subject = no\n[p]\ncommonName = supplied\n"
            "countryName = optional\norganizationName = optional\n"
            "organizationalUnitName = optional\nlocalityName = optional\n"
        )
        self.ca = folder / "ca.crt"

    def _openssl(self, *args: str) -> None:
        done = subprocess.run(
            ["openssl", *args], cwd=self.folder, capture_output=True, text=True, check=False
        )
        assert done.returncode == 0, done.stderr

    def issue(
        self, name: str, subject: str, extensions: list[str], expired: bool = False
    ) -> tuple[Path, Path]:
        """(certificate file, key file): a new P-256 key and a certificate the CA signs for
        `subject` (its order kept) with these `-addext` extensions, valid two days, or
        expired in 2020."""
        addext = [arg for ext in extensions for arg in ("-addext", ext)]
        self._openssl(
            "req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-subj", subject, "-keyout", f"{name}.key", "-out", f"{name}.csr", *addext,
        )  # fmt: skip
        dates = (
            ["-startdate", "20200101000000Z", "-enddate", "20200102000000Z"]
            if expired
            else ["-days", "2"]
        )
        self._openssl(
            "ca", "-batch", "-config", "ca.cnf", "-cert", "ca.crt", "-keyfile", "ca.key",
            "-notext", "-preserveDN", "-in", f"{name}.csr", "-out", f"{name}.crt", *dates,
        )  # fmt: skip
        return self.folder / f"{name}.crt", self.folder / f"{name}.key"

    def leaf(self, cn: str, sans: list[str], expired: bool = False) -> tuple[str, str]:
        """(certificate PEM, key PEM) of a server certificate for `cn` and `sans`."""
        names = "subjectAltName=" + ",".join(f"DNS:{s}" for s in sans)
        cert, key = self.issue(
            cn.replace("*", "star"), f"/CN={cn}", [names, "extendedKeyUsage=serverAuth"], expired
        )
        return cert.read_text(), key.read_text()

    def client(
        self, subject: str, *, expired: bool = False, usage: str = "clientAuth"
    ) -> tuple[Path, Path]:
        """(certificate file, key file) of a client certificate with this subject
        (`/CN=aisha/O=ACME Inc.`), for `usage` (an extendedKeyUsage)."""
        name = "client-" + "".join(c if c.isalnum() else "-" for c in subject).strip("-")
        return self.issue(name, subject, [f"extendedKeyUsage={usage}"], expired)

    def trust(self) -> ssl.SSLContext:
        return ssl.create_default_context(cafile=str(self.ca))


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path / "pki")


def tls_secret(
    name: str, pair: tuple[str, str], namespace: str = "gateway-system", string: bool = False
) -> str:
    """A `kubernetes.io/tls` Secret, its PEMs in base64 `data` or in `stringData`."""
    cert, key = pair
    if string:
        body = {"stringData": {"tls.crt": cert, "tls.key": key}}
    else:
        b64 = {
            k: base64.b64encode(v.encode()).decode()
            for k, v in (("tls.crt", cert), ("tls.key", key))
        }
        body = {"data": b64}
    doc = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace},
        "type": "kubernetes.io/tls",
        **body,
    }
    return "---\n" + json.dumps(doc) + "\n"


def https_listener(
    name: str, secret: str, hostname: str | None, namespace: str | None = None
) -> str:
    ref = {"name": secret} | ({"namespace": namespace} if namespace else {})
    host = f"    hostname: {json.dumps(hostname)}\n" if hostname else ""
    return (
        f"  - name: {name}\n    protocol: HTTPS\n    port: 443\n{host}"
        f"    tls: {{mode: Terminate, certificateRefs: [{json.dumps(ref)}]}}\n"
        "    allowedRoutes: {namespaces: {from: All}}\n"
    )


def with_listeners(*listeners: str) -> dict[str, str]:
    """`manifests` replacements adding listeners to the tutorial's Gateway (its `http` one
    kept)."""
    return {"  listeners:\n": "  listeners:\n" + "".join(listeners)}


# --- clients ------------------------------------------------------------------------------------


def peer(port: int, server_name: str | None, trust: ssl.SSLContext | None = None) -> dict[str, Any]:
    """The certificate the gateway shows for `server_name` (None: no SNI), as verified by
    `trust` (or unverified, decoded from DER by a trusting round trip)."""
    context = trust or ssl.create_default_context()
    if server_name is None:
        context.check_hostname = False
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname=server_name) as tls,
    ):
        assert tls.version() in ("TLSv1.2", "TLSv1.3")
        assert tls.selected_alpn_protocol() in (None, "http/1.1")
        return tls.getpeercert() or {}


def common_name(cert: dict[str, Any]) -> str:
    return next(v for rdn in cert["subject"] for k, v in rdn if k == "commonName")


def curl(
    port: int, ca: Path, host: str = HOST, key: str = "iamafreeuser"
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            CURL, "-sS", "--cacert", str(ca), "--resolve", f"{host}:{port}:127.0.0.1",
            "-H", f"Authorization: APIKEY {key}", "-H", "Content-Type: application/json",
            "-w", "\n%{http_code} %{ssl_verify_result}",
            "-d", json.dumps(chat(max_tokens=5)), f"https://{host}:{port}/v1/chat/completions",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


class _SNI(httpx.HTTPTransport):
    """Connects to 127.0.0.1 but says (and verifies) `host` in TLS, as DNS would have."""

    def __init__(self, host: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.host = host

    def handle_request(self, request: httpx.Request) -> httpx.Response:
        request.extensions = {**request.extensions, "sni_hostname": self.host}
        return super().handle_request(request)


def gateway_status(gw: Any) -> dict[str, Any]:
    return httpx.get(gw.admin_url + GATEWAY, timeout=30).json()["status"]


def listener_condition(gw: Any, listener: str, type_: str) -> dict[str, Any]:
    status = gateway_status(gw)
    item = next(x for x in status["listeners"] if x["name"] == listener)
    return next(c for c in item["conditions"] if c["type"] == type_)


def apply(gw: Any, text: str) -> None:
    r = httpx.post(
        gw.admin_url + "/apis/apply",
        content=text,
        headers={"content-type": "application/yaml"},
        timeout=30,
    )
    assert r.status_code == 200, r.text


def eventually(check: Callable[[], bool], seconds: float = 10) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "not within time"
        time.sleep(0.05)


# --- the tutorial over HTTPS ----------------------------------------------------------------------


def test_tutorial_over_https_with_curl_and_the_openai_sdk(pki, manifests, start_gateway) -> None:
    tutorial = pki.leaf(HOST, [HOST])
    wildcard = pki.leaf("*.example.com", ["*.example.com"])
    folder = manifests(
        with_listeners(
            https_listener("https", "tutorial-cert", HOST),
            https_listener("wildcard", "wildcard-cert", "*.example.com"),
        ),
        extra=tls_secret("tutorial-cert", tutorial)
        + tls_secret("wildcard-cert", wildcard, string=True),
    )
    gw = start_gateway(folder, https=True)
    port = gw.https_port

    # curl, trusting only the test CA
    done = curl(port, pki.ca)
    assert done.returncode == 0, done.stderr
    body, _, tail = done.stdout.rpartition("\n")
    assert tail == "200 0"
    assert json.loads(body)["usage"]["total_tokens"] > 0

    # the official SDK, with an httpx client verifying against the CA
    http = httpx.Client(verify=pki.trust(), transport=_SNI(HOST, verify=pki.trust()))
    client = openai.OpenAI(
        base_url=f"https://127.0.0.1:{port}/v1",
        api_key="unused",
        default_headers={"Authorization": "APIKEY iamafreeuser", "Host": HOST},
        http_client=http,
        max_retries=0,
    )
    answer = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert answer.usage is not None and answer.usage.total_tokens > 0
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(
            base_url=f"https://127.0.0.1:{port}/v1",
            api_key="unused",
            default_headers={"Authorization": "APIKEY wrong", "Host": HOST},
            http_client=http,
            max_retries=0,
        ).models.list()

    # SNI: the exact name's certificate, the wildcard's for another name of example.com
    exact = peer(port, HOST, pki.trust())
    assert common_name(exact) == HOST
    assert ("DNS", HOST) in exact["subjectAltName"]
    other = peer(port, "other.example.com", pki.trust())
    assert common_name(other) == "*.example.com"
    # Gateway API's `*.example.com` admits several labels, a certificate's only one: the
    # gateway picks the wildcard listener's certificate, which the client then refuses
    loose = pki.trust()
    loose.check_hostname = False
    assert common_name(peer(port, "a.b.example.com", loose)) == "*.example.com"
    # no listener without hostname: no SNI, or an unknown name, is refused in the handshake
    # (the server's unrecognized_name alert is lost: asyncio closes the connection at a
    # failed handshake without sending what OpenSSL wrote, so clients see an EOF)
    for name in (None, "unknown.example.org"):
        with pytest.raises(ssl.SSLError):
            peer(port, name, pki.trust())
    # a TLS client that does not trust the CA does not get through
    with pytest.raises(ssl.SSLCertVerificationError):
        peer(port, HOST)

    # the HTTP listener is still served plainly, and routes never cross schemes: a plain
    # request reaches only HTTP listeners' routes, a TLS one only HTTPS listeners'
    with gw.client() as c:
        assert c.post("/v1/chat/completions", json=chat(max_tokens=5)).status_code in (200, 429)
    status = gateway_status(gw)
    assert status["tokengateway"]["listenHttps"].endswith(f":{port}")
    for name in ("http", "https", "wildcard"):
        assert listener_condition(gw, name, "Programmed")["status"] == "True"
        assert listener_condition(gw, name, "ResolvedRefs")["status"] == "True"
    assert "HTTPS listeners on" in gw.output()


def test_a_listener_without_hostname_serves_clients_without_sni(
    pki, manifests, start_gateway
) -> None:
    folder = manifests(
        with_listeners(
            https_listener("https", "tutorial-cert", HOST),
            https_listener("any", "default-cert", None),
        ),
        extra=tls_secret("tutorial-cert", pki.leaf(HOST, [HOST]))
        + tls_secret("default-cert", pki.leaf("default.example.net", ["default.example.net"])),
    )
    gw = start_gateway(folder, https=True)
    assert common_name(peer(gw.https_port, HOST, pki.trust())) == HOST
    assert common_name(peer(gw.https_port, None, pki.trust())) == "default.example.net"
    loose = pki.trust()
    loose.check_hostname = False  # the default certificate does not name it: the client refuses
    assert common_name(peer(gw.https_port, "nobody.example.org", loose)) == "default.example.net"


def test_plain_http_on_the_https_port_gets_a_clear_400(pki, manifests, start_gateway) -> None:
    """The HTTPS port speaks TLS only: a plain request gets a 400 that says so, in the
    OpenAI error envelope, and nothing of the route; the connection is closed."""
    folder = manifests(
        with_listeners(https_listener("https", "tutorial-cert", HOST)),
        extra=tls_secret("tutorial-cert", pki.leaf(HOST, [HOST])),
    )
    gw = start_gateway(folder, https=True)
    with socket.create_connection(("127.0.0.1", gw.https_port), timeout=10) as sock:
        sock.sendall(
            f"GET /v1/models HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: APIKEY iamafreeuser\r\n\r\n".encode()
        )
        answer = b""
        try:
            while chunk := sock.recv(4096):
                answer += chunk
        except (ConnectionResetError, TimeoutError):
            pass
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400 "), answer
    assert b"connection: close" in head.lower()
    error = json.loads(body)["error"]
    assert error["code"] == "plain_http_on_https_port"
    assert "https://" in error["message"] and error["type"] == "invalid_request_error"
    assert b"meta-llama" not in answer and b"iamafreeuser" not in answer
    # and the port still serves TLS afterwards
    assert curl(gw.https_port, pki.ca).returncode == 0


# --- rotation -------------------------------------------------------------------------------------


def test_a_secret_applied_is_served_to_new_connections_without_a_restart(
    pki, manifests, start_gateway
) -> None:
    folder = manifests(
        with_listeners(https_listener("https", "tutorial-cert", HOST)),
        extra=tls_secret("tutorial-cert", pki.leaf(HOST, [HOST])),
    )
    gw = start_gateway(folder, https=True)
    pid = gw.proc.pid
    before = peer(gw.https_port, HOST, pki.trust())
    # a connection opened before the rotation keeps its certificate and keeps working
    http = httpx.Client(
        base_url=f"https://127.0.0.1:{gw.https_port}",
        headers={"Host": HOST, "Authorization": "APIKEY iamagolduser"},
        transport=_SNI(HOST, verify=pki.trust()),
    )
    assert http.get("/v1/models").status_code == 200

    rotated = PKI(pki.folder.parent / "rotated")  # a new CA too: only the new cert verifies
    apply(gw, tls_secret("tutorial-cert", rotated.leaf(HOST, [HOST, "rotated.example.com"])))

    def new_cert() -> bool:
        try:
            return ("DNS", "rotated.example.com") in peer(gw.https_port, HOST, rotated.trust())[
                "subjectAltName"
            ]
        except ssl.SSLError:
            return False

    eventually(new_cert)
    assert ("DNS", "rotated.example.com") not in before["subjectAltName"]
    assert curl(gw.https_port, rotated.ca).returncode == 0
    assert curl(gw.https_port, pki.ca).returncode == 60  # the old CA no longer verifies
    assert http.get("/v1/models").status_code == 200  # the old connection, still open
    http.close()
    assert gw.proc.pid == pid and gw.proc.poll() is None


def test_a_certificate_file_changed_on_disk_is_served_without_a_restart(
    pki, manifests, start_gateway
) -> None:
    folder = manifests(
        with_listeners(https_listener("https", "tutorial-cert", HOST)),
        extra=tls_secret("tutorial-cert", pki.leaf(HOST, [HOST])),
    )
    gw = start_gateway(folder, https=True)
    first = peer(gw.https_port, HOST, pki.trust())["serialNumber"]
    (folder / "99-extra.yaml").write_text(tls_secret("tutorial-cert", pki.leaf(HOST, [HOST])))
    eventually(lambda: peer(gw.https_port, HOST, pki.trust())["serialNumber"] != first)


# --- refs that do not resolve ----------------------------------------------------------------------


def test_a_missing_secret_is_reported_and_the_http_listener_still_serves(
    pki, manifests, start_gateway
) -> None:
    folder = manifests(with_listeners(https_listener("https", "tutorial-cert", HOST)))
    gw = start_gateway(folder, https=True)
    resolved = listener_condition(gw, "https", "ResolvedRefs")
    assert (resolved["status"], resolved["reason"]) == ("False", "InvalidCertificateRef")
    assert "gateway-system/tutorial-cert not found" in resolved["message"]
    programmed = listener_condition(gw, "https", "Programmed")
    assert (programmed["status"], programmed["reason"]) == ("False", "Invalid")
    accepted = next(c for c in gateway_status(gw)["conditions"] if c["type"] == "Accepted")
    assert (accepted["status"], accepted["reason"]) == ("True", "ListenersNotValid")
    assert listener_condition(gw, "http", "Programmed")["status"] == "True"
    with gw.client() as c:
        assert c.get("/v1/models").status_code == 200
    # no certificate at all: the handshake is refused
    with pytest.raises(ssl.SSLError):
        peer(gw.https_port, HOST, pki.trust())

    # the Secret arrives: the listener is served, no restart
    apply(gw, tls_secret("tutorial-cert", pki.leaf(HOST, [HOST])))
    eventually(lambda: listener_condition(gw, "https", "ResolvedRefs")["status"] == "True")
    assert listener_condition(gw, "https", "Programmed")["status"] == "True"
    assert curl(gw.https_port, pki.ca).returncode == 0


def test_a_secret_in_another_namespace_needs_a_reference_grant(
    pki, manifests, start_gateway
) -> None:
    folder = manifests(
        with_listeners(https_listener("https", "shared-cert", HOST, namespace="certs")),
        extra="---\napiVersion: v1\nkind: Namespace\nmetadata: {name: certs}\n"
        + tls_secret("shared-cert", pki.leaf(HOST, [HOST]), namespace="certs"),
    )
    gw = start_gateway(folder, https=True)
    resolved = listener_condition(gw, "https", "ResolvedRefs")
    assert (resolved["status"], resolved["reason"]) == ("False", "RefNotPermitted")
    with pytest.raises(ssl.SSLError):
        peer(gw.https_port, HOST, pki.trust())

    # a grant for another Secret, or from another namespace, changes nothing
    grant = (
        "---\napiVersion: gateway.networking.k8s.io/v1beta1\nkind: ReferenceGrant\n"
        "metadata: {name: gateways-use-certs, namespace: certs}\n"
        "spec:\n  from: [{group: gateway.networking.k8s.io, kind: Gateway, namespace: %s}]\n"
        "  to: [{group: '', kind: Secret, name: %s}]\n"
    )
    apply(gw, grant % ("gateway-system", "other-cert"))
    time.sleep(0.3)
    assert listener_condition(gw, "https", "ResolvedRefs")["reason"] == "RefNotPermitted"
    apply(gw, grant % ("default", "shared-cert"))
    time.sleep(0.3)
    assert listener_condition(gw, "https", "ResolvedRefs")["reason"] == "RefNotPermitted"

    apply(gw, grant % ("gateway-system", "shared-cert"))
    eventually(lambda: listener_condition(gw, "https", "ResolvedRefs")["status"] == "True")
    assert curl(gw.https_port, pki.ca).returncode == 0
    listed = httpx.get(
        gw.admin_url + "/apis/gateway.networking.k8s.io/v1beta1/namespaces/certs/referencegrants",
        timeout=30,
    ).json()
    assert [x["metadata"]["name"] for x in listed["items"]] == ["gateways-use-certs"]


def test_an_expired_certificate_is_served_and_said_so_in_status(
    pki, manifests, start_gateway
) -> None:
    """Documented choice: an expired certificate is served (clients refuse it, as they
    should), so that a rotation late by a minute is not an outage for clients that check
    nothing else; the listener's ResolvedRefs says it expired, and a warning is logged."""
    folder = manifests(
        with_listeners(https_listener("https", "tutorial-cert", HOST)),
        extra=tls_secret("tutorial-cert", pki.leaf(HOST, [HOST], expired=True)),
    )
    gw = start_gateway(folder, https=True)
    resolved = listener_condition(gw, "https", "ResolvedRefs")
    assert resolved["status"] == "True"
    assert "expired on 2020-01-02T00:00:00Z" in resolved["message"]
    assert "expired on 2020-01-02" in gw.output()
    done = curl(gw.https_port, pki.ca)
    assert done.returncode == 60 and "expired" in done.stderr
    with pytest.raises(ssl.SSLCertVerificationError, match="expired"):
        peer(gw.https_port, HOST, pki.trust())


def test_https_listeners_are_not_served_without_listen_https(pki, manifests, start_gateway) -> None:
    folder = manifests(
        with_listeners(https_listener("https", "tutorial-cert", HOST)),
        extra=tls_secret("tutorial-cert", pki.leaf(HOST, [HOST])),
    )
    gw = start_gateway(folder)
    assert "HTTPS listeners not served (gateway-system/trlp-tutorial-gateway#https)" in gw.output()
    programmed = listener_condition(gw, "https", "Programmed")
    assert (programmed["status"], programmed["reason"]) == ("False", "Pending")
    assert "--listen-https" in programmed["message"]
    assert listener_condition(gw, "https", "ResolvedRefs")["status"] == "True"
    with gw.client() as c:
        assert c.get("/v1/models").status_code == 200


# --- what compiles (no process) -------------------------------------------------------------------


def _status(folder: Path, https: bool = True) -> dict[str, dict[str, Any]]:
    resources = parse_resources(load_paths([str(folder)]))
    urls = {"default/trlp-tutorial-llm-sim": "http://127.0.0.1:9"}
    config = compile_config(resources, urls, https=https)
    status = config.statuses[("Gateway", "gateway-system", "trlp-tutorial-gateway")].as_dict()
    return {
        x["name"]: {c["type"]: (c["status"], c["reason"], c["message"]) for c in x["conditions"]}
        for x in status["listeners"]
    }


@pytest.mark.parametrize(
    ("secret", "reason", "message"),
    [
        ("opaque", "InvalidCertificateRef", "is of type Opaque, not kubernetes.io/tls"),
        ("no-key", "InvalidCertificateRef", "has no tls.key"),
        ("not-pem", "InvalidCertificateRef", "tls.crt holds no PEM certificate"),
        ("mismatch", "InvalidCertificateRef", "do not load"),
        ("broken-pem", "InvalidCertificateRef", "do not load"),
    ],
)
def test_invalid_certificate_secrets(pki, manifests, secret, reason, message) -> None:
    cert, key = pki.leaf(HOST, [HOST])
    other_cert, other_key = pki.leaf("other.example.com", ["other.example.com"])
    docs = {
        "opaque": tls_secret(secret, (cert, key)).replace("kubernetes.io/tls", "Opaque"),
        "no-key": tls_secret(secret, (cert, "")),
        "not-pem": tls_secret(secret, ("hello", key)),
        "mismatch": tls_secret(secret, (cert, other_key)),
        "broken-pem": tls_secret(secret, (cert[:40] + cert[80:], key)),
    }
    folder = manifests(with_listeners(https_listener("https", secret, HOST)), extra=docs[secret])
    listener = _status(folder)["https"]
    assert listener["ResolvedRefs"][:2] == ("False", reason)
    assert message in listener["ResolvedRefs"][2]
    assert listener["Programmed"][:2] == ("False", "Invalid")
    assert _status(folder)["http"]["Programmed"][0] == "True"
    del other_cert


def test_a_tls_listener_in_passthrough_is_not_accepted(manifests) -> None:
    passthrough = (
        "  - name: passthrough\n    protocol: TLS\n    port: 8443\n    tls: {mode: Passthrough}\n"
    )
    folder = manifests(with_listeners(passthrough))
    listener = _status(folder)["passthrough"]
    assert listener["Accepted"][:2] == ("False", "UnsupportedValue")
    assert listener["Programmed"][:2] == ("False", "Invalid")


def test_a_reference_to_something_else_than_a_secret(manifests) -> None:
    listener = (
        "  - name: https\n    protocol: HTTPS\n    port: 443\n"
        "    tls: {mode: Terminate, certificateRefs: [{group: example.com, kind: Vault, name: x}]}\n"
    )
    status = _status(manifests(with_listeners(listener)))["https"]
    assert status["ResolvedRefs"][:2] == ("False", "InvalidCertificateRef")
    assert "only core Secrets" in status["ResolvedRefs"][2]


def test_routes_do_not_cross_schemes(pki, manifests) -> None:
    """A route attached only through the HTTPS listener is not reachable in plain HTTP (its
    API keys would cross the network in clear), and the reverse."""
    folder = manifests(
        {
            **with_listeners(https_listener("https", "tutorial-cert", HOST)),
            "      namespace: gateway-system\n": "      namespace: gateway-system\n"
            "      sectionName: https\n",
        },
        extra=tls_secret("tutorial-cert", pki.leaf(HOST, [HOST])),
    )
    resources = parse_resources(load_paths([str(folder)]))
    urls = {"default/trlp-tutorial-llm-sim": "http://127.0.0.1:9"}
    config = compile_config(resources, urls, https=True)
    headers: dict[str, str] = {}
    assert config.router.match(HOST, "POST", "/v1/chat/completions", headers, "") is None
    found = config.https_router.match(HOST, "POST", "/v1/chat/completions", headers, "")
    assert found is not None and found.target.listener == "https"
    # without --listen-https the route is attached (and counted) but served nowhere
    config = compile_config(resources, urls, https=False)
    assert len(config.router) == len(config.https_router) == 0
    assert len(config.certificates) == 0
