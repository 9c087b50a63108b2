"""TLS for our listeners: server contexts with modern defaults, and a self-made certificate
for a listener that has none given.

`server_context` loads a certificate chain and key: TLS 1.2 and later only, the default
cipher choice of the ssl module (no RC4, no 3DES, no export suites, forward secrecy first),
ALPN offering `http/1.1` (the only protocol our server speaks). `self_signed` makes, once,
a self-signed certificate with the listener's hosts as subjectAltNames (with `openssl`,
the command-line tool, so that no Python crypto package is needed) and keeps it where it
is told; a later call finds and reuses it, so clients that trust it keep trusting it
across restarts. Nothing here knows what is served over it.
"""

from __future__ import annotations

import ipaddress
import json
import os
import shutil
import ssl
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

__all__ = ["CertificateError", "KeyPair", "self_signed", "server_context"]

#: how long a self-made certificate is valid; it is remade when less than a tenth is left
DAYS = 825


class CertificateError(ValueError):
    """A certificate or key that cannot be loaded or made; the message says which and why."""


@dataclass(frozen=True, slots=True)
class KeyPair:
    cert: Path
    key: Path


def server_context(pair: KeyPair) -> ssl.SSLContext:
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_alpn_protocols(["http/1.1"])
    context.options |= ssl.OP_NO_COMPRESSION | ssl.OP_CIPHER_SERVER_PREFERENCE
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
