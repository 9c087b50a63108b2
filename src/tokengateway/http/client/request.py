"""What a request is before it goes out: the backend's `Origin`, a checked request target,
the request head, and the timeouts and limits a client is made with.

Where a request goes is never read from text a client wrote. `Origin` is a backend's
scheme, host, port, base path and credential, parsed once per configuration; a request
target is a path and query starting with `/`, of RFC 3986's characters only, `%` only as
an escape (`check_target`), never re-quoted or re-read.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from tokengateway.http.client.errors import BadTarget
from tokengateway.http.client.tls import UpstreamTLS

__all__ = [
    "DEFAULT_LIMITS",
    "DEFAULT_TIMEOUTS",
    "HOP_BY_HOP",
    "JOIN_BODY",
    "URL_CONTROL",
    "Origin",
    "Timeouts",
    "UpstreamLimits",
    "check_target",
    "request_head",
]


@dataclass(frozen=True, slots=True)
class Timeouts:
    """Seconds; None waits forever."""

    connect: float | None = 10.0
    first_byte: float | None = 600.0
    idle: float | None = 300.0  # between two chunks of the body


DEFAULT_TIMEOUTS = Timeouts()


@dataclass(frozen=True, slots=True)
class UpstreamLimits:
    """What the client holds: `Upstream(**asdict(limits))` (the `serve --upstream-*` flags)."""

    #: open connections per origin (busy, idle or connecting); more requests wait for one
    max_connections: int = 1024
    #: seconds an idle connection is kept (below uvicorn's and vLLM's 5)
    keepalive: float = 4.0
    #: the largest body read whole (a non-streamed answer); a stream is not capped
    max_response_bytes: int = 64 * 1024 * 1024


DEFAULT_LIMITS = UpstreamLimits()

#: Never forwarded in either direction (RFC 9110 section 7.6.1) or recomputed by us.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-authenticate",
        "proxy-authorization",
        "proxy-connection",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "accept-encoding",
    }
)

#: Methods whose empty body gets no Content-Length (as aiohttp).
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "CONNECT", "TRACE"})
#: A request body up to this size goes out in the same write as the head.
JOIN_BODY = 64 * 1024

#: A request target as it may go out: `/`, then RFC 3986's path and query characters, `%`
#: only to start an escape.
_TARGET = re.compile(r"/(?:[A-Za-z0-9\-._~!$&'()*+,;=:@/?]|%[0-9A-Fa-f]{2})*")
_TARGET_CHAR = re.compile(r"[A-Za-z0-9\-._~!$&'()*+,;=:@/?%]")
#: A host name or an address (an IPv6 one without its brackets).
_HOST = re.compile(r"[a-z0-9](?:[a-z0-9\-._]*[a-z0-9])?|[0-9a-f:.]*:[0-9a-f:.]*")
#: Bytes urlsplit would silently remove or cut at: a URL with them is refused.
URL_CONTROL = re.compile(r"[\x00-\x20\x7f]")


def check_target(target: str) -> None:
    """Raise `BadTarget`, saying why, unless `target` can be a request target as it is: an
    origin-form (RFC 9112 3.2.1) of RFC 3986's characters, `%` only in an escape, and not
    starting with `//` (a network-path reference to a URL parser: another host)."""
    if _TARGET.fullmatch(target) is not None and target[1:2] != "/":
        return
    if not target.startswith("/"):
        raise BadTarget(f"the request target {target[:100]!r} does not start with '/'")
    if target.startswith("//"):  # valid, but read as another authority by too many parsers
        raise BadTarget(f"the request target {target[:100]!r} starts with '//'")
    for i, char in enumerate(target):
        if _TARGET_CHAR.fullmatch(char) is None:
            raise BadTarget(
                f"the request target has a character a URL may not carry ({char!r} at {i})"
            )
    raise BadTarget("the request target has a '%' that does not start an escape (%XX)")


class Origin:
    """A backend's origin, parsed once (per configuration): where to connect, its Host
    header, the base path put before every target, and the credential of its URL (`user:pass@`
    becomes `Authorization: Basic`, unless the request carries its own). `label` names it in
    messages, without the credential. With `tls`, its connections speak verified TLS even
    when the URL says http:// (the Host header is the URL's all the same)."""

    __slots__ = (
        "auth",
        "base_path",
        "host",
        "host_header",
        "key",
        "label",
        "port",
        "scheme",
        "tls",
    )

    def __init__(self, url: str, tls: UpstreamTLS | None = None) -> None:
        if URL_CONTROL.search(url) is not None:
            raise ValueError(f"a space or a control character in the URL {url!r}")
        try:
            parts = urlsplit(url)
            port = parts.port
        except ValueError as exc:
            raise ValueError(f"not a URL: {url!r} ({exc})") from None
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https") or not parts.netloc:
            raise ValueError(f"not an http:// or https:// URL: {url!r}")
        host = parts.hostname or ""
        if _HOST.fullmatch(host) is None:
            raise ValueError(f"no valid host in {url!r}")
        if parts.query or parts.fragment or "?" in url or "#" in url:
            raise ValueError(f"a backend URL has no query nor fragment: {url!r}")
        base_path = parts.path.rstrip("/")
        if base_path and _TARGET.fullmatch(base_path) is None:
            raise ValueError(f"the path of {url!r} has characters a URL may not carry as they are")
        default = 443 if scheme == "https" else 80
        if port is None:
            port = default
        elif port == 0:
            raise ValueError(f"port 0 in {url!r}")
        shown = f"[{host}]" if ":" in host else host
        self.scheme = scheme
        self.host = host
        self.port = port
        self.host_header = shown if port == default else f"{shown}:{port}"
        self.base_path = base_path
        self.key = f"{scheme}://{shown}:{port}"  # the pool's: one per scheme, host and port
        self.label = f"{scheme}://{self.host_header}"
        #: verified TLS (whatever the scheme): the pool is then one per TLS settings too
        self.tls = tls
        if tls is not None:
            self.key += f"#tls{tls.key}"
        self.auth: str | None = None
        if parts.username is not None:
            user, password = unquote(parts.username), unquote(parts.password or "")
            self.auth = "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()

    def __repr__(self) -> str:
        return f"Origin({self.label}{self.base_path})"


