"""The gateway's own verbs (apply, get, delete, counters, limits): formatting, `get`
against a served gateway (the Kubernetes API's Tables, as kubectl prints them), and the
other commands against a stand-in admin API that answers the contract with canned data on
a loopback port (for its failure modes: refusals, unreachable, not the admin API)."""

from __future__ import annotations

import datetime
import json
import os
import socket
import subprocess
import threading
import urllib.parse
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import click
import pytest
import yaml
from click.testing import CliRunner, Result

from tests.conftest import TUTORIAL, Gateway, run_cli
from tests.test_kubeapi import KUBECTL
from tokengateway.cli.kubectl import (
    AdminClient,
    AdminError,
    AdminUnreachableError,
    counters_table,
    format_window,
    limits_table,
    list_object,
    plural_of,
    reference,
    register,
    render_table,
    to_json,
    to_yaml,
)

NOW = datetime.datetime(2025, 1, 1, 12, 0, 0, tzinfo=datetime.UTC)
CREATED = "2025-01-01T11:55:00Z"  # five minutes before NOW

GATEWAY = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "Gateway",
    "metadata": {
        "name": "trlp-tutorial-gateway",
        "namespace": "gateway-system",
        "creationTimestamp": CREATED,
        "generation": 1,
        "uid": "u-1",
    },
    "spec": {
        "gatewayClassName": "istio",
        "listeners": [
            {"name": "http", "protocol": "HTTP", "port": 80},
            {"name": "admin", "protocol": "HTTP", "port": 9090},
        ],
    },
    "status": {
        "addresses": [{"type": "IPAddress", "value": "127.0.0.1"}],
        "conditions": [
            {
                "type": "Accepted",
                "status": "True",
                "reason": "Accepted",
                "message": "Resource accepted",
            },
            {
                "type": "Programmed",
                "status": "True",
                "reason": "Programmed",
                "message": "Resource programmed, assigned to service(s) 127.0.0.1:8080",
            },
        ],
    },
}

TRLP = {
    "apiVersion": "kuadrant.io/v1alpha1",
    "kind": "TokenRateLimitPolicy",
    "metadata": {
        "name": "trlp-tutorial-token-limits",
        "namespace": "gateway-system",
        "creationTimestamp": CREATED,
        "generation": 2,
    },
    "spec": {
        "targetRef": {
            "group": "gateway.networking.k8s.io",
            "kind": "Gateway",
            "name": "trlp-tutorial-gateway",
        },
        "limits": {"free": {"rates": [{"limit": 50, "window": "1m"}]}},
    },
    "status": {
        "conditions": [
            {
                "type": "Accepted",
                "status": "True",
                "reason": "Accepted",
                "message": "TokenRateLimitPolicy has been accepted",
                "observedGeneration": 2,
            },
            {
                "type": "Enforced",
                "status": "False",
                "reason": "Overridden",
                "message": "TokenRateLimitPolicy is overridden by\n[gateway-system/other]",
                "observedGeneration": 2,
            },
        ]
    },
}

LIMIT_FREE = {
    "namespace": "default/trlp-tutorial-llm-sim",
    "name": "gateway-system/trlp-tutorial-token-limits/free",
    "max_value": 50,
    "seconds": 60.0,
    "conditions": ['request.path == "/v1/chat/completions"', 'auth.identity.groups == "free"\n'],
    "variables": ["auth.identity.userid"],
}
COUNTERS = [
    {
        "limit": LIMIT_FREE,
        "set_variables": {"auth.identity.userid": "user-1"},
        "remaining": 12,
        "expires_in_seconds": 42.4,
    }
]


