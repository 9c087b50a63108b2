"""JWT identities: a token signed by a key the identity provider publishes.

Authorino's `jwt` authentication (go-oidc underneath), with these semantics:

- keys come from OpenID Connect discovery (`issuerUrl` + `/.well-known/openid-configuration`,
  whose `issuer` must be `issuerUrl` exactly, then its `jwks_uri`) or straight from a
  `jwksUrl`; a `KeySet` holds them for every rule and configuration naming the same source;
- the signature must verify with a key of the set: RS256/384/512, PS256/384/512,
  ES256/384/512 and EdDSA. `none` and the HMAC family are refused whatever the key (a public
  key is no shared secret). A key's type (and curve) must fit the algorithm, and a key that
  names its `alg` must name this one; a token that names a `kid` is checked against that
  key only. With discovery, the algorithm must also be one the provider lists in
  `id_token_signing_alg_values_supported` (go-oidc's rule);
- `exp` is required and checked without leeway; `nbf` and `iat` may be up to
  `LEEWAY` (5 minutes, go-oidc's figure for `nbf`) in the future, for clock skew. Authorino
  checks no `iat`; a token minted in the future is refused here;
- with `issuerUrl`, the token's `iss` must be it (Authorino skips that check; a token of
  another issuer signed by a shared key is not this provider's word);
- the identity (`auth.identity`) is the token's claims.

Nothing here does I/O: `KeySet.refresh` takes the fetching function (`Fetch`) from the
gateway, which calls it at configuration load, every `ttl` seconds, and once, rate limited,
when a token names a key the set does not have. Verifying is synchronous and never waits
for the network.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import datetime
import json
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import encode_dss_signature

__all__ = ["LEEWAY", "Fetch", "JwtVerifier", "KeySet", "Verified", "token_expiry"]

#: seconds `nbf` and `iat` may lie in the future (clock skew between the provider and us)
LEEWAY = 300.0
#: a token naming an unknown key refreshes its key set at most this often (seconds)
FORCED_REFRESH_INTERVAL = 10.0
#: after a failed fetch, the next is tried this long later (doubling, up to RETRY_MAX)
RETRY_MIN, RETRY_MAX = 1.0, 30.0

#: the fetching function: the body of a 200 answer to GET url within `timeout` seconds;
#: raises on anything else
Fetch = Callable[[str, float], Awaitable[bytes]]
#: Authorino's default timeout of a discovery or JWKS request (seconds)
DEFAULT_TIMEOUT = 5.0

MSG_NO_CONFIG = "missing openid connect configuration"
MSG_NO_JWKS = "missing JSON Web Key Set"
MSG_SIGNATURE = "oidc: failed to verify signature: failed to verify id token signature"

_HASHES: dict[str, type[hashes.HashAlgorithm]] = {
    "256": hashes.SHA256,
    "384": hashes.SHA384,
    "512": hashes.SHA512,
}
_CURVES = {"ES256": ec.SECP256R1, "ES384": ec.SECP384R1, "ES512": ec.SECP521R1}
_JWK_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,
    "P-521": ec.SECP521R1,
}
SUPPORTED_ALGORITHMS = frozenset(
    [f"{family}{bits}" for family in ("RS", "PS", "ES") for bits in _HASHES] + ["EdDSA"]
)

PublicKey = (
    rsa.RSAPublicKey | ec.EllipticCurvePublicKey | ed25519.Ed25519PublicKey | ed448.Ed448PublicKey
)


def _b64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _b64int(text: Any) -> int:
    if not isinstance(text, str) or not text:
        raise ValueError("missing key parameter")
    return int.from_bytes(_b64(text), "big")


@dataclass(frozen=True, slots=True)
class _Key:
    kid: str | None
    alg: str | None
    key: PublicKey

    def fits(self, alg: str) -> bool:
        if self.alg and self.alg != alg:
            return False
        key = self.key
        if alg.startswith(("RS", "PS")):
            return isinstance(key, rsa.RSAPublicKey)
        if alg.startswith("ES"):
            return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(
                key.curve, _CURVES[alg]
            )
        return isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))

    def verifies(self, alg: str, signature: bytes, signed: bytes) -> bool:
        key = self.key
        try:
            if isinstance(key, rsa.RSAPublicKey):
                digest = _HASHES[alg[2:]]()
                if alg.startswith("RS"):
                    key.verify(signature, signed, padding.PKCS1v15(), digest)
                else:
                    pss = padding.PSS(padding.MGF1(digest), digest.digest_size)
                    key.verify(signature, signed, pss, digest)
            elif isinstance(key, ec.EllipticCurvePublicKey):
                size = (key.curve.key_size + 7) // 8
                if len(signature) != 2 * size:
                    return False
                r = int.from_bytes(signature[:size], "big")
                s = int.from_bytes(signature[size:], "big")
                der = encode_dss_signature(r, s)
                key.verify(der, signed, ec.ECDSA(_HASHES[alg[2:]]()))
            else:
                key.verify(signature, signed)
        except (InvalidSignature, ValueError):
            return False
        return True


def _public_key(jwk: Mapping[str, Any]) -> PublicKey | None:
    """The public key of a JWK (RFC 7517/7518/8037); None for one that is not a signature
    key of a kind supported here (an `oct` secret, an encryption key, a broken one)."""
    if jwk.get("use") not in (None, "sig"):
        return None
    kty = jwk.get("kty")
    try:
        if kty == "RSA":
            return rsa.RSAPublicNumbers(_b64int(jwk.get("e")), _b64int(jwk.get("n"))).public_key()
        if kty == "EC":
            curve = _JWK_CURVES.get(str(jwk.get("crv")))
            if curve is None:
                return None
            numbers = ec.EllipticCurvePublicNumbers(
                _b64int(jwk.get("x")), _b64int(jwk.get("y")), curve()
            )
            return numbers.public_key()
        if kty == "OKP":
            raw = _b64(str(jwk.get("x") or ""))
            if jwk.get("crv") == "Ed25519":
                return ed25519.Ed25519PublicKey.from_public_bytes(raw)
            if jwk.get("crv") == "Ed448":
                return ed448.Ed448PublicKey.from_public_bytes(raw)
    except (ValueError, TypeError, binascii.Error):
        return None
    return None


class KeySet:
    """The signing keys of one issuer (`issuer` set: found by discovery) or of one JWKS URL.

    Shared by every rule, policy and configuration that names the same source, so a reload
    neither refetches nor forgets keys. `generation` changes whenever the keys do: a
    decision kept for a token remembers it and is worked out again after a change.
    """

    def __init__(
        self,
        issuer: str | None,
        jwks_url: str | None,
        ttl: float = 0.0,
        timeout: float = DEFAULT_TIMEOUT,
    ) -> None:
        if (issuer is None) == (jwks_url is None):
            raise ValueError("a key set has an issuer or a JWKS URL, not both")
        self.issuer = issuer
        self.jwks_url = jwks_url
        #: seconds between refreshes; 0: only at load and for an unknown key (Authorino)
        self.ttl = ttl
        self.timeout = timeout
        self.keys: tuple[_Key, ...] = ()
        #: the algorithms discovery lists (None: no discovery, or it lists none)
        self.algorithms: frozenset[str] | None = None
        self.loaded = False
        self.generation = 0
        #: why the last fetch failed (None after a success)
        self.error: str | None = None
        self._jwks_text: bytes | None = None
        self._fetched = 0.0  # monotonic time of the last successful fetch
        self._next_try = 0.0  # monotonic time before which a failed fetch is not retried
        self._retry = RETRY_MIN
        self._forced = -FORCED_REFRESH_INTERVAL
        self._running: asyncio.Future[bool] | None = None

    @property
    def source(self) -> str:
        return self.issuer or self.jwks_url or ""

    def __repr__(self) -> str:
        return f"KeySet({self.source!r}, keys={len(self.keys)}, loaded={self.loaded})"

    def due(self, now: float | None = None) -> float:
        """Seconds until the next scheduled fetch (0 or less: now; inf: none)."""
        now = time.monotonic() if now is None else now
        if not self.loaded or self.error is not None:
            return self._next_try - now
        if self.ttl > 0:
            return self._fetched + self.ttl - now
        return float("inf")

    def refresh(self, fetch: Fetch, *, forced: bool = False) -> Awaitable[bool]:
        """Fetch the keys again; True when the set now has keys. Callers at the same time
        share one fetch. `forced` (a token named an unknown key): at most one per
        FORCED_REFRESH_INTERVAL; a refused one answers False at once."""
        if self._running is not None and not self._running.done():
            return asyncio.shield(self._running)
        now = time.monotonic()
        if forced:
            if now - self._forced < FORCED_REFRESH_INTERVAL:
                return _done(False)
            self._forced = now
        task = asyncio.ensure_future(self._refresh(fetch))
        self._running = task
        return asyncio.shield(task)

    async def _refresh(self, fetch: Fetch) -> bool:
        try:
            algorithms = None
            jwks_url = self.jwks_url
            if self.issuer is not None:
                well_known = self.issuer.rstrip("/") + "/.well-known/openid-configuration"
                discovery = json.loads(await fetch(well_known, self.timeout))
                if not isinstance(discovery, dict):
                    raise ValueError("the discovery document is not a JSON object")
                if discovery.get("issuer") != self.issuer:
                    raise ValueError(
                        "oidc: issuer did not match the issuer returned by provider, "
                        f"expected {self.issuer!r} got {discovery.get('issuer')!r}"
                    )
                jwks_url = discovery.get("jwks_uri")
                if not isinstance(jwks_url, str) or not jwks_url:
                    raise ValueError("the discovery document has no jwks_uri")
                listed = discovery.get("id_token_signing_alg_values_supported")
                if isinstance(listed, list):
                    algorithms = frozenset(a for a in listed if a in SUPPORTED_ALGORITHMS)
            assert jwks_url is not None
            text = await fetch(jwks_url, self.timeout)
            self.install(json.loads(text), algorithms or None, text)
        except Exception as exc:  # a provider down or wrong: keep what we had, retry later
            self.error = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
            self._next_try = time.monotonic() + self._retry
            self._retry = min(self._retry * 2, RETRY_MAX)
            return self.loaded
        return True

    def install(
        self, jwks: Any, algorithms: frozenset[str] | None = None, text: bytes | None = None
    ) -> None:
        """Take a fetched JWKS (a JSON object with `keys`); ValueError when it is not one."""
        if not isinstance(jwks, dict) or not isinstance(jwks.get("keys"), list):
            raise ValueError("the JWKS is not a JSON object with a `keys` list")
        keys = []
        for jwk in jwks["keys"]:
            if not isinstance(jwk, dict):
                continue
            public = _public_key(jwk)
            if public is None:
                continue
            kid, alg = jwk.get("kid"), jwk.get("alg")
            keys.append(
                _Key(
                    kid if isinstance(kid, str) else None,
                    alg if isinstance(alg, str) else None,
                    public,
                )
            )
        text = text if text is not None else json.dumps(jwks, sort_keys=True).encode()
        if text != self._jwks_text or algorithms != self.algorithms or not self.loaded:
            self.keys = tuple(keys)
            self.algorithms = algorithms
            self._jwks_text = text
            self.generation += 1
        self.loaded = True
        self.error = None
        self._fetched = time.monotonic()
        self._retry = RETRY_MIN


def _done(value: bool) -> Awaitable[bool]:
    future: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
    future.set_result(value)
    return future


@dataclass(frozen=True, slots=True)
class Verified:
    """A token's check: its claims, or why it was refused."""

    claims: dict[str, Any] | None
    error: str | None = None
    #: the token named a key the set does not have (or the set has no keys yet): a refresh
    #: of the set may change the answer
    unknown_key: bool = False


