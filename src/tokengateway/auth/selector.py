"""GJSON-style path selectors over plain JSON values (dicts, lists, scalars).

Kuadrant manifests read values with GJSON paths (tidwall/gjson), e.g.
``auth.identity.metadata.annotations.kuadrant\\.io/groups``. This module parses such a path
once into steps and evaluates it against already-decoded Python values, so a lookup never
serialises JSON. It knows nothing of auth; the gateway and the limits may reuse it.

Supported (GJSON semantics): ``.`` and ``|`` separators, ``\\`` escapes, ``*``/``?`` key
wildcards, numeric array indices, ``#`` (length, or ``#.path`` to map over an array),
queries ``#(path op value)`` / ``#(...)#`` with ``== = != < <= > >= % !%`` and ``~true``-style
values, GJSON's built-in modifiers ``@this @reverse @keys @values @flatten @join @tostr
@fromstr @ugly @pretty @valid`` and Authorino's custom ones ``@extract:{"sep","pos"}``,
``@replace:{"old","new"}``, ``@case:upper|lower``, ``@base64:encode|decode``, ``@strip``.
Not supported (a :class:`SelectorError` at compile time): multipaths ``[a,b]``/``{a,b}``,
literals ``!true``, ``@group``, ``@dig``.

A path that does not resolve gives :data:`MISSING` (GJSON's "non-existent").
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
from collections.abc import Callable, Mapping, Sequence
from decimal import Decimal
from typing import Any

from tokengateway.expr.cel import MISSING

__all__ = [
    "MISSING",
    "Selector",
    "SelectorError",
    "as_array",
    "compile_selector",
    "to_json",
    "to_string",
]


class SelectorError(ValueError):
    """A path that cannot be parsed, or uses GJSON syntax this module does not implement."""


# --------------------------------------------------------------------------------------------
# Go-compatible renderings (GJSON's Result.String() and encoding/json), used by pattern matching,
# templates and header values, where Authorino compares or emits text.


def _go_float(value: float) -> str:
    if value != value or value in (float("inf"), float("-inf")):
        return "null"  # encoding/json refuses these; null is the closest harmless rendering
    if value.is_integer() and abs(value) < 1e21:
        return str(int(value))
    magnitude = abs(value)
    text = repr(value)
    if 1e-6 <= magnitude < 1e21:
        if "e" in text:
            text = format(Decimal(text), "f")
        return text
    mantissa, _, exponent = text.partition("e")
    sign = exponent[0] if exponent[:1] in "+-" else "+"
    digits = exponent.lstrip("+-").lstrip("0") or "0"
    if sign == "+" and len(digits) < 2:
        digits = digits.rjust(2, "0")
    return f"{mantissa}e{sign}{digits}"


_JSON_ESCAPES = {
    "<": "\\u003c",
    ">": "\\u003e",
    "&": "\\u0026",
    "\u2028": "\\u2028",
    "\u2029": "\\u2029",
}
_JSON_ESCAPE_RE = re.compile("[<>&\u2028\u2029]")


def _go_string(text: str) -> str:
    encoded = json.dumps(text, ensure_ascii=False)
    if _JSON_ESCAPE_RE.search(encoded):
        encoded = _JSON_ESCAPE_RE.sub(lambda m: _JSON_ESCAPES[m.group()], encoded)
    return encoded


def to_json(value: Any) -> str:
    """Compact JSON as Go's encoding/json writes it: sorted object keys, HTML-safe strings."""
    if value is None or value is MISSING:
        return "null"
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, str):
        return _go_string(value)
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    if isinstance(value, Mapping):
        items = sorted((str(k), v) for k, v in value.items())
        return "{" + ",".join(_go_string(k) + ":" + to_json(v) for k, v in items) + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(to_json(v) for v in value) + "]"
    return _go_string(str(value))


def to_string(value: Any) -> str:
    """GJSON's ``Result.String()``: strings as is, missing/null as "", the rest as JSON text."""
    if isinstance(value, str):
        return value
    if value is None or value is MISSING:
        return ""
    if value is True:
        return "true"
    if value is False:
        return "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        return _go_float(value)
    return to_json(value)


def as_array(value: Any) -> list[Any]:
    """GJSON's ``Result.Array()``: an array's items, nothing for missing/null, else [value]."""
    if value is MISSING or value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


# --------------------------------------------------------------------------------------------
# Modifiers. Each takes the current value and the raw argument text (or "").


