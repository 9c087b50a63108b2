"""The one way answers are kept per configuration: a dict bounded by its oldest entry.

CEL answers per selector values, AuthPolicy decisions per API key, Rego inputs and
decisions, counter keys per user: each is a plain dict, filled with `keep`.
"""

from __future__ import annotations

import contextlib
from typing import TypeVar

__all__ = ["keep"]

K = TypeVar("K")
V = TypeVar("V")


def keep(cache: dict[K, V], key: K, value: V, size: int) -> None:
    """`cache[key] = value`, the oldest entry going first when `size` are kept already.

    Another thread may evict at the same time (the admin API's): losing that race is
    harmless, at worst one entry more is kept."""
    if len(cache) >= size:
        with contextlib.suppress(KeyError, RuntimeError, StopIteration):
            del cache[next(iter(cache))]
    cache[key] = value
