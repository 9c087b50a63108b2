"""Counter stores, chosen by URI: `memory://` (default, one process), `sqlite://` (one
process, durable), `redis://`, `rediss://` (TLS), `redis+cluster://`, `redis+sentinel://` and
their TLS `rediss+` forms (shared by many replicas)."""

from __future__ import annotations

import re
from urllib.parse import urlsplit

from tokengateway.storage.base import (
    REDIS_SCHEMES,
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
    "hide_password",
    "open_store",
]

SCHEMES = ("memory", "sqlite", *REDIS_SCHEMES)


class StorageURIError(ValueError):
    """A `--storage` URI this build cannot use."""


def hide_password(uri: str) -> str:
    """The URI with any password replaced by `***` (safe for logs and error messages).

    The credentials end at the last `@`, as the Redis URI parser reads them, so a password
    holding `/`, `?`, `#` or `@` is still hidden whole."""
    scheme, sep, rest = uri.partition("://")
    at = rest.rfind("@")
    if not sep or at == -1:
        return _hide_options(uri)
    user, colon, _password = rest[:at].partition(":")
    # `redis://secret@host` (no colon) is how redis-py spells a bare password: hidden too
    hidden = f"{user}:***" if colon else "***"
    return _hide_options(f"{scheme}://{hidden}{rest[at:]}")


def _hide_options(uri: str) -> str:
    """Secrets given as options (`?sentinel_password=...`) hidden too."""
    return re.sub(r"([?&]sentinel_password=)[^&#]*", r"\1***", uri)


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
    if scheme in SCHEMES:
        # imported here so that memory:// never loads the Redis client
        from tokengateway.storage.redis import RedisStore

        return RedisStore(uri)
    shown = scheme or hide_password(uri)
    raise StorageURIError(
        f"storage URI {hide_password(uri)!r}: unknown scheme {shown!r}; supported: "
        + ", ".join(f"{s}://" for s in SCHEMES)
    )