def _json_arg(arg: str) -> dict[str, Any]:
    if not arg:
        return {}
    try:
        parsed = json.loads(arg)
    except (ValueError, RecursionError):
        return {}
    return parsed if isinstance(parsed, dict) else {}


def _map_strings(value: Any, fn: Callable[[str], str]) -> Any:
    if isinstance(value, str):
        return fn(value)
    if isinstance(value, Mapping):
        return {fn(str(k)): _map_strings(v, fn) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_map_strings(v, fn) for v in value]
    return value


def _mod_case(value: Any, arg: str) -> Any:
    if arg == "upper":
        return _map_strings(value, str.upper)
    if arg == "lower":
        return _map_strings(value, str.lower)
    return value


def _mod_extract(value: Any, arg: str) -> Any:
    opts = _json_arg(arg)
    sep = opts.get("sep", " ")
    sep = to_string(sep)
    try:
        pos = int(opts.get("pos", 0))
    except (TypeError, ValueError, OverflowError):  # OverflowError: an infinite position
        pos = 0
    text = to_string(value)
    parts = text.split(sep) if sep else list(text)
    if pos < 0 or pos >= len(parts):
        return None
    return parts[pos]


def _mod_replace(value: Any, arg: str) -> Any:
    if not arg:
        return value
    opts = _json_arg(arg)
    old = to_string(opts.get("old", ""))
    new = to_string(opts.get("new", ""))
    return to_string(value).replace(old, new)


def _mod_base64(value: Any, arg: str) -> Any:
    text = to_string(value)
    if arg == "encode":
        return base64.b64encode(text.encode()).decode("ascii")
    if arg == "decode":
        raw = text.encode(errors="replace")
        try:
            if len(raw) % 4 == 0:
                decoded = base64.b64decode(raw, validate=True)
            else:
                decoded = base64.b64decode(raw + b"=" * (-len(raw) % 4), validate=True)
        except (binascii.Error, ValueError):
            try:
                decoded = base64.b64decode(raw.rstrip(b"=") + b"=" * (-len(raw.rstrip(b"=")) % 4))
            except (binascii.Error, ValueError):
                decoded = b""
        return decoded.decode("utf-8", errors="replace")
    return value


def _strip(text: str) -> str:
    return "".join(ch for ch in text if ch.isprintable())


def _mod_strip(value: Any, arg: str) -> Any:
    return _map_strings(value, _strip)


def _mod_this(value: Any, arg: str) -> Any:
    return value


def _mod_reverse(value: Any, arg: str) -> Any:
    if isinstance(value, (list, tuple)):
        return list(reversed(value))
    if isinstance(value, Mapping):
        return dict(reversed(list(value.items())))
    return value


def _mod_keys(value: Any, arg: str) -> Any:
    return list(value.keys()) if isinstance(value, Mapping) else []


def _mod_values(value: Any, arg: str) -> Any:
    if isinstance(value, Mapping):
        return list(value.values())
    if isinstance(value, (list, tuple)):
        return list(value)
    return []


def _flatten(items: Sequence[Any], deep: bool) -> list[Any]:
    out: list[Any] = []
    for item in items:
        if isinstance(item, (list, tuple)):
            out.extend(_flatten(item, deep) if deep else item)
        else:
            out.append(item)
    return out


def _mod_flatten(value: Any, arg: str) -> Any:
    if not isinstance(value, (list, tuple)):
        return value
    return _flatten(value, bool(_json_arg(arg).get("deep")))


def _mod_join(value: Any, arg: str) -> Any:
    if not isinstance(value, (list, tuple)):
        return value
    out: dict[str, Any] = {}
    for item in value:
        if isinstance(item, Mapping):
            out.update(item)
    return out


def _mod_tostr(value: Any, arg: str) -> Any:
    return to_json(value)


def _mod_fromstr(value: Any, arg: str) -> Any:
    if not isinstance(value, str):
        return MISSING
    try:
        return json.loads(value)
    except (ValueError, RecursionError):
        return MISSING


_MODIFIERS: dict[str, Callable[[Any, str], Any]] = {
    # Authorino's custom modifiers (pkg/json)
    "extract": _mod_extract,
    "replace": _mod_replace,
    "case": _mod_case,
    "base64": _mod_base64,
    "strip": _mod_strip,
    # GJSON's built-ins that make sense on decoded values
    "this": _mod_this,
    "reverse": _mod_reverse,
    "keys": _mod_keys,
    "values": _mod_values,
    "flatten": _mod_flatten,
    "join": _mod_join,
    "tostr": _mod_tostr,
    "fromstr": _mod_fromstr,
    "ugly": _mod_this,
    "pretty": _mod_this,
    "valid": _mod_this,
}
_UNSUPPORTED_MODIFIERS = frozenset({"group", "dig"})


