"""Shared building blocks: base models, object metadata, name rules, durations, selectors.

Field names are the manifest keys (camelCase) so code reads `spec.targetRef.name` exactly as the
YAML says it; a key that is a Python keyword gets a trailing underscore plus an alias.
"""

import re
from collections.abc import Callable, Iterable
from datetime import date, datetime
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)
from pydantic_core import InitErrorDetails, PydanticCustomError

from tokengateway.expr.duration import WINDOW_PATTERN, parse_window

__all__ = [
    "DURATION_PATTERN",
    "WINDOW_PATTERN",
    "Duration",
    "K8sModel",
    "LabelSelector",
    "LabelSelectorRequirement",
    "NameRule",
    "ObjectMeta",
    "Predicate",
    "StrictModel",
    "name_problem",
    "parse_window",
]

# Kuadrant's Rate.window and Gateway API's Duration share this pattern (GEP-2257).
DURATION_PATTERN = WINDOW_PATTERN

CUSTOM_ERROR = "manifest"
"""pydantic error type of every problem raised by our own rules (as opposed to pydantic's)."""


Duration = Annotated[str, StringConstraints(pattern=DURATION_PATTERN)]


# --- raising several problems from one validator ---------------------------------------------


def issue(loc: tuple[str | int, ...], message: str, value: Any = None) -> InitErrorDetails:
    """One problem at `loc` (relative to the model being validated)."""
    return InitErrorDetails(
        type=PydanticCustomError(CUSTOM_ERROR, "{reason}", {"reason": message}),
        loc=loc,
        input=value,
    )


def raise_issues(title: str, problems: list[InitErrorDetails]) -> None:
    """Raise all `problems` at once (pydantic re-roots their locations under the field)."""
    if problems:
        raise ValidationError.from_exception_data(title, problems)


def merge_issues(
    title: str,
    data: Any,
    handler: ValidatorFunctionWrapHandler,
    rules: Callable[[dict[str, Any]], list[InitErrorDetails]],
) -> Any:
    """Run field validation and object-level `rules` together, reporting both.

    Kubernetes evaluates a CRD's CEL rules even when a nested field is invalid, so a user sees
    "limits and defaults are mutually exclusive" together with a bad window, not one per try.
    """
    problems = rules(data) if isinstance(data, dict) else []
    try:
        result = handler(data)
    except ValidationError as exc:
        if not problems:
            raise
        raise ValidationError.from_exception_data(
            title, [*problems, *_as_init_details(exc)]
        ) from None
    raise_issues(title, problems)
    return result


def _as_init_details(exc: ValidationError) -> list[InitErrorDetails]:
    out: list[InitErrorDetails] = []
    for err in exc.errors(include_url=False):
        if err["type"] == CUSTOM_ERROR:
            out.append(issue(err["loc"], err["msg"], err.get("input")))
            continue
        detail = InitErrorDetails(type=err["type"], loc=err["loc"], input=err.get("input"))
        if "ctx" in err:
            detail["ctx"] = err["ctx"]
        try:  # pydantic can rebuild its own error types from their context...
            ValidationError.from_exception_data("check", [detail])
        except Exception:  # ...but if one cannot be, keep its message
            detail = issue(err["loc"], err["msg"], err.get("input"))
        out.append(detail)
    return out


def present(data: dict[str, Any], key: str) -> bool:
    """CEL `has(self.key)` on a manifest: a null value counts as absent, as in Kubernetes."""
    return data.get(key) is not None


def nonempty(data: Any, key: str) -> bool:
    """CEL `has(self.key) && size(self.key) > 0`."""
    value = data.get(key) if isinstance(data, dict) else None
    return isinstance(value, dict | list | str) and len(value) > 0


# --- base models --------------------------------------------------------------------------------


class K8sModel(BaseModel):
    """Lenient about keys we do not model (Kubernetes objects carry many), strict about types.

    Types are strict like the API server's: `limit: "50"` or `port: "80"` is an error, not a
    silent conversion. A null value means "not set", as it does in Kubernetes.
    """

    model_config = ConfigDict(strict=True, extra="ignore", populate_by_name=True)

    @model_validator(mode="before")
    @classmethod
    def _nulls_are_unset(cls, data: Any) -> Any:
        if isinstance(data, dict) and any(v is None for v in data.values()):
            known = cls._known_keys()
            return {k: v for k, v in data.items() if v is not None or k not in known}
        return data

    @classmethod
    def _known_keys(cls) -> frozenset[str]:
        keys = _KNOWN_KEYS.get(cls)
        if keys is None:
            names = {f.alias or n for n, f in cls.model_fields.items()} | set(cls.model_fields)
            keys = _KNOWN_KEYS[cls] = frozenset(names)
        return keys


