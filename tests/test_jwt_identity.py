"""JWT identities: an AuthPolicy's `jwt` rule against a real OpenID Connect provider.

The provider is panva's `oidc-provider` on Node.js (tests/oidc_provider.py), which hands out
signed JWT access tokens by the client_credentials grant, each with its client's `tier`.
The tutorial's token limits count per `sub` and pick the tier from the token's claim; the
official `openai` SDK sends the tokens as `Authorization: Bearer`. Tokens the provider did
not sign (another key, `alg: none`, HS256 keyed with the public key, another issuer, an
expired one) are refused with Authorino's reasons; the provider rotates its keys while
requests flow; and a provider that goes down leaves the keys fetched before in use.
"""

from __future__ import annotations

import asyncio
import base64
import json
import threading
import time
from typing import Any

import httpx
import openai
import pytest
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from tests.conftest import HOST, MODEL, chat
from tests.oidc_provider import Key, OidcProvider, hs256, unsigned
from tokengateway.auth import AuthConfigError, AuthRequest, KeySet, compile_auth
from tokengateway.auth.jwt import LEEWAY, JwtVerifier

POLICY = """---
apiVersion: kuadrant.io/v1
kind: AuthPolicy
metadata: {name: oidc-users, namespace: gateway-system}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: trlp-tutorial-gateway}
  rules:
    authentication:
      oidc:
        jwt:
          issuerUrl: ISSUER
          ttl: TTL
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
                userid: {selector: auth.identity.sub}
                groups: {selector: auth.identity.groups.0}
"""


def gateway(
    manifests: Any, start_gateway: Any, provider: OidcProvider, ttl: int = 0, args: tuple = ()
) -> Any:
    """The tutorial with the jwt AuthPolicy instead of API keys."""
    policy = POLICY.replace("ISSUER", provider.issuer).replace("TTL", str(ttl))
    folder = manifests(extra=policy, skip=("05-authpolicy.yaml",))
    return start_gateway(folder, args=args)


def post(gw: Any, token: str | None, prefix: str = "Bearer") -> httpx.Response:
    headers = {"Host": HOST}
    if token is not None:
        headers["Authorization"] = f"{prefix} {token}"
    return httpx.post(
        gw.url + "/v1/chat/completions", headers=headers, json=chat(max_tokens=5), timeout=30
    )


def models(gw: Any, token: str) -> httpx.Response:
    """GET /v1/models: authenticated, never counted (the limits are for chat completions)."""
    headers = {"Host": HOST, "Authorization": f"Bearer {token}"}
    return httpx.get(gw.url + "/v1/models", headers=headers, timeout=30)


def refused(answer: httpx.Response, reason: str) -> None:
    """A 401 with Authorino's reason and challenge, in OpenAI's error envelope."""
    assert answer.status_code == 401, answer.text
    assert reason in answer.headers["x-ext-auth-reason"], answer.headers["x-ext-auth-reason"]
    assert answer.headers["www-authenticate"] == 'Bearer realm="oidc"'
    error = answer.json()["error"]
    assert error["type"] == "authentication_error"
    assert reason in error["message"]
    assert "Traceback" not in answer.text


def sdk(gw: Any, token: str) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gw.url + "/v1", api_key=token, default_headers={"Host": HOST}, max_retries=0
    )


def test_the_tutorials_tiers_with_tokens_from_the_provider(oidc, manifests, start_gateway) -> None:
    provider = oidc()
    gw = gateway(manifests, start_gateway, provider)

    # the official SDK sends aisha's token as `Authorization: Bearer`: free tier, 50 tokens
    # a minute counted for her `sub`
    aisha = provider.token("aisha")
    client = sdk(gw, aisha)
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
    assert {e["user"] for e in gw.access_log() if e["status"] == 200} == {"aisha"}

    # a second token for the same client is the same user: the same spent counter
    assert post(gw, provider.token("aisha")).status_code == 429
    # another free user counts on its own; a gold one has the gold limit
    assert post(gw, provider.token("carol")).status_code == 200
    gold = post(gw, provider.token("bob"))
    assert gold.status_code == 200
    assert gold.headers["x-ratelimit-limit-tokens"] == "200"
    # a genuine token whose claims the Rego does not allow: 403
    platinum = post(gw, provider.token("mallory"))
    assert platinum.status_code == 403
    assert platinum.json()["error"]["type"] == "permission_error"

    # the token is the gateway's business, never the model server's: the simulator echoes
    # nothing of it, and no log line carries it
    assert aisha not in gw.output()


