"""Fault directives: how the simulator misbehaves on demand, so gateway tests can provoke the
upstream failures (lost usage, cut streams, stalls, garbage bodies, error statuses) that a
real model server produces only now and then.

A request picks its faults with the `x-sim-fault` header (comma-separated directives); the
`--fault` flag sets the default for requests without that header. Faults apply only to the
generation endpoints (chat, completions, embeddings, responses, messages), never to `/health`
or `/v1/models`, so readiness checks keep working whatever the defaults are.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

__all__ = ["FAULT_HEADER", "NO_FAULTS", "FaultError", "Faults", "parse_faults"]

#: The request header that selects the faults of one request (it replaces the `--fault` defaults).
FAULT_HEADER = b"x-sim-fault"

#: Directives, for error messages and the docs.
DIRECTIVES = (
    "none",
    "drop-usage",
    "zero-usage",
    "non-json",
    "cut-after=N",
    "stall-after=N:MS",
    "status=CODE",
)


class FaultError(ValueError):
    """A fault directive that is unknown or has a bad value; the message names it."""


@dataclass(frozen=True, slots=True)
class Faults:
    """The parsed faults of one request; the default instance means "behave"."""

    drop_usage: bool = False
    zero_usage: bool = False
    non_json: bool = False
    #: Streaming: content events sent before the connection is cut; else body bytes sent.
    cut_after: int | None = None
    #: Streaming: content events sent before the stall; non-streaming answers stall up front.
    stall_after: int | None = None
    stall_ms: float = 0.0
    status: int | None = None

    @property
    def stall_s(self) -> float:
        return self.stall_ms / 1000 if self.stall_after is not None else 0.0

    def counts(self, prompt: int, completion: int) -> tuple[int, int]:
        """Token counts as reported: both zero under `zero-usage`."""
        return (0, 0) if self.zero_usage else (prompt, completion)


NO_FAULTS = Faults()

_FLAGS = {"drop-usage": "drop_usage", "zero-usage": "zero_usage", "non-json": "non_json"}


def _count(directive: str, raw: str) -> int:
    text = raw.strip()
    if not text.isdigit():
        raise FaultError(f"fault {directive!r}: N must be a non-negative integer")
    return int(text)


def parse_faults(spec: str | Iterable[str]) -> Faults:
    """Parse directives: one comma-separated string, or several of them (repeated `--fault`).

    Empty items and `none` are ignored. Raises `FaultError` naming the first bad directive:
    unknown, malformed, given twice, or in conflict (`drop-usage` with `zero-usage`,
    `status` with `non-json`: each pair asks for two different answers).
    """
    parts = [spec] if isinstance(spec, str) else list(spec)
    values: dict[str, object] = {}
    for part in parts:
        for item in part.split(","):
            directive = item.strip()
            if not directive or directive.lower() == "none":
                continue
            name, eq, raw = directive.partition("=")
            name = name.strip().lower()
            key: str
            value: object
            if name in _FLAGS and not eq:
                key, value = _FLAGS[name], True
            elif name == "cut-after" and eq:
                key, value = "cut_after", _count(directive, raw)
            elif name == "stall-after" and eq:
                count, colon, ms = raw.partition(":")
                try:
                    delay = float(ms)
                except ValueError:
                    delay = -1.0
                if not colon or not math.isfinite(delay) or delay < 0:
                    raise FaultError(
                        f"fault {directive!r}: expected stall-after=N:MS with MS a "
                        "non-negative number of milliseconds"
                    )
                key, value = "stall_after", (_count(directive, count), delay)
            elif name == "status" and eq:
                code = raw.strip()
                if not code.isdigit() or not 400 <= int(code) <= 599:
                    raise FaultError(f"fault {directive!r}: CODE must be an HTTP status 400..599")
                key, value = "status", int(code)
            else:
                raise FaultError(
                    f"unknown fault directive {directive!r}; known: {', '.join(DIRECTIVES)}"
                )
            if key in values:
                raise FaultError(f"fault {directive!r}: {name} given more than once")
            values[key] = value
    if "drop_usage" in values and "zero_usage" in values:
        raise FaultError("faults 'drop-usage' and 'zero-usage' cannot be combined")
    if "status" in values and "non_json" in values:
        raise FaultError("faults 'status' and 'non-json' cannot be combined")
    stall = values.pop("stall_after", None)
    if isinstance(stall, tuple):
        values["stall_after"], values["stall_ms"] = stall
    return Faults(**values)  # type: ignore[arg-type]
