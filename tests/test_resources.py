"""The manifest layer: loading like `kubectl apply -f`, typed models, Kuadrant's validation."""

import io
import textwrap
from pathlib import Path

import pytest

from tokengateway.resources import (
    SUPPORTED_KINDS,
    AuthPolicy,
    Deployment,
    Document,
    Gateway,
    HTTPRoute,
    Kuadrant,
    ManifestError,
    ManifestIssue,
    Namespace,
    RateLimitPolicy,
    Resource,
    Secret,
    Service,
    TokenRateLimitPolicy,
    load_paths,
    parse_resources,
    parse_window,
)
from tokengateway.resources.gateway_api import RouteNamespaces

# --- the tutorial's manifests, with its shell variables expanded ------------------------------

KUADRANT = """\
apiVersion: kuadrant.io/v1beta1
kind: Kuadrant
metadata:
  name: kuadrant
  namespace: kuadrant-system
"""

LLM_SIM = """\
apiVersion: apps/v1
kind: Deployment
metadata:
  name: trlp-tutorial-llm-sim
  labels:
    app: trlp-tutorial-llm-sim
spec:
  replicas: 1
  selector:
    matchLabels:
      app: trlp-tutorial-llm-sim
  template:
    metadata:
      labels:
        app: trlp-tutorial-llm-sim
    spec:
      containers:
      - name: simulator
        image: ghcr.io/llm-d/llm-d-inference-sim:v0.1.1
        args:
          - --model
          - meta-llama/Llama-3.1-8B-Instruct
          - --port
          - "8000"
        ports:
          - containerPort: 8000
---
apiVersion: v1
kind: Service
metadata:
  name: trlp-tutorial-llm-sim
spec:
  selector:
    app: trlp-tutorial-llm-sim
  ports:
    - port: 80
      targetPort: 8000
      protocol: TCP
"""

GATEWAY = """\
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
    hostname: "trlp-tutorial.example.com"
    allowedRoutes:
      namespaces:
        from: All
"""

ROUTE = """\
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata:
  name: trlp-tutorial-llm-sim
spec:
  hostnames:
    - trlp-tutorial.example.com
  parentRefs:
    - name: trlp-tutorial-gateway
      namespace: gateway-system
  rules:
    - matches:
        - path:
            type: PathPrefix
            value: "/"
      backendRefs:
        - name: trlp-tutorial-llm-sim
          port: 80
"""

FREE_KEY = """\
apiVersion: v1
kind: Secret
metadata:
  name: trlp-tutorial-api-key-free-user-1
  namespace: kuadrant-system
  labels:
    authorino.kuadrant.io/managed-by: authorino
    app: my-llm
  annotations:
    kuadrant.io/groups: free
    secret.kuadrant.io/user-id: user-1
stringData:
  api_key: iamafreeuser
type: Opaque
"""

GOLD_KEY = """\
apiVersion: v1
kind: Secret
metadata:
  name: trlp-tutorial-api-key-gold-user-1
  namespace: kuadrant-system
  labels:
    authorino.kuadrant.io/managed-by: authorino
    app: my-llm
  annotations:
    kuadrant.io/groups: gold
    secret.kuadrant.io/user-id: user-2
stringData:
  api_key: iamagolduser
type: Opaque
"""

AUTH_POLICY = """\
apiVersion: kuadrant.io/v1
kind: AuthPolicy
metadata:
  name: trlp-tutorial-llm-api-keys
  namespace: gateway-system
spec:
  targetRef:
    group: gateway.networking.k8s.io
    kind: Gateway
    name: trlp-tutorial-gateway
  rules:
    authentication:
      api-key-users:
        apiKey:
          selector:
            matchLabels:
              app: my-llm
        credentials:
          authorizationHeader:
            prefix: APIKEY
    response:
      success:
        filters:
          identity:
            json:
              properties:
                groups:
                  selector: auth.identity.metadata.annotations.kuadrant\\.io/groups
                userid:
                  selector: auth.identity.metadata.annotations.secret\\.kuadrant\\.io/user-id
    authorization:
      allow-groups:
        opa:
          rego: |
            groups := split(object.get(input.auth.identity.metadata.annotations, "kuadrant.io/groups", ""), ",")
            allow { groups[_] == "free" }
            allow { groups[_] == "gold" }
"""

TOKEN_LIMITS = """\
apiVersion: kuadrant.io/v1alpha1
kind: TokenRateLimitPolicy
metadata:
  name: trlp-tutorial-token-limits
  namespace: gateway-system
spec:
  targetRef:
    group: gateway.networking.k8s.io
    kind: Gateway
    name: trlp-tutorial-gateway
  limits:
    free:
      rates:
        - limit: 50 # 50 tokens per minute for free users (small for testing)
          window: 1m
      when:
        - predicate: request.path == "/v1/chat/completions"
        - predicate: |
            auth.identity.groups.split(",").exists(g, g == "free")
      counters:
        - expression: auth.identity.userid
    gold:
      rates:
        - limit: 200 # 200 tokens per minute for gold users (small for testing)
          window: 1m
      when:
        - predicate: request.path == "/v1/chat/completions"
        - predicate: |
            auth.identity.groups.split(",").exists(g, g == "gold")
      counters:
        - expression: auth.identity.userid
"""

TUTORIAL_STEPS = {
    "00-kuadrant.yaml": KUADRANT,
    "01-llm-sim.yaml": LLM_SIM,
    "02-gateway.yaml": GATEWAY,
    "03-route.yaml": ROUTE,
    "04-free-key.yaml": FREE_KEY,
    "05-gold-key.yaml": GOLD_KEY,
    "06-auth.yaml": AUTH_POLICY,
    "07-limits.yaml": TOKEN_LIMITS,
}

TUTORIAL_KEYS = [
    ("Kuadrant", "kuadrant-system", "kuadrant"),
    ("Deployment", "default", "trlp-tutorial-llm-sim"),
    ("Service", "default", "trlp-tutorial-llm-sim"),
    ("Gateway", "gateway-system", "trlp-tutorial-gateway"),
    ("HTTPRoute", "default", "trlp-tutorial-llm-sim"),
    ("Secret", "kuadrant-system", "trlp-tutorial-api-key-free-user-1"),
    ("Secret", "kuadrant-system", "trlp-tutorial-api-key-gold-user-1"),
    ("AuthPolicy", "gateway-system", "trlp-tutorial-llm-api-keys"),
    ("TokenRateLimitPolicy", "gateway-system", "trlp-tutorial-token-limits"),
]


@pytest.fixture
def tutorial_dir(tmp_path: Path) -> Path:
    folder = tmp_path / "tutorial"
    folder.mkdir()
    for name, text in TUTORIAL_STEPS.items():
        (folder / name).write_text(text)
    return folder


def write(path: Path, text: str) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return str(path)


def problems(tmp_path: Path, text: str, name: str = "x.yaml") -> list[str]:
    """The issues parse_resources reports for one manifest file, as strings."""
    docs = load_paths([write(tmp_path / name, text)])
    with pytest.raises(ManifestError) as info:
        parse_resources(docs)
    return [str(issue) for issue in info.value.errors]


def one_problem(tmp_path: Path, text: str) -> str:
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    return found[0]


def by_key(resources: list[Resource]) -> dict[tuple[str, str, str], Resource]:
    return {r.key: r for r in resources}


# --- the tutorial loads unchanged ---------------------------------------------------------------


