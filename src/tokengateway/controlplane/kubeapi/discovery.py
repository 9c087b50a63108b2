"""What kubectl asks before anything else: the server's version and which kinds it serves.

Built from the manifest models (`resources.parse.MODEL_BY_KIND`): a kind is served at each
apiVersion its model accepts, under the plural and short names kubectl users type. Both
forms are served: the aggregated one (`/api` and `/apis` asked with `AGGREGATED` in Accept,
an `APIGroupDiscoveryList` of apidiscovery.k8s.io/v2: every group, version and resource in
two answers, which kubectl and the official clients ask for first), and the legacy
documents (`/api`, `/apis`, `/api/v1`, `/apis/G`, `/apis/G/V`) for clients that do not.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from tokengateway.resources.kinds import CLUSTER_SCOPED
from tokengateway.resources.parse import MODEL_BY_KIND

__all__ = [
    "AGGREGATED",
    "KINDS",
    "KubeKind",
    "aggregated",
    "api_group_list",
    "api_versions",
    "find",
    "resource_list",
    "version_info",
]

#: the minor the Google Cloud SDK's kubectl dispatcher reads to pick `kubectl.1.<minor>`
SERVER_MINOR = "32"

VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
STATUS_VERBS = ["get", "patch", "update"]

#: the media type of aggregated discovery, asked for in Accept and answered as it is
AGGREGATED = "application/json;g=apidiscovery.k8s.io;v=v2;as=APIGroupDiscoveryList"

#: plural and short names, as Kubernetes, Gateway API and Kuadrant's CRDs declare them
_NAMES: dict[str, tuple[str, tuple[str, ...]]] = {
    "Namespace": ("namespaces", ("ns",)),
    "Service": ("services", ("svc",)),
    "Secret": ("secrets", ()),
    "Deployment": ("deployments", ("deploy",)),
    "Gateway": ("gateways", ("gtw",)),
    "HTTPRoute": ("httproutes", ()),
    "Kuadrant": ("kuadrants", ()),
    "AuthPolicy": ("authpolicies", ()),
    "RateLimitPolicy": ("ratelimitpolicies", ("rlp",)),
    "TokenRateLimitPolicy": ("tokenratelimitpolicies", ("trlp",)),
    "GatewayClass": ("gatewayclasses", ("gc",)),
    "Lease": ("leases", ()),
    "ReferenceGrant": ("referencegrants", ("refgrant",)),
    "ConfigMap": ("configmaps", ("cm",)),
    "BackendTLSPolicy": ("backendtlspolicies", ("btlspolicy",)),
}


#: kinds with no status, so no `/status` subresource
NO_STATUS = frozenset({"Secret", "ConfigMap", "Lease", "ReferenceGrant"})


@dataclass(frozen=True, slots=True)
class KubeKind:
    kind: str
    group: str  # "" for the core group
    version: str
    plural: str
    short_names: tuple[str, ...]
    namespaced: bool

    @property
    def group_version(self) -> str:
        return f"{self.group}/{self.version}" if self.group else self.version

    @property
    def qualified(self) -> str:
        """`tokenratelimitpolicies.kuadrant.io`, as Kubernetes names a resource in errors."""
        return f"{self.plural}.{self.group}" if self.group else self.plural

    @property
    def has_status(self) -> bool:
        """Whether `.../NAME/status` is served (a subresource, as on a cluster)."""
        return self.kind not in NO_STATUS

    def as_api_resource(self) -> dict[str, Any]:
        out: dict[str, Any] = {
            "name": self.plural,
            "singularName": self.kind.lower(),
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": VERBS,
        }
        if self.short_names:
            out["shortNames"] = list(self.short_names)
        return out


def _kinds() -> tuple[KubeKind, ...]:
    out = []
    for kind, model in MODEL_BY_KIND.items():
        plural, short = _NAMES.get(kind, (kind.lower() + "s", ()))
        for api_version in model.API_VERSIONS:
            group, _, version = api_version.rpartition("/")
            out.append(KubeKind(kind, group, version, plural, short, kind not in CLUSTER_SCOPED))
    return tuple(out)


KINDS = _kinds()


def find(group: str, version: str, plural: str) -> KubeKind | None:
    for k in KINDS:
        if (k.group, k.version, k.plural) == (group, version, plural):
            return k
    return None


def version_info() -> dict[str, str]:
    from tokengateway import __version__

    return {
        "major": "1",
        "minor": SERVER_MINOR,
        "gitVersion": f"v1.{SERVER_MINOR}.0+tokengateway.{__version__}",
        "gitCommit": "",
        "gitTreeState": "clean",
        "buildDate": "1970-01-01T00:00:00Z",
        "goVersion": "python",
        "compiler": "tokengateway",
        "platform": "linux/amd64",
    }


def api_versions() -> dict[str, Any]:
    return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}


def _groups() -> dict[str, list[str]]:
    """Each named group's versions, the preferred (first listed by any model) first."""
    groups: dict[str, list[str]] = {}
    for k in KINDS:
        if k.group and k.version not in groups.setdefault(k.group, []):
            groups[k.group].append(k.version)
    # kuadrant.io: v1 is what Kuadrant prefers, whichever model was listed first
    for versions in groups.values():
        if "v1" in versions:
            versions.remove("v1")
            versions.insert(0, "v1")
    return groups