def request_head(
    method: str, target: str, headers: Sequence[tuple[str, str]], body: bytes, origin: Origin
) -> bytes:
    """The request line and headers: those given, as given, plus Host (unless given) and
    Content-Length; one join, one encode. A line break in any of it is refused."""
    if origin.auth is None:
        for name, _ in headers:
            if len(name) in _SPECIAL_LENGTHS and name.lower() in _SPECIAL_NAMES:
                break
        else:  # the usual case: nothing given that we write ourselves
            lines = [f"{name}: {value}\r\n" for name, value in headers]
            length = (
                f"Content-Length: {len(body)}\r\n" if body or method not in _NO_BODY_METHODS else ""
            )
            text = (
                f"{method} {target} HTTP/1.1\r\nHost: {origin.host_header}\r\n"
                f"{''.join(lines)}{length}\r\n"
            )
            return _checked(text, len(lines) + (4 if length else 3))
    parts = [method, " ", target, " HTTP/1.1\r\nHost: ", origin.host_header, "\r\n"]
    lines_count = 2
    has_auth = False
    for name, value in headers:
        if len(name) in _SPECIAL_LENGTHS or len(name) == 13:
            low = name.lower()
            if low == "host":
                if parts[4]:
                    parts[3] = " HTTP/1.1\r\n"
                    parts[4] = parts[5] = ""
                    lines_count -= 1
            elif low == "content-length" or low == "transfer-encoding":
                continue  # the body is framed here
            elif low == "authorization":
                has_auth = True
        parts.append(f"{name}: {value}\r\n")
        lines_count += 1
    if origin.auth is not None and not has_auth:
        parts.append(f"Authorization: {origin.auth}\r\n")
        lines_count += 1
    if body or method not in _NO_BODY_METHODS:
        parts.append(f"Content-Length: {len(body)}\r\n")
        lines_count += 1
    parts.append("\r\n")
    return _checked("".join(parts), lines_count + 1)


#: Request header names (lower-case) the head writes itself, and their lengths.
_SPECIAL_NAMES = frozenset({"host", "content-length", "transfer-encoding"})
_SPECIAL_LENGTHS = frozenset({4, 14, 17})


def _checked(text: str, lines: int) -> bytes:
    """`text` encoded, if it has exactly `lines` line ends (none hidden in a value)."""
    if text.count("\n") != lines or text.count("\r") != lines:
        raise ValueError("a line break in the request's method, target or headers")
    try:
        # the client's header bytes were read as Latin-1: the same bytes go upstream
        return text.encode("latin-1")
    except UnicodeEncodeError:  # text of our own beyond Latin-1 (a policy's header value)
        return text.encode("utf-8")