def test_tutorial_folder_loads_in_name_order(tutorial_dir: Path) -> None:
    docs = load_paths([str(tutorial_dir)])
    assert [d.source for d in docs] == [
        f"{tutorial_dir}/00-kuadrant.yaml#1",
        f"{tutorial_dir}/01-llm-sim.yaml#1",
        f"{tutorial_dir}/01-llm-sim.yaml#2",
        f"{tutorial_dir}/02-gateway.yaml#1",
        f"{tutorial_dir}/03-route.yaml#1",
        f"{tutorial_dir}/04-free-key.yaml#1",
        f"{tutorial_dir}/05-gold-key.yaml#1",
        f"{tutorial_dir}/06-auth.yaml#1",
        f"{tutorial_dir}/07-limits.yaml#1",
    ]
    resources = parse_resources(docs)
    assert [r.key for r in resources] == TUTORIAL_KEYS
    assert [r.source for r in resources] == [d.source for d in docs]


def test_tutorial_from_stdin_and_single_files(tutorial_dir: Path) -> None:
    stream = io.StringIO("---\n".join(TUTORIAL_STEPS.values()))
    from_stdin = parse_resources(load_paths(["-"], stdin=stream))
    assert [r.key for r in from_stdin] == TUTORIAL_KEYS
    assert from_stdin[0].source == "<stdin>#1"
    assert from_stdin[-1].source == "<stdin>#9"

    files = [str(tutorial_dir / name) for name in TUTORIAL_STEPS]
    assert [r.key for r in parse_resources(load_paths(files))] == TUTORIAL_KEYS


def test_tutorial_models_read_like_the_manifests(tutorial_dir: Path) -> None:
    res = by_key(parse_resources(load_paths([str(tutorial_dir)])))

    trlp = res[("TokenRateLimitPolicy", "gateway-system", "trlp-tutorial-token-limits")]
    assert isinstance(trlp, TokenRateLimitPolicy)
    assert trlp.apiVersion == "kuadrant.io/v1alpha1"
    assert trlp.spec.targetRef.group == "gateway.networking.k8s.io"
    assert (trlp.spec.targetRef.kind, trlp.spec.targetRef.name) == (
        "Gateway",
        "trlp-tutorial-gateway",
    )
    assert trlp.spec.targetRef.sectionName is None
    free = trlp.spec.limits["free"]
    assert [(r.limit, r.window, r.seconds) for r in free.rates] == [(50, "1m", 60.0)]
    assert free.when[0].predicate == 'request.path == "/v1/chat/completions"'
    assert free.when[1].predicate == 'auth.identity.groups.split(",").exists(g, g == "free")\n'
    assert [c.expression for c in free.counters] == ["auth.identity.userid"]
    assert trlp.spec.limits["gold"].rates[0].limit == 200
    assert trlp.spec.mode == "defaults"
    assert trlp.spec.proper().limits is trlp.spec.limits
    assert trlp.spec.proper().strategy == "atomic"

    auth = res[("AuthPolicy", "gateway-system", "trlp-tutorial-llm-api-keys")]
    assert isinstance(auth, AuthPolicy)
    api_keys = auth.spec.rules.authentication["api-key-users"]
    assert api_keys.apiKey is not None
    assert api_keys.apiKey.selector.matchLabels == {"app": "my-llm"}
    assert api_keys.apiKey.allNamespaces is False
    assert api_keys.credentials is not None
    assert api_keys.credentials.authorizationHeader is not None
    assert api_keys.credentials.authorizationHeader.prefix == "APIKEY"
    identity = auth.spec.rules.response.success.filters["identity"].json
    assert identity is not None
    assert (
        identity.properties["groups"].selector
        == "auth.identity.metadata.annotations.kuadrant\\.io/groups"
    )
    opa = auth.spec.rules.authorization["allow-groups"].opa
    assert opa is not None and opa.rego is not None
    assert opa.rego.startswith("groups := split(") and opa.allValues is False

    secret = res[("Secret", "kuadrant-system", "trlp-tutorial-api-key-free-user-1")]
    assert isinstance(secret, Secret)
    assert secret.decoded_data() == {"api_key": "iamafreeuser"}
    assert secret.metadata.labels["authorino.kuadrant.io/managed-by"] == "authorino"
    assert secret.metadata.annotations["kuadrant.io/groups"] == "free"
    assert secret.type == "Opaque"

    route = res[("HTTPRoute", "default", "trlp-tutorial-llm-sim")]
    assert isinstance(route, HTTPRoute)
    assert route.metadata.namespace == "default"  # no namespace: kubectl's default
    parent = route.spec.parentRefs[0]
    assert (parent.group, parent.kind, parent.namespace, parent.name) == (
        "gateway.networking.k8s.io",
        "Gateway",
        "gateway-system",
        "trlp-tutorial-gateway",
    )
    assert route.spec.hostnames == ["trlp-tutorial.example.com"]
    rule = route.spec.rules[0]
    assert (rule.matches[0].path.type, rule.matches[0].path.value) == ("PathPrefix", "/")
    backend = rule.backendRefs[0]
    assert (backend.group, backend.kind, backend.name, backend.namespace) == (
        "",
        "Service",
        "trlp-tutorial-llm-sim",
        "default",
    )
    assert (backend.port, backend.weight) == (80, 1)

    gateway = res[("Gateway", "gateway-system", "trlp-tutorial-gateway")]
    assert isinstance(gateway, Gateway)
    listener = gateway.spec.listeners[0]
    assert (listener.name, listener.port, listener.protocol) == ("http", 80, "HTTP")
    assert listener.hostname == "trlp-tutorial.example.com"
    assert listener.allowedRoutes.namespaces.from_ == "All"
    assert gateway.spec.gatewayClassName == "istio"

    service = res[("Service", "default", "trlp-tutorial-llm-sim")]
    assert isinstance(service, Service)
    assert service.spec.selector == {"app": "trlp-tutorial-llm-sim"}
    port = service.spec.ports[0]
    assert (port.port, port.targetPort, port.protocol) == (80, 8000, "TCP")

    deployment = res[("Deployment", "default", "trlp-tutorial-llm-sim")]
    assert isinstance(deployment, Deployment)
    container = deployment.spec.template.spec.containers[0]
    assert container.image == "ghcr.io/llm-d/llm-d-inference-sim:v0.1.1"
    assert container.args == ["--model", "meta-llama/Llama-3.1-8B-Instruct", "--port", "8000"]
    assert container.ports[0].containerPort == 8000
    assert deployment.spec.selector.matchLabels == {"app": "trlp-tutorial-llm-sim"}

    kuadrant = res[("Kuadrant", "kuadrant-system", "kuadrant")]
    assert isinstance(kuadrant, Kuadrant)


def test_raw_is_the_untouched_document(tmp_path: Path) -> None:
    text = GATEWAY.replace("metadata:\n", "metadata:\n  uid: abc\n", 1) + "status: {a: 1}\n"
    docs = load_paths([write(tmp_path / "gw.yaml", text)])
    (gateway,) = parse_resources(docs)
    assert gateway.raw == docs[0].obj
    assert gateway.raw is not docs[0].obj
    assert gateway.raw["metadata"]["uid"] == "abc"
    assert gateway.raw["status"] == {"a": 1}

    (route,) = parse_resources(load_paths([write(tmp_path / "r.yaml", ROUTE)]))
    assert route.metadata.namespace == "default"
    assert "namespace" not in route.raw["metadata"]  # defaults go to the model, not to raw


