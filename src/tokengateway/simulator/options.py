"""Simulator settings and the parser for llm-d-inference-sim's command-line flags.

The tutorial's Deployment starts `ghcr.io/llm-d/llm-d-inference-sim` with `args`; we read those
same args so the manifest runs unchanged on the built-in simulator. Flags we do not implement
are reported as warnings, never errors, so a Deployment written for a newer llm-d still starts.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, cast

from tokengateway.simulator.faults import FaultError, parse_faults

__all__ = ["Mode", "SimOptions", "parse_sim_args"]

Mode = Literal["random", "echo"]
MODES: tuple[str, ...] = ("random", "echo")

#: llm-d reads the model from this variable when `--model` is absent.
MODEL_ENV = "SIM_MODEL"


@dataclass
class SimOptions:
    """Everything the simulator needs; CLI flags and manifests only build this object."""

    model: str
    served_model_names: list[str] = field(default_factory=list)
    port: int = 8000
    host: str = "127.0.0.1"
    mode: Mode = "random"
    time_to_first_token_ms: float = 0
    inter_token_latency_ms: float = 0
    max_model_len: int = 1024
    seed: int | None = None
    #: Fault directives applied to requests without an `x-sim-fault` header (see `faults`).
    faults: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        # Checked here too so that options built in code fail as clearly as parsed ones.
        if not self.model:
            raise ValueError("model: must not be empty")
        if self.mode not in MODES:
            raise ValueError(
                f"mode: invalid value {self.mode!r}, valid values are 'random', 'echo'"
            )
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port: {self.port} is outside 0..65535")
        if self.time_to_first_token_ms < 0:
            raise ValueError("time_to_first_token_ms: cannot be negative")
        if self.inter_token_latency_ms < 0:
            raise ValueError("inter_token_latency_ms: cannot be negative")
        if self.max_model_len < 1:
            raise ValueError("max_model_len: must be at least 1")
        try:
            parse_faults(self.faults)
        except FaultError as exc:
            raise ValueError(f"faults: {exc}") from None

    @property
    def model_names(self) -> list[str]:
        """Names a request may use: the model first, then each served name, without repeats."""
        return list(dict.fromkeys([self.model, *self.served_model_names]))


_DURATION_UNITS_MS = {
    "ns": 1e-6,
    "us": 1e-3,
    "µs": 1e-3,
    "μs": 1e-3,
    "ms": 1.0,
    "s": 1000.0,
    "m": 60_000.0,
    "h": 3_600_000.0,
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ns|us|µs|μs|ms|s|m|h)")
_PLAIN_NUMBER = re.compile(r"[+-]?(\d+(?:\.\d*)?|\.\d+)")


def _parse_duration_ms(flag: str, raw: str) -> float:
    """Milliseconds from a Go duration (`100ms`, `1m30s`) or a bare number of milliseconds.

    llm-d up to v0.1.x took integer milliseconds (the tutorial's image is v0.1.1); later releases
    take Go durations. Both spellings appear in real manifests, so both are accepted.
    """
    text = raw.strip()
    if _PLAIN_NUMBER.fullmatch(text):
        value = float(text)
    else:
        sign = -1.0 if text.startswith("-") else 1.0
        body = text.lstrip("+-")
        pos, total = 0, 0.0
        for m in _DURATION_PART.finditer(body):
            if m.start() != pos:
                break
            total += float(m.group(1)) * _DURATION_UNITS_MS[m.group(2)]
            pos = m.end()
        if not body or pos != len(body):
            raise ValueError(
                f"{flag}: invalid duration {raw!r}, expected milliseconds (e.g. 100) "
                "or a Go duration (e.g. 100ms, 1.5s)"
            )
        value = sign * total
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{flag}: cannot be negative or infinite, got {raw!r}")
    return value


def _parse_int(
    flag: str, raw: str, *, minimum: int | None = None, maximum: int | None = None
) -> int:
    try:
        value = int(raw.strip(), 10)
    except ValueError:
        raise ValueError(f"{flag}: expected an integer, got {raw!r}") from None
    if minimum is not None and value < minimum:
        raise ValueError(f"{flag}: must be at least {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ValueError(f"{flag}: must be at most {maximum}, got {value}")
    return value


_SINGLE_VALUE_FLAGS = frozenset(
    {"model", "port", "mode", "time-to-first-token", "inter-token-latency", "max-model-len", "seed"}
)
_MULTI_VALUE_FLAGS = frozenset({"served-model-name"})
#: Ours, not llm-d's: one value per occurrence, and every occurrence counts.
_REPEATABLE_FLAGS = frozenset({"fault"})


def _is_flag(token: str) -> bool:
    return token.startswith("-") and not _PLAIN_NUMBER.fullmatch(token) and token != "-"


def parse_sim_args(
    argv: Sequence[object], env: Mapping[str, str] | None = None
) -> tuple[SimOptions, list[str]]:
    """Build `SimOptions` from llm-d-inference-sim arguments, as written in a Deployment's `args`.

    Returns the options and a list of warnings for flags and arguments that were ignored.
    `--served-model-name` takes every following value up to the next flag (as llm-d does) and
    may also be repeated. `--fault DIRECTIVE` (ours) may be repeated; each value may hold
    several comma-separated directives. `env` is consulted only for `SIM_MODEL` when `--model`
    is absent, which is how llm-d lets a pod's environment name the model.
    Raises `ValueError` naming the flag when a value is missing or invalid.
    """
    # YAML may hand over numbers (`- 8000`); Kubernetes would reject them, we just read them.
    args = [str(arg) for arg in argv]
    values: dict[str, str] = {}
    served: list[str] = []
    faults: list[str] = []
    warnings: list[str] = []
    i, n = 0, len(args)
    while i < n:
        token = args[i]
        i += 1
        if not _is_flag(token):
            warnings.append(f"ignoring unexpected simulator argument {token!r}")
            continue
        name, eq, inline = token.lstrip("-").partition("=")
        flag = f"--{name}"
        if name in _SINGLE_VALUE_FLAGS:
            if eq:
                raw = inline
            elif i < n and not _is_flag(args[i]):
                raw = args[i]
                i += 1
            else:
                raise ValueError(f"{flag}: a value is required")
            if name in values:
                warnings.append(f"{flag} given more than once; using the last value {raw!r}")
            values[name] = raw
        elif name in _MULTI_VALUE_FLAGS:
            names = [inline] if eq else []
            while not eq and i < n and not _is_flag(args[i]):
                names.append(args[i])
                i += 1
            names = [v for v in names if v.strip()]
            if not names:
                raise ValueError(f"{flag}: at least one name is required")
            served.extend(names)
        elif name in _REPEATABLE_FLAGS:
            if eq:
                raw = inline
            elif i < n and not _is_flag(args[i]):
                raw = args[i]
                i += 1
            else:
                raise ValueError(f"{flag}: a value is required")
            faults.append(raw)
        else:
            # Skip the unknown flag's values too, so they are not taken for stray arguments.
            while not eq and i < n and not _is_flag(args[i]):
                i += 1
            warnings.append(f"ignoring unsupported simulator flag {flag}")

    model = values.get("model")
    if model is None and env is not None:
        model = env.get(MODEL_ENV) or None
    if model is None:
        raise ValueError("--model: is required (the name of the simulated model)")
    if not model.strip():
        raise ValueError("--model: must not be empty")

    mode = values.get("mode", "random")
    if mode not in MODES:
        raise ValueError(f"--mode: invalid value {mode!r}, valid values are 'random' and 'echo'")

    # Only flags that were given override the dataclass defaults, which stay the one source.
    given: dict[str, Any] = {}
    if "port" in values:
        given["port"] = _parse_int("--port", values["port"], minimum=1, maximum=65535)
    if "time-to-first-token" in values:
        given["time_to_first_token_ms"] = _parse_duration_ms(
            "--time-to-first-token", values["time-to-first-token"]
        )
    if "inter-token-latency" in values:
        given["inter_token_latency_ms"] = _parse_duration_ms(
            "--inter-token-latency", values["inter-token-latency"]
        )
    if "max-model-len" in values:
        given["max_model_len"] = _parse_int("--max-model-len", values["max-model-len"], minimum=1)
    if "seed" in values:
        given["seed"] = _parse_int("--seed", values["seed"])
    if faults:
        try:  # all occurrences together: two flags may conflict with each other
            parse_faults(faults)
        except FaultError as exc:
            raise ValueError(f"--fault: {exc}") from None
        given["faults"] = faults
    opts = SimOptions(model=model, served_model_names=served, mode=cast(Mode, mode), **given)
    return opts, warnings