# --------------------------------------------------------------------------------------------
# Steps


class _Step:
    __slots__ = ("sep",)

    def __init__(self) -> None:
        self.sep = ""


class _Key(_Step):
    __slots__ = ("index", "name", "pattern")

    def __init__(self, name: str, pattern: re.Pattern[str] | None) -> None:
        super().__init__()
        self.name = name
        self.pattern = pattern
        # an index no list can reach is no index (and int() refuses over 4300 digits)
        self.index = int(name) if name.isdigit() and name.isascii() and len(name) <= 18 else -1

    def apply(self, value: Any) -> Any:
        if isinstance(value, Mapping):
            if self.pattern is None:
                return value.get(self.name, MISSING)
            for key, item in value.items():
                if self.pattern.fullmatch(str(key)):
                    return item
            return MISSING
        if isinstance(value, (list, tuple)) and 0 <= self.index < len(value):
            return value[self.index]
        return MISSING


class _Hash(_Step):
    __slots__ = ()


class _Query(_Step):
    __slots__ = ("all", "op", "path", "rvalue")

    def __init__(self, path: Selector | None, op: str, rvalue: str, all_: bool) -> None:
        super().__init__()
        self.path = path
        self.op = op
        self.rvalue = rvalue
        self.all = all_

    def matches(self, item: Any) -> bool:
        value = self.path.get(item) if self.path is not None else item
        rpv = self.rvalue
        if rpv.startswith("~"):
            ish: bool | None
            kind = rpv[1:]
            if kind == "*":
                ish = value is not MISSING
            elif kind == "null":
                ish = value is None or value is MISSING
            elif kind == "true":
                ish = _trueish(value)
            elif kind == "false":
                ish = _falseish(value)
            else:
                ish = None
            if ish is None:
                return False
            value, rpv = ish, "true"
        if value is MISSING:
            return False
        op = self.op
        if not op:
            return True
        if isinstance(value, bool):
            if value:
                return {
                    "=": rpv == "true",
                    "!=": rpv != "true",
                    ">": rpv == "false",
                    ">=": True,
                }.get(op, False)
            return {"=": rpv == "false", "!=": rpv != "false", "<": rpv == "true", "<=": True}.get(
                op, False
            )
        if isinstance(value, str):
            if op == "%":
                return _wildcard(rpv).fullmatch(value) is not None
            if op == "!%":
                return _wildcard(rpv).fullmatch(value) is None
            return _compare(value, rpv, op)
        if isinstance(value, (int, float)):
            try:
                number = float(rpv)
            except ValueError:
                number = 0.0
            try:
                left = float(value)
            except OverflowError:  # an integer beyond float64, as GJSON reads it: infinite
                left = math.inf if value > 0 else -math.inf
            return _compare(left, number, op)
        return False


def _compare(left: Any, right: Any, op: str) -> bool:
    if op == "=":
        return bool(left == right)
    if op == "!=":
        return bool(left != right)
    if op == "<":
        return bool(left < right)
    if op == "<=":
        return bool(left <= right)
    if op == ">":
        return bool(left > right)
    if op == ">=":
        return bool(left >= right)
    return False


def _go_bool(text: str) -> bool | None:
    lowered = text.lower()
    if lowered in ("1", "t", "true"):
        return True
    if lowered in ("0", "f", "false"):
        return False
    return None


def _trueish(value: Any) -> bool:
    if value is True:
        return True
    if isinstance(value, str):
        return _go_bool(value) is True
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value != 0
    return False


def _falseish(value: Any) -> bool:
    if value is None or value is False:
        return True
    if isinstance(value, str):
        return _go_bool(value) is False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return value == 0
    return False


class _Modifier(_Step):
    __slots__ = ("arg", "fn", "name")

    def __init__(self, name: str, arg: str) -> None:
        super().__init__()
        self.name = name
        self.arg = arg
        self.fn = _MODIFIERS[name]


_WILDCARDS: dict[str, re.Pattern[str]] = {}


