"""Kuadrant kinds: Kuadrant, TokenRateLimitPolicy, RateLimitPolicy, AuthPolicy.

Shapes, enums and CEL rules (with their messages) follow the CRDs of kuadrant-operator:
TokenRateLimitPolicy kuadrant.io/v1alpha1, RateLimitPolicy and AuthPolicy kuadrant.io/v1,
Kuadrant kuadrant.io/v1beta1 (the only versions current Kuadrant serves). Policy specs are
closed like the CRD schemas: an unknown key is an error naming it, because Kubernetes would
reject it and silently ignoring a misspelt `when` would enforce the wrong thing.
"""

import warnings
from typing import Annotated, Any, ClassVar, Literal

from pydantic import Field, ValidatorFunctionWrapHandler, field_validator, model_validator
from pydantic_core import InitErrorDetails, PydanticCustomError

from .common import (
    CUSTOM_ERROR,
    WINDOW_PATTERN,
    Duration,
    K8sModel,
    LabelSelector,
    NonEmptyStr,
    ObjectMeta,
    Predicate,
    StrictModel,
    issue,
    merge_issues,
    nonempty,
    parse_window,
    present,
    raise_issues,
)
from .gateway_api import GATEWAY_API_GROUP, Group, Kind, ObjectName, SectionName
from .resource import Resource

__all__ = [
    "ApiKeyAuthentication",
    "AuthPolicy",
    "AuthPolicySpec",
    "AuthPolicyTargetRef",
    "AuthResponses",
    "AuthRules",
    "AuthenticationRule",
    "AuthorizationRule",
    "Cache",
    "Counter",
    "Credentials",
    "DenyWithSpec",
    "JsonProperties",
    "Kuadrant",
    "KuadrantSpec",
    "Limit",
    "MergeableAuthRules",
    "MergeableLimits",
    "NamedPattern",
    "OPAAuthorization",
    "PatternExpression",
    "PatternExpressionOrRef",
    "PatternMatchingAuthorization",
    "PolicyTargetReference",
    "Rate",
    "RateLimitPolicy",
    "RateLimitPolicySpec",
    "RateLimitPolicyTargetRef",
    "SuccessResponseSpec",
    "SuccessResponses",
    "TokenRateLimitPolicy",
    "TokenRateLimitPolicySpec",
    "TokenRateLimitPolicyTargetRef",
    "ValueOrSelector",
]

Strategy = Literal["atomic", "merge"]
Mode = Literal["defaults", "overrides"]


class TokenRateLimiting(StrictModel):
    """How TokenRateLimitPolicies hold capacity (Kuadrant RFC 0021): `Reservation` (the
    default) reserves each limit's `reservation.amount` before forwarding; `CheckReport`
    checks then reports, as before reservations existed."""

    mode: Literal["Reservation", "CheckReport"] = "Reservation"


class KuadrantSpec(K8sModel):
    """Operator settings; only `tokenRateLimiting.mode` changes how this gateway enforces."""

    components: dict[str, Any] | None = None
    mtls: dict[str, Any] | None = None
    observability: dict[str, Any] | None = None
    tokenRateLimiting: TokenRateLimiting | None = None


class Kuadrant(Resource):
    """The Kuadrant instance; its namespace is where API-key Secrets are looked up."""

    KIND: ClassVar[str] = "Kuadrant"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("kuadrant.io/v1beta1",)

    metadata: ObjectMeta
    spec: KuadrantSpec = Field(default_factory=KuadrantSpec)
    status: dict[str, Any] | None = None


# --- targetRef ----------------------------------------------------------------------------------


