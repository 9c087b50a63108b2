"""Which objects a gateway of one GatewayClass serves, as a Gateway API implementation
decides: its own Gateways (`spec.gatewayClassName`), the HTTPRoutes with one of them as a
parent, and the policies that target one of those. Everything else belongs to another
implementation and is left alone: not compiled, not given a status, not even validated.

Without a class (`serve` without `--gateway-class`) every object is served, as before.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

__all__ = ["POLICY_KINDS", "left_alone"]

Key = tuple[str, str, str]  # (kind, namespace, name)

POLICY_KINDS = frozenset({"AuthPolicy", "RateLimitPolicy", "TokenRateLimitPolicy"})


def _spec(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    spec = doc.get("spec")
    return spec if isinstance(spec, Mapping) else {}


def _refs(value: Any) -> list[Mapping[str, Any]]:
    if isinstance(value, Mapping):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, Mapping)]
    return []


def left_alone(docs: Mapping[Key, Mapping[str, Any]], gateway_class: str | None) -> set[Key]:
    """The keys of `docs` a gateway of `gateway_class` does not serve."""
    if gateway_class is None:
        return set()
    out: set[Key] = set()
    for key, doc in docs.items():
        if key[0] == "Gateway" and _spec(doc).get("gatewayClassName") != gateway_class:
            out.add(key)
    served_gateways = {k for k in docs if k[0] == "Gateway"} - out
    for key, doc in docs.items():
        if key[0] != "HTTPRoute":
            continue
        parents = set()
        for ref in _refs(_spec(doc).get("parentRefs")):
            if ref.get("kind", "Gateway") != "Gateway":
                continue
            parents.add(("Gateway", str(ref.get("namespace") or key[1]), str(ref.get("name"))))
        if not parents & served_gateways:
            out.add(key)
    for key, doc in docs.items():
        if key[0] not in POLICY_KINDS:
            continue
        spec = _spec(doc)
        targets = _refs(spec.get("targetRef")) + _refs(spec.get("targetRefs"))
        named = {(str(t.get("kind")), key[1], str(t.get("name"))) for t in targets}
        # a policy whose target is missing stays: its status says TargetNotFound
        if named and named <= out:
            out.add(key)
    return out
