"""Route matching with Gateway API precedence."""

import re

import pytest

from tokengateway.config.routing import (
    HeaderMatch,
    PathMatch,
    RouteMatch,
    Router,
    host_matches,
    intersect_hostnames,
)


def rm(
    name: str,
    path: PathMatch,
    host: str | None = None,
    method: str | None = None,
    headers: tuple = (),
    query: tuple = (),
    order: tuple = ("", "ns/r", 0, 0),
) -> RouteMatch:
    return RouteMatch(host, path, method, headers, query, target=name, order=order)


def exact(v: str) -> PathMatch:
    return PathMatch("Exact", v)


def prefix(v: str) -> PathMatch:
    return PathMatch("PathPrefix", v)


def regex(v: str) -> PathMatch:
    return PathMatch("RegularExpression", v, re.compile(v))


def first(
    router: Router,
    path: str,
    host: str = "a.example.com",
    method: str = "GET",
    headers: dict | None = None,
    query: str = "",
) -> str | None:
    m = router.match(host, method, path, headers or {}, query)
    return None if m is None else m.target


def test_host_wildcards() -> None:
    assert host_matches("*.example.com", "a.example.com")
    assert host_matches("*.example.com", "a.b.example.com")
    assert not host_matches("*.example.com", "example.com")
    assert host_matches(None, "anything")
    assert not host_matches("a.example.com", "b.example.com")


def test_hostname_intersection() -> None:
    assert intersect_hostnames("*.example.com", ["a.example.com", "other.org"]) == ["a.example.com"]
    assert intersect_hostnames("a.example.com", ["*.example.com"]) == ["a.example.com"]
    assert intersect_hostnames(None, ["x.org"]) == ["x.org"]
    assert intersect_hostnames("x.org", []) == ["x.org"]
    assert intersect_hostnames("x.org", ["y.org"]) == []


def test_prefix_is_element_wise() -> None:
    p = prefix("/v1")
    assert p.matches("/v1") and p.matches("/v1/") and p.matches("/v1/chat")
    assert not p.matches("/v10")
    assert prefix("/").matches("/anything")
    assert prefix("/v1/").matches("/v1/models")


def test_precedence_exact_then_longest_prefix_then_regex() -> None:
    router = Router(
        [
            rm("root", prefix("/")),
            rm("v1", prefix("/v1")),
            rm("chat", exact("/v1/chat/completions")),
            rm("re", regex("/v1/.*/completions")),
        ]
    )
    assert first(router, "/v1/chat/completions") == "chat"
    assert first(router, "/v1/completions") == "v1"
    assert first(router, "/v2/x") == "root"


def test_method_headers_and_query_break_ties() -> None:
    router = Router(
        [
            rm("plain", prefix("/v1")),
            rm("post", prefix("/v1"), method="POST"),
            rm(
                "header",
                prefix("/v1"),
                method="POST",
                headers=(HeaderMatch("x-tier", "Exact", "gold"),),
            ),
            rm(
                "query",
                prefix("/v1"),
                query=(HeaderMatch("debug", "RegularExpression", "1|true", re.compile("1|true")),),
            ),
        ]
    )
    assert first(router, "/v1/x", method="GET") == "plain"
    assert first(router, "/v1/x", method="POST") == "post"
    assert first(router, "/v1/x", method="POST", headers={"x-tier": "gold"}) == "header"
    assert first(router, "/v1/x", method="GET", query="debug=true") == "query"
    assert first(router, "/v1/x", method="GET", query="debug=no") == "plain"


def test_specific_hostname_wins_and_unknown_host_gets_nothing() -> None:
    router = Router(
        [
            rm("wild", prefix("/"), host="*.example.com"),
            rm("exact", prefix("/"), host="a.example.com"),
        ]
    )
    assert first(router, "/x", host="a.example.com") == "exact"
    assert first(router, "/x", host="b.example.com") == "wild"
    assert first(router, "/x", host="example.org") is None


def test_ties_go_to_the_older_route() -> None:
    router = Router(
        [
            rm("young", prefix("/"), order=("2024-02-01T00:00:00Z", "ns/a", 0, 0)),
            rm("old", prefix("/"), order=("2024-01-01T00:00:00Z", "ns/b", 0, 0)),
        ]
    )
    assert first(router, "/") == "old"


@pytest.mark.parametrize("path", ["/v1/models", "/"])
def test_no_route_for_unmatched_paths(path: str) -> None:
    router = Router([rm("chat", exact("/v1/chat/completions"))])
    assert first(router, path) is None