class TestFormatting:
    @pytest.mark.parametrize(
        ("seconds", "text"),
        [(60, "1m"), (2, "2s"), (90, "1m30s"), (86400, "24h"), (0.5, "500ms"), (0, "0s")],
    )
    def test_window(self, seconds: float, text: str) -> None:
        assert format_window(seconds) == text

    def test_table_layout(self) -> None:
        assert render_table(["NAME", "AGE"], [["a", "1s"], ["longer-name", "2d"]]) == (
            "NAME          AGE\na             1s\nlonger-name   2d"
        )
        assert render_table(["A", "B"], [["x", "y"]]) == "A     B\nx     y"  # minimum width 6

    def test_names(self) -> None:
        assert reference("TokenRateLimitPolicy", "x") == "tokenratelimitpolicy.kuadrant.io/x"
        assert reference("HTTPRoute", "r") == "httproute.gateway.networking.k8s.io/r"
        assert reference("Deployment", "d") == "deployment.apps/d"
        assert reference("Secret", "s") == "secret/s"
        assert reference("Widget", "w", "example.com/v1") == "widget.example.com/w"
        assert plural_of("AuthPolicy") == "authpolicies.kuadrant.io"
        assert plural_of("Gateway") == "gateways.gateway.networking.k8s.io"
        assert plural_of("Secret") == "secrets"

    def test_yaml_like_kubectl(self) -> None:
        obj = {"spec": {"rego": "allow {\n  true\n}\n", "list": [{"b": 1, "a": 2}]}, "kind": "X"}
        assert to_yaml(obj) == (
            "kind: X\nspec:\n  list:\n  - a: 2\n    b: 1\n  rego: |\n    allow {\n      true\n    }\n"
        )
        assert yaml.safe_load(to_yaml(TRLP)) == TRLP

    def test_json_and_list(self) -> None:
        listing = list_object([GATEWAY])
        assert listing["kind"] == "List" and listing["apiVersion"] == "v1"
        text = to_json(listing)
        assert text.startswith('{\n    "apiVersion": "v1",\n    "items": [')
        assert json.loads(text) == listing

    def test_counters_and_limits_tables(self) -> None:
        row = counters_table(COUNTERS).splitlines()[1].split()
        assert row == [
            "gateway-system/trlp-tutorial-token-limits/free",
            "50",
            "1m",
            "auth.identity.userid=user-1",
            "12",
            "42s",
        ]
        limits = limits_table([LIMIT_FREE]).splitlines()
        assert limits[0].split() == ["NAME", "MAX", "WINDOW", "VARIABLES", "CONDITIONS"]
        assert limits[1].endswith(
            'request.path == "/v1/chat/completions"; auth.identity.groups == "free"'
        )


# --- a fake admin API ----------------------------------------------------------------------

KNOWN_KINDS = {
    "Gateway",
    "HTTPRoute",
    "TokenRateLimitPolicy",
    "AuthPolicy",
    "Secret",
    "Service",
    "Deployment",
    "Namespace",
    "Kuadrant",
}


