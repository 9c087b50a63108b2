"""Policies as Kuadrant composes them: attachment, defaults/overrides, strategies, status,
and broken policies that never take the gateway down."""

from __future__ import annotations

import io
import json
import time

import httpx
import pytest

from tests.conftest import chat
from tests.test_gateway import GATEWAY
from tokengateway import auth as authlib
from tokengateway.config.compile import (
    LIMITS_WHEN,
    CompiledConfig,
    ConfigError,
    RuleTarget,
    compile_config,
)
from tokengateway.config.status import PolicyStatus
from tokengateway.resources import load_paths, parse_resources

BACKENDS = {"default/llm": "http://127.0.0.1:1", "default/other": "http://127.0.0.1:2"}

# One Gateway with two listeners, one route (a named rule and an unnamed one) attached to both.
BASE = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: gw, namespace: gateway-system}
spec:
  gatewayClassName: any
  listeners:
  - {name: api, protocol: HTTP, port: 80, hostname: api.example.com,
     allowedRoutes: {namespaces: {from: All}}}
  - {name: internal, protocol: HTTP, port: 80, hostname: internal.example.com,
     allowedRoutes: {namespaces: {from: All}}}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: llm, namespace: default}
spec:
  parentRefs: [{name: gw, namespace: gateway-system}]
  rules:
  - name: chat
    matches: [{path: {type: PathPrefix, value: /v1/chat}}]
    backendRefs: [{name: llm, port: 80}]
  - matches: [{path: {type: PathPrefix, value: /}}]
    backendRefs: [{name: llm, port: 80}]
"""

OTHER_ROUTE = """
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: other, namespace: default}
spec:
  parentRefs: [{name: gw, namespace: gateway-system, sectionName: api}]
  hostnames: [other.api.example.com, api.example.com]
  rules:
  - matches: [{path: {type: PathPrefix, value: /other}}]
    backendRefs: [{name: other, port: 80}]
