"""Status of policies, Gateways and HTTPRoutes, as Kuadrant and a Gateway API controller set it.

`config.compile_config` gathers the facts (is the target there, which rules of a policy are in
force on which route, what failed to compile) into :class:`PolicyFacts`, :class:`GatewayFacts`
and :class:`RouteFacts`; this module turns them into the conditions `kubectl get -o yaml` would
show. Reasons and messages follow kuadrant-operator (`internal/kuadrant/conditions.go`,
`errors.go` and the `*_status_updater.go` of each kind); where we differ, the docstring of the
function says why (docs/policies.md lists it too).
"""

from __future__ import annotations

import datetime
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "CONTROLLER_NAME",
    "KUADRANT_CONTROLLER_NAME",
    "AncestorStatus",
    "GatewayFacts",
    "GatewayStatus",
    "HTTPRouteStatus",
    "ListenerFacts",
    "ParentFacts",
    "PolicyFacts",
    "PolicyStatus",
    "RouteFacts",
    "Status",
    "affected_condition",
    "ancestor_status",
    "carry_transition_times",
    "gateway_status",
    "now",
    "policy_status",
    "route_status",
    "target_invalid",
    "target_not_found",
]

#: The controller named in HTTPRoute `status.parents` (the GatewayClass's controllerName).
CONTROLLER_NAME = "tokengateway.io/gateway-controller"
#: Kuadrant writes its `kuadrant.io/<Kind>Affected` conditions under its own parent entry.
KUADRANT_CONTROLLER_NAME = "kuadrant.io/policy-controller"

ACCEPTED = "Accepted"
ENFORCED = "Enforced"


def now() -> str:
    """RFC 3339 in UTC with seconds, as Kubernetes writes `lastTransitionTime`."""
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _condition(
    type_: str, ok: bool, reason: str, message: str, generation: int, when: str
) -> dict[str, Any]:
    return {
        "type": type_,
        "status": "True" if ok else "False",
        "reason": reason,
        "message": message,
        "lastTransitionTime": when,
        "observedGeneration": generation,
    }


def _keys(policies: Iterable[str]) -> str:
    """Go's `%s` of a []NamespacedName / []ObjectKey: `[ns/a ns/b]`."""
    return "[" + " ".join(policies) + "]"


# --- policies -----------------------------------------------------------------------------------


@dataclass
class PolicyFacts:
    """What compile_config learnt about one policy.

    `target_problem` is (reason, message) when the policy is not Accepted. `in_force` is true
    when at least one of its rules is part of the effective policy of some route rule;
    `overridden_by` names ("namespace/name") the policies whose rules took the place of one of
    its rules somewhere. `cel_issues` and `other_issues` are compile problems of its rules
    (the rule left out, or the route failing closed for an AuthPolicy).
    """

    kind: str
    namespace: str
    name: str
    generation: int = 1
    target_problem: tuple[str, str] | None = None
    in_force: bool = False
    overridden_by: set[str] = field(default_factory=set)
    cel_issues: list[str] = field(default_factory=list)
    other_issues: list[str] = field(default_factory=list)

    def add_issue(self, message: str, cel: bool) -> None:
        issues = self.cel_issues if cel else self.other_issues
        if message not in issues:
            issues.append(message)


@dataclass
class PolicyStatus:
    """`status` of an AuthPolicy, RateLimitPolicy or TokenRateLimitPolicy."""

    conditions: list[dict[str, Any]]
    observed_generation: int = 1

    def condition(self, type_: str) -> dict[str, Any] | None:
        return next((c for c in self.conditions if c["type"] == type_), None)

    @property
    def accepted(self) -> bool:
        cond = self.condition(ACCEPTED)
        return cond is not None and cond["status"] == "True"

    @property
    def enforced(self) -> bool:
        cond = self.condition(ENFORCED)
        return cond is not None and cond["status"] == "True"

    def reason(self, type_: str) -> str | None:
        cond = self.condition(type_)
        return None if cond is None else str(cond["reason"])

    def message(self, type_: str) -> str | None:
        cond = self.condition(type_)
        return None if cond is None else str(cond["message"])

    def as_dict(self) -> dict[str, Any]:
        return {
            "observedGeneration": self.observed_generation,
            "conditions": [dict(c) for c in self.conditions],
        }

    def all_conditions(self) -> list[dict[str, Any]]:
        """Every condition, for carrying `lastTransitionTime` across configurations."""
        return self.conditions


