"""Compile loaded resources into what the data path looks up: routes, auth, limits, backends.

Everything per configuration happens here, once: route matchers, CEL, Rego and the API key
index, and each route rule's effective policies. The result is immutable and swapped whole.

Effective policies follow Kuadrant (kuadrant-operator `api/v1/merge_strategies.go`): for each
path Gateway -> listener -> HTTPRoute -> rule, the accepted policies of one kind that target
those objects are listed from the least to the most specific (Gateway, listener by
`sectionName`, HTTPRoute, rule by `sectionName`; on one object, oldest first, then
`namespace/name`), and folded from the most specific one: each less specific policy is merged
into the result with *its own* strategy:

- atomic defaults: the result stays unless it has no rules, then it is that policy;
- atomic overrides: the result becomes that policy;
- merge defaults: the result keeps its rules and gains that policy's rules of other names;
- merge overrides: that policy's rules replace the result's rules of the same name.

So among several policies on one object, the newest wins with (atomic) defaults and the
oldest with overrides: Kuadrant folds them as if the newer were the more specific.

Rules are named: a limit by its name, an AuthPolicy rule by `section#name`
(`authentication#api-key-users`, `response.success.filters#identity`, ...), and the
top-level `when` (and AuthPolicy `patterns`) are rules too, so the `when` in force is the one
of the winning policy, never a concatenation. Every rule remembers the policy it came from:
counters and messages name that policy.

A policy that fails to compile never takes the gateway down. A limit that does not compile
is left out (as Kuadrant leaves out the invalid action), the others keep being enforced. An
AuthPolicy that does not compile makes the route rules it would protect deny every request
(403) rather than let them through unauthenticated. Both are reported in the policy's status
(`Enforced: False`) and in `CompiledConfig.warnings`. With `strict=True` (`validate`, first
start) any such problem raises ConfigError listing them all.

Without `strict`, ConfigError is never raised for the content of the resources: every problem
is local to one object (a policy, a route's backend or match) and reported in its status.
"""

from __future__ import annotations

import datetime
import random
import re
import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from tokengateway import auth as authlib
from tokengateway.config import status as st
from tokengateway.config.backend_tls import TLSCache, backend_tls
from tokengateway.config.backends import BackendPlan
from tokengateway.config.routing import (
    HeaderMatch,
    PathMatch,
    RouteMatch,
    Router,
    intersect_hostnames,
)
from tokengateway.expr import cel
from tokengateway.http.client import DEFAULT_TIMEOUTS, Origin, Timeouts, UpstreamTLS
from tokengateway.http.tls import (
    CertificateError,
    CertificateInfo,
    SniContexts,
    ask_client_certificate,
    pem_context,
)
from tokengateway.limits import Limit, LimitCompileError, compile_limits, parse_window
from tokengateway.resources import (
    GATEWAY_API_GROUP,
    AuthPolicy,
    BackendRef,
    Gateway,
    HTTPHeaderMatch,
    HTTPQueryParamMatch,
    HTTPRoute,
    HTTPRouteMatch,
    HTTPRouteRule,
    Kuadrant,
    LabelSelector,
    Listener,
    Namespace,
    ParentReference,
    RateLimitPolicy,
    ReferenceGrant,
    Resource,
    Secret,
    Service,
    TokenRateLimitPolicy,
)
from tokengateway.resources.common import K8sModel
from tokengateway.resources.kinds import CONFIG_NEUTRAL
from tokengateway.resources.kuadrant import Mode, Strategy

__all__ = [
    "AUTH_WHEN",
    "LIMITS_WHEN",
    "POLICY_KINDS",
    "CompiledConfig",
    "ConfigError",
    "EffectivePolicy",
    "PolicyRule",
    "RuleTarget",
    "compile_config",
    "needed_services",
]

DEFAULT_SYSTEM_NAMESPACE = "kuadrant-system"
POLICY_KINDS = ("AuthPolicy", "TokenRateLimitPolicy", "RateLimitPolicy")
_PolicyResource = AuthPolicy | TokenRateLimitPolicy | RateLimitPolicy
_R = TypeVar("_R", bound=Resource)

#: The rule name of a (Token)RateLimitPolicy's top-level `when` (Kuadrant's own key).
LIMITS_WHEN = "###_TOP_LEVEL_PREDICATES_###"
#: The rule name of an AuthPolicy's top-level `when` (Kuadrant's own key).
AUTH_WHEN = "conditions#"
_AUTH_SECTIONS = ("authentication", "metadata", "authorization", "callbacks")

StatusKey = tuple[str, str, str]  # (kind, namespace, name)
#: A certificate loaded for a listener, by its PEM (cert, key), and what it says of itself.
_Loaded = tuple[ssl.SSLContext, CertificateInfo]
#: One compiled match: RouteMatch's path, method, headers and query params, in that order.
_MatchPieces = tuple[PathMatch, str | None, tuple[HeaderMatch, ...], tuple[HeaderMatch, ...]]