def api_group_list() -> dict[str, Any]:
    groups = []
    for group, versions in _groups().items():
        listed = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        groups.append({"name": group, "versions": listed, "preferredVersion": listed[0]})
    return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}


def resource_list(group: str, version: str) -> dict[str, Any] | None:
    """The `APIResourceList` of one group/version; None when it is not served."""
    found = [k for k in KINDS if (k.group, k.version) == (group, version)]
    if not found:
        return None
    return {
        "kind": "APIResourceList",
        "apiVersion": "v1",
        "groupVersion": found[0].group_version,
        "resources": [r for k in found for r in _resources(k)],
    }


def _resources(k: KubeKind) -> list[dict[str, Any]]:
    out = [k.as_api_resource()]
    if k.has_status:
        out.append(
            {
                "name": f"{k.plural}/status",
                "singularName": "",
                "namespaced": k.namespaced,
                "kind": k.kind,
                "verbs": STATUS_VERBS,
            }
        )
    return out


def aggregated(core: bool) -> dict[str, Any]:
    """The `APIGroupDiscoveryList` of `/api` (`core`: the core group, v1) or of `/apis`
    (every named group, its versions in preference order)."""
    groups = {"": ["v1"]} if core else _groups()
    items = []
    for group, versions in groups.items():
        listed = []
        for version in versions:
            kinds = [k for k in KINDS if (k.group, k.version) == (group, version)]
            listed.append(
                {
                    "version": version,
                    "resources": [_discovered(k) for k in kinds],
                    "freshness": "Current",
                }
            )
        items.append({"metadata": {"name": group} if group else {}, "versions": listed})
    return {
        "kind": "APIGroupDiscoveryList",
        "apiVersion": "apidiscovery.k8s.io/v2",
        "metadata": {},
        "items": items,
    }


def _discovered(k: KubeKind) -> dict[str, Any]:
    kind = {"group": k.group, "version": k.version, "kind": k.kind}
    out: dict[str, Any] = {
        "resource": k.plural,
        "responseKind": kind,
        "scope": "Namespaced" if k.namespaced else "Cluster",
        "singularResource": k.kind.lower(),
        "verbs": VERBS,
    }
    if k.short_names:
        out["shortNames"] = list(k.short_names)
    if k.has_status:
        out["subresources"] = [
            {"subresource": "status", "responseKind": kind, "verbs": STATUS_VERBS}
        ]
    return out
