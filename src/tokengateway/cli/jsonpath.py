"""kubectl's JSONPath templates (`-o jsonpath='{.status.conditions[?(@.type=="Ready")].status}'`).

Written from kubectl's behaviour (k8s.io/client-go/util/jsonpath) so the tutorial's commands
work unchanged:

* a template is literal text with `{...}` actions; `{"\\n"}` is a string literal;
* paths: `.field`, `['key']` / `["key"]`, `\\.` escaping a dot in a field name, `[n]` (negative
  counts from the end), `[start:end:step]`, `[*]` / `.*`, unions `[0,1]` / `['a','b']`, `..name`
  (recursive descent), filters `[?(@.type=="Accepted")]` with `== != < > <= >=` or existence
  `[?(@.reason)]`, `$` for the root and `@` for the current object;
* `{range .items[*]}...{end}` repeats its body for each result;
* missing fields, null values and indices out of range give nothing (kubectl's `get` allows
  missing keys), so a template over a partial object still prints what it can;
* several results of one action are separated by a space; maps and lists print as compact JSON.

One deliberate difference: a template without any `{` that starts with `.` or `$` is taken as
one expression (kubectl would print it literally, which nobody means).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Iterator
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

__all__ = ["JSONPathError", "Template", "compile_template", "find", "render"]


class JSONPathError(ValueError):
    """A template that cannot be parsed; the message says where, as kubectl's does."""


# --- path steps ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Field:
    name: str


@dataclass(frozen=True, slots=True)
class _Wildcard:
    pass


@dataclass(frozen=True, slots=True)
class _Descend:
    pass


@dataclass(frozen=True, slots=True)
class _Key:
    name: str


@dataclass(frozen=True, slots=True)
class _Index:
    index: int


@dataclass(frozen=True, slots=True)
class _Slice:
    start: int | None
    stop: int | None
    step: int | None


@dataclass(frozen=True, slots=True)
class _Union:
    parts: tuple[_Key | _Index | _Slice, ...]


@dataclass(frozen=True, slots=True)
class _Path:
    from_root: bool
    steps: tuple[Any, ...]


@dataclass(frozen=True, slots=True)
class _Literal:
    value: Any


@dataclass(frozen=True, slots=True)
class _Filter:
    left: _Path | _Literal
    op: str  # "exists" or a comparison
    right: _Path | _Literal | None


_OPERATORS = ("==", "!=", "<=", ">=", "<", ">")
_NUMBER = re.compile(r"^-?\d+(\.\d+)?([eE][-+]?\d+)?$")
_MISSING = object()


# --- template nodes ------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Text:
    text: str


@dataclass(frozen=True, slots=True)
class _Expr:
    path: _Path


@dataclass(frozen=True, slots=True)
class _Range:
    path: _Path
    body: tuple[Any, ...]


class Template:
    """A parsed template; `render` can be called for many objects."""

    def __init__(self, source: str, nodes: tuple[Any, ...]) -> None:
        self.source = source
        self._nodes = nodes

    def render(self, data: Any) -> str:
        """The template's text for `data` (an object, or a `kind: List`)."""
        out: list[str] = []
        _render_nodes(self._nodes, data, data, out)
        return "".join(out)

    def __repr__(self) -> str:
        return f"Template({self.source!r})"


def compile_template(template: str) -> Template:
    """Parse `template` once; raises `JSONPathError` with kubectl's wording."""
    text = template
    if "{" not in text and text.strip().startswith((".", "$")):
        text = "{" + text.strip() + "}"
    try:
        nodes, rest = _parse_nodes(_split(text), 0, in_range=False)
    except JSONPathError as exc:
        raise JSONPathError(f"error parsing jsonpath {template}, {exc}") from None
    assert rest is None
    return Template(template, nodes)


def render(template: str, data: Any) -> str:
    """Shortcut for `compile_template(template).render(data)`."""
    return compile_template(template).render(data)


