"""The tutorial's Steps 1-7, end to end: real gateway and simulator processes on loopback."""

from __future__ import annotations

import time

import httpx

from tests.conftest import HOST, MODEL, TUTORIAL, chat, run_cli

FREE_EXTRA = """
apiVersion: v1
kind: Secret
metadata:
  name: free-user-3
  namespace: kuadrant-system
  labels: {app: my-llm}
  annotations:
    kuadrant.io/groups: free
    secret.kuadrant.io/user-id: user-3
stringData:
  api_key: another-free-key
---
apiVersion: v1
kind: Secret
metadata:
  name: silver-user
  namespace: kuadrant-system
  labels: {app: my-llm}
  annotations:
    kuadrant.io/groups: silver
    secret.kuadrant.io/user-id: user-9
stringData:
  api_key: iamasilveruser
"""


def spend(client: httpx.Client, limit_hits: int = 10) -> list[int]:
    """Send chat requests until the first 429; the statuses seen."""
    statuses = []
    for _ in range(limit_hits):
        r = client.post("/v1/chat/completions", json=chat())
        statuses.append(r.status_code)
        if r.status_code == 429:
            break
    return statuses


def test_step3_connectivity_before_policies(manifests, start_gateway) -> None:
    folder = manifests(skip=("04-api-keys.yaml", "05-authpolicy.yaml", "06-token-limits.yaml"))
    gw = start_gateway(folder)
    r = httpx.get(gw.url + "/v1/models", headers={"Host": HOST})
    assert r.status_code == 200
    assert r.json()["data"][0]["id"] == MODEL


def test_step7_free_user_until_429_then_gold_keeps_working(start_gateway) -> None:
    gw = start_gateway(TUTORIAL)
    free = gw.client("iamafreeuser")
    r = free.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200
    usage = r.json()["usage"]
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"] > 0
    # The tokens of the request that crossed the limit were counted after it succeeded,
    # so the user is refused once the total in the window reaches 50.
    used = usage["total_tokens"]
    while used < 50:
        r = free.post("/v1/chat/completions", json=chat())
        assert r.status_code == 200
        used += r.json()["usage"]["total_tokens"]
    refused = free.post("/v1/chat/completions", json=chat())
    assert refused.status_code == 429
    assert 0 < int(refused.headers["retry-after"]) <= 60
    error = refused.json()["error"]
    assert error["type"] == "rate_limit_exceeded" and "50" in error["message"]

    gold = gw.client("iamagolduser")
    body = chat("Explain cloud native architecture", 200)
    r = gold.post("/v1/chat/completions", json=body)
    assert r.status_code == 200  # its own counter and its own limit
    gold_used = r.json()["usage"]["total_tokens"]
    while gold_used < 200:
        r = gold.post("/v1/chat/completions", json=body)
        assert r.status_code == 200
        gold_used += r.json()["usage"]["total_tokens"]
    assert gold.post("/v1/chat/completions", json=body).status_code == 429
    # /v1/models is not limited: the limits' predicate names /v1/chat/completions only.
    assert free.get("/v1/models").status_code == 200


def test_users_of_one_tier_have_their_own_counters(manifests, start_gateway) -> None:
    gw = start_gateway(manifests(extra=FREE_EXTRA))
    assert spend(gw.client("iamafreeuser"))[-1] == 429
    other = gw.client("another-free-key")
    r = other.post("/v1/chat/completions", json=chat())
    assert r.status_code == 200


def test_authentication_and_authorization_errors(manifests, start_gateway) -> None:
    gw = start_gateway(manifests(extra=FREE_EXTRA))
    r = gw.client(None).post("/v1/chat/completions", json=chat())
    assert r.status_code == 401
    assert r.headers["www-authenticate"] == 'APIKEY realm="api-key-users"'
    assert r.headers["x-ext-auth-reason"]
    assert r.json()["error"]["type"] == "authentication_error"
    r = gw.client("wrong-key").post("/v1/chat/completions", json=chat())
    assert r.status_code == 401
    assert "wrong-key" not in r.text
    r = gw.client("iamafreeuser", prefix="Bearer").post("/v1/chat/completions", json=chat())
    assert r.status_code == 401  # the policy reads the APIKEY prefix only
    r = gw.client("iamasilveruser").post("/v1/chat/completions", json=chat())
    assert r.status_code == 403  # the Rego allows free and gold only
    assert r.headers["x-ext-auth-reason"]
    assert r.json()["error"]["type"] == "permission_error"


def test_window_reopens(manifests, start_gateway) -> None:
    gw = start_gateway(manifests(replace={"window: 1m": "window: 2s"}))
    free = gw.client("iamafreeuser")
    statuses = spend(free)
    assert statuses[-1] == 429
    r = free.post("/v1/chat/completions", json=chat())
    assert r.status_code == 429
    assert int(r.headers["retry-after"]) <= 2
    time.sleep(2.2)
    assert free.post("/v1/chat/completions", json=chat()).status_code == 200


def test_unknown_host_and_path_get_404_in_openai_envelope(manifests, start_gateway) -> None:
    folder = manifests(
        replace={
            'type: PathPrefix\n            value: "/"': 'type: PathPrefix\n            value: "/v1"'
        }
    )
    gw = start_gateway(folder)
    r = httpx.get(gw.url + "/v1/models", headers={"Host": "other.example.com"})
    assert r.status_code == 404
    assert r.json()["error"]["code"] == "route_not_found"
    r = gw.client().get("/v2/models")
    assert r.status_code == 404
    assert set(r.json()["error"]) == {"message", "type", "param", "code"}


def test_demo_replays_step7() -> None:
    result = run_cli("demo", timeout=90)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert "-> 200" in out and "-> 429" in out and "-> 401" in out
    assert "free user" in out and "gold user" in out


def test_validate_accepts_the_tutorial() -> None:
    result = run_cli("validate", "-f", str(TUTORIAL))
    assert result.returncode == 0, result.stderr
    assert "TokenRateLimitPolicy" in result.stdout
