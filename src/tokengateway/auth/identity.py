"""API key identities: Secrets selected by labels, looked up by the digest of the key.

Authorino's `apiKey` authentication trusts every Secret that matches the rule's label
selector (in the AuthConfig's namespace, which Kuadrant makes the system namespace, or in
every namespace with `allNamespaces: true`) and has a non-empty `api_key` entry. The
resolved identity is the Secret object itself as JSON: `apiVersion`, `kind`, `metadata`
(name, namespace, labels, annotations) and `data` with base64 values, so `rego` and
selectors read `auth.identity.metadata.annotations[...]`.

Authorino's Secret watcher only reacts to Secrets labelled
`authorino.kuadrant.io/managed-by=authorino`, but Secrets that exist when the AuthConfig is
loaded count whatever their labels; configuration here is always "loaded", so that label is
not required.

The index maps sha256(key) to the identity, so a lookup compares digests and the keys are
not kept: they cannot leak through a repr, a log line or an exception. Unlike Authorino,
the identity's `data` leaves the `api_key` entry out for the same reason.
"""

from __future__ import annotations

import base64
import hashlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from tokengateway.auth.model import AuthConfigError, SecretRecord

__all__ = [
    "API_KEY_ENTRY",
    "REDACTED",
    "ApiKeyIndex",
    "compile_label_selector",
    "digest",
    "secret_identity",
]

API_KEY_ENTRY = "api_key"
REDACTED = "***REDACTED***"

LabelMatcher = Callable[[Mapping[str, str]], bool]


def digest(key: str) -> bytes:
    return hashlib.sha256(key.encode("utf-8", "surrogateescape")).digest()


def _requirement(expr: Any, policy: str, where: str) -> LabelMatcher:
    if not isinstance(expr, Mapping):
        raise AuthConfigError(policy, where, "expected an object with key, operator, values")
    key = str(expr.get("key") or "")
    operator = str(expr.get("operator") or "")
    values = expr.get("values") or []
    if not key:
        raise AuthConfigError(policy, where, "`key` is required")
    if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
        raise AuthConfigError(policy, where, "`values` must be a list")
    allowed = frozenset(str(v) for v in values)
    if operator in ("In", "NotIn"):
        if not allowed:
            raise AuthConfigError(policy, where, f"operator {operator} needs `values`")
        if operator == "In":
            return lambda labels: labels.get(key) in allowed
        return lambda labels: labels.get(key) not in allowed
    if operator in ("Exists", "DoesNotExist"):
        if allowed:
            raise AuthConfigError(policy, where, f"operator {operator} takes no `values`")
        if operator == "Exists":
            return lambda labels: key in labels
        return lambda labels: key not in labels
    raise AuthConfigError(
        policy, where, f"unknown operator {operator!r} (expected In, NotIn, Exists, DoesNotExist)"
    )


def compile_label_selector(selector: Any, policy: str, where: str) -> LabelMatcher:
    """A Kubernetes LabelSelector; a missing selector matches nothing, `{}` matches all."""
    if selector is None:
        return lambda labels: False
    if not isinstance(selector, Mapping):
        raise AuthConfigError(policy, where, "the selector must be an object")
    match_labels = selector.get("matchLabels") or {}
    if not isinstance(match_labels, Mapping):
        raise AuthConfigError(policy, f"{where}.matchLabels", "expected a map of labels")
    expressions = selector.get("matchExpressions") or []
    if isinstance(expressions, (str, bytes)) or not isinstance(expressions, Sequence):
        raise AuthConfigError(policy, f"{where}.matchExpressions", "expected a list")
    wanted = {str(k): str(v) for k, v in match_labels.items()}
    requirements = [
        _requirement(e, policy, f"{where}.matchExpressions[{i}]") for i, e in enumerate(expressions)
    ]

    def matches(labels: Mapping[str, str]) -> bool:
        for k, v in wanted.items():
            if labels.get(k) != v:
                return False
        return all(req(labels) for req in requirements)

    return matches


def secret_identity(secret: SecretRecord) -> tuple[dict[str, Any], dict[str, Any]]:
    """The Secret as Authorino exposes it, and a copy with `data` redacted for logs."""
    metadata: dict[str, Any] = {"name": secret.name, "namespace": secret.namespace}
    if secret.labels:
        metadata["labels"] = dict(secret.labels)
    if secret.annotations:
        metadata["annotations"] = dict(secret.annotations)
    identity: dict[str, Any] = {"apiVersion": "v1", "kind": "Secret", "metadata": metadata}
    public = dict(identity)
    if secret.data:
        # the key itself is never kept: only its digest (the index), so no policy, log or
        # error can carry it; Authorino would expose it here too
        identity["data"] = {
            k: base64.b64encode(str(v).encode("utf-8", "surrogateescape")).decode("ascii")
            for k, v in secret.data.items()
            if k != API_KEY_ENTRY
        }
        public["data"] = dict.fromkeys(secret.data, REDACTED)
    if secret.type:
        identity["type"] = public["type"] = secret.type
    return identity, public


class ApiKeyIndex:
    """sha256(api key) -> (identity, redacted identity) for one `apiKey` rule."""

    __slots__ = ("_by_digest", "secrets")

    def __init__(
        self, secrets: Sequence[SecretRecord], matches: LabelMatcher, namespace: str | None
    ) -> None:
        self._by_digest: dict[bytes, tuple[dict[str, Any], dict[str, Any]]] = {}
        #: "namespace/name" of the Secrets this rule trusts
        self.secrets: list[str] = []
        # Sorted, so that two Secrets with the same key resolve the same way on every load
        for secret in sorted(secrets, key=lambda s: (s.namespace, s.name)):
            if namespace is not None and secret.namespace != namespace:
                continue
            if not matches(secret.labels or {}):
                continue
            key = (secret.data or {}).get(API_KEY_ENTRY)
            if not key:
                continue
            self._by_digest[digest(str(key))] = secret_identity(secret)
            self.secrets.append(f"{secret.namespace}/{secret.name}")

    def lookup(self, key: str) -> tuple[dict[str, Any], dict[str, Any]] | None:
        return self._by_digest.get(digest(key))

    def lookup_digest(self, hashed: bytes) -> tuple[dict[str, Any], dict[str, Any]] | None:
        return self._by_digest.get(hashed)

    def __len__(self) -> int:
        return len(self._by_digest)

    def __repr__(self) -> str:
        return f"ApiKeyIndex({len(self._by_digest)} keys)"