class ConfigError(ValueError):
    """Resources that parse but cannot be put together; one line per problem."""

    def __init__(self, problems: Sequence[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = list(problems)


#: Service annotations setting the upstream timeouts of that backend (Gateway API durations;
#: `0s` waits forever): connecting, the answer's first byte, silence between body chunks
TIMEOUT_ANNOTATIONS = {
    "connect": "tokengateway.io/connect-timeout",
    "first_byte": "tokengateway.io/first-byte-timeout",
    "idle": "tokengateway.io/idle-timeout",
}


#: Service annotation naming a Secret (same namespace) whose `api_key` the gateway sends the
#: backend as `Authorization: Bearer <key>`, in place of anything the client sent
UPSTREAM_KEY_ANNOTATION = "tokengateway.io/upstream-api-key-secret"
#: Service annotation "true": pass the client's credential on even when an AuthPolicy used it
FORWARD_CREDENTIALS_ANNOTATION = "tokengateway.io/forward-client-credentials"


@dataclass(frozen=True, slots=True)
class Backend:
    url: str
    weight: int
    timeouts: Timeouts = DEFAULT_TIMEOUTS
    #: the Authorization value for the backend's own key (never shown in a repr)
    authorization: str | None = field(default=None, repr=False)
    forward_credentials: bool = False
    #: verified TLS to it, from a BackendTLSPolicy (whatever the URL's scheme)
    tls: UpstreamTLS | None = field(default=None, compare=False)
    #: `url` parsed once, for every request sent to it (ValueError for a URL it cannot be)
    origin: Origin = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "origin", Origin(self.url, self.tls))


@dataclass(frozen=True, slots=True)
class PolicyRule:
    """One named rule of a policy: a limit, an auth rule, a top-level `when`, a pattern."""

    key: str
    #: the rule as a document, as the limit and auth compilers take it (see `_document`)
    spec: Any
    source: str  # the policy it comes from, "namespace/name"


@dataclass(frozen=True)
class EffectivePolicy:
    """The rules of one policy kind in force on one path (Gateway listener, route rule)."""

    kind: str
    rules: Mapping[str, PolicyRule]
    #: the policies in the path, least specific first ("namespace/name")
    policies: tuple[str, ...] = ()

    @property
    def sources(self) -> tuple[str, ...]:
        """The policies that contributed at least one rule, sorted (as Kuadrant lists them)."""
        return tuple(sorted({r.source for r in self.rules.values()}))

    @property
    def when(self) -> list[Any]:
        """The top-level `when` in force (the winning policy's), or []."""
        rule = self.rules.get(AUTH_WHEN if self.kind == "AuthPolicy" else LIMITS_WHEN)
        return list(rule.spec) if rule is not None else []

    def limits(self) -> dict[str, PolicyRule]:
        """name -> limit (its `spec`, and the `source` policy it comes from)."""
        return {k: r for k, r in self.rules.items() if k != LIMITS_WHEN}

    def auth_rules(self) -> dict[str, Any]:
        """The merged AuthPolicy `rules`, shaped like the manifest's."""
        return _auth_document(self.rules)[0]

    def patterns(self) -> dict[str, Any]:
        """The merged AuthPolicy `patterns` (name -> {allOf: [...]})."""
        return _auth_document(self.rules)[2]


@dataclass(slots=True)
class RuleTarget:
    """One HTTPRoute rule, reached through one Gateway listener, as the data path needs it."""

    route: str  # "namespace/name"; also the counters' namespace, as in Kuadrant
    rule: str  # the rule's sectionName: its `name`, else `rule-<1-based index>` (Kuadrant's)
    backends: tuple[Backend, ...]
    timeout: float | None
    auth: authlib.AuthEngine | None = None
    auth_policy: str | None = None  # the AuthPolicies in force, "ns/name[, ns/name]"
    limits: tuple[Limit, ...] = ()
    limit_policies: tuple[str, ...] = ()  # "TokenRateLimitPolicy ns/name", one per source
    gateway: str = ""  # "namespace/name"
    listener: str = ""  # listener name
    effective: dict[str, EffectivePolicy] = field(default_factory=dict)  # kind -> policy

    def pick_backend(self) -> Backend:
        if len(self.backends) == 1:
            return self.backends[0]
        weights = [b.weight for b in self.backends]
        return random.choices(self.backends, weights)[0]


@dataclass
class CompiledConfig:
    router: Router
    resources: list[Resource]
    warnings: list[str] = field(default_factory=list)
    rules: list[RuleTarget] = field(default_factory=list)
    system_namespace: str = DEFAULT_SYSTEM_NAMESPACE
    #: (kind, namespace, name) -> status, for policies, Gateways and HTTPRoutes
    statuses: dict[StatusKey, st.Status] = field(default_factory=dict)
    #: limits with a `reservation` reserve (the Kuadrant CR's tokenRateLimiting.mode is
    #: Reservation, its default); False for mode CheckReport
    reservations: bool = True
    #: the routes of HTTPS listeners, for requests that came over TLS (`router`: HTTP ones)
    https_router: Router = field(default_factory=lambda: Router([]))
    #: the certificates of the HTTPS listeners served, by SNI name (docs/tls.md)
    certificates: SniContexts = field(default_factory=SniContexts)
    #: "namespace/name#listener" of every HTTPS listener, served or not
    https_listeners: list[str] = field(default_factory=list)
    #: loaded TLS contexts by what they were made from (see `_Build._load`, `_Build._served`),
    #: reused by the next configuration while their PEM is the same
    certificate_cache: dict[tuple[Any, ...], _Loaded] = field(default_factory=dict, repr=False)
    #: the upstream TLS of BackendTLSPolicies by PEM and names, reused likewise
    tls_cache: TLSCache = field(default_factory=dict, repr=False)
    #: the key sets of the `jwt` rules, by (issuerUrl, jwksUrl, ttl, timeout): the gateway
    #: fetches and refreshes them; the next configuration reuses them, keys and all
    key_sets: dict[tuple[Any, ...], authlib.KeySet] = field(default_factory=dict, repr=False)


def _key(res: Resource) -> str:
    return f"{res.metadata.namespace}/{res.metadata.name}"


def _age(res: Resource) -> tuple[str, str]:
    """Kuadrant's (and Gateway API's) precedence: oldest first, then `namespace/name`."""
    return (str(res.metadata.creationTimestamp or ""), _key(res))


def _namespace(res: Resource) -> str:
    """The namespace of a namespaced object (never None once validated: default "default")."""
    return res.metadata.namespace or ""


def _of(resources: Sequence[Resource], cls: type[_R]) -> list[_R]:
    """The resources of one kind, in the given order."""
    return [res for res in resources if isinstance(res, cls)]


def _generation(res: Resource) -> int:
    return int(res.metadata.generation or 1)


def _is_service(ref: BackendRef) -> bool:
    """Whether a backendRef names a core Service (group "" or "core"), the only kind served."""
    return ref.kind == "Service" and ref.group in ("", "core")


def _backend_key(route: HTTPRoute, ref: BackendRef) -> str:
    """The Service a backendRef names, "namespace/name" (the route's namespace by default)."""
    return f"{ref.namespace or route.metadata.namespace}/{ref.name}"


def needed_services(resources: Sequence[Resource]) -> set[str]:
    """Services named by HTTPRoute backendRefs, as "namespace/name"."""
    return {
        _backend_key(route, ref)
        for route in resources
        if isinstance(route, HTTPRoute)
        for rule in route.spec.rules
        for ref in rule.backendRefs
        if _is_service(ref)
    }


def _duration(text: str | None) -> float | None:
    """Gateway API durations (`10s`, `1m30s`, `500ms`); `0s` means no timeout."""
    if not text:
        return None
    seconds = parse_window(text) if text not in ("0s", "0") else 0.0
    return seconds or None


def _section_names(route: HTTPRoute) -> list[str]:
    """The sectionName of each rule: its `name`, else `rule-N` (policy-machinery's)."""
    return [rule.name or f"rule-{i + 1}" for i, rule in enumerate(route.spec.rules)]


def _written_parent_refs(route: HTTPRoute) -> list[dict[str, Any]]:
    """The route's parentRefs exactly as written, one per `route.spec.parentRefs` entry.

    Only for status: a route's `status.parents[].parentRef` repeats the spec's parentRef as
    the user wrote it (the model fills in the namespace, which the status must not show).
    """
    return [dict(ref) for ref in route.raw["spec"].get("parentRefs") or ()]


# --- policies as named rules --------------------------------------------------------------------


@dataclass
class _Policy:
    kind: str
    key: str  # "namespace/name"
    mode: Mode
    strategy: Strategy
    rules: dict[str, PolicyRule]
    target: tuple[str, str, str | None]  # (kind, "namespace/name", sectionName)
    facts: st.PolicyFacts


def _document(rule: K8sModel | Mapping[str, Any]) -> dict[str, Any]:
    """A validated rule as the document the limit and auth compilers take.

    Those compilers sit beside `resources` in the layer below and may not import it, so they
    take manifest-shaped documents. The document holds what the manifest set (no defaults
    added, null values left out as "not set"), in the model's normal forms: `counting:
    prompt` becomes `{prompt: 1}`, `counting: total` (the default) goes. Evaluators the
    gateway does not model (jwt, metadata, callbacks, ...) are plain mappings already and pass
    through untouched, nulls inside them included.
    """
    if isinstance(rule, K8sModel):
        return rule.model_dump(by_alias=True, exclude_unset=True, exclude_none=True)
    return dict(rule)


def _rules_of(res: _PolicyResource) -> dict[str, PolicyRule]:
    """A policy's rules in force (Kuadrant's `Proper()`: its `defaults`, its `overrides`, or
    its spec itself), each under its name."""
    source = _key(res)
    rules: dict[str, PolicyRule] = {}

    def add(key: str, spec: Any) -> None:
        rules[key] = PolicyRule(key, spec, source)

    if not isinstance(res, AuthPolicy):
        limits = res.spec.proper()
        if limits.when:
            add(LIMITS_WHEN, [_document(p) for p in limits.when])
        for name, limit in limits.limits.items():
            add(name, _document(limit))
        return rules
    proper = res.spec.proper()
    for name, pattern in proper.patterns.items():
        add(f"patterns#{name}", _document(pattern))
    if proper.when:
        add(AUTH_WHEN, [_document(p) for p in proper.when])
    scheme = proper.rules
    sections: dict[str, Mapping[str, K8sModel | Mapping[str, Any]]] = {
        "authentication": scheme.authentication,
        "metadata": scheme.metadata,
        "authorization": scheme.authorization,
        "callbacks": scheme.callbacks,
    }
    for section in _AUTH_SECTIONS:
        for name, spec in sections[section].items():
            add(f"{section}#{name}", _document(spec))
    response = scheme.response
    for deny, denial in (
        ("unauthenticated", response.unauthenticated),
        ("unauthorized", response.unauthorized),
    ):
        if denial is not None:
            add(f"response.{deny}#", _document(denial))
    success = response.success
    for section, entries in (("headers", success.headers), ("filters", success.filters)):
        for name, item in entries.items():
            add(f"response.success.{section}#{name}", _document(item))
    return rules


def _empty(kind: str, rules: Mapping[str, PolicyRule]) -> bool:
    """Kuadrant's `Empty()`: no limit / no auth rule (a `when` or patterns alone do not count)."""
    if kind == "AuthPolicy":
        return not any(k != AUTH_WHEN and not k.startswith("patterns#") for k in rules)
    return not any(k != LIMITS_WHEN for k in rules)


def _merge(kind: str, path: Sequence[_Policy]) -> dict[str, PolicyRule] | None:
    """Kuadrant's EffectivePolicyForPath over policies sorted least to most specific."""
    if not path:
        return None
    effective = dict(path[-1].rules)
    for policy in reversed(path[:-1]):
        if policy.mode == "overrides":
            if policy.strategy == "merge":
                effective = {**effective, **policy.rules}
            else:
                effective = dict(policy.rules)
        elif policy.strategy == "merge":
            effective = {**policy.rules, **effective}
        elif _empty(kind, effective):
            effective = dict(policy.rules)
    return effective


def _auth_document(
    rules: Mapping[str, PolicyRule],
) -> tuple[dict[str, Any], list[Any], dict[str, Any]]:
    """(rules, when, patterns) of an AuthPolicy rebuilt from its named rules."""
    scheme: dict[str, Any] = {}
    when: list[Any] = []
    patterns: dict[str, Any] = {}
    for key, rule in rules.items():
        group, _, name = key.partition("#")
        if group == "patterns":
            patterns[name] = rule.spec
        elif group == "conditions":
            when = list(rule.spec)
        elif group in _AUTH_SECTIONS:
            scheme.setdefault(group, {})[name] = rule.spec
        elif group in ("response.unauthenticated", "response.unauthorized"):
            scheme.setdefault("response", {})[group.split(".")[1]] = rule.spec
        elif group.startswith("response.success."):
            success = scheme.setdefault("response", {}).setdefault("success", {})
            success.setdefault(group.rsplit(".", 1)[1], {})[name] = rule.spec
    return scheme, when, patterns


def _pattern_lists(patterns: Mapping[str, Any]) -> dict[str, Any]:
    """`spec.patterns` ({name: {allOf: [...]}}) as the auth engine takes them."""
    return {
        name: (spec.get("allOf") or []) if isinstance(spec, Mapping) else spec
        for name, spec in patterns.items()
    }


def _is_cel(exc: BaseException) -> bool:
    """Whether a compile error comes from CEL (re-raised with `from None`: look at the
    context chain, which `from None` keeps)."""
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, cel.CelCompileError):
            return True
        seen = seen.__context__
    return False


