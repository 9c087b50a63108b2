"""Gateway API kinds: GatewayClass, Gateway and HTTPRoute (gateway.networking.k8s.io v1,
v1beta1), ReferenceGrant (v1beta1) and BackendTLSPolicy (v1, v1alpha3).

Patterns, enums, defaults and CEL rules follow the Gateway API CRDs (standard channel). The
spec structures are closed like the CRD schemas, so a misspelt `backendRef` is an error rather
than a route without backends; experimental-channel fields are accepted and kept as written.
"""

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_core import InitErrorDetails

from .common import (
    Duration,
    LabelSelector,
    NameRule,
    ObjectMeta,
    StrictModel,
    issue,
    parse_window,
    raise_issues,
    unique,
)
from .resource import Resource

__all__ = [
    "GATEWAY_API_GROUP",
    "AllowedRoutes",
    "BackendRef",
    "BackendTLSPolicy",
    "BackendTLSPolicySpec",
    "BackendTLSValidation",
    "CACertificateRef",
    "Gateway",
    "GatewayClass",
    "GatewayClassSpec",
    "GatewaySpec",
    "HTTPHeaderMatch",
    "HTTPPathMatch",
    "HTTPQueryParamMatch",
    "HTTPRoute",
    "HTTPRouteMatch",
    "HTTPRouteRule",
    "HTTPRouteSpec",
    "HTTPRouteTimeouts",
    "Listener",
    "ParametersReference",
    "ParentReference",
    "PolicyTargetRef",
    "ReferenceGrant",
    "ReferenceGrantFrom",
    "ReferenceGrantSpec",
    "ReferenceGrantTo",
    "RouteGroupKind",
    "RouteNamespaces",
    "SubjectAltName",
]

GATEWAY_API_GROUP = "gateway.networking.k8s.io"
GATEWAY_API_VERSIONS = (f"{GATEWAY_API_GROUP}/v1", f"{GATEWAY_API_GROUP}/v1beta1")

_SUBDOMAIN = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"
GROUP_PATTERN = rf"^$|^{_SUBDOMAIN}$"
KIND_PATTERN = r"^[a-zA-Z]([-a-zA-Z0-9]*[a-zA-Z0-9])?$"
SECTION_NAME_PATTERN = rf"^{_SUBDOMAIN}$"
NAMESPACE_PATTERN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
HOSTNAME_PATTERN = rf"^(\*\.)?{_SUBDOMAIN}$"
HEADER_NAME_PATTERN = r"^[A-Za-z0-9!#$%&'*+\-.^_\x60|~]+$"
PROTOCOL_PATTERN = r"^[a-zA-Z0-9]([-a-zA-Z0-9]*[a-zA-Z0-9])?$|" + _SUBDOMAIN + r"\/[A-Za-z0-9]+$"

Group = Annotated[str, Field(max_length=253, pattern=GROUP_PATTERN)]
Kind = Annotated[str, Field(min_length=1, max_length=63, pattern=KIND_PATTERN)]
ObjectName = Annotated[str, Field(min_length=1, max_length=253)]
SectionName = Annotated[str, Field(min_length=1, max_length=253, pattern=SECTION_NAME_PATTERN)]
NamespaceName = Annotated[str, Field(min_length=1, max_length=63, pattern=NAMESPACE_PATTERN)]
PortNumber = Annotated[int, Field(ge=1, le=65535)]
Hostname = Annotated[str, Field(min_length=1, max_length=253, pattern=HOSTNAME_PATTERN)]
HeaderName = Annotated[str, Field(min_length=1, max_length=256, pattern=HEADER_NAME_PATTERN)]
HTTPMethod = Literal["GET", "HEAD", "POST", "PUT", "DELETE", "CONNECT", "OPTIONS", "TRACE", "PATCH"]


def _regex_problem(value: str) -> str | None:
    try:
        re.compile(value)
    except re.error as exc:
        return f"invalid regular expression {value!r}: {exc}"
    return None


# --- GatewayClass -------------------------------------------------------------------------------

CONTROLLER_NAME_PATTERN = rf"^{_SUBDOMAIN}\/[A-Za-z0-9\/\-._~%!$&'()*+,;=:]+$"


class ClusterSubdomainMeta(ObjectMeta):
    """metadata of a cluster-scoped object named by a DNS-1123 subdomain (a GatewayClass)."""

    NAME_RULE: ClassVar[NameRule] = "subdomain"
    NAMESPACED: ClassVar[bool] = False


