"""Verified TLS to an origin: which authorities sign its certificate and which name it carries.

`UpstreamTLS` is given to an `Origin` (once per configuration); the origin's connections then
speak TLS whatever its URL's scheme, send `server_name` in SNI and verify the certificate
with `context`: against `server_name` (OpenSSL's hostname check), or, when `names` is set,
against those subjectAltNames instead (checked here after the handshake, as the context
cannot). An `UpstreamTLS` with a `refusal` connects nowhere: every request fails with it
(a configuration that names authorities it could not load must not fall back to none).

The pool of an origin is keyed by its `UpstreamTLS` too (`key`, a serial): a connection
verified under one context is never handed to a request that asks for another.
"""

from __future__ import annotations

import itertools
import ssl
from collections.abc import Iterable, Mapping
from typing import Any

__all__ = ["UpstreamTLS", "client_context", "name_problem", "tls_reason"]

_serials = itertools.count(1)


class UpstreamTLS:
    """How to speak TLS to one origin (see the module's docstring)."""

    __slots__ = ("context", "key", "names", "refusal", "server_name")

    def __init__(
        self,
        context: ssl.SSLContext | None,
        server_name: str,
        names: Iterable[tuple[str, str]] = (),
        refusal: str | None = None,
    ) -> None:
        if context is None and refusal is None:
            raise ValueError("an UpstreamTLS needs a context, or the refusal it answers with")
        self.context = context
        self.server_name = server_name
        #: ("DNS", name) or ("URI", uri): one of them must be among the certificate's
        self.names = tuple(names)
        self.refusal = refusal
        self.key = next(_serials)

    def __repr__(self) -> str:
        return f"UpstreamTLS({self.server_name!r}, names={self.names!r}, #{self.key})"


def client_context(cadata: str | None, check_hostname: bool = True) -> ssl.SSLContext:
    """A client context that verifies: TLS 1.2 or later, a certificate required and checked
    against the PEM authorities of `cadata` (the system's when None), and the name sent
    unless `check_hostname` is False (the caller then checks subjectAltNames itself)."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    if cadata is None:
        context.load_default_certs(ssl.Purpose.SERVER_AUTH)
    else:
        context.load_verify_locations(cadata=cadata)
    context.check_hostname = check_hostname
    context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["http/1.1"])
    return context


def _dns_matches(pattern: str, name: str) -> bool:
    """RFC 6125: exact (case-insensitive), or a `*` left-most label standing for one label."""
    pattern, name = pattern.lower().rstrip("."), name.lower().rstrip(".")
    if pattern == name:
        return True
    if not pattern.startswith("*."):
        return False
    head, _, rest = name.partition(".")
    return bool(head) and rest == pattern[2:] and "." in rest


def name_problem(cert: Mapping[str, Any] | None, names: tuple[tuple[str, str], ...]) -> str | None:
    """Why a verified certificate (`getpeercert()`) does not carry any of `names`, or None."""
    sans = [(str(k), str(v)) for k, v in (cert or {}).get("subjectAltName", ())]
    for kind, wanted in names:
        for have_kind, have in sans:
            if kind == have_kind == "DNS" and _dns_matches(have, wanted):
                return None
            if kind == have_kind == "URI" and have == wanted:
                return None
    shown = ", ".join(f"{k}:{v}" for k, v in sans) or "none"
    asked = ", ".join(f"{k}:{v}" for k, v in names)
    return f"subjectAltName mismatch: the certificate names {shown}, none of {asked}"


def tls_reason(exc: BaseException) -> str:
    """OpenSSL's reason in words: "certificate has expired", "Hostname mismatch, ...",
    "self-signed certificate"; else the error's own text."""
    if isinstance(exc, ssl.SSLCertVerificationError) and exc.verify_message:
        return f"certificate verify failed: {exc.verify_message}"
    if isinstance(exc, ssl.SSLError) and exc.reason:
        return str(exc.reason).replace("_", " ").lower()
    return str(exc) or type(exc).__name__