def _strip(message: str, prefix: str) -> str:
    return message[len(prefix) :] if message.startswith(prefix) else message


# --- compiling the effective policies ------------------------------------------------------------


class _Compiler:
    """Compiles effective policies once each (shared by every path with the same rules) and
    records what failed against the policy it comes from."""

    def __init__(
        self,
        policies: Mapping[str, _Policy],
        secrets: Sequence[authlib.SecretRecord],
        system_ns: str,
        old_key_sets: Mapping[tuple[Any, ...], authlib.KeySet] | None = None,
    ) -> None:
        self.policies = policies  # "Kind ns/name" -> policy
        self.secrets = secrets
        self.system_ns = system_ns
        self.old_key_sets = old_key_sets or {}
        self.key_sets: dict[tuple[Any, ...], authlib.KeySet] = {}
        self.problems: list[str] = []
        self._auth: dict[Any, authlib.AuthEngine] = {}
        self._when: dict[Any, bool] = {}
        self._limits: dict[Any, Limit | None] = {}
        self.compiled: set[str] = set()  # "Kind ns/name" compiled at least once

    def _report(self, kind: str, source: str, full: str, cel_issue: bool) -> None:
        if full not in self.problems:
            self.problems.append(full)
        policy = self.policies.get(f"{kind} {source}")
        if policy is not None:
            policy.facts.add_issue(_strip(full, f"{kind} {source}: "), cel_issue)

    # limits

    def limits(self, kind: str, effective: EffectivePolicy) -> list[Limit]:
        when_rule = effective.rules.get(LIMITS_WHEN)
        when_source = when_rule.source if when_rule is not None else None
        when = when_rule.spec if when_rule is not None else None
        for source in effective.sources:
            self.compiled.add(f"{kind} {source}")
        if when_rule is not None and not self._when_ok(kind, when_rule):
            # every limit carries the top-level predicates: none can be enforced
            for rule in effective.limits().values():
                if rule.source != when_rule.source:
                    self._report(
                        kind,
                        rule.source,
                        f"{kind} {rule.source}: limit {rule.key!r}: the top-level `when` in "
                        f"force, from {when_rule.source}, does not compile",
                        True,
                    )
            return []
        out = []
        for name, rule in effective.limits().items():
            key = (kind, rule.source, name, when_source)
            if key not in self._limits:
                self._limits[key] = self._limit(kind, rule, when)
            limit = self._limits[key]
            if limit is not None:
                out.append(limit)
        return out

    def _when_ok(self, kind: str, rule: PolicyRule) -> bool:
        key = (kind, rule.source)
        if key not in self._when:
            try:
                compile_limits(kind, rule.source, {}, rule.spec)
                self._when[key] = True
            except Exception as exc:  # a bad policy must not stop the others
                self._report(kind, rule.source, str(exc), _is_cel(exc))
                self._when[key] = False
        return self._when[key]

    def _limit(self, kind: str, rule: PolicyRule, when: Any) -> Limit | None:
        try:
            return compile_limits(kind, rule.source, {rule.key: rule.spec}, when)[0]
        except LimitCompileError as exc:
            self._report(kind, rule.source, str(exc), _is_cel(exc))
        except Exception as exc:  # e.g. a zero window: this limit only
            message = f"{kind} {rule.source}: limit {rule.key!r}: {exc}"
            self._report(kind, rule.source, message, False)
        return None

    # auth

    def auth(self, effective: EffectivePolicy) -> authlib.AuthEngine:
        """The engine, or one that denies every request when the rules do not compile."""
        signature = tuple(sorted((k, r.source) for k, r in effective.rules.items()))
        for source in effective.sources:
            self.compiled.add(f"AuthPolicy {source}")
        if signature not in self._auth:
            self._auth[signature] = self._compile_auth(effective)
        return self._auth[signature]

    def _compile_auth(self, effective: EffectivePolicy) -> authlib.AuthEngine:
        scheme, when, patterns = _auth_document(effective.rules)
        name = ", ".join(effective.sources)
        try:
            engine = authlib.compile_auth(
                name,
                scheme,
                when,
                self.secrets,
                self.system_ns,
                patterns=_pattern_lists(patterns) or None,
                key_sets=self._key_set,
            )
            return engine
        except Exception as exc:  # a bad policy must not stop the others
            culprits = self._auth_culprits(exc, effective)
            for source in culprits:
                if isinstance(exc, authlib.AuthConfigError):
                    detail = f"{exc.rule}: {exc.reason}" if exc.rule else exc.reason
                else:
                    detail = f"does not compile: {exc}"
                self._report("AuthPolicy", source, f"AuthPolicy {source}: {detail}", _is_cel(exc))
            return _deny_all(culprits, self.system_ns)

    def _key_set(
        self, issuer: str | None, jwks: str | None, ttl: float, timeout: float
    ) -> authlib.KeySet:
        """One key set per source and settings, shared by every rule naming it and taken
        over from the previous configuration (with the keys it fetched)."""
        key = (issuer, jwks, ttl, timeout)
        found = self.key_sets.get(key) or self.old_key_sets.get(key)
        if found is None:
            found = authlib.KeySet(issuer, jwks, ttl, timeout)
        self.key_sets[key] = found
        return found

    @staticmethod
    def _auth_culprits(exc: Exception, effective: EffectivePolicy) -> list[str]:
        """The policy whose rule failed, from the error's location (`rules.<section>.<name>`,
        `when[i]`, `patterns.<name>[i]`); all sources when it cannot be told."""
        where = getattr(exc, "rule", "") or ""
        best: tuple[int, str] | None = None
        for key, rule in effective.rules.items():
            group, _, name = key.partition("#")
            if group == "conditions":
                prefix = "when"
            elif group == "patterns":
                prefix = f"patterns.{name}"
            else:
                prefix = f"rules.{group}" + (f".{name}" if name else "")
            hit = where == prefix or where.startswith((prefix + ".", prefix + "["))
            if hit and (best is None or len(prefix) > best[0]):
                best = (len(prefix), rule.source)
        return [best[1]] if best is not None else list(effective.sources)

    # policies not in force anywhere (strict mode only)

    def validate_alone(self, policy: _Policy) -> None:
        """Compile a policy on its own, for `validate`: one that is in force nowhere (no route
        yet, or overridden everywhere) still has to be correct."""
        effective = EffectivePolicy(policy.kind, policy.rules, (policy.key,))
        if policy.kind == "AuthPolicy":
            self.auth(effective)
        else:
            self.limits(policy.kind, effective)


