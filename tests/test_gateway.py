"""Gateway behaviour beyond the tutorial's happy path, against controlled upstreams."""

from __future__ import annotations

import asyncio
import json

import httpx

from tests.conftest import HOST, chat, run_cli

GATEWAY = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: gateway-system}
spec:
  gatewayClassName: any
  listeners:
  - {name: http, protocol: HTTP, port: 80, hostname: "api.example.com", allowedRoutes: {namespaces: {from: All}}}
---
apiVersion: v1
kind: Service
metadata: {name: llm, namespace: default}
spec:
  ports: [{port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: llm, namespace: default}
spec:
  parentRefs: [{name: gw, namespace: gateway-system}]
  rules:
  - backendRefs: [{name: llm, port: 80}]
    TIMEOUTS
"""

TOKEN_LIMIT = """
---
apiVersion: kuadrant.io/v1alpha1
kind: TokenRateLimitPolicy
metadata: {name: tokens, namespace: gateway-system}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: gw}
  limits:
    everyone:
      rates: [{limit: LIMIT, window: 1m}]
"""


def write(tmp_path, text: str, timeouts: str = "") -> str:
    path = tmp_path / "gw.yaml"
    path.write_text(text.replace("TIMEOUTS", timeouts))
    return str(path)


def completion(usage: dict | None) -> bytes:
    doc: dict = {
        "id": "x",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "four words of text"},
                "finish_reason": "stop",
            }
        ],
    }
    if usage is not None:
        doc["usage"] = usage
    return json.dumps(doc).encode()


def client(gw) -> httpx.Client:
    return httpx.Client(base_url=gw.url, headers={"Host": "api.example.com"}, timeout=30)


def test_zero_tokens_count_as_one(tmp_path, start_gateway, upstream) -> None:
    up = upstream(
        lambda path, body: (
            200,
            {"content-type": "application/json"},
            completion({"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0}),
        )
    )
    path = write(tmp_path, GATEWAY + TOKEN_LIMIT.replace("LIMIT", "3"))
    gw = start_gateway(path, args=("--backend", f"llm={up.url}"))
    c = client(gw)
    assert [c.post("/v1/chat/completions", json=chat()).status_code for _ in range(4)] == [
        200,
        200,
        200,
        429,
    ]


def test_response_without_usage_is_charged_an_estimate(tmp_path, start_gateway, upstream) -> None:
    up = upstream(lambda path, body: (200, {"content-type": "application/json"}, completion(None)))
    path = write(tmp_path, GATEWAY + TOKEN_LIMIT.replace("LIMIT", "12"))
    gw = start_gateway(path, args=("--backend", f"default/llm={up.url}"))
    c = client(gw)
    # each request: prompt "What is Kubernetes?" (~5 tokens) + "four words of text" (~5)
    statuses = [c.post("/v1/chat/completions", json=chat()).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]


def test_reads_without_usage_are_not_charged(tmp_path, start_gateway, upstream) -> None:
    """A TRLP without `when` covers GET /v1/models too: an answer without usage to a
    request that generates nothing is charged nothing (as Kuadrant), not 1 token."""
    models = b'{"object": "list", "data": [{"id": "m", "object": "model"}]}'

    def answer(path, body):
        if path.startswith("/v1/models"):
            return 200, {"content-type": "application/json"}, models
        return 200, {"content-type": "application/json"}, completion({"total_tokens": 2})

    up = upstream(answer)
    path = write(tmp_path, GATEWAY + TOKEN_LIMIT.replace("LIMIT", "3"))
    gw = start_gateway(path, args=("--backend", f"default/llm={up.url}"))
    c = client(gw)
    for _ in range(10):
        r = c.get("/v1/models")
        assert r.status_code == 200
        assert r.headers["x-ratelimit-remaining-tokens"] == "3"
    assert c.post("/v1/chat/completions", json=chat()).status_code == 200  # 2 of 3 spent
    r = c.get("/v1/models")
    assert r.status_code == 200 and r.headers["x-ratelimit-remaining-tokens"] == "1"
    assert c.post("/v1/chat/completions", json=chat()).status_code == 200  # 4 of 3: crosses
    assert c.get("/v1/models").status_code == 429  # the spent budget still refuses reads


def test_head_and_no_content_answers_carry_no_made_up_length(
    tmp_path, start_gateway, upstream
) -> None:
    """RFC 9110 8.6: a HEAD answer's Content-Length, if sent, is the GET's (which the
    gateway does not know: it sends none); a 204 or 304 has none at all."""
    models = b'{"object": "list", "data": []}'

    def answer(path, body):
        if path == "/v1/gone":
            return 204, {}, b""
        return 200, {"content-type": "application/json"}, models

    up = upstream(answer)
    gw = start_gateway(write(tmp_path, GATEWAY), args=("--backend", f"default/llm={up.url}"))
    c = client(gw)
    head = c.head("/v1/models")
    assert head.status_code == 200
    assert "content-length" not in head.headers and "transfer-encoding" not in head.headers
    gone = c.delete("/v1/gone")
    assert gone.status_code == 204 and gone.content == b""
    assert "content-length" not in gone.headers and "transfer-encoding" not in gone.headers
    get = c.get("/v1/models")  # the connection still works, framed as before
    assert get.headers["content-length"] == str(len(models)) and get.content == models


def test_upstream_errors_pass_through_and_are_not_charged(
    tmp_path, start_gateway, upstream
) -> None:
    up = upstream(
        lambda path, body: (
            503,
            {"content-type": "application/json"},
            b'{"error": {"message": "overloaded", "type": "server_error"}}',
        )
    )
    path = write(tmp_path, GATEWAY + TOKEN_LIMIT.replace("LIMIT", "1"))
    gw = start_gateway(path, args=("--backend", f"llm={up.url}"))
    c = client(gw)
    for _ in range(3):
        r = c.post("/v1/chat/completions", json=chat())
        assert r.status_code == 503
        assert r.json()["error"]["message"] == "overloaded"


def test_unreachable_upstream_is_502(tmp_path, start_gateway) -> None:
    import socket

    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()  # nothing listens there now
    gw = start_gateway(write(tmp_path, GATEWAY), args=("--backend", f"llm=http://127.0.0.1:{port}"))
    r = client(gw).post("/v1/chat/completions", json=chat())
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_unreachable"
    assert "Traceback" not in r.text


def test_slow_upstream_is_504_with_route_timeout(tmp_path, start_gateway, upstream) -> None:
    async def slow(path, body):
        await asyncio.sleep(3)
        return 200, {"content-type": "application/json"}, completion(None)

    up = upstream(slow)
    path = write(tmp_path, GATEWAY, timeouts="timeouts: {request: 500ms}")
    gw = start_gateway(path, args=("--backend", f"llm={up.url}"))
    r = client(gw).post("/v1/chat/completions", json=chat())
    assert r.status_code == 504
    assert r.json()["error"]["code"] == "upstream_timeout"


def test_request_reaches_upstream_intact(tmp_path, start_gateway, upstream) -> None:
    up = upstream(
        lambda path, body: (
            200,
            {"content-type": "application/json", "x-up": "1"},
            completion({"total_tokens": 3}),
        )
    )
    gw = start_gateway(write(tmp_path, GATEWAY), args=("--backend", f"llm={up.url}"))
    body = json.dumps(chat()).encode()
    r = client(gw).post(
        "/v1/chat/completions?x=1",
        content=body,
        headers={"content-type": "application/json", "x-custom": "yes"},
    )
    assert r.status_code == 200 and r.headers["x-up"] == "1"
    path, headers, received = up.requests[-1]
    assert path == "/v1/chat/completions" and received == body
    assert headers["x-custom"] == "yes"
    assert headers["x-forwarded-host"] == "api.example.com"
    assert headers["x-request-id"]


RLP = """
---
apiVersion: kuadrant.io/v1
kind: RateLimitPolicy
metadata: {name: requests, namespace: default}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: llm}
  limits:
    per-client:
      rates: [{limit: 2, window: 10s}]
      when:
      - predicate: request.method == "POST"
