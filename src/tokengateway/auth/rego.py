"""Inline OPA Rego policies, wrapped and compiled the way Authorino does it.

Authorino removes any `package` line from the user's text and evaluates::

    package authorino.authz["<sha256 of the policy>"]
    default allow = false
    <the user's Rego>

querying `allow`; only a boolean `true` allows, anything else is "Unauthorized". Here the
user's `import` lines are moved above `default allow` (Rego wants imports before rules), the
module is compiled once with regopy (rego-cpp, which accepts both v0 `allow { ... }` and v1
`allow if { ... }` syntax), and each evaluation uses a fresh interpreter on the compiled
bundle.

regopy has sharp edges this module keeps away from the request path: a bundle whose build
failed must never be queried (it crashes the process), `Output.binding()` on an undefined
result aborts it, and some errors surface as a non-JSON output that `query_bundle` fails to
parse. Only `Output.ok()` and the already-decoded `Output.results` are read.

The input is the authorization JSON reduced to the paths the policy mentions (for the
tutorial: `input.auth.identity.metadata.annotations`): converting the whole document into
rego-cpp terms costs more than the evaluation itself.
"""

from __future__ import annotations

import hashlib
import json
import re
import subprocess
import sys
from collections.abc import Mapping
from typing import Any

# cel-expr-python's extension must be loaded before regopy's librego_shared: the other way
# round, the first CEL evaluation that yields an error frees a pointer it does not own and
# the process aborts ("free(): invalid pointer"; cel-expr-python 0.1.x, regopy 1.5). Named
# here, where regopy is imported, so that no import order of our modules can break it
# (tests/test_auth.py starts a process that imports this module first).
import cel_expr_python.cel  # noqa: F401
import msgspec
import regopy

from tokengateway.auth.model import AuthConfigError
from tokengateway.expr.kept import keep

__all__ = ["RegoPolicy"]

_PACKAGE_LINE = re.compile(r"^\s*package\b")
_DEFAULT_ALLOW = re.compile(r"^\s*default\s+allow\b", re.MULTILINE)
_IMPORT_LINE = re.compile(r"^\s*import\s+(?:input|data|future|rego)\b")
_INPUT_REF = re.compile(r"(?<![\w.$])input\b")
_DOT_SEGMENT = re.compile(r"\s*\.\s*([A-Za-z_][A-Za-z0-9_]*)")
_BRACKET_SEGMENT = re.compile(r'\s*\[\s*"((?:[^"\\\n]|\\.)*)"\s*\]')
_SEXPR_MESSAGE = re.compile(r"\(errormsg (\d+):")
_SEXPR_LOCATION = re.compile(r"\(error \d+:[^|\s]*\|(\d+)\|(\d+)")
_OUTPUT_LOCATION = re.compile(r"^-- .*:(\d+):(\d+)\s*$")

MSG_UNAUTHORIZED = "Unauthorized"
MSG_INVALID_RESPONSE = "invalid response from policy evaluation"
MSG_EVAL_FAILED = "policy evaluation failed"

#: an input projection: key -> sub-projection, None meaning "the whole value"
Projection = dict[str, "Projection | None"]

#: converted inputs kept per policy (keyed by their JSON), so a repeat costs a lookup
_INPUT_CACHE_SIZE = 512
_DECISION_CACHE_SIZE = 4096

# Built-ins whose answer is not a function of the input alone: a policy calling any of them
# is evaluated every time; any other policy's decision is kept per (projected) input.
_IMPURE = re.compile(
    r"\b(?:time\.now_ns|rand\.|http\.send|uuid\.rfc4122|opa\.runtime|net\.lookup|trace)\b"
)
_encode = msgspec.json.Encoder().encode


