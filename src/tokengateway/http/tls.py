"""TLS for our listeners: server contexts with modern defaults, and a self-made certificate
for a listener that has none given.

`server_context` loads a certificate chain and key: TLS 1.2 and later only, the default
cipher choice of the ssl module (no RC4, no 3DES, no export suites, forward secrecy first),
ALPN offering `http/1.1` (the only protocol our server speaks). `self_signed` makes, once,
a self-signed certificate with the listener's hosts as subjectAltNames (with `openssl`,
the command-line tool, so that no Python crypto package is needed) and keeps it where it
is told; a later call finds and reuses it, so clients that trust it keep trusting it
across restarts. Nothing here knows what is served over it.

`SniContexts` and `SniListener` serve many certificates on one socket: one context per
certificate, built once (`pem_context`), chosen in the handshake by the name the client
sends (SNI), exact names before wildcards; the table is swapped whole, so a new
certificate reaches the next handshake without a restart.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "CertificateError",
    "CertificateInfo",
    "KeyPair",
    "SniContexts",
    "SniListener",
    "ask_client_certificate",
    "pem_context",
    "self_signed",
    "server_context",
]

#: how long a self-made certificate is valid; it is remade when less than a tenth is left
DAYS = 825


class CertificateError(ValueError):
    """A certificate or key that cannot be loaded or made; the message says which and why."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    cert: Path
    key: Path


