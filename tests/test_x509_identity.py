"""x509 identities (mTLS): an AuthPolicy's `x509` rule over real TLS on loopback.

Certificates are made with the `openssl` command (tests/test_https_listeners.py's PKI): a
client CA whose certificate sits in a labelled Secret, client certificates it signs with
subjects like Authorino's guide (`/CN=aisha/O=ACME Inc./OU=free`), and a second CA nobody
trusts. The tutorial's token limits count per certificate subject and pick the tier from
the certificate's organizational unit; curl and the official `openai` SDK present the
certificates.
"""

from __future__ import annotations

import base64
import json
import ssl
import subprocess
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import HOST, MODEL, chat
from tests.test_https_listeners import (
    _SNI,
    CURL,
    PKI,
    apply,
    https_listener,
    tls_secret,
    with_listeners,
)
from tokengateway.auth import AuthConfigError, AuthRequest, SecretRecord, compile_auth
from tokengateway.auth.identity import compile_label_selector
from tokengateway.auth.x509 import TrustedCAs

POLICY = """---
apiVersion: kuadrant.io/v1
kind: AuthPolicy
metadata: {name: mtls-users, namespace: gateway-system}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: trlp-tutorial-gateway}
  rules:
    authentication:
      mtls:
        x509:
          selector: {matchLabels: {app: llm-clients}}
    authorization:
      acme:
        patternMatching:
          patterns: [{selector: auth.identity.Organization, operator: incl, value: ACME Inc.}]
    response:
      success:
        filters:
          identity:
            json:
              properties:
                userid: {selector: auth.identity.CommonName}
                groups: {selector: auth.identity.OrganizationalUnit.0}
"""


def ca_secret(name: str, ca: Path, labels: dict[str, str] | None = None) -> str:
    """The CA in a Secret of Kuadrant's system namespace, as Authorino's guide stores it."""
    doc = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": name,
            "namespace": "kuadrant-system",
            "labels": labels if labels is not None else {"app": "llm-clients"},
        },
        "type": "Opaque",
        "data": {"ca.crt": base64.b64encode(ca.read_bytes()).decode()},
    }
    return "---\n" + json.dumps(doc) + "\n"


@pytest.fixture
def pki(tmp_path: Path) -> PKI:
    return PKI(tmp_path / "pki")


@pytest.fixture
def untrusted(tmp_path: Path) -> PKI:
    return PKI(tmp_path / "untrusted")


@pytest.fixture
def mtls(pki, manifests, start_gateway) -> Any:
    """The tutorial with an HTTPS listener and the x509 AuthPolicy instead of API keys."""
    folder = manifests(
        with_listeners(https_listener("https", "tutorial-cert", HOST)),
        extra=tls_secret("tutorial-cert", pki.leaf(HOST, [HOST]))
        + ca_secret("llm-client-ca", pki.ca)
        + POLICY,
        skip=("05-authpolicy.yaml",),
    )
    return start_gateway(folder, https=True)


def client_context(pki: PKI, cert: tuple[Path, Path] | None) -> ssl.SSLContext:
    context = pki.trust()
    if cert is not None:
        context.load_cert_chain(*cert)
    return context


def post(gw: Any, pki: PKI, cert: tuple[Path, Path] | None, **body: Any) -> httpx.Response:
    context = client_context(pki, cert)
    with httpx.Client(verify=context, transport=_SNI(HOST, verify=context), timeout=30) as http:
        return http.post(
            f"https://127.0.0.1:{gw.https_port}/v1/chat/completions",
            headers={"Host": HOST},
            json=chat(max_tokens=10, **body),
        )


def refused(gw: Any, pki: PKI, cert: tuple[Path, Path]) -> None:
    """The TLS handshake fails: no HTTP answer. Under TLS 1.3 the client has finished its
    side of the handshake when the server checks its certificate, so it learns of the
    refusal when it reads: a failed connect or a connection closed without an answer."""
    with pytest.raises((httpx.ConnectError, httpx.RemoteProtocolError, httpx.ReadError)):
        post(gw, pki, cert)


def sdk(gw: Any, pki: PKI, cert: tuple[Path, Path]) -> openai.OpenAI:
    context = client_context(pki, cert)
    return openai.OpenAI(
        base_url=f"https://127.0.0.1:{gw.https_port}/v1",
        api_key="unused",  # the certificate is the credential
        default_headers={"Host": HOST},
        http_client=httpx.Client(verify=context, transport=_SNI(HOST, verify=context)),
        max_retries=0,
    )