class PolicyTargetReference(StrictModel):
    """A policy's `targetRef` (local: same namespace as the policy).

    `sectionName` names a Gateway listener or an HTTPRoute rule.
    """

    KINDS: ClassVar[tuple[str, ...]] = ("HTTPRoute", "Gateway")
    KIND_MESSAGE: ClassVar[str] = (
        "Invalid targetRef.kind. The only supported values are 'HTTPRoute' and 'Gateway'"
    )

    group: Group
    kind: Kind
    name: ObjectName
    sectionName: SectionName | None = None

    @model_validator(mode="after")
    def _supported_target(self) -> "PolicyTargetReference":
        problems: list[InitErrorDetails] = []
        if self.group != GATEWAY_API_GROUP:
            problems.append(
                issue(
                    (),
                    f"Invalid targetRef.group. The only supported value is '{GATEWAY_API_GROUP}'",
                )
            )
        if self.kind not in self.KINDS:
            problems.append(issue((), self.KIND_MESSAGE))
        raise_issues("targetRef", problems)
        return self


class TokenRateLimitPolicyTargetRef(PolicyTargetReference):
    """TokenRateLimitPolicy targets Gateways and HTTPRoutes."""


class RateLimitPolicyTargetRef(PolicyTargetReference):
    """RateLimitPolicy may also target a GRPCRoute."""

    KINDS: ClassVar[tuple[str, ...]] = ("HTTPRoute", "GRPCRoute", "Gateway")
    KIND_MESSAGE: ClassVar[str] = (
        "Invalid targetRef.kind. The only supported values are 'HTTPRoute', 'GRPCRoute' and "
        "'Gateway'"
    )


class AuthPolicyTargetRef(PolicyTargetReference):
    """AuthPolicy may also target a GRPCRoute (its CRD's message has an Oxford comma)."""

    KINDS: ClassVar[tuple[str, ...]] = ("HTTPRoute", "GRPCRoute", "Gateway")
    KIND_MESSAGE: ClassVar[str] = (
        "Invalid targetRef.kind. The only supported values are 'HTTPRoute', 'GRPCRoute', and "
        "'Gateway'"
    )


# --- limits (RateLimitPolicy and TokenRateLimitPolicy share them) ------------------------------


class Rate(StrictModel):
    """`limit` units (requests, or tokens for a TokenRateLimitPolicy) per `window`.

    Kuadrant's CRD accepts a negative limit and treats it as 0; we reject it as a mistake.
    """

    limit: Annotated[int, Field(ge=0)]
    window: Annotated[str, Field(pattern=WINDOW_PATTERN)]

    @property
    def seconds(self) -> float:
        """The window in seconds."""
        return parse_window(self.window)


class Counter(StrictModel):
    """A CEL expression whose value separates counters (e.g. one per user)."""

    expression: NonEmptyStr


class Limit(StrictModel):
    """One named limit: applies when all `when` predicates hold; one counter per rate."""

    when: list[Predicate] = Field(default_factory=list)
    rates: list[Rate] = Field(default_factory=list)
    counters: list[Counter] = Field(default_factory=list)


class CountingWeights(StrictModel):
    """tokengateway extension: tokens counted as a weighted sum. `cachedPrompt` weighs the
    prompt tokens the upstream served from its cache (default: the `prompt` weight)."""

    prompt: float = Field(default=0, ge=0)
    completion: float = Field(default=0, ge=0)
    cachedPrompt: float | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _something_counts(self) -> "CountingWeights":
        if not (self.prompt or self.completion or self.cachedPrompt):
            raise PydanticCustomError(
                CUSTOM_ERROR,
                "{reason}",
                {"reason": "one of prompt, completion, cachedPrompt must weigh more than 0"},
            )
        return self


COUNTING_WORDS = ("total", "prompt", "completion")
#: the longest `reservation.wait`: as long as a hold may last (Limitador's default TTL cap)
MAX_RESERVATION_WAIT = 60.0