def test_tokens_the_provider_did_not_issue_are_refused(oidc, manifests, start_gateway) -> None:
    key = Key("k1")
    provider = oidc([key], ttls={"carol": 1})
    gw = gateway(manifests, start_gateway, provider)
    claims = provider.claims("eve")

    # a token signed with the provider's key is accepted (the forgeries below differ from
    # it in one way each)
    assert post(gw, key.sign(claims)).status_code == 200
    # no credential, or another scheme
    refused(post(gw, None), "credential not found")
    refused(post(gw, key.sign(claims), prefix="APIKEY"), "credential not found")
    refused(post(gw, "not-a-jwt"), "malformed jwt")
    # signed by a key the provider never published, under a kid it does not have (this
    # asks for one refresh of the keys: still unknown) or under the provider's own kid
    stranger = Key("k2")
    refused(post(gw, stranger.sign(claims)), "failed to verify signature")
    refused(post(gw, stranger.sign(claims, kid="k1")), "failed to verify signature")
    # the provider's key, but another issuer
    refused(post(gw, key.sign(claims | {"iss": "https://evil.example"})), "different provider")
    # alg none; HS256 keyed with the public key (the classic algorithm confusion)
    refused(post(gw, unsigned(claims, "k1")), "unexpected signature algorithm")
    public_n = base64.urlsafe_b64decode(key.public_jwk["n"] + "==")
    refused(post(gw, hs256(claims, public_n, "k1")), "unexpected signature algorithm")
    pem = key.private.public_key().public_bytes(Encoding.PEM, PublicFormat.SubjectPublicKeyInfo)
    refused(post(gw, hs256(claims, pem, "k1")), "unexpected signature algorithm")
    jwk = json.dumps(key.public_jwk).encode()
    refused(post(gw, hs256(claims, jwk, "k1")), "unexpected signature algorithm")
    # signed right, but not valid now: expired, without exp, not before, issued later
    now = int(time.time())
    refused(post(gw, key.sign(claims | {"exp": now - 5})), "token is expired")
    refused(post(gw, key.sign({k: v for k, v in claims.items() if k != "exp"})), "expired")
    refused(post(gw, key.sign(claims | {"nbf": now + LEEWAY + 60})), "before the nbf")
    refused(post(gw, key.sign(claims | {"iat": now + LEEWAY + 60})), "before the iat")
    # within the leeway, a clock a little ahead is fine
    ahead = post(gw, key.sign(claims | {"nbf": now + 30, "iat": now + 30}))
    assert ahead.status_code == 200, ahead.text
    # a real token of the provider, kept while valid, refused once it expires
    carols = provider.token("carol")  # a 1-second token
    assert post(gw, carols).status_code == 200
    time.sleep(2.2)
    refused(post(gw, carols), "token is expired")


def test_keys_rotated_while_requests_flow(oidc, manifests, start_gateway) -> None:
    old, new = Key("old"), Key("new", "EC")
    provider = oidc([old])
    gw = gateway(manifests, start_gateway, provider, ttl=2)
    before = provider.token("bob")
    assert models(gw, before).status_code == 200

    statuses: list[int] = []
    stop = threading.Event()

    def traffic() -> None:
        with httpx.Client(timeout=30) as http:
            while not stop.is_set():
                answer = http.get(
                    gw.url + "/v1/models",
                    headers={"Host": HOST, "Authorization": f"Bearer {before}"},
                )
                statuses.append(answer.status_code)

    thread = threading.Thread(target=traffic)
    thread.start()
    try:
        # the provider publishes a new key (an EC one) and signs with it; the old one is
        # still published for the tokens already out
        provider.restart([new, old])
        after = provider.token("bob")
        assert json.loads(base64.urlsafe_b64decode(after.split(".")[0] + "=="))["kid"] == "new"
        # the gateway has never seen "new": it refreshes the keys once and accepts it
        answer = models(gw, after)
        assert answer.status_code == 200, answer.text
        time.sleep(1)
    finally:
        stop.set()
        thread.join()
    assert statuses and set(statuses) == {200}

    # the old key is withdrawn: within the ttl's refresh, tokens signed with it stop working
    provider.restart([new])
    deadline = time.monotonic() + 15
    while models(gw, before).status_code == 200:
        assert time.monotonic() < deadline, "the old key was never dropped"
        time.sleep(0.5)
    # (the provider lists only ES256 now, so the algorithm is what goes first)
    refused(models(gw, before), "signed with unsupported algorithm")
    assert models(gw, after).status_code == 200