class FakeAdmin:
    """The admin API contract with an in-memory store; records what it was sent."""

    def __init__(self) -> None:
        self.store: dict[tuple[str, str, str], dict[str, Any]] = {}
        self.requests: list[dict[str, Any]] = []
        self.token: str | None = None
        self.override: tuple[int, bytes] | None = None  # answer this to everything
        self.counters: dict[str, list[dict[str, Any]]] = {"default/trlp-tutorial-llm-sim": COUNTERS}
        self.limits: dict[str, list[dict[str, Any]]] = {
            "default/trlp-tutorial-llm-sim": [LIMIT_FREE]
        }

    def reset(self) -> None:
        self.store.clear()
        self.requests.clear()
        self.token = None
        self.override = None

    def put(self, obj: dict[str, Any]) -> None:
        self.store[self.key(obj)] = obj

    @staticmethod
    def key(obj: dict[str, Any]) -> tuple[str, str, str]:
        meta = obj.get("metadata") or {}
        ns = "" if obj["kind"] == "Namespace" else meta.get("namespace") or "default"
        return (obj["kind"], ns, meta["name"])

    def handle(
        self, method: str, url: str, headers: dict[str, str], body: bytes
    ) -> tuple[int, Any]:
        parsed = urllib.parse.urlsplit(url)
        query = dict(urllib.parse.parse_qsl(parsed.query))
        self.requests.append(
            {
                "method": method,
                "path": parsed.path,
                "query": query,
                "headers": headers,
                "body": body,
            }
        )
        if self.token and headers.get("Authorization") != f"Bearer {self.token}":
            return 401, {"error": {"message": "a bearer token is required", "details": []}}
        if parsed.path == "/apis/apply" and method == "POST":
            return self.apply(body)
        if parsed.path == "/apis/delete" and method == "POST":
            return self.delete_docs(body)
        if parsed.path == "/apis/resources":
            return self.resources(method, query)
        for prefix, table in (("/limits/", self.limits), ("/counters/", self.counters)):
            if parsed.path.startswith(prefix) and method == "GET":
                return 200, table.get(urllib.parse.unquote(parsed.path[len(prefix) :]), [])
        return 404, {"error": {"message": f"no route {method} {parsed.path}"}}

    def apply(self, body: bytes) -> tuple[int, Any]:
        docs = [d for d in yaml.safe_load_all(body) if d]
        bad = [
            f"<stdin>#{i}: unsupported kind {d.get('kind')!r}"
            for i, d in enumerate(docs, 1)
            if d.get("kind") not in KNOWN_KINDS
        ]
        if bad:
            return 400, {"error": {"message": f"{len(bad)} invalid document(s)", "details": bad}}
        results = []
        for doc in docs:
            key = self.key(doc)
            old = self.store.get(key)
            action = (
                "created"
                if old is None
                else "unchanged"
                if old.get("spec") == doc.get("spec")
                else "configured"
            )
            stored = json.loads(json.dumps(doc))
            stored["metadata"].setdefault("namespace", key[1] or None)
            stored["metadata"]["creationTimestamp"] = CREATED
            self.store[key] = stored
            results.append(
                {
                    "apiVersion": doc["apiVersion"],
                    "kind": key[0],
                    "namespace": key[1],
                    "name": key[2],
                    "action": action,
                }
            )
        return 200, {"results": results}

    def delete_docs(self, body: bytes) -> tuple[int, Any]:
        keys = [self.key(d) for d in yaml.safe_load_all(body) if d]
        missing = [k for k in keys if k not in self.store]
        if missing:
            return 404, {
                "error": {
                    "message": "; ".join(f"{k} {n}/{name} not found" for k, n, name in missing)
                }
            }
        for key in keys:
            del self.store[key]
        return 200, {
            "results": [
                {"kind": k, "namespace": n, "name": name, "action": "deleted"}
                for k, n, name in keys
            ]
        }

    def resources(self, method: str, query: dict[str, str]) -> tuple[int, Any]:
        kind = query.get("kind", "")
        if kind not in KNOWN_KINDS:
            return 400, {"error": {"message": f"unknown kind {kind!r}"}}
        ns, name = query.get("namespace"), query.get("name")
        items = [
            obj
            for (k, n, nm), obj in self.store.items()
            if k == kind and (ns is None or n == ns) and (name is None or nm == name)
        ]
        if name is not None and not items:
            return 404, {"error": {"message": f"{kind} {ns}/{name} not found"}}
        if method == "DELETE":
            for obj in items:
                del self.store[self.key(obj)]
            return 200, {
                "results": [{"kind": kind, "namespace": ns, "name": name, "action": "deleted"}]
            }
        return 200, {"items": items}


@pytest.fixture(scope="module")
def fake_server() -> Iterator[tuple[FakeAdmin, str]]:
    admin = FakeAdmin()

    class Handler(BaseHTTPRequestHandler):
        def _serve(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length) if length else b""
            status, answer = admin.handle(self.command, self.path, dict(self.headers), body)
            data = json.dumps(answer).encode()
            if admin.override is not None:
                status, data = admin.override
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        do_GET = do_POST = do_DELETE = _serve

        def log_message(self, *args: Any) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield admin, f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


@pytest.fixture
def fake(fake_server: tuple[FakeAdmin, str]) -> FakeAdmin:
    fake_server[0].reset()
    return fake_server[0]


@pytest.fixture
def admin_url(fake_server: tuple[FakeAdmin, str]) -> str:
    return fake_server[1]


@click.group()
def cli() -> None:
    """Stands for `tokengateway`'s group."""


register(cli)


def run(
    admin: str, *args: str, input: str | None = None, env: dict[str, str] | None = None
) -> Result:
    runner = CliRunner()
    environment = {"TOKENGATEWAY_ADMIN": None, "TOKENGATEWAY_ADMIN_TOKEN": None, **(env or {})}
    result = runner.invoke(cli, [*args, "--admin", admin], input=input, env=environment)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # a traceback is a bug: show it
    return result