_KNOWN_KEYS: dict[type[BaseModel], frozenset[str]] = {}


class StrictModel(K8sModel):
    """Rejects unknown keys, for structures whose CRD schema is closed (kubectl rejects them)."""

    model_config = ConfigDict(extra="forbid")


# --- names --------------------------------------------------------------------------------------

NameRule = Literal["subdomain", "label", "dns1035"]

_NAME_RULES: dict[str, tuple[re.Pattern[str], int, str]] = {
    "subdomain": (
        re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*"),
        253,
        "a DNS-1123 subdomain: lower-case letters, digits, '-' and '.', starting and ending "
        "with a letter or digit",
    ),
    "label": (
        re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"),
        63,
        "a DNS-1123 label: lower-case letters, digits and '-', starting and ending with a "
        "letter or digit",
    ),
    "dns1035": (
        re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?"),
        63,
        "a DNS-1035 label: lower-case letters, digits and '-', starting with a letter and "
        "ending with a letter or digit",
    ),
}
_SHELL_VAR_RE = re.compile(r"\$(\{[A-Za-z_][A-Za-z0-9_]*\}|[A-Za-z_][A-Za-z0-9_]*|\(.*\))")


def shell_variable_hint(value: str) -> str | None:
    """Explain a `${VAR}` left in a manifest: kubectl applies it verbatim, it never expands it."""
    found = _SHELL_VAR_RE.search(value)
    if not found:
        return None
    return (
        f"{found.group(0)} looks like an unexpanded shell variable: kubectl does not expand "
        "environment variables in manifests, so expand it first (for example with envsubst)"
    )


def name_problem(value: str, rule: NameRule) -> str | None:
    """Why `value` is not a valid Kubernetes name under `rule`, or None if it is."""
    pattern, max_len, description = _NAME_RULES[rule]
    if value == "":
        return "must not be empty"
    if (hint := shell_variable_hint(value)) is not None:
        return f'"{value}": {hint}'
    if not pattern.fullmatch(value):
        return f'"{value}" is not {description}'
    if len(value) > max_len:
        return f'"{value}" is longer than {max_len} characters'
    return None


_QUALIFIED_NAME_RE = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_LABEL_VALUE_RE = re.compile(r"(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?")


def qualified_name_problem(key: str) -> str | None:
    """Label and annotation keys: optional DNS-subdomain prefix, '/', name of <= 63 chars."""
    prefix, _, name = key.rpartition("/")
    if "/" in key and (prefix == "" or name_problem(prefix, "subdomain") is not None):
        return f'"{key}": the prefix before "/" must be a DNS-1123 subdomain'
    if len(name) > 63 or not _QUALIFIED_NAME_RE.fullmatch(name):
        return (
            f'"{key}": the name part must be at most 63 letters, digits, "-", "_" or ".", '
            "starting and ending with a letter or digit"
        )
    return None


# --- metadata -----------------------------------------------------------------------------------