"""


def test_rate_limit_policy_counts_requests(tmp_path, start_gateway, upstream) -> None:
    up = upstream(
        lambda path, body: (
            200,
            {"content-type": "application/json"},
            completion({"total_tokens": 1000}),
        )
    )
    gw = start_gateway(write(tmp_path, GATEWAY + RLP), args=("--backend", f"llm={up.url}"))
    c = client(gw)
    statuses = [c.post("/v1/chat/completions", json=chat()).status_code for _ in range(3)]
    assert statuses == [200, 200, 429]
    assert c.get("/v1/models").status_code == 200  # the predicate limits POST only
    assert len(up.requests) == 3


CREDENTIALS = """
---
apiVersion: v1
kind: Secret
metadata:
  name: key
  namespace: kuadrant-system
  labels: {app: creds}
stringData: {api_key: s3cret}
---
apiVersion: kuadrant.io/v1
kind: AuthPolicy
metadata: {name: auth, namespace: default}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: llm}
  rules:
    authentication:
      keys:
        apiKey: {selector: {matchLabels: {app: creds}}}
        credentials: LOCATION
"""


def test_each_credential_location(tmp_path, start_gateway, upstream) -> None:
    up = upstream(
        lambda path, body: (
            200,
            {"content-type": "application/json"},
            completion({"total_tokens": 1}),
        )
    )
    cases = {
        "{authorizationHeader: {prefix: Token}}": ({"Authorization": "Token s3cret"}, {}, {}),
        "{customHeader: {name: X-API-KEY}}": ({"X-API-KEY": "s3cret"}, {}, {}),
        "{queryString: {name: api_key}}": ({}, {"api_key": "s3cret"}, {}),
        "{cookie: {name: session}}": ({"Cookie": "other=1; session=s3cret"}, {}, {}),
    }
    for i, (location, (headers, params, _)) in enumerate(cases.items()):
        folder = tmp_path / f"c{i}"
        folder.mkdir()
        gw = start_gateway(
            write(folder, GATEWAY + CREDENTIALS.replace("LOCATION", location)),
            args=("--backend", f"llm={up.url}"),
        )
        c = client(gw)
        assert c.get("/v1/models", headers=headers, params=params).status_code == 200, location
        assert c.get("/v1/models").status_code == 401, location
        wrong = {k: v.replace("s3cret", "nope") for k, v in headers.items()}
        wrong_params = {k: "nope" for k in params}
        assert c.get("/v1/models", headers=wrong, params=wrong_params).status_code == 401, location


def test_non_simulator_deployment_is_a_clear_error(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("""
apiVersion: apps/v1
kind: Deployment
metadata: {name: vllm}
spec:
  selector: {matchLabels: {app: vllm}}
  template:
    metadata: {labels: {app: vllm}}
    spec:
      containers: [{name: vllm, image: vllm/vllm-openai:latest}]
