"""Where an authentication rule reads its credential, with Authorino's exact rules.

- ``authorizationHeader {prefix}``: the Authorization header must start with ``"<prefix> "``
  (case-sensitive); the rest is the credential. The default location when ``credentials`` is
  absent, with prefix ``Bearer``.
- ``customHeader {name}``: the header's value, even when empty.
- ``queryString {name}``: the first value of the parameter, URL-decoded; empty means absent.
- ``cookie {name}``: the first ``name=`` entry of the Cookie header (split on ``;``), as is.

The identifier (prefix, header, parameter or cookie name) is also the scheme of the
``WWW-Authenticate: <identifier> realm="<rule name>"`` challenge.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any
from urllib.parse import parse_qsl, unquote_plus

from tokengateway.auth.model import AuthConfigError

__all__ = ["DEFAULT_PREFIX", "CredentialLocation", "compile_credentials"]

DEFAULT_PREFIX = "Bearer"

_KINDS = {
    "authorizationHeader": "prefix",
    "customHeader": "name",
    "queryString": "name",
    "cookie": "name",
}


class CredentialLocation:
    __slots__ = ("_header", "_needle", "identifier", "kind")

    def __init__(self, kind: str, identifier: str) -> None:
        self.kind = kind
        #: the prefix or name as written in the policy (used for the challenge)
        self.identifier = identifier
        self._header = identifier.lower()
        self._needle = identifier + (" " if kind == "authorizationHeader" else "=")

    def extract(self, headers: Mapping[str, str], path: str) -> str | None:
        """The credential, or None when the request does not carry one at this location."""
        kind = self.kind
        if kind == "authorizationHeader":
            value = headers.get("authorization")
            if value is None or not value.startswith(self._needle):
                return None
            return value[len(self._needle) :]
        if kind == "customHeader":
            return headers.get(self._header)
        if kind == "cookie":
            value = headers.get("cookie")
            if value is None:
                return None
            for part in value.split(";"):
                part = part.strip()
                if part.startswith(self._needle):
                    return part[len(self._needle) :]
            return None
        # queryString
        mark = path.find("?")
        if mark < 0:
            return None
        query = path[mark + 1 :].split("#", 1)[0]
        for name, value in parse_qsl(query, keep_blank_values=True, errors="replace"):
            if name == self.identifier:
                return value or None
        return None

    def strip(self, headers: dict[str, str], query: str) -> str:
        """Take the credential out of `headers` (in place) and out of `query`; the query
        left. The gateway's own API key is not the model server's business."""
        kind = self.kind
        if kind == "authorizationHeader":
            headers.pop("authorization", None)
        elif kind == "customHeader":
            headers.pop(self._header, None)
        elif kind == "cookie":
            value = headers.get("cookie")
            if value is not None:
                kept = [
                    p.strip() for p in value.split(";") if not p.strip().startswith(self._needle)
                ]
                if any(kept):
                    headers["cookie"] = "; ".join(p for p in kept if p)
                else:
                    del headers["cookie"]
        elif query:  # queryString
            kept = [
                part
                for part in query.split("&")
                if unquote_plus(part.split("=", 1)[0]) != self.identifier
            ]
            return "&".join(kept)
        return query

    def __repr__(self) -> str:
        return f"CredentialLocation({self.kind}={self.identifier!r})"


def compile_credentials(spec: Any, policy: str, where: str) -> CredentialLocation:
    if not spec:
        return CredentialLocation("authorizationHeader", DEFAULT_PREFIX)
    if not isinstance(spec, Mapping):
        raise AuthConfigError(policy, where, "credentials must be an object")
    kinds = [k for k in spec if spec[k] is not None]
    unknown = [k for k in kinds if k not in _KINDS]
    if unknown:
        raise AuthConfigError(
            policy,
            where,
            f"unknown credentials location {unknown[0]!r} (expected one of {', '.join(_KINDS)})",
        )
    if len(kinds) > 1:
        raise AuthConfigError(policy, where, "credentials must name exactly one location")
    if not kinds:
        return CredentialLocation("authorizationHeader", DEFAULT_PREFIX)
    kind = kinds[0]
    options = spec[kind] or {}
    if not isinstance(options, Mapping):
        raise AuthConfigError(policy, f"{where}.{kind}", "expected an object")
    identifier = str(options.get(_KINDS[kind]) or "")
    if not identifier:
        if kind != "authorizationHeader":
            raise AuthConfigError(policy, f"{where}.{kind}", "`name` is required")
        identifier = DEFAULT_PREFIX
    return CredentialLocation(kind, identifier)