def policy_status(facts: PolicyFacts, when: str | None = None) -> PolicyStatus:
    """Accepted, then (only when accepted) Enforced, as Kuadrant computes them.

    Enforced, in Kuadrant's order: no rule of the policy in force anywhere is `Unknown` ("not
    in the path to any existing routes") or `Overridden` (naming the policies that took its
    place); then compile problems (`InvalidCelExpression` for CEL, `Unknown` for anything
    else, e.g. Rego); else `Enforced`, "successfully" or "partially" when some of its rules
    are overridden. Kuadrant's TokenRateLimitPolicy updater reports the partial case as
    Enforced=False/Unknown ("policy rule(s) overridden: ..."), unlike its RateLimitPolicy and
    AuthPolicy updaters; we report it like the latter for every kind, since the policy is in
    force.
    """
    when = when or now()
    kind, gen = facts.kind, facts.generation
    if facts.target_problem is not None:
        reason, message = facts.target_problem
        return PolicyStatus([_condition(ACCEPTED, False, reason, message, gen, when)], gen)
    conditions = [_condition(ACCEPTED, True, "Accepted", f"{kind} has been accepted", gen, when)]
    if not facts.in_force:
        if not facts.overridden_by:
            enforced = (False, "Unknown", f"{kind} is not in the path to any existing routes")
        else:
            by = _keys(sorted(facts.overridden_by))
            enforced = (False, "Overridden", f"{kind} is overridden by {by}")
    elif facts.cel_issues:
        enforced = (False, "InvalidCelExpression", f"validation issues: {_keys(facts.cel_issues)}")
    elif facts.other_issues:
        detail = "; ".join(facts.other_issues)
        enforced = (False, "Unknown", f"{kind} has encountered some issues: {detail}")
    elif facts.overridden_by:
        enforced = (True, "Enforced", f"{kind} has been partially enforced")
    else:
        enforced = (True, "Enforced", f"{kind} has been successfully enforced")
    conditions.append(_condition(ENFORCED, *enforced, gen, when))
    return PolicyStatus(conditions, gen)


def target_not_found(kind: str, name: str, section: str | None) -> tuple[str, str]:
    """Kuadrant names the target `name`, or `name#section` when the policy names a section."""
    shown = f"{name}#{section}" if section else name
    return ("TargetNotFound", f"{kind} target {shown} was not found")


def target_invalid(kind: str, why: str) -> tuple[str, str]:
    return ("Invalid", f"{kind} target is invalid: {why}")


def affected_condition(kind: str, policies: Iterable[str], generation: int, when: str) -> dict:
    """Kuadrant's discoverability condition on Gateways, listeners and HTTPRoutes."""
    return _condition(
        f"kuadrant.io/{kind}Affected",
        True,
        "Accepted",
        f"Object affected by {kind} {_keys(policies)}",
        generation,
        when,
    )


# --- Gateways -----------------------------------------------------------------------------------


@dataclass
class ListenerFacts:
    name: str
    attached_routes: int = 0
    #: kind -> accepted policies targeting the Gateway or this listener ("namespace/name")
    affected_by: dict[str, list[str]] = field(default_factory=dict)
    #: (reason, message) when the condition is false: Accepted (UnsupportedProtocol, ...),
    #: Programmed (Invalid, Pending), ResolvedRefs (InvalidCertificateRef, RefNotPermitted)
    accepted: tuple[str, str] | None = None
    programmed: tuple[str, str] | None = None
    resolved: tuple[str, str] | None = None
    #: said in a true ResolvedRefs (an expired certificate served all the same)
    resolved_note: str | None = None


@dataclass
class GatewayFacts:
    namespace: str
    name: str
    generation: int = 1
    listeners: list[ListenerFacts] = field(default_factory=list)
    #: kind -> accepted policies targeting the Gateway itself
    affected_by: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class GatewayStatus:
    conditions: list[dict[str, Any]]
    listeners: list[dict[str, Any]]

    def condition(self, type_: str) -> dict[str, Any] | None:
        return next((c for c in self.conditions if c["type"] == type_), None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "conditions": [dict(c) for c in self.conditions],
            "listeners": [
                {**item, "conditions": [dict(c) for c in item["conditions"]]}
                for item in self.listeners
            ],
        }

    def all_conditions(self) -> list[dict[str, Any]]:
        return self.conditions + [c for item in self.listeners for c in item["conditions"]]


