"""What a follower reads from a Kubernetes API, and what it writes back.

One table, read by the informers (what to list and watch), the status writer (which
`/status` subresources it patches), the leader election (the Lease) and by the test that
checks `deploy/rbac.yaml` grants exactly this and nothing more.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["LEASE", "LEASE_VERBS", "READ_VERBS", "STATUS_VERBS", "WATCHED", "WatchedKind"]


@dataclass(frozen=True, slots=True)
class WatchedKind:
    kind: str
    group: str  # "" for the core group
    version: str
    plural: str
    namespaced: bool = True
    #: the follower writes this kind's `status` subresource (when it holds the Lease)
    writes_status: bool = False

    @property
    def api_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version


GATEWAY_API = "gateway.networking.k8s.io"
KUADRANT = "kuadrant.io"

#: listed then watched, in this order (a Namespace before what is in it, ConfigMaps and
#: Secrets last: only those the policies and Gateways name are held)
WATCHED: tuple[WatchedKind, ...] = (
    WatchedKind("Namespace", "", "v1", "namespaces", namespaced=False),
    WatchedKind("Kuadrant", KUADRANT, "v1beta1", "kuadrants"),
    WatchedKind("Gateway", GATEWAY_API, "v1", "gateways", writes_status=True),
    WatchedKind("HTTPRoute", GATEWAY_API, "v1", "httproutes", writes_status=True),
    WatchedKind("ReferenceGrant", GATEWAY_API, "v1beta1", "referencegrants"),
    WatchedKind("BackendTLSPolicy", GATEWAY_API, "v1", "backendtlspolicies"),
    WatchedKind("Service", "", "v1", "services"),
    WatchedKind("Deployment", "apps", "v1", "deployments"),
    WatchedKind("AuthPolicy", KUADRANT, "v1", "authpolicies", writes_status=True),
    WatchedKind("TokenRateLimitPolicy", KUADRANT, "v1alpha1", "tokenratelimitpolicies", True, True),
    WatchedKind("RateLimitPolicy", KUADRANT, "v1", "ratelimitpolicies", writes_status=True),
    WatchedKind("ConfigMap", "", "v1", "configmaps"),
    WatchedKind("Secret", "", "v1", "secrets"),
)

#: what reading a kind takes: one list, then watches from its resourceVersion
READ_VERBS: tuple[str, ...] = ("list", "watch")
#: what writing a status takes: a merge patch of `<plural>/status`
STATUS_VERBS: tuple[str, ...] = ("patch",)

#: the Lease one replica holds to be the only one writing status (coordination.k8s.io/v1)
LEASE = WatchedKind("Lease", "coordination.k8s.io", "v1", "leases")
LEASE_VERBS: tuple[str, ...] = ("get", "create", "update")