def test_unknown_fields_ignored_at_top_but_not_in_specs(tmp_path: Path) -> None:
    text = GATEWAY.replace("metadata:\n", "metadata:\n  resourceVersion: '7'\n", 1)
    text = text.replace("spec:\n", "spec:\n  futureField: {a: 1}\n", 1) + "extra: 1\n"
    (found,) = problems(tmp_path, text)
    assert found.endswith(
        'spec.futureField: unknown field "futureField" (allowed: addresses, allowedListeners, '
        "backendTLS, defaultScope, gatewayClassName, infrastructure, listeners, tls)"
    )


def test_single_path_argument(tmp_path: Path) -> None:
    path = write(tmp_path / "ns.yaml", "apiVersion: v1\nkind: Namespace\nmetadata: {name: a}\n")
    assert load_paths(path)[0].source == f"{path}#1"
    assert load_paths([Path(path)])[0].source == f"{path}#1"


# --- loading ------------------------------------------------------------------------------------


def test_folder_is_sorted_not_recursive_and_filtered_by_extension(tmp_path: Path) -> None:
    ns = "apiVersion: v1\nkind: Namespace\nmetadata:\n  name: {}\n"
    write(tmp_path / "b.yml", ns.format("b"))
    write(tmp_path / "a.yaml", ns.format("a"))
    write(
        tmp_path / "c.json", '{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "c"}}'
    )
    write(tmp_path / "notes.txt", "not: a manifest\n")
    write(tmp_path / "sub" / "d.yaml", ns.format("d"))
    docs = load_paths([str(tmp_path)])
    assert [d.obj["metadata"]["name"] for d in docs] == ["a", "b", "c"]
    # A file named explicitly is read whatever its extension.
    assert load_paths([str(tmp_path / "notes.txt")])[0].obj == {"not": "a manifest"}


def test_multi_documents_empty_ones_skipped_and_counted(tmp_path: Path) -> None:
    path = write(
        tmp_path / "m.yaml",
        """\
        ---
        # only a comment
        ---
        apiVersion: v1
        kind: Namespace
        metadata: {name: one}
        ---
        ---
        apiVersion: v1
        kind: Namespace
        metadata: {name: two}
        """,
    )
    assert [d.source for d in load_paths([path])] == [f"{path}#2", f"{path}#4"]


def test_kind_list_is_expanded(tmp_path: Path) -> None:
    path = write(
        tmp_path / "list.yaml",
        """\
        apiVersion: v1
        kind: List
        items:
        - {apiVersion: v1, kind: Namespace, metadata: {name: a}}
        - {apiVersion: v1, kind: Namespace, metadata: {name: b}}
        ---
        apiVersion: v1
        kind: SecretList
        items:
        - {apiVersion: v1, kind: Secret, metadata: {name: s}}
        """,
    )
    docs = load_paths([path])
    assert [d.source for d in docs] == [
        f"{path}#1.items[0]",
        f"{path}#1.items[1]",
        f"{path}#2.items[0]",
    ]
    assert [r.key for r in parse_resources(docs)] == [
        ("Namespace", "", "a"),
        ("Namespace", "", "b"),
        ("Secret", "default", "s"),
    ]


def test_json_file_with_several_objects(tmp_path: Path) -> None:
    path = write(
        tmp_path / "objs.json",
        '{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "a"}}\n'
        '{"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": "b"}}\n',
    )
    assert [d.source for d in load_paths([path])] == [f"{path}#1", f"{path}#2"]


def test_no_variable_expansion(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KUADRANT_GATEWAY_NS", "gateway-system")
    path = write(tmp_path / "v.yaml", "a: ${KUADRANT_GATEWAY_NS}\n")
    assert load_paths([path])[0].obj == {"a": "${KUADRANT_GATEWAY_NS}"}


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path) -> None:
    path = write(
        tmp_path / "broken.yaml",
        """\
        apiVersion: v1
        kind: Namespace
        metadata:
          name: ok
        ---
        kind: Secret
          metadata: x
        """,
    )
    with pytest.raises(ManifestError) as info:
        load_paths([path])
    assert str(info.value) == (
        f"{path}: YAML syntax error at line 7, column 11: "
        "mapping values are not allowed in this context"
    )
    assert info.value.errors == [
        ManifestIssue(
            path,
            "",
            "",
            "",
            "YAML syntax error at line 7, column 11: mapping values are not allowed in this context",
        )
    ]


def test_duplicate_yaml_key_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path / "dup.yaml", "kind: Secret\nmetadata:\n  name: a\n  name: b\n")
    with pytest.raises(
        ManifestError, match=r'line 4, column 3: duplicate key "name" \(first at line 3\)'
    ):
        load_paths([path])


def test_load_errors_are_collected(tmp_path: Path) -> None:
    bad_json = write(tmp_path / "bad.json", '{"kind": \n')
    scalar = write(tmp_path / "scalar.yaml", "just text\n")
    missing = str(tmp_path / "missing.yaml")
    with pytest.raises(ManifestError) as info:
        load_paths([bad_json, scalar, missing])
    assert [str(e) for e in info.value.errors] == [
        f"{bad_json}: JSON syntax error at line 2, column 1: Expecting value",
        f"{scalar}#1: a document must be an object, got a string",
        f"{missing}: no such file or directory",
    ]


# --- kinds, versions, names ---------------------------------------------------------------------


def test_supported_kinds() -> None:
    assert set(SUPPORTED_KINDS) == {
        "Kuadrant",
        "Namespace",
        "Gateway",
        "HTTPRoute",
        "Service",
        "Deployment",
        "Secret",
        "AuthPolicy",
        "TokenRateLimitPolicy",
        "RateLimitPolicy",
        "GatewayClass",
        "Lease",
        "ReferenceGrant",
        "ConfigMap",
        "BackendTLSPolicy",
    }


def test_missing_and_unknown_kind(tmp_path: Path) -> None:
    supported = ", ".join(SUPPORTED_KINDS)
    found = problems(
        tmp_path,
        """\
        apiVersion: v1
        metadata: {name: a}
        ---
        apiVersion: v1
        kind: PodTemplate
        metadata: {name: b}
        ---
        apiVersion: kuadrant.io/v1alpha1
        kind: tokenratelimitpolicy
        metadata: {name: c, namespace: gateway-system}
        """,
    )
    path = tmp_path / "x.yaml"
    assert found == [
        f"{path}#1 default/a: kind: required (supported kinds: {supported})",
        f'{path}#2 PodTemplate default/b: kind: unsupported kind "PodTemplate"; '
        f"supported kinds: {supported}",
        f"{path}#3 tokenratelimitpolicy gateway-system/c: kind: unsupported kind "
        f'"tokenratelimitpolicy" (did you mean "TokenRateLimitPolicy"?); supported kinds: '
        f"{supported}",
    ]


