"""Authorino's value and condition building blocks, compiled once.

- values (`ValueOrSelector`): a static `value`, a GJSON `selector` (or an Authorino string
  template such as ``"Hello, {auth.identity.name}!"``), or a CEL `expression`;
- conditions (`when`, `patternMatching.patterns`): `selector`/`operator`/`value` patterns,
  CEL `predicate`s, `patternRef`s and nested `all`/`any` groups.

Everything reads the per-request authorization JSON held by an :class:`EvalContext`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from tokengateway.auth.model import AuthConfigError
from tokengateway.auth.selector import (
    MISSING,
    Selector,
    SelectorError,
    as_array,
    compile_selector,
    to_string,
)
from tokengateway.expr import cel

__all__ = [
    "Condition",
    "EvalContext",
    "ResolveError",
    "Value",
    "compile_conditions",
    "compile_value",
]


class ResolveError(Exception):
    """A CEL expression that errored at request time (Authorino treats it as a failure)."""


class EvalContext:
    """Per-request state: the authorization JSON, plus a CEL activation kept in step with it."""

    __slots__ = ("_act", "_act_version", "doc", "version")

    def __init__(self, doc: dict[str, Any]) -> None:
        self.doc = doc
        self.version = 0
        self._act: cel.Activation | None = None
        self._act_version = -1

    def changed(self) -> None:
        """Call after mutating doc["auth"], so CEL sees the new state."""
        self.version += 1

    def activation(self) -> cel.Activation:
        if self._act is None or self._act_version != self.version:
            doc = self.doc
            self._act = cel.Activation(
                {
                    "request": doc.get("request") or {},
                    "source": doc.get("source") or {},
                    "destination": doc.get("destination") or {},
                    "metadata": doc.get("metadata") or {},
                    "auth": doc.get("auth") or {},
                }
            )
            self._act_version = self.version
        return self._act


# --------------------------------------------------------------------------------------------
# Values


class Value:
    """A compiled `ValueOrSelector`."""

    __slots__ = ()
    #: top-level keys of the authorization JSON this value reads (None: unknown/any)
    roots: frozenset[str] | None = frozenset()

    def resolve(self, ctx: EvalContext) -> Any:
        raise NotImplementedError


class StaticValue(Value):
    __slots__ = ("value",)

    def __init__(self, value: Any) -> None:
        self.value = value

    def resolve(self, ctx: EvalContext) -> Any:
        return self.value


class SelectorValue(Value):
    """A GJSON path; a path that does not resolve gives null, as in Authorino."""

    __slots__ = ("roots", "selector")

    def __init__(self, selector: Selector) -> None:
        self.selector = selector
        self.roots = frozenset({selector.root}) if selector.root is not None else None

    def resolve(self, ctx: EvalContext) -> Any:
        value = self.selector.get(ctx.doc)
        return None if value is MISSING else value


class TemplateValue(Value):
    """A string with `{path}` placeholders, each replaced by the path's value as text."""

    __slots__ = ("parts", "roots")

    def __init__(self, parts: list[str | Selector]) -> None:
        self.parts = parts
        roots: set[str] = set()
        for part in parts:
            if isinstance(part, Selector):
                if part.root is None:
                    self.roots = None
                    return
                roots.add(part.root)
        self.roots = frozenset(roots)

    def resolve(self, ctx: EvalContext) -> Any:
        doc = ctx.doc
        return "".join(
            part if isinstance(part, str) else to_string(part.get(doc)) for part in self.parts
        )


class CelValue(Value):
    __slots__ = ("expression", "roots")

    def __init__(self, expression: cel.Expression) -> None:
        self.expression = expression
        self.roots = expression.uses

    def resolve(self, ctx: EvalContext) -> Any:
        value = self.expression.evaluate(ctx.activation())
        if value is MISSING:
            raise ResolveError(f"CEL expression {self.expression.source!r} could not be evaluated")
        return value


_MODIFIER_BRACES = re.compile(r"[^@]+@[0-9A-Za-z_]+:\{")


