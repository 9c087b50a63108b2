"""What every store says about its URI: the error for one it cannot use, and the URI as it
may be shown (password hidden). Here, below the stores, so that the package's `open_store`
imports the stores and no store imports the package."""

from __future__ import annotations

import re

__all__ = ["StorageURIError", "hide_password"]


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