def _modern() -> ssl.SSLContext:
    """A server context with our defaults and no certificate yet."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
    return context


def server_context(pair: KeyPair) -> ssl.SSLContext:
    context = _modern()
    try:
        context.load_cert_chain(pair.cert, pair.key)
    except (OSError, ssl.SSLError) as exc:
        raise CertificateError(
            f"cannot load the certificate {pair.cert} with the key {pair.key}: {exc}"
        ) from None
    return context


def self_signed(folder: Path, name: str, hosts: list[str]) -> KeyPair:
    """`folder/name.crt` and `folder/name.key`: made now if missing, or if they no longer
    name every one of `hosts`; kept otherwise. The key is readable by its owner only."""
    pair = KeyPair(folder / f"{name}.crt", folder / f"{name}.key")
    if pair.cert.exists() and pair.key.exists() and _covers(pair, hosts):
        return pair
    openssl = shutil.which("openssl")
    if openssl is None:
        raise CertificateError(
            "making a certificate needs the `openssl` command (Debian package openssl); "
            "or give a certificate and key"
        )
    folder.mkdir(parents=True, exist_ok=True)
    names = ",".join(
        f"IP:{h}" if _is_ip(h) else f"DNS:{h}" for h in dict.fromkeys([*hosts, "localhost"])
    )
    made = subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-nodes",
            "-days",
            str(DAYS),
            "-subj",
            f"/CN=tokengateway {name}",
            "-addext",
            f"subjectAltName={names}",
            "-addext",
            "basicConstraints=critical,CA:TRUE",
            "-addext",
            "keyUsage=critical,digitalSignature,keyCertSign",
            "-addext",
            "extendedKeyUsage=serverAuth",
            "-keyout",
            str(pair.key),
            "-out",
            str(pair.cert),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if made.returncode != 0:
        raise CertificateError(f"openssl could not make a certificate: {made.stderr.strip()}")
    os.chmod(pair.key, 0o600)
    record = {"hosts": sorted(set(hosts)), "made": time.time()}
    pair.cert.with_suffix(".hosts").write_text(json.dumps(record) + "\n")
    return pair


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def _covers(pair: KeyPair, hosts: list[str]) -> bool:
    """Whether the certificate was made for every one of `hosts`, and is not near its end
    (its `.hosts` file, written beside it, says both)."""
    try:
        made = json.loads(pair.cert.with_suffix(".hosts").read_text())
        covered, when = set(made["hosts"]), float(made["made"])
    except (OSError, ValueError, KeyError, TypeError):
        return False
    return set(hosts) <= covered and time.time() - when < DAYS * 86400 * 0.9


# --- many certificates on one socket, chosen by SNI ---------------------------------------------


@dataclass(frozen=True, slots=True)
class CertificateInfo:
    """What a loaded certificate says of itself (for status and messages)."""

    subject: str
    names: tuple[str, ...]  # DNS subjectAltNames
    not_after: float | None  # seconds since the epoch; None when it could not be read

    def expired(self, now: float | None = None) -> bool:
        return self.not_after is not None and self.not_after < (now or time.time())


def pem_context(
    cert_pem: str, key_pem: str, more: Sequence[tuple[str, str]] = ()
) -> tuple[ssl.SSLContext, CertificateInfo]:
    """A server context (our defaults) serving this PEM chain and key (and the pairs in
    `more`: an RSA and an ECDSA certificate side by side), and what the first leaf
    certificate says. The ssl module loads certificates from files only: each is written to
    a private temporary folder for the time of the load. Raises CertificateError."""
    context = _modern()
    info = None
    with tempfile.TemporaryDirectory(prefix="tokengateway-tls-") as folder:
        for index, (cert_text, key_text) in enumerate([(cert_pem, key_pem), *more]):
            if "-----BEGIN" not in cert_text:
                raise CertificateError("tls.crt holds no PEM certificate")
            if "-----BEGIN" not in key_text:
                raise CertificateError("tls.key holds no PEM private key")
            cert, key = Path(folder) / f"{index}.crt", Path(folder) / f"{index}.key"
            fd = os.open(key, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
            with os.fdopen(fd, "w") as out:
                out.write(key_text)
            cert.write_text(cert_text)
            try:
                context.load_cert_chain(cert, key)
            except ssl.SSLError as exc:
                reason = exc.reason or str(exc)
                raise CertificateError(f"tls.crt and tls.key do not load: {reason}") from None
            if info is None:
                info = _describe(cert)
    assert info is not None
    return context, info


def ask_client_certificate(context: ssl.SSLContext, ca_pem: str) -> None:
    """Make a server context ask for a client certificate and verify one that is sent
    against these CAs (a client may send none: the policy decides what that means)."""
    context.verify_mode = ssl.CERT_OPTIONAL
    context.load_verify_locations(cadata=ca_pem)


def _describe(cert: Path) -> CertificateInfo:
    # the ssl module decodes a certificate only through this helper (no public API for a
    # server's own certificate); without it, expiry goes unreported
    decode = getattr(ssl._ssl, "_test_decode_cert", None)  # type: ignore[attr-defined]
    try:
        decoded: dict[str, Any] = decode(str(cert)) if decode is not None else {}
    except (ssl.SSLError, OSError, ValueError):
        decoded = {}
    subject = ", ".join(f"{k}={v}" for rdn in decoded.get("subject", ()) for k, v in rdn)
    names = tuple(v for k, v in decoded.get("subjectAltName", ()) if k == "DNS")
    not_after = decoded.get("notAfter")
    return CertificateInfo(
        subject, names, ssl.cert_time_to_seconds(not_after) if not_after else None
    )


@dataclass(frozen=True)
class SniContexts:
    """Which context serves which server name: exact names, then wildcards (`*.example.com`
    admits one or more labels before `example.com`, the longest suffix wins), then the
    default (a client without SNI, or with a name no entry has); None: refused."""

    exact: Mapping[str, ssl.SSLContext] = field(default_factory=dict)
    wildcard: Mapping[str, ssl.SSLContext] = field(default_factory=dict)  # ".example.com"
    default: ssl.SSLContext | None = None
    #: the contexts ask clients for a certificate (`ask_client_certificate`)
    client_certificates: bool = False

    def pick(self, name: str | None) -> ssl.SSLContext | None:
        if name:
            name = name.lower().rstrip(".")
            found = self.exact.get(name)
            if found is not None:
                return found
            dot = name.find(".")
            while dot != -1:
                found = self.wildcard.get(name[dot:])
                if found is not None:
                    return found
                dot = name.find(".", dot + 1)
        return self.default

    def __len__(self) -> int:
        return len(self.exact) + len(self.wildcard) + (self.default is not None)


class SniListener:
    """The context of a socket serving several certificates: its `sni_callback` reads
    `table` at each handshake, and `swap` replaces the table in one assignment (the
    connections already open keep their certificate, the next ones get the new one)."""

    def __init__(self, table: SniContexts | None = None) -> None:
        self.context = _modern()
        self.context.sni_callback = self._choose
        self.swap(table or SniContexts())

    def swap(self, table: SniContexts) -> None:
        # OpenSSL reads whether to ask for a client certificate from the context a
        # connection starts with, not from the one the SNI callback picks (which gives the
        # CAs that verify it): the socket asks every client, or none
        self.context.verify_mode = ssl.CERT_OPTIONAL if table.client_certificates else ssl.CERT_NONE
        self.table = table

    def _choose(self, conn: Any, name: str | None, _context: ssl.SSLContext) -> int | None:
        chosen = self.table.pick(name)
        if chosen is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        conn.context = chosen
        return None