def gateway_status(facts: GatewayFacts, when: str | None = None) -> GatewayStatus:
    """Accepted and Programmed (every listener is served as soon as the config is loaded),
    per-listener Accepted/Programmed/ResolvedRefs, and Kuadrant's `<Kind>Affected`.

    A listener that cannot be served (an unsupported protocol, a certificate that does not
    resolve, HTTPS without `--listen-https`) says why in its own conditions; the Gateway
    stays Accepted, with reason ListenersNotValid when some listener is not, as Gateway API
    allows, and its other listeners are served."""
    when = when or now()
    gen = facts.generation
    invalid = [x.name for x in facts.listeners if x.accepted or x.resolved]
    accepted = (
        ("ListenersNotValid", f"listeners not valid: {', '.join(invalid)}")
        if invalid
        else ("Accepted", "Resource accepted")
    )
    conditions = [
        _condition(ACCEPTED, True, *accepted, gen, when),
        _condition(
            "Programmed",
            True,
            "Programmed",
            "Resource programmed, served by tokengateway",
            gen,
            when,
        ),
    ]
    for kind, policies in sorted(facts.affected_by.items()):
        if policies:
            conditions.append(affected_condition(kind, policies, gen, when))
    listeners = []
    for listener in facts.listeners:
        ok = "No errors found"
        items = [
            _condition(ACCEPTED, *_state(listener.accepted, "Accepted", ok), gen, when),
            _condition("Programmed", *_state(listener.programmed, "Programmed", ok), gen, when),
            _condition(
                "ResolvedRefs",
                *_state(listener.resolved, "ResolvedRefs", listener.resolved_note or ok),
                gen,
                when,
            ),
        ]
        for kind, policies in sorted(listener.affected_by.items()):
            if policies:
                items.append(affected_condition(kind, policies, gen, when))
        listeners.append(
            {
                "name": listener.name,
                "attachedRoutes": listener.attached_routes,
                "supportedKinds": [{"group": "gateway.networking.k8s.io", "kind": "HTTPRoute"}],
                "conditions": items,
            }
        )
    return GatewayStatus(conditions, listeners)


def _state(problem: tuple[str, str] | None, reason: str, message: str) -> tuple[bool, str, str]:
    return (True, reason, message) if problem is None else (False, *problem)


# --- HTTPRoutes ---------------------------------------------------------------------------------


@dataclass
class ParentFacts:
    """One parentRef of an HTTPRoute; `accepted` is None when it was accepted, else
    (reason, message)."""

    ref: dict[str, Any]
    accepted: tuple[str, str] | None = None
    #: kind -> accepted policies in the route's path through this Gateway (Kuadrant's order)
    affected_by: dict[str, list[str]] = field(default_factory=dict)


@dataclass
class RouteFacts:
    namespace: str
    name: str
    generation: int = 1
    parents: list[ParentFacts] = field(default_factory=list)
    #: (reason, message) when some backendRef does not resolve
    unresolved: tuple[str, str] | None = None
    #: matches left out (bad regular expressions), one message each
    invalid_matches: list[str] = field(default_factory=list)


@dataclass
class HTTPRouteStatus:
    parents: list[dict[str, Any]]

    def parent(self, name: str, controller: str = CONTROLLER_NAME) -> dict[str, Any] | None:
        return next(
            (
                p
                for p in self.parents
                if p["parentRef"].get("name") == name and p["controllerName"] == controller
            ),
            None,
        )

    def as_dict(self) -> dict[str, Any]:
        return {
            "parents": [
                {**p, "conditions": [dict(c) for c in p["conditions"]]} for p in self.parents
            ]
        }

    def all_conditions(self) -> list[dict[str, Any]]:
        return [c for p in self.parents for c in p["conditions"]]


def route_status(facts: RouteFacts, when: str | None = None) -> HTTPRouteStatus:
    """One parent entry per parentRef with Accepted and ResolvedRefs (and PartiallyInvalid
    when some match was left out), plus Kuadrant's entry with its `<Kind>Affected`
    conditions for each Gateway the route is attached to."""
    when = when or now()
    gen = facts.generation
    parents = []
    kuadrant: dict[tuple[str, str], dict[str, list[str]]] = {}
    for parent in facts.parents:
        items = []
        if parent.accepted is None:
            items.append(_condition(ACCEPTED, True, "Accepted", "Route was valid", gen, when))
        else:
            items.append(_condition(ACCEPTED, False, *parent.accepted, gen, when))
        if facts.unresolved is None:
            items.append(
                _condition(
                    "ResolvedRefs", True, "ResolvedRefs", "All references resolved", gen, when
                )
            )
        else:
            items.append(_condition("ResolvedRefs", False, *facts.unresolved, gen, when))
        if facts.invalid_matches:
            items.append(
                _condition(
                    "PartiallyInvalid",
                    True,
                    "UnsupportedValue",
                    "; ".join(facts.invalid_matches),
                    gen,
                    when,
                )
            )
        parents.append(
            {"parentRef": dict(parent.ref), "controllerName": CONTROLLER_NAME, "conditions": items}
        )
        if parent.accepted is None and parent.affected_by:
            key = (str(parent.ref.get("namespace") or facts.namespace), str(parent.ref["name"]))
            merged = kuadrant.setdefault(key, {})
            for kind, policies in parent.affected_by.items():
                seen = merged.setdefault(kind, [])
                seen.extend(p for p in policies if p not in seen)
    for (namespace, name), by_kind in kuadrant.items():
        items = [
            affected_condition(kind, policies, gen, when)
            for kind, policies in sorted(by_kind.items())
            if policies
        ]
        if items:
            parents.append(
                {
                    "parentRef": {"kind": "Gateway", "name": name, "namespace": namespace},
                    "controllerName": KUADRANT_CONTROLLER_NAME,
                    "conditions": items,
                }
            )
    return HTTPRouteStatus(parents)