"""


def trlp(
    name: str,
    target: str,
    limits: dict[str, int],
    *,
    namespace: str = "gateway-system",
    kind: str = "Gateway",
    section: str | None = None,
    mode: str | None = None,
    strategy: str = "atomic",
    when: str | None = None,
    created: str | None = None,
    generation: int | None = None,
    api: str = "kuadrant.io/v1alpha1",
    policy_kind: str = "TokenRateLimitPolicy",
) -> str:
    """A (Token)RateLimitPolicy document; `mode` None means implicit defaults."""
    ref = {"group": "gateway.networking.k8s.io", "kind": kind, "name": target}
    if section is not None:
        ref["sectionName"] = section
    body: dict = {
        "limits": {n: {"rates": [{"limit": v, "window": "1m"}]} for n, v in limits.items()}
    }
    if when is not None:
        body["when"] = [{"predicate": when}]
    if mode is not None:
        body = {mode: {"strategy": strategy, **body}}
    meta: dict = {"name": name, "namespace": namespace}
    if created:
        meta["creationTimestamp"] = created
    if generation:
        meta["generation"] = generation
    doc = {
        "apiVersion": api,
        "kind": policy_kind,
        "metadata": meta,
        "spec": {"targetRef": ref, **body},
    }
    return "\n---\n" + json.dumps(doc)


def rlp(name: str, target: str, limits: dict[str, int], **kw: object) -> str:
    return trlp(name, target, limits, api="kuadrant.io/v1", policy_kind="RateLimitPolicy", **kw)  # type: ignore[arg-type]


def authpolicy(name: str, target: str, rules: dict, **kw: object) -> str:
    namespace = str(kw.pop("namespace", "gateway-system"))
    kind = str(kw.pop("kind", "Gateway"))
    mode = kw.pop("mode", None)
    strategy = kw.pop("strategy", "atomic")
    section = kw.pop("section", None)
    when = kw.pop("when", None)
    assert not kw, kw
    ref = {"group": "gateway.networking.k8s.io", "kind": kind, "name": target}
    if section is not None:
        ref["sectionName"] = section
    body: dict = {"rules": rules}
    if when is not None:
        body["when"] = [{"predicate": when}]
    if mode is not None:
        body = {mode: {"strategy": strategy, **body}}
    doc = {
        "apiVersion": "kuadrant.io/v1",
        "kind": "AuthPolicy",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"targetRef": ref, **body},
    }
    return "\n---\n" + json.dumps(doc)


ANONYMOUS = {"authentication": {"anyone": {"anonymous": {}}}}
ALLOW_POST = {
    "authorization": {"only-post": {"patternMatching": {"patterns": [{"predicate": "true"}]}}}
}
BAD_REGO = {"authorization": {"broken": {"opa": {"rego": "allow { input.x == }"}}}}


def compile_text(text: str, **kw: object) -> CompiledConfig:
    resources = parse_resources(load_paths(["-"], stdin=io.StringIO(text)))
    return compile_config(resources, BACKENDS, **kw)  # type: ignore[arg-type]


def target(
    config: CompiledConfig, rule: str = "chat", listener: str = "api", route: str = "default/llm"
) -> RuleTarget:
    found = [t for t in config.rules if (t.route, t.rule, t.listener) == (route, rule, listener)]
    assert len(found) == 1, [(t.route, t.rule, t.listener) for t in config.rules]
    return found[0]


def limit_names(t: RuleTarget) -> list[str]:
    return sorted(limit.identifier for limit in t.limits)


def status(config: CompiledConfig, name: str, kind: str = "TokenRateLimitPolicy") -> PolicyStatus:
    ns, _, short = name.partition("/")
    found = config.statuses[(kind, ns, short)]
    assert isinstance(found, PolicyStatus)
    return found


def enforced(config: CompiledConfig, name: str, kind: str = "TokenRateLimitPolicy") -> tuple:
    s = status(config, name, kind)
    cond = s.condition("Enforced")
    assert cond is not None, s.conditions
    return cond["status"], cond["reason"], cond["message"]


def request(path: str = "/v1/chat/completions") -> authlib.AuthRequest:
    return authlib.AuthRequest(
        method="POST",
        scheme="http",
        host="api.example.com",
        path=path,
        headers={},
        source_address="127.0.0.1",
        source_port=50000,
        destination_address="127.0.0.1",
        destination_port=80,
        request_id="r1",
        well_known={"request": {"path": path, "method": "POST"}},
    )


# --- attachment and the tutorial's shape ------------------------------------------------------


def test_gateway_policies_with_implicit_defaults_cover_every_rule_and_listener() -> None:
    config = compile_text(
        BASE + trlp("tokens", "gw", {"everyone": 100}) + authpolicy("keys", "gw", ANONYMOUS)
    )
    assert len(config.rules) == 4  # 2 rules x 2 listeners
    for t in config.rules:
        assert limit_names(t) == ["gateway-system/tokens/everyone"]
        assert t.limit_policies == ("TokenRateLimitPolicy gateway-system/tokens",)
        assert t.auth is not None and t.auth_policy == "gateway-system/keys"
        assert t.gateway == "gateway-system/gw"
    assert {t.rule for t in config.rules} == {"chat", "rule-2"}  # unnamed: Kuadrant's rule-N
    assert status(config, "gateway-system/tokens").conditions[0] | {"lastTransitionTime": 0} == {
        "type": "Accepted",
        "status": "True",
        "reason": "Accepted",
        "message": "TokenRateLimitPolicy has been accepted",
        "lastTransitionTime": 0,
        "observedGeneration": 1,
    }
    assert enforced(config, "gateway-system/tokens") == (
        "True",
        "Enforced",
        "TokenRateLimitPolicy has been successfully enforced",
    )
    assert enforced(config, "gateway-system/keys", "AuthPolicy") == (
        "True",
        "Enforced",
        "AuthPolicy has been successfully enforced",
    )
    assert config.warnings == []


def test_tutorial_statuses_as_its_troubleshooting_section_reads_them() -> None:
    from tests.conftest import TUTORIAL

    resources = parse_resources(load_paths([str(TUTORIAL)]))
    config = compile_config(resources, {"default/trlp-tutorial-llm-sim": "http://127.0.0.1:1"})
    auth = status(config, "gateway-system/trlp-tutorial-llm-api-keys", "AuthPolicy")
    limits = status(config, "gateway-system/trlp-tutorial-token-limits")
    assert auth.message("Accepted") == "AuthPolicy has been accepted"
    assert limits.message("Accepted") == "TokenRateLimitPolicy has been accepted"
    assert auth.enforced and limits.enforced
    gateway = config.statuses[("Gateway", "gateway-system", "trlp-tutorial-gateway")].as_dict()
    kinds = {c["type"]: c for c in gateway["conditions"]}
    assert kinds["Accepted"]["status"] == kinds["Programmed"]["status"] == "True"
    assert kinds["kuadrant.io/TokenRateLimitPolicyAffected"]["message"] == (
        "Object affected by TokenRateLimitPolicy [gateway-system/trlp-tutorial-token-limits]"
    )
    assert gateway["listeners"][0]["attachedRoutes"] == 1
    route = config.statuses[("HTTPRoute", "default", "trlp-tutorial-llm-sim")]
    ours = route.parent("trlp-tutorial-gateway")  # type: ignore[union-attr]
    assert [(c["type"], c["status"], c["message"]) for c in ours["conditions"]] == [
        ("Accepted", "True", "Route was valid"),
        ("ResolvedRefs", "True", "All references resolved"),
    ]


# --- Accepted -----------------------------------------------------------------------------------


def test_target_not_found_names_the_target_and_section() -> None:
    config = compile_text(
        BASE
        + trlp("no-gw", "nope", {"a": 1})
        + trlp("no-listener", "gw", {"a": 1}, section="nope")
        + trlp("no-rule", "llm", {"a": 1}, namespace="default", kind="HTTPRoute", section="x")
        + trlp("other-ns", "llm", {"a": 1}, kind="HTTPRoute")  # targetRef is local
    )
    expected = {
        "gateway-system/no-gw": "TokenRateLimitPolicy target nope was not found",
        "gateway-system/no-listener": "TokenRateLimitPolicy target gw#nope was not found",
        "default/no-rule": "TokenRateLimitPolicy target llm#x was not found",
        "gateway-system/other-ns": "TokenRateLimitPolicy target llm was not found",
    }
    for name, message in expected.items():
        s = status(config, name)
        assert not s.accepted
        assert (s.reason("Accepted"), s.message("Accepted")) == ("TargetNotFound", message)
        assert s.condition("Enforced") is None  # Kuadrant removes Enforced when not accepted
    assert all(t.limits == () for t in config.rules)
    assert sum("not enforced" in w for w in config.warnings) == 4


def test_a_target_kind_we_do_not_serve_is_invalid() -> None:
    config = compile_text(BASE + rlp("grpc", "svc", {"a": 1}, kind="GRPCRoute"))
    s = status(config, "gateway-system/grpc", "RateLimitPolicy")
    assert s.reason("Accepted") == "Invalid"
    assert s.message("Accepted").startswith("RateLimitPolicy target is invalid: GRPCRoute")


def test_a_policy_on_a_gateway_without_routes_is_not_in_the_path_of_any_route() -> None:
    lonely = """
