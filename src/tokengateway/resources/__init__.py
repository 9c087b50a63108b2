"""Kuadrant / Gateway API / Kubernetes manifests, loaded unchanged and validated.

    docs = load_paths(["examples/tutorial"])          # files, folders, "-" for stdin
    resources = parse_resources(docs)                 # typed models, or one ManifestError

Model attributes are the manifest keys (`policy.spec.targetRef.name`); the only renamed key is
`allowedRoutes.namespaces.from`, which is `from_` in Python.
"""

from .common import (
    DURATION_PATTERN,
    WINDOW_PATTERN,
    LabelSelector,
    LabelSelectorRequirement,
    ObjectMeta,
    Predicate,
    parse_window,
)
from .coordination import Lease
from .core import (
    ConfigMap,
    Container,
    Deployment,
    Namespace,
    Secret,
    Service,
    ServicePort,
)
from .errors import ManifestError, ManifestIssue
from .gateway_api import (
    GATEWAY_API_GROUP,
    BackendRef,
    BackendTLSPolicy,
    Gateway,
    GatewayClass,
    HTTPHeaderMatch,
    HTTPPathMatch,
    HTTPQueryParamMatch,
    HTTPRoute,
    HTTPRouteMatch,
    HTTPRouteRule,
    Listener,
    ParentReference,
    ReferenceGrant,
)
from .kuadrant import (
    AuthenticationRule,
    AuthorizationRule,
    AuthPolicy,
    AuthRules,
    Counter,
    Kuadrant,
    Limit,
    MergeableAuthRules,
    MergeableLimits,
    PatternExpressionOrRef,
    PolicyTargetReference,
    Rate,
    RateLimitPolicy,
    SuccessResponseSpec,
    TokenRateLimitPolicy,
    ValueOrSelector,
)
from .loader import Document, load_paths
from .parse import MODEL_BY_KIND, SUPPORTED_KINDS, parse_resources
from .resource import Resource

__all__ = [
    "DURATION_PATTERN",
    "GATEWAY_API_GROUP",
    "MODEL_BY_KIND",
    "SUPPORTED_KINDS",
    "WINDOW_PATTERN",
    "AuthPolicy",
    "AuthRules",
    "AuthenticationRule",
    "AuthorizationRule",
    "BackendRef",
    "BackendTLSPolicy",
    "ConfigMap",
    "Container",
    "Counter",
    "Deployment",
    "Document",
    "Gateway",
    "GatewayClass",
    "HTTPHeaderMatch",
    "HTTPPathMatch",
    "HTTPQueryParamMatch",
    "HTTPRoute",
    "HTTPRouteMatch",
    "HTTPRouteRule",
    "Kuadrant",
    "LabelSelector",
    "LabelSelectorRequirement",
    "Lease",
    "Limit",
    "Listener",
    "ManifestError",
    "ManifestIssue",
    "MergeableAuthRules",
    "MergeableLimits",
    "Namespace",
    "ObjectMeta",
    "ParentReference",
    "PatternExpressionOrRef",
    "PolicyTargetReference",
    "Predicate",
    "Rate",
    "RateLimitPolicy",
    "ReferenceGrant",
    "Resource",
    "Secret",
    "Service",
    "ServicePort",
    "SuccessResponseSpec",
    "TokenRateLimitPolicy",
    "ValueOrSelector",
    "load_paths",
    "parse_resources",
    "parse_window",
]
