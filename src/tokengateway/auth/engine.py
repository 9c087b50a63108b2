"""The AuthPolicy engine: a Kuadrant AuthPolicy's rules compiled once, evaluated per request.

It reproduces what Authorino does with the AuthConfig that Kuadrant generates from the policy:

1. the policy's top-level `when` (CEL over the well-known attributes, evaluated by Kuadrant's
   wasm-shim): when false, the policy does not apply;
2. authentication, by priority group (then rule name): the first rule that resolves an
   identity wins; a rule's `when` skips it; no rule at all means anonymous access. Failure is
   401 with one `WWW-Authenticate: <scheme> realm="<rule>"` per rule, and the reason is the
   rule's error, or a JSON object {rule: error} when the policy has several rules;
3. authorization, by priority group (then rule name): every rule whose `when` holds must
   allow; results are visible to later rules as `auth.authorization.<rule>`. Failure is 403
   with the rule's reason ("Unauthorized" for a Rego or pattern that does not allow);
4. success responses: `response.success.filters` become the `auth` binding the rate limits
   read, `response.success.headers` headers for the upstream request;
5. `response.unauthenticated` / `unauthorized` customise the denial (code, message, headers,
   body); a custom message is also the X-Ext-Auth-Reason.

Selectors, conditions and Rego read Authorino's authorization JSON, built once per request::

    {"context": {...Envoy's CheckRequest attributes...},   # only when the policy reads it
     "request": {...}, "source": {...}, "destination": {...}, "metadata": {},
     "auth": {"identity": ..., "authorization": {...}, "response": {...}}}

Identity methods: `apiKey`, `jwt` (auth/jwt.py: the keys are fetched by the gateway,
outside this engine; a 401 whose token named a key its set lacks lists that set in
`AuthDecision.refresh_keys`, for the gateway to refresh and ask again),
`oauth2Introspection` (auth/introspection.py: likewise, a token with no answer kept is
listed in `AuthDecision.introspect`), `x509` (auth/x509.py), `plain` and `anonymous`.

`metadata` rules with `http` run after authentication (auth/metadata.py); calls with no
answer kept make a 503 listing them in `AuthDecision.metadata_calls`, for the gateway to
make and ask again.

Not supported (AuthConfigError at compile time, never a silent bypass): `userInfo` and
`uma` metadata, `callbacks` rules (HTTP calls), the identity method
`kubernetesTokenReview`, an `x509` certificate `source` other
than the TLS connection, `kubernetesSubjectAccessReview` and `spicedb` authorization, Rego
from `externalPolicy`, and `wristband` responses. A rule's `cache` gives oauth2Introspection
and metadata answers their `ttl` (its `key` is not read: the token, or the call, is the
key) and is ignored elsewhere; `metrics` is accepted and ignored (neither changes
decisions).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any
from urllib.parse import quote

from tokengateway.auth.credentials import CredentialLocation, compile_credentials
from tokengateway.auth.identity import REDACTED, ApiKeyIndex, compile_label_selector, digest
from tokengateway.auth.introspection import DEFAULT_KEEP, Introspector
from tokengateway.auth.jwt import DEFAULT_TIMEOUT, JwtVerifier, KeySet, token_expiry
from tokengateway.auth.metadata import FORM, JSON, HttpMetadata, MetadataCall
from tokengateway.auth.model import AuthConfigError, AuthDecision, AuthRequest, SecretRecord
from tokengateway.auth.rego import MSG_UNAUTHORIZED, RegoPolicy
from tokengateway.auth.selector import to_json, to_string
from tokengateway.auth.values import (
    Condition,
    EvalContext,
    ResolveError,
    Value,
    compile_conditions,
    compile_value,
    is_template,
)
from tokengateway.auth.x509 import TrustedCAs
from tokengateway.expr import cel
from tokengateway.expr.kept import keep

__all__ = ["AuthEngine", "KeySets", "compile_auth"]

#: where a `jwt` rule gets its key set: (issuerUrl, jwksUrl, ttl, timeout) -> KeySet; the
#: configuration passes one that shares sets across rules and reloads
KeySets = Callable[[str | None, str | None, float, float], KeySet]

MSG_CREDENTIAL_NOT_FOUND = "credential not found"
MSG_INVALID_API_KEY = "the API Key provided is invalid"
MSG_NO_PLAIN_IDENTITY = "could not retrieve identity object or null"
#: a 503 for a caller of `evaluate` that cannot make the metadata calls a request needs
MSG_METADATA_PENDING = "metadata not fetched"
#: what a 401 says when the gateway could not wait for the introspection endpoint
MSG_INTROSPECTION_PENDING = "token introspection request failed: no answer"

HEADER_CHALLENGE = "WWW-Authenticate"
HEADER_REASON = "X-Ext-Auth-Reason"

_SECTIONS = ("authentication", "metadata", "authorization", "response", "callbacks")
_UNSUPPORTED_IDENTITY = {
    "kubernetesTokenReview": "it calls the Kubernetes TokenReview API",
}
_UNSUPPORTED_AUTHZ = {
    "kubernetesSubjectAccessReview": "it calls the Kubernetes SubjectAccessReview API",
    "spicedb": "it calls a SpiceDB server",
}
_IDENTITY_METHODS: tuple[str, ...]
_IDENTITY_METHODS = ("apiKey", "jwt", "oauth2Introspection", "x509", "kubernetesTokenReview")
_IDENTITY_METHODS += ("plain", "anonymous")


class _Source:
    """One authentication rule."""

    __slots__ = (
        "challenge",
        "extensions",
        "index",
        "introspector",
        "jwt",
        "location",
        "method",
        "name",
        "plain",
        "priority",
        "when",
        "x509",
    )

    def __init__(self, name: str, priority: int) -> None:
        self.name = name
        self.priority = priority
        self.when: Condition | None = None
        self.method = ""
        self.location: CredentialLocation | None = None
        self.index: ApiKeyIndex | None = None
        self.plain: Value | None = None
        self.x509: TrustedCAs | None = None
        self.jwt: JwtVerifier | None = None
        self.introspector: Introspector | None = None
        #: (property, value, overwrite) from `defaults` (False) and `overrides` (True)
        self.extensions: list[tuple[str, Value, bool]] = []
        self.challenge = ""


class _Authorizer:
    """One authorization rule."""

    __slots__ = ("name", "patterns", "priority", "rego", "when")

    def __init__(self, name: str, priority: int) -> None:
        self.name = name
        self.priority = priority
        self.when: Condition | None = None
        self.rego: RegoPolicy | None = None
        self.patterns: Condition | None = None

    def evaluate(self, ctx: EvalContext) -> tuple[bool, Any, str | None]:
        if self.rego is not None:
            return self.rego.evaluate(ctx.doc)
        if self.patterns is None or self.patterns.matches(ctx):
            return True, True, None
        return False, None, MSG_UNAUTHORIZED


class _Responder:
    """One `response.success.headers` or `response.success.filters` item."""

    __slots__ = ("as_header", "key", "name", "plain", "priority", "properties", "when")

    def __init__(self, name: str, priority: int, key: str, as_header: bool) -> None:
        self.name = name
        self.priority = priority
        self.key = key
        self.as_header = as_header
        self.when: Condition | None = None
        self.properties: list[tuple[str, Value]] | None = None
        self.plain: Value | None = None

    def build(self, ctx: EvalContext) -> Any:
        if self.properties is not None:
            return {name: value.resolve(ctx) for name, value in self.properties}
        assert self.plain is not None
        return self.plain.resolve(ctx)

    def header_value(self, obj: Any) -> str:
        if self.properties is not None:
            return to_string(obj)
        return _go_print(obj)


class _DenyWith:
    __slots__ = ("body", "code", "headers", "message")

    def __init__(self) -> None:
        self.code = 0
        self.message: Value | None = None
        self.body: Value | None = None
        self.headers: list[tuple[str, Value]] = []


def _go_print(value: Any) -> str:
    """Go's fmt "%v" for the scalars a plain response yields (JSON for containers)."""
    if value is None:
        return "<nil>"
    if isinstance(value, (dict, list, tuple)):
        return to_json(value)
    return to_string(value)