class Reservation(StrictModel):
    """Kuadrant's per-limit `reservation` (RFC 0021): CEL for the tokens to hold before
    forwarding (`amount`) and for how long (`ttl`, a duration). tokengateway extensions:
    without `amount`, the request's own estimate is held (prompt tokens by the offline
    tokenizer plus `max_tokens`, or `defaultCompletionTokens` when the request sets none);
    `wait` (a duration, at most 60s): how long a request refused only by other requests'
    holds may wait for them to settle (docs/reservations.md)."""

    amount: NonEmptyStr | None = None
    ttl: NonEmptyStr | None = None
    defaultCompletionTokens: int | None = Field(default=None, ge=0)
    wait: Duration | None = None

    @field_validator("wait")
    @classmethod
    def _wait_bounded(cls, value: str | None) -> str | None:
        if value is not None and parse_window(value) > MAX_RESERVATION_WAIT:
            raise ValueError(f"wait {value} is longer than {MAX_RESERVATION_WAIT:g}s")
        return value


class TokenLimit(Limit):
    """A TokenRateLimitPolicy limit, with tokengateway's optional `counting` extension:
    `total` (Kuadrant's `usage.total_tokens`, the default), `prompt`, `completion`, or
    weights `{prompt, completion, cachedPrompt}`. The words are shorthands for weights."""

    counting: CountingWeights | None = None
    reservation: Reservation | None = None

    @field_validator("counting", mode="before")
    @classmethod
    def _counting_words(cls, value: Any) -> Any:
        if value is None or isinstance(value, dict):
            return value
        if value == "total":
            return None
        if value in ("prompt", "completion"):
            return {value: 1}
        raise PydanticCustomError(
            CUSTOM_ERROR,
            "{reason}",
            {
                "reason": f"{value!r} is not a way to count tokens: use one of "
                + ", ".join(COUNTING_WORDS)
                + " or weights {prompt: N, completion: N, cachedPrompt: N}"
            },
        )


class MergeableLimits(StrictModel):
    """The content of `defaults` / `overrides` (and, implicitly, of the spec itself)."""

    strategy: Strategy = "atomic"
    when: list[Predicate] = Field(default_factory=list)
    limits: dict[str, Limit] = Field(default_factory=dict)


class MergeableTokenLimits(MergeableLimits):
    limits: dict[str, TokenLimit] = Field(default_factory=dict)  # type: ignore[assignment]


def _limits_spec_rules(spec: dict[str, Any]) -> list[InitErrorDetails]:
    """The x-kubernetes-validations of the (Token)RateLimitPolicy spec, with their messages."""
    has = {k: present(spec, k) for k in ("defaults", "overrides", "limits")}
    messages = []
    if has["defaults"] and has["limits"]:
        messages.append("Implicit and explicit defaults are mutually exclusive")
    if has["defaults"] and has["overrides"]:
        messages.append("Overrides and explicit defaults are mutually exclusive")
    if has["overrides"] and has["limits"]:
        messages.append("Overrides and implicit defaults are mutually exclusive")
    if not (has["overrides"] or has["defaults"]) and not nonempty(spec, "limits"):
        messages.append("At least one spec.limits must be defined")
    if has["overrides"] and not nonempty(spec["overrides"], "limits"):
        messages.append("At least one spec.overrides.limits must be defined")
    if has["defaults"] and not nonempty(spec["defaults"], "limits"):
        messages.append("At least one spec.defaults.limits must be defined")
    return [issue((), m) for m in messages]


