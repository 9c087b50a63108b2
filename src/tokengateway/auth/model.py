"""The engine's inputs and outputs; reprs never show credentials or Secret data."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["AuthConfigError", "AuthDecision", "AuthRequest", "SecretRecord"]


class AuthConfigError(ValueError):
    """A policy that cannot be enforced here; the message names the policy, the rule and why.

    The text never contains Secret data. `policy`, `rule` and `reason` are also attributes, for
    callers that print the policy name themselves.
    """

    def __init__(self, policy: str, rule: str, reason: str) -> None:
        self.policy = policy
        self.rule = rule
        self.reason = reason
        where = f"{policy}: {rule}" if rule else policy
        super().__init__(f"{where}: {reason}")


@dataclass(frozen=True)
class SecretRecord:
    """A Kubernetes Secret, already decoded by the loader (`data` holds plain strings)."""

    namespace: str
    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    annotations: Mapping[str, str] = field(default_factory=dict)
    data: Mapping[str, str] = field(default_factory=dict, repr=False)
    type: str = "Opaque"


@dataclass
class AuthRequest:
    """One HTTP request as the gateway saw it; built once per request."""

    method: str
    scheme: str
    host: str
    #: as sent, including the query string
    path: str
    #: lower-case names; repeated headers joined with ", "
    headers: Mapping[str, str]
    source_address: str
    source_port: int
    destination_address: str
    destination_port: int
    request_id: str
    #: the CEL bindings {"request": ..., "source": ..., "destination": ...} the gateway built
    well_known: Mapping[str, Any] = field(default_factory=dict)
    #: the certificate the client presented on the TLS connection (PEM), if any
    client_certificate: str | None = None

    def __repr__(self) -> str:
        # headers, query and well-known attributes may carry credentials: never shown
        path = self.path.split("?", 1)[0]
        return (
            f"AuthRequest({self.method} {self.scheme}://{self.host}{path}, "
            f"id={self.request_id!r}, headers={len(self.headers)})"
        )


@dataclass(frozen=True, repr=False)
class AuthDecision:
    """What the gateway does with the request.

    The dict fields are shared with the engine and across requests: treat them as read-only.
    """

    allowed: bool
    #: 200 when allowed, else 401 / 403 / the policy's custom deny code
    status: int
    #: the X-Ext-Auth-Reason value on a denial (also present in `deny_headers`)
    reason: str | None = None
    #: response headers for a denial: WWW-Authenticate challenges or the policy's custom
    #: headers, then X-Ext-Auth-Reason
    deny_headers: list[tuple[str, str]] = field(default_factory=list)
    #: headers to add to the upstream request (`response.success.headers`)
    success_headers: list[tuple[str, str]] = field(default_factory=list)
    #: the policy's custom deny message (`response.unauthenticated/unauthorized.message`)
    message: str | None = None
    #: the policy's custom deny body (`...body`)
    body: str | None = None
    #: the `auth` binding for the limits: {filter name: value} from `response.success.filters`
    auth: dict[str, Any] = field(default_factory=dict)
    #: the resolved identity, with Secret `data` values redacted
    identity: dict[str, Any] | None = None
    #: name of the authentication rule that resolved the identity
    identity_source: str | None = None
    #: where that rule read its credential (a CredentialLocation), to keep it from upstream
    credential: Any = None
    #: False when the policy's top-level `when` did not match (nothing was evaluated)
    applied: bool = True
    #: on a 401: the key sets (auth/jwt.py KeySet) that lacked the token's key, or had no
    #: keys yet; refreshing them (at most once, rate limited) may change the decision
    refresh_keys: tuple[Any, ...] = ()
    #: on a 401: (auth/introspection.py Introspector, token) for tokens an introspection
    #: endpoint must be asked about; once it answered, the decision may change
    introspect: tuple[tuple[Any, str], ...] = ()
    #: a 503 whose metadata calls (auth/metadata.py MetadataCall) are still to be made:
    #: once the gateway made them, the decision is worked out again
    metadata_calls: tuple[Any, ...] = ()

    @property
    def headers(self) -> list[tuple[str, str]]:
        """The headers that matter for this outcome: deny headers or upstream headers."""
        return self.success_headers if self.allowed else self.deny_headers

    def __repr__(self) -> str:
        parts = [f"allowed={self.allowed}", f"status={self.status}"]
        if self.reason is not None:
            parts.append(f"reason={self.reason!r}")
        if self.identity_source is not None:
            parts.append(f"identity_source={self.identity_source!r}")
        if isinstance(self.identity, dict):
            meta = self.identity.get("metadata")
            if isinstance(meta, dict) and "name" in meta:
                parts.append(f"identity={meta.get('namespace', '')}/{meta['name']}")
        if self.auth:
            parts.append(f"auth={sorted(self.auth)}")
        if not self.applied:
            parts.append("applied=False")
        return f"AuthDecision({', '.join(parts)})"

    __str__ = __repr__