def _deny_all(culprits: Sequence[str], system_ns: str) -> authlib.AuthEngine:
    names = ", ".join(culprits)
    message = f"AuthPolicy {names} cannot be enforced (see its status); access is denied"
    return authlib.compile_auth(
        names,
        {
            "authorization": {
                "policy-not-enforced": {"patternMatching": {"patterns": [{"predicate": "false"}]}}
            },
            "response": {"unauthorized": {"message": {"value": message}}},
        },
        None,
        (),
        system_ns,
    )


# --- the configuration ----------------------------------------------------------------------------


def compile_config(
    resources: Sequence[Resource],
    backends: Mapping[str, BackendPlan | str],
    *,
    strict: bool = False,
    previous: CompiledConfig | None = None,
    https: bool = False,
) -> CompiledConfig:
    """Build the route table with each rule's effective policies, and every object's status.

    `backends` maps "namespace/service" to a URL (or a BackendPlan). With `strict`, any
    problem in a policy or a route raises ConfigError listing them all; without it, nothing
    in the resources raises: problems are reported in `warnings` and `statuses`, and the
    broken piece is left out. `previous` keeps the `lastTransitionTime` of conditions that did
    not change.

    Kinds no configuration reads (`CONFIG_NEUTRAL`: Lease, GatewayClass) are left out,
    of `resources` too. `https` says whether HTTPS listeners are served (`serve
    --listen-https`); their certificates are loaded and checked either way.
    """
    resources = [res for res in resources if res.kind not in CONFIG_NEUTRAL]
    cache = previous.certificate_cache if previous is not None else {}
    upstream_tls = backend_tls(resources, previous.tls_cache if previous is not None else None)
    key_sets = previous.key_sets if previous is not None else {}
    build = _Build(
        resources,
        backends,
        strict,
        https,
        cache,
        upstream_tls=upstream_tls.by_service,
        key_sets=key_sets,
    )
    build.warnings.extend(upstream_tls.warnings)
    for route in build.routes:
        build.route(route)
    compiler = build.compiler
    if strict:
        # every policy's CEL and Rego compile, also where its target is not (yet) in the
        # files: a typo is caught before the target arrives, not when it does
        for policy in build.policies.values():
            if f"{policy.kind} {policy.key}" not in compiler.compiled:
                compiler.validate_alone(policy)
    problems = build.problems + compiler.problems
    if strict and problems:
        raise ConfigError(problems)
    for problem in compiler.problems:
        if problem.startswith("AuthPolicy "):
            build.warnings.append(f"{problem} (the route rules it protects deny every request)")
        else:
            build.warnings.append(f"{problem} (not enforced)")
    sni = build.sni()  # after the routes: their AuthPolicies say whether to ask for certificates
    statuses = build.statuses()
    statuses.update(upstream_tls.statuses)
    st.carry_transition_times(statuses, previous.statuses if previous is not None else None)
    return CompiledConfig(
        Router(build.matches),
        list(resources),
        build.warnings,
        build.targets,
        build.system_ns,
        statuses,
        build.reservations,
        Router(build.https_matches),
        sni,
        build.https_listeners,
        build.certificate_cache,
        upstream_tls.cache,
        compiler.key_sets,
    )