class ParametersReference(StrictModel):
    """Where a GatewayClass's controller finds its parameters; kept as written."""

    group: Group
    kind: Kind
    name: ObjectName
    namespace: NamespaceName | None = None


class GatewayClassSpec(StrictModel):
    """GatewayClass spec: the controller that implements the class (`example.com/name`)."""

    controllerName: Annotated[
        str, Field(min_length=1, max_length=253, pattern=CONTROLLER_NAME_PATTERN)
    ]
    parametersRef: ParametersReference | None = None
    description: Annotated[str, Field(max_length=64)] | None = None


class GatewayClass(Resource):
    """A GatewayClass: cluster-scoped, stored and served, read by no configuration (Gateways
    are matched by listener and route, whatever their `gatewayClassName`)."""

    KIND: ClassVar[str] = "GatewayClass"
    API_VERSIONS: ClassVar[tuple[str, ...]] = GATEWAY_API_VERSIONS

    metadata: ClusterSubdomainMeta
    spec: GatewayClassSpec
    status: dict[str, Any] | None = None


# --- Gateway ------------------------------------------------------------------------------------


class RouteNamespaces(StrictModel):
    """Which namespaces' routes may attach to a listener (`from` is a keyword: `from_`)."""

    from_: Literal["All", "Selector", "Same"] = Field(default="Same", alias="from")
    selector: LabelSelector | None = None


class RouteGroupKind(StrictModel):
    """A route kind a listener accepts."""

    group: Group = GATEWAY_API_GROUP
    kind: Kind


class AllowedRoutes(StrictModel):
    """Routes a listener accepts; the CRD default is routes from the Gateway's namespace."""

    namespaces: RouteNamespaces = Field(default_factory=RouteNamespaces)
    kinds: Annotated[list[RouteGroupKind], Field(max_length=8)] = Field(default_factory=list)


class Listener(StrictModel):
    """A listener: where the gateway accepts traffic (port, protocol, optional hostname)."""

    name: SectionName
    hostname: Hostname | None = None
    port: PortNumber
    protocol: Annotated[str, Field(min_length=1, max_length=255, pattern=PROTOCOL_PATTERN)]
    tls: dict[str, Any] | None = None
    allowedRoutes: AllowedRoutes = Field(default_factory=AllowedRoutes)


class GatewaySpec(StrictModel):
    """Gateway spec; addresses, TLS and infrastructure settings are kept as written."""

    gatewayClassName: Annotated[str, Field(min_length=1, max_length=253)]
    listeners: Annotated[list[Listener], Field(min_length=1, max_length=64)]
    addresses: list[dict[str, Any]] = Field(default_factory=list)
    infrastructure: dict[str, Any] | None = None
    allowedListeners: dict[str, Any] | None = None
    tls: dict[str, Any] | None = None
    backendTLS: dict[str, Any] | None = None
    defaultScope: str | None = None

    @field_validator("listeners")
    @classmethod
    def _listener_rules(cls, listeners: list[Listener]) -> list[Listener]:
        # The Gateway CRD's CEL rules on spec.listeners, with its messages.
        problems: list[InitErrorDetails] = []

        def fail(message: str) -> None:
            problems.append(issue((), message))

        if any(lst.protocol in ("HTTP", "TCP", "UDP") and lst.tls is not None for lst in listeners):
            fail("tls must not be specified for protocols ['HTTP', 'TCP', 'UDP']")
        if any(
            lst.protocol == "HTTPS"
            and lst.tls is not None
            and lst.tls.get("mode", "") not in ("", "Terminate")
            for lst in listeners
        ):
            fail("tls mode must be Terminate for protocol HTTPS")
        if any(lst.protocol == "TLS" and not (lst.tls or {}).get("mode") for lst in listeners):
            fail("tls mode must be set for protocol TLS")
        if any(lst.protocol in ("TCP", "UDP") and lst.hostname for lst in listeners):
            fail("hostname must not be specified for protocols ['TCP', 'UDP']")
        if unique(lst.name for lst in listeners):
            fail("Listener name must be unique within the Gateway")
        if unique((lst.port, lst.protocol, lst.hostname) for lst in listeners):
            fail("Combination of port, protocol and hostname must be unique for each listener")
        raise_issues("listeners", problems)
        return listeners

    def listener(self, name: str) -> Listener | None:
        """The listener called `name` (a policy's or route's `sectionName`)."""
        return next((lst for lst in self.listeners if lst.name == name), None)