MANIFESTS = """\
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata:
  name: trlp-tutorial-gateway
  namespace: gateway-system
spec:
  gatewayClassName: istio
  listeners:
  - name: http
    protocol: HTTP
    port: 80
---
apiVersion: v1
kind: Secret
metadata:
  name: key-1
  namespace: kuadrant-system
  creationTimestamp: 2024-01-01T00:00:00Z
stringData:
  api_key: iamafreeuser
"""


# --- the commands --------------------------------------------------------------------------


class TestApply:
    def test_created_then_unchanged_then_configured(self, fake: FakeAdmin, admin_url: str) -> None:
        result = run(admin_url, "apply", "-f", "-", input=MANIFESTS)
        assert result.exit_code == 0, result.output
        assert result.stdout == (
            "gateway.gateway.networking.k8s.io/trlp-tutorial-gateway created\nsecret/key-1 created\n"
        )
        sent = fake.requests[-1]
        assert sent["headers"]["Content-Type"] == "application/yaml"
        docs = list(yaml.safe_load_all(sent["body"]))
        assert [d["kind"] for d in docs] == ["Gateway", "Secret"]
        assert docs[1]["metadata"]["creationTimestamp"] == "2024-01-01T00:00:00Z"  # kept as text
        assert "Authorization" not in sent["headers"]

        assert run(admin_url, "apply", "-f", "-", input=MANIFESTS).stdout.endswith(
            "secret/key-1 unchanged\n"
        )
        changed = MANIFESTS.replace("port: 80", "port: 8080")
        assert run(admin_url, "apply", "-f", "-", input=changed).stdout.startswith(
            "gateway.gateway.networking.k8s.io/trlp-tutorial-gateway configured\n"
        )

    def test_files_and_folders(self, fake: FakeAdmin, admin_url: str, tmp_path: Path) -> None:
        (tmp_path / "a.yaml").write_text(MANIFESTS)
        (tmp_path / "b.yaml").write_text(
            "apiVersion: kuadrant.io/v1beta1\nkind: Kuadrant\nmetadata: {name: kuadrant, namespace: kuadrant-system}\n"
        )
        result = run(admin_url, "apply", "-f", str(tmp_path))
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines()[-1] == "kuadrant.kuadrant.io/kuadrant created"

    def test_server_refusal_names_the_file(
        self, fake: FakeAdmin, admin_url: str, tmp_path: Path
    ) -> None:
        path = tmp_path / "bad.yaml"
        path.write_text(MANIFESTS + "---\napiVersion: v1\nkind: Widget\nmetadata: {name: w}\n")
        result = run(admin_url, "apply", "-f", str(path))
        assert result.exit_code == 1
        assert result.stdout == ""
        assert result.stderr == (
            "Error from server (BadRequest): 1 invalid document(s)\n"
            f"  {path}#3: unsupported kind 'Widget'\n"
        )

    def test_yaml_error_names_file_and_line(
        self, fake: FakeAdmin, admin_url: str, tmp_path: Path
    ) -> None:
        path = tmp_path / "broken.yaml"
        path.write_text("kind: Secret\nmetadata:\n  name: [oops\n")
        result = run(admin_url, "apply", "-f", str(path))
        assert result.exit_code == 1
        assert str(path) in result.stderr and "line" in result.stderr
        assert fake.requests == []  # nothing sent

    def test_namespace_option(self, fake: FakeAdmin, admin_url: str) -> None:
        doc = "apiVersion: v1\nkind: Service\nmetadata: {name: svc}\nspec: {ports: [{port: 80}]}\n"
        assert run(admin_url, "apply", "-n", "team", "-f", "-", input=doc).exit_code == 0
        assert ("Service", "team", "svc") in fake.store
        result = run(admin_url, "apply", "-n", "other", "-f", "-", input=MANIFESTS)
        assert result.exit_code == 1
        assert 'does not match the namespace "other"' in result.stderr

    def test_empty_input(self, fake: FakeAdmin, admin_url: str) -> None:
        result = run(admin_url, "apply", "-f", "-", input="---\n")
        assert result.exit_code == 1 and "no objects" in result.stderr