class _Build:
    """The state of one compile_config call, filled route by route."""

    def __init__(
        self,
        resources: Sequence[Resource],
        backends: Mapping[str, BackendPlan | str],
        strict: bool,
        https: bool = False,
        certificates: Mapping[tuple[Any, ...], _Loaded] | None = None,
        upstream_tls: Mapping[str, UpstreamTLS] | None = None,
        key_sets: Mapping[tuple[Any, ...], authlib.KeySet] | None = None,
    ) -> None:
        self.backends = backends
        self.upstream_tls = upstream_tls or {}
        self.strict = strict
        self.https = https
        self.old_certificates = certificates or {}
        self.certificate_cache: dict[tuple[Any, ...], _Loaded] = {}
        self.problems: list[str] = []  # route problems, fatal with strict
        self.warnings: list[str] = []
        self.matches: list[RouteMatch] = []
        self.https_matches: list[RouteMatch] = []
        self.https_listeners: list[str] = []
        #: the HTTPS listeners served: (gateway key, listener name, hostname, certificate
        #: and key pairs); their contexts are made once the routes' policies are known
        self.served_https: list[tuple[str, str, str | None, list[tuple[str, str]]]] = []
        #: whether the HTTPS socket asks clients for a certificate (an x509 AuthPolicy rule)
        self.client_ca = ""
        self.targets: list[RuleTarget] = []
        kuadrants = sorted(_of(resources, Kuadrant), key=_age)
        self.system_ns = _namespace(kuadrants[0]) if kuadrants else DEFAULT_SYSTEM_NAMESPACE
        trl = kuadrants[0].spec.tokenRateLimiting if kuadrants else None
        self.reservations = trl is None or trl.mode == "Reservation"
        if len(kuadrants) > 1:  # Kuadrant itself uses the oldest one
            self.warnings.append(
                f"{len(kuadrants)} Kuadrant resources: the oldest, {_key(kuadrants[0])}, is "
                f"used (API key Secrets are looked up in namespace {self.system_ns})"
            )
        self.namespaces = {n.metadata.name: n.metadata.labels for n in _of(resources, Namespace)}
        secrets = [
            authlib.SecretRecord(
                namespace=_namespace(s),
                name=s.metadata.name,
                labels=dict(s.metadata.labels),
                annotations=dict(s.metadata.annotations),
                data=s.decoded_data(),
                type=s.type or "Opaque",
            )
            for s in _of(resources, Secret)
        ]
        self.gateways = {_key(g): g for g in _of(resources, Gateway)}
        self.services = {_key(s): s for s in _of(resources, Service)}
        self.secret_data = {_key(s): s.decoded_data() for s in _of(resources, Secret)}
        self.routes = sorted(_of(resources, HTTPRoute), key=_age)
        self.routes_by_key = {_key(r): r for r in self.routes}
        self.gateway_facts = {
            key: st.GatewayFacts(
                _namespace(gw),
                gw.metadata.name,
                _generation(gw),
                [st.ListenerFacts(x.name) for x in gw.spec.listeners],
            )
            for key, gw in self.gateways.items()
        }
        self.grants = _of(resources, ReferenceGrant)
        self.tls_secrets = {_key(s): s for s in _of(resources, Secret)}
        #: (gateway key, listener name) of the listeners not served: their routes are
        #: attached (and counted in status) but no request reaches them through it
        self.unserved: set[tuple[str, str]] = set()
        for key, gw in sorted(self.gateways.items(), key=lambda item: _age(item[1])):
            for listener, lf in zip(
                gw.spec.listeners, self.gateway_facts[key].listeners, strict=True
            ):
                self._listener(gw, listener, lf)
        self.route_facts: dict[str, st.RouteFacts] = {}
        self.policies: dict[str, _Policy] = {}  # "Kind ns/name" -> policy
        self.targeted: dict[tuple[str, str, str | None], list[_Policy]] = {}
        policies = [res for res in resources if isinstance(res, _PolicyResource)]
        for kind in POLICY_KINDS:
            for res in sorted((p for p in policies if p.kind == kind), key=_age):
                self._policy(kind, res)
        self.compiler = _Compiler(self.policies, secrets, self.system_ns, key_sets)

    def _policy(self, kind: str, res: _PolicyResource) -> None:
        """Register a policy; it is accepted (and attached) when its target exists."""
        ref = res.spec.targetRef
        mode, strategy = res.spec.mode, res.spec.proper().strategy
        target = (ref.kind, f"{res.metadata.namespace}/{ref.name}")
        section = ref.sectionName
        facts = st.PolicyFacts(kind, _namespace(res), res.metadata.name, _generation(res))
        key = _key(res)
        rules = _rules_of(res)
        policy = _Policy(kind, key, mode, strategy, rules, (*target, section), facts)
        self.policies[f"{kind} {key}"] = policy
        facts.target_problem = self._target_problem(kind, *target, section)
        if facts.target_problem is not None:
            self.warnings.append(
                f"{kind} {key}: {facts.target_problem[1]}; the policy is not enforced"
            )
            return
        self.targeted.setdefault(policy.target, []).append(policy)

    def _target_problem(
        self, kind: str, target_kind: str, target_key: str, section: str | None
    ) -> tuple[str, str] | None:
        name = target_key.split("/", 1)[1]
        if target_kind == "Gateway":
            gateway = self.gateways.get(target_key)
            if gateway is None:
                return st.target_not_found(kind, name, section)
            if section is not None and gateway.spec.listener(section) is None:
                return st.target_not_found(kind, name, section)
            return None
        if target_kind == "HTTPRoute":
            route = self.routes_by_key.get(target_key)
            if route is None or (section is not None and section not in _section_names(route)):
                return st.target_not_found(kind, name, section)
            return None
        return st.target_invalid(
            kind, f"{target_kind} is not served by tokengateway (HTTP routes only)"
        )

    # routes

    def route(self, route: HTTPRoute) -> None:
        key = _key(route)
        facts = self.route_facts[key] = st.RouteFacts(
            _namespace(route), route.metadata.name, _generation(route)
        )
        problems: list[str] = []
        rules = route.spec.rules
        backends = [tuple(_backends(route, r, self.backends, self, problems, facts)) for r in rules]
        matches = [_rule_matches(route, i, r, problems, facts) for i, r in enumerate(rules)]
        attached = False
        for parent, written in zip(route.spec.parentRefs, _written_parent_refs(route), strict=True):
            if parent.kind == "Gateway" and parent.group == GATEWAY_API_GROUP:
                parent_facts = st.ParentFacts(written)
                facts.parents.append(parent_facts)
                attached |= self._parent(route, parent, parent_facts, backends, matches)
        if not attached:
            self.warnings.append(f"HTTPRoute {key}: not attached to any Gateway listener")
        self.problems.extend(problems)
        if not self.strict:
            self.warnings.extend(problems)

    def _parent(
        self,
        route: HTTPRoute,
        parent: ParentReference,
        parent_facts: st.ParentFacts,
        backends: Sequence[tuple[Backend, ...]],
        matches: Sequence[list[tuple[int, _MatchPieces]]],
    ) -> bool:
        """Attach the route through one parentRef; whether some listener took it."""
        key = _key(route)
        gw_key = f"{parent.namespace or route.metadata.namespace}/{parent.name}"
        gateway = self.gateways.get(gw_key)
        if gateway is None:
            message = f"parent Gateway {gw_key} not found"
            parent_facts.accepted = ("NoMatchingParent", message)
            self.warnings.append(f"HTTPRoute {key}: {message}")
            return False
        candidates = [
            listener
            for listener in gateway.spec.listeners
            if parent.sectionName in (None, listener.name) and parent.port in (None, listener.port)
        ]
        allowed = []
        for listener in candidates:
            if _namespace_allowed(listener, gateway, route, self.namespaces):
                allowed.append(listener)
            else:
                self.warnings.append(
                    f"HTTPRoute {key}: not allowed by Gateway {gw_key} listener "
                    f"{listener.name!r} (allowedRoutes.namespaces)"
                )
        sections = _section_names(route)
        served = 0
        for listener in allowed:
            hostnames = intersect_hostnames(listener.hostname, route.spec.hostnames)
            if not hostnames:
                continue
            served += 1
            name = listener.name
            for lf in self.gateway_facts[gw_key].listeners:
                if lf.name == name:
                    lf.attached_routes += 1
            for index, rule in enumerate(route.spec.rules):
                target = RuleTarget(
                    route=key,
                    rule=sections[index],
                    backends=backends[index],
                    timeout=_duration(rule.timeouts.request if rule.timeouts else None),
                    gateway=gw_key,
                    listener=name,
                )
                self._attach_policies(target)
                self.targets.append(target)
                if (gw_key, name) in self.unserved:
                    continue
                into = self.https_matches if listener.protocol == "HTTPS" else self.matches
                for m_index, pieces in matches[index]:
                    order = (*_age(route), index, m_index)
                    into.extend(
                        RouteMatch(h, *pieces, target=target, order=order) for h in hostnames
                    )
        if not candidates:
            parent_facts.accepted = (
                "NoMatchingParent",
                f"no listener of Gateway {gw_key} matches the parentRef's sectionName/port",
            )
        elif not allowed:
            parent_facts.accepted = (
                "NotAllowedByListeners",
                f"the listeners of Gateway {gw_key} do not allow routes from namespace "
                f"{route.metadata.namespace}",
            )
        elif not served:
            parent_facts.accepted = (
                "NoMatchingListenerHostname",
                f"no hostname of the route matches a listener of Gateway {gw_key}",
            )
        else:
            parent_facts.affected_by = self._affected(
                [("HTTPRoute", key, None)]
                + [("Gateway", gw_key, x.name) for x in allowed]
                + [("Gateway", gw_key, None)]
            )
        return served > 0

    # listeners

    def _listener(self, gateway: Gateway, listener: Listener, lf: st.ListenerFacts) -> None:
        """Check an HTTPS (or TLS) listener and load its certificates; a listener that
        cannot be served is marked so in its status and its routes are left out."""
        gw_key = _key(gateway)
        where = f"Gateway {gw_key} listener {listener.name!r}"
        if listener.protocol == "TLS":
            mode = (listener.tls or {}).get("mode")
            if mode == "Passthrough":
                lf.accepted = (
                    "UnsupportedValue",
                    "tls.mode Passthrough is not supported: tokengateway terminates TLS "
                    "(use protocol HTTPS with mode Terminate)",
                )
            else:
                lf.accepted = (
                    "UnsupportedProtocol",
                    "protocol TLS (TLSRoute) is not supported; use protocol HTTPS",
                )
            lf.programmed = ("Invalid", lf.accepted[1])
            self.unserved.add((gw_key, listener.name))
            self.warnings.append(f"{where}: {lf.accepted[1]}")
            return
        if listener.protocol != "HTTPS":
            return
        self.https_listeners.append(f"{gw_key}#{listener.name}")
        pairs = self._certificates(gateway, listener, lf)
        if pairs is None:
            lf.programmed = ("Invalid", "the listener has no usable certificate")
            self.unserved.add((gw_key, listener.name))
            self.warnings.append(f"{where}: {lf.resolved[1] if lf.resolved else 'no certificate'}")
            return
        if not self.https:
            lf.programmed = (
                "Pending",
                "HTTPS listeners are not served: start tokengateway serve with "
                "--listen-https HOST:PORT",
            )
            self.unserved.add((gw_key, listener.name))
            return
        self.served_https.append((gw_key, listener.name, listener.hostname, pairs))

    def sni(self) -> SniContexts:
        """The HTTPS listeners' contexts by server name, once every route is attached: when
        an x509 AuthPolicy rule protects a route of one of them, the socket asks every client
        for a certificate signed by one of those rules' CAs (docs/tls.md)."""
        served = {(gw, name) for gw, name, _, _ in self.served_https}
        self.client_ca = "".join(
            sorted(
                {
                    pem
                    for target in self.targets
                    if target.auth is not None and (target.gateway, target.listener) in served
                    for pem in target.auth.client_cas()
                }
            )
        )
        exact: dict[str, ssl.SSLContext] = {}
        wildcard: dict[str, ssl.SSLContext] = {}
        default: ssl.SSLContext | None = None
        for _, _, host, pairs in self.served_https:
            context = self._served(pairs)
            if host is None:
                default = default or context
            elif host.startswith("*."):
                wildcard.setdefault(host[1:], context)
            else:
                exact.setdefault(host, context)
        return SniContexts(exact, wildcard, default, client_certificates=bool(self.client_ca))

    def _served(self, pairs: list[tuple[str, str]]) -> ssl.SSLContext:
        """The context serving these certificates, asking for a client certificate when
        `client_ca` is set."""
        if len(pairs) == 1 and not self.client_ca:
            return self._load(*pairs[0])[0]
        key = ("served", tuple(pairs), self.client_ca)
        found = self.certificate_cache.get(key) or self.old_certificates.get(key)
        if found is None:
            found = pem_context(*pairs[0], more=pairs[1:])
            if self.client_ca:
                ask_client_certificate(found[0], self.client_ca)
        self.certificate_cache[key] = found
        return found[0]

    def _certificates(
        self, gateway: Gateway, listener: Listener, lf: st.ListenerFacts
    ) -> list[tuple[str, str]] | None:
        """The certificate and key pairs of a listener's `tls.certificateRefs`, each one
        loaded once to check it (they are served together: an RSA and an ECDSA certificate
        may be served side by side); None, with `ResolvedRefs` false in `lf`, when one of
        them does not resolve or load."""
        gw_ns = _namespace(gateway)
        refs = (listener.tls or {}).get("certificateRefs") or []
        if not refs:
            lf.resolved = ("InvalidCertificateRef", "tls.certificateRefs is empty")
            return None
        pairs: list[tuple[str, str]] = []
        for ref in refs:
            group = str(ref.get("group") or "")
            kind = str(ref.get("kind") or "Secret")
            name = str(ref.get("name") or "")
            namespace = str(ref.get("namespace") or gw_ns)
            shown = f"{namespace}/{name}"
            if group not in ("", "core") or kind != "Secret":
                lf.resolved = (
                    "InvalidCertificateRef",
                    f"certificateRef {kind} {shown}: only core Secrets are supported",
                )
                return None
            if namespace != gw_ns and not any(
                grant.metadata.namespace == namespace
                and grant.permits(GATEWAY_API_GROUP, "Gateway", gw_ns, ("", "Secret", name))
                for grant in self.grants
            ):
                lf.resolved = (
                    "RefNotPermitted",
                    f"certificateRef Secret {shown} is in another namespace and no "
                    f"ReferenceGrant in {namespace} permits Gateways of {gw_ns} to use it",
                )
                return None
            secret = self.tls_secrets.get(shown)
            if secret is None:
                lf.resolved = ("InvalidCertificateRef", f"Secret {shown} not found")
                return None
            if secret.type != "kubernetes.io/tls":
                lf.resolved = (
                    "InvalidCertificateRef",
                    f"Secret {shown} is of type {secret.type}, not kubernetes.io/tls",
                )
                return None
            data = secret.decoded_data()
            missing = [k for k in ("tls.crt", "tls.key") if not data.get(k)]
            if missing:
                lf.resolved = (
                    "InvalidCertificateRef",
                    f"Secret {shown} has no {' or '.join(missing)}",
                )
                return None
            pairs.append((data["tls.crt"], data["tls.key"]))
        notes = []
        for (cert, key), ref in zip(pairs, refs, strict=True):
            shown = f"{ref.get('namespace') or gw_ns}/{ref.get('name')}"
            try:
                _, info = self._load(cert, key)
            except CertificateError as exc:
                lf.resolved = ("InvalidCertificateRef", f"Secret {shown}: {exc}")
                return None
            if info.expired():
                notes.append(
                    f"the certificate of Secret {shown} ({info.subject}) expired on "
                    f"{_utc(info.not_after)}; served all the same until it is replaced"
                )
        if notes:
            lf.resolved_note = "; ".join(notes)
            self.warnings.append(
                f"Gateway {_key(gateway)} listener {listener.name!r}: {lf.resolved_note}"
            )
        return pairs

    def _load(self, cert: str, key: str) -> _Loaded:
        found = self.certificate_cache.get((cert, key)) or self.old_certificates.get((cert, key))
        if found is None:
            found = pem_context(cert, key)
        self.certificate_cache[(cert, key)] = found
        return found

    # policies

    def _path(self, kind: str, target: RuleTarget) -> list[_Policy]:
        """The accepted policies of a kind on a path, least specific first (on one object:
        oldest first, then `namespace/name`, as they were registered)."""
        path: list[_Policy] = []
        for where in (
            ("Gateway", target.gateway, None),
            ("Gateway", target.gateway, target.listener),
            ("HTTPRoute", target.route, None),
            ("HTTPRoute", target.route, target.rule),
        ):
            path.extend(p for p in self.targeted.get(where, ()) if p.kind == kind)
        return path

    def _attach_policies(self, target: RuleTarget) -> None:
        """Compute and compile the rule's effective policy of every kind."""
        limits: list[Limit] = []
        names: list[str] = []
        for kind in POLICY_KINDS:
            path = self._path(kind, target)
            rules = _merge(kind, path)
            if rules is None:
                continue
            _note_effect(path, rules)
            effective = EffectivePolicy(kind, rules, tuple(p.key for p in path))
            target.effective[kind] = effective
            if kind == "AuthPolicy":
                if not _empty(kind, rules):
                    target.auth = self.compiler.auth(effective)
                    target.auth_policy = ", ".join(effective.sources)
                continue
            compiled = self.compiler.limits(kind, effective)
            limits.extend(compiled)
            names.extend(f"{kind} {s}" for s in dict.fromkeys(x.policy for x in compiled))
        target.limits = tuple(limits)
        target.limit_policies = tuple(names)

    def _affected(self, where: Sequence[tuple[str, str, str | None]]) -> dict[str, list[str]]:
        """Accepted policies per kind on these objects, in this order: what Kuadrant lists
        in its `kuadrant.io/<Kind>Affected` conditions."""
        out: dict[str, list[str]] = {}
        for target in where:
            for policy in self.targeted.get(target, ()):
                seen = out.setdefault(policy.kind, [])
                if policy.key not in seen:
                    seen.append(policy.key)
        return out

    # status

    def statuses(self) -> dict[StatusKey, st.Status]:
        when = st.now()
        out: dict[StatusKey, st.Status] = {}
        for policy in self.policies.values():
            facts = policy.facts
            out[(policy.kind, facts.namespace, facts.name)] = st.policy_status(facts, when)
        for key, gf in self.gateway_facts.items():
            gf.affected_by = self._affected([("Gateway", key, None)])
            for lf in gf.listeners:
                lf.affected_by = self._affected([("Gateway", key, None), ("Gateway", key, lf.name)])
            out[("Gateway", gf.namespace, gf.name)] = st.gateway_status(gf, when)
        for rf in self.route_facts.values():
            out[("HTTPRoute", rf.namespace, rf.name)] = st.route_status(rf, when)
        return out