def test_a_provider_down_leaves_the_keys_fetched_before(oidc, manifests, start_gateway) -> None:
    key = Key("k1")
    provider = oidc([key])
    gw = gateway(manifests, start_gateway, provider, ttl=1)
    seen = provider.token("aisha")
    assert post(gw, seen).status_code == 200
    provider.stop()
    time.sleep(2.5)  # past the ttl: refreshes fail, the keys stay
    assert post(gw, seen).status_code == 200  # a decision kept for this token
    assert post(gw, key.sign(provider.claims("zoe"))).status_code == 200  # verified anew
    # a token with a key nobody has: one refresh is tried (the provider is down), quickly
    started = time.monotonic()
    refused(post(gw, Key("k9").sign(provider.claims("zoe"))), "failed to verify signature")
    assert time.monotonic() - started < 5
    assert "refreshing the keys of " + provider.issuer in gw.output()


def test_a_gateway_started_before_its_provider(oidc, manifests, start_gateway, tmp_path) -> None:
    key = Key("k1")
    provider = oidc([key])
    provider.stop()
    gw = gateway(manifests, start_gateway, provider)
    # no keys at all: every token is refused, saying why
    refused(post(gw, key.sign(provider.claims("zoe"))), "missing openid connect configuration")
    provider.start([key])
    deadline = time.monotonic() + 20
    while post(gw, key.sign(provider.claims("zoe"))).status_code != 200:
        assert time.monotonic() < deadline, gw.output()
        time.sleep(0.5)
    assert post(gw, provider.token("carol")).status_code == 200


def test_every_worker_fetches_and_refreshes_its_keys(
    oidc, manifests, start_gateway, redis_server
) -> None:
    from tests.test_workers import _storage, _wait_workers

    provider = oidc([Key("k1")])
    storage, _ = _storage(redis_server)
    gw = gateway(manifests, start_gateway, provider, args=("--workers", "2", "--storage", storage))
    _wait_workers(gw, 2)
    first = provider.token("bob")
    # a new connection per request: both workers answer (the kernel spreads them)
    assert {models(gw, first).status_code for _ in range(20)} == {200}
    provider.restart([Key("k2"), *provider.keys])
    second = provider.token("bob")
    assert {models(gw, second).status_code for _ in range(20)} == {200}
    assert {models(gw, first).status_code for _ in range(20)} == {200}


# --- the engine alone ------------------------------------------------------------------------


def _request(token: str | None) -> AuthRequest:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return AuthRequest("GET", "http", HOST, "/v1/models", headers, "127.0.0.1", 1, "", 0, "r1")


def _engine(keys: KeySet, rules: dict[str, Any] | None = None) -> Any:
    spec = {"authentication": {"oidc": {"jwt": {"jwksUrl": "http://127.0.0.1:9/jwks"}}}}
    spec |= rules or {}
    return compile_auth("ns/p", spec, None, (), "kuadrant-system", key_sets=lambda *_: keys)


def test_decisions_are_kept_per_token_until_it_expires_or_the_keys_change() -> None:
    key = Key("k1")
    keys = KeySet(None, "http://127.0.0.1:9/jwks")
    keys.install({"keys": [key.public_jwk]})
    engine = _engine(keys)
    now = int(time.time())
    token = key.sign({"sub": "zoe", "exp": now + 600})
    first = engine.evaluate(_request(token))
    assert first.allowed and first.identity == {"sub": "zoe", "exp": now + 600}
    # kept: the same decision object, without verifying again (the keys are gone from the
    # set, unseen until its generation changes)
    keys.keys = ()
    assert engine.evaluate(_request(token)) is first
    assert engine.known(_request(token).headers, "/v1/models") is first
    # a new key set generation: worked out again, and refused (asking for a refresh)
    keys.install({"keys": []})
    again = engine.evaluate(_request(token))
    assert again.status == 401 and again.refresh_keys == (keys,)
    # a token that expires is not kept past its exp
    keys.install({"keys": [key.public_jwk]})
    short = key.sign({"sub": "zoe", "exp": time.time() + 1})
    assert engine.evaluate(_request(short)).allowed
    time.sleep(1.2)
    assert engine.evaluate(_request(short)).status == 401


