"""OAuth2 token introspection identities (RFC 7662) against a real provider.

panva's `oidc-provider` (tests/oidc_provider.py) hands opaque access tokens to the
"opaque-*" clients and answers introspection requests from the "gateway" client, whose
credentials sit in a Secret the AuthPolicy's `credentialsRef` names. The tutorial's limits
count per `client_id` and read the tier from the introspection answer.
"""

from __future__ import annotations

import json
import time
from typing import Any

import httpx
import openai
import pytest

from tests.conftest import HOST, MODEL, chat
from tests.oidc_provider import OidcProvider, secret_of
from tokengateway.auth import AuthConfigError, SecretRecord, compile_auth

POLICY = """---
apiVersion: kuadrant.io/v1
kind: AuthPolicy
metadata: {name: introspected, namespace: gateway-system}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: trlp-tutorial-gateway}
  rules:
    authentication:
      opaque:
        oauth2Introspection:
          endpoint: ISSUER/token/introspection
          credentialsRef: {name: introspection-client}
        cache:
          key: {selector: context.request.http.headers.authorization}
          ttl: 1
    authorization:
      tiers:
        opa:
          rego: |
            allow { input.auth.identity.tier == "free" }
            allow { input.auth.identity.tier == "gold" }
    response:
      success:
        filters:
          identity:
            json:
              properties:
                userid: {selector: auth.identity.client_id}
                groups: {selector: auth.identity.groups.0}
"""


def secret() -> str:
    doc = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "introspection-client", "namespace": "kuadrant-system"},
        "stringData": {"clientID": "gateway", "clientSecret": secret_of("gateway")},
    }
    return "---\n" + json.dumps(doc) + "\n"


def gateway(manifests: Any, start_gateway: Any, provider: OidcProvider) -> Any:
    policy = POLICY.replace("ISSUER", provider.issuer)
    folder = manifests(extra=secret() + policy, skip=("05-authpolicy.yaml",))
    return start_gateway(folder)


def post(gw: Any, token: str | None) -> httpx.Response:
    headers = {"Host": HOST}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return httpx.post(
        gw.url + "/v1/chat/completions", headers=headers, json=chat(max_tokens=5), timeout=30
    )


def refused(answer: httpx.Response, reason: str) -> None:
    assert answer.status_code == 401, answer.text
    assert reason in answer.headers["x-ext-auth-reason"], answer.headers["x-ext-auth-reason"]
    assert answer.headers["www-authenticate"] == 'Bearer realm="opaque"'
    assert answer.json()["error"]["type"] == "authentication_error"
    assert "Traceback" not in answer.text


def test_the_tutorials_tiers_with_introspected_tokens(oidc, manifests, start_gateway) -> None:
    provider = oidc()
    gw = gateway(manifests, start_gateway, provider)
    dana = provider.token("opaque-dana")
    assert "." not in dana  # opaque: only the provider can say what it is
    client = openai.OpenAI(
        base_url=gw.url + "/v1", api_key=dana, default_headers={"Host": HOST}, max_retries=0
    )
    spent = 0
    with pytest.raises(openai.RateLimitError) as limited:
        for _ in range(20):
            answer = client.chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], max_tokens=10
            )
            assert answer.usage is not None
            spent += answer.usage.total_tokens
    assert 0 < spent <= 50 + 10
    assert limited.value.response.headers["x-ratelimit-limit-tokens"] == "50"
    assert {e["user"] for e in gw.access_log() if e["status"] == 200} == {"opaque-dana"}
    gold = post(gw, provider.token("opaque-erin"))
    assert gold.status_code == 200
    assert gold.headers["x-ratelimit-limit-tokens"] == "200"


def test_tokens_the_provider_does_not_vouch_for(oidc, manifests, start_gateway) -> None:
    provider = oidc()
    gw = gateway(manifests, start_gateway, provider)
    refused(post(gw, None), "credential not found")
    refused(post(gw, "made-up-token"), "token is not active")
    # a JWT is not an opaque token: this provider refuses to introspect it (400)
    refused(post(gw, provider.token("aisha")), "token introspection request failed: 400")

    # revoked: refused once the kept answer (cache.ttl: 1 s) is older than that
    erin = provider.token("opaque-erin")
    assert post(gw, erin).status_code == 200
    provider.revoke(erin, "opaque-erin")
    assert provider.introspect(erin) == {"active": False}
    time.sleep(1.2)
    refused(post(gw, erin), "token is not active")

    # the provider down: a token answered within the last second still passes, a new one
    # is refused at once, saying why
    dana = provider.token("opaque-dana")
    assert post(gw, dana).status_code == 200
    provider.stop()
    assert post(gw, dana).status_code == 200
    started = time.monotonic()
    refused(post(gw, "another-token"), "token introspection request failed: POST")
    assert time.monotonic() - started < 5


@pytest.mark.parametrize(
    ("options", "problem"),
    [
        ({"credentialsRef": {"name": "c"}}, "endpoint: must be an http(s) URL"),
        ({"endpoint": "http://x/i", "credentialsRef": {"name": "nope"}}, "not found: 'nope'"),
        ({"endpoint": "http://x/i", "credentialsRef": {"name": "half"}}, "needs clientID"),
        ({"endpoint": "http://x/i", "credentialsRef": {"name": "c"}, "timeout": -1}, "timeout"),
    ],
)
def test_an_introspection_rule_that_cannot_work_is_refused_at_load(
    options: dict, problem: str
) -> None:
    secrets = [
        SecretRecord("kuadrant-system", "c", data={"clientID": "a", "clientSecret": "s3cr3t"}),
        SecretRecord("kuadrant-system", "half", data={"clientID": "a"}),
    ]
    spec = {"authentication": {"o": {"oauth2Introspection": options}}}
    with pytest.raises(AuthConfigError) as error:
        compile_auth("ns/p", spec, None, secrets, "kuadrant-system")
    assert problem in str(error.value)
    assert "s3cr3t" not in str(error.value)
