"""The usage page served at the admin API's `GET /ui`: one self-contained HTML file.

Its CSS and JavaScript are inline and it loads nothing but `/usage` (no CDN, no fonts: the
machine may have no internet). A strict Content-Security-Policy with a fresh nonce per
answer lets only the page's own script and style run, as a second line behind the page's
rule of inserting data with `textContent` only.
"""

from __future__ import annotations

import secrets
from functools import cache
from importlib import resources

__all__ = ["page"]


@cache
def _template() -> str:
    files = resources.files("tokengateway.observability")
    return files.joinpath("static", "usage.html").read_text(encoding="utf-8")


def page() -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The page's body and the headers that go with it."""
    nonce = secrets.token_urlsafe(18)
    body = _template().replace("{{nonce}}", nonce).encode("utf-8")
    csp = (
        f"default-src 'none'; script-src 'nonce-{nonce}'; style-src 'nonce-{nonce}'; "
        "connect-src 'self'; img-src data:; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )
    headers = [
        (b"content-security-policy", csp.encode()),
        (b"cache-control", b"no-store"),
        (b"referrer-policy", b"no-referrer"),  # the URL may carry ?token=
        (b"x-content-type-options", b"nosniff"),
    ]
    return body, headers