class TestDelete:
    @pytest.fixture(autouse=True)
    def _objects(self, fake: FakeAdmin) -> None:
        fake.put(TRLP)
        run_ok = yaml.safe_load_all(MANIFESTS)
        for doc in run_ok:
            fake.put(doc)

    def test_by_name(self, fake: FakeAdmin, admin_url: str) -> None:
        result = run(
            admin_url,
            "delete",
            "tokenratelimitpolicy",
            "-n",
            "gateway-system",
            "trlp-tutorial-token-limits",
        )
        assert result.exit_code == 0, result.output
        assert (
            result.stdout
            == 'tokenratelimitpolicy.kuadrant.io "trlp-tutorial-token-limits" deleted\n'
        )
        assert fake.requests[-1]["method"] == "DELETE"
        assert fake.requests[-1]["query"] == {
            "kind": "TokenRateLimitPolicy",
            "namespace": "gateway-system",
            "name": "trlp-tutorial-token-limits",
        }
        assert (
            "TokenRateLimitPolicy",
            "gateway-system",
            "trlp-tutorial-token-limits",
        ) not in fake.store

    def test_several_names_one_missing(self, fake: FakeAdmin, admin_url: str) -> None:
        result = run(admin_url, "delete", "secret", "-n", "kuadrant-system", "key-1", "key-2")
        assert result.exit_code == 1
        assert result.stdout == 'secret "key-1" deleted\n'
        assert result.stderr == 'Error from server (NotFound): secrets "key-2" not found\n'
        result = run(
            admin_url, "delete", "secret", "-n", "kuadrant-system", "key-2", "--ignore-not-found"
        )
        assert result.exit_code == 0 and result.output == ""

    def test_files(self, fake: FakeAdmin, admin_url: str) -> None:
        result = run(admin_url, "delete", "-f", "-", input=MANIFESTS)
        assert result.exit_code == 0, result.output
        assert result.stdout == (
            'gateway.gateway.networking.k8s.io "trlp-tutorial-gateway" deleted\nsecret "key-1" deleted\n'
        )
        assert fake.requests[-1]["path"] == "/apis/delete"
        result = run(admin_url, "delete", "-f", "-", input=MANIFESTS)
        assert result.exit_code == 1
        assert result.stderr.startswith(
            "Error from server (NotFound): Gateway gateway-system/trlp-tutorial-gateway not found"
        )

    def test_files_ignore_not_found(self, fake: FakeAdmin, admin_url: str) -> None:
        del fake.store[("Secret", "kuadrant-system", "key-1")]
        result = run(admin_url, "delete", "--ignore-not-found", "-f", "-", input=MANIFESTS)
        assert result.exit_code == 0, result.output
        assert (
            result.stdout == 'gateway.gateway.networking.k8s.io "trlp-tutorial-gateway" deleted\n'
        )

    def test_usage_errors(self, admin_url: str) -> None:
        assert "no name was specified" in run(admin_url, "delete", "trlp").stderr
        assert (
            "may not specify resource arguments"
            in run(admin_url, "delete", "trlp", "x", "-f", "-", input="").stderr
        )


class TestInspection:
    def test_counters(self, fake: FakeAdmin, admin_url: str) -> None:
        result = run(admin_url, "counters", "default/trlp-tutorial-llm-sim")
        assert result.exit_code == 0, result.output
        assert result.stdout == counters_table(COUNTERS) + "\n"
        assert fake.requests[-1]["path"] == "/counters/default/trlp-tutorial-llm-sim"
        assert (
            json.loads(
                run(admin_url, "counters", "default/trlp-tutorial-llm-sim", "-o", "json").stdout
            )
            == COUNTERS
        )

    def test_limits(self, fake: FakeAdmin, admin_url: str) -> None:
        result = run(admin_url, "limits", "default/trlp-tutorial-llm-sim")
        assert result.exit_code == 0, result.output
        assert result.stdout.splitlines()[0].split() == [
            "NAME",
            "MAX",
            "WINDOW",
            "VARIABLES",
            "CONDITIONS",
        ]
        assert fake.requests[-1]["path"] == "/limits/default/trlp-tutorial-llm-sim"

    def test_empty(self, admin_url: str) -> None:
        result = run(admin_url, "counters", "nowhere/route")
        assert result.exit_code == 0
        assert result.stdout == "" and result.stderr == "No counters in nowhere/route.\n"