class Gateway(Resource):
    """A Gateway: the listeners routes attach to and policies can target."""

    KIND: ClassVar[str] = "Gateway"
    API_VERSIONS: ClassVar[tuple[str, ...]] = GATEWAY_API_VERSIONS

    metadata: ObjectMeta
    spec: GatewaySpec
    status: dict[str, Any] | None = None


# --- ReferenceGrant -----------------------------------------------------------------------------


class ReferenceGrantFrom(StrictModel):
    """Objects in `namespace` of this group and kind may refer into the grant's namespace."""

    group: Group
    kind: Kind
    namespace: NamespaceName


class ReferenceGrantTo(StrictModel):
    """What they may refer to in the grant's namespace: objects of this group and kind,
    only the one called `name` when it is set."""

    group: Group
    kind: Kind
    name: ObjectName | None = None


class ReferenceGrantSpec(StrictModel):
    from_: Annotated[list[ReferenceGrantFrom], Field(min_length=1, max_length=16)] = Field(
        alias="from"
    )
    to: Annotated[list[ReferenceGrantTo], Field(min_length=1, max_length=16)]


class ReferenceGrant(Resource):
    """A grant, in the namespace of the objects referred to, that lets objects of another
    namespace refer to them (a Gateway's listener to a certificate Secret, here)."""

    KIND: ClassVar[str] = "ReferenceGrant"
    API_VERSIONS: ClassVar[tuple[str, ...]] = (f"{GATEWAY_API_GROUP}/v1beta1",)

    metadata: ObjectMeta
    spec: ReferenceGrantSpec

    def permits(self, group: str, kind: str, namespace: str, to: tuple[str, str, str]) -> bool:
        """Whether a `kind` of `group` in `namespace` may refer to `to` (group, kind, name),
        an object in this grant's namespace."""
        return any(
            f.group == group and f.kind == kind and f.namespace == namespace
            for f in self.spec.from_
        ) and any(
            t.group == to[0] and t.kind == to[1] and t.name in (None, to[2]) for t in self.spec.to
        )


# --- BackendTLSPolicy ---------------------------------------------------------------------------

PRECISE_HOSTNAME_PATTERN = rf"^{_SUBDOMAIN}$"
ABSOLUTE_URI_PATTERN = r"^(([^:/?#]+):)(//([^/?#]*))([^?#]*)(\?([^#]*))?(#(.*))?"
WELL_KNOWN_CA_PATTERN = (
    rf"^(System|({_SUBDOMAIN}/([A-Za-z0-9][-A-Za-z0-9_.]{{0,61}})?[A-Za-z0-9]))$"
)
OPTION_KEY_PATTERN = rf"^({_SUBDOMAIN}/)?([A-Za-z0-9][-A-Za-z0-9_.]{{0,61}})?[A-Za-z0-9]$"

PreciseHostname = Annotated[
    str, Field(min_length=1, max_length=253, pattern=PRECISE_HOSTNAME_PATTERN)
]


class PolicyTargetRef(StrictModel):
    """A policy's target in its own namespace (LocalPolicyTargetReferenceWithSectionName)."""

    group: Group
    kind: Kind
    name: ObjectName
    sectionName: SectionName | None = None


class CACertificateRef(StrictModel):
    """A ConfigMap or Secret of the policy's namespace holding a PEM bundle in `ca.crt`."""

    group: Group
    kind: Kind
    name: ObjectName


class SubjectAltName(StrictModel):
    """A name the backend's certificate must carry, in place of `hostname`."""

    type: Literal["Hostname", "URI"]
    hostname: Hostname | None = None
    uri: (
        Annotated[str, Field(min_length=1, max_length=253, pattern=ABSOLUTE_URI_PATTERN)] | None
    ) = None

    @model_validator(mode="after")
    def _one_value(self) -> "SubjectAltName":
        # the CRD's four CEL rules, with its messages
        problems = []
        if self.type == "Hostname" and not self.hostname:
            problems.append(
                "SubjectAltName element must contain Hostname, if Type is set to Hostname"
            )
        if self.type != "Hostname" and self.hostname:
            problems.append(
                "SubjectAltName element must not contain Hostname, if Type is not set to Hostname"
            )
        if self.type == "URI" and not self.uri:
            problems.append("SubjectAltName element must contain URI, if Type is set to URI")
        if self.type != "URI" and self.uri:
            problems.append(
                "SubjectAltName element must not contain URI, if Type is not set to URI"
            )
        raise_issues("SubjectAltName", [issue((), m) for m in problems])
        return self