@pytest.mark.parametrize(
    ("kind", "api_version", "reason"),
    [
        (
            "TokenRateLimitPolicy",
            "kuadrant.io/v1",
            '"kuadrant.io/v1" is not served for TokenRateLimitPolicy: current versions serve '
            "only kuadrant.io/v1alpha1 (older versions were removed and their fields differ)",
        ),
        (
            "RateLimitPolicy",
            "kuadrant.io/v1beta3",
            '"kuadrant.io/v1beta3" is not served for RateLimitPolicy: current versions serve '
            "only kuadrant.io/v1 (older versions were removed and their fields differ)",
        ),
        (
            "AuthPolicy",
            "kuadrant.io/v1beta2",
            '"kuadrant.io/v1beta2" is not served for AuthPolicy: current versions serve only '
            "kuadrant.io/v1 (older versions were removed and their fields differ)",
        ),
        (
            "Gateway",
            "gateway.networking.k8s.io/v1alpha2",
            '"gateway.networking.k8s.io/v1alpha2" is not served for Gateway: current versions '
            "serve only gateway.networking.k8s.io/v1 or gateway.networking.k8s.io/v1beta1 "
            "(older versions were removed and their fields differ)",
        ),
        ("Service", "apps/v1", '"apps/v1" is not an apiVersion of Service: use v1'),
        ("Deployment", "v1", '"v1" is not an apiVersion of Deployment: use apps/v1'),
        (
            "Kuadrant",
            "kuadrant.io/v1",
            '"kuadrant.io/v1" is not served for Kuadrant: current '
            "versions serve only kuadrant.io/v1beta1 (older versions were removed and their fields "
            "differ)",
        ),
    ],
)
def test_wrong_api_version(tmp_path: Path, kind: str, api_version: str, reason: str) -> None:
    found = problems(tmp_path, f"apiVersion: {api_version}\nkind: {kind}\nmetadata: {{name: a}}\n")
    assert f"{tmp_path / 'x.yaml'}#1 {kind} default/a: apiVersion: {reason}" in found


def test_missing_api_version(tmp_path: Path) -> None:
    found = problems(tmp_path, "kind: Namespace\nmetadata: {name: a}\n")
    assert found == [f"{tmp_path / 'x.yaml'}#1 Namespace a: apiVersion: required"]


def test_v1beta1_gateway_api_is_accepted(tmp_path: Path) -> None:
    text = GATEWAY.replace("gateway.networking.k8s.io/v1", "gateway.networking.k8s.io/v1beta1")
    (gateway,) = parse_resources(load_paths([write(tmp_path / "gw.yaml", text)]))
    assert gateway.apiVersion == "gateway.networking.k8s.io/v1beta1"


def test_missing_name(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """\
        apiVersion: v1
        kind: Secret
        metadata: {namespace: ns}
        ---
        apiVersion: v1
        kind: Namespace
        """,
    )
    path = tmp_path / "x.yaml"
    assert found == [
        f"{path}#1 Secret: metadata.name: required",
        f"{path}#2 Namespace: metadata.name: required",
    ]


@pytest.mark.parametrize(
    ("kind", "api_version", "name", "reason"),
    [
        (
            "Secret",
            "v1",
            "My_Key",
            "\"My_Key\" is not a DNS-1123 subdomain: lower-case letters, digits, '-' and '.', "
            "starting and ending with a letter or digit",
        ),
        (
            "Service",
            "v1",
            "1llm",
            "\"1llm\" is not a DNS-1035 label: lower-case letters, digits and '-', starting with "
            "a letter and ending with a letter or digit",
        ),
        (
            "Namespace",
            "v1",
            "a.b",
            "\"a.b\" is not a DNS-1123 label: lower-case letters, digits and '-', starting and "
            "ending with a letter or digit",
        ),
        ("Secret", "v1", "a" * 254, f'"{"a" * 254}" is longer than 253 characters'),
    ],
)
def test_invalid_names(tmp_path: Path, kind: str, api_version: str, name: str, reason: str) -> None:
    found = problems(
        tmp_path, f"apiVersion: {api_version}\nkind: {kind}\nmetadata: {{name: '{name}'}}\n"
    )
    assert any(f.endswith(f": metadata.name: {reason}") for f in found), found


def test_invalid_namespace(tmp_path: Path) -> None:
    found = one_problem(
        tmp_path, "apiVersion: v1\nkind: Secret\nmetadata: {name: a, namespace: Kuadrant}\n"
    )
    assert found.endswith(
        'metadata.namespace: "Kuadrant" is not a DNS-1123 label: lower-case letters, digits '
        "and '-', starting and ending with a letter or digit"
    )


def test_unexpanded_shell_variable(tmp_path: Path) -> None:
    raw_gateway = GATEWAY.replace("trlp-tutorial-gateway", "${KUADRANT_GATEWAY_NAME}").replace(
        "gateway-system", "${KUADRANT_GATEWAY_NS}"
    )
    found = problems(tmp_path, raw_gateway)
    hint = (
        "looks like an unexpanded shell variable: kubectl does not expand environment "
        "variables in manifests, so expand it first (for example with envsubst)"
    )
    prefix = f"{tmp_path / 'x.yaml'}#1 Gateway ${{KUADRANT_GATEWAY_NS}}/${{KUADRANT_GATEWAY_NAME}}"
    assert found == [
        f'{prefix}: metadata.name: "${{KUADRANT_GATEWAY_NAME}}": ${{KUADRANT_GATEWAY_NAME}} {hint}',
        f'{prefix}: metadata.namespace: "${{KUADRANT_GATEWAY_NS}}": ${{KUADRANT_GATEWAY_NS}} {hint}',
    ]
    # The same hint where a CRD pattern rejects it.
    route = ROUTE.replace("namespace: gateway-system", "namespace: ${KUADRANT_GATEWAY_NS}")
    (found,) = problems(tmp_path, route)
    assert found.endswith(
        'spec.parentRefs[0].namespace: "${KUADRANT_GATEWAY_NS}" does not match '
        f"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$: ${{KUADRANT_GATEWAY_NS}} {hint}"
    )


def test_labels_and_annotations_are_checked(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """\
        apiVersion: v1
        kind: Secret
        metadata:
          name: a
          labels: {"bad key": ok, good: "not ok!"}
          annotations: {"/x": y}
        ---
        apiVersion: v1
        kind: Secret
        metadata: {name: b, labels: {n: 1}}
        """,
    )
    prefix = f"{tmp_path / 'x.yaml'}#1 Secret default/a"
    assert found == [
        f'{prefix}: metadata.labels[bad key]: invalid label key "bad key": the name part must '
        'be at most 63 letters, digits, "-", "_" or ".", starting and ending with a letter or '
        "digit",
        f'{prefix}: metadata.labels.good: invalid label value "not ok!": at most 63 letters, '
        'digits, "-", "_" or ".", starting and ending with a letter or digit',
        f'{prefix}: metadata.annotations[/x]: invalid annotation key "/x": the prefix before '
        '"/" must be a DNS-1123 subdomain',
        f"{tmp_path / 'x.yaml'}#2 Secret default/b: metadata.labels.n: must be a string, got "
        "number 1",
    ]


def test_namespaces_default_and_cluster_scope(tmp_path: Path) -> None:
    docs = load_paths(
        [
            write(
                tmp_path / "n.yaml",
                """\
                apiVersion: v1
                kind: Namespace
                metadata: {name: gateway-system, namespace: ignored, labels: {team: a}}
                ---
                apiVersion: v1
                kind: Secret
                metadata: {name: s}
                """,
            )
        ]
    )
    ns, secret = parse_resources(docs)
    assert isinstance(ns, Namespace)
    assert ns.key == ("Namespace", "", "gateway-system")
    assert ns.metadata.namespace is None
    assert ns.metadata.labels == {"team": "a"}
    assert secret.key == ("Secret", "default", "s")
    assert Namespace.namespaced() is False and Secret.namespaced() is True


def test_duplicates_name_both_sources(tmp_path: Path) -> None:
    first = write(tmp_path / "a.yaml", "apiVersion: v1\nkind: Secret\nmetadata: {name: s}\n")
    second = write(
        tmp_path / "b.yaml",
        """\
        apiVersion: v1
        kind: Namespace
        metadata: {name: s}
        ---
        apiVersion: v1
        kind: Secret
        metadata: {name: s, namespace: other}
        ---
        apiVersion: v1
        kind: Secret
        metadata: {name: s, namespace: default}
        """,
    )
    with pytest.raises(ManifestError) as info:
        parse_resources(load_paths([first, second]))
    assert [str(e) for e in info.value.errors] == [
        f"{second}#3 Secret default/s: defined twice: also in {first}#1 (same kind, namespace "
        "and name)"
    ]