# --- Gateway API policies (BackendTLSPolicy) ------------------------------------------------------


@dataclass
class AncestorStatus:
    """`status` of a Gateway API policy (PolicyStatus): one entry per ancestor (a Gateway
    whose routes reach the policy's target), each with its own conditions."""

    ancestors: list[dict[str, Any]]

    def ancestor(self, name: str) -> dict[str, Any] | None:
        return next((a for a in self.ancestors if a["ancestorRef"].get("name") == name), None)

    def condition(self, type_: str) -> dict[str, Any] | None:
        """The condition `type_` of the first ancestor (they all say the same here)."""
        first = self.ancestors[0]["conditions"] if self.ancestors else []
        return next((c for c in first if c["type"] == type_), None)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ancestors": [
                {**a, "conditions": [dict(c) for c in a["conditions"]]} for a in self.ancestors
            ]
        }

    def all_conditions(self) -> list[dict[str, Any]]:
        return [c for a in self.ancestors for c in a["conditions"]]


def ancestor_status(
    ancestors: Iterable[dict[str, Any]],
    conditions: Iterable[tuple[str, bool, str, str]],
    generation: int,
    when: str | None = None,
) -> AncestorStatus:
    """The same `conditions` (type, ok, reason, message) under each ancestor reference."""
    when = when or now()
    items = list(conditions)
    return AncestorStatus(
        [
            {
                "ancestorRef": dict(ref),
                "controllerName": CONTROLLER_NAME,
                "conditions": [_condition(t, ok, r, m, generation, when) for t, ok, r, m in items],
            }
            for ref in ancestors
        ]
    )


# --- across configurations ----------------------------------------------------------------------

Status = PolicyStatus | GatewayStatus | HTTPRouteStatus | AncestorStatus


def carry_transition_times(
    statuses: Mapping[Any, Status], previous: Mapping[Any, Status] | None
) -> None:
    """Keep `lastTransitionTime` where a condition's status did not change since `previous`,
    as Kubernetes does (a new reason or message alone is not a transition)."""
    if not previous:
        return
    for key, status in statuses.items():
        before = previous.get(key)
        if before is None or type(before) is not type(status):
            continue
        old = {_identity(c, before): c for c in before.all_conditions()}
        for cond in status.all_conditions():
            match = old.get(_identity(cond, status))
            if match is not None and match["status"] == cond["status"]:
                cond["lastTransitionTime"] = match["lastTransitionTime"]


def _identity(cond: Mapping[str, Any], owner: Status) -> tuple[Any, ...]:
    """Which condition in the previous status is "the same" one: by type, and for conditions
    inside listeners / route parents, by the listener or parent they belong to."""
    if isinstance(owner, GatewayStatus):
        for item in owner.listeners:
            if any(c is cond for c in item["conditions"]):
                return ("listener", item["name"], cond["type"])
    if isinstance(owner, AncestorStatus):
        for a in owner.ancestors:
            if any(c is cond for c in a["conditions"]):
                ref = a["ancestorRef"]
                return (
                    "ancestor",
                    ref.get("kind"),
                    ref.get("namespace"),
                    ref.get("name"),
                    cond["type"],
                )
    if isinstance(owner, HTTPRouteStatus):
        for p in owner.parents:
            if any(c is cond for c in p["conditions"]):
                ref = p["parentRef"]
                parent = (ref.get("namespace"), ref.get("name"), ref.get("sectionName"))
                return ("parent", p["controllerName"], parent, cond["type"])
    return ("object", cond["type"])