def _input_projection(source: str) -> Projection | None:
    """The parts of `input` the policy can read; None when it may read anything."""
    tree: Projection = {}
    for match in _INPUT_REF.finditer(source):
        pos = match.end()
        path: list[str] = []
        while True:
            seg = _DOT_SEGMENT.match(source, pos)
            if seg:
                path.append(seg.group(1))
                pos = seg.end()
                continue
            seg = _BRACKET_SEGMENT.match(source, pos)
            if seg:
                try:
                    path.append(json.loads(f'"{seg.group(1)}"'))
                except ValueError:
                    break
                pos = seg.end()
                continue
            break
        if not path:
            return None
        node: Projection | None = tree
        for i, key in enumerate(path):
            assert node is not None
            last = i == len(path) - 1
            if key in node:
                if node[key] is None:
                    break  # already the whole subtree
                if last:
                    node[key] = None
                    break
                node = node[key]
            else:
                if last:
                    node[key] = None
                    break
                child: Projection = {}
                node[key] = child
                node = child
    return tree


def _project(value: Any, projection: Projection | None) -> Any:
    if projection is None or not isinstance(value, Mapping):
        return value
    out = {}
    for key, sub in projection.items():
        if key in value:
            out[key] = _project(value[key], sub)
    return out


def _sexpr_message(text: str) -> tuple[str, int | None]:
    """The first error message (and byte offset) in a rego-cpp error tree."""
    found = _SEXPR_MESSAGE.search(text)
    if not found:
        return "", None
    size = int(found.group(1))
    start = found.end()
    raw = text.encode()
    byte_start = len(text[:start].encode())
    message = raw[byte_start : byte_start + size].decode(errors="replace").strip()
    location = _SEXPR_LOCATION.search(text)
    return message, int(location.group(1)) if location else None


_EXPLAIN = """
import sys, regopy
source = sys.stdin.read()
rego = regopy.Interpreter()
rego.add_module(sys.argv[1], source)
bundle = rego.build(sys.argv[2])
"""


def _explain_failed_build(name: str, module: str, query: str) -> tuple[str, int | None]:
    """rego-cpp prints why a build failed but does not return it: ask a child process."""
    try:
        done = subprocess.run(
            [sys.executable, "-c", _EXPLAIN, name, query],
            input=module,
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.SubprocessError):
        return "", None
    lines = done.stdout.splitlines()
    message: list[str] = []
    line_no: int | None = None
    if "Errors:" in lines:
        for line in lines[lines.index("Errors:") + 1 :]:
            if line.startswith("-- "):
                loc = _OUTPUT_LOCATION.match(line)
                line_no = int(loc.group(1)) if loc else None
                break
            if line.strip():
                message.append(line.strip())
    return " ".join(message), line_no


