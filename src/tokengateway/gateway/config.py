"""Compile loaded resources into what the data path looks up: routes, auth, limits, backends.

Everything per configuration happens here, once: route matchers, CEL, Rego and the API key
index. The result is immutable and swapped whole.
"""

from __future__ import annotations

import random
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokengateway import auth as authlib
from tokengateway.gateway.backends import BackendPlan
from tokengateway.gateway.routing import (
    HeaderMatch,
    PathMatch,
    RouteMatch,
    Router,
    intersect_hostnames,
)
from tokengateway.limits import Limit, LimitCompileError, compile_limits, parse_window

__all__ = ["CompiledConfig", "ConfigError", "RuleTarget", "compile_config", "needed_services"]

GATEWAY_GROUP = "gateway.networking.k8s.io"
DEFAULT_SYSTEM_NAMESPACE = "kuadrant-system"
POLICY_KINDS = ("AuthPolicy", "TokenRateLimitPolicy", "RateLimitPolicy")


class ConfigError(ValueError):
    """Resources that parse but cannot be put together; one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


@dataclass(frozen=True, slots=True)
class Backend:
    url: str
    weight: int


@dataclass(slots=True)
class RuleTarget:
    """One HTTPRoute rule as the data path needs it."""

    route: str  # "namespace/name"; also the counters' namespace, as in Kuadrant
    rule: str  # rule name, or its index
    backends: tuple[Backend, ...]
    timeout: float | None
    auth: authlib.AuthEngine | None = None
    auth_policy: str | None = None
    limits: tuple[Limit, ...] = ()
    limit_policies: tuple[str, ...] = ()

    def pick_backend(self) -> str:
        if len(self.backends) == 1:
            return self.backends[0].url
        weights = [b.weight for b in self.backends]
        return random.choices(self.backends, weights)[0].url


@dataclass
class CompiledConfig:
    router: Router
    resources: list[Any]
    warnings: list[str] = field(default_factory=list)
    rules: list[RuleTarget] = field(default_factory=list)
    system_namespace: str = DEFAULT_SYSTEM_NAMESPACE


def _key(res: Any) -> str:
    return f"{res.metadata.namespace}/{res.metadata.name}"


def _spec(res: Any) -> dict[str, Any]:
    return dict(res.raw.get("spec") or {})


def _age(res: Any) -> str:
    return str(res.metadata.creationTimestamp or "")


def needed_services(resources: Sequence[Any]) -> set[str]:
    """Services named by HTTPRoute backendRefs, as "namespace/name"."""
    out = set()
    for route in resources:
        if route.kind != "HTTPRoute":
            continue
        for rule in _spec(route).get("rules") or ():
            for ref in rule.get("backendRefs") or ():
                if ref.get("kind", "Service") == "Service" and ref.get("group", "") in ("", "core"):
                    out.add(f"{ref.get('namespace') or route.metadata.namespace}/{ref['name']}")
    return out


def _duration(text: str | None) -> float | None:
    """Gateway API durations (`10s`, `1m30s`, `500ms`); `0s` means no timeout."""
    if not text:
        return None
    seconds = parse_window(text) if text not in ("0s", "0") else 0.0
    return seconds or None


def _policy_section(policy: Any) -> tuple[str, dict[str, Any]]:
    """("overrides" | "defaults", {rules|limits, when}) of a policy."""
    spec = _spec(policy)
    if "overrides" in spec:
        return "overrides", dict(spec["overrides"] or {})
    if "defaults" in spec:
        return "defaults", dict(spec["defaults"] or {})
    body = {k: v for k, v in spec.items() if k in ("rules", "limits", "when", "patterns")}
    return "defaults", body


def compile_config(
    resources: Sequence[Any], backends: Mapping[str, BackendPlan | str]
) -> CompiledConfig:
    """Build the route table with each rule's policies; raise ConfigError listing problems."""
    problems: list[str] = []
    warnings: list[str] = []
    by_kind: dict[str, list[Any]] = {}
    for res in resources:
        by_kind.setdefault(res.kind, []).append(res)
    kuadrants = by_kind.get("Kuadrant", [])
    system_ns = kuadrants[0].metadata.namespace if kuadrants else DEFAULT_SYSTEM_NAMESPACE
    namespaces = {
        n.metadata.name: dict(n.metadata.labels or {}) for n in by_kind.get("Namespace", [])
    }
    secrets = [
        authlib.SecretRecord(
            namespace=s.metadata.namespace,
            name=s.metadata.name,
            labels=dict(s.metadata.labels or {}),
            annotations=dict(s.metadata.annotations or {}),
            data=dict(s.decoded_data()),
            type=str(s.raw.get("type") or "Opaque"),
        )
        for s in by_kind.get("Secret", [])
    ]
    gateways = {_key(g): g for g in by_kind.get("Gateway", [])}
    routes = sorted(by_kind.get("HTTPRoute", []), key=lambda r: (_age(r), _key(r)))

    # Policies by target, oldest first (Kuadrant resolves conflicts by age, then name).
    targeted: dict[tuple[str, str, str], list[Any]] = {}
    for kind in POLICY_KINDS:
        for policy in sorted(by_kind.get(kind, []), key=lambda p: (_age(p), _key(p))):
            ref = _spec(policy).get("targetRef") or {}
            target_key = (ref.get("kind", ""), policy.metadata.namespace, ref.get("name", ""))
            found = gateways if target_key[0] == "Gateway" else {_key(r): r for r in routes}
            if f"{target_key[1]}/{target_key[2]}" not in found:
                warnings.append(
                    f"{kind} {_key(policy)}: target {target_key[0]} "
                    f"{target_key[1]}/{target_key[2]} not found; the policy is not enforced"
                )
                continue
            targeted.setdefault(target_key, []).append(policy)

    compiled_auth: dict[str, authlib.AuthEngine] = {}
    compiled_limits: dict[str, list[Limit]] = {}

    def auth_for(policy: Any, section: dict[str, Any]) -> authlib.AuthEngine | None:
        key = _key(policy)
        if key not in compiled_auth:
            try:
                compiled_auth[key] = authlib.compile_auth(
                    key,
                    section.get("rules") or {},
                    section.get("when") or (),
                    secrets,
                    system_ns,
                    patterns=section.get("patterns") or None,
                )
            except authlib.AuthConfigError as exc:
                problems.append(f"AuthPolicy {exc}")
                return None
        return compiled_auth[key]

    def limits_for(policy: Any, section: dict[str, Any]) -> list[Limit]:
        key = f"{policy.kind}:{_key(policy)}"
        if key not in compiled_limits:
            try:
                compiled_limits[key] = compile_limits(
                    policy.kind, _key(policy), section.get("limits") or {}, section.get("when")
                )
            except (LimitCompileError, ValueError) as exc:
                problems.append(str(exc))
                compiled_limits[key] = []
        return compiled_limits[key]

    def effective(kind: str, gateway: Any, listener: str, route: Any, rule_name: str | None):
        gw = [
            p
            for p in targeted.get(
                ("Gateway", gateway.metadata.namespace, gateway.metadata.name), []
            )
            if p.kind == kind and (_spec(p)["targetRef"].get("sectionName") in (None, listener))
        ]
        rt = [
            p
            for p in targeted.get(("HTTPRoute", route.metadata.namespace, route.metadata.name), [])
            if p.kind == kind and (_spec(p)["targetRef"].get("sectionName") in (None, rule_name))
        ]
        # A section-specific policy is more specific than a whole-object one.
        gw.sort(key=lambda p: _spec(p)["targetRef"].get("sectionName") is None)
        rt.sort(key=lambda p: _spec(p)["targetRef"].get("sectionName") is None)
        for p in gw:
            mode, section = _policy_section(p)
            if mode == "overrides":
                return p, section
        if rt:
            return (rt[0], _policy_section(rt[0])[1])
        if gw:
            return (gw[0], _policy_section(gw[0])[1])
        return None, None

    matches: list[RouteMatch] = []
    targets: list[RuleTarget] = []
    for route in routes:
        spec = _spec(route)
        attached = False
        for parent in spec.get("parentRefs") or ():
            if (
                parent.get("kind", "Gateway") != "Gateway"
                or parent.get("group", GATEWAY_GROUP) != GATEWAY_GROUP
            ):
                continue
            gw_key = f"{parent.get('namespace') or route.metadata.namespace}/{parent.get('name')}"
            gateway = gateways.get(gw_key)
            if gateway is None:
                warnings.append(f"HTTPRoute {_key(route)}: parent Gateway {gw_key} not found")
                continue
            for listener in _spec(gateway).get("listeners") or ():
                if parent.get("sectionName") not in (None, listener.get("name")):
                    continue
                if parent.get("port") not in (None, listener.get("port")):
                    continue
                if not _namespace_allowed(listener, gateway, route, namespaces):
                    warnings.append(
                        f"HTTPRoute {_key(route)}: not allowed by Gateway {gw_key} listener "
                        f"{listener.get('name')!r} (allowedRoutes.namespaces)"
                    )
                    continue
                hostnames = intersect_hostnames(
                    listener.get("hostname"), spec.get("hostnames") or []
                )
                if not hostnames:
                    continue
                attached = True
                for index, rule in enumerate(spec.get("rules") or [{}]):
                    rule_name = rule.get("name")
                    target = RuleTarget(
                        route=_key(route),
                        rule=rule_name or str(index),
                        backends=tuple(_backends(route, rule, backends, problems)),
                        timeout=_duration((rule.get("timeouts") or {}).get("request")),
                    )
                    policy, section = effective(
                        "AuthPolicy", gateway, listener.get("name"), route, rule_name
                    )
                    if policy is not None and section is not None:
                        target.auth = auth_for(policy, section)
                        target.auth_policy = _key(policy)
                    limits: list[Limit] = []
                    names = []
                    for kind in ("TokenRateLimitPolicy", "RateLimitPolicy"):
                        policy, section = effective(
                            kind, gateway, listener.get("name"), route, rule_name
                        )
                        if policy is not None and section is not None:
                            limits.extend(limits_for(policy, section))
                            names.append(f"{kind} {_key(policy)}")
                    target.limits = tuple(limits)
                    target.limit_policies = tuple(names)
                    targets.append(target)
                    for m_index, match in enumerate(rule.get("matches") or [{}]):
                        try:
                            pieces = _match(match)
                        except (re.error, ValueError) as exc:
                            problems.append(
                                f"HTTPRoute {_key(route)}: rules[{index}].matches[{m_index}]: {exc}"
                            )
                            continue
                        for hostname in hostnames:
                            matches.append(
                                RouteMatch(
                                    hostname,
                                    *pieces,
                                    target=target,
                                    order=(_age(route), _key(route), index, m_index),
                                )
                            )
        if not attached:
            warnings.append(f"HTTPRoute {_key(route)}: not attached to any Gateway listener")
    if problems:
        raise ConfigError(problems)
    return CompiledConfig(Router(matches), list(resources), warnings, targets, system_ns)