class BackendTLSValidation(StrictModel):
    """How the backend's certificate is checked: against the CAs of `caCertificateRefs` or
    the system's (`wellKnownCACertificates: System`), for the name `hostname` (also sent as
    SNI), or for one of `subjectAltNames` when given."""

    caCertificateRefs: Annotated[list[CACertificateRef], Field(max_length=8)] = Field(
        default_factory=list
    )
    wellKnownCACertificates: (
        Annotated[str, Field(min_length=1, max_length=253, pattern=WELL_KNOWN_CA_PATTERN)] | None
    ) = None
    hostname: PreciseHostname
    subjectAltNames: Annotated[list[SubjectAltName], Field(max_length=5)] = Field(
        default_factory=list
    )

    @model_validator(mode="after")
    def _one_source(self) -> "BackendTLSValidation":
        if self.caCertificateRefs and self.wellKnownCACertificates:
            message = "must not contain both CACertificateRefs and WellKnownCACertificates"
        elif not self.caCertificateRefs and not self.wellKnownCACertificates:
            message = "must specify either CACertificateRefs or WellKnownCACertificates"
        else:
            return self
        raise_issues("BackendTLSValidation", [issue((), message)])
        return self


class BackendTLSPolicySpec(StrictModel):
    targetRefs: Annotated[list[PolicyTargetRef], Field(min_length=1, max_length=16)]
    validation: BackendTLSValidation
    options: Annotated[dict[str, Annotated[str, Field(max_length=4096)]], Field(max_length=16)] = (
        Field(default_factory=dict)
    )

    @field_validator("targetRefs")
    @classmethod
    def _distinct_targets(cls, refs: list[PolicyTargetRef]) -> list[PolicyTargetRef]:
        # the CRD's two rules on targetRefs, with its messages
        problems = []
        same = [
            (a, b)
            for i, a in enumerate(refs)
            for b in refs[i + 1 :]
            if (a.group, a.kind, a.name) == (b.group, b.kind, b.name)
        ]
        if any(bool(a.sectionName) != bool(b.sectionName) for a, b in same):
            problems.append(
                "sectionName must be specified when targetRefs includes 2 or more references "
                "to the same target"
            )
        if any(a.sectionName == b.sectionName for a, b in same):
            problems.append(
                "sectionName must be unique when targetRefs includes 2 or more references to "
                "the same target"
            )
        raise_issues("targetRefs", [issue((), m) for m in problems])
        return refs

    @field_validator("options")
    @classmethod
    def _option_keys(cls, options: dict[str, str]) -> dict[str, str]:
        raise_issues(
            "options",
            [
                issue((key,), f"{key!r} is not an option name (prefix/name)")
                for key in options
                if len(key) > 253 or not re.fullmatch(OPTION_KEY_PATTERN, key)
            ],
        )
        return options


class BackendTLSPolicy(Resource):
    """How the gateway speaks TLS to the Services it targets: the CAs that sign their
    certificates and the name those certificates carry (docs/backend-tls.md)."""

    KIND: ClassVar[str] = "BackendTLSPolicy"
    API_VERSIONS: ClassVar[tuple[str, ...]] = (
        f"{GATEWAY_API_GROUP}/v1",
        f"{GATEWAY_API_GROUP}/v1alpha3",
    )

    metadata: ObjectMeta
    spec: BackendTLSPolicySpec
    status: dict[str, Any] | None = None


# --- HTTPRoute ----------------------------------------------------------------------------------


class ParentReference(StrictModel):
    """The Gateway (listener) a route attaches to; `namespace` defaults to the route's."""

    group: Group = GATEWAY_API_GROUP
    kind: Kind = "Gateway"
    namespace: NamespaceName | None = None
    name: ObjectName
    sectionName: SectionName | None = None
    port: PortNumber | None = None


_PATH_CHARS_RE = re.compile(r"^(?:[-A-Za-z0-9/._~!$&'()*+,;=:@]|[%][0-9a-fA-F]{2})+$")
_PATH_FORBIDDEN = ("//", "/./", "/../", "%2f", "%2F", "#")