apiVersion: gateway.networking.k8s.io/v1
kind: Gateway
metadata: {name: lonely, namespace: gateway-system}
spec:
  gatewayClassName: any
  listeners: [{name: http, protocol: HTTP, port: 80}]
"""
    config = compile_text(BASE + "\n---\n" + lonely + trlp("idle", "lonely", {"a": 1}))
    assert status(config, "gateway-system/idle").accepted
    assert enforced(config, "gateway-system/idle") == (
        "False",
        "Unknown",
        "TokenRateLimitPolicy is not in the path to any existing routes",
    )


def test_observed_generation_comes_from_metadata_generation() -> None:
    config = compile_text(BASE + trlp("tokens", "gw", {"a": 1}, generation=7))
    s = status(config, "gateway-system/tokens").as_dict()
    assert s["observedGeneration"] == 7
    assert {c["observedGeneration"] for c in s["conditions"]} == {7}


def test_last_transition_time_changes_only_when_a_condition_changes() -> None:
    text = BASE + trlp("route-limits", "llm", {"a": 1}, namespace="default", kind="HTTPRoute")
    first = compile_text(text)
    for s in first.statuses.values():
        for cond in s.all_conditions():
            cond["lastTransitionTime"] = "2020-01-01T00:00:00Z"
    again = compile_text(text, previous=first)
    s = status(again, "default/route-limits")
    assert s.condition("Enforced")["lastTransitionTime"] == "2020-01-01T00:00:00Z"  # type: ignore[index]
    overridden = compile_text(
        text + trlp("gw-limits", "gw", {"b": 1}, mode="overrides"), previous=first
    )
    s = status(overridden, "default/route-limits")
    assert s.condition("Accepted")["lastTransitionTime"] == "2020-01-01T00:00:00Z"  # type: ignore[index]
    assert s.condition("Enforced")["lastTransitionTime"] != "2020-01-01T00:00:00Z"  # type: ignore[index]


# --- defaults and overrides -----------------------------------------------------------------------


def test_atomic_defaults_the_route_policy_replaces_the_gateway_policy() -> None:
    config = compile_text(
        BASE
        + trlp("gw-limits", "gw", {"shared": 100, "gw-only": 100}, when="true")
        + trlp("route-limits", "llm", {"shared": 10}, namespace="default", kind="HTTPRoute")
    )
    t = target(config)
    assert limit_names(t) == ["default/route-limits/shared"]
    assert t.limits[0].predicates == ()  # the gateway's `when` went with its policy
    assert t.effective["TokenRateLimitPolicy"].sources == ("default/route-limits",)
    assert enforced(config, "gateway-system/gw-limits") == (
        "False",
        "Overridden",
        "TokenRateLimitPolicy is overridden by [default/route-limits]",
    )
    assert enforced(config, "default/route-limits")[0] == "True"


def test_atomic_overrides_the_gateway_policy_replaces_the_route_policy() -> None:
    config = compile_text(
        BASE
        + trlp("gw-limits", "gw", {"cap": 5}, mode="overrides")
        + trlp("route-limits", "llm", {"shared": 1000}, namespace="default", kind="HTTPRoute")
    )
    for t in config.rules:
        assert limit_names(t) == ["gateway-system/gw-limits/cap"]
    assert enforced(config, "default/route-limits") == (
        "False",
        "Overridden",
        "TokenRateLimitPolicy is overridden by [gateway-system/gw-limits]",
    )
    assert enforced(config, "gateway-system/gw-limits")[:2] == ("True", "Enforced")


def test_merge_defaults_the_more_specific_policy_wins_same_names() -> None:
    config = compile_text(
        BASE
        + trlp(
            "gw-limits", "gw", {"shared": 100, "gw-only": 100}, mode="defaults", strategy="merge"
        )
        + trlp(
            "route-limits",
            "llm",
            {"shared": 10, "route-only": 10},
            namespace="default",
            kind="HTTPRoute",
        )
    )
    t = target(config)
    assert limit_names(t) == [
        "default/route-limits/route-only",
        "default/route-limits/shared",
        "gateway-system/gw-limits/gw-only",
    ]
    shared = t.effective["TokenRateLimitPolicy"].limits()["shared"]
    assert shared.source == "default/route-limits"
    assert shared.spec["rates"][0]["limit"] == 10
    assert sorted(t.limit_policies) == [
        "TokenRateLimitPolicy default/route-limits",
        "TokenRateLimitPolicy gateway-system/gw-limits",
    ]
    assert enforced(config, "gateway-system/gw-limits") == (
        "True",
        "Enforced",
        "TokenRateLimitPolicy has been partially enforced",
    )
    assert enforced(config, "default/route-limits")[2].endswith("successfully enforced")


def test_merge_overrides_the_less_specific_policy_wins_same_names() -> None:
    config = compile_text(
        BASE
        + trlp("gw-limits", "gw", {"shared": 100}, mode="overrides", strategy="merge")
        + trlp(
            "route-limits",
            "llm",
            {"shared": 10, "route-only": 10},
            namespace="default",
            kind="HTTPRoute",
        )
    )
    t = target(config)
    assert limit_names(t) == ["default/route-limits/route-only", "gateway-system/gw-limits/shared"]
    assert t.effective["TokenRateLimitPolicy"].limits()["shared"].spec["rates"][0]["limit"] == 100
    assert enforced(config, "default/route-limits")[2] == (
        "TokenRateLimitPolicy has been partially enforced"
    )


def test_top_level_when_is_one_rule_it_is_replaced_not_concatenated() -> None:
    gw = trlp(
        "gw-limits",
        "gw",
        {"gw-only": 100},
        mode="defaults",
        strategy="merge",
        when='request.method == "POST"',
    )
    route_without_when = trlp(
        "route-limits", "llm", {"mine": 10}, namespace="default", kind="HTTPRoute"
    )
    config = compile_text(BASE + gw + route_without_when)
    t = target(config)
    effective = t.effective["TokenRateLimitPolicy"]
    assert effective.rules[LIMITS_WHEN].source == "gateway-system/gw-limits"
    # the gateway's `when` applies to every limit in force, the route's too (as in Kuadrant)
    for limit in t.limits:
        assert [p.source for p in limit.predicates] == ['request.method == "POST"']
    route_with_when = trlp(
        "route-limits",
        "llm",
        {"mine": 10},
        namespace="default",
        kind="HTTPRoute",
        when='request.path == "/x"',
    )
    config = compile_text(BASE + gw + route_with_when)
    for limit in target(config).limits:
        assert [p.source for p in limit.predicates] == ['request.path == "/x"']


def test_section_name_listener_is_more_specific_than_the_gateway() -> None:
    config = compile_text(
        BASE
        + trlp("gw-limits", "gw", {"all": 100})
        + trlp("internal-limits", "gw", {"internal": 1000}, section="internal")
    )
    assert limit_names(target(config, listener="api")) == ["gateway-system/gw-limits/all"]
    assert limit_names(target(config, listener="internal")) == [
        "gateway-system/internal-limits/internal"
    ]
    # in force on one listener, overridden on the other
    assert enforced(config, "gateway-system/gw-limits")[2] == (
        "TokenRateLimitPolicy has been partially enforced"
    )
    gateway = config.statuses[("Gateway", "gateway-system", "gw")].as_dict()
    internal = next(x for x in gateway["listeners"] if x["name"] == "internal")
    affected = {c["type"]: c["message"] for c in internal["conditions"]}
    assert affected["kuadrant.io/TokenRateLimitPolicyAffected"] == (
        "Object affected by TokenRateLimitPolicy "
        "[gateway-system/gw-limits gateway-system/internal-limits]"
    )


def test_section_name_rule_by_name_and_by_kuadrant_generated_name() -> None:
    config = compile_text(
        BASE
        + trlp(
            "chat-limits", "llm", {"chat": 1}, namespace="default", kind="HTTPRoute", section="chat"
        )
        + trlp(
            "rest-limits",
            "llm",
            {"rest": 2},
            namespace="default",
            kind="HTTPRoute",
            section="rule-2",
        )
        + trlp("route-limits", "llm", {"route": 3}, namespace="default", kind="HTTPRoute")
    )
    assert limit_names(target(config, "chat")) == ["default/chat-limits/chat"]
    assert limit_names(target(config, "rule-2")) == ["default/rest-limits/rest"]
    assert enforced(config, "default/route-limits")[1] == "Overridden"
    assert enforced(config, "default/route-limits")[2] == (
        "TokenRateLimitPolicy is overridden by [default/chat-limits default/rest-limits]"
    )


def test_several_policies_on_one_target_follow_creation_order() -> None:
    # Kuadrant lists them oldest first as if the newer were more specific: with defaults
    # the newer wins, with overrides the older wins.
    old, new = "2024-01-01T00:00:00Z", "2024-06-01T00:00:00Z"
    config = compile_text(
        BASE
        + trlp("b-newer", "gw", {"n": 1}, created=new)
        + trlp("a-older", "gw", {"o": 1}, created=old)
    )
    assert limit_names(target(config)) == ["gateway-system/b-newer/n"]
    assert enforced(config, "gateway-system/a-older")[2] == (
        "TokenRateLimitPolicy is overridden by [gateway-system/b-newer]"
    )
    config = compile_text(
        BASE
        + trlp("b-newer", "gw", {"n": 1}, created=new, mode="overrides")
        + trlp("a-older", "gw", {"o": 1}, created=old, mode="overrides")
    )
    assert limit_names(target(config)) == ["gateway-system/a-older/o"]
    # same timestamp: `namespace/name` decides the order
    config = compile_text(
        BASE + trlp("b", "gw", {"b": 1}, created=old) + trlp("a", "gw", {"a": 1}, created=old)
    )
    assert limit_names(target(config)) == ["gateway-system/b/b"]


def test_kinds_are_composed_separately() -> None:
    config = compile_text(
        BASE
        + trlp("tokens", "gw", {"t": 100}, mode="overrides")
        + rlp("requests", "llm", {"r": 10}, namespace="default", kind="HTTPRoute")
    )
    t = target(config)
    assert limit_names(t) == ["default/requests/r", "gateway-system/tokens/t"]
    assert {limit.policy_kind for limit in t.limits} == {"TokenRateLimitPolicy", "RateLimitPolicy"}
    assert enforced(config, "default/requests", "RateLimitPolicy")[0] == "True"


def test_auth_rules_merge_by_section_and_name() -> None:
    gateway_rules = {
        "authentication": {"anyone": {"anonymous": {}}},
        "authorization": {"deny-all": {"patternMatching": {"patterns": [{"predicate": "false"}]}}},
    }
    route_rules = {
        "authorization": {"deny-all": {"patternMatching": {"patterns": [{"predicate": "true"}]}}},
        "response": {
            "success": {"filters": {"who": {"json": {"properties": {"v": {"value": 1}}}}}}
        },
    }
    config = compile_text(
        BASE
        + authpolicy("gw-auth", "gw", gateway_rules, mode="defaults", strategy="merge")
        + authpolicy("route-auth", "llm", route_rules, namespace="default", kind="HTTPRoute")
    )
    t = target(config)
    effective = t.effective["AuthPolicy"]
    assert effective.rules["authentication#anyone"].source == "gateway-system/gw-auth"
    assert effective.rules["authorization#deny-all"].source == "default/route-auth"
    assert set(effective.auth_rules()) == {"authentication", "authorization", "response"}
    assert t.auth_policy == "default/route-auth, gateway-system/gw-auth"
    decision = t.auth.evaluate(request())  # type: ignore[union-attr]
    assert decision.allowed and decision.auth == {"who": {"v": 1}}
    assert enforced(config, "gateway-system/gw-auth", "AuthPolicy")[2] == (
        "AuthPolicy has been partially enforced"
    )


def test_auth_overrides_atomic_replaces_the_route_auth() -> None:
    config = compile_text(
        BASE
        + authpolicy("gw-auth", "gw", {"authorization": BAD_REGO["authorization"]} | ANONYMOUS)
        + authpolicy(
            "gw-deny",
            "gw",
            {"authorization": {"no": {"patternMatching": {"patterns": [{"predicate": "false"}]}}}},
            mode="overrides",
        )
        + authpolicy("route-auth", "llm", ANONYMOUS, namespace="default", kind="HTTPRoute")
    )
    decision = target(config).auth.evaluate(request())  # type: ignore[union-attr]
    assert not decision.allowed and decision.status == 403
    assert enforced(config, "default/route-auth", "AuthPolicy")[1] == "Overridden"


# --- broken policies ----------------------------------------------------------------------------


def test_a_limit_that_does_not_compile_is_left_out_the_rest_is_enforced() -> None:
    broken = trlp("tokens", "gw", {"good": 100, "bad": 5}).replace(
        '"bad": {"rates"', '"bad": {"when": [{"predicate": "request.path =="}], "rates"'
    )
    config = compile_text(
        BASE
        + broken
        + rlp(
            "requests", "gw", {"r": 10}, namespace="gateway-system", created="2020-01-01T00:00:00Z"
        )
    )
    t = target(config)
    assert limit_names(t) == ["gateway-system/requests/r", "gateway-system/tokens/good"]
    state, reason, message = enforced(config, "gateway-system/tokens")
    assert (state, reason) == ("False", "InvalidCelExpression")
    assert message.startswith("validation issues: [limit 'bad' when[0] predicate")
    assert enforced(config, "gateway-system/requests", "RateLimitPolicy")[0] == "True"
    assert any("gateway-system/tokens" in w and "'bad'" in w for w in config.warnings)


def test_a_bad_top_level_when_leaves_out_every_limit_of_the_policy() -> None:
    config = compile_text(BASE + trlp("tokens", "gw", {"a": 1, "b": 2}, when="nope(("))
    assert all(t.limits == () for t in config.rules)
    assert enforced(config, "gateway-system/tokens")[1] == "InvalidCelExpression"


def test_a_limit_that_is_not_cel_broken_is_reported_as_unknown() -> None:
    config = compile_text(BASE + trlp("tokens", "gw", {"a": 1}).replace('"1m"', '"0s"'))
    assert target(config).limits == ()
    state, reason, message = enforced(config, "gateway-system/tokens")
    assert (state, reason) == ("False", "Unknown")
    assert message.startswith("TokenRateLimitPolicy has encountered some issues: limit 'a'")


def test_a_broken_auth_policy_denies_its_routes_and_spares_the_others() -> None:
    config = compile_text(
        BASE
        + OTHER_ROUTE
        + authpolicy("broken", "llm", BAD_REGO | ANONYMOUS, namespace="default", kind="HTTPRoute")
        + authpolicy("fine", "other", ANONYMOUS, namespace="default", kind="HTTPRoute")
        + trlp("tokens", "gw", {"a": 100})
    )
    broken = target(config)
    decision = broken.auth.evaluate(request())  # type: ignore[union-attr]
    assert not decision.allowed and decision.status == 403
    assert "default/broken cannot be enforced" in (decision.message or "")
    assert limit_names(broken) == ["gateway-system/tokens/a"]  # the limits still apply
    fine = target(config, "rule-1", route="default/other")
    assert fine.auth.evaluate(request()).allowed  # type: ignore[union-attr]
    state, reason, message = enforced(config, "default/broken", "AuthPolicy")
    assert (state, reason) == ("False", "Unknown")
    assert message.startswith(
        "AuthPolicy has encountered some issues: rules.authorization.broken.opa.rego"
    )
    assert enforced(config, "default/fine", "AuthPolicy")[0] == "True"


def test_a_bad_cel_predicate_in_an_auth_policy_is_an_invalid_cel_expression() -> None:
    config = compile_text(BASE + authpolicy("keys", "gw", ANONYMOUS, when="request.path =="))
    assert not target(config).auth.evaluate(request()).allowed  # type: ignore[union-attr]
    assert enforced(config, "gateway-system/keys", "AuthPolicy")[1] == "InvalidCelExpression"


def test_a_broken_rule_from_a_merged_policy_blames_that_policy() -> None:
    gateway_rules = ANONYMOUS | {"authorization": BAD_REGO["authorization"]}
    route_rules = {
        "authorization": {"ok": {"patternMatching": {"patterns": [{"predicate": "true"}]}}}
    }
    config = compile_text(
        BASE
        + authpolicy("gw-auth", "gw", gateway_rules, mode="defaults", strategy="merge")
        + authpolicy("route-auth", "llm", route_rules, namespace="default", kind="HTTPRoute")
    )
    assert enforced(config, "gateway-system/gw-auth", "AuthPolicy")[0] == "False"
    assert enforced(config, "default/route-auth", "AuthPolicy")[0] == "True"


def test_route_problems_are_reported_not_fatal() -> None:
    missing = BASE.replace(
        "name: llm, port: 80}]\n  - matches", "name: gone, port: 80}]\n  - matches"
    )
    config = compile_text(missing)
    assert target(config).backends == ()  # answered with a 500 by the data path
    assert target(config, "rule-2").backends != ()
    route = config.statuses[("HTTPRoute", "default", "llm")].as_dict()
    resolved = next(c for c in route["parents"][0]["conditions"] if c["type"] == "ResolvedRefs")
    assert (resolved["status"], resolved["reason"]) == ("False", "BackendNotFound")
    with pytest.raises(ConfigError, match="default/gone has no address"):
        compile_text(missing, strict=True)


def test_route_not_allowed_by_the_listeners() -> None:
    same = BASE.replace("from: All", "from: Same")
    config = compile_text(same)
    assert config.rules == []
    route = config.statuses[("HTTPRoute", "default", "llm")].as_dict()
    accepted = route["parents"][0]["conditions"][0]
    assert (accepted["status"], accepted["reason"]) == ("False", "NotAllowedByListeners")


def test_listener_selector_honours_match_expressions() -> None:
    namespace = """