class TestConnection:
    def test_token_header_sent(self, fake: FakeAdmin, admin_url: str) -> None:
        fake.token = "s3cret"
        result = run(admin_url, "counters", "a/b")
        assert result.exit_code == 1
        assert result.stderr.startswith(
            "Error from server (Unauthorized): a bearer token is required\n"
        )
        assert "--token" in result.stderr
        assert run(admin_url, "counters", "a/b", "--token", "s3cret").exit_code == 0
        assert fake.requests[-1]["headers"]["Authorization"] == "Bearer s3cret"
        assert (
            run(admin_url, "counters", "a/b", env={"TOKENGATEWAY_ADMIN_TOKEN": "s3cret"}).exit_code
            == 0
        )

    def test_admin_from_environment(self, fake: FakeAdmin, admin_url: str) -> None:
        result = CliRunner().invoke(
            cli, ["counters", "a/b"], env={"TOKENGATEWAY_ADMIN": admin_url.removeprefix("http://")}
        )
        assert result.exit_code == 0
        assert fake.requests[-1]["path"] == "/counters/a/b"

    def test_connection_refused(self) -> None:
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        url = f"http://127.0.0.1:{port}"
        for args in (
            ["get", "trlp"],
            ["apply", "-f", "-"],
            ["delete", "trlp", "x"],
            ["counters", "a/b"],
        ):
            result = run(url, *args, input=MANIFESTS)
            assert result.exit_code == 1
            assert result.stderr == (
                f"error: cannot reach the gateway's admin API at {url} "
                "(is tokengateway serve running? --admin sets the address)\n"
            )

    def test_client_errors_are_typed(self, fake: FakeAdmin, admin_url: str) -> None:
        client = AdminClient(admin_url)
        with pytest.raises(AdminError) as info:
            client.request("GET", "/apis/resources", query={"kind": "Widget"})
        assert info.value.status == 400 and info.value.reason == "BadRequest"
        with pytest.raises(AdminUnreachableError):
            AdminClient("http://127.0.0.1:1", timeout=2).counters("a/b")

    def test_not_the_admin_api(self, fake: FakeAdmin, admin_url: str) -> None:
        fake.override = (200, b"<html>hello</html>")
        result = run(admin_url, "get", "trlp")
        assert result.exit_code == 1
        assert result.stderr.startswith(
            f"error: {admin_url} answered with something that is not JSON"
        )
        fake.override = (200, b'{"object": "list", "data": []}')
        assert "answered with no Table" in run(admin_url, "get", "trlp").stderr
        fake.override = (200, b"{}")
        assert "not a list" in run(admin_url, "counters", "a/b").stderr
        # the data plane's 404 (OpenAI's envelope) is not taken for a missing object
        envelope = {
            "error": {"message": "no route for 127.0.0.1/apis/resources", "type": "not_found_error"}
        }
        fake.override = (404, json.dumps(envelope).encode())
        result = run(admin_url, "get", "trlp", "x")
        assert result.exit_code == 1
        assert result.stderr.startswith("Error from server (NotFound): no route for")
        assert "data plane" in result.stderr

    def test_bad_admin_url(self) -> None:
        result = run("http://[::1", "get", "trlp")
        assert result.exit_code == 1
        assert result.stderr.startswith("error: invalid --admin URL")

    def test_registers_on_the_real_group(self) -> None:
        group = click.Group()
        register(group)
        assert set(group.commands) == {"apply", "get", "delete", "counters", "limits"}


@pytest.fixture(scope="module")
def gw(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Gateway]:
    """One served gateway for the read-only `get` tests."""
    tmp = tmp_path_factory.mktemp("get")
    gateway = Gateway([TUTORIAL], [], tmp / "gateway.log", tmp / "state")
    yield gateway
    gateway.stop()