---
apiVersion: v1
kind: Service
metadata: {name: vllm}
spec:
  selector: {app: vllm}
  ports: [{port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw}
spec:
  gatewayClassName: x
  listeners: [{name: http, protocol: HTTP, port: 80}]
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: r}
spec:
  parentRefs: [{name: gw}]
  rules: [{backendRefs: [{name: vllm, port: 80}]}]
""")
    for command in ("validate", "serve"):
        result = run_cli(command, "-f", str(path))
        assert result.returncode == 1
        assert "vllm/vllm-openai:latest" in result.stderr
        assert "--backend default/vllm=http://HOST:PORT" in result.stderr
        assert "tokengateway.io/backend-url" in result.stderr
    ok = run_cli("validate", "-f", str(path), "--backend", "vllm=http://127.0.0.1:9")
    assert ok.returncode == 0, ok.stderr


def test_validate_reports_bad_manifests(tmp_path) -> None:
    path = tmp_path / "bad.yaml"
    path.write_text("""
apiVersion: kuadrant.io/v1alpha1
kind: TokenRateLimitPolicy
metadata: {name: bad, namespace: gateway-system}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: gw}
  limits:
    free:
      rates: [{limit: 50, window: 1d}]
""")
    result = run_cli("validate", "-f", str(path))
    assert result.returncode == 1
    assert "bad.yaml#1" in result.stderr
    assert "spec.limits.free.rates[0].window" in result.stderr
    assert "Traceback" not in result.stderr


def test_bad_cel_is_a_load_error_naming_policy_and_limit(tmp_path, manifests) -> None:
    folder = manifests(replace={'request.path == "/v1/chat/completions"': "request.path =="})
    result = run_cli("validate", "-f", str(folder))
    assert result.returncode == 1
    assert "gateway-system/trlp-tutorial-token-limits" in result.stderr
    assert "'free'" in result.stderr


def test_validate_compiles_cel_and_rego_of_policies_whose_target_is_absent(tmp_path) -> None:
    """A typo is caught before the target arrives: the Gateway is not in the files."""
    path = tmp_path / "early.yaml"
    policy = """