def _utc(when: float | None) -> str:
    if when is None:
        return "an unknown date"
    return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _note_effect(path: Sequence[_Policy], effective: Mapping[str, PolicyRule]) -> None:
    """Which rules of each policy in the path are in force here, and who took the place of
    the others (Kuadrant: the rule's source, or every source when the rule is gone)."""
    sources = {r.source for r in effective.values()}
    for policy in path:
        for key in policy.rules:
            rule = effective.get(key)
            if rule is not None and rule.source == policy.key:
                policy.facts.in_force = True
            elif rule is not None:
                policy.facts.overridden_by.add(rule.source)
            else:
                policy.facts.overridden_by |= sources - {policy.key}


def _namespace_allowed(
    listener: Listener,
    gateway: Gateway,
    route: HTTPRoute,
    namespaces: Mapping[str, Mapping[str, str]],
) -> bool:
    """Whether the listener's `allowedRoutes.namespaces` admits the route's namespace.

    `Selector` selects by the namespace's labels, which always include
    `kubernetes.io/metadata.name` (Kubernetes sets it); without a selector it admits every
    namespace.
    """
    allowed = listener.allowedRoutes.namespaces
    if allowed.from_ == "All":
        return True
    if allowed.from_ == "Same":
        return route.metadata.namespace == gateway.metadata.namespace
    namespace = _namespace(route)
    labels = dict(namespaces.get(namespace, {}))
    labels.setdefault("kubernetes.io/metadata.name", namespace)
    return (allowed.selector or LabelSelector()).matches(labels)