def test_every_asymmetric_family_and_only_a_fitting_key() -> None:
    from cryptography.hazmat.primitives.asymmetric import ed25519

    rsa_key, ec_key, rs_only = Key("r"), Key("e", "EC"), Key("rs")
    ed = ed25519.Ed25519PrivateKey.generate()
    raw = base64.urlsafe_b64encode(ed.public_key().public_bytes_raw()).rstrip(b"=").decode()
    ed_jwk = {"kty": "OKP", "crv": "Ed25519", "kid": "d", "x": raw}
    no_alg = {k: v for k, v in rsa_key.public_jwk.items() if k != "alg"}
    keys = KeySet(None, "http://127.0.0.1:9/jwks")
    keys.install({"keys": [no_alg, ec_key.public_jwk, ed_jwk, rs_only.public_jwk]})
    verifier = JwtVerifier(keys)
    claims = {"sub": "zoe", "exp": time.time() + 60}
    assert verifier.verify(rsa_key.sign(claims)).claims == claims
    assert verifier.verify(rsa_key.sign(claims, alg="PS256")).claims == claims
    assert verifier.verify(ec_key.sign(claims)).claims == claims
    head = base64.urlsafe_b64encode(b'{"alg":"EdDSA","kid":"d"}').rstrip(b"=").decode()
    body = base64.urlsafe_b64encode(json.dumps(claims).encode()).rstrip(b"=").decode()
    sig = base64.urlsafe_b64encode(ed.sign(f"{head}.{body}".encode())).rstrip(b"=").decode()
    assert verifier.verify(f"{head}.{body}.{sig}").claims == claims
    # an RS256 signature under the EC key's kid: that key does not fit the algorithm
    forged = verifier.verify(rsa_key.sign(claims, kid="e"))
    assert forged.claims is None and forged.error is not None
    assert "failed to verify signature" in forged.error
    # a key that names its alg (RS256) is used for that alg only
    other_alg = verifier.verify(rs_only.sign(claims, alg="PS256"))
    assert other_alg.claims is None and not other_alg.unknown_key
    # a tampered payload
    token = ec_key.sign(claims)
    head, _, sig = token.split(".")
    tampered = base64.urlsafe_b64encode(b'{"sub":"root","exp":9999999999}').rstrip(b"=")
    assert verifier.verify(f"{head}.{tampered.decode()}.{sig}").claims is None


def test_a_key_set_fetched_with_discovery_and_its_failures() -> None:
    key = Key("k1")
    served = {
        "http://idp/.well-known/openid-configuration": json.dumps(
            {"issuer": "http://idp", "jwks_uri": "http://idp/jwks"}
        ).encode(),
        "http://idp/jwks": json.dumps({"keys": [key.public_jwk]}).encode(),
    }
    asked: list[str] = []

    async def fetch(url: str, timeout: float) -> bytes:
        asked.append(url)
        if url not in served:
            raise OSError(f"GET {url}: connection refused")
        return served[url]

    async def main() -> None:
        keys = KeySet("http://idp", None)
        # callers at the same time share one fetch
        assert await asyncio.gather(keys.refresh(fetch), keys.refresh(fetch)) == [True, True]
        assert asked == list(served) and len(keys.keys) == 1 and keys.generation == 1
        # the same keys again: the generation (and so every kept decision) stays
        await keys.refresh(fetch)
        assert keys.generation == 1
        # forced refreshes are rate limited
        assert await keys.refresh(fetch, forced=True) is True
        count = len(asked)
        assert await keys.refresh(fetch, forced=True) is False
        assert len(asked) == count
        # a provider down: the keys stay, the error is kept for the log
        served.clear()
        assert await keys.refresh(fetch) is True
        assert keys.keys and keys.error is not None and "connection refused" in keys.error
        # an issuer that is not the one discovery names: no keys
        served["http://other/.well-known/openid-configuration"] = json.dumps(
            {"issuer": "http://elsewhere", "jwks_uri": "http://idp/jwks"}
        ).encode()
        other = KeySet("http://other", None)
        assert await other.refresh(fetch) is False
        assert other.error is not None and "did not match" in other.error

    asyncio.run(main())


@pytest.mark.parametrize(
    ("jwt", "problem"),
    [
        ({}, "use exactly one of: issuerUrl, jwksUrl"),
        ({"issuerUrl": "http://a", "jwksUrl": "http://b"}, "use exactly one of"),
        ({"issuerUrl": "ftp://a"}, "must be an http(s) URL"),
        ({"issuerUrl": "http://a", "ttl": -1}, "must be a whole number"),
    ],
)
def test_a_jwt_rule_that_cannot_work_is_refused_at_load(jwt: dict, problem: str) -> None:
    spec = {"authentication": {"oidc": {"jwt": jwt}}}
    with pytest.raises(AuthConfigError) as error:
        compile_auth("ns/p", spec, None, (), "kuadrant-system")
    assert problem in str(error.value)