def test_the_tutorials_tiers_counted_per_certificate_subject(pki, mtls) -> None:
    gw = mtls
    aisha = pki.client("/CN=aisha/O=ACME Inc./OU=free")
    carol = pki.client("/CN=carol/O=ACME Inc./OU=free")
    bob = pki.client("/CN=bob/O=ACME Inc./OU=gold")

    # the official SDK, its client presenting aisha's certificate: free tier, 50 tokens a
    # minute counted for CommonName aisha
    client = sdk(gw, pki, aisha)
    first = aisha[0].read_text()
    spent = 0
    with pytest.raises(openai.RateLimitError) as refused:
        for _ in range(20):
            answer = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10
            )
            assert answer.usage is not None
            spent += answer.usage.total_tokens
    assert 0 < spent <= 50 + 10  # the limit, past it by one answer's estimate error at most
    assert refused.value.response.headers["x-ratelimit-limit-tokens"] == "50"

    # a new certificate with aisha's subject (another key, another serial) is the same user
    again = pki.client("/CN=aisha/O=ACME Inc./OU=free")
    assert again[0].read_text() != first
    assert post(gw, pki, again).status_code == 429
    # another free user has a counter of its own; a gold user has the gold limit
    assert post(gw, pki, carol).status_code == 200
    gold = post(gw, pki, bob)
    assert gold.status_code == 200
    assert gold.headers["x-ratelimit-limit-tokens"] == "200"