def find(expression: str, data: Any) -> list[Any]:
    """Every value one expression (`.a.b[0]`, with or without braces) selects in `data`."""
    text = expression.strip()
    if text.startswith("{") and text.endswith("}"):
        text = text[1:-1]
    try:
        path = _parse_path(text.strip())
    except JSONPathError as exc:
        raise JSONPathError(f"error parsing jsonpath {expression}, {exc}") from None
    return _evaluate(path, data, data)


# --- parsing -------------------------------------------------------------------------------


def _split(template: str) -> list[tuple[str, str]]:
    """The template as ("text", ...) and ("action", ...) pieces; quotes and brackets may hold
    a `}`."""
    pieces: list[tuple[str, str]] = []
    text: list[str] = []
    i, n = 0, len(template)
    while i < n:
        if template[i] != "{":
            text.append(template[i])
            i += 1
            continue
        if text:
            pieces.append(("text", "".join(text)))
            text = []
        j = _scan(template, i + 1, "}")
        if j is None:
            raise JSONPathError("unclosed action")
        pieces.append(("action", template[i + 1 : j]))
        i = j + 1
    if text:
        pieces.append(("text", "".join(text)))
    return pieces


def _scan(text: str, start: int, stop: str) -> int | None:
    """Index of the first `stop` at bracket depth zero and outside quotes, from `start`."""
    depth = 0
    quote = ""
    i = start
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch == stop and depth == 0:
            return i
        elif ch in "[(":
            depth += 1
        elif ch in "])":
            depth -= 1
        i += 1
    return None


def _parse_nodes(
    pieces: list[tuple[str, str]], pos: int, in_range: bool
) -> tuple[tuple[Any, ...], int | None]:
    nodes: list[Any] = []
    while pos < len(pieces):
        kind, value = pieces[pos]
        pos += 1
        if kind == "text":
            nodes.append(_Text(value))
            continue
        action = value.strip()
        if action == "end":
            if not in_range:
                raise JSONPathError("not in range, nothing to end")
            return tuple(nodes), pos
        if action == "range" or action.startswith(("range ", "range\t")):
            path = _parse_path(action[5:].strip())
            body, after = _parse_nodes(pieces, pos, in_range=True)
            if after is None:
                raise JSONPathError("unclosed range")
            nodes.append(_Range(path, body))
            pos = after
        elif action[:1] in ("'", '"'):
            nodes.append(_Text(_unquote(action)))
        elif not action:
            raise JSONPathError("empty action")
        else:
            nodes.append(_Expr(_parse_path(action)))
    return tuple(nodes), None  # the caller reports an unclosed range


def _unquote(text: str) -> str:
    """A quoted literal, with Go's escapes (`\\n`, `\\t`, `\\"`, `\\u00e9`...)."""
    quote = text[0]
    if len(text) < 2 or text[-1] != quote:
        raise JSONPathError(f"unterminated quoted string {text}")
    body = text[1:-1]
    out: list[str] = []
    i = 0
    simple = {"n": "\n", "t": "\t", "r": "\r", "a": "\a", "b": "\b", "f": "\f", "v": "\v"}
    while i < len(body):
        ch = body[i]
        if ch != "\\" or i + 1 == len(body):
            out.append(ch)
            i += 1
            continue
        nxt = body[i + 1]
        if nxt in simple:
            out.append(simple[nxt])
            i += 2
        elif nxt in "xuU":
            size = {"x": 2, "u": 4, "U": 8}[nxt]
            digits = body[i + 2 : i + 2 + size]
            try:
                out.append(chr(int(digits, 16)))
            except ValueError:
                raise JSONPathError(f"invalid escape in {text}") from None
            i += 2 + size
        else:
            out.append(nxt)
            i += 2
    return "".join(out)