def _stringify(value: Any) -> str:
    """Authorino's StringifyJSON: strings as is, null as "", the rest as JSON text."""
    return to_string(value)


def _groups(items: Sequence[Any]) -> list[list[Any]]:
    """Items grouped by priority (ascending), each group in name order."""
    ordered = sorted(items, key=lambda item: (item.priority, item.name))
    groups: list[list[Any]] = []
    for item in ordered:
        if groups and groups[-1][0].priority == item.priority:
            groups[-1].append(item)
        else:
            groups.append([item])
    return groups


def _priority(spec: Mapping[str, Any], policy: str, where: str) -> int:
    raw = spec.get("priority", 0) or 0
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise AuthConfigError(policy, where, f"priority must be an integer, not {raw!r}")
    return raw


def _mapping(value: Any, policy: str, where: str) -> Mapping[str, Any]:
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise AuthConfigError(policy, where, "expected an object")
    return value


class _Compiler:
    def __init__(
        self,
        policy: str,
        secrets: Sequence[SecretRecord],
        system_namespace: str,
        patterns: Mapping[str, Sequence[Mapping[str, Any]]],
        key_sets: KeySets | None = None,
    ) -> None:
        self.policy = policy
        self.key_sets = key_sets or KeySet
        self.secrets = secrets
        self.system_namespace = system_namespace
        self.patterns = patterns
        #: top-level keys of the authorization JSON something reads; None: anything
        self.roots: set[str] | None = set()

    def note(self, item: Value | Condition | RegoPolicy | None) -> None:
        if item is None or self.roots is None:
            return
        if item.roots is None:
            self.roots = None
        else:
            self.roots |= item.roots

    def value(self, spec: Any, where: str) -> Value:
        value = compile_value(spec, self.policy, where)
        self.note(value)
        return value

    def conditions(self, spec: Any, where: str) -> Condition | None:
        cond = compile_conditions(spec, self.patterns, self.policy, where)
        self.note(cond)
        return cond

    # -- authentication ---------------------------------------------------------------------

    def source(self, name: str, spec: Any) -> _Source:
        where = f"rules.authentication.{name}"
        spec = _mapping(spec, self.policy, where)
        src = _Source(name, _priority(spec, self.policy, where))
        src.when = self.conditions(spec.get("when"), f"{where}.when")
        methods = [m for m in _IDENTITY_METHODS if spec.get(m) is not None]
        if not methods:
            raise AuthConfigError(
                self.policy,
                where,
                f"unknown authentication method (expected one of {', '.join(_IDENTITY_METHODS)})",
            )
        method = src.method = methods[0]
        if method in _UNSUPPORTED_IDENTITY:
            raise AuthConfigError(
                self.policy,
                where,
                f"{method} authentication is not supported here: {_UNSUPPORTED_IDENTITY[method]}",
            )
        location = compile_credentials(spec.get("credentials"), self.policy, f"{where}.credentials")
        src.challenge = f'{location.identifier} realm="{name}"'
        if method == "apiKey":
            options = _mapping(spec["apiKey"], self.policy, f"{where}.apiKey")
            matches = compile_label_selector(
                options.get("selector"), self.policy, f"{where}.apiKey.selector"
            )
            namespace = None if options.get("allNamespaces") else self.system_namespace
            src.location = location
            src.index = ApiKeyIndex(self.secrets, matches, namespace)
        elif method == "x509":
            options = _mapping(spec["x509"], self.policy, f"{where}.x509")
            if options.get("source"):
                raise AuthConfigError(
                    self.policy,
                    f"{where}.x509.source",
                    "a certificate source other than the TLS connection is not supported "
                    "here: tokengateway terminates TLS itself, and a certificate in a header "
                    "or an expression is whatever the client wrote there",
                )
            matches = compile_label_selector(
                options.get("selector"), self.policy, f"{where}.x509.selector"
            )
            namespace = None if options.get("allNamespaces") else self.system_namespace
            src.x509 = TrustedCAs(self.secrets, matches, namespace)
            src.challenge = f'Certificate realm="{name}"'
        elif method == "jwt":
            src.location = location
            src.jwt = JwtVerifier(
                self.key_set(_mapping(spec["jwt"], self.policy, f"{where}.jwt"), f"{where}.jwt")
            )
        elif method == "oauth2Introspection":
            src.location = location
            src.introspector = self.introspector(spec, f"{where}.oauth2Introspection")
        elif method == "plain":
            options = _mapping(spec["plain"], self.policy, f"{where}.plain")
            if bool(options.get("selector")) == bool(options.get("expression")):
                raise AuthConfigError(
                    self.policy, f"{where}.plain", "use exactly one of: selector, expression"
                )
            src.plain = self.value(options, f"{where}.plain")
            # Authorino's challenge for a plain identity names its selector/expression
            pattern = options.get("expression") or options.get("selector")
            src.challenge = f'{pattern} realm="{name}"'
        for key, overwrite in (("defaults", False), ("overrides", True)):
            props = _mapping(spec.get(key), self.policy, f"{where}.{key}")
            for prop in sorted(props):
                value = self.value(props[prop], f"{where}.{key}.{prop}")
                src.extensions.append((str(prop), value, overwrite))
        return src

    def metadata(self, name: str, spec: Any) -> HttpMetadata:
        where = f"rules.metadata.{name}"
        spec = _mapping(spec, self.policy, where)
        for method in ("userInfo", "uma"):
            if spec.get(method) is not None:
                raise AuthConfigError(
                    self.policy,
                    where,
                    f"{method} metadata is not supported here (only http): skipping it would "
                    "change authorization results",
                )
        if spec.get("http") is None:
            raise AuthConfigError(self.policy, where, "expected `http`")
        options = _mapping(spec["http"], self.policy, f"{where}.http")
        where = f"{where}.http"
        for key in ("sharedSecretRef", "oauth2", "credentials"):
            if options.get(key):
                raise AuthConfigError(
                    self.policy,
                    f"{where}.{key}",
                    "credentials for the metadata call are not supported here; send them "
                    "with `headers`",
                )
        url, expression = options.get("url"), options.get("urlExpression")
        if bool(url) == bool(expression):
            raise AuthConfigError(self.policy, where, "use exactly one of: url, urlExpression")
        if url:
            if not isinstance(url, str) or not url.startswith(("http://", "https://")):
                raise AuthConfigError(
                    self.policy, f"{where}.url", f"must be an http(s) URL, not {url!r}"
                )
            target = (
                self.value({"selector": url}, f"{where}.url")
                if is_template(url)
                else self.value({"value": url}, f"{where}.url")
            )
        else:
            target = self.value({"expression": expression}, f"{where}.urlExpression")
        method = str(options.get("method") or "GET").upper()
        if method not in ("GET", "POST"):
            raise AuthConfigError(self.policy, f"{where}.method", "must be GET or POST")
        content_type = str(options.get("contentType") or FORM)
        if content_type not in (FORM, JSON):
            raise AuthConfigError(self.policy, f"{where}.contentType", f"must be {FORM} or {JSON}")
        body = None
        if options.get("body") is not None:
            body = self.value(options["body"], f"{where}.body")
        params = _mapping(options.get("bodyParameters"), self.policy, f"{where}.bodyParameters")
        headers = _mapping(options.get("headers"), self.policy, f"{where}.headers")
        timeout = options.get("timeout")
        timeout = int(DEFAULT_TIMEOUT * 1000) if timeout is None else timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
            raise AuthConfigError(
                self.policy, f"{where}.timeout", f"must be a whole number >= 0, not {timeout!r}"
            )
        cache = spec.get("cache")
        keep_for = None
        if cache is not None:
            ttl = _mapping(cache, self.policy, f"rules.metadata.{name}.cache").get("ttl") or 60
            if isinstance(ttl, bool) or not isinstance(ttl, (int, float)) or ttl < 0:
                raise AuthConfigError(
                    self.policy, f"rules.metadata.{name}.cache.ttl", "must be a number >= 0"
                )
            keep_for = float(ttl)
        rule = HttpMetadata(
            name,
            _priority(spec, self.policy, f"rules.metadata.{name}"),
            url=target,
            method=method,
            body=body,
            parameters=[
                (str(k), self.value(params[k], f"{where}.bodyParameters.{k}")) for k in params
            ],
            content_type=content_type,
            headers=[(str(h), self.value(headers[h], f"{where}.headers.{h}")) for h in headers],
            timeout=timeout / 1000 if timeout else 3600.0,
            keep_for=keep_for,
        )
        rule.when = self.conditions(spec.get("when"), f"rules.metadata.{name}.when")
        return rule

    def introspector(self, spec: Mapping[str, Any], where: str) -> Introspector:
        options = _mapping(spec["oauth2Introspection"], self.policy, where)
        endpoint = options.get("endpoint")
        if not isinstance(endpoint, str) or not endpoint.startswith(("http://", "https://")):
            raise AuthConfigError(
                self.policy, f"{where}.endpoint", f"must be an http(s) URL, not {endpoint!r}"
            )
        ref = _mapping(options.get("credentialsRef"), self.policy, f"{where}.credentialsRef")
        name = ref.get("name")
        found = [s for s in self.secrets if s.namespace == self.system_namespace and s.name == name]
        if not name or not found:
            raise AuthConfigError(
                self.policy,
                f"{where}.credentialsRef",
                f"needs the name of a Secret in {self.system_namespace} with clientID and "
                f"clientSecret (not found: {name!r})",
            )
        client_id, secret = found[0].data.get("clientID"), found[0].data.get("clientSecret")
        if not client_id or not secret:
            raise AuthConfigError(
                self.policy,
                f"{where}.credentialsRef",
                f"the Secret {self.system_namespace}/{name} needs clientID and clientSecret",
            )
        timeout = options.get("timeout")
        timeout = int(DEFAULT_TIMEOUT * 1000) if timeout is None else timeout
        if isinstance(timeout, bool) or not isinstance(timeout, int) or timeout < 0:
            raise AuthConfigError(
                self.policy, f"{where}.timeout", f"must be a whole number >= 0, not {timeout!r}"
            )
        cache = _mapping(spec.get("cache"), self.policy, where.rpartition(".")[0] + ".cache")
        keep_for = cache.get("ttl") or DEFAULT_KEEP
        if isinstance(keep_for, bool) or not isinstance(keep_for, (int, float)) or keep_for < 0:
            raise AuthConfigError(
                self.policy, f"{where}.cache.ttl", f"must be a number >= 0, not {keep_for!r}"
            )
        return Introspector(
            endpoint,
            str(client_id),
            str(secret),
            hint=str(options.get("tokenTypeHint") or "access_token"),
            timeout=timeout / 1000 if timeout else 3600.0,
            keep_for=float(keep_for),
        )

    def key_set(self, options: Mapping[str, Any], where: str) -> KeySet:
        issuer, jwks = options.get("issuerUrl") or None, options.get("jwksUrl") or None
        if (issuer is None) == (jwks is None):
            raise AuthConfigError(self.policy, where, "use exactly one of: issuerUrl, jwksUrl")
        for name, url in (("issuerUrl", issuer), ("jwksUrl", jwks)):
            if url is not None and (
                not isinstance(url, str) or not url.startswith(("http://", "https://"))
            ):
                raise AuthConfigError(
                    self.policy, f"{where}.{name}", f"must be an http(s) URL, not {url!r}"
                )
        ttl = options.get("ttl") or 0
        timeout = options.get("timeout") or int(DEFAULT_TIMEOUT * 1000)
        for name, number in (("ttl", ttl), ("timeout", timeout)):
            if isinstance(number, bool) or not isinstance(number, int) or number < 0:
                raise AuthConfigError(
                    self.policy, f"{where}.{name}", f"must be a whole number >= 0, not {number!r}"
                )
        return self.key_sets(issuer, jwks, float(ttl), timeout / 1000)

    # -- authorization ----------------------------------------------------------------------

    def authorizer(self, name: str, spec: Any) -> _Authorizer:
        where = f"rules.authorization.{name}"
        spec = _mapping(spec, self.policy, where)
        az = _Authorizer(name, _priority(spec, self.policy, where))
        az.when = self.conditions(spec.get("when"), f"{where}.when")
        for method, why in _UNSUPPORTED_AUTHZ.items():
            if spec.get(method) is not None:
                raise AuthConfigError(
                    self.policy, where, f"{method} authorization is not supported here: {why}"
                )
        if spec.get("opa") is not None:
            opa = _mapping(spec["opa"], self.policy, f"{where}.opa")
            if opa.get("externalPolicy"):
                raise AuthConfigError(
                    self.policy,
                    f"{where}.opa",
                    "externalPolicy is not supported here: it downloads the policy over HTTP; "
                    "inline it as `rego`",
                )
            version = opa.get("version") or "v0"
            if version not in ("v0", "v1"):
                raise AuthConfigError(
                    self.policy, f"{where}.opa", f"unsupported OPA Rego version: {version}"
                )
            rego = opa.get("rego")
            if not isinstance(rego, str) or not rego.strip():
                raise AuthConfigError(self.policy, f"{where}.opa", "`rego` is required")
            az.rego = RegoPolicy(
                rego,
                policy=self.policy,
                rule=f"{where}.opa.rego",
                all_values=bool(opa.get("allValues")),
            )
            self.note(az.rego)
        elif spec.get("patternMatching") is not None:
            pm = _mapping(spec["patternMatching"], self.policy, f"{where}.patternMatching")
            az.patterns = self.conditions(pm.get("patterns"), f"{where}.patternMatching.patterns")
        else:
            raise AuthConfigError(
                self.policy, where, "unknown authorization method (expected opa or patternMatching)"
            )
        return az

    # -- response ---------------------------------------------------------------------------

    def responder(self, name: str, spec: Any, where: str, as_header: bool) -> _Responder:
        spec = _mapping(spec, self.policy, where)
        key = str(spec.get("key") or name)
        item = _Responder(name, _priority(spec, self.policy, where), key, as_header)
        item.when = self.conditions(spec.get("when"), f"{where}.when")
        if spec.get("wristband") is not None:
            raise AuthConfigError(
                self.policy, where, "wristband responses are not supported here (signed tokens)"
            )
        if spec.get("json") is not None:
            body = _mapping(spec["json"], self.policy, f"{where}.json")
            props = _mapping(body.get("properties"), self.policy, f"{where}.json.properties")
            item.properties = [
                (str(prop), self.value(props[prop], f"{where}.json.properties.{prop}"))
                for prop in props
            ]
        elif spec.get("plain") is not None:
            item.plain = self.value(spec["plain"], f"{where}.plain")
        else:
            raise AuthConfigError(self.policy, where, "expected `json` or `plain`")
        return item

    def deny_with(self, spec: Any, where: str) -> _DenyWith | None:
        if spec is None:
            return None
        spec = _mapping(spec, self.policy, where)
        deny = _DenyWith()
        code = spec.get("code") or 0
        if isinstance(code, bool) or not isinstance(code, int) or (code and not 300 <= code <= 599):
            raise AuthConfigError(
                self.policy, f"{where}.code", f"must be an integer from 300 to 599, not {code!r}"
            )
        deny.code = code
        if spec.get("message") is not None:
            deny.message = self.value(spec["message"], f"{where}.message")
        if spec.get("body") is not None:
            deny.body = self.value(spec["body"], f"{where}.body")
        headers = _mapping(spec.get("headers"), self.policy, f"{where}.headers")
        deny.headers = [(str(h), self.value(headers[h], f"{where}.headers.{h}")) for h in headers]
        return deny


