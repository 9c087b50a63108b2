"""Durations as Kuadrant's `Rate.window` and Gateway API's `Duration` write them (GEP-2257):
`1h30m`, `500ms`. Here, below both the manifest models (resources/) and the limits that
count in them (limits/), so neither imports the other."""

from __future__ import annotations

import re

__all__ = ["WINDOW_PATTERN", "parse_window"]

WINDOW_PATTERN = r"^([0-9]{1,5}(h|m|s|ms)){1,4}$"
_WINDOW_RE = re.compile(WINDOW_PATTERN)
_WINDOW_PART_RE = re.compile(r"([0-9]{1,5})(ms|h|m|s)")
_UNIT_MS = {"h": 3_600_000, "m": 60_000, "s": 1_000, "ms": 1}


def parse_window(s: str) -> float:
    """Seconds in a Kuadrant window / Gateway API duration (`"1h30m"` -> 5400.0).

    Parts add up like Go's `time.ParseDuration`, which Kuadrant uses; the sum is done in whole
    milliseconds so `"500ms"` is exactly 0.5.
    """
    if not isinstance(s, str) or not _WINDOW_RE.fullmatch(s):
        raise ValueError(f"{s!r} does not match {WINDOW_PATTERN}")
    total_ms = sum(int(n) * _UNIT_MS[unit] for n, unit in _WINDOW_PART_RE.findall(s))
    return total_ms / 1000