---
apiVersion: v1
kind: Namespace
metadata: {name: default, labels: {tier: free}}
"""
    expressions = "{from: Selector, selector: {matchExpressions: [{key: tier, operator: %s, values: [gold]}]}}"
    gold_only = BASE.replace("{from: All}", expressions % "In") + namespace
    assert compile_text(gold_only).rules == []  # "default" is labelled tier=free
    not_gold = BASE.replace("{from: All}", expressions % "NotIn") + namespace
    assert len(compile_text(not_gold).rules) == 4  # two rules through two listeners
    by_name = BASE.replace(
        "{from: All}",
        "{from: Selector, selector: {matchLabels: {kubernetes.io/metadata.name: default}}}",
    )
    assert len(compile_text(by_name).rules) == 4


# --- strict -------------------------------------------------------------------------------------


def test_strict_raises_listing_every_policy_problem() -> None:
    text = (
        BASE
        + trlp("tokens", "gw", {"a": 1}, when="request.path ==")
        + authpolicy("keys", "llm", BAD_REGO, namespace="default", kind="HTTPRoute")
    )
    compile_text(text)  # not strict: served, with statuses
    with pytest.raises(ConfigError) as info:
        compile_text(text, strict=True)
    problems = info.value.problems
    assert any(
        p.startswith("TokenRateLimitPolicy gateway-system/tokens: when[0]") for p in problems
    )
    assert any(
        p.startswith("AuthPolicy default/keys: rules.authorization.broken") for p in problems
    )


def test_strict_checks_policies_that_are_in_force_nowhere() -> None:
    text = (
        BASE
        + trlp("idle", "gw", {"a": 1}, when="request.path ==", section="api")
        + trlp("winner", "gw", {"b": 1}, mode="overrides")
    )
    config = compile_text(text)
    assert enforced(config, "gateway-system/idle")[1] == "Overridden"  # never compiled
    with pytest.raises(ConfigError, match="gateway-system/idle"):
        compile_text(text, strict=True)


# --- end to end ---------------------------------------------------------------------------------

E2E = GATEWAY.replace("TIMEOUTS", "")  # the Gateway, Service and HTTPRoute of test_gateway

USAGE = json.dumps(
    {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}],
        "usage": {"prompt_tokens": 4, "completion_tokens": 6, "total_tokens": 10},
    }
).encode()


def answer(path: str, body: bytes) -> tuple[int, dict[str, str], bytes]:
    return 200, {"content-type": "application/json"}, USAGE


def admin_apply(gw, text: str) -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(
        gw.admin_url + "/apis/apply",
        content=text,
        headers={"content-type": "application/yaml"},
        timeout=30,
    )


def admin_status(gw, kind: str, namespace: str, name: str) -> dict:  # type: ignore[no-untyped-def]
    r = httpx.get(
        gw.admin_url + "/apis/resources",
        params={"kind": kind, "namespace": namespace, "name": name},
        timeout=30,
    )
    assert r.status_code == 200, r.text
    return r.json()["items"][0].get("status") or {}


def spend(gw, attempts: int = 8) -> list[int]:  # type: ignore[no-untyped-def]
    with httpx.Client(base_url=gw.url, headers={"Host": "api.example.com"}, timeout=30) as c:
        return [c.post("/v1/chat/completions", json=chat()).status_code for _ in range(attempts)]


def test_e2e_gateway_overrides_beat_a_generous_route_policy(
    tmp_path, start_gateway, upstream
) -> None:
    up = upstream(answer)
    path = tmp_path / "gw.yaml"
    path.write_text(
        E2E
        + trlp("generous", "llm", {"plenty": 100000}, namespace="default", kind="HTTPRoute")
        + trlp("cap", "gw", {"cap": 25}, mode="overrides")
    )
    gw = start_gateway(path, args=("--backend", f"llm={up.url}"))
    # 10 tokens a request: 3 succeed (the third crosses 25), then the cap refuses
    assert spend(gw, 5) == [200, 200, 200, 429, 429]
    route_policy = admin_status(gw, "TokenRateLimitPolicy", "default", "generous")
    enforced_cond = next(c for c in route_policy["conditions"] if c["type"] == "Enforced")
    assert enforced_cond["reason"] == "Overridden"
    assert enforced_cond["message"] == "TokenRateLimitPolicy is overridden by [gateway-system/cap]"


def test_e2e_a_broken_policy_does_not_take_the_gateway_down(
    tmp_path, start_gateway, upstream
) -> None:
    up = upstream(answer)
    path = tmp_path / "gw.yaml"
    path.write_text(E2E + trlp("tokens", "gw", {"cap": 25}))
    gw = start_gateway(path, args=("--backend", f"llm={up.url}"))
    assert spend(gw, 1) == [200]
    broken = rlp("requests", "llm", {"fine": 1000, "bad": 1}, namespace="default", kind="HTTPRoute")
    broken = broken.replace(
        '"bad": {"rates"', '"bad": {"when": [{"predicate": "request.path =="}], "rates"'
    )
    r = admin_apply(gw, broken)
    assert r.status_code == 200, r.text  # accepted: the broken limit is reported, not fatal
    deadline = time.monotonic() + 5
    while True:
        s = admin_status(gw, "RateLimitPolicy", "default", "requests")
        if s.get("conditions") or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    cond = {c["type"]: c for c in s["conditions"]}
    assert cond["Accepted"]["status"] == "True"
    assert (cond["Enforced"]["status"], cond["Enforced"]["reason"]) == (
        "False",
        "InvalidCelExpression",
    )
    # the gateway keeps serving and the token limit is still enforced
    assert spend(gw, 4) == [200, 200, 429, 429]
    limits = httpx.get(gw.admin_url + "/limits/default/llm", timeout=30).json()
    assert sorted(x["name"] for x in limits) == [
        "default/requests/fine",
        "gateway-system/tokens/cap",
    ]


def test_the_example_of_docs_policies_md_does_what_it_says() -> None:
    import re

    from tests.conftest import ROOT, TUTORIAL

    blocks = re.findall(r"<<EOF\n(.*?)EOF", (ROOT / "docs" / "policies.md").read_text(), re.S)
    assert len(blocks) == 3
    tutorial = load_paths([str(TUTORIAL)])
    expected = [
        ["default/llm-sim-limits/free"],
        ["default/llm-sim-limits/free", "gateway-system/trlp-tutorial-token-limits/gold"],
        [
            "default/llm-sim-limits/free",
            "gateway-system/org-cap/per-user-cap",
            "gateway-system/trlp-tutorial-token-limits/gold",
        ],
    ]
    for steps, limits in enumerate(expected, start=1):
        for cap_created in ("2023-01-01T00:00:00Z", "2025-01-01T00:00:00Z"):  # either order
            docs = {}
            for doc in tutorial + [
                d for text in blocks[:steps] for d in load_paths(["-"], stdin=io.StringIO(text))
            ]:
                meta = doc.obj["metadata"]
                meta["creationTimestamp"] = (
                    cap_created if meta["name"] == "org-cap" else "2024-01-01T00:00:00Z"
                )
                docs[(doc.obj["kind"], meta.get("namespace"), meta["name"])] = doc
            config = compile_config(
                parse_resources(list(docs.values())),
                {"default/trlp-tutorial-llm-sim": "http://127.0.0.1:1"},
            )
            (rule,) = config.rules
            assert limit_names(rule) == limits
    assert enforced(config, "gateway-system/org-cap")[0] == "True"
    assert enforced(config, "gateway-system/trlp-tutorial-token-limits")[2] == (
        "TokenRateLimitPolicy has been partially enforced"
    )
