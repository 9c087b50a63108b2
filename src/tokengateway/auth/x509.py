"""x509 identities: a client certificate signed by one of the CAs a rule trusts.

Authorino's `x509` authentication, as its `mtls` evaluator does it:

- the trusted CAs are the Secrets the rule's label selector matches, in the AuthConfig's
  namespace (Kuadrant's system namespace) or in all with `allNamespaces: true`; a Secret's
  `tls.crt`, else its `ca.crt`, gives the CA (the last PEM certificate in it that parses);
- the client's certificate must be signed directly by one of them (no intermediates: only
  the leaf reaches the check), be within its validity period, as must the CA, and, when it
  names extended key usages, allow `clientAuth`;
- the identity is the certificate's subject as Go's `pkix.Name` marshals to JSON, so
  `auth.identity.CommonName`, `auth.identity.Organization` (a list) and the rest read as
  they do under Authorino.

The certificate comes from the TLS connection (what Authorino reads from Envoy's
`source.certificate`): the gateway terminates TLS itself, asks for a client certificate on
its HTTPS listener when such a rule applies (docs/tls.md) and passes the PEM it received.
Checked certificates are kept by their PEM text, until they expire, so a connection's
requests pay one dictionary lookup after the first.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from tokengateway.auth.model import SecretRecord

__all__ = ["TrustedCAs", "subject_json"]

#: checked certificates kept per rule (the oldest goes first when full)
KEPT = 4096

MSG_MISSING = "client certificate is missing"
MSG_INVALID = "invalid client certificate"
MSG_UNKNOWN_AUTHORITY = "x509: certificate signed by unknown authority"
MSG_KEY_USAGE = "x509: certificate specifies an incompatible key usage"

# Go's pkix.Name fields, in the order it marshals them, and the attribute each one gathers
_LISTS = (
    ("Country", NameOID.COUNTRY_NAME),
    ("Organization", NameOID.ORGANIZATION_NAME),
    ("OrganizationalUnit", NameOID.ORGANIZATIONAL_UNIT_NAME),
    ("Locality", NameOID.LOCALITY_NAME),
    ("Province", NameOID.STATE_OR_PROVINCE_NAME),
    ("StreetAddress", NameOID.STREET_ADDRESS),
    ("PostalCode", NameOID.POSTAL_CODE),
)


def subject_json(name: x509.Name) -> dict[str, Any]:
    """A subject as Go's `json.Marshal(pkix.Name)` writes it: lists are null when empty,
    `CommonName` and `SerialNumber` are the last such attribute, `Names` has every
    attribute in order with its OID as a list of integers."""
    out: dict[str, Any] = {field: None for field, _ in _LISTS}
    out["SerialNumber"] = ""
    out["CommonName"] = ""
    names = []
    for attribute in name:
        oid, value = attribute.oid, attribute.value
        text = value if isinstance(value, str) else value.decode("utf-8", "replace")
        names.append({"Type": [int(p) for p in oid.dotted_string.split(".")], "Value": text})
        if oid == NameOID.COMMON_NAME:
            out["CommonName"] = text
        elif oid == NameOID.SERIAL_NUMBER:
            out["SerialNumber"] = text
        else:
            for field, wanted in _LISTS:
                if oid == wanted:
                    out[field] = [*(out[field] or ()), text]
    out["Names"] = names
    out["ExtraNames"] = None
    return out


def _last_certificate(pem: str) -> x509.Certificate | None:
    """The last PEM certificate in `pem` that parses (as Authorino reads a CA Secret)."""
    found = None
    marker = "-----BEGIN CERTIFICATE-----"
    for chunk in pem.split(marker)[1:]:
        try:
            found = x509.load_pem_x509_certificate((marker + chunk).encode())
        except ValueError:
            continue
    return found


@dataclass(frozen=True, slots=True)
class _Checked:
    identity: dict[str, Any] | None
    error: str | None
    #: seconds since the epoch after which the answer must be worked out again
    until: float


class TrustedCAs:
    """The CAs one `x509` rule trusts, and the check of a client certificate against them."""

    __slots__ = ("_cas", "_kept", "secrets")

    def __init__(
        self,
        secrets: Sequence[SecretRecord],
        matches: Callable[[Mapping[str, str]], bool],
        namespace: str | None,
    ) -> None:
        #: "namespace/name" of the Secrets that gave a CA
        self.secrets: list[str] = []
        self._cas: list[tuple[x509.Certificate, str]] = []
        for secret in secrets:
            if namespace is not None and secret.namespace != namespace:
                continue
            if not matches(secret.labels):
                continue
            pem = secret.data.get("tls.crt") or secret.data.get("ca.crt") or ""
            cert = _last_certificate(str(pem))
            if cert is None:
                continue
            self.secrets.append(f"{secret.namespace}/{secret.name}")
            self._cas.append((cert, cert.public_bytes(Encoding.PEM).decode("ascii")))
        self._kept: dict[str, _Checked] = {}

    @property
    def pem(self) -> list[str]:
        """The CA certificates, PEM: what the TLS listener trusts for this rule."""
        return [text for _, text in self._cas]

    def check(
        self, pem: str | None, now: float | None = None
    ) -> tuple[dict[str, Any] | None, str | None]:
        """(subject, None) when `pem` is a certificate one of the CAs signed and that is
        valid now; (None, Authorino's reason) otherwise."""
        if not pem:
            return None, MSG_MISSING
        if now is None:
            now = datetime.datetime.now(datetime.UTC).timestamp()
        kept = self._kept.get(pem)
        if kept is not None and now < kept.until:
            return kept.identity, kept.error
        checked = self._check(pem, now)
        if len(self._kept) >= KEPT:
            del self._kept[next(iter(self._kept))]
        self._kept[pem] = checked
        return checked.identity, checked.error

    def _check(self, pem: str, now: float) -> _Checked:
        retry = now + 60.0  # a refusal is worked out again a minute later (a CA may appear)
        try:
            cert = x509.load_pem_x509_certificate(pem.encode())
        except ValueError:
            return _Checked(None, MSG_INVALID, retry)
        for ca, _ in self._cas:
            try:
                cert.verify_directly_issued_by(ca)
            except (ValueError, TypeError, InvalidSignature):
                continue
            for item, which in ((cert, "certificate"), (ca, "CA certificate")):
                start = item.not_valid_before_utc.timestamp()
                end = item.not_valid_after_utc.timestamp()
                if not start <= now <= end:
                    return _Checked(None, _expired(which, now, start, end), retry)
            if not _client_auth_allowed(cert):
                return _Checked(None, MSG_KEY_USAGE, retry)
            until = min(cert.not_valid_after_utc.timestamp(), ca.not_valid_after_utc.timestamp())
            return _Checked(subject_json(cert.subject), None, until)
        return _Checked(None, MSG_UNKNOWN_AUTHORITY, retry)


def _client_auth_allowed(cert: x509.Certificate) -> bool:
    try:
        usages = cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    except x509.ExtensionNotFound:
        return True  # no extended key usage: any use (as Go and OpenSSL read it)
    return any(
        u in (ExtendedKeyUsageOID.CLIENT_AUTH, ExtendedKeyUsageOID.ANY_EXTENDED_KEY_USAGE)
        for u in usages
    )


def _expired(which: str, now: float, start: float, end: float) -> str:
    def text(when: float) -> str:
        return datetime.datetime.fromtimestamp(when, datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    edge = f"is after {text(end)}" if now > end else f"is before {text(start)}"
    return f"x509: {which} has expired or is not yet valid: current time {text(now)} {edge}"
