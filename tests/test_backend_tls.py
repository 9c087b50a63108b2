"""Verified TLS to upstreams with BackendTLSPolicy, over real TLS on loopback
(docs/backend-tls.md).

Certificates are made with the `openssl` command (the helpers of test_https_listeners); the
upstream is a small OpenAI-shaped server speaking HTTPS. A certificate that does not verify
is a 502 `upstream_tls_error` naming OpenSSL's reason, and is never charged.
"""

from __future__ import annotations

import asyncio
import base64
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest
import yaml

from tests.conftest import Gateway, chat
from tests.test_follower import control_plane, processes  # noqa: F401 - the fixture
from tests.test_follower import kubectl as follower_kubectl
from tests.test_gateway import completion
from tests.test_https_listeners import PKI, apply
from tests.test_kubeapi import kubectl, ok  # noqa: F401 - the kubectl fixture
from tokengateway.config.backend_tls import backend_tls
from tokengateway.config.compile import compile_config
from tokengateway.http.client import Origin, Upstream, UpstreamTLS, client_context
from tokengateway.resources import load_paths, parse_resources

BACKEND_HOST = "llm.internal.test"

GATEWAY = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: gateway-system}
spec:
  gatewayClassName: any
  listeners:
  - {name: http, protocol: HTTP, port: 80, hostname: api.example.com,
     allowedRoutes: {namespaces: {from: All}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: llm, namespace: default}
spec:
  parentRefs: [{name: gw, namespace: gateway-system}]
  rules:
  - backendRefs: [{name: llm, port: 443}]
---
apiVersion: kuadrant.io/v1alpha1
kind: TokenRateLimitPolicy
metadata: {name: tokens, namespace: gateway-system}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: gw}
  limits:
    everyone:
      rates: [{limit: 1, window: 1m}]
