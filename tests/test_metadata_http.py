"""`metadata` rules with `http`: the AuthPolicy asks a service about the caller.

A user directory (a small HTTP server on loopback) says each user's tier; the identity is
a JWT from the real OpenID Connect provider (tests/oidc_provider.py). The authorization
rule and the limits read the directory's answer as `auth.metadata.directory`.
"""

from __future__ import annotations

import json
from typing import Any

import httpx
import pytest

from tests.conftest import HOST, chat
from tests.oidc_provider import OidcProvider
from tokengateway.auth import AuthConfigError, compile_auth

POLICY = """---
apiVersion: kuadrant.io/v1
kind: AuthPolicy
metadata: {name: directory-users, namespace: gateway-system}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: trlp-tutorial-gateway}
  rules:
    authentication:
      oidc:
        jwt: {issuerUrl: ISSUER}
    metadata:
      directory:
        http:
          url: DIRECTORY/users/{auth.identity.sub}?client={auth.identity.client_id}
          headers:
            x-asked-by: {value: tokengateway}
        CACHE
      audit:
        priority: 1
        http:
          url: DIRECTORY/audit
          method: POST
          contentType: application/json
          bodyParameters:
            user: {selector: auth.identity.sub}
            tier: {selector: auth.metadata.directory.tier}
    authorization:
      tiers:
        opa:
          rego: |
            allow { input.auth.metadata.directory.tier == "free" }
            allow { input.auth.metadata.directory.tier == "gold" }
    response:
      success:
        filters:
          identity:
            json:
              properties:
                userid: {selector: auth.identity.sub}
                groups: {selector: auth.metadata.directory.tier}
                audited: {selector: auth.metadata.audit}
"""

TIERS = {"aisha": "gold", "carol": "free", "bob": "none"}


def directory(path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    if path == "/audit":
        return 200, {"content-type": "text/plain"}, b"noted " + body
    user = path.rpartition("/")[2]
    tier = TIERS.get(user)
    if tier is None:
        return 404, {"content-type": "application/json"}, b'{"error": "no such user"}'
    return 200, {"content-type": "application/json"}, json.dumps({"tier": tier}).encode()


def gateway(manifests: Any, start_gateway: Any, provider: OidcProvider, url: str, cache: str):
    policy = POLICY.replace("ISSUER", provider.issuer).replace("DIRECTORY", url)
    policy = policy.replace("CACHE", cache)
    folder = manifests(extra=policy, skip=("05-authpolicy.yaml",))
    return start_gateway(folder)


def post(gw: Any, token: str) -> httpx.Response:
    headers = {"Host": HOST, "Authorization": f"Bearer {token}"}
    return httpx.post(
        gw.url + "/v1/chat/completions", headers=headers, json=chat(max_tokens=5), timeout=30
    )


def test_the_tier_comes_from_the_directory(oidc, upstream, manifests, start_gateway) -> None:
    provider = oidc()
    service = upstream(directory)
    gw = gateway(manifests, start_gateway, provider, service.url, "")

    # aisha's token says "free"; the directory says "gold", and the directory is what the
    # policy reads
    answer = post(gw, provider.token("aisha"))
    assert answer.status_code == 200, answer.text
    assert answer.headers["x-ratelimit-limit-tokens"] == "200"
    path, headers, _ = service.requests[0]
    assert path == "/users/aisha"
    assert service.queries[0] == "client=aisha"
    assert headers["x-asked-by"] == "tokengateway"
    # the second rule (priority 1) read the first one's answer: a JSON POST
    path, headers, body = service.requests[1]
    assert path == "/audit" and headers["content-type"] == "application/json"
    assert json.loads(body) == {"user": "aisha", "tier": "gold"}

    assert post(gw, provider.token("carol")).headers["x-ratelimit-limit-tokens"] == "50"
    # a tier the policy does not allow, and a user the directory does not know: 403
    assert post(gw, provider.token("bob")).status_code == 403
    unknown = post(gw, provider.token("mallory"))
    assert unknown.status_code == 403
    assert unknown.json()["error"]["type"] == "permission_error"

    # without `cache`, each request asks again (a service's answer may change)
    calls = len(service.requests)
    token = provider.token("carol")
    for _ in range(3):
        assert post(gw, token).status_code == 200
    assert len(service.requests) == calls + 3 * 2

    # the directory down: no metadata, so the authorization rule says no (as Authorino,
    # which only logs a metadata failure)
    service.stop()
    down = post(gw, token)
    assert down.status_code == 403
    assert "Traceback" not in down.text


def test_a_cached_answer_is_shared(oidc, upstream, manifests, start_gateway) -> None:
    provider = oidc()
    service = upstream(directory)
    cache = "cache: {key: {selector: auth.identity.sub}, ttl: 60}"
    gw = gateway(manifests, start_gateway, provider, service.url, cache)
    token = provider.token("carol")
    for _ in range(4):
        assert post(gw, token).status_code == 200
    asked = [path for path, _, _ in service.requests]
    assert asked.count("/users/carol") == 1  # cached for 60 s
    assert asked.count("/audit") == 4  # that rule has no cache


@pytest.mark.parametrize(
    ("metadata", "problem"),
    [
        ({"u": {"userInfo": {"identitySource": "oidc"}}}, "userInfo metadata is not supported"),
        ({"u": {"uma": {"endpoint": "http://x"}}}, "uma metadata is not supported"),
        ({"u": {"http": {}}}, "use exactly one of: url, urlExpression"),
        ({"u": {"http": {"url": "http://x", "urlExpression": "'a'"}}}, "use exactly one of"),
        ({"u": {"http": {"url": "http://x", "method": "PUT"}}}, "must be GET or POST"),
        ({"u": {"http": {"url": "http://x", "sharedSecretRef": {"name": "s"}}}}, "credentials"),
        ({"u": {"http": {"url": "http://x", "contentType": "text/xml"}}}, "contentType"),
        ({"u": {}}, "expected `http`"),
    ],
)
def test_a_metadata_rule_that_cannot_work_is_refused_at_load(metadata: dict, problem: str) -> None:
    with pytest.raises(AuthConfigError) as error:
        compile_auth("ns/p", {"metadata": metadata}, None, (), "kuadrant-system")
    assert problem in str(error.value)
