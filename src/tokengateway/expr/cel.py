"""CEL predicates and expressions, compiled once per configuration.

This module is the only place that knows the CEL engine (`cel-expr-python`, Google's C++
runtime). Everything else holds :class:`Expression` / :class:`Predicate` objects and evaluates
them against an :class:`Activation` built once per request.

Semantics kept from Kuadrant: an expression that cannot be resolved (a missing attribute, a
type error) does not raise; a predicate that errors is *false* and a counter expression that
errors yields :data:`MISSING`, which makes the limit not apply.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from contextvars import ContextVar
from typing import Any

import msgspec
from cel_expr_python import cel
from cel_expr_python.ext import ext_strings

from tokengateway.expr.kept import keep

__all__ = [
    "MISSING",
    "VARIABLES",
    "Activation",
    "CelCompileError",
    "Expression",
    "Predicate",
    "bind_bodies",
    "compile_expression",
    "compile_predicate",
    "json_pointer",
    "selector_values",
]

#: Top-level names an expression may use: Kuadrant's well-known attributes.
VARIABLES = ("request", "source", "destination", "connection", "auth", "metadata", "filter_state")


class _Missing:
    __slots__ = ()

    def __repr__(self) -> str:
        return "MISSING"

    def __bool__(self) -> bool:
        return False


MISSING: Any = _Missing()


class CelCompileError(ValueError):
    """A CEL source that does not compile; the message is the engine's, trimmed."""


# Bodies are per request but the functions are bound once per environment, so the current
# request's bodies travel in a context variable (cheap to read, safe across tasks).
_bodies: ContextVar[tuple[bytes | None, bytes | None] | None] = ContextVar(
    "tokengateway_cel_bodies", default=None
)
_parsed: ContextVar[dict[int, Any] | None] = ContextVar("tokengateway_cel_parsed", default=None)


def bind_bodies(
    request_body: bytes | None = None,
    response_body: bytes | None = None,
    request_json: Any = None,
) -> None:
    """Make the request/response bodies visible to `requestBodyJSON` / `responseBodyJSON`;
    `request_json` is the request body already decoded, when the caller has it."""
    _bodies.set((request_body, response_body))
    _parsed.set({} if request_json is None else {0: request_json})


def json_pointer(doc: Any, pointer: str) -> Any:
    """Resolve an RFC 6901 pointer; raise KeyError when any step is missing."""
    if pointer == "":
        return doc
    if not pointer.startswith("/"):
        raise KeyError(f"JSON pointer {pointer!r} must start with '/'")
    node = doc
    for raw in pointer[1:].split("/"):
        token = raw.replace("~1", "/").replace("~0", "~")
        if isinstance(node, dict):
            if token not in node:
                raise KeyError(f"no member {token!r}")
            node = node[token]
        elif isinstance(node, list):
            # ASCII digits only ("²".isdigit() too), and no more than an index can have
            if not (token.isascii() and token.isdigit()) or (len(token) > 1 and token[0] == "0"):
                raise KeyError(f"{token!r} is not an array index")
            if len(token) > 18:
                raise KeyError(f"index {token[:20]}... out of range")
            idx = int(token)
            if idx >= len(node):
                raise KeyError(f"index {idx} out of range")
            node = node[idx]
        else:
            raise KeyError(f"cannot descend into {type(node).__name__} with {token!r}")
    return node


def _body_json(which: int) -> Callable[[str], Any]:
    def impl(pointer: str) -> Any:
        bodies = _bodies.get()
        body = bodies[which] if bodies else None
        if body is None:
            raise KeyError("body not available")
        cache = _parsed.get()
        if cache is None:
            cache = {}
            _parsed.set(cache)
        if which not in cache:
            cache[which] = msgspec.json.decode(body)
        return json_pointer(cache[which], pointer)

    return impl


def _new_env() -> Any:
    functions = [
        cel.FunctionDecl(
            name,
            [
                cel.Overload(
                    f"{name}_string",
                    return_type=cel.Type.DYN,
                    parameters=[cel.Type.STRING],
                    impl=_body_json(i),
                )
            ],
        )
        for i, name in enumerate(("requestBodyJSON", "responseBodyJSON"))
    ]
    return cel.NewEnv(
        variables=dict.fromkeys(VARIABLES, cel.Type.DYN),
        extensions=[ext_strings.ExtStrings()],
        functions=functions,
    )


_ENV = _new_env()


def _clean(message: str) -> str:
    text = str(message).replace("INVALID_ARGUMENT: ", "").replace(" [INVALID_ARGUMENT]", "")
    return " ".join(line.strip() for line in text.splitlines() if line.strip())


class Activation:
    """The variables of one request, converted for the CEL engine once, on first need (the
    common expressions below never need it)."""

    __slots__ = ("_cel", "data")

    def __init__(self, data: Mapping[str, Any]) -> None:
        # a dict is taken as it is (callers build one per request), anything else copied
        self.data = data if type(data) is dict else dict(data)
        self._cel: Any = None

    @property
    def _act(self) -> Any:
        if self._cel is None:
            self._cel = _ENV.Activation(self.data)
        return self._cel


# The two shapes most policies are made of, evaluated in Python with CEL's result: a
# selector (`auth.identity.userid`) and a selector compared with a string literal
# (`request.path == "/v1/chat/completions"`). A missing step is CEL's error (MISSING, and
# false for a predicate); a value of another type is simply unequal, as CEL's heterogeneous
# equality has it. tests/test_cel.py checks each case against the engine.
_SELECTOR = "((?:" + "|".join(VARIABLES) + r")(?:\.[A-Za-z_][A-Za-z0-9_]*)*)"
_FAST_SELECTOR = re.compile(rf"^{_SELECTOR}$")
_FAST_COMPARE = re.compile(rf'^{_SELECTOR}\s*(==|!=)\s*"([^"\\\n]*)"$')