def _backends(
    route: HTTPRoute,
    rule: HTTPRouteRule,
    plans: Mapping[str, BackendPlan | str],
    build: _Build,
    problems: list[str],
    facts: st.RouteFacts,
) -> list[Backend]:
    out = []
    for ref in rule.backendRefs:
        if not _is_service(ref):
            message = f"backendRef {ref.kind} {ref.name} is not a Service"
            facts.unresolved = ("InvalidKind", message)
            problems.append(f"HTTPRoute {_key(route)}: {message}")
            continue
        key = _backend_key(route, ref)
        plan = plans.get(key)
        url = plan if isinstance(plan, str) else (plan.url if plan is not None else None)
        if url is None:
            facts.unresolved = ("BackendNotFound", f"backend Service {key} has no address")
            problems.append(f"HTTPRoute {_key(route)}: backend Service {key} has no address")
            continue
        weight = ref.weight
        if weight > 0:
            service = build.services.get(key)
            annotations = service.metadata.annotations if service is not None else {}
            try:
                backend = Backend(
                    url,
                    weight,
                    _timeouts(key, service, problems),
                    _upstream_key(key, annotations, build.secret_data, problems),
                    str(annotations.get(FORWARD_CREDENTIALS_ANNOTATION, "")).lower() == "true",
                    build.upstream_tls.get(key),
                )
            except ValueError as exc:  # an address no request can go to
                message = f"backend Service {key}: {exc}"
                facts.unresolved = ("BackendNotFound", message)
                problems.append(f"HTTPRoute {_key(route)}: {message}")
                continue
            out.append(backend)
    return out