class HTTPPathMatch(StrictModel):
    """Path match; default `PathPrefix` `/`. Regexes are Python `re` (what we evaluate with)."""

    type: Literal["Exact", "PathPrefix", "RegularExpression"] = "PathPrefix"
    value: Annotated[str, Field(max_length=1024)] = "/"

    @model_validator(mode="after")
    def _path_rules(self) -> "HTTPPathMatch":
        # The HTTPRoute CRD's CEL rules on path, with its messages.
        problems: list[InitErrorDetails] = []
        if self.type == "RegularExpression":
            if (p := _regex_problem(self.value)) is not None:
                problems.append(issue(("value",), p, self.value))
        else:
            when = "when type one of ['Exact', 'PathPrefix']"
            v = self.value
            if not v.startswith("/"):
                problems.append(
                    issue(
                        ("value",), f"value must be an absolute path and start with '/' {when}", v
                    )
                )
            problems += [
                issue(("value",), f"must not contain '{bad}' {when}", v)
                for bad in _PATH_FORBIDDEN
                if bad in v
            ]
            problems += [
                issue(("value",), f"must not end with '{end}' {when}", v)
                for end in ("/..", "/.")
                if v.endswith(end)
            ]
            if not _PATH_CHARS_RE.match(v):
                problems.append(
                    issue(
                        ("value",),
                        "must only contain valid characters (matching "
                        f"{_PATH_CHARS_RE.pattern}) for types ['Exact', 'PathPrefix']",
                        v,
                    )
                )
        raise_issues("path", problems)
        return self


class HTTPHeaderMatch(StrictModel):
    """Header match (names compare case-insensitively when matching requests)."""

    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: HeaderName
    value: Annotated[str, Field(min_length=1, max_length=4096)]

    @model_validator(mode="after")
    def _regex_compiles(self) -> "HTTPHeaderMatch":
        if self.type == "RegularExpression" and (p := _regex_problem(self.value)) is not None:
            raise_issues("headers", [issue(("value",), p, self.value)])
        return self


class HTTPQueryParamMatch(StrictModel):
    """Query parameter match."""

    type: Literal["Exact", "RegularExpression"] = "Exact"
    name: HeaderName
    value: Annotated[str, Field(min_length=1, max_length=1024)]

    @model_validator(mode="after")
    def _regex_compiles(self) -> "HTTPQueryParamMatch":
        if self.type == "RegularExpression" and (p := _regex_problem(self.value)) is not None:
            raise_issues("queryParams", [issue(("value",), p, self.value)])
        return self


class HTTPRouteMatch(StrictModel):
    """One match: all of path, headers, query parameters and method must match."""

    path: HTTPPathMatch = Field(default_factory=HTTPPathMatch)
    headers: Annotated[list[HTTPHeaderMatch], Field(max_length=16)] = Field(default_factory=list)
    queryParams: Annotated[list[HTTPQueryParamMatch], Field(max_length=16)] = Field(
        default_factory=list
    )
    method: HTTPMethod | None = None

    @field_validator("headers", "queryParams")
    @classmethod
    def _names_unique(cls, entries: list[Any]) -> list[Any]:
        # Both lists are list-type=map keyed by name in the CRD: one entry per name.
        raise_issues(
            "match",
            [issue((), f'duplicate entry for name "{n}"') for n in unique(e.name for e in entries)],
        )
        return entries


class BackendRef(StrictModel):
    """Where a rule forwards to; `namespace` defaults to the route's after loading."""

    group: Group = ""
    kind: Kind = "Service"
    name: ObjectName
    namespace: NamespaceName | None = None
    port: PortNumber | None = None
    weight: Annotated[int, Field(ge=0, le=1_000_000)] = 1
    filters: list[dict[str, Any]] = Field(default_factory=list)

    @model_validator(mode="after")
    def _service_port(self) -> "BackendRef":
        if self.group == "" and self.kind == "Service" and self.port is None:
            raise_issues("backendRef", [issue((), "Must have port for Service reference")])
        return self