# Any other expression that reads only selectors (and no body) is a function of their values:
# its answers are kept per tuple of values, when each is a plain value. A selector is a
# variable followed by field names; a name followed by "(" is a method call, not a field.
_READS = re.compile(
    r"(?<![\w.])(?:" + "|".join(VARIABLES) + r")(?:\.[A-Za-z_][A-Za-z0-9_]*(?![\w(]|\s+\())*"
)
#: answers kept per expression (the oldest goes first when full)
MEMO_SIZE = 4096
_NOT_PLAIN = object()


def _reads(source: str) -> tuple[tuple[str, ...], ...] | None:
    """The selectors `source` reads, or None when its answer may depend on anything else
    (the request or response body)."""
    if "BodyJSON" in source:
        return None
    return tuple(dict.fromkeys(tuple(m.group(0).split(".")) for m in _READS.finditer(source)))


def _memo_key(data: dict[str, Any], paths: tuple[tuple[str, ...], ...]) -> Any:
    """What the selectors' values are, in a form where equal keys mean equal inputs for CEL:
    each value with its type (1, 1.0 and true are one key in Python, not in CEL), and where a
    missing step failed (a map without the key, or something that is not a map). _NOT_PLAIN
    when a value is a map or list: not kept."""
    key = []
    for path in paths:
        node: Any = data
        for depth, step in enumerate(path):
            if not isinstance(node, dict):
                node = ("!", depth, type(node).__name__)
                break
            found = node.get(step, _NOT_PLAIN)
            if found is _NOT_PLAIN:
                node = ("!", depth, "absent")
                break
            node = found
        else:
            if type(node) is str:
                key.append(node)
                continue
            if not _plain(node):
                return _NOT_PLAIN
            node = (type(node), node)
        key.append(node)
    return tuple(key)


def selector_values(
    activation: Activation, paths: tuple[tuple[str, ...], ...]
) -> tuple[Any, ...] | None:
    """A key for the values of `paths` in `activation`: equal keys mean equal inputs for
    every expression that reads only these selectors; None when some value is a map or a
    list (not kept)."""
    key = _memo_key(activation.data, paths)
    return None if key is _NOT_PLAIN else key


def _walk(data: dict[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = data
    for step in path:
        if not isinstance(node, dict):
            return MISSING
        node = node.get(step, MISSING)
        if node is MISSING:
            return MISSING
    return node


def _plain(value: Any) -> bool:
    """Values CEL hands back unchanged (a map or list would be converted)."""
    return isinstance(value, str | int | float | bool) or value is None


class Expression:
    """A compiled CEL expression; `evaluate` returns a plain Python value or MISSING."""

    __slots__ = ("_compare", "_memo", "_path", "_program", "_reads", "source", "uses")

    def __init__(self, source: str) -> None:
        self.source = source
        try:
            self._program = _ENV.compile(source)
        except RuntimeError as exc:
            raise CelCompileError(_clean(str(exc))) from None
        #: top-level variables the source mentions, e.g. {"auth", "request"}
        self.uses = frozenset(v for v in VARIABLES if v in source)
        self._path: tuple[str, ...] | None = None
        self._compare: tuple[bool, str] | None = None  # (equal?, literal)
        if (found := _FAST_SELECTOR.match(source)) is not None:
            self._path = tuple(found.group(1).split("."))
        elif (found := _FAST_COMPARE.match(source)) is not None:
            self._path = tuple(found.group(1).split("."))
            self._compare = (found.group(2) == "==", found.group(3))
        self._reads = _reads(source) if self._path is None else None
        self._memo: dict[Any, Any] = {}

    def evaluate(self, activation: Activation) -> Any:
        if self._path is not None:
            value = _walk(activation.data, self._path)
            if self._compare is None:
                if _plain(value) or value is MISSING:
                    return value
            elif value is MISSING:
                return MISSING
            else:  # CEL's equality across types is false, not an error
                equal, literal = self._compare
                return (isinstance(value, str) and value == literal) is equal
        if self._reads is None:
            return self._eval(activation)
        key = _memo_key(activation.data, self._reads)
        if key is _NOT_PLAIN:
            return self._eval(activation)
        found = self._memo.get(key, _NOT_PLAIN)
        if found is _NOT_PLAIN:
            found = self._eval(activation)
            if _plain(found) or found is MISSING:
                self._keep(key, found)
        return found

    @property
    def selectors(self) -> tuple[tuple[str, ...], ...] | None:
        """The selectors this expression's answer is a function of, or None when it may
        depend on anything else (a body)."""
        return (self._path,) if self._path is not None else self._reads

    def _eval(self, activation: Activation) -> Any:
        value = self._program.eval(activation._act)
        if value.type() == cel.Type.ERROR:
            return MISSING
        return value.plain_value()

    def _keep(self, key: Any, answer: Any) -> None:
        keep(self._memo, key, answer, MEMO_SIZE)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.source!r})"


class Predicate(Expression):
    """A compiled CEL predicate; only a boolean `true` passes."""

    __slots__ = ()

    def __init__(self, source: str) -> None:
        super().__init__(source)
        rtype = self._program.return_type()
        if rtype != cel.Type.BOOL and rtype != cel.Type.DYN:
            raise CelCompileError(f"predicate must evaluate to a bool, not {rtype.name()}")

    def test(self, activation: Activation) -> bool:
        return self.evaluate(activation) is True


def compile_expression(source: str) -> Expression:
    return Expression(source.strip())


def compile_predicate(source: str) -> Predicate:
    return Predicate(source.strip())
