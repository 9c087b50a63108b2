"""From loaded documents to typed resources, all or nothing.

Every document is validated, every problem is collected, and a single `ManifestError` lists
them all: a half-loaded configuration (a policy without the route it targets, say) would
enforce something the user did not write.
"""

import copy
import json
import re
import types
from typing import Annotated, Any, Union, get_args, get_origin

from pydantic import BaseModel, ValidationError

from .common import CUSTOM_ERROR, shell_variable_hint
from .coordination import Lease
from .core import ConfigMap, Deployment, Namespace, Secret, Service
from .errors import ManifestError, ManifestIssue
from .gateway_api import BackendTLSPolicy, Gateway, GatewayClass, HTTPRoute, ReferenceGrant
from .kuadrant import AuthPolicy, Kuadrant, RateLimitPolicy, TokenRateLimitPolicy
from .loader import Document
from .resource import Resource

__all__ = ["MODEL_BY_KIND", "SUPPORTED_KINDS", "parse_resources"]

MODEL_BY_KIND: dict[str, type[Resource]] = {
    cls.KIND: cls
    for cls in (
        Kuadrant,
        Namespace,
        Gateway,
        HTTPRoute,
        Service,
        Deployment,
        Secret,
        AuthPolicy,
        TokenRateLimitPolicy,
        RateLimitPolicy,
        GatewayClass,
        Lease,
        ReferenceGrant,
        ConfigMap,
        BackendTLSPolicy,
    )
}
SUPPORTED_KINDS: tuple[str, ...] = tuple(MODEL_BY_KIND)


def parse_resources(docs: list[Document]) -> list[Resource]:
    """Validate every document into its model, in order.

    Raises `ManifestError` with every problem of every document (unknown kinds, wrong
    apiVersions, schema and CEL-rule violations, duplicates of one kind/namespace/name).
    """
    resources: list[Resource] = []
    issues: list[ManifestIssue] = []
    first_seen: dict[tuple[str, str, str], str] = {}
    for doc in docs:
        resource, problems = _parse_document(doc)
        issues += problems
        if resource is not None:
            resources.append(resource)
        identity = _identity(doc.obj)
        if identity is None:
            continue
        if identity in first_seen:
            kind, _, _ = identity
            issues.append(
                ManifestIssue(
                    doc.source,
                    kind,
                    _display_name(doc.obj),
                    "",
                    f"defined twice: also in {first_seen[identity]} (same kind, namespace and "
                    "name)",
                )
            )
        else:
            first_seen[identity] = doc.source
    if issues:
        raise ManifestError(issues)
    return resources


def _parse_document(doc: Document) -> tuple[Resource | None, list[ManifestIssue]]:
    obj = doc.obj
    kind = obj.get("kind")
    name = _display_name(obj)

    def problem(field: str, reason: str) -> list[ManifestIssue]:
        return [
            ManifestIssue(doc.source, kind if isinstance(kind, str) else "", name, field, reason)
        ]

    supported = ", ".join(SUPPORTED_KINDS)
    if kind is None or kind == "":
        return None, problem("kind", f"required (supported kinds: {supported})")
    if not isinstance(kind, str):
        return None, problem("kind", f"must be a string (supported kinds: {supported})")
    cls = MODEL_BY_KIND.get(kind)
    if cls is None:
        guess = next((k for k in SUPPORTED_KINDS if k.lower() == kind.lower()), None)
        hint = f' (did you mean "{guess}"?)' if guess else ""
        return None, problem(
            "kind", f'unsupported kind "{kind}"{hint}; supported kinds: {supported}'
        )
    try:
        resource = cls.model_validate(obj)
    except ValidationError as exc:
        return None, [
            ManifestIssue(doc.source, kind, name, field, reason)
            for field, reason in _describe(exc, cls)
        ]
    resource.source = doc.source
    resource.raw = copy.deepcopy(obj)
    return resource, []


def _model_of(obj: dict[str, Any]) -> type[Resource] | None:
    kind = obj.get("kind")
    return MODEL_BY_KIND.get(kind) if isinstance(kind, str) else None


def _identity(obj: dict[str, Any]) -> tuple[str, str, str] | None:
    """(kind, namespace, name) from the raw document, for duplicate detection."""
    cls = _model_of(obj)
    meta = obj.get("metadata")
    if cls is None or not isinstance(meta, dict):
        return None
    name, ns = meta.get("name"), meta.get("namespace")
    if not isinstance(name, str) or not name:
        return None
    if not cls.namespaced():
        return (cls.KIND, "", name)
    return (cls.KIND, ns if isinstance(ns, str) and ns else "default", name)


def _display_name(obj: dict[str, Any]) -> str:
    meta = obj.get("metadata")
    if not isinstance(meta, dict) or not isinstance(meta.get("name"), str):
        return ""
    name = meta["name"]
    cls = _model_of(obj)
    if cls is not None and not cls.namespaced():
        return name
    ns = meta.get("namespace")
    return f"{ns if isinstance(ns, str) and ns else 'default'}/{name}"