class RegoPolicy:
    """One `opa.rego` authorization rule, compiled."""

    __slots__ = ("_bundle", "_decisions", "_inputs", "_projection", "all_values", "roots")

    def __init__(self, source: str, *, policy: str, rule: str, all_values: bool = False) -> None:
        self.all_values = all_values
        if _DEFAULT_ALLOW.search(source):
            raise AuthConfigError(
                policy,
                rule,
                "Rego does not compile: multiple default rules for `allow` "
                "(Authorino already adds `default allow = false`)",
            )
        uid = hashlib.sha256(f"{policy}|{rule}|{source}".encode()).hexdigest()
        package = f'authorino.authz["{uid}"]'
        imports: list[tuple[str, int | None]] = []
        body: list[tuple[str, int | None]] = []
        for number, line in enumerate(source.split("\n"), 1):
            if _PACKAGE_LINE.match(line):
                body.append(("", number))
            elif _IMPORT_LINE.match(line):
                imports.append((line, number))
                body.append(("", number))
            else:
                body.append((line, number))
        lines = [(f"package {package}", None), *imports, ("default allow = false", None), *body]
        module = "\n".join(text for text, _ in lines) + "\n"
        user_line = [number for _, number in lines]

        def located(message: str, line: int | None) -> str:
            where = user_line[line - 1] if line and 0 < line <= len(user_line) else None
            text = message or "the policy does not compile"
            return f"Rego does not compile: {text}" + (f" (line {where})" if where else "")

        query = f"allow := data.{package}.allow"
        if all_values:
            query += f"; values := data.{package}"
        name = f"{uid[:16]}.rego"
        interpreter = regopy.Interpreter()
        interpreter.log_level = regopy.LogLevel.NONE
        try:
            interpreter.add_module(name, module)
            bundle = interpreter.build(query)
        except regopy.RegoError as exc:
            message, offset = _sexpr_message(str(exc))
            at_line = module.encode()[:offset].count(b"\n") + 1 if offset is not None else None
            raise AuthConfigError(policy, rule, located(message, at_line)) from None
        if not bundle.ok():
            raise AuthConfigError(
                policy, rule, located(*_explain_failed_build(name, module, query))
            )
        self._bundle = bundle
        self._inputs: dict[bytes, regopy.Input] = {}
        #: decisions by input, for policies whose answer depends on the input alone
        self._decisions: dict[bytes, tuple[bool, Any, str | None]] | None = (
            None if _IMPURE.search(source) else {}
        )
        self._projection = _input_projection(source)
        #: top-level keys of the authorization JSON the policy reads (None: any)
        self.roots: frozenset[str] | None = (
            frozenset(self._projection) if self._projection is not None else None
        )
        # Errors that do not depend on the input (an unknown function) show on any input
        _, _, error = self._run(regopy.Input({}))
        if error not in (None, MSG_UNAUTHORIZED, MSG_INVALID_RESPONSE, MSG_EVAL_FAILED):
            raise AuthConfigError(policy, rule, f"Rego does not evaluate: {error}")

    def _input(self, value: Any) -> regopy.Input | None:
        """The rego-cpp form of `value`; converting costs ~20 µs, so results are cached."""
        try:
            key: bytes | None = _encode(value)
        except (TypeError, msgspec.EncodeError):
            key = None
        if key is not None:
            found = self._inputs.get(key)
            if found is not None:
                return found
        try:
            converted = regopy.Input(value)
        except (regopy.RegoError, ValueError):
            return None
        if key is not None:
            keep(self._inputs, key, converted, _INPUT_CACHE_SIZE)
        return converted

    def _run(self, value: regopy.Input) -> tuple[bool, Any, str | None]:
        # `value` stays referenced here, so a concurrent cache eviction cannot free it mid-query
        interpreter = regopy.Interpreter()
        interpreter.log_level = regopy.LogLevel.NONE
        try:
            interpreter.set_input(value)
            output = interpreter.query_bundle(self._bundle)
        except json.JSONDecodeError as exc:
            message, _ = _sexpr_message(exc.doc)
            return False, None, message or MSG_EVAL_FAILED
        except (regopy.RegoError, ValueError):
            return False, None, MSG_EVAL_FAILED
        if not output.ok():
            return False, None, MSG_EVAL_FAILED
        results = output.results
        if not results:
            return False, None, MSG_INVALID_RESPONSE
        bindings = getattr(results[0], "bindings", None)
        if not isinstance(bindings, dict) or "allow" not in bindings:
            return False, None, MSG_INVALID_RESPONSE
        if bindings["allow"] is not True:
            return False, None, MSG_UNAUTHORIZED
        if self.all_values and isinstance(bindings.get("values"), dict):
            return True, dict(bindings["values"]), None
        return True, {"allow": True}, None

    @property
    def pure(self) -> bool:
        """Its decision depends on its input alone (no clock, no randomness)."""
        return self._decisions is not None

    def evaluate(self, doc: Mapping[str, Any]) -> tuple[bool, Any, str | None]:
        """(allowed, the result object for auth.authorization.<rule>, the denial reason).

        A pure policy's decision is a function of its projected input, so it is kept: the
        tutorial's policy sees one input per API key, and a cached decision costs a JSON
        encoding (~2 µs) instead of a Rego query (~45 µs)."""
        projected = _project(doc, self._projection)
        decisions = self._decisions
        key = None
        if decisions is not None:
            try:
                key = _encode(projected)
            except (TypeError, msgspec.EncodeError):
                key = None
            if key is not None:
                found = decisions.get(key)
                if found is not None:
                    allowed, values, error = found
                    return allowed, dict(values) if isinstance(values, dict) else values, error
        value = self._input(projected)
        if value is None:
            return False, None, MSG_EVAL_FAILED
        decision = self._run(value)
        if decisions is not None and key is not None:
            keep(decisions, key, decision, _DECISION_CACHE_SIZE)
        return decision

    def __repr__(self) -> str:
        return f"RegoPolicy(roots={sorted(self.roots) if self.roots is not None else 'any'})"