def _wildcard(pattern: str) -> re.Pattern[str]:
    """GJSON's `%` pattern: `*` any run, `?` one character, `\\` escapes."""
    compiled = _WILDCARDS.get(pattern)
    if compiled is None:
        parts: list[str] = []
        i = 0
        while i < len(pattern):
            ch = pattern[i]
            if ch == "\\" and i + 1 < len(pattern):
                parts.append(re.escape(pattern[i + 1]))
                i += 2
                continue
            parts.append(".*" if ch == "*" else "." if ch == "?" else re.escape(ch))
            i += 1
        compiled = re.compile("".join(parts), re.DOTALL)
        if len(_WILDCARDS) < 1024:
            _WILDCARDS[pattern] = compiled
    return compiled


# --------------------------------------------------------------------------------------------
# Parser


def _scan_balanced(path: str, start: int) -> int:
    """Index just past the bracketed/quoted token that starts at `start`, or -1."""
    opener = path[start]
    if opener == '"':
        i = start + 1
        while i < len(path):
            if path[i] == "\\":
                i += 2
                continue
            if path[i] == '"':
                return i + 1
            i += 1
        return -1
    depth = 0
    i = start
    while i < len(path):
        ch = path[i]
        if ch == "\\":
            i += 2
            continue
        if ch == '"':
            end = _scan_balanced(path, i)
            if end < 0:
                return -1
            i = end
            continue
        if ch in "{[(":
            depth += 1
        elif ch in "}])":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    return -1


def _modifier_name(path: str, start: int) -> str:
    i = start + 1
    while i < len(path) and path[i] not in ".|:":
        i += 1
    return path[start + 1 : i]


def _parse_modifier(path: str, start: int) -> tuple[_Modifier, int]:
    name = _modifier_name(path, start)
    i = start + 1 + len(name)
    arg = ""
    if i < len(path) and path[i] == ":":
        i += 1
        parsed = False
        if i < len(path) and path[i] in '{["':
            end = _scan_balanced(path, i)
            if end > 0:
                try:
                    json.loads(path[i:end])
                except ValueError:
                    pass
                else:
                    arg, i, parsed = path[i:end], end, True
        if not parsed:
            j = i
            while j < len(path) and path[j] != "|":
                if path[j] in '{["(':
                    end = _scan_balanced(path, j)
                    j = end if end > 0 else len(path)
                    continue
                j += 1
            arg, i = path[i:j], j
    return _Modifier(name, arg), i


_QUERY_OPS = ("==", "!=", "!%", "<=", ">=", "=", "<", ">", "%")


def _parse_query(path: str, start: int) -> tuple[_Query, int]:
    # path[start] == "#", path[start + 1] in "(["
    end = _scan_balanced(path, start + 1)
    if end < 0:
        raise SelectorError(f"unbalanced query in {path!r}")
    inner = path[start + 2 : end - 1]
    op_at, op = -1, ""
    i, depth = 0, 0
    while i < len(inner):
        ch = inner[i]
        if ch == "\\":
            i += 2
            continue
        if ch == '"':
            close = _scan_balanced(inner, i)
            i = close if close > 0 else len(inner)
            continue
        if ch in "([{":
            depth += 1
        elif ch in ")]}":
            depth -= 1
        elif depth == 0 and ch in "!=<>%":
            for candidate in _QUERY_OPS:
                if inner.startswith(candidate, i):
                    op_at, op = i, candidate
                    break
            if op_at < 0:
                raise SelectorError(f"bad query operator in {path!r}")
            break
        i += 1
    if op_at < 0:
        left, rvalue = inner.strip(), ""
    else:
        left, rvalue = inner[:op_at].strip(), inner[op_at + len(op) :].strip()
    if op == "==":
        op = "="
    if rvalue.startswith('"'):
        try:
            decoded = json.loads(rvalue)
        except ValueError:
            decoded = rvalue[1:-1] if rvalue.endswith('"') and len(rvalue) > 1 else rvalue[1:]
        rvalue = decoded if isinstance(decoded, str) else rvalue
    sub = compile_selector(left) if left else None
    all_ = end < len(path) and path[end] == "#"
    return _Query(sub, op, rvalue, all_), end + (1 if all_ else 0)


def _parse_key(path: str, start: int) -> tuple[_Key, int]:
    chars: list[str] = []
    regex: list[str] = []
    wild = False
    i = start
    while i < len(path):
        ch = path[i]
        if ch == "\\":
            i += 1
            if i < len(path):
                chars.append(path[i])
                regex.append(re.escape(path[i]))
                i += 1
            continue
        if ch in ".|":
            break
        if ch in "*?":
            wild = True
            regex.append(".*" if ch == "*" else ".")
        else:
            regex.append(re.escape(ch))
        chars.append(ch)
        i += 1
    pattern = re.compile("".join(regex), re.DOTALL) if wild else None
    return _Key("".join(chars), pattern), i