def _time(value: float) -> str:
    when = datetime.datetime.fromtimestamp(value, datetime.UTC)
    return when.strftime("%Y-%m-%dT%H:%M:%SZ")


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


def token_expiry(token: str) -> float | None:
    """The `exp` of a token already verified (None when it cannot be read)."""
    try:
        claims = json.loads(_b64(token.split(".")[1]))
    except (ValueError, IndexError, binascii.Error):
        return None
    return _number(claims.get("exp")) if isinstance(claims, dict) else None


class JwtVerifier:
    """One `jwt` rule's check of a token against its key set."""

    __slots__ = ("keys",)

    def __init__(self, keys: KeySet) -> None:
        self.keys = keys

    def verify(self, token: str, now: float | None = None) -> Verified:
        now = time.time() if now is None else now
        parts = token.split(".")
        if len(parts) != 3:
            return Verified(None, "oidc: malformed jwt: compact JWS format must have three parts")
        try:
            header = json.loads(_b64(parts[0]))
            claims = json.loads(_b64(parts[1]))
            signature = _b64(parts[2])
        except (ValueError, binascii.Error) as exc:
            return Verified(None, f"oidc: malformed jwt: {exc}")
        if not isinstance(header, dict) or not isinstance(claims, dict):
            return Verified(None, "oidc: malformed jwt: header and claims must be JSON objects")
        keys = self.keys
        if not keys.loaded:
            return Verified(None, MSG_NO_CONFIG if keys.issuer else MSG_NO_JWKS, True)

        alg = header.get("alg")
        if alg not in SUPPORTED_ALGORITHMS:
            return Verified(
                None, f"oidc: malformed jwt: unexpected signature algorithm {str(alg)!r}"
            )
        kid = header.get("kid")
        candidates = [k for k in keys.keys if kid is None or k.kid == kid]
        if keys.algorithms is not None and alg not in keys.algorithms:
            # a provider that rotates to a key of another algorithm lists it too: with a
            # key we have not seen, a refresh may change the answer
            expected = sorted(keys.algorithms)
            return Verified(
                None,
                "oidc: id token signed with unsupported algorithm, "
                f"expected {expected} got {alg!r}",
                kid is not None and not candidates,
            )
        if not candidates:
            return Verified(None, MSG_SIGNATURE, True)
        signed = f"{parts[0]}.{parts[1]}".encode("ascii", "replace")
        if not any(k.fits(alg) and k.verifies(alg, signature, signed) for k in candidates):
            return Verified(None, MSG_SIGNATURE)

        if keys.issuer is not None and claims.get("iss") != keys.issuer:
            return Verified(
                None,
                "oidc: id token issued by a different provider, "
                f"expected {keys.issuer!r} got {claims.get('iss')!r}",
            )
        exp = _number(claims.get("exp"))
        if exp is None or now > exp:
            shown = _time(exp) if exp is not None else "none"
            return Verified(None, f"oidc: token is expired (Token Expiry: {shown})")
        for claim, what in (("nbf", "nbf (not before)"), ("iat", "iat (issued at)")):
            value = _number(claims.get(claim))
            if claims.get(claim) is not None and value is None:
                return Verified(None, f"oidc: malformed jwt: `{claim}` is not a number")
            if value is not None and now + LEEWAY < value:
                return Verified(
                    None, f"oidc: current time {_time(now)} before the {what} time: {_time(value)}"
                )
        return Verified(claims)