def test_all_errors_across_documents_and_nothing_half_loaded(tmp_path: Path) -> None:
    text = KUADRANT + "---\n" + TOKEN_LIMITS.replace("window: 1m", "window: 1d", 1) + "---\n"
    text += "apiVersion: v1\nkind: Secret\nmetadata: {name: Bad}\n"
    docs = load_paths([write(tmp_path / "x.yaml", text)])
    with pytest.raises(ManifestError) as info:
        parse_resources(docs)
    assert isinstance(info.value, ValueError)
    assert [(e.source.rsplit("#")[1], e.kind, e.field) for e in info.value.errors] == [
        ("2", "TokenRateLimitPolicy", "spec.limits.free.rates[0].window"),
        ("3", "Secret", "metadata.name"),
    ]
    assert str(info.value).startswith("2 problems in the manifests:\n  ")


# --- TokenRateLimitPolicy / RateLimitPolicy ----------------------------------------------------

POLICY = """\
apiVersion: kuadrant.io/v1alpha1
kind: TokenRateLimitPolicy
metadata:
  name: foo
  namespace: gateway-system
spec:
  targetRef:
    group: gateway.networking.k8s.io
    kind: Gateway
    name: gw
"""


def test_window_error_message_exactly(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    write(
        tmp_path / "examples" / "x.yaml",
        KUADRANT
        + "---\n"
        + KUADRANT.replace("name: kuadrant", "name: other")
        + "---\n"
        + POLICY
        + "  limits:\n    free:\n      rates: [{limit: 5, window: 1d}]\n",
    )
    with pytest.raises(ManifestError) as info:
        parse_resources(load_paths(["examples/x.yaml"]))
    (issue,) = info.value.errors
    assert issue == ManifestIssue(
        "examples/x.yaml#3",
        "TokenRateLimitPolicy",
        "gateway-system/foo",
        "spec.limits.free.rates[0].window",
        '"1d" does not match ^([0-9]{1,5}(h|m|s|ms)){1,4}$',
    )
    assert str(info.value) == (
        "examples/x.yaml#3 TokenRateLimitPolicy gateway-system/foo: "
        'spec.limits.free.rates[0].window: "1d" does not match ^([0-9]{1,5}(h|m|s|ms)){1,4}$'
    )


@pytest.mark.parametrize(
    ("spec", "messages"),
    [
        (
            "  limits: {a: {rates: [{limit: 1, window: 1m}]}}\n"
            "  defaults: {limits: {b: {rates: [{limit: 1, window: 1m}]}}}\n",
            ["Implicit and explicit defaults are mutually exclusive"],
        ),
        (
            "  overrides: {limits: {a: {rates: [{limit: 1, window: 1m}]}}}\n"
            "  defaults: {limits: {b: {rates: [{limit: 1, window: 1m}]}}}\n",
            ["Overrides and explicit defaults are mutually exclusive"],
        ),
        (
            "  limits: {a: {rates: [{limit: 1, window: 1m}]}}\n"
            "  overrides: {limits: {b: {rates: [{limit: 1, window: 1m}]}}}\n",
            ["Overrides and implicit defaults are mutually exclusive"],
        ),
        ("  when: [{predicate: 'true'}]\n", ["At least one spec.limits must be defined"]),
        ("  limits: {}\n", ["At least one spec.limits must be defined"]),
        (
            "  overrides: {strategy: merge}\n",
            ["At least one spec.overrides.limits must be defined"],
        ),
        (
            "  defaults: {limits: {}}\n  limits: {}\n",
            [
                "Implicit and explicit defaults are mutually exclusive",
                "At least one spec.defaults.limits must be defined",
            ],
        ),
    ],
)
def test_limits_defaults_overrides_rules(tmp_path: Path, spec: str, messages: list[str]) -> None:
    for kind, version in (
        ("TokenRateLimitPolicy", "kuadrant.io/v1alpha1"),
        ("RateLimitPolicy", "kuadrant.io/v1"),
    ):
        text = POLICY.replace("kuadrant.io/v1alpha1", version).replace("TokenRateLimitPolicy", kind)
        found = problems(tmp_path, text + spec)
        prefix = f"{tmp_path / 'x.yaml'}#1 {kind} gateway-system/foo: spec: "
        assert found == [prefix + m for m in messages]


def test_cel_rules_and_field_errors_are_reported_together(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        POLICY
        + "  defaults: {limits: {a: {rates: [{limit: 1, window: 1m}]}}}\n"
        + "  limits:\n    free:\n      rates: [{limit: 5, window: 1d}]\n",
    )
    prefix = f"{tmp_path / 'x.yaml'}#1 TokenRateLimitPolicy gateway-system/foo"
    assert found == [
        f"{prefix}: spec: Implicit and explicit defaults are mutually exclusive",
        f'{prefix}: spec.limits.free.rates[0].window: "1d" does not match '
        "^([0-9]{1,5}(h|m|s|ms)){1,4}$",
    ]


@pytest.mark.parametrize(
    ("target", "messages"),
    [
        (
            "{group: '', kind: Gateway, name: gw}",
            ["Invalid targetRef.group. The only supported value is 'gateway.networking.k8s.io'"],
        ),
        (
            "{group: gateway.networking.k8s.io, kind: GRPCRoute, name: gw}",
            ["Invalid targetRef.kind. The only supported values are 'HTTPRoute' and 'Gateway'"],
        ),
        (
            "{group: apps, kind: Service, name: gw}",
            [
                "Invalid targetRef.group. The only supported value is 'gateway.networking.k8s.io'",
                "Invalid targetRef.kind. The only supported values are 'HTTPRoute' and 'Gateway'",
            ],
        ),
    ],
)
def test_token_policy_target_ref(tmp_path: Path, target: str, messages: list[str]) -> None:
    text = POLICY.split("  targetRef:")[0] + f"  targetRef: {target}\n"
    found = problems(tmp_path, text + "  limits: {a: {rates: [{limit: 1, window: 1m}]}}\n")
    prefix = f"{tmp_path / 'x.yaml'}#1 TokenRateLimitPolicy gateway-system/foo: spec.targetRef: "
    assert found == [prefix + m for m in messages]


def test_rate_limit_policy_target_ref_allows_grpcroute(tmp_path: Path) -> None:
    text = (
        POLICY.replace("kuadrant.io/v1alpha1", "kuadrant.io/v1")
        .replace("TokenRateLimitPolicy", "RateLimitPolicy")
        .replace("kind: Gateway", "kind: GRPCRoute")
    )
    (rlp,) = parse_resources(
        load_paths(
            [
                write(
                    tmp_path / "r.yaml", text + "  limits: {a: {rates: [{limit: 1, window: 1m}]}}\n"
                )
            ]
        )
    )
    assert isinstance(rlp, RateLimitPolicy)
    found = problems(
        tmp_path, text.replace("kind: GRPCRoute", "kind: Service") + "  limits: {a: {}}\n"
    )
    assert found[0].endswith(
        "spec.targetRef: Invalid targetRef.kind. The only supported values are 'HTTPRoute', "
        "'GRPCRoute' and 'Gateway'"
    )


def test_target_ref_required_fields_and_section_name(tmp_path: Path) -> None:
    text = POLICY.split("  targetRef:")[0] + "  targetRef: {kind: Gateway, sectionName: Http}\n"
    found = problems(tmp_path, text + "  limits: {a: {}}\n")
    prefix = f"{tmp_path / 'x.yaml'}#1 TokenRateLimitPolicy gateway-system/foo"
    assert found == [
        f"{prefix}: spec.targetRef.group: required",
        f"{prefix}: spec.targetRef.name: required",
        f'{prefix}: spec.targetRef.sectionName: "Http" does not match '
        r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    ]


def test_limit_fields(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        POLICY
        + """\
  when: [{predicate: ""}]
  limits:
    free:
      rates:
      - {limit: -1, window: 1m}
      - {limit: "5", window: 1m}
      - {window: 10s}
      when: [{predicate: ""}, {}]
      counters: [{expression: ""}]
      rate: []
""",
    )
    prefix = f"{tmp_path / 'x.yaml'}#1 TokenRateLimitPolicy gateway-system/foo: spec"
    assert found == [
        f"{prefix}.limits.free.when[0].predicate: must not be empty",
        f"{prefix}.limits.free.when[1].predicate: required",
        f"{prefix}.limits.free.rates[0].limit: must be >= 0, got -1",
        f'{prefix}.limits.free.rates[1].limit: must be an integer, got string "5"',
        f"{prefix}.limits.free.rates[2].limit: required",
        f"{prefix}.limits.free.counters[0].expression: must not be empty",
        f'{prefix}.limits.free.rate: unknown field "rate" (allowed: counters, counting, rates, reservation, when)',
        f"{prefix}.when[0].predicate: must not be empty",
    ]


def test_unknown_spec_field_and_strategy(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        POLICY + "  overrides:\n    strategy: replace\n    limits: {a: {}}\n  limit: {}\n",
    )
    prefix = f"{tmp_path / 'x.yaml'}#1 TokenRateLimitPolicy gateway-system/foo: spec"
    assert found == [
        f"{prefix}.overrides.strategy: unsupported value \"replace\": expected 'atomic' or 'merge'",
        f'{prefix}.limit: unknown field "limit" (allowed: defaults, limits, overrides, '
        "targetRef, when)",
    ]


def test_defaults_and_overrides_models(tmp_path: Path) -> None:
    text = POLICY + (
        "  overrides:\n    strategy: merge\n    when: [{predicate: 'true'}]\n"
        "    limits: {a: {rates: [{limit: 1, window: 1h30m}, {limit: 9, window: 500ms}]}}\n"
    )
    (policy,) = parse_resources(load_paths([write(tmp_path / "p.yaml", text)]))
    assert isinstance(policy, TokenRateLimitPolicy)
    assert policy.spec.mode == "overrides"
    proper = policy.spec.proper()
    assert proper.strategy == "merge" and proper.when[0].predicate == "true"
    assert [r.seconds for r in proper.limits["a"].rates] == [5400.0, 0.5]
    assert policy.spec.limits == {} and policy.spec.defaults is None

    text = POLICY + "  defaults:\n    limits: {a: {}}\n"
    (policy,) = parse_resources(load_paths([write(tmp_path / "p.yaml", text)]))
    assert policy.spec.mode == "defaults"
    assert policy.spec.proper().strategy == "atomic"  # the CRD's default


# --- AuthPolicy ---------------------------------------------------------------------------------

AUTH = """\
apiVersion: kuadrant.io/v1
kind: AuthPolicy
metadata: {name: ap, namespace: gateway-system}
spec:
  targetRef: {group: gateway.networking.k8s.io, kind: HTTPRoute, name: r}
"""


@pytest.mark.parametrize(
    ("spec", "messages"),
    [
        (
            "  rules: {authentication: {a: {anonymous: {}}}}\n"
            "  defaults: {rules: {authentication: {a: {anonymous: {}}}}}\n",
            ["Implicit and explicit defaults are mutually exclusive"],
        ),
        (
            "  when: [{predicate: 'true'}]\n"
            "  overrides: {rules: {authentication: {a: {anonymous: {}}}}}\n",
            [
                "Implicit defaults and explicit overrides are mutually exclusive",
            ],
        ),
        (
            "  overrides: {rules: {authentication: {a: {anonymous: {}}}}}\n"
            "  defaults: {rules: {authentication: {a: {anonymous: {}}}}}\n",
            ["Explicit overrides and explicit defaults are mutually exclusive"],
        ),
        ("  rules: {authentication: {}}\n", ["At least one spec.rules must be defined"]),
        (
            "  rules: {response: {success: {headers: {}}}}\n",
            ["At least one spec.rules must be defined"],
        ),
        ("  defaults: {strategy: merge}\n", ["At least one spec.defaults.rules must be defined"]),
        (
            "  overrides: {rules: {callbacks: {}}}\n",
            ["At least one spec.overrides.rules must be defined"],
        ),
    ],
)
def test_auth_policy_rules_defaults_overrides(
    tmp_path: Path, spec: str, messages: list[str]
) -> None:
    found = problems(tmp_path, AUTH + spec)
    prefix = f"{tmp_path / 'x.yaml'}#1 AuthPolicy gateway-system/ap: spec: "
    assert found == [prefix + m for m in messages]


def test_auth_policy_minimal_forms_are_accepted(tmp_path: Path) -> None:
    for spec in (
        "  rules: {response: {unauthenticated: {code: 302}}}\n",
        "  rules: {response: {success: {filters: {f: {plain: {value: x}}}}}}\n",
        "  overrides: {rules: {metadata: {m: {http: {url: 'http://x'}}}}}\n",
    ):
        (policy,) = parse_resources(load_paths([write(tmp_path / "a.yaml", AUTH + spec)]))
        assert isinstance(policy, AuthPolicy)


def test_auth_policy_target_ref_message(tmp_path: Path) -> None:
    text = AUTH.replace("kind: HTTPRoute", "kind: Service")
    (found,) = problems(tmp_path, text + "  rules: {authentication: {a: {anonymous: {}}}}\n")
    assert found.endswith(
        "spec.targetRef: Invalid targetRef.kind. The only supported values are 'HTTPRoute', "
        "'GRPCRoute', and 'Gateway'"
    )


def test_auth_policy_other_methods_parse_as_dicts(tmp_path: Path) -> None:
    text = AUTH + textwrap.indent(
        textwrap.dedent(
            """\
            patterns:
              admin-path: {allOf: [{selector: request.path, operator: matches, value: ^/admin}]}
            when:
            - predicate: request.method != "OPTIONS"
            rules:
              authentication:
                tokens:
                  jwt: {issuerUrl: https://issuer}
                  credentials: {customHeader: {name: X-Token}}
                  priority: 1
                anon:
                  anonymous: {}
                  when: [{patternRef: admin-path}]
              authorization:
                admins:
                  patternMatching:
                    patterns:
                    - {selector: auth.identity.group, operator: eq, value: admin}
                    - {predicate: 'auth.identity.sub != ""'}
                    - any: [{patternRef: admin-path}, {selector: a, operator: neq, value: b}]
                sar:
                  kubernetesSubjectAccessReview: {user: {selector: auth.identity.sub}}
              response:
                unauthorized:
                  code: 403
                  headers: {x-reason: {value: nope}}
                  message: {expression: '"denied"'}
                success:
                  headers:
                    x-user: {plain: {selector: auth.identity.sub}}
              callbacks:
                notify: {http: {url: http://example.com}}
            """
        ),
        "  ",
    )
    (policy,) = parse_resources(load_paths([write(tmp_path / "a.yaml", text)]))
    assert isinstance(policy, AuthPolicy)
    spec = policy.spec
    assert spec.patterns["admin-path"].allOf[0].operator == "matches"
    assert spec.when[0].predicate == 'request.method != "OPTIONS"'
    tokens = spec.rules.authentication["tokens"]
    assert tokens.jwt == {"issuerUrl": "https://issuer"} and tokens.apiKey is None
    assert tokens.credentials is not None and tokens.credentials.customHeader is not None
    assert tokens.credentials.customHeader.name == "X-Token" and tokens.priority == 1
    assert spec.rules.authentication["anon"].when[0].patternRef == "admin-path"
    patterns = spec.rules.authorization["admins"].patternMatching
    assert patterns is not None
    assert patterns.patterns[1].predicate == 'auth.identity.sub != ""'
    nested = patterns.patterns[2].any
    assert nested is not None and nested[1].operator == "neq"
    assert spec.rules.authorization["sar"].kubernetesSubjectAccessReview == {
        "user": {"selector": "auth.identity.sub"}
    }
    unauthorized = spec.rules.response.unauthorized
    assert unauthorized is not None and unauthorized.code == 403
    assert spec.rules.response.success.headers["x-user"].plain is not None
    assert spec.rules.callbacks["notify"] == {"http": {"url": "http://example.com"}}
    assert spec.proper().rules is spec.rules


def test_auth_policy_field_errors(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        AUTH
        + """\
  rules:
    authentication:
      k:
        apikey: {selector: {}}
        jwt: {issuerUrl: a, jwksUrl: b}
      s:
        apiKey: {selector: {matchExpressions: [{key: a, operator: In}]}}
    authorization:
      p:
        patternMatching: {patterns: [{selector: a, operator: like, value: b}]}
    response:
      unauthenticated: {code: 200}
""",
    )
    prefix = f"{tmp_path / 'x.yaml'}#1 AuthPolicy gateway-system/ap: spec.rules"
    assert found == [
        f'{prefix}.authentication.k.apikey: unknown field "apikey" (allowed: anonymous, apiKey, '
        "cache, credentials, defaults, jwt, kubernetesTokenReview, metrics, oauth2Introspection, "
        "overrides, plain, priority, when, x509)",
        f"{prefix}.authentication.s.apiKey.selector.matchExpressions[0].values: must be "
        "non-empty when operator is In",
        f"{prefix}.authorization.p.patternMatching.patterns[0].operator: unsupported value "
        "\"like\": expected 'eq', 'neq', 'incl', 'excl' or 'matches'",
        f"{prefix}.response.unauthenticated.code: must be >= 300, got 200",
    ]
    found = problems(
        tmp_path,
        AUTH + "  rules:\n    authentication:\n      k: {jwt: {issuerUrl: a, jwksUrl: b}}\n",
    )
    assert found[0].endswith("spec.rules.authentication.k.jwt: Use one of: jwksUrl, issuerUrl")


# --- Secret -------------------------------------------------------------------------------------


def test_secret_data_is_decoded_and_string_data_wins(tmp_path: Path) -> None:
    text = """\
    apiVersion: v1
    kind: Secret
    metadata: {name: s}
    data:
      api_key: b2xka2V5
      user: dXNlci0x
    stringData:
      api_key: newkey
    """
    (secret,) = parse_resources(load_paths([write(tmp_path / "s.yaml", text)]))
    assert isinstance(secret, Secret)
    assert secret.decoded_data() == {"api_key": "newkey", "user": "user-1"}
    assert secret.data == {"api_key": "b2xka2V5", "user": "dXNlci0x"}
    assert secret.stringData == {"api_key": "newkey"}
    assert secret.type == "Opaque"


def test_secret_bad_base64_names_the_key_not_the_value(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """\
        apiVersion: v1
        kind: Secret
        metadata: {name: s}
        data:
          api_key: "iamafreeuser!"
          short: "YQ"
          "bad/key": "YQ=="
        """,
    )
    prefix = f"{tmp_path / 'x.yaml'}#1 Secret default/s"
    assert found == [
        f"{prefix}: data.api_key: is not valid base64 (Only base64 data is allowed)",
        f"{prefix}: data.short: is not valid base64 (Incorrect padding)",
        f'{prefix}: data[bad/key]: invalid key: "bad/key" is not a valid key: use letters, '
        'digits, "-", "_" or "." (at most 253)',
    ]
    assert not any("iamafreeuser" in f for f in found)


# --- Gateway API --------------------------------------------------------------------------------


def test_route_defaults(tmp_path: Path) -> None:
    text = """\
    apiVersion: gateway.networking.k8s.io/v1
    kind: HTTPRoute
    metadata: {name: r, namespace: apps}
    spec:
      parentRefs: [{name: gw, sectionName: http}]
      rules:
      - backendRefs: [{name: svc, port: 8000, namespace: other}]
      - matches: [{headers: [{name: x-tier, value: gold}], queryParams: [{name: q, value: v}]}]
      - matches: [{path: {type: Exact}, method: POST}]
        timeouts: {request: 10s, backendRequest: 5s}
    """
    (route,) = parse_resources(load_paths([write(tmp_path / "r.yaml", text)]))
    assert isinstance(route, HTTPRoute)
    assert route.spec.parentRefs[0].namespace == "apps"
    assert route.spec.parentRefs[0].kind == "Gateway"
    first, second, third = route.spec.rules
    assert len(first.matches) == 1
    assert (first.matches[0].path.type, first.matches[0].path.value) == ("PathPrefix", "/")
    assert first.backendRefs[0].namespace == "other"
    assert second.matches[0].headers[0].type == "Exact"
    assert second.matches[0].queryParams[0].type == "Exact"
    assert second.matches[0].path.value == "/"
    assert (third.matches[0].path.type, third.matches[0].path.value) == ("Exact", "/")
    assert third.matches[0].method == "POST"
    assert third.timeouts is not None and third.timeouts.request == "10s"

    no_rules = "apiVersion: gateway.networking.k8s.io/v1\nkind: HTTPRoute\nmetadata: {name: r}\n"
    no_rules += "spec: {parentRefs: [{name: gw}]}\n"
    (route,) = parse_resources(load_paths([write(tmp_path / "r.yaml", no_rules)]))
    assert isinstance(route, HTTPRoute)
    assert route.spec.rules[0].matches[0].path.value == "/"


def test_route_errors(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """\
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: r}
        spec:
          hostnames: ["Example.com"]
          parentRefs: [{name: gw}, {name: gw}]
          rules:
          - matches:
            - path: {value: v1/chat}
            - path: {type: Exact, value: "/a//b"}
            - path: {type: RegularExpression, value: "/v1/(chat"}
              headers: [{name: x, type: RegularExpression, value: "["}]
              method: FETCH
            backendRefs: [{name: svc}]
            timeouts: {request: 1s, backendRequest: 2s}
            backendRef: []
        """,
    )
    prefix = f"{tmp_path / 'x.yaml'}#1 HTTPRoute default/r: spec"
    when = "when type one of ['Exact', 'PathPrefix']"
    assert found == [
        f"{prefix}.parentRefs: sectionName must be unique when parentRefs includes 2 or more "
        "references to the same parent",
        f'{prefix}.hostnames[0]: "Example.com" does not match '
        r"^(\*\.)?[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
        f"{prefix}.rules[0].matches[0].path.value: value must be an absolute path and start "
        f"with '/' {when}",
        f"{prefix}.rules[0].matches[1].path.value: must not contain '//' {when}",
        f"{prefix}.rules[0].matches[2].path.value: invalid regular expression '/v1/(chat': "
        "missing ), unterminated subpattern at position 4",
        f"{prefix}.rules[0].matches[2].headers[0].value: invalid regular expression '[': "
        "unterminated character set at position 0",
        f"{prefix}.rules[0].matches[2].method: unsupported value \"FETCH\": expected 'GET', "
        "'HEAD', 'POST', 'PUT', 'DELETE', 'CONNECT', 'OPTIONS', 'TRACE' or 'PATCH'",
        f"{prefix}.rules[0].backendRefs[0]: Must have port for Service reference",
        f"{prefix}.rules[0].timeouts: backendRequest timeout cannot be longer than request timeout",
        f'{prefix}.rules[0].backendRef: unknown field "backendRef" (allowed: backendRefs, '
        "filters, matches, name, retry, sessionPersistence, timeouts)",
    ]


def test_route_parent_refs_section_name_rule_and_empty_rules(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """\
        apiVersion: gateway.networking.k8s.io/v1
        kind: HTTPRoute
        metadata: {name: r}
        spec:
          parentRefs: [{name: gw, sectionName: http}, {name: gw}, {name: gw, namespace: other}]
          rules: []
        """,
    )
    prefix = f"{tmp_path / 'x.yaml'}#1 HTTPRoute default/r: spec"
    assert found == [
        f"{prefix}.parentRefs: sectionName must be specified when parentRefs includes 2 or more "
        "references to the same parent",
        f"{prefix}.rules: must have at least 1 item(s)",
    ]


def test_gateway_errors_and_from_alias(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """\
        apiVersion: gateway.networking.k8s.io/v1
        kind: Gateway
        metadata: {name: gw}
        spec:
          gatewayClassName: istio
          listeners:
          - {name: http, port: 80, protocol: HTTP}
          - {name: http, port: 80, protocol: HTTP, tls: {mode: Terminate}}
        """,
    )
    prefix = f"{tmp_path / 'x.yaml'}#1 Gateway default/gw: spec.listeners"
    assert found == [
        f"{prefix}: tls must not be specified for protocols ['HTTP', 'TCP', 'UDP']",
        f"{prefix}: Listener name must be unique within the Gateway",
        f"{prefix}: Combination of port, protocol and hostname must be unique for each listener",
    ]
    found = problems(
        tmp_path,
        """\
        apiVersion: gateway.networking.k8s.io/v1
        kind: Gateway
        metadata: {name: gw}
        spec:
          gatewayClassName: istio
          listeners: [{name: http, port: 0, protocol: HTTP, allowedRoutes: {namespaces: {from: Any}}}]
        """,
    )
    prefix = f"{tmp_path / 'x.yaml'}#1 Gateway default/gw: spec.listeners[0]"
    assert found == [
        f"{prefix}.port: must be >= 1, got 0",
        f"{prefix}.allowedRoutes.namespaces.from: unsupported value \"Any\": expected 'All', "
        "'Selector' or 'Same'",
    ]
    assert RouteNamespaces(from_="Selector").from_ == "Selector"
    assert RouteNamespaces.model_validate({"from": "All"}).model_dump(by_alias=True) == {
        "from": "All",
        "selector": None,
    }
    (gateway,) = parse_resources(
        load_paths(
            [
                write(
                    tmp_path / "g.yaml",
                    GATEWAY.replace(
                        "    allowedRoutes:\n      namespaces:\n        from: All\n", ""
                    ),
                )
            ]
        )
    )
    assert isinstance(gateway, Gateway)
    assert gateway.spec.listeners[0].allowedRoutes.namespaces.from_ == "Same"  # CRD default


# --- Service, Deployment ------------------------------------------------------------------------


def test_service_and_deployment_errors(tmp_path: Path) -> None:
    found = problems(
        tmp_path,
        """\
        apiVersion: v1
        kind: Service
        metadata: {name: svc}
        spec:
          ports: [{port: 80, targetPort: http}, {port: "81"}]
        ---
        apiVersion: v1
        kind: Service
        metadata: {name: svc2}
        spec:
          ports: [{port: 80}, {port: 81}]
        ---
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: d}
        spec:
          selector: {matchLabels: {app: a}}
          template:
            metadata: {labels: {app: b}}
            spec: {containers: [{name: c, image: x}]}
        ---
        apiVersion: apps/v1
        kind: Deployment
        metadata: {name: e}
        spec:
          selector: {matchLabels: {app: a}}
          template:
            metadata: {labels: {app: a}}
            spec: {containers: [{name: c, args: [--port, 8000]}]}
        """,
    )
    path = tmp_path / "x.yaml"
    assert found == [
        f'{path}#1 Service default/svc: spec.ports[1].port: must be an integer, got string "81"',
        f"{path}#2 Service default/svc2: spec.ports[0].name: required when the Service has "
        "several ports",
        f"{path}#2 Service default/svc2: spec.ports[1].name: required when the Service has "
        "several ports",
        f"{path}#3 Deployment default/d: spec.template.metadata.labels: `selector` does not "
        "match template `labels`",
        f"{path}#4 Deployment default/e: spec.template.spec.containers[0].image: required",
        f"{path}#4 Deployment default/e: spec.template.spec.containers[0].args[1]: must be a "
        "string, got number 8000",
    ]


# --- windows ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("window", "seconds"),
    [
        ("1m", 60.0),
        ("1h30m", 5400.0),
        ("500ms", 0.5),
        ("10s", 10.0),
        ("24h", 86400.0),
        ("720h", 2592000.0),
        ("1h1m1s1ms", 3661.001),
        ("0s", 0.0),
        ("99999ms", 99.999),
    ],
)
def test_parse_window(window: str, seconds: float) -> None:
    assert parse_window(window) == seconds