class HTTPRouteTimeouts(StrictModel):
    """Gateway API durations; `parse_window` converts them."""

    request: Duration | None = None
    backendRequest: Duration | None = None

    @model_validator(mode="after")
    def _backend_within_request(self) -> "HTTPRouteTimeouts":
        if (
            self.request is not None
            and self.backendRequest is not None
            and parse_window(self.request) != 0
            and parse_window(self.backendRequest) > parse_window(self.request)
        ):
            raise_issues(
                "timeouts",
                [issue((), "backendRequest timeout cannot be longer than request timeout")],
            )
        return self


def _default_matches() -> list[HTTPRouteMatch]:
    return [HTTPRouteMatch()]


class HTTPRouteRule(StrictModel):
    """A rule; without matches it matches every path (`PathPrefix` `/`)."""

    name: SectionName | None = None
    matches: Annotated[list[HTTPRouteMatch], Field(max_length=64)] = Field(
        default_factory=_default_matches
    )
    filters: Annotated[list[dict[str, Any]], Field(max_length=16)] = Field(default_factory=list)
    backendRefs: Annotated[list[BackendRef], Field(max_length=16)] = Field(default_factory=list)
    timeouts: HTTPRouteTimeouts | None = None
    retry: dict[str, Any] | None = None
    sessionPersistence: dict[str, Any] | None = None

    @field_validator("matches")
    @classmethod
    def _empty_matches_match_all(cls, matches: list[HTTPRouteMatch]) -> list[HTTPRouteMatch]:
        return matches or _default_matches()


def _default_rules() -> list[HTTPRouteRule]:
    return [HTTPRouteRule()]


def _same_parent(p: ParentReference) -> tuple[str, str, str, str]:
    return (p.group, p.kind, p.name, p.namespace or "")


class HTTPRouteSpec(StrictModel):
    """HTTPRoute spec."""

    parentRefs: Annotated[list[ParentReference], Field(max_length=32)] = Field(default_factory=list)
    hostnames: Annotated[list[Hostname], Field(max_length=16)] = Field(default_factory=list)
    rules: Annotated[list[HTTPRouteRule], Field(min_length=1, max_length=16)] = Field(
        default_factory=_default_rules
    )
    useDefaultGateways: str | None = None

    @field_validator("parentRefs")
    @classmethod
    def _parent_rules(cls, refs: list[ParentReference]) -> list[ParentReference]:
        # The HTTPRoute CRD's two CEL rules on parentRefs, with its messages.
        problems: list[InitErrorDetails] = []
        with_section = {_same_parent(p) for p in refs if p.sectionName}
        without_section = {_same_parent(p) for p in refs if not p.sectionName}
        if with_section & without_section:
            problems.append(
                issue(
                    (),
                    "sectionName must be specified when parentRefs includes 2 or more "
                    "references to the same parent",
                )
            )
        if unique((*_same_parent(p), p.sectionName or "") for p in refs):
            problems.append(
                issue(
                    (),
                    "sectionName must be unique when parentRefs includes 2 or more references "
                    "to the same parent",
                )
            )
        raise_issues("parentRefs", problems)
        return refs

    @field_validator("rules")
    @classmethod
    def _rule_rules(cls, rules: list[HTTPRouteRule]) -> list[HTTPRouteRule]:
        problems: list[InitErrorDetails] = []
        if sum(len(r.matches) for r in rules) > 128:
            problems.append(
                issue(
                    (),
                    "While 16 rules and 64 matches per rule are allowed, the total number of "
                    "matches across all rules in a route must be less than 128",
                )
            )
        # Not a CEL rule, but the field's contract ("MUST be unique within a Route"), and
        # policies target rules by this name through sectionName.
        problems += [
            issue((), f'rule name "{n}" must be unique within the route')
            for n in unique(r.name for r in rules if r.name)
        ]
        raise_issues("rules", problems)
        return rules


class HTTPRoute(Resource):
    """An HTTPRoute. After loading, every parentRef and backendRef has its namespace set."""

    KIND: ClassVar[str] = "HTTPRoute"
    API_VERSIONS: ClassVar[tuple[str, ...]] = GATEWAY_API_VERSIONS

    metadata: ObjectMeta
    spec: HTTPRouteSpec
    status: dict[str, Any] | None = None

    @model_validator(mode="after")
    def _default_namespaces(self) -> "HTTPRoute":
        ns = self.metadata.namespace
        for ref in self.spec.parentRefs:
            if ref.namespace is None:
                ref.namespace = ns
        for rule in self.spec.rules:
            for backend in rule.backendRefs:
                if backend.namespace is None:
                    backend.namespace = ns
        return self