def _namespace_allowed(
    listener: Mapping[str, Any],
    gateway: Any,
    route: Any,
    namespaces: Mapping[str, Mapping[str, str]],
) -> bool:
    allowed = (listener.get("allowedRoutes") or {}).get("namespaces") or {}
    source = allowed.get("from", "Same")
    if source == "All":
        return True
    if source == "Same":
        return route.metadata.namespace == gateway.metadata.namespace
    selector = (allowed.get("selector") or {}).get("matchLabels") or {}
    labels = dict(namespaces.get(route.metadata.namespace, {}))
    labels.setdefault("kubernetes.io/metadata.name", route.metadata.namespace)
    return all(labels.get(k) == v for k, v in selector.items())


def _backends(
    route: Any, rule: Mapping[str, Any], plans: Mapping[str, BackendPlan | str], problems: list[str]
) -> list[Backend]:
    out = []
    for ref in rule.get("backendRefs") or ():
        key = f"{ref.get('namespace') or route.metadata.namespace}/{ref['name']}"
        plan = plans.get(key)
        url = plan if isinstance(plan, str) else (plan.url if plan is not None else None)
        if url is None:
            problems.append(f"HTTPRoute {_key(route)}: backend Service {key} has no address")
            continue
        weight = int(ref.get("weight", 1))
        if weight > 0:
            out.append(Backend(url, weight))
    return out


def _match(
    match: Mapping[str, Any],
) -> tuple[PathMatch, str | None, tuple[HeaderMatch, ...], tuple[HeaderMatch, ...]]:
    path = match.get("path") or {}
    ptype = path.get("type", "PathPrefix")
    value = path.get("value", "/")
    regex = re.compile(value) if ptype == "RegularExpression" else None
    headers = tuple(_value_match(h, lower=True) for h in match.get("headers") or ())
    query = tuple(_value_match(q, lower=False) for q in match.get("queryParams") or ())
    method = match.get("method")
    return PathMatch(ptype, value, regex), method, headers, query


def _value_match(item: Mapping[str, Any], lower: bool) -> HeaderMatch:
    kind = item.get("type", "Exact")
    name = str(item["name"])
    value = str(item.get("value", ""))
    regex = re.compile(value) if kind == "RegularExpression" else None
    return HeaderMatch(name.lower() if lower else name, kind, value, regex)