def _parse(path: str) -> list[_Step]:
    if not path:
        raise SelectorError("empty selector")
    steps: list[_Step] = []
    i, sep, n = 0, "", len(path)
    while True:
        ch = path[i] if i < n else ""
        step: _Step
        if ch == "@" and _modifier_name(path, i) in _MODIFIERS:
            step, i = _parse_modifier(path, i)
        elif ch == "@" and _modifier_name(path, i) in _UNSUPPORTED_MODIFIERS:
            raise SelectorError(f"the @{_modifier_name(path, i)} modifier is not supported")
        elif ch == "#" and i + 1 < n and path[i + 1] in "([":
            step, i = _parse_query(path, i)
        elif ch == "#" and (i + 1 == n or path[i + 1] in ".|"):
            step, i = _Hash(), i + 1
        elif ch == "!" and not steps:
            raise SelectorError("GJSON literals (!value) are not supported")
        elif ch in "[{" and not steps:
            raise SelectorError("GJSON multipaths ([a,b] / {a,b}) are not supported")
        else:
            step, i = _parse_key(path, i)
        step.sep = sep
        steps.append(step)
        if i >= n:
            break
        if path[i] not in ".|":
            raise SelectorError(f"unexpected {path[i]!r} at position {i} of {path!r}")
        sep = path[i]
        i += 1
        if i >= n:
            raise SelectorError(f"selector {path!r} ends with {sep!r}")
    return steps


def _run(steps: Sequence[_Step], start: int, value: Any) -> Any:
    i, n = start, len(steps)
    while i < n:
        if value is MISSING:
            return MISSING
        step = steps[i]
        if type(step) is _Key:
            value = step.apply(value)
            i += 1
        elif type(step) is _Modifier:
            value = step.fn(value, step.arg)
            i += 1
        elif type(step) is _Hash:
            if not isinstance(value, (list, tuple)):
                value = value.get("#", MISSING) if isinstance(value, Mapping) else MISSING
                i += 1
            elif i + 1 < n and steps[i + 1].sep == ".":
                value, i = _map(steps, i + 1, value)
            else:
                value = len(value)
                i += 1
        else:
            assert isinstance(step, _Query)
            if not isinstance(value, (list, tuple)):
                return MISSING
            if step.all:
                matched = [item for item in value if step.matches(item)]
                if i + 1 < n and steps[i + 1].sep == ".":
                    value, i = _map(steps, i + 1, matched)
                else:
                    value = matched
                    i += 1
            else:
                value = next((item for item in value if step.matches(item)), MISSING)
                i += 1
    return value


def _map(steps: Sequence[_Step], start: int, items: Sequence[Any]) -> tuple[list[Any], int]:
    """Apply steps[start:] up to the next `|` to each item; GJSON drops missing results."""
    end = start + 1
    while end < len(steps) and steps[end].sep != "|":
        end += 1
    sub = steps[start:end]
    out = []
    for item in items:
        result = _run(sub, 0, item)
        if result is not MISSING:
            out.append(result)
    return out, end


class Selector:
    """A compiled GJSON path; `get` returns the selected value or MISSING."""

    __slots__ = ("_keys", "_steps", "root", "source")

    def __init__(self, source: str) -> None:
        self.source = source
        self._steps = _parse(source)
        first = self._steps[0]
        #: the first object key the path reads (None when it may read anything at the root)
        self.root: str | None = (
            first.name if type(first) is _Key and first.pattern is None else None
        )
        simple = all(type(s) is _Key and s.pattern is None and s.index < 0 for s in self._steps)
        self._keys: tuple[str, ...] | None = (
            tuple(s.name for s in self._steps if isinstance(s, _Key)) if simple else None
        )

    def get(self, doc: Any) -> Any:
        keys = self._keys
        if keys is not None:
            value = doc
            for key in keys:
                if type(value) is dict or isinstance(value, Mapping):
                    value = value.get(key, MISSING)
                else:
                    return MISSING
                if value is MISSING:
                    return MISSING
            return value
        return _run(self._steps, 0, doc)

    def __repr__(self) -> str:
        return f"Selector({self.source!r})"


def compile_selector(source: str) -> Selector:
    """Parse a GJSON path once; raise SelectorError if it is malformed or unsupported."""
    try:
        return Selector(source)
    except RecursionError:  # queries nested in queries, hundreds deep
        raise SelectorError(f"selector {source[:40]!r}... is nested too deeply") from None
