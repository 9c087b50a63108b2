"""Counter stores, chosen by URI: `memory://` (default, one process), `sqlite://` (one
process, durable), `redis://`, `rediss://` (TLS), `redis+cluster://`, `redis+sentinel://` and
their TLS `rediss+` forms (shared by many replicas), and each Redis form with `+cached`
(`redis+cached://`: counted in each process, flushed to Redis in batches)."""

from __future__ import annotations

from urllib.parse import urlsplit

from tokengateway.storage.base import (
    CACHED_REDIS_SCHEMES,
    REDIS_SCHEMES,
    CheckResult,
    CounterRef,
    CounterState,
    CounterStore,
    StorageError,
)
from tokengateway.storage.memory import MemoryStore
from tokengateway.storage.uri import StorageURIError, hide_password

__all__ = [
    "CACHED_REDIS_SCHEMES",
    "CheckResult",
    "CounterRef",
    "CounterState",
    "CounterStore",
    "MemoryStore",
    "StorageError",
    "StorageURIError",
    "hide_password",
    "open_store",
]

SCHEMES = ("memory", "sqlite", *REDIS_SCHEMES, *CACHED_REDIS_SCHEMES)


def open_store(uri: str) -> CounterStore:
    """Build the store a URI names; unknown schemes are refused with the supported list."""
    try:
        parts = urlsplit(uri)
    except ValueError as exc:
        raise StorageURIError(f"storage URI {hide_password(uri)!r}: {exc}") from None
    scheme = parts.scheme
    if scheme == "memory":
        if parts.netloc or parts.path not in ("", "/"):
            raise StorageURIError(f"storage URI {uri!r}: memory:// takes no host or path")
        return MemoryStore()
    if scheme == "sqlite":
        from tokengateway.storage.sqlite import SqliteStore

        return SqliteStore(uri)
    if scheme in CACHED_REDIS_SCHEMES:
        from tokengateway.storage.redis_cached import CachedRedisStore

        return CachedRedisStore(uri)
    if scheme in SCHEMES:
        # imported here so that memory:// never loads the Redis client
        from tokengateway.storage.redis import RedisStore

        return RedisStore(uri)
    shown = scheme or hide_password(uri)
    raise StorageURIError(
        f"storage URI {hide_password(uri)!r}: unknown scheme {shown!r}; supported: "
        + ", ".join(f"{s}://" for s in SCHEMES)
    )
