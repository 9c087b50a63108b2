"""Route matching with Gateway API precedence, compiled once per configuration.

A request picks among every HTTPRoute rule attached to a listener whose hostname admits the
request's host. Precedence (Gateway API, HTTPRoute): the most specific hostname, then an Exact
path, then the longest PathPrefix, then a RegularExpression path (implementation-specific in
the spec; we put it after prefixes), then a method match, then the most header matches, then
the most query-parameter matches; ties go to the oldest route, then `namespace/name`
alphabetically, then rule and match order.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qsl

__all__ = [
    "HeaderMatch",
    "PathMatch",
    "RouteMatch",
    "Router",
    "host_matches",
    "intersect_hostnames",
]


def host_matches(pattern: str | None, host: str) -> bool:
    """Gateway API hostname match: `*.example.com` admits any subdomain, not the apex."""
    if pattern is None:
        return True
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def intersect_hostnames(listener: str | None, route: Sequence[str]) -> list[str | None]:
    """The hostnames a route serves on a listener (empty: not attached by hostname)."""
    if not route:
        return [listener]
    if listener is None:
        return list(route)
    out: list[str | None] = []
    for name in route:
        if host_matches(listener, name) or name == listener:
            out.append(name)
        elif host_matches(name, listener):
            out.append(listener)
    return out


def _host_rank(pattern: str | None) -> tuple[int, int]:
    if pattern is None:
        return (0, 0)
    if pattern.startswith("*."):
        return (1, len(pattern))
    return (2, len(pattern))


@dataclass(frozen=True, slots=True)
class PathMatch:
    type: str  # Exact | PathPrefix | RegularExpression
    value: str
    regex: re.Pattern[str] | None = None

    def matches(self, path: str) -> bool:
        if self.type == "Exact":
            return path == self.value
        if self.type == "PathPrefix":
            prefix = self.value.rstrip("/")
            if not prefix:
                return True
            return path == prefix or path.startswith(prefix + "/")
        assert self.regex is not None
        return self.regex.fullmatch(path) is not None

    def rank(self) -> tuple[int, int]:
        if self.type == "Exact":
            return (3, len(self.value))
        if self.type == "PathPrefix":
            return (2, len(self.value.rstrip("/")))
        return (1, len(self.value))


@dataclass(frozen=True, slots=True)
class HeaderMatch:
    name: str  # lower-case for headers; as written for query parameters
    type: str  # Exact | RegularExpression
    value: str
    regex: re.Pattern[str] | None = None

    def matches(self, actual: str | None) -> bool:
        if actual is None:
            return False
        if self.regex is not None:
            return self.regex.fullmatch(actual) is not None
        return actual == self.value


@dataclass(slots=True)
class RouteMatch:
    """One match of one rule, attached under one hostname; `target` is the compiled rule."""

    hostname: str | None
    path: PathMatch
    method: str | None
    headers: tuple[HeaderMatch, ...]
    query: tuple[HeaderMatch, ...]
    target: Any
    order: tuple[Any, ...] = ()  # (creation time, "ns/name", rule index, match index)
    sort_key: tuple[Any, ...] = field(default=(), init=False)

    def __post_init__(self) -> None:
        host_kind, host_len = _host_rank(self.hostname)
        path_kind, path_len = self.path.rank()
        self.sort_key = (
            -host_kind,
            -host_len,
            -path_kind,
            -path_len,
            0 if self.method else 1,
            -len(self.headers),
            -len(self.query),
            *self.order,
        )

    def matches(
        self, method: str, path: str, headers: Mapping[str, str], query: Mapping[str, str]
    ) -> bool:
        if self.method is not None and method != self.method:
            return False
        if not self.path.matches(path):
            return False
        for h in self.headers:
            if not h.matches(headers.get(h.name)):
                return False
        return all(q.matches(query.get(q.name)) for q in self.query)


class Router:
    """Finds the rule for (host, method, path, headers, query); cached per host."""

    def __init__(self, matches: Sequence[RouteMatch]) -> None:
        self._matches = sorted(matches, key=lambda m: m.sort_key)
        self._exact: dict[str, list[RouteMatch]] = {}
        self._patterns: list[RouteMatch] = []
        for m in self._matches:
            if m.hostname is not None and not m.hostname.startswith("*."):
                self._exact.setdefault(m.hostname, []).append(m)
            else:
                self._patterns.append(m)
        self._cache: dict[str, list[RouteMatch]] = {}
        self._needs_query = any(m.query for m in self._matches)

    def __len__(self) -> int:
        return len(self._matches)

    def candidates(self, host: str) -> list[RouteMatch]:
        found = self._cache.get(host)
        if found is None:
            found = self._exact.get(host, []) + [
                m for m in self._patterns if host_matches(m.hostname, host)
            ]
            found.sort(key=lambda m: m.sort_key)
            if len(self._cache) >= 4096:
                self._cache.clear()
            self._cache[host] = found
        return found

    def match(
        self, host: str, method: str, path: str, headers: Mapping[str, str], query_string: str
    ) -> RouteMatch | None:
        query: Mapping[str, str] = {}
        if self._needs_query and query_string:
            query = dict(parse_qsl(query_string, keep_blank_values=True))
        for m in self.candidates(host):
            if m.matches(method, path, headers, query):
                return m
        return None