def test_what_a_certificate_does_not_prove_is_refused(pki, untrusted, mtls) -> None:
    gw = mtls
    # signed by the trusted CA, but not of the ACME organization: authorization says no
    john = post(gw, pki, pki.client("/CN=john/C=UK/L=London"))
    assert john.status_code == 403
    assert john.json()["error"]["code"] == "permission_denied"

    # no certificate at all: 401 with Authorino's reason and challenge
    none = post(gw, pki, None)
    assert none.status_code == 401
    assert none.headers["x-ext-auth-reason"] == "client certificate is missing"
    assert none.headers["www-authenticate"] == 'Certificate realm="mtls"'

    # a certificate of a CA no policy trusts never completes the handshake (the socket
    # trusts only the CAs of the x509 rules), as with Envoy in front of Authorino
    mallory = untrusted.client("/CN=mallory/O=ACME Inc./OU=gold")
    refused(gw, pki, mallory)
    done = subprocess.run(
        [
            CURL, "-sS", "--cacert", str(pki.ca), "--cert", str(mallory[0]),
            "--key", str(mallory[1]), "--resolve", f"{HOST}:{gw.https_port}:127.0.0.1",
            "-H", "Content-Type: application/json", "-d", json.dumps(chat(max_tokens=5)),
            f"https://{HOST}:{gw.https_port}/v1/chat/completions",
        ],
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    # (asyncio closes a connection whose handshake failed without sending OpenSSL's alert:
    # curl sees a reset or an empty reply, depending on timing: never an HTTP answer)
    assert done.returncode in (35, 52, 56) and done.stdout == "", done.stderr

    # an expired certificate of the trusted CA, and one made for servers only, likewise
    for cert in (
        pki.client("/CN=old/O=ACME Inc./OU=gold", expired=True),
        pki.client("/CN=srv/O=ACME Inc./OU=gold", usage="serverAuth"),
    ):
        refused(gw, pki, cert)

    # the plain HTTP listener has no client certificate to give: 401, nothing served
    with gw.client() as c:
        plain = c.post("/v1/chat/completions", json=chat(max_tokens=5))
    assert plain.status_code == 401
    assert plain.headers["x-ext-auth-reason"] == "client certificate is missing"


def test_a_ca_added_by_apply_is_trusted_by_the_next_handshake(pki, untrusted, mtls) -> None:
    gw = mtls
    mallory = untrusted.client("/CN=mallory/O=ACME Inc./OU=gold")
    refused(gw, pki, mallory)
    # a Secret with another label is not a CA of the policy
    apply(gw, ca_secret("other-ca", untrusted.ca, {"app": "something-else"}))
    refused(gw, pki, mallory)
    apply(gw, ca_secret("other-ca", untrusted.ca))
    answer = post(gw, pki, mallory)
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-ratelimit-limit-tokens"] == "200"  # OU=gold
    # the first CA still works beside it
    assert post(gw, pki, pki.client("/CN=bob/O=ACME Inc./OU=gold")).status_code == 200


# --- the check itself, on certificates made by openssl -------------------------------------------


def trusted(pki: PKI, now_secret: bool = True) -> TrustedCAs:
    secret = SecretRecord(
        "kuadrant-system", "ca", {"app": "llm-clients"}, data={"ca.crt": pki.ca.read_text()}
    )
    matches = compile_label_selector({"matchLabels": {"app": "llm-clients"}}, "p", "x509")
    return TrustedCAs([secret] if now_secret else [], matches, "kuadrant-system")


def test_the_identity_is_the_subject_as_authorino_gives_it(pki) -> None:
    cert, _ = pki.client("/CN=aisha/C=PK/L=Islamabad/O=ACME Inc./OU=Engineering")
    subject, error = trusted(pki).check(cert.read_text())
    assert error is None
    assert subject == {
        "Country": ["PK"],
        "Organization": ["ACME Inc."],
        "OrganizationalUnit": ["Engineering"],
        "Locality": ["Islamabad"],
        "Province": None,
        "StreetAddress": None,
        "PostalCode": None,
        "SerialNumber": "",
        "CommonName": "aisha",
        "Names": [
            {"Type": [2, 5, 4, 3], "Value": "aisha"},
            {"Type": [2, 5, 4, 6], "Value": "PK"},
            {"Type": [2, 5, 4, 7], "Value": "Islamabad"},
            {"Type": [2, 5, 4, 10], "Value": "ACME Inc."},
            {"Type": [2, 5, 4, 11], "Value": "Engineering"},
        ],
        "ExtraNames": None,
    }


def test_the_check_refuses_with_authorinos_reasons(pki, untrusted) -> None:
    cas = trusted(pki)
    assert cas.secrets == ["kuadrant-system/ca"]
    assert cas.check(None) == (None, "client certificate is missing")
    assert cas.check("not a certificate") == (None, "invalid client certificate")
    stranger, _ = untrusted.client("/CN=mallory")
    assert cas.check(stranger.read_text()) == (
        None,
        "x509: certificate signed by unknown authority",
    )
    old, _ = pki.client("/CN=old", expired=True)
    subject, error = cas.check(old.read_text())
    assert subject is None
    assert error is not None and error.startswith("x509: certificate has expired or is not yet")
    assert "is after 2020-01-02T00:00:00Z" in error
    server, _ = pki.client("/CN=srv", usage="serverAuth")
    assert cas.check(server.read_text()) == (
        None,
        "x509: certificate specifies an incompatible key usage",
    )
    # no Secret selected: nothing is trusted
    good, _ = pki.client("/CN=aisha")
    assert trusted(pki, now_secret=False).check(good.read_text())[1] == (
        "x509: certificate signed by unknown authority"
    )
    # a Secret elsewhere counts only with allNamespaces
    elsewhere = SecretRecord("team-a", "ca", {"app": "x"}, data={"tls.crt": pki.ca.read_text()})
    rules: dict[str, Any] = {
        "authentication": {"mtls": {"x509": {"selector": {"matchLabels": {"app": "x"}}}}}
    }
    request = AuthRequest(
        "GET", "https", HOST, "/", {}, "127.0.0.1", 1, "127.0.0.1", 2, "id",
        client_certificate=good.read_text(),
    )  # fmt: skip
    engine = compile_auth("ns/p", rules, None, [elsewhere], "kuadrant-system")
    assert engine.evaluate(request).status == 401
    assert engine.client_cas() == []
    rules["authentication"]["mtls"]["x509"]["allNamespaces"] = True
    engine = compile_auth("ns/p", rules, None, [elsewhere], "kuadrant-system")
    decision = engine.evaluate(request)
    assert decision.allowed and decision.identity is not None
    assert decision.identity["CommonName"] == "aisha"
    assert len(engine.client_cas()) == 1


def test_a_certificate_source_other_than_the_connection_is_refused() -> None:
    rules = {
        "authentication": {
            "mtls": {"x509": {"selector": {}, "source": {"xfccHeader": "x-forwarded-client-cert"}}}
        }
    }
    with pytest.raises(AuthConfigError) as refused:
        compile_auth("ns/p", rules, None, [], "kuadrant-system")
    assert "rules.authentication.mtls.x509.source" in str(refused.value)
    assert "TLS connection" in str(refused.value)
