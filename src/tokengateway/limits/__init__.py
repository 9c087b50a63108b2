"""Rate limits: what is counted (`limit`) and the verbs that count it (`limiter`)."""

from tokengateway.limits.counting import TOTAL, Counting, parse_counting
from tokengateway.limits.limit import (
    Limit,
    LimitCompileError,
    Rate,
    compile_limits,
    counter_scope,
    parse_counter_key,
    parse_window,
)
from tokengateway.limits.limiter import Applicable, Limiter, OnError, StorageUnavailable

__all__ = [
    "TOTAL",
    "Applicable",
    "Counting",
    "Limit",
    "LimitCompileError",
    "Limiter",
    "OnError",
    "Rate",
    "StorageUnavailable",
    "compile_limits",
    "counter_scope",
    "parse_counter_key",
    "parse_counting",
    "parse_window",
]