def compile_auth(
    name: str,
    rules: Mapping[str, Any] | None,
    when: Sequence[Mapping[str, str]] | None,
    secrets: Sequence[SecretRecord],
    system_namespace: str,
    *,
    patterns: Mapping[str, Sequence[Mapping[str, Any]]] | None = None,
    key_sets: KeySets | None = None,
) -> AuthEngine:
    """Compile an AuthPolicy's `rules` (and top-level `when`) into an engine.

    `name` is "namespace/policy" for messages; `patterns` is the policy's `spec.patterns`, for
    `patternRef`s; `key_sets` gives `jwt` rules their keys (a new KeySet each by default).
    Raises AuthConfigError naming the policy, the rule and the reason.
    """
    rules = _mapping(rules, name, "rules")
    unknown = [key for key in rules if key not in _SECTIONS]
    if unknown:
        raise AuthConfigError(
            name, f"rules.{unknown[0]}", f"unknown section (expected one of {', '.join(_SECTIONS)})"
        )
    if rules.get("callbacks"):
        first = next(iter(_mapping(rules["callbacks"], name, "rules.callbacks")))
        raise AuthConfigError(
            name,
            f"rules.callbacks.{first}",
            "callbacks are not supported here: they call HTTP endpoints",
        )
    compiler = _Compiler(name, secrets, system_namespace, patterns or {}, key_sets)

    top_when: list[cel.Predicate] = []
    for i, item in enumerate(when or ()):
        source = item.get("predicate") if isinstance(item, Mapping) else None
        if not isinstance(source, str) or not source.strip():
            raise AuthConfigError(name, f"when[{i}]", "expected {predicate: <CEL expression>}")
        try:
            top_when.append(cel.compile_predicate(source))
        except cel.CelCompileError as exc:
            raise AuthConfigError(name, f"when[{i}]", f"invalid CEL predicate: {exc}") from None

    authentication = _mapping(rules.get("authentication"), name, "rules.authentication")
    if authentication:
        sources = [compiler.source(str(n), s) for n, s in authentication.items()]
    else:
        # Authorino's default when a config has no authentication: anonymous access
        sources = [compiler.source("anonymous", {"anonymous": {}})]
    metadata = _mapping(rules.get("metadata"), name, "rules.metadata")
    fetchers = [compiler.metadata(str(n), s) for n, s in metadata.items()]
    authorization = _mapping(rules.get("authorization"), name, "rules.authorization")
    authorizers = [compiler.authorizer(str(n), s) for n, s in authorization.items()]

    response = _mapping(rules.get("response"), name, "rules.response")
    extra = [k for k in response if k not in ("unauthenticated", "unauthorized", "success")]
    if extra:
        raise AuthConfigError(
            name,
            f"rules.response.{extra[0]}",
            "unknown section (expected unauthenticated, unauthorized, success)",
        )
    success = _mapping(response.get("success"), name, "rules.response.success")
    extra = [k for k in success if k not in ("headers", "filters")]
    if extra:
        raise AuthConfigError(
            name,
            f"rules.response.success.{extra[0]}",
            "unknown section (expected headers, filters)",
        )
    responders: list[_Responder] = []
    for section, as_header in (("headers", True), ("filters", False)):
        items = _mapping(success.get(section), name, f"rules.response.success.{section}")
        for item_name, spec in items.items():
            where = f"rules.response.success.{section}.{item_name}"
            responders.append(compiler.responder(str(item_name), spec, where, as_header))
    unauthenticated = compiler.deny_with(
        response.get("unauthenticated"), "rules.response.unauthenticated"
    )
    unauthorized = compiler.deny_with(response.get("unauthorized"), "rules.response.unauthorized")

    # the request body is seen as `request.size` / `context.request.http.size` and through
    # `requestBodyJSON`: a policy whose text names neither can be decided from the head
    # alone (conservative: "size" anywhere counts, as does anything that reads everything)
    roots = compiler.roots
    for predicate in top_when:
        roots = None if roots is None else roots | predicate.uses
    text = repr((when, rules, patterns))  # a patternRef's patterns are read too
    reads_body = (
        roots is None
        or "requestBodyJSON" in text
        or (bool(roots & {"request", "context"}) and "size" in text)
    )

    return AuthEngine(
        name=name,
        when=top_when,
        sources=sources,
        authorizers=authorizers,
        responders=responders,
        metadata=fetchers,
        unauthenticated=unauthenticated,
        unauthorized=unauthorized,
        needs_context=compiler.roots is None or "context" in compiler.roots,
        reads_body=reads_body,
        # nothing but the identity (and what follows from it) is read, and no Rego policy
        # reads a clock: the decision is a function of the API key
        per_key=compiler.roots is not None
        and not fetchers  # what a service answers may change from one request to the next
        and compiler.roots <= {"auth"}
        and all(az.rego is None or az.rego.pure for az in authorizers),
    )