"""


def service(url: str) -> str:
    return (
        "---\napiVersion: v1\nkind: Service\nmetadata:\n  name: llm\n  namespace: default\n"
        f"  annotations: {{tokengateway.io/backend-url: {json.dumps(url)}}}\n"
        "spec:\n  ports: [{name: https, port: 443}]\n"
    )


def config_map(name: str, pem: str) -> str:
    doc = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": name, "namespace": "default"},
        "data": {"ca.crt": pem},
    }
    return "---\n" + json.dumps(doc) + "\n"


def ca_secret(name: str, pem: str) -> str:
    doc = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": "default"},
        "data": {"ca.crt": base64.b64encode(pem.encode()).decode()},
    }
    return "---\n" + json.dumps(doc) + "\n"


def policy(
    name: str = "llm-tls",
    refs: list[dict[str, str]] | None = None,
    hostname: str = BACKEND_HOST,
    target: str = "llm",
    sans: list[dict[str, str]] | None = None,
    created: str | None = None,
    version: str = "v1",
) -> str:
    validation: dict[str, Any] = {"hostname": hostname}
    if refs is None:
        validation["wellKnownCACertificates"] = "System"
    else:
        validation["caCertificateRefs"] = refs
    if sans:
        validation["subjectAltNames"] = sans
    meta: dict[str, Any] = {"name": name, "namespace": "default"}
    if created:
        meta["creationTimestamp"] = created
    doc = {
        "apiVersion": f"gateway.networking.k8s.io/{version}",
        "kind": "BackendTLSPolicy",
        "metadata": meta,
        "spec": {
            "targetRefs": [{"group": "", "kind": "Service", "name": target}],
            "validation": validation,
        },
    }
    return "---\n" + json.dumps(doc) + "\n"


def cm_ref(name: str, kind: str = "ConfigMap") -> dict[str, str]:
    return {"group": "", "kind": kind, "name": name}


class BackendPKI(PKI):
    """The test CA, and leaves with any subjectAltName (URI ones too), self-signed ones."""

    def signed(self, cn: str, san: str, expired: bool = False) -> tuple[Path, Path]:
        name = f"{cn}-{abs(hash((san, expired)))}"
        extensions = [f"subjectAltName={san}", "extendedKeyUsage=serverAuth"]
        return self.issue(name, f"/CN={cn}", extensions, expired)

    def self_signed(self, cn: str) -> tuple[Path, Path]:
        self._openssl(
            "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes",
            "-days", "2", "-subj", f"/CN={cn}", "-keyout", "self.key", "-out", "self.crt",
            "-addext", f"subjectAltName=DNS:{cn}",
        )  # fmt: skip
        return self.folder / "self.crt", self.folder / "self.key"

    @property
    def pem(self) -> str:
        return self.ca.read_text()


@pytest.fixture
def pkis(tmp_path: Path) -> Callable[[str], BackendPKI]:
    return lambda name: BackendPKI(tmp_path / name)


def answer(path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    return 200, {"content-type": "application/json"}, completion({"total_tokens": 1})


def start(tmp_path: Path, start_gateway: Any, *docs: str) -> Gateway:
    path = tmp_path / "gw.yaml"
    path.write_text(GATEWAY + "".join(docs))
    return start_gateway(path)


def post(gw: Gateway) -> httpx.Response:
    return httpx.post(
        gw.url + "/v1/chat/completions",
        json=chat(max_tokens=5),
        headers={"Host": "api.example.com"},
        timeout=30,
    )


def tls_refused(r: httpx.Response, reason: str) -> None:
    assert r.status_code == 502, r.text
    error = r.json()["error"]
    assert error["code"] == "upstream_tls_error" and error["type"] == "upstream_error"
    assert reason in error["message"], error["message"]


def policy_status(gw: Gateway, name: str = "llm-tls") -> dict[str, Any]:
    url = (
        f"{gw.admin_url}/apis/gateway.networking.k8s.io/v1/namespaces/default/"
        f"backendtlspolicies/{name}"
    )
    return httpx.get(url, timeout=30).json()["status"]


# --- over real TLS ------------------------------------------------------------------------------


def test_a_self_signed_upstream_is_refused_without_a_policy_and_served_with_one(
    tmp_path, pkis, upstream, start_gateway
) -> None:
    pki = pkis("self")
    cert, key = pki.self_signed(BACKEND_HOST)
    up = upstream(answer, tls=(cert, key))
    gw = start(tmp_path, start_gateway, service(up.url))
    for _ in range(3):  # refused, and not charged: the limit of 1 token is still there
        tls_refused(post(gw), "self-signed certificate")
    r = post(gw)
    assert f"upstream {up.url}" in r.json()["error"]["message"]
    assert not up.requests  # nothing went out in clear either

    apply(gw, config_map("llm-ca", cert.read_text()) + policy(refs=[cm_ref("llm-ca")]))
    client = openai.OpenAI(
        base_url=gw.url + "/v1",
        api_key="unused",
        default_headers={"Host": "api.example.com"},
        max_retries=0,
    )
    done = client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5
    )
    assert done.choices[0].message.content == "four words of text"
    assert up.requests[0][1]["host"] == f"127.0.0.1:{up.port}"  # the Host header is the URL's
    with pytest.raises(openai.RateLimitError):  # the success was charged, the 502s were not
        client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": "hi"}], max_tokens=5
        )
    status = policy_status(gw)
    [ancestor] = status["ancestors"]
    assert ancestor["ancestorRef"] == {
        "group": "gateway.networking.k8s.io",
        "kind": "Gateway",
        "namespace": "gateway-system",
        "name": "gw",
    }
    conditions = {c["type"]: (c["status"], c["reason"]) for c in ancestor["conditions"]}
    assert conditions == {
        "Accepted": ("True", "Accepted"),
        "ResolvedRefs": ("True", "ResolvedRefs"),
    }


def test_a_ca_in_a_secret_and_an_http_url_with_a_policy_speaks_tls(
    tmp_path, pkis, upstream, start_gateway
) -> None:
    pki = pkis("ca")
    up = upstream(answer, tls=pki.signed(BACKEND_HOST, f"DNS:{BACKEND_HOST}"))
    clear = upstream(answer)  # speaks plain HTTP only
    gw = start(
        tmp_path,
        start_gateway,
        service(clear.url),
        ca_secret("llm-ca", pki.pem),
        policy(refs=[cm_ref("llm-ca", "Secret")], version="v1alpha3"),
    )
    # the policy means TLS even to an http:// URL: a plain server is refused, not used
    tls_refused(post(gw), "wrong version number")
    assert not clear.requests
    apply(gw, service(up.url.replace("https://", "http://")))
    r = post(gw)
    assert r.status_code == 200, r.text
    assert r.json()["choices"][0]["message"]["content"] == "four words of text"
    assert len(up.requests) == 1
    assert post(gw).status_code == 429  # the success was charged (limit 1)


def test_a_wrong_host_an_expired_certificate_and_an_unknown_ca_are_502(
    tmp_path, pkis, upstream, start_gateway
) -> None:
    pki, other = pkis("ca"), pkis("other")
    good = upstream(answer, tls=pki.signed(BACKEND_HOST, f"DNS:{BACKEND_HOST}"))
    expired = upstream(answer, tls=pki.signed(BACKEND_HOST, f"DNS:{BACKEND_HOST}", expired=True))
    gw = start(
        tmp_path,
        start_gateway,
        service(good.url),
        config_map("llm-ca", pki.pem),
        policy(refs=[cm_ref("llm-ca")], hostname="wrong.internal.test"),
    )
    tls_refused(post(gw), "Hostname mismatch")
    assert "wrong.internal.test" in post(gw).json()["error"]["message"]

    apply(gw, service(expired.url) + policy(refs=[cm_ref("llm-ca")]))
    tls_refused(post(gw), "certificate has expired")

    apply(gw, service(good.url) + config_map("llm-ca", other.pem))
    tls_refused(post(gw), "unable to get local issuer certificate")

    apply(gw, policy(refs=[cm_ref("absent")]))  # a reference that does not resolve
    tls_refused(post(gw), "ConfigMap absent was not found")
    conditions = {
        c["type"]: (c["status"], c["reason"])
        for c in policy_status(gw)["ancestors"][0]["conditions"]
    }
    assert conditions == {
        "Accepted": ("False", "NoValidCACertificate"),
        "ResolvedRefs": ("False", "InvalidCACertificateRef"),
    }
    assert not good.requests and not expired.requests
    apply(gw, policy(refs=[cm_ref("llm-ca")]) + config_map("llm-ca", pki.pem))
    assert post(gw).status_code == 200  # and nothing of the refusals was charged


def test_a_ca_rotated_by_apply_reaches_the_next_request_and_no_pooled_connection(
    tmp_path, pkis, upstream, start_gateway
) -> None:
    old, new = pkis("old"), pkis("new")
    up = upstream(answer, tls=new.signed(BACKEND_HOST, f"DNS:{BACKEND_HOST}"))
    limitless = GATEWAY.split("---\napiVersion: kuadrant.io")[0]
    path = tmp_path / "gw.yaml"
    path.write_text(
        limitless
        + service(up.url)
        + config_map("llm-ca", old.pem)
        + policy(refs=[cm_ref("llm-ca")])
    )
    gw = start_gateway(path)
    tls_refused(post(gw), "unable to get local issuer certificate")
    apply(gw, config_map("llm-ca", new.pem))
    assert post(gw).status_code == 200
    assert post(gw).status_code == 200  # on the kept-alive connection
    # back to the old CA: the connection verified under the new one is not reused
    apply(gw, config_map("llm-ca", old.pem))
    tls_refused(post(gw), "unable to get local issuer certificate")
    assert len(up.requests) == 2


def test_subject_alt_names_replace_the_hostname_in_verification(
    tmp_path, pkis, upstream, start_gateway
) -> None:
    pki = pkis("ca")
    spiffe = "spiffe://cluster.test/ns/default/sa/llm"
    up = upstream(answer, tls=pki.signed(BACKEND_HOST, f"DNS:{BACKEND_HOST},URI:{spiffe}"))
    limitless = GATEWAY.split("---\napiVersion: kuadrant.io")[0]
    path = tmp_path / "gw.yaml"
    sni_only = "sni.internal.test"  # sent in SNI, not what the certificate names
    path.write_text(
        limitless
        + service(up.url)
        + config_map("llm-ca", pki.pem)
        + policy(refs=[cm_ref("llm-ca")], hostname=sni_only, sans=[{"type": "URI", "uri": spiffe}])
    )
    gw = start_gateway(path)
    assert post(gw).status_code == 200
    apply(
        gw,
        policy(
            refs=[cm_ref("llm-ca")],
            hostname=BACKEND_HOST,  # matches, but only the subjectAltNames count
            sans=[{"type": "Hostname", "hostname": "other.internal.test"}],
        ),
    )
    tls_refused(post(gw), "subjectAltName mismatch")
    apply(
        gw,
        policy(
            refs=[cm_ref("llm-ca")],
            hostname=sni_only,
            sans=[{"type": "Hostname", "hostname": BACKEND_HOST}],
        ),
    )
    assert post(gw).status_code == 200


def test_kubectl_applies_and_gets_a_backend_tls_policy(
    tmp_path,
    pkis,
    upstream,
    start_gateway,
    kubectl,  # noqa: F811 - the fixture imported
) -> None:
    pki = pkis("ca")
    up = upstream(answer, tls=pki.signed(BACKEND_HOST, f"DNS:{BACKEND_HOST}"))
    gw = start(tmp_path, start_gateway, service(up.url))
    run = kubectl(gw)
    text = config_map("llm-ca", pki.pem) + policy(refs=[cm_ref("llm-ca")])
    out = ok(run("apply", "-f", "-", stdin=text))
    assert "backendtlspolicy.gateway.networking.k8s.io/llm-tls created" in out
    assert "configmap/llm-ca created" in out
    assert post(gw).status_code == 200
    shown = yaml.safe_load(ok(run("get", "btlspolicy", "llm-tls", "-n", "default", "-o", "yaml")))
    conditions = shown["status"]["ancestors"][0]["conditions"]
    assert {c["type"]: c["status"] for c in conditions} == {
        "Accepted": "True",
        "ResolvedRefs": "True",
    }
    listed = ok(run("get", "backendtlspolicies", "-A"))
    assert "llm-tls" in listed and "default" in listed
    assert "llm-ca" in ok(run("get", "cm", "-n", "default"))


# --- status and validation, without a server ----------------------------------------------------


def _compile(tmp_path: Path, text: str) -> Any:
    path = tmp_path / "c.yaml"
    path.write_text(GATEWAY + text)
    resources = parse_resources(load_paths([str(path)]))
    return compile_config(resources, {"default/llm": "https://127.0.0.1:1"})


def _conditions(config: Any, name: str) -> dict[str, tuple[str, str, str]]:
    status = config.statuses[("BackendTLSPolicy", "default", name)]
    return {c["type"]: (c["status"], c["reason"], c["message"]) for c in status.all_conditions()}


def test_the_older_of_two_policies_on_a_service_wins_the_other_is_conflicted(
    tmp_path, pkis
) -> None:
    pki = pkis("ca")
    config = _compile(
        tmp_path,
        service("https://127.0.0.1:1")
        + config_map("llm-ca", pki.pem)
        + policy("newer", refs=[cm_ref("llm-ca")], created="2025-02-01T00:00:00Z")
        + policy("older", hostname="older.test", created="2025-01-01T00:00:00Z"),
    )
    assert _conditions(config, "older")["Accepted"][:2] == ("True", "Accepted")
    accepted = _conditions(config, "newer")["Accepted"]
    assert accepted[:2] == ("False", "Conflicted") and "default/older" in accepted[2]
    [rule] = config.rules
    assert rule.backends[0].origin.tls.server_name == "older.test"


@pytest.mark.parametrize(
    ("extra", "accepted", "resolved", "words"),
    [
        (policy(target="gone"), "TargetNotFound", "ResolvedRefs", "Service gone was not found"),
        (
            policy(refs=[cm_ref("ca", "Pod")]),
            "NoValidCACertificate",
            "InvalidKind",
            "only ConfigMaps and Secrets",
        ),
        (
            policy(refs=[cm_ref("nothing")]),
            "NoValidCACertificate",
            "InvalidCACertificateRef",
            "ConfigMap nothing was not found",
        ),
        (
            config_map("empty", "not a certificate") + policy(refs=[cm_ref("empty")]),
            "NoValidCACertificate",
            "InvalidCACertificateRef",
            "has no PEM certificate in ca.crt",
        ),
    ],
)
def test_policies_that_do_not_resolve(tmp_path, extra, accepted, resolved, words) -> None:
    config = _compile(tmp_path, service("https://127.0.0.1:1") + extra)
    conditions = _conditions(config, "llm-tls")
    assert conditions["Accepted"][:2] == (
        ("True", "Accepted") if accepted == "Accepted" else ("False", accepted)
    )
    assert conditions["ResolvedRefs"][1] == resolved
    assert words in conditions["Accepted"][2] + conditions["ResolvedRefs"][2]
    tls = config.rules[0].backends[0].origin.tls
    if accepted == "TargetNotFound":  # no Service of that name: the backend is as before
        assert tls is None
        status = config.statuses[("BackendTLSPolicy", "default", "llm-tls")]
        assert status.ancestors[0]["ancestorRef"]["kind"] == "Service"
    else:  # never in clear: every request is refused, naming the policy
        assert tls.context is None and "BackendTLSPolicy default/llm-tls" in tls.refusal


def test_the_crd_rules_are_checked(tmp_path) -> None:
    from tokengateway.resources import ManifestError

    both = json.loads(policy(refs=[cm_ref("a")]).removeprefix("---\n"))
    both["spec"]["validation"]["wellKnownCACertificates"] = "System"
    neither = json.loads(policy(refs=[]).removeprefix("---\n"))
    no_host = json.loads(policy().removeprefix("---\n"))
    del no_host["spec"]["validation"]["hostname"]
    for doc, message in [
        (both, "must not contain both CACertificateRefs and WellKnownCACertificates"),
        (neither, "must specify either CACertificateRefs or WellKnownCACertificates"),
        (no_host, "hostname"),
    ]:
        path = tmp_path / "p.yaml"
        path.write_text(json.dumps(doc))
        with pytest.raises(ManifestError, match=message):
            parse_resources(load_paths([str(path)]))


def test_contexts_are_reused_while_the_pem_is_the_same(tmp_path, pkis) -> None:
    pki, other = pkis("ca"), pkis("other")
    text = service("https://127.0.0.1:1") + policy(refs=[cm_ref("llm-ca")])
    first = _compile(tmp_path, text + config_map("llm-ca", pki.pem))
    path = tmp_path / "c.yaml"
    resources = parse_resources(load_paths([str(path)]))
    again = compile_config(resources, {"default/llm": "https://127.0.0.1:1"}, previous=first)
    tls = first.rules[0].backends[0].origin.tls
    assert again.rules[0].backends[0].origin.tls is tls
    path.write_text(GATEWAY + text + config_map("llm-ca", other.pem))
    resources = parse_resources(load_paths([str(path)]))
    rotated = compile_config(resources, {"default/llm": "https://127.0.0.1:1"}, previous=again)
    new_tls = rotated.rules[0].backends[0].origin.tls
    assert new_tls is not tls and new_tls.context is not tls.context
    assert rotated.rules[0].backends[0].origin.key != first.rules[0].backends[0].origin.key
    # two policies trusting the same PEM share its context, each with its own name
    path.write_text(
        text
        + config_map("llm-ca", pki.pem)
        + service("https://127.0.0.1:2").replace("name: llm\n", "name: llm2\n")
        + policy("llm2-tls", refs=[cm_ref("llm-ca")], target="llm2", hostname="llm2.test")
    )
    both = backend_tls(parse_resources(load_paths([str(path)])), first.tls_cache)
    one, two = both.by_service["default/llm"], both.by_service["default/llm2"]
    assert one is tls and two.context is tls.context and two.server_name == "llm2.test"


# --- the client alone ---------------------------------------------------------------------------


def test_the_pool_is_one_per_tls_settings(pkis, upstream) -> None:
    pki = pkis("ca")
    up = upstream(answer, tls=pki.signed(BACKEND_HOST, f"DNS:{BACKEND_HOST}"))
    trusting = UpstreamTLS(client_context(pki.pem), BACKEND_HOST)
    system = UpstreamTLS(client_context(None), BACKEND_HOST)

    async def scenario() -> None:
        client = Upstream()
        ok_origin, refused = Origin(up.url, trusting), Origin(up.url, system)
        assert ok_origin.key != refused.key
        for _ in range(2):
            resp = await client.send_to("GET", ok_origin, "/v1/models", [], b"")
            assert resp.status == 200
            await resp.read()
        with pytest.raises(Exception, match="unable to get local issuer certificate") as caught:
            await client.send_to("GET", refused, "/v1/models", [], b"")
        assert getattr(caught.value, "kind", None) == "tls"
        assert len(client._pools) == 2
        await client.close()

    asyncio.run(scenario())
    assert len(up.requests) == 2


# --- a replica following a Kubernetes API -------------------------------------------------------


def test_a_replica_following_the_api_verifies_with_the_config_map_it_holds(
    tmp_path,
    pkis,
    upstream,
    processes,  # noqa: F811 - the fixture imported
) -> None:
    pki, other = pkis("ca"), pkis("other")
    up = upstream(answer, tls=pki.signed(BACKEND_HOST, f"DNS:{BACKEND_HOST}"))
    folder = tmp_path / "cp"
    folder.mkdir()
    (folder / "gw.yaml").write_text(
        GATEWAY.split("---\napiVersion: kuadrant.io")[0]
        + service(up.url)
        + config_map("llm-ca", pki.pem)
        + config_map("unrelated", other.pem)
        + policy(refs=[cm_ref("llm-ca")])
    )
    _cp, config = control_plane(processes, tmp_path, folder)
    replica = processes("replica", ["--kubeconfig", str(config)]).start()
    with httpx.Client(base_url=replica.url, headers={"Host": "api.example.com"}) as c:
        assert c.post("/v1/chat/completions", json=chat(max_tokens=5)).status_code == 200
        follower_kubectl(config, "apply", "-f", "-", stdin=config_map("llm-ca", other.pem))
        deadline, served = time.monotonic() + 20, 1
        while True:  # the rotated CA reaches the replica through its watch
            r = c.post("/v1/chat/completions", json=chat(max_tokens=5))
            if r.status_code != 200 or time.monotonic() > deadline:
                break
            served += 1
            time.sleep(0.05)
        tls_refused(r, "unable to get local issuer certificate")
    assert len(up.requests) == served  # the refused ones never reached it