class RateLimitPolicySpec(StrictModel):
    """Either `limits` (+ `when`: implicit defaults), or `defaults`, or `overrides`."""

    targetRef: RateLimitPolicyTargetRef
    defaults: MergeableLimits | None = None
    overrides: MergeableLimits | None = None
    limits: dict[str, Limit] = Field(default_factory=dict)
    when: list[Predicate] = Field(default_factory=list)

    @model_validator(mode="wrap")
    @classmethod
    def _cel_rules(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return merge_issues("spec", data, handler, _limits_spec_rules)

    @property
    def mode(self) -> Mode:
        """Whether the limits are defaults (explicit or implicit) or overrides."""
        return "overrides" if self.overrides is not None else "defaults"

    def proper(self) -> MergeableLimits:
        """The limits that apply, as Kuadrant's `Proper()`.

        With `defaults`/`overrides`, a top-level `when` is ignored, as Kuadrant ignores it.
        """
        if self.defaults is not None:
            return self.defaults
        if self.overrides is not None:
            return self.overrides
        return MergeableLimits.model_construct(
            strategy="atomic", when=self.when, limits=self.limits
        )


class TokenRateLimitPolicySpec(RateLimitPolicySpec):
    """Same shape as RateLimitPolicy's; rates count tokens (`usage.total_tokens` unless a
    limit says otherwise with `counting`)."""

    targetRef: TokenRateLimitPolicyTargetRef  # type: ignore[assignment]
    defaults: MergeableTokenLimits | None = None
    overrides: MergeableTokenLimits | None = None
    limits: dict[str, TokenLimit] = Field(default_factory=dict)  # type: ignore[assignment]


class RateLimitPolicy(Resource):
    """Request-count limits (kuadrant.io/v1)."""

    KIND: ClassVar[str] = "RateLimitPolicy"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("kuadrant.io/v1",)

    metadata: ObjectMeta
    spec: RateLimitPolicySpec
    status: dict[str, Any] | None = None


class TokenRateLimitPolicy(Resource):
    """Token-count limits (kuadrant.io/v1alpha1)."""

    KIND: ClassVar[str] = "TokenRateLimitPolicy"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("kuadrant.io/v1alpha1",)

    metadata: ObjectMeta
    spec: TokenRateLimitPolicySpec
    status: dict[str, Any] | None = None


# --- AuthPolicy ---------------------------------------------------------------------------------

PatternOperator = Literal["eq", "neq", "incl", "excl", "matches"]


class ValueOrSelector(StrictModel):
    """A static `value`, an Authorino `selector` (GJSON path) or a CEL `expression`."""

    value: Any = None
    selector: str | None = None
    expression: str | None = None


class PatternExpression(StrictModel):
    """`selector operator value`, e.g. `request.method eq GET`."""

    selector: str | None = None
    operator: PatternOperator | None = None
    value: str | None = None


class PatternExpressionOrRef(StrictModel):
    """An Authorino condition: an expression, a named pattern, a CEL predicate, or all/any.

    The CRD keeps nested `all`/`any` items as free-form objects; we check them like the outer
    ones (an unknown key there would be ignored by Authorino, i.e. the condition dropped).
    """

    selector: str | None = None
    operator: PatternOperator | None = None
    value: str | None = None
    patternRef: str | None = None
    predicate: str | None = None
    all: list["PatternExpressionOrRef"] | None = None
    any: list["PatternExpressionOrRef"] | None = None


PatternExpressionOrRef.model_rebuild()


class NamedPattern(StrictModel):
    """An entry of `spec.patterns`, referred to by `patternRef`."""

    allOf: list[PatternExpression]


class Cache(StrictModel):
    """Caching of an evaluator's result by `key`."""

    key: ValueOrSelector
    ttl: int = 60


class AuthorizationHeaderCredentials(StrictModel):
    """`Authorization: <prefix> <credential>`."""

    prefix: str | None = None


class NamedCredentials(StrictModel):
    """A credential in a named header, query parameter or cookie."""

    name: str


class Credentials(StrictModel):
    """Where the credential is read from (Authorino's default: `Authorization: Bearer`)."""

    authorizationHeader: AuthorizationHeaderCredentials | None = None
    customHeader: NamedCredentials | None = None
    queryString: NamedCredentials | None = None
    cookie: NamedCredentials | None = None


class ApiKeyAuthentication(StrictModel):
    """API keys are Secrets selected by `selector` (in the Kuadrant namespace unless
    `allNamespaces`)."""

    selector: LabelSelector
    allNamespaces: bool = False


class AuthenticationRule(StrictModel):
    """One identity source. Only `apiKey` is modelled; the other methods stay as written."""

    apiKey: ApiKeyAuthentication | None = None
    anonymous: dict[str, Any] | None = None
    plain: dict[str, Any] | None = None
    jwt: dict[str, Any] | None = None
    kubernetesTokenReview: dict[str, Any] | None = None
    x509: dict[str, Any] | None = None
    oauth2Introspection: dict[str, Any] | None = None
    credentials: Credentials | None = None
    defaults: dict[str, ValueOrSelector] = Field(default_factory=dict)
    overrides: dict[str, ValueOrSelector] = Field(default_factory=dict)
    when: list[PatternExpressionOrRef] = Field(default_factory=list)
    priority: int = 0
    metrics: bool = False
    cache: Cache | None = None

    @model_validator(mode="after")
    def _cel_rules(self) -> "AuthenticationRule":
        problems: list[InitErrorDetails] = []
        if self.jwt is not None and self.jwt.get("jwksUrl") and self.jwt.get("issuerUrl"):
            problems.append(issue(("jwt",), "Use one of: jwksUrl, issuerUrl"))
        source = (self.x509 or {}).get("source")
        if isinstance(source, dict):
            given = [k for k in ("xfccHeader", "clientCertHeader", "expression") if k in source]
            if len(given) > 1:
                problems.append(
                    issue(
                        ("x509", "source"),
                        "Use one of: xfccHeader, clientCertHeader, expression",
                    )
                )
        raise_issues("authentication", problems)
        return self


class OPAAuthorization(StrictModel):
    """Open Policy Agent: inline `rego` (wrapped in a package by the auth code)."""

    rego: str | None = None
    allValues: bool = False
    externalPolicy: dict[str, Any] | None = None


class PatternMatchingAuthorization(StrictModel):
    """Authorize when all patterns hold."""

    patterns: list[PatternExpressionOrRef]


class AuthorizationRule(StrictModel):
    """One authorization check; unmodelled methods stay as written."""

    opa: OPAAuthorization | None = None
    patternMatching: PatternMatchingAuthorization | None = None
    kubernetesSubjectAccessReview: dict[str, Any] | None = None
    spicedb: dict[str, Any] | None = None
    when: list[PatternExpressionOrRef] = Field(default_factory=list)
    priority: int = 0
    metrics: bool = False
    cache: Cache | None = None


class DenyWithSpec(StrictModel):
    """A custom 401/403 response."""

    code: Annotated[int, Field(ge=300, le=599)] | None = None
    headers: dict[str, ValueOrSelector] = Field(default_factory=dict)
    body: ValueOrSelector | None = None
    message: ValueOrSelector | None = None


class JsonProperties(StrictModel):
    """A JSON object built from properties (e.g. `auth.identity.metadata...` selectors)."""

    properties: dict[str, ValueOrSelector]


with warnings.catch_warnings():
    # `json` is the manifest key; it shadows pydantic's deprecated BaseModel.json() on purpose.
    warnings.filterwarnings("ignore", message='Field name "json"', category=UserWarning)

    class SuccessResponseSpec(StrictModel):
        """A success header or filter; filters become `auth.<name>` for limit predicates."""

        # The field shadows BaseModel.json() on purpose (see above), which mypy reports.
        json: JsonProperties | None = None  # type: ignore[assignment]
        plain: ValueOrSelector | None = None
        wristband: dict[str, Any] | None = None
        when: list[PatternExpressionOrRef] = Field(default_factory=list)
        priority: int = 0
        metrics: bool = False
        cache: Cache | None = None
        key: str | None = None


class SuccessResponses(StrictModel):
    """Data added on success: response `headers` and dynamic-metadata `filters`."""

    headers: dict[str, SuccessResponseSpec] = Field(default_factory=dict)
    filters: dict[str, SuccessResponseSpec] = Field(default_factory=dict)


class AuthResponses(StrictModel):
    """Custom denials and success data."""

    unauthenticated: DenyWithSpec | None = None
    unauthorized: DenyWithSpec | None = None
    success: SuccessResponses = Field(default_factory=SuccessResponses)


class AuthRules(StrictModel):
    """The auth scheme; `metadata` and `callbacks` evaluators stay as written."""

    authentication: dict[str, AuthenticationRule] = Field(default_factory=dict)
    metadata: dict[str, dict[str, Any]] = Field(default_factory=dict)
    authorization: dict[str, AuthorizationRule] = Field(default_factory=dict)
    response: AuthResponses = Field(default_factory=AuthResponses)
    callbacks: dict[str, dict[str, Any]] = Field(default_factory=dict)


class MergeableAuthRules(StrictModel):
    """The content of AuthPolicy `defaults` / `overrides`."""

    patterns: dict[str, NamedPattern] = Field(default_factory=dict)
    when: list[Predicate] = Field(default_factory=list)
    rules: AuthRules = Field(default_factory=AuthRules)
    strategy: Strategy = "atomic"


def _rules_defined(rules: Any) -> bool:
    """The AuthPolicy CRD's notion of "at least one rule"."""
    if not isinstance(rules, dict):
        return False
    if any(
        nonempty(rules, k) for k in ("authentication", "metadata", "authorization", "callbacks")
    ):
        return True
    response = rules.get("response")
    if not isinstance(response, dict):
        return False
    if present(response, "unauthenticated") or present(response, "unauthorized"):
        return True
    success = response.get("success")
    return nonempty(success, "headers") or nonempty(success, "filters")


def _field(obj: Any, key: str) -> Any:
    return obj.get(key) if isinstance(obj, dict) else None


def _auth_spec_rules(spec: dict[str, Any]) -> list[InitErrorDetails]:
    """The x-kubernetes-validations of the AuthPolicy spec, with their messages."""
    implicit = any(present(spec, k) for k in ("patterns", "when", "rules"))
    defaults, overrides = present(spec, "defaults"), present(spec, "overrides")
    messages = []
    if defaults and implicit:
        messages.append("Implicit and explicit defaults are mutually exclusive")
    if overrides and implicit:
        messages.append("Implicit defaults and explicit overrides are mutually exclusive")
    if overrides and defaults:
        messages.append("Explicit overrides and explicit defaults are mutually exclusive")
    if not (overrides or defaults) and not _rules_defined(spec.get("rules")):
        messages.append("At least one spec.rules must be defined")
    if defaults and not _rules_defined(_field(spec["defaults"], "rules")):
        messages.append("At least one spec.defaults.rules must be defined")
    if overrides and not _rules_defined(_field(spec["overrides"], "rules")):
        messages.append("At least one spec.overrides.rules must be defined")
    return [issue((), m) for m in messages]


class AuthPolicySpec(StrictModel):
    """Either `rules` (+ `patterns`, `when`: implicit defaults), or `defaults`, or `overrides`."""

    targetRef: AuthPolicyTargetRef
    defaults: MergeableAuthRules | None = None
    overrides: MergeableAuthRules | None = None
    patterns: dict[str, NamedPattern] = Field(default_factory=dict)
    when: list[Predicate] = Field(default_factory=list)
    rules: AuthRules = Field(default_factory=AuthRules)

    @model_validator(mode="wrap")
    @classmethod
    def _cel_rules(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return merge_issues("spec", data, handler, _auth_spec_rules)

    @property
    def mode(self) -> Mode:
        """Whether the rules are defaults (explicit or implicit) or overrides."""
        return "overrides" if self.overrides is not None else "defaults"

    def proper(self) -> MergeableAuthRules:
        """The rules that apply, as Kuadrant's `Proper()`."""
        if self.defaults is not None:
            return self.defaults
        if self.overrides is not None:
            return self.overrides
        return MergeableAuthRules.model_construct(
            patterns=self.patterns, when=self.when, rules=self.rules, strategy="atomic"
        )


class AuthPolicy(Resource):
    """Authentication and authorization (kuadrant.io/v1)."""

    KIND: ClassVar[str] = "AuthPolicy"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("kuadrant.io/v1",)

    metadata: ObjectMeta
    spec: AuthPolicySpec
    status: dict[str, Any] | None = None