#: decisions kept per API key and engine (the oldest goes first when full)
KEPT_DECISIONS = 4096


class AuthEngine:
    """A compiled AuthPolicy; `evaluate` is synchronous, thread-safe and allocation-light."""

    __slots__ = (
        "_authz_groups",
        "_challenges",
        "_kept",
        "_kept_jwt",
        "_metadata_groups",
        "_needs_context",
        "_response_groups",
        "_single_source",
        "_source_groups",
        "_unauthenticated",
        "_unauthorized",
        "_when",
        "name",
        "reads_body",
    )

    def __init__(
        self,
        *,
        name: str,
        when: list[cel.Predicate],
        sources: list[_Source],
        authorizers: list[_Authorizer],
        responders: list[_Responder],
        metadata: Sequence[HttpMetadata] = (),
        unauthenticated: _DenyWith | None,
        unauthorized: _DenyWith | None,
        needs_context: bool,
        per_key: bool = False,
        reads_body: bool = True,
    ) -> None:
        self.name = name
        #: whether a decision may depend on the request body (its size, requestBodyJSON):
        #: when not, the gateway decides before reading the body
        self.reads_body = reads_body
        self._when = tuple(when)
        self._source_groups = _groups(sources)
        self._single_source = len(sources) == 1
        self._challenges = [
            (HEADER_CHALLENGE, src.challenge) for group in self._source_groups for src in group
        ]
        self._authz_groups = _groups(authorizers)
        self._response_groups = _groups(responders)
        self._metadata_groups = _groups(metadata)
        self._unauthenticated = unauthenticated
        self._unauthorized = unauthorized
        self._needs_context = needs_context
        #: decisions by the digest of the API key, when they depend on nothing else: one
        #: apiKey rule, and every condition, value and policy reads only `auth`
        self._kept: dict[bytes, AuthDecision] | None = None
        #: for a `jwt` rule, decisions by the token's digest, each with the time it ends
        #: (the token's `exp`), its key set and that set's generation when it was made
        self._kept_jwt: dict[bytes, tuple[AuthDecision, float, KeySet, int]] | None = None
        if per_key and len(sources) == 1 and sources[0].index is not None:
            self._kept = {}
        elif per_key and len(sources) == 1 and sources[0].jwt is not None:
            self._kept_jwt = {}

    @property
    def identity_sources(self) -> list[str]:
        """Authentication rule names, in evaluation order."""
        return [src.name for group in self._source_groups for src in group]

    def api_keys(self) -> dict[str, list[str]]:
        """For each apiKey rule, the Secrets ("namespace/name") it trusts."""
        return {
            src.name: list(src.index.secrets)
            for group in self._source_groups
            for src in group
            if src.index is not None
        }

    def client_cas(self) -> list[str]:
        """The CA certificates (PEM) the `x509` rules trust: a TLS listener in front of
        this policy asks clients for a certificate signed by one of them."""
        return [
            pem
            for group in self._source_groups
            for src in group
            if src.x509 is not None
            for pem in src.x509.pem
        ]

    def __repr__(self) -> str:
        return f"AuthEngine({self.name!r}, sources={self.identity_sources})"

    # -- per request ------------------------------------------------------------------------

    def evaluate(self, req: AuthRequest) -> AuthDecision:
        return self.decide(req.headers, req.path, lambda: req)

    def decide(
        self, headers: Mapping[str, str], path: str, request: Callable[[], AuthRequest]
    ) -> AuthDecision:
        """`evaluate(request())`, where `request` is called only when no decision kept for
        the API key in `headers` / `path` (the path with its query) answers first."""
        req: AuthRequest | None = None
        if self._when:
            req = request()
            activation = cel.Activation(req.well_known or {})
            for predicate in self._when:
                if not predicate.test(activation):
                    return AuthDecision(allowed=True, status=200, applied=False)
        if self._kept_jwt is not None:
            return self._decide_jwt(headers, path, req, request)
        key = self._key(headers, path)
        if key is not None:
            found = self._kept.get(key)  # type: ignore[union-attr]
            if found is not None:
                return found
        decision = self._evaluate(req or request())
        if key is not None and decision.status != 401:
            self._keep(key, decision)
        return decision

    def _decide_jwt(
        self,
        headers: Mapping[str, str],
        path: str,
        req: AuthRequest | None,
        request: Callable[[], AuthRequest],
    ) -> AuthDecision:
        """`decide` for a policy whose one rule is `jwt`: a token's decision is kept until
        the token expires or its key set changes, so its signature is checked once."""
        kept = self._kept_jwt
        assert kept is not None
        src = self._source_groups[0][0]
        credential = src.location.extract(headers, path)
        key = None if credential is None else digest(credential)
        if key is not None:
            found = kept.get(key)
            if found is not None:
                decision, until, keys, generation = found
                if time.time() <= until and keys.generation == generation:
                    return decision
                kept.pop(key, None)
        decision = self._evaluate(req or request())
        # kept only once the token was verified (not for a 401, whatever code it was given)
        if credential is not None and key is not None and decision.identity_source is not None:
            expires = token_expiry(credential)
            if expires is not None:
                keys = src.jwt.keys
                keep(kept, key, (decision, expires, keys, keys.generation), KEPT_DECISIONS)
        return decision

    def known(self, headers: Mapping[str, str], path: str) -> AuthDecision | None:
        """The decision kept for this request's API key, if the engine keeps decisions per
        key and has one (None also when a top-level `when` must be tested first)."""
        if self._when:
            return None
        if self._kept_jwt is not None:
            credential = self._source_groups[0][0].location.extract(headers, path)
            found = None if credential is None else self._kept_jwt.get(digest(credential))
            if found is None:
                return None
            decision, until, keys, generation = found
            fresh = time.time() <= until and keys.generation == generation
            return decision if fresh else None
        key = self._key(headers, path)
        return None if key is None else self._kept.get(key)  # type: ignore[union-attr]

    def _key(self, headers: Mapping[str, str], path: str) -> bytes | None:
        """The digest decisions are kept by: None when this engine keeps none, or the
        request has no credential."""
        if self._kept is None:
            return None
        credential = self._source_groups[0][0].location.extract(headers, path)
        return None if credential is None else digest(credential)

    def _keep(self, key: bytes, decision: AuthDecision) -> None:
        """Keep a decision for a key the index knows (never for unknown keys)."""
        kept = self._kept
        assert kept is not None
        if self._source_groups[0][0].index.lookup_digest(key) is None:
            return
        keep(kept, key, decision, KEPT_DECISIONS)

    def _evaluate(self, req: AuthRequest) -> AuthDecision:
        ctx = EvalContext(self._document(req))
        auth: dict[str, Any] = ctx.doc["auth"]

        # 1. authentication
        pending: list[Any] = []
        found = self._authenticate(ctx, req, pending)
        if isinstance(found, str):
            denied = self._deny(
                ctx, 401, found, self._challenges, self._unauthenticated, None, None
            )
            if not pending:
                return denied
            return replace(
                denied,
                refresh_keys=tuple(p for p in pending if isinstance(p, KeySet)),
                introspect=tuple(p for p in pending if not isinstance(p, KeySet)),
            )
        source, public, location = found

        # 1b. metadata: the calls this request needs and no answer is kept for yet are
        # handed to the gateway, which makes them and asks again (auth/metadata.py)
        if self._metadata_groups:
            calls = self._metadata(ctx, req.request_id)
            if calls:
                return AuthDecision(
                    allowed=False,
                    status=503,
                    reason=MSG_METADATA_PENDING,
                    deny_headers=[(HEADER_REASON, MSG_METADATA_PENDING)],
                    metadata_calls=tuple(calls),
                )

        # 2. authorization
        for group in self._authz_groups:
            for az in group:
                if az.when is not None and not az.when.matches(ctx):
                    continue
                allowed, result, error = az.evaluate(ctx)
                if not allowed:
                    return self._deny(
                        ctx, 403, error or MSG_UNAUTHORIZED, [], self._unauthorized, source, public
                    )
                auth.setdefault("authorization", {})[az.name] = result
                ctx.changed()

        # 3. success responses
        filters: dict[str, Any] = {}
        headers: dict[str, str] = {}
        for group in self._response_groups:
            for item in group:
                if item.when is not None and not item.when.matches(ctx):
                    continue
                try:
                    obj = item.build(ctx)
                except ResolveError:
                    continue  # Authorino drops a response item that fails to build
                auth.setdefault("response", {})[item.name] = obj
                ctx.changed()
                if item.as_header:
                    headers[item.key] = item.header_value(obj)
                else:
                    filters[item.key] = obj
        return AuthDecision(
            allowed=True,
            status=200,
            success_headers=list(headers.items()),
            auth=filters,
            identity=public,
            identity_source=source,
            credential=location,
        )

    def _metadata(self, ctx: EvalContext, request_id: str) -> list[MetadataCall]:
        """Fill `auth.metadata` with the answers kept; the calls still to make (those of
        the first priority group that has any: later groups may read its answers)."""
        auth = ctx.doc["auth"]
        for group in self._metadata_groups:
            calls = []
            for rule in group:
                if rule.when is not None and not rule.when.matches(ctx):
                    continue
                try:
                    call = rule.call(ctx, request_id)
                except ResolveError:
                    continue  # Authorino logs it and goes on without this metadata
                found = rule.answer(call)
                if found is None:
                    calls.append(call)
                elif found[0]:
                    auth.setdefault("metadata", {})[rule.name] = found[1]
                    ctx.changed()
            if calls:
                return calls
        return []

    def _document(self, req: AuthRequest) -> dict[str, Any]:
        """Authorino's authorization JSON for this request (before any auth phase)."""
        well_known = req.well_known or {}
        headers = dict(req.headers)
        # Envoy hands Authorino the HTTP/2-style pseudo-headers too
        headers.setdefault(":authority", req.host)
        headers.setdefault(":method", req.method)
        headers.setdefault(":path", req.path)
        headers.setdefault(":scheme", req.scheme)
        given = well_known.get("request")
        request: dict[str, Any] = dict(given) if isinstance(given, Mapping) else {}
        request.setdefault("id", req.request_id)
        request.setdefault("method", req.method)
        request.setdefault("path", req.path)
        request.setdefault("host", req.host)
        request.setdefault("scheme", req.scheme)
        request["headers"] = headers
        user_agent = headers.get("user-agent")
        if user_agent:
            request["user_agent"] = user_agent
        referer = headers.get("referer")
        if referer:
            request["referer"] = referer
        source = well_known.get("source")
        if not isinstance(source, Mapping):
            source = {"address": req.source_address, "port": req.source_port}
        destination = well_known.get("destination")
        if not isinstance(destination, Mapping):
            destination = {"address": req.destination_address, "port": req.destination_port}
        doc: dict[str, Any] = {
            "request": request,
            "source": source,
            "destination": destination,
            "metadata": {},
            "auth": {},
        }
        if self._needs_context:
            doc["context"] = _envoy_context(req, headers, request)
        return doc

    def _authenticate(
        self, ctx: EvalContext, req: AuthRequest, pending: list[Any]
    ) -> tuple[str, dict[str, Any] | None, CredentialLocation | None] | str:
        """(rule name, public identity, where its credential was) on success, else the
        X-Ext-Auth-Reason."""
        errors: dict[str, str] = {}
        for group in self._source_groups:
            for src in group:
                if src.when is not None and not src.when.matches(ctx):
                    continue
                _, public, error = self._resolve(src, ctx, req, pending)
                if error is None:
                    return src.name, public, src.location
                if self._single_source:
                    return error
                errors[src.name] = error
        return to_json(errors)

    @staticmethod
    def _resolve(
        src: _Source, ctx: EvalContext, req: AuthRequest, pending: list[Any]
    ) -> tuple[Any, dict[str, Any] | None, str | None]:
        """Resolve one rule: (identity, redacted identity, None) or (None, None, error).
        A `jwt` rule whose key set may lack the token's key adds the set to `pending`; an
        `oauth2Introspection` rule with no answer for the token, (introspector, token)."""
        public: dict[str, Any] | None
        if src.index is not None:
            assert src.location is not None
            credential = src.location.extract(req.headers, req.path)
            if credential is None:
                return None, None, MSG_CREDENTIAL_NOT_FOUND
            hit = src.index.lookup(credential)
            if hit is None:
                return None, None, MSG_INVALID_API_KEY
            identity, public = hit
        elif src.jwt is not None:
            assert src.location is not None
            credential = src.location.extract(req.headers, req.path)
            if credential is None:
                return None, None, MSG_CREDENTIAL_NOT_FOUND
            verified = src.jwt.verify(credential)
            if verified.claims is None:
                if verified.unknown_key:
                    pending.append(src.jwt.keys)
                return None, None, verified.error
            identity = public = verified.claims
        elif src.introspector is not None:
            assert src.location is not None
            credential = src.location.extract(req.headers, req.path)
            if credential is None:
                return None, None, MSG_CREDENTIAL_NOT_FOUND
            answer = src.introspector.answer(credential)
            if answer is None:
                pending.append((src.introspector, credential))
                return None, None, MSG_INTROSPECTION_PENDING
            if answer.claims is None:
                return None, None, answer.error
            identity = public = answer.claims
        elif src.x509 is not None:
            subject, error = src.x509.check(req.client_certificate)
            if subject is None:
                return None, None, error
            identity = public = subject
        elif src.plain is not None:
            try:
                identity = src.plain.resolve(ctx)
            except ResolveError:
                identity = None
            if identity is None:
                return None, None, MSG_NO_PLAIN_IDENTITY
            public = identity if isinstance(identity, dict) else None
        else:
            identity = {"anonymous": True}
            public = identity
        auth = ctx.doc["auth"]
        auth["identity"] = identity
        ctx.changed()
        if src.extensions:
            if not isinstance(identity, dict):
                del auth["identity"]
                ctx.changed()
                return None, None, "the identity object is not a JSON object: cannot extend it"
            extended = dict(identity)
            try:
                for prop, value, overwrite in src.extensions:
                    if overwrite or prop not in extended:
                        extended[prop] = value.resolve(ctx)
            except ResolveError as exc:
                del auth["identity"]
                ctx.changed()
                return None, None, str(exc)
            identity = extended
            auth["identity"] = identity
            ctx.changed()
            public = _redacted(identity)
        return identity, public, None

    def _deny(
        self,
        ctx: EvalContext,
        status: int,
        reason: str,
        headers: list[tuple[str, str]],
        custom: _DenyWith | None,
        source: str | None,
        public: dict[str, Any] | None,
    ) -> AuthDecision:
        message = body = None
        if custom is not None:
            if custom.code:
                status = custom.code
            if custom.message is not None:
                message = reason = _stringify(_resolve_quietly(custom.message, ctx))
            if custom.body is not None:
                body = _stringify(_resolve_quietly(custom.body, ctx))
            if custom.headers:
                headers = [
                    (name, _stringify(_resolve_quietly(value, ctx)))
                    for name, value in custom.headers
                ]
        return AuthDecision(
            allowed=False,
            status=status,
            reason=reason,
            deny_headers=[*headers, (HEADER_REASON, reason)],
            message=message,
            body=body,
            identity=public,
            identity_source=source,
        )