class ObjectMeta(K8sModel):
    """metadata of a namespaced object whose name is a DNS-1123 subdomain.

    After validation `namespace` is never None for a namespaced object: a missing one becomes
    `"default"`, as with kubectl's default context. Subclasses change the name rule and scope.
    """

    NAME_RULE: ClassVar[NameRule] = "subdomain"
    NAMESPACED: ClassVar[bool] = True
    DEFAULT_NAMESPACE: ClassVar[str] = "default"

    name: str
    namespace: str | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)
    generation: int | None = None
    creationTimestamp: str | None = None

    @field_validator("creationTimestamp", mode="before")
    @classmethod
    def _timestamp_text(cls, value: Any) -> Any:
        # Only reachable when a caller hands us objects parsed by a timestamp-aware loader.
        if isinstance(value, datetime):
            return value.isoformat().replace("+00:00", "Z")
        if isinstance(value, date):
            return value.isoformat()
        return value

    @field_validator("name")
    @classmethod
    def _valid_name(cls, value: str) -> str:
        if (problem := name_problem(value, cls.NAME_RULE)) is not None:
            raise PydanticCustomError(CUSTOM_ERROR, "{reason}", {"reason": problem})
        return value

    @field_validator("namespace")
    @classmethod
    def _valid_namespace(cls, value: str | None) -> str | None:
        if value is not None and cls.NAMESPACED and (problem := name_problem(value, "label")):
            raise PydanticCustomError(CUSTOM_ERROR, "{reason}", {"reason": problem})
        return value

    @field_validator("labels")
    @classmethod
    def _valid_labels(cls, labels: dict[str, str]) -> dict[str, str]:
        problems = []
        for key, value in labels.items():
            if (problem := qualified_name_problem(key)) is not None:
                problems.append(issue((key,), f"invalid label key {problem}"))
            if len(value) > 63 or not _LABEL_VALUE_RE.fullmatch(value):
                problems.append(
                    issue(
                        (key,),
                        f'invalid label value "{value}": at most 63 letters, digits, "-", "_" '
                        'or ".", starting and ending with a letter or digit',
                    )
                )
        raise_issues("labels", problems)
        return labels

    @field_validator("annotations")
    @classmethod
    def _valid_annotations(cls, annotations: dict[str, str]) -> dict[str, str]:
        problems = [
            issue((key,), f"invalid annotation key {problem}")
            for key in annotations
            if (problem := qualified_name_problem(key)) is not None
        ]
        raise_issues("annotations", problems)
        return annotations

    @model_validator(mode="after")
    def _scope(self) -> "ObjectMeta":
        if not self.NAMESPACED:
            self.namespace = None
        elif self.namespace is None:
            self.namespace = self.DEFAULT_NAMESPACE
        return self


class ClusterObjectMeta(ObjectMeta):
    """metadata of a cluster-scoped object named by a DNS-1123 label (a Namespace)."""

    NAME_RULE: ClassVar[NameRule] = "label"
    NAMESPACED: ClassVar[bool] = False


class ServiceObjectMeta(ObjectMeta):
    """Services are named by DNS-1035 labels (they become DNS names starting with a letter)."""

    NAME_RULE: ClassVar[NameRule] = "dns1035"


# --- shared spec pieces -------------------------------------------------------------------------


class LabelSelectorRequirement(StrictModel):
    """One `matchExpressions` entry; rules as in Kubernetes' label selector validation."""

    key: str
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: list[str] = Field(default_factory=list)

    @model_validator(mode="after")
    def _values_fit_operator(self) -> "LabelSelectorRequirement":
        if self.operator in ("In", "NotIn") and not self.values:
            raise_issues(
                "matchExpressions",
                [issue(("values",), f"must be non-empty when operator is {self.operator}")],
            )
        if self.operator in ("Exists", "DoesNotExist") and self.values:
            raise_issues(
                "matchExpressions",
                [issue(("values",), f"must be empty when operator is {self.operator}")],
            )
        return self


class LabelSelector(StrictModel):
    """A Kubernetes label selector; an empty selector matches everything."""

    matchLabels: dict[str, str] = Field(default_factory=dict)
    matchExpressions: list[LabelSelectorRequirement] = Field(default_factory=list)

    def matches(self, labels: dict[str, str]) -> bool:
        """Whether an object with `labels` is selected."""
        if any(labels.get(k) != v for k, v in self.matchLabels.items()):
            return False
        for req in self.matchExpressions:
            has = req.key in labels
            if req.operator == "In" and not (has and labels[req.key] in req.values):
                return False
            if req.operator == "NotIn" and has and labels[req.key] in req.values:
                return False
            if req.operator == "Exists" and not has:
                return False
            if req.operator == "DoesNotExist" and has:
                return False
        return True


NonEmptyStr = Annotated[str, StringConstraints(min_length=1)]


class Predicate(StrictModel):
    """A CEL predicate (`when` entry of Kuadrant policies); CRD: minLength 1."""

    predicate: NonEmptyStr


def unique(values: Iterable[Any]) -> set[Any]:
    """The values that occur more than once."""
    seen: set[Any] = set()
    dup: set[Any] = set()
    for v in values:
        (dup if v in seen else seen).add(v)
    return dup


def check_each(check: Callable[[Any], str | None]) -> AfterValidator:
    """An AfterValidator raising `check(value)`'s message when it returns one."""

    def run(value: Any) -> Any:
        if (problem := check(value)) is not None:
            raise PydanticCustomError(CUSTOM_ERROR, "{reason}", {"reason": problem})
        return value

    return AfterValidator(run)
