"""Counter stores, chosen by URI: `memory://` (default, one process)."""

from __future__ import annotations

from urllib.parse import urlsplit

from tokengateway.storage.base import (
    CheckResult,
    CounterRef,
    CounterState,
    CounterStore,
    StorageError,
)
from tokengateway.storage.memory import MemoryStore

__all__ = [
    "CheckResult",
    "CounterRef",
    "CounterState",
    "CounterStore",
    "MemoryStore",
    "StorageError",
    "StorageURIError",
    "open_store",
]

SCHEMES = ("memory",)


class StorageURIError(ValueError):
    """A `--storage` URI this build cannot use."""


def open_store(uri: str) -> CounterStore:
    """Build the store a URI names; unknown schemes are refused with the supported list."""
    parts = urlsplit(uri)
    scheme = parts.scheme
    if scheme == "memory":
        if parts.netloc or parts.path not in ("", "/"):
            raise StorageURIError(f"storage URI {uri!r}: memory:// takes no host or path")
        return MemoryStore()
    shown = scheme or uri
    raise StorageURIError(
        f"storage URI {uri!r}: unknown scheme {shown!r}; supported: "
        + ", ".join(f"{s}://" for s in SCHEMES)
    )