def _resolve_quietly(value: Value, ctx: EvalContext) -> Any:
    """Authorino ignores errors resolving deny values (the value becomes null)."""
    try:
        return value.resolve(ctx)
    except ResolveError:
        return None


def _redacted(identity: dict[str, Any]) -> dict[str, Any]:
    data = identity.get("data")
    if identity.get("kind") == "Secret" and isinstance(data, dict):
        return {**identity, "data": dict.fromkeys(data, REDACTED)}
    return identity


def _envoy_context(
    req: AuthRequest, headers: dict[str, str], request: Mapping[str, Any]
) -> dict[str, Any]:
    """Envoy's CheckRequest attributes as Authorino serialises them (the `context` key)."""
    now = time.time_ns()
    http: dict[str, Any] = {
        "id": req.request_id,
        "method": req.method,
        "headers": headers,
        "path": req.path,
        "host": req.host,
        "scheme": req.scheme,
        "protocol": request.get("protocol") or "HTTP/1.1",
    }
    size = request.get("size")
    if isinstance(size, int) and size > 0:
        http["size"] = size
    source = _peer(req.source_address, req.source_port)
    if req.client_certificate:  # Envoy's source.certificate: the URL-encoded PEM
        source["certificate"] = quote(req.client_certificate, safe="")
    return {
        "source": source,
        "destination": _peer(req.destination_address, req.destination_port),
        "request": {
            "time": {"seconds": now // 1_000_000_000, "nanos": now % 1_000_000_000},
            "http": http,
        },
        "metadata_context": {},
    }


def _peer(address: str, port: int) -> dict[str, Any]:
    socket: dict[str, Any] = {"address": address}
    if port:
        socket["PortSpecifier"] = {"PortValue": port}
    return {"address": {"Address": {"SocketAddress": socket}}}
