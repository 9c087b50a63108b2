"""Names a user may type for a kind, as kubectl accepts them (`trlp`, `gtw`, `secrets`...)."""

from __future__ import annotations

from .parse import SUPPORTED_KINDS

__all__ = ["CLUSTER_SCOPED", "CONFIG_NEUTRAL", "KIND_NAMES", "UnknownKindError", "resolve_kind"]

#: short names and plurals, besides the kind itself in any case
_ALIASES = {
    "TokenRateLimitPolicy": ("trlp", "tokenratelimitpolicies"),
    "RateLimitPolicy": ("rlp", "ratelimitpolicies"),
    "AuthPolicy": ("authpolicies",),
    "Gateway": ("gtw", "gateways"),
    "HTTPRoute": ("httproutes",),
    "Service": ("svc", "services"),
    "Deployment": ("deploy", "deployments"),
    "Secret": ("secrets",),
    "Namespace": ("ns", "namespaces"),
    "Kuadrant": ("kuadrants",),
    "GatewayClass": ("gc", "gatewayclasses"),
    "Lease": ("leases",),
    "ReferenceGrant": ("refgrant", "referencegrants"),
    "ConfigMap": ("cm", "configmaps"),
    "BackendTLSPolicy": ("btlspolicy", "backendtlspolicies"),
}

KIND_NAMES: dict[str, str] = {}
for _kind in SUPPORTED_KINDS:
    KIND_NAMES[_kind.lower()] = _kind
    for _alias in _ALIASES.get(_kind, ()):
        KIND_NAMES[_alias] = _kind

CLUSTER_SCOPED = frozenset({"Namespace", "GatewayClass"})

#: kinds stored and served but read by no configuration: a write of only these builds and
#: publishes nothing (a Lease is renewed every few seconds by every replica)
CONFIG_NEUTRAL = frozenset({"Lease", "GatewayClass"})


class UnknownKindError(ValueError):
    pass


def resolve_kind(text: str) -> str:
    """The canonical kind for `text`; the group suffix kubectl allows is ignored
    (`tokenratelimitpolicy.kuadrant.io`)."""
    key = text.strip().lower().split(".", 1)[0]
    kind = KIND_NAMES.get(key)
    if kind is None:
        known = ", ".join(sorted(SUPPORTED_KINDS))
        raise UnknownKindError(f"unknown kind {text!r}; known kinds: {known}")
    return kind