@pytest.mark.parametrize("window", ["1d", "", "1", "m", "1.5h", "1h ", "100000s", "1m1m1m1m1m"])
def test_parse_window_rejects(window: str) -> None:
    with pytest.raises(ValueError, match="does not match"):
        parse_window(window)


def test_document_is_a_small_dataclass() -> None:
    doc = Document("a.yaml#1", {"kind": "Namespace"})
    assert (doc.source, doc.obj) == ("a.yaml#1", {"kind": "Namespace"})


def test_token_limit_reservation_and_kuadrant_mode_are_validated(tmp_path: Path) -> None:
    ok = TOKEN_LIMITS.replace(
        "      counters:\n",
        "      reservation:\n        amount: uint(2000)\n        ttl: duration('30s')\n"
        "      counters:\n",
        1,
    )
    (trlp,) = parse_resources(load_paths([write(tmp_path / "ok.yaml", ok)]))
    assert trlp.spec.limits["free"].reservation.amount == "uint(2000)"
    bad = TOKEN_LIMITS.replace(
        "      counters:\n",
        "      reservation:\n        amont: uint(2000)\n        defaultCompletionTokens: -1\n"
        "      counters:\n",
        1,
    )
    with pytest.raises(ManifestError) as info:
        parse_resources(load_paths([write(tmp_path / "bad.yaml", bad)]))
    text = str(info.value)
    assert "spec.limits.free.reservation.amont" in text
    assert "spec.limits.free.reservation.defaultCompletionTokens" in text
    mode = "apiVersion: kuadrant.io/v1beta1\nkind: Kuadrant\nmetadata:\n  name: k\n  namespace: ks\nspec:\n  tokenRateLimiting:\n    mode: Sometimes\n"
    with pytest.raises(ManifestError, match=r"spec.tokenRateLimiting.mode"):
        parse_resources(load_paths([write(tmp_path / "mode.yaml", mode)]))