def _parse_path(text: str) -> _Path:
    if not text:
        raise JSONPathError("empty expression")
    i = 0
    from_root = False
    if text[0] == "$":
        from_root, i = True, 1
    elif text[0] == "@":
        i = 1
    steps: list[Any] = []
    n = len(text)
    while i < n:
        ch = text[i]
        if text.startswith("..", i):
            steps.append(_Descend())
            i += 2
            if i < n and text[i] not in ".[":
                i = _field(text, i, steps)
        elif ch == ".":
            i += 1
            if i < n and text[i] not in ".[":
                i = _field(text, i, steps)
        elif ch == "[":
            end = _scan(text, i + 1, "]")
            if end is None:
                raise JSONPathError(f"unterminated array in {text}")
            steps.append(_bracket(text[i + 1 : end].strip()))
            i = end + 1
        elif ch.isspace():
            raise JSONPathError(f"unrecognized character in action: {text[i:]!r}")
        elif i == 0:
            i = _field(text, i, steps)  # `metadata.name`: the leading dot forgotten
        else:
            raise JSONPathError(f"unrecognized character in action: {ch!r}")
    return _Path(from_root, tuple(steps))


def _field(text: str, i: int, steps: list[Any]) -> int:
    name: list[str] = []
    while i < len(text) and text[i] not in ".[":
        if text[i] == "\\" and i + 1 < len(text):
            name.append(text[i + 1])
            i += 2
            continue
        if text[i].isspace():
            raise JSONPathError(f"unrecognized character in action: {text[i:]!r}")
        name.append(text[i])
        i += 1
    value = "".join(name)
    steps.append(_Wildcard() if value == "*" else _Field(value))
    return i


def _bracket(content: str) -> Any:
    if content == "*":
        return _Wildcard()
    if content.startswith("?"):
        inner = content[1:].strip()
        if not (inner.startswith("(") and inner.endswith(")")):
            raise JSONPathError(f"invalid filter [{content}]: expected ?(...)")
        return _parse_filter(inner[1:-1].strip())
    parts: list[_Key | _Index | _Slice] = []
    for part in _split_commas(content):
        part = part.strip()
        if part[:1] in ("'", '"'):
            parts.append(_Key(_unquote(part)))
        elif ":" in part:
            bounds = part.split(":")
            if len(bounds) > 3:
                raise JSONPathError(f"invalid array index [{content}]")
            nums = [_int(b, content) if b.strip() else None for b in bounds] + [None]
            parts.append(_Slice(nums[0], nums[1], nums[2]))
        else:
            parts.append(_Index(_int(part, content)))
    return parts[0] if len(parts) == 1 else _Union(tuple(parts))


def _int(text: str, content: str) -> int:
    try:
        return int(text.strip())
    except ValueError:
        raise JSONPathError(f"invalid array index [{content}]") from None


def _split_commas(content: str) -> list[str]:
    parts: list[str] = []
    start = 0
    while True:
        end = _scan(content, start, ",")
        if end is None:
            parts.append(content[start:])
            return parts
        parts.append(content[start:end])
        start = end + 1


def _parse_filter(text: str) -> _Filter:
    position = _find_operator(text)
    if position is None:
        return _Filter(_operand(text), "exists", None)
    at, op = position
    left, right = text[:at].strip(), text[at + len(op) :].strip()
    if not left or not right:
        raise JSONPathError(f"invalid filter ?({text})")
    return _Filter(_operand(left), op, _operand(right))


def _find_operator(text: str) -> tuple[int, str] | None:
    quote = ""
    i = 0
    while i < len(text):
        ch = text[i]
        if quote:
            if ch == "\\":
                i += 2
                continue
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        else:
            for op in _OPERATORS:
                if text.startswith(op, i):
                    return i, op
        i += 1
    return None


def _operand(text: str) -> _Path | _Literal:
    if text[:1] in ("'", '"'):
        return _Literal(_unquote(text))
    if _NUMBER.match(text):
        number = float(text)
        return _Literal(int(text) if number.is_integer() and "." not in text else number)
    if text in ("true", "false"):
        return _Literal(text == "true")
    if text == "null":
        return _Literal(None)
    return _parse_path(text)


# --- evaluation ----------------------------------------------------------------------------