def is_template(pattern: str) -> bool:
    """Authorino's rule: a template has at least one `{` that does not open a modifier's args."""
    return len(_MODIFIER_BRACES.findall(pattern)) != pattern.count("{")


def _template_parts(pattern: str) -> list[str]:
    """Split a template into literal text and placeholder paths (odd indices).

    `\\` escapes the next character outside placeholders; braces nest inside placeholders;
    an unterminated placeholder is dropped (Authorino's behaviour).
    """
    parts: list[str] = []
    literal: list[str] = []
    buffer: list[str] = []
    inside = escaping = False
    depth = 0
    for ch in pattern:
        if ch == "{":
            if escaping:
                literal.append(ch)
            elif inside:
                buffer.append(ch)
                depth += 1
            else:
                inside = True
            escaping = False
        elif ch == "}":
            if inside and depth:
                buffer.append(ch)
                depth -= 1
            elif inside:
                if buffer:
                    parts.append("".join(literal))
                    parts.append("".join(buffer))
                    literal, buffer = [], []
                inside = False
            else:
                literal.append(ch)
            escaping = False
        elif ch == "\\":
            if inside:
                buffer.append(ch)
            else:
                if escaping:
                    literal.append(ch)
                escaping = not escaping
        else:
            (buffer if inside else literal).append(ch)
            escaping = False
    parts.append("".join(literal))
    return parts


def compile_selector_value(pattern: str, policy: str, where: str) -> Value:
    try:
        if not is_template(pattern):
            return SelectorValue(compile_selector(pattern))
        raw = _template_parts(pattern)
        parts: list[str | Selector] = [
            compile_selector(text) if i % 2 else text for i, text in enumerate(raw) if text or i % 2
        ]
    except SelectorError as exc:
        raise AuthConfigError(policy, where, f"invalid selector {pattern!r}: {exc}") from None
    return TemplateValue(parts)


def compile_cel_expression(source: str, policy: str, where: str) -> cel.Expression:
    try:
        return cel.compile_expression(source)
    except cel.CelCompileError as exc:
        raise AuthConfigError(policy, where, f"invalid CEL expression: {exc}") from None


def compile_value(spec: Any, policy: str, where: str) -> Value:
    """`expression` wins over `selector`, which wins over `value` (Authorino's precedence)."""
    if not isinstance(spec, Mapping):
        raise AuthConfigError(
            policy, where, "expected an object with `value`, `selector` or `expression`"
        )
    expression = spec.get("expression")
    if expression:
        return CelValue(compile_cel_expression(str(expression), policy, where))
    selector = spec.get("selector")
    if selector:
        return compile_selector_value(str(selector), policy, where)
    return StaticValue(spec.get("value"))


# --------------------------------------------------------------------------------------------
# Conditions


class Condition:
    """A compiled condition tree; `matches` never raises."""

    __slots__ = ()
    roots: frozenset[str] | None = frozenset()

    def matches(self, ctx: EvalContext) -> bool:
        raise NotImplementedError


class PatternCondition(Condition):
    __slots__ = ("operator", "regex", "roots", "selector", "value")

    def __init__(self, selector: Selector, operator: str, value: str) -> None:
        self.selector = selector
        self.operator = operator
        self.value = value
        self.regex = re.compile(_re2_to_python(value)) if operator == "matches" else None
        self.roots = frozenset({selector.root}) if selector.root is not None else None

    def matches(self, ctx: EvalContext) -> bool:
        obtained = self.selector.get(ctx.doc)
        op = self.operator
        if op == "eq":
            return to_string(obtained) == self.value
        if op == "neq":
            return to_string(obtained) != self.value
        if op == "incl":
            return any(to_string(item) == self.value for item in as_array(obtained))
        if op == "excl":
            return all(to_string(item) != self.value for item in as_array(obtained))
        assert self.regex is not None
        return self.regex.search(to_string(obtained)) is not None


class CelCondition(Condition):
    __slots__ = ("predicate", "roots")

    def __init__(self, predicate: cel.Predicate) -> None:
        self.predicate = predicate
        self.roots = predicate.uses

    def matches(self, ctx: EvalContext) -> bool:
        return self.predicate.test(ctx.activation())