# --- turning pydantic errors into field paths and reasons --------------------------------------

_PLAIN_KEY_RE = re.compile(r"[A-Za-z0-9_-]+")


def _describe(exc: ValidationError, cls: type[BaseModel]) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    for err in exc.errors(include_url=False):
        loc = list(err["loc"])
        key_problem = bool(loc) and loc[-1] == "[key]"
        if key_problem:
            loc.pop()
        reason = _reason(err, cls, tuple(loc))
        out.append((_format_path(loc), f"invalid key: {reason}" if key_problem else reason))
    return out


def _format_path(loc: list[str | int]) -> str:
    """`spec.limits.free.rates[0].window`; map keys that are not plain words go in brackets."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif _PLAIN_KEY_RE.fullmatch(part):
            path += f".{part}" if path else part
        else:
            path += f"[{part}]"
    return path


def _reason(err: Any, cls: type[BaseModel], loc: tuple[str | int, ...]) -> str:
    kind = err["type"]
    ctx = err.get("ctx") or {}
    value = err.get("input")
    if kind == CUSTOM_ERROR:
        return str(err["msg"])
    if kind in ("value_error", "assertion_error") and "error" in ctx:
        return str(ctx["error"])
    if kind == "missing":
        return "required"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(cls, loc[:-1])
        listing = f" (allowed: {', '.join(allowed)})" if allowed else ""
        return f'unknown field "{loc[-1]}"{listing}'
    if kind == "string_pattern_mismatch":
        text = f"{_show(value)} does not match {ctx.get('pattern')}"
        hint = shell_variable_hint(value) if isinstance(value, str) else None
        return f"{text}: {hint}" if hint else text
    if kind == "literal_error":
        return f"unsupported value {_show(value)}: expected {ctx.get('expected')}"
    if kind == "string_too_short":
        n = ctx.get("min_length", 1)
        return "must not be empty" if n == 1 else f"must be at least {n} characters"
    if kind == "string_too_long":
        return f"must be at most {ctx.get('max_length')} characters"
    if kind == "too_short":
        return f"must have at least {ctx.get('min_length')} item(s)"
    if kind == "too_long":
        return f"must have at most {ctx.get('max_length')} item(s)"
    if kind in _COMPARISONS:
        bound = next(iter(ctx.values()), "?")
        return f"must be {_COMPARISONS[kind]} {bound}, got {_show(value)}"
    expected = _TYPE_NAMES.get(kind)
    if expected is not None:
        return f"must be {expected}, got {_type_of(value)}"
    return str(err["msg"])


_COMPARISONS = {
    "greater_than_equal": ">=",
    "greater_than": ">",
    "less_than_equal": "<=",
    "less_than": "<",
}
_TYPE_NAMES = {
    "string_type": "a string",
    "int_type": "an integer",
    "int_from_float": "an integer",
    "bool_type": "a boolean",
    "dict_type": "an object",
    "model_type": "an object",
    "model_attributes_type": "an object",
    "list_type": "a list",
    "float_type": "a number",
}


def _type_of(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return f"boolean {str(value).lower()}"
    if isinstance(value, int | float):
        return f"number {value}"
    if isinstance(value, str):
        return f"string {_show(value)}"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _show(value: Any) -> str:
    try:
        return json.dumps(value, ensure_ascii=False)
    except (TypeError, ValueError):
        return repr(value)


def _allowed_keys(cls: type[BaseModel], loc: tuple[str | int, ...]) -> list[str]:
    """The keys the model at `loc` accepts, to list them next to an unknown one."""
    tp: Any = cls
    for part in loc:
        tp = _unwrap(tp)
        if isinstance(tp, type) and issubclass(tp, BaseModel):
            field = next((f for n, f in tp.model_fields.items() if part in (n, f.alias)), None)
            if field is None:
                return []
            tp = field.annotation
        elif get_origin(tp) is list and isinstance(part, int):
            tp = get_args(tp)[0]
        elif get_origin(tp) is dict:
            tp = get_args(tp)[1]
        else:
            return []
    tp = _unwrap(tp)
    if not (isinstance(tp, type) and issubclass(tp, BaseModel)):
        return []
    hidden = {"source", "raw"}
    return sorted(f.alias or n for n, f in tp.model_fields.items() if n not in hidden)


def _unwrap(tp: Any) -> Any:
    """Strip Annotated[...] and Optional[...] down to the type that holds the data."""
    while True:
        origin = get_origin(tp)
        if origin is Annotated:
            tp = get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            args = [a for a in get_args(tp) if a is not type(None)]
            if len(args) != 1:
                return tp
            tp = args[0]
        else:
            return tp
