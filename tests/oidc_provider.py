"""A real OpenID Connect provider on loopback: panva's `oidc-provider` on Node.js.

`tests/oidc/provider.mjs` configures it (client_credentials grant, JWT access tokens through
resource indicators, each token carrying its client's `tier`); `make setup` (through
scripts/setup-system.sh) installs it with `npm ci`. A missing node or package fails the
test: never a skip. Keys are made here, as private JWKs, so that a test can restart the
provider with other keys (rotation) and forge tokens with a key the provider uses.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature

from tests.conftest import free_socket, require

HERE = Path(__file__).resolve().parent / "oidc"

#: the provider's clients: (client_id, tier); every secret is the id backwards, padded.
#: "opaque-*" clients get opaque tokens (for introspection); "gateway" introspects them
CLIENTS = [("aisha", "free"), ("carol", "free"), ("bob", "gold"), ("mallory", "platinum")]
CLIENTS += [("opaque-dana", "free"), ("opaque-erin", "gold"), ("gateway", "none")]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _int(n: int) -> str:
    return _b64(n.to_bytes((n.bit_length() + 7) // 8, "big"))


def secret_of(client: str) -> str:
    return (client[::-1] + "-secret-") * 4


class Key:
    """A signing key: the private key and its JWK (private and public)."""

    def __init__(self, kid: str, kind: str = "RSA") -> None:
        self.kid = kid
        if kind == "RSA":
            self.private: Any = rsa.generate_private_key(public_exponent=65537, key_size=2048)
            numbers = self.private.private_numbers()
            public = numbers.public_numbers
            self.public_jwk = {"kty": "RSA", "kid": kid, "use": "sig", "alg": "RS256"}
            self.public_jwk |= {"n": _int(public.n), "e": _int(public.e)}
            self.jwk = self.public_jwk | {
                "d": _int(numbers.d),
                "p": _int(numbers.p),
                "q": _int(numbers.q),
                "dp": _int(numbers.dmp1),
                "dq": _int(numbers.dmq1),
                "qi": _int(numbers.iqmp),
            }
            self.alg = "RS256"
        else:
            self.private = ec.generate_private_key(ec.SECP256R1())
            numbers = self.private.private_numbers()
            public = numbers.public_numbers
            self.public_jwk = {"kty": "EC", "kid": kid, "use": "sig", "alg": "ES256"}
            self.public_jwk |= {
                "crv": "P-256",
                "x": _b64(public.x.to_bytes(32, "big")),
                "y": _b64(public.y.to_bytes(32, "big")),
            }
            self.jwk = self.public_jwk | {"d": _b64(numbers.private_value.to_bytes(32, "big"))}
            self.alg = "ES256"

    def sign(self, claims: dict[str, Any], alg: str | None = None, **header: Any) -> str:
        """A JWS over `claims`, signed by this key (RS256 or ES256)."""
        alg = alg or self.alg
        head = {"alg": alg, "typ": "at+jwt", "kid": self.kid} | header
        signed = f"{_b64(json.dumps(head).encode())}.{_b64(json.dumps(claims).encode())}"
        if alg == "RS256":
            sig = self.private.sign(signed.encode(), padding.PKCS1v15(), hashes.SHA256())
        elif alg == "PS256":
            pss = padding.PSS(padding.MGF1(hashes.SHA256()), hashes.SHA256.digest_size)
            sig = self.private.sign(signed.encode(), pss, hashes.SHA256())
        else:
            r, s = decode_dss_signature(
                self.private.sign(signed.encode(), ec.ECDSA(hashes.SHA256()))
            )
            sig = r.to_bytes(32, "big") + s.to_bytes(32, "big")
        return f"{signed}.{_b64(sig)}"


def unsigned(claims: dict[str, Any], kid: str) -> str:
    """A token with `alg: none` and no signature."""
    head = _b64(json.dumps({"alg": "none", "kid": kid}).encode())
    return f"{head}.{_b64(json.dumps(claims).encode())}."


def hs256(claims: dict[str, Any], secret: bytes, kid: str) -> str:
    """A token MACed with HS256 under `secret` (an attacker's guess: the public key)."""
    head = _b64(json.dumps({"alg": "HS256", "typ": "JWT", "kid": kid}).encode())
    signed = f"{head}.{_b64(json.dumps(claims).encode())}"
    mac = hmac.new(secret, signed.encode(), hashlib.sha256).digest()
    return f"{signed}.{_b64(mac)}"


class OidcProvider:
    """oidc-provider on a loopback port; `restart` keeps the port (and so the issuer)."""

    def __init__(self, folder: Path, keys: list[Key], ttls: dict[str, int] | None = None) -> None:
        self.node = require("node")
        if not (HERE / "node_modules" / "oidc-provider").is_dir():
            pytest.fail("tests/oidc/node_modules is missing: run `make setup` (npm ci)")
        self.folder = folder
        folder.mkdir(parents=True, exist_ok=True)
        sock = free_socket()
        self.port = sock.getsockname()[1]
        sock.close()
        self.issuer = f"http://127.0.0.1:{self.port}"
        self.ttls = ttls or {}
        self.proc: subprocess.Popen[bytes] | None = None
        self.keys = keys
        self.start(keys)

    def start(self, keys: list[Key]) -> None:
        """Serve with `keys` (the first one signs new tokens)."""
        self.keys = keys
        config = {
            "port": self.port,
            "issuer": self.issuer,
            "keys": [k.jwk for k in keys],
            "clients": [
                {
                    "client_id": client,
                    "client_secret": secret_of(client),
                    "tier": tier,
                    "ttl": self.ttls.get(client, 3600),
                    "format": "opaque" if client.startswith("opaque-") else "jwt",
                }
                for client, tier in CLIENTS
            ],
            "alg": keys[0].alg,
        }
        path = self.folder / "provider.json"
        path.write_text(json.dumps(config))
        log = open(self.folder / "provider.log", "ab")  # noqa: SIM115 - the child keeps it
        self.proc = subprocess.Popen(
            [self.node, str(HERE / "provider.mjs"), str(path)],
            cwd=HERE,
            stdout=subprocess.PIPE,
            stderr=log,
        )
        log.close()
        assert self.proc.stdout is not None
        line = self.proc.stdout.readline()  # "ready" once it listens
        if line.strip() != b"ready":
            self.stop()
            pytest.fail(f"oidc-provider did not start: {self.output()}")

    def output(self) -> str:
        return (self.folder / "provider.log").read_text(errors="replace")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        if proc is not None and proc.stdout is not None:
            proc.stdout.close()

    def restart(self, keys: list[Key]) -> None:
        self.stop()
        self.start(keys)

    def token(self, client: str) -> str:
        """A JWT access token for `client`, by the client_credentials grant."""
        answer = httpx.post(
            f"{self.issuer}/token",
            data={
                "grant_type": "client_credentials",
                "client_id": client,
                "client_secret": secret_of(client),
                "scope": "llm",
            },
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        return str(answer.json()["access_token"])

    def introspect(self, token: str) -> dict[str, Any]:
        """What the provider's introspection endpoint says of `token`."""
        answer = httpx.post(
            f"{self.issuer}/token/introspection",
            data={"token": token},
            auth=("gateway", secret_of("gateway")),
            timeout=10,
        )
        assert answer.status_code == 200, answer.text
        return dict(answer.json())

    def revoke(self, token: str, client: str) -> None:
        answer = httpx.post(
            f"{self.issuer}/token/revocation",
            data={"token": token, "client_id": client, "client_secret": secret_of(client)},
            timeout=10,
        )
        assert answer.status_code == 200, answer.text

    def claims(self, sub: str, **extra: Any) -> dict[str, Any]:
        """Claims like the provider's own, for tokens forged in tests."""
        now = int(time.time())
        base = {"sub": sub, "iss": self.issuer, "iat": now, "exp": now + 600, "tier": "free"}
        return base | extra


@pytest.fixture
def oidc(tmp_path: Path) -> Iterator[Callable[..., OidcProvider]]:
    """Start providers: `oidc(keys, ttls)`; all are stopped at the end."""
    started: list[OidcProvider] = []

    def start(keys: list[Key] | None = None, ttls: dict[str, int] | None = None) -> OidcProvider:
        folder = tmp_path / f"oidc-{len(started)}"
        provider = OidcProvider(folder, keys or [Key("k1")], ttls)
        started.append(provider)
        return provider

    yield start
    for provider in started:
        provider.stop()