class TestGet:
    """`get` against a served gateway: the Kubernetes API's Tables, laid out as kubectl
    lays them out, and the objects as they come."""

    def get(self, gw: Gateway, *args: str) -> subprocess.CompletedProcess[str]:
        return run_cli("get", *args, "--admin", gw.admin_url)

    def test_the_servers_columns_as_kubectl_shows_them(self, gw: Gateway, tmp_path) -> None:
        ours = self.get(gw, "trlp", "-n", "gateway-system")
        assert ours.returncode == 0, ours.stderr
        header, row = ours.stdout.splitlines()
        assert header.split() == ["NAME", "ACCEPTED", "ENFORCED", "AGE"]
        assert row.split()[:3] == ["trlp-tutorial-token-limits", "True", "True"]
        # the same columns the real kubectl prints from the same Table
        config = tmp_path / "kubeconfig.yaml"
        config.write_text(run_cli("kubeconfig", "--admin", gw.admin_url).stdout)
        theirs = subprocess.run(
            [KUBECTL, "--kubeconfig", str(config), "get", "trlp", "-n", "gateway-system"],
            capture_output=True, text=True, timeout=60, check=False,
            env={"PATH": os.environ["PATH"], "HOME": str(tmp_path)},
        )  # fmt: skip
        assert theirs.returncode == 0, theirs.stderr
        assert theirs.stdout.splitlines()[0].split() == header.split()

    def test_all_namespaces_wide_and_several_kinds(self, gw: Gateway) -> None:
        listed = self.get(gw, "trlp", "-A").stdout.splitlines()
        assert listed[0].split()[:2] == ["NAMESPACE", "NAME"]
        assert listed[1].split()[:2] == ["gateway-system", "trlp-tutorial-token-limits"]
        wide = self.get(gw, "trlp", "-n", "gateway-system", "-o", "wide").stdout.splitlines()
        assert wide[0].split() == [
            "NAME", "ACCEPTED", "ENFORCED", "TARGETKIND", "TARGETNAME", "TARGETSECTION", "AGE",
        ]  # fmt: skip
        assert wide[1].split()[3:6] == ["Gateway", "trlp-tutorial-gateway", "<none>"]
        both = self.get(gw, "trlp,authpolicy", "-n", "gateway-system").stdout
        first, second = both.split("\n\n")
        assert "tokenratelimitpolicy.kuadrant.io/trlp-tutorial-token-limits" in first
        assert "authpolicy.kuadrant.io/trlp-tutorial-llm-api-keys" in second

    def test_objects_names_and_empty(self, gw: Gateway) -> None:
        one = self.get(gw, "trlp", "trlp-tutorial-token-limits", "-n", "gateway-system",
                       "-o", "yaml")  # fmt: skip
        obj = yaml.safe_load(one.stdout)
        assert obj["kind"] == "TokenRateLimitPolicy" and obj["status"]["conditions"]
        listing = json.loads(self.get(gw, "secrets", "-n", "kuadrant-system", "-o", "json").stdout)
        assert listing["kind"] == "List" and len(listing["items"]) == 2
        names = self.get(gw, "gtw", "-n", "gateway-system", "-o", "name").stdout
        assert names == "gateway.gateway.networking.k8s.io/trlp-tutorial-gateway\n"
        ns = self.get(gw, "ns", "-n", "ignored").stdout.splitlines()
        assert [line.split()[0] for line in ns] == ["NAME", "gateway-system"]
        empty = self.get(gw, "httproutes", "-n", "nowhere")
        assert empty.returncode == 0 and empty.stdout == ""
        assert empty.stderr == "No resources found in nowhere namespace.\n"

    def test_missing_objects_and_kubectls_own_formats(self, gw: Gateway) -> None:
        missing = self.get(gw, "trlp", "nope", "-n", "gateway-system")
        assert missing.returncode == 1
        assert missing.stderr == (
            'Error from server (NotFound): tokenratelimitpolicies.kuadrant.io "nope" not found\n'
        )
        path = self.get(gw, "gtw", "-n", "gateway-system", "-o", "jsonpath={.items[0]}")
        assert path.returncode == 1 and "-o jsonpath is kubectl's" in path.stderr
        bad = self.get(gw, "gtw", "-o", "xml")
        assert bad.returncode == 1 and "allowed formats are: json,name,wide,yaml" in bad.stderr