class AllCondition(Condition):
    __slots__ = ("items", "roots")

    def __init__(self, items: Sequence[Condition]) -> None:
        self.items = tuple(items)
        self.roots = _merge_roots(self.items)

    def matches(self, ctx: EvalContext) -> bool:
        return all(item.matches(ctx) for item in self.items)


class AnyCondition(Condition):
    __slots__ = ("items", "roots")

    def __init__(self, items: Sequence[Condition]) -> None:
        self.items = tuple(items)
        self.roots = _merge_roots(self.items)

    def matches(self, ctx: EvalContext) -> bool:
        return any(item.matches(ctx) for item in self.items)


def _merge_roots(items: Sequence[Condition | Value]) -> frozenset[str] | None:
    roots: set[str] = set()
    for item in items:
        if item.roots is None:
            return None
        roots |= item.roots
    return frozenset(roots)


def _re2_to_python(pattern: str) -> str:
    # RE2's end-of-text anchor is \z; Python spells it \Z
    return re.sub(r"(?<!\\)((?:\\\\)*)\\z", r"\1\\Z", pattern)


_OPERATORS = ("eq", "neq", "incl", "excl", "matches")


def _pattern(spec: Mapping[str, Any], policy: str, where: str) -> Condition:
    operator = str(spec.get("operator") or "")
    if operator not in _OPERATORS:
        raise AuthConfigError(
            policy,
            where,
            f"unknown operator {operator!r} (expected one of {', '.join(_OPERATORS)})",
        )
    source = str(spec.get("selector") or "")
    try:
        selector = compile_selector(source)
    except SelectorError as exc:
        raise AuthConfigError(policy, where, f"invalid selector {source!r}: {exc}") from None
    value = spec.get("value")
    text = "" if value is None else to_string(value)
    try:
        return PatternCondition(selector, operator, text)
    except re.error as exc:
        raise AuthConfigError(
            policy, where, f"invalid regular expression {text!r}: {exc}"
        ) from None


def _conditions(
    items: Sequence[Any],
    named: Mapping[str, Sequence[Mapping[str, Any]]],
    policy: str,
    where: str,
) -> list[Condition]:
    out: list[Condition] = []
    for i, item in enumerate(items):
        at = f"{where}[{i}]"
        if not isinstance(item, Mapping):
            raise AuthConfigError(policy, at, "expected an object")
        ref = item.get("patternRef")
        if ref:
            if ref not in named:
                raise AuthConfigError(
                    policy, at, f"patternRef {ref!r} names no pattern in spec.patterns"
                )
            out.extend(
                _pattern(p, policy, f"patterns.{ref}[{j}]") for j, p in enumerate(named[ref] or ())
            )
        elif item.get("operator"):
            out.append(_pattern(item, policy, at))
        elif item.get("predicate"):
            try:
                predicate = cel.compile_predicate(str(item["predicate"]))
            except cel.CelCompileError as exc:
                raise AuthConfigError(policy, at, f"invalid CEL predicate: {exc}") from None
            out.append(CelCondition(predicate))
        # Authorino ignores an entry that is none of the above, then reads all/any beside it
        if item.get("all"):
            out.append(AllCondition(_conditions(item["all"], named, policy, f"{at}.all")))
        if item.get("any"):
            out.append(AnyCondition(_conditions(item["any"], named, policy, f"{at}.any")))
    return out


def compile_conditions(
    items: Sequence[Any] | None,
    named: Mapping[str, Sequence[Mapping[str, Any]]],
    policy: str,
    where: str,
) -> Condition | None:
    """All the items must hold; None when there is nothing to check."""
    if not items:
        return None
    if isinstance(items, (str, bytes)) or not isinstance(items, Sequence):
        raise AuthConfigError(policy, where, "expected a list of conditions")
    conditions = _conditions(items, named, policy, where)
    if not conditions:
        return None
    return conditions[0] if len(conditions) == 1 else AllCondition(conditions)