def _upstream_key(
    key: str,
    annotations: Mapping[str, Any],
    secrets: Mapping[str, Mapping[str, str]],
    problems: list[str],
) -> str | None:
    name = annotations.get(UPSTREAM_KEY_ANNOTATION)
    if not name:
        return None
    secret = f"{key.split('/', 1)[0]}/{name}"
    value = (secrets.get(secret) or {}).get("api_key")
    if not value:
        problems.append(
            f"Service {key}: annotation {UPSTREAM_KEY_ANNOTATION}: Secret {secret} has no api_key"
        )
        return None
    return f"Bearer {value}"


def _timeouts(key: str, service: Service | None, problems: list[str]) -> Timeouts:
    """A backend's upstream timeouts from its Service's annotations; a bad value is reported
    and the default kept."""
    annotations = service.metadata.annotations if service is not None else {}
    if not any(a in annotations for a in TIMEOUT_ANNOTATIONS.values()):
        return DEFAULT_TIMEOUTS
    values: dict[str, float | None] = {}
    for field_name, annotation in TIMEOUT_ANNOTATIONS.items():
        text = annotations.get(annotation)
        if text is None:
            continue
        try:
            values[field_name] = _duration(str(text))
        except ValueError as exc:
            problems.append(f"Service {key}: annotation {annotation}: {exc}")
    return Timeouts(**{**_as_dict(DEFAULT_TIMEOUTS), **values})


def _as_dict(timeouts: Timeouts) -> dict[str, float | None]:
    return {name: getattr(timeouts, name) for name in TIMEOUT_ANNOTATIONS}


def _rule_matches(
    route: HTTPRoute, index: int, rule: HTTPRouteRule, problems: list[str], facts: st.RouteFacts
) -> list[tuple[int, _MatchPieces]]:
    out = []
    for m_index, match in enumerate(rule.matches):
        try:
            out.append((m_index, _match(match)))
        except (re.error, ValueError) as exc:
            message = f"rules[{index}].matches[{m_index}]: {exc}"
            facts.invalid_matches.append(f"{message} (left out)")
            problems.append(f"HTTPRoute {_key(route)}: {message}")
    return out


def _match(match: HTTPRouteMatch) -> _MatchPieces:
    path = match.path
    regex = re.compile(path.value) if path.type == "RegularExpression" else None
    headers = tuple(_value_match(h, lower=True) for h in match.headers)
    query = tuple(_value_match(q, lower=False) for q in match.queryParams)
    return PathMatch(path.type, path.value, regex), match.method, headers, query


def _value_match(item: HTTPHeaderMatch | HTTPQueryParamMatch, lower: bool) -> HeaderMatch:
    regex = re.compile(item.value) if item.type == "RegularExpression" else None
    return HeaderMatch(item.name.lower() if lower else item.name, item.type, item.value, regex)