apiVersion: kuadrant.io/v1alpha1
kind: TokenRateLimitPolicy
metadata: {name: early, namespace: gateway-system}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: not-yet}
  limits:
    free:
      rates: [{limit: 50, window: 1m}]
      when: [{predicate: 'auth.identity.groups.split(",").exists(g, g == "free"'}]
      counters: [{expression: auth.identity.userid}]
---
apiVersion: kuadrant.io/v1
kind: AuthPolicy
metadata: {name: early-auth, namespace: gateway-system}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: Gateway, name: not-yet}
  rules:
    authorization:
      opa:
        opa: {rego: "allow { input.context.request.http.method == }"}
"""
    path.write_text(policy)
    result = run_cli("validate", "-f", str(path))
    assert result.returncode == 1, result.stdout
    assert "gateway-system/early" in result.stderr
    assert "'free'" in result.stderr
    assert "gateway-system/early-auth" in result.stderr
    assert "Rego does not compile" in result.stderr
    assert "Traceback" not in result.stderr
    # the same policies, written correctly, only warn that their target is missing
    path.write_text(
        policy.replace('g == "free"\'', 'g == "free")\'').replace("method == }", "method != 1 }")
    )
    result = run_cli("validate", "-f", str(path))
    assert result.returncode == 0, result.stderr
    assert "not-yet" in result.stderr and "not found" in result.stderr


def test_stdin_manifests(tmp_path) -> None:
    result = run_cli("validate", "-f", "-", stdin=GATEWAY.replace("TIMEOUTS", ""))
    assert result.returncode == 1  # the Service has no address
    assert "Service default/llm" in result.stderr
    result = run_cli(
        "validate",
        "-f",
        "-",
        "--backend",
        "llm=http://127.0.0.1:9",
        stdin=GATEWAY.replace("TIMEOUTS", ""),
    )
    assert result.returncode == 0, result.stderr


def test_host_header_is_required_to_match_a_listener(tmp_path, start_gateway, upstream) -> None:
    up = upstream(lambda path, body: (200, {"content-type": "application/json"}, completion(None)))
    gw = start_gateway(write(tmp_path, GATEWAY), args=("--backend", f"llm={up.url}"))
    assert httpx.get(gw.url + "/v1/models", headers={"Host": HOST}).status_code == 404
    assert (
        httpx.get(gw.url + "/v1/models", headers={"Host": "api.example.com:8080"}).status_code
        == 200
    )


def test_forwarding_headers_are_the_gateways_own(tmp_path, start_gateway, upstream) -> None:
    up = upstream(lambda path, body: (200, {"content-type": "application/json"}, completion(None)))
    gw = start_gateway(write(tmp_path, GATEWAY), args=("--backend", f"llm={up.url}"))
    r = client(gw).post(
        "/v1/chat/completions",
        json=chat(),
        headers={
            "x-forwarded-host": "evil.example.com",
            "x-forwarded-proto": "https",
            "x-forwarded-for": "10.0.0.1",
            "connection": "keep-alive, x-hop-secret",
            "x-hop-secret": "not for the upstream",
        },
    )
    assert r.status_code == 200
    raw = up.raw_headers[-1]
    named = [k for k, _ in raw]
    for name in ("x-forwarded-host", "x-forwarded-proto", "x-forwarded-for"):
        assert named.count(name) == 1, (name, raw)
    seen = dict(raw)
    assert seen["x-forwarded-host"] == "api.example.com"
    assert seen["x-forwarded-proto"] == "http"
    assert seen["x-forwarded-for"] == "10.0.0.1, 127.0.0.1"  # the chain, extended
    assert "x-hop-secret" not in seen


def test_an_aborted_body_is_logged(tmp_path, start_gateway, upstream) -> None:
    import socket
    import time

    up = upstream(lambda path, body: (200, {"content-type": "application/json"}, completion(None)))
    gw = start_gateway(write(tmp_path, GATEWAY), args=("--backend", f"llm={up.url}"))
    with socket.create_connection(("127.0.0.1", gw.port), timeout=5) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: api.example.com\r\n"
            b'Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n{"model": '
        )
        time.sleep(0.3)
    lines = gw.access_log(at_least=1)
    assert lines and lines[-1]["status"] == 499 and lines[-1]["route"] == "default/llm"
    assert up.requests == []  # a truncated body never goes upstream
