"""The admin API's TLS and token, kept in the state directory.

On loopback the admin API is plain HTTP with no token, unless told otherwise. Anywhere
else (or with `serve --admin-tls`) it serves HTTPS and asks for a bearer token, because
kubectl sends a token only over TLS and a token in clear text is no protection:

* the certificate is the one given (`--admin-cert`, `--admin-key`), or one made for the
  admin address and kept as `STATE_DIR/tls/admin.crt` (reused on restart while it names
  the address, so a kubeconfig made once keeps working);
* the token is the one given (`--admin-token`, `$TOKENGATEWAY_ADMIN_TOKEN`), or one made
  and kept as `STATE_DIR/admin-token` (mode 0600).

`tokengateway kubeconfig` reads both back from the same place.
"""

from __future__ import annotations

import os
import secrets
import socket
import ssl
from dataclasses import dataclass
from pathlib import Path

from tokengateway.http.tls import KeyPair, self_signed, server_context

__all__ = ["AdminTLS", "admin_tls", "kept_ca", "kept_token", "names_for"]

TOKEN_FILE = "admin-token"
CERT_NAME = "admin"


@dataclass(frozen=True, slots=True)
class AdminTLS:
    context: ssl.SSLContext
    token: str


def _cert_dir(state_dir: Path) -> Path:
    return state_dir / "tls"


def admin_tls(
    state_dir: Path,
    host: str,
    token: str | None = None,
    cert: Path | None = None,
    key: Path | None = None,
) -> AdminTLS:
    """The admin listener's TLS context and token, made and kept when not given. Raises
    `http.tls.CertificateError` naming a certificate that cannot be loaded or made."""
    if (cert is None) != (key is None):
        raise ValueError("--admin-cert and --admin-key go together")
    if cert and key:
        pair = KeyPair(cert, key)
    else:
        pair = self_signed(_cert_dir(state_dir), CERT_NAME, names_for(host))
    if token is None:
        token = kept_token(state_dir)
        if token is None:
            token = secrets.token_urlsafe(32)
            state_dir.mkdir(parents=True, exist_ok=True)
            path = state_dir / TOKEN_FILE
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(token + "\n")
    return AdminTLS(server_context(pair), token)


def names_for(host: str) -> list[str]:
    """What a certificate for a listener on `host` names: the address itself, or, for a
    wildcard (0.0.0.0, ::), the machine's name and the loopback addresses (other addresses
    need a certificate given with --admin-cert)."""
    if host in ("0.0.0.0", "::", ""):
        return [socket.gethostname(), "127.0.0.1", "::1"]
    return [host]


def kept_token(state_dir: Path) -> str | None:
    try:
        return (state_dir / TOKEN_FILE).read_text().strip() or None
    except FileNotFoundError:
        return None


def kept_ca(state_dir: Path) -> bytes | None:
    """The self-made certificate a client trusts, if the gateway made one here."""
    try:
        return (_cert_dir(state_dir) / f"{CERT_NAME}.crt").read_bytes()
    except FileNotFoundError:
        return None
