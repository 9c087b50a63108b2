"""The request target and the Host header, checked and normalised once, by the HTTP server.

Everything after the server (route matching, CEL's `request.path` / `request.url_path` /
`request.host`, the access log, the request sent upstream) sees one form of the request:

* **Target forms** (RFC 9112 3.2): origin-form `/path?query`; absolute-form
  `http://authority/path?query`, whose authority replaces the Host header (3.2.2; `https`
  is accepted as a scheme too, userinfo is refused); `*` only with OPTIONS (answered by the
  server itself). Anything else (authority-form, `*@host/x`, `name/x`, a fragment) is a
  `TargetError`.
* **One normalised path**, percent-encoded ASCII starting with "/": escapes of unreserved
  characters (ALPHA DIGIT `-._~`) are decoded, the others keep their escape with upper-case
  hex (so `%2F` and `%3F` stay characters inside a segment, and `%252F` stays `%252F`: it
  is never decoded to `%2F`, let alone `/`), then dot segments are removed (RFC 3986
  5.2.4, after decoding: `%2E%2E` is `..`). Refused: a bad escape (`%zz`, a lone `%`),
  `%00`, a byte outside RFC 3986's path characters, and a `..` that would climb above the
  root. Repeated slashes are kept. A path seen before (up to 256 bytes) costs one dictionary lookup.
* **Host** (RFC 9112 3.2, RFC 9110 7.2): `uri-host [":" port]`, a reg-name, an IPv4
  address or a bracketed IPv6 literal, and a port of digits up to 65535.

The query string is not touched: it goes upstream byte for byte.
"""

from __future__ import annotations

import ipaddress
import re

__all__ = [
    "ALLOWED_METHODS",
    "TargetError",
    "is_loopback",
    "normalize_path",
    "split_target",
    "valid_host",
]

#: what `OPTIONS *` answers in `Allow`
ALLOWED_METHODS = b"GET, HEAD, POST, PUT, PATCH, DELETE, OPTIONS"


class TargetError(ValueError):
    """A request target or Host the server refuses (400): the message names what is wrong."""


_UNRESERVED = frozenset(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
#: every byte a path may hold as it is (RFC 3986 pchar and "/"), "%" (checked apart) included
_PATH_BYTES = bytes(_UNRESERVED) + b"!$&'()*+,;=:@/%"
_HEX = frozenset(b"0123456789abcdefABCDEF")


#: paths already normalised (the few a gateway serves come again and again): a lookup
#: instead of a scan; bounded, and only short paths
_known: dict[bytes, bytes] = {}
_KNOWN_MAX = 4096
_KNOWN_LENGTH = 256


def normalize_path(raw: bytes) -> bytes:
    """The normalised form of an absolute path (see the module's doc), or TargetError."""
    found = _known.get(raw)
    if found is not None:
        return found
    bad = raw.translate(None, _PATH_BYTES)
    if bad:
        raise TargetError(
            f"the request path holds a byte not allowed in a URI path: {bad[0]:#04x}"
            f" ({chr(bad[0])!r})"
        )
    path = raw
    if 37 in path:  # "%"
        path = _decode_unreserved(path)
    if b"/." in path:
        path = _remove_dot_segments(path)
    if len(raw) <= _KNOWN_LENGTH:
        if len(_known) >= _KNOWN_MAX:
            _known.clear()
        _known[raw] = path
    return path


def _decode_unreserved(raw: bytes) -> bytes:
    parts = raw.split(b"%")
    out = [parts[0]]
    for part in parts[1:]:
        if len(part) < 2 or part[0] not in _HEX or part[1] not in _HEX:
            shown = ("%" + part[:2].decode("ascii", "replace")) if part else "a lone %"
            raise TargetError(f"the request path has an invalid percent-escape: {shown}")
        value = int(part[:2], 16)
        if value == 0:
            raise TargetError("the request path holds %00 (NUL)")
        if value in _UNRESERVED:
            out.append(bytes((value,)) + part[2:])
        else:
            out.append(b"%" + part[:2].upper() + part[2:])
    return b"".join(out)


def _remove_dot_segments(path: bytes) -> bytes:
    """RFC 3986 5.2.4 for an absolute path; a ".." above the root is refused."""
    segments = path.split(b"/")[1:]
    out: list[bytes] = []
    last = len(segments) - 1
    for i, seg in enumerate(segments):
        if seg == b".":
            if i == last:
                out.append(b"")
        elif seg == b"..":
            if not out:
                raise TargetError("the request path climbs above the root with '..'")
            out.pop()
            if i == last:
                out.append(b"")
        else:
            out.append(seg)
    return b"/" + b"/".join(out)


def split_target(url: bytes) -> tuple[bytes | None, bytes, bytes]:
    """(authority or None, raw path, raw query) of an origin- or absolute-form target;
    `*` is `(None, b"*", b"")`. TargetError for any other form."""
    if b"#" in url:
        raise TargetError("the request target holds a fragment ('#'), which is never sent")
    if url[:1] == b"/":
        path, _, query = url.partition(b"?")
        return None, path, query
    if url == b"*":
        return None, b"*", b""
    scheme, sep, rest = url.partition(b"://")
    if sep and scheme and _SCHEME.fullmatch(scheme):
        if scheme.lower() not in (b"http", b"https"):
            text = scheme.decode("ascii", "replace")
            raise TargetError(f"the request target's scheme {text!r} is not http or https")
        end = len(rest)
        for stop in (b"/", b"?"):
            found = rest.find(stop)
            if 0 <= found < end:
                end = found
        authority, rest = rest[:end], rest[end:]
        if b"@" in authority:
            raise TargetError("the request target holds userinfo ('user@'), which is refused")
        if not authority or not valid_host(authority) or authority[:1] == b":":
            text = authority.decode("ascii", "replace")
            raise TargetError(f"the request target's authority {text!r} is not a valid host")
        path, _, query = rest.partition(b"?")
        return authority, path or b"/", query
    shown = url[:40].decode("ascii", "replace")
    raise TargetError(
        f"the request target {shown!r} is neither a path ('/...') nor an absolute http URI"
    )


_SCHEME = re.compile(rb"[A-Za-z][A-Za-z0-9+.\-]*")
#: reg-name (which IPv4 addresses fit) with an optional port, or a bracketed literal
_HOST = re.compile(
    rb"(?:(?P<name>(?:[A-Za-z0-9\-._~!$&'()*+,;=]|%[0-9A-Fa-f]{2})*)|\[(?P<ip>[0-9A-Fa-f:.]+)\])"
    rb"(?::(?P<port>[0-9]*))?"
)
_good_hosts: set[bytes] = set()


def valid_host(value: bytes) -> bool:
    """Whether a Host value is `uri-host [":" port]` (an empty value is valid: RFC 9110
    7.2 lets a client without an authority send one). Remembered for the hosts seen."""
    if value in _good_hosts:
        return True
    found = _HOST.fullmatch(value)
    if found is None:
        return False
    port = found.group("port")
    if port and (len(port) > 5 or int(port) > 65535):
        return False
    ip = found.group("ip")
    if ip is not None:
        try:
            ipaddress.IPv6Address(ip.decode("ascii"))
        except ValueError:
            return False
    if len(_good_hosts) >= 1024:
        _good_hosts.clear()
    _good_hosts.add(value)
    return True


def is_loopback(host: str) -> bool:
    """Whether `host` (a name or an address, without brackets or port) is this machine's
    loopback: what the admin API and its clients may reach without TLS or a token."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False