def _render_nodes(nodes: tuple[Any, ...], current: Any, root: Any, out: list[str]) -> None:
    for node in nodes:
        if isinstance(node, _Text):
            out.append(node.text)
        elif isinstance(node, _Expr):
            out.append(" ".join(_text(v) for v in _evaluate(node.path, current, root)))
        else:
            for item in _evaluate(node.path, current, root):
                _render_nodes(node.body, item, root, out)


def _evaluate(path: _Path, current: Any, root: Any) -> list[Any]:
    nodes = [root if path.from_root else current]
    for step in path.steps:
        nodes = list(_step(step, nodes, root))
    return [n for n in nodes if n is not None]


def _step(step: Any, nodes: list[Any], root: Any) -> Iterator[Any]:
    for node in nodes:
        if isinstance(step, _Field | _Key):
            if isinstance(node, dict):
                value = node.get(step.name)
                if value is not None:
                    yield value
        elif isinstance(step, _Wildcard):
            if isinstance(node, dict):
                yield from (v for v in node.values() if v is not None)
            elif isinstance(node, list):
                yield from node
        elif isinstance(step, _Index | _Slice):
            yield from _subscript(step, node)
        elif isinstance(step, _Union):
            for part in step.parts:
                yield from _step(part, [node], root)
        elif isinstance(step, _Descend):
            yield from _descendants(node)
        elif isinstance(step, _Filter) and isinstance(node, list):
            yield from (item for item in node if _matches(step, item, root))


def _subscript(step: _Index | _Slice, node: Any) -> Iterator[Any]:
    if not isinstance(node, list):
        return
    if isinstance(step, _Index):
        if -len(node) <= step.index < len(node):
            yield node[step.index]
        return
    if step.step == 0:
        return
    yield from node[step.start : step.stop : step.step]


def _descendants(node: Any) -> Iterator[Any]:
    yield node
    children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else ()
    for child in children:
        yield from _descendants(child)


def _matches(flt: _Filter, item: Any, root: Any) -> bool:
    left = _operand_values(flt.left, item, root)
    if flt.op == "exists":
        return bool(left)
    right = _operand_values(flt.right, item, root) if flt.right is not None else []
    if not left or not right:
        return False
    return _compare(flt.op, left[0], right[0])


def _operand_values(operand: _Path | _Literal, item: Any, root: Any) -> list[Any]:
    if isinstance(operand, _Literal):
        return [operand.value]
    return _evaluate(operand, item, root)


def _compare(op: str, a: Any, b: Any) -> bool:
    """Values of different types are simply unequal (kubectl would fail the whole command)."""
    numbers = (
        isinstance(a, int | float)
        and isinstance(b, int | float)
        and not isinstance(a, bool)
        and not isinstance(b, bool)
    )
    same = numbers or type(a) is type(b)
    if op == "==":
        return same and a == b
    if op == "!=":
        return not (same and a == b)
    if not same or not isinstance(a, int | float | str) or isinstance(a, bool):
        return False
    if op == "<":
        return bool(a < b)
    if op == ">":
        return bool(a > b)
    if op == "<=":
        return bool(a <= b)
    return bool(a >= b)


def _text(value: Any) -> str:
    """A result as kubectl prints it: Go's `fmt.Print` for scalars, compact JSON otherwise."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, str):
        return value
    text = json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _go_float(value: float) -> str:
    """Go's `%v` for a float64: shortest digits, exponent form below 1e-4 and from 1e6."""
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    if value == 0:
        return "0"
    sign, digits, exponent = Decimal(repr(value)).normalize().as_tuple()
    assert isinstance(exponent, int)
    text = "".join(map(str, digits))
    point = len(text) + exponent  # position of the decimal point from the first digit
    minus = "-" if sign else ""
    x = point - 1
    if x < -4 or x >= 6:
        mantissa = text[0] + ("." + text[1:] if len(text) > 1 else "")
        return f"{minus}{mantissa}e{'-' if x < 0 else '+'}{abs(x):02d}"
    if point <= 0:
        return f"{minus}0.{'0' * -point}{text}"
    if point >= len(text):
        return f"{minus}{text}{'0' * (point - len(text))}"
    return f"{minus}{text[:point]}.{text[point:]}"
