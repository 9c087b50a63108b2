"""CEL: the Python fast path for common shapes must answer exactly as the CEL engine does."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tokengateway.expr import cel

SOURCES = [
    "request.path",
    "auth.identity.userid",
    "auth.identity",
    "request.headers.x",
    'request.path == "/v1/chat/completions"',
    'request.path != "/v1/chat/completions"',
    'auth.identity.userid == "user-1"',
    'auth.identity.userid != ""',
    'request.method == "POST"',
    'request.x.y == "é"',
]

values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-5, 5)
    | st.floats(allow_nan=False)
    | st.text(max_size=4),
    lambda inner: (
        st.lists(inner, max_size=2) | st.dictionaries(st.sampled_from("xy"), inner, max_size=2)
    ),
    max_leaves=4,
)
interesting = st.sampled_from(["/v1/chat/completions", "POST", "user-1", "", "é"]) | values


def _maybe(node: st.SearchStrategy[Any]) -> st.SearchStrategy[dict[str, Any]]:
    return st.dictionaries(
        st.sampled_from(["path", "method", "headers", "x", "identity", "userid", "y"]),
        node,
        max_size=4,
    )


activations = st.fixed_dictionaries(
    {},
    optional={
        "request": _maybe(interesting | _maybe(interesting)),
        "auth": _maybe(interesting | _maybe(interesting)),
    },
)


def _engine(expression: cel.Expression, data: dict[str, Any]) -> Any:
    """What the CEL engine itself answers (bypassing the fast path)."""
    value = expression._program.eval(cel._ENV.Activation(data))
    if value.type() == cel.cel.Type.ERROR:
        return cel.MISSING
    return value.plain_value()


def test_the_common_shapes_take_the_fast_path() -> None:
    for source in SOURCES:
        assert cel.compile_expression(source)._path is not None, source
    for source in ["request.path.startsWith('/v1')", 'request.path == "a\\"b"', "size(auth)"]:
        assert cel.compile_expression(source)._path is None, source


@settings(max_examples=400, deadline=None)
@given(data=activations, source=st.sampled_from(SOURCES))
def test_fast_path_agrees_with_the_engine(data: dict[str, Any], source: str) -> None:
    expression = cel.compile_expression(source)
    fast = expression.evaluate(cel.Activation(data))
    slow = _engine(expression, data)
    assert (fast is cel.MISSING) == (slow is cel.MISSING), (source, data, fast, slow)
    if fast is not cel.MISSING:
        assert fast == slow and type(fast) is type(slow), (source, data, fast, slow)
    if " == " in source or " != " in source:
        predicate = cel.compile_predicate(source)
        assert predicate.test(cel.Activation(data)) is (slow is True)


@pytest.mark.parametrize(
    ("source", "data", "expected"),
    [
        ('request.size == "3"', {"request": {"size": 3}}, False),  # heterogeneous: unequal
        ('request.size != "3"', {"request": {"size": 3}}, True),
        ('request.nope != "x"', {"request": {}}, cel.MISSING),  # no such key: an error
        ('request.path != "/b"', {"request": {"path": "/a"}}, True),
        ("auth.identity.userid", {"auth": {"identity": {"userid": "u"}}}, "u"),
        ("auth.identity.userid", {"auth": {"identity": "flat"}}, cel.MISSING),
    ],
)
def test_fast_path_cases(source: str, data: dict[str, Any], expected: Any) -> None:
    assert cel.compile_expression(source).evaluate(cel.Activation(data)) == expected


MEMO_SOURCES = [
    'request.path.startsWith("/v1")',
    "has(auth.identity.userid)",
    "has(request.x.y)",
    "auth.identity.userid == 1",
    "request.x == true",
    "request.x == 1.0",
    "size(request.path) > 2",
    'auth.identity.userid.split(",").exists(g, g == "gold")',
    'request.method + "!"',
    "request.x",  # fast path: never kept
]


def test_what_an_expression_reads_is_found() -> None:
    reads = cel.compile_expression(MEMO_SOURCES[7])._reads
    assert reads == (("auth", "identity", "userid"),)  # not ...userid.split
    assert cel.compile_expression('requestBodyJSON("/model") == "m"')._reads is None
    assert cel.compile_expression("has(request.x.y) && size(auth) > 0")._reads == (
        ("request", "x", "y"),
        ("auth",),
    )


@settings(max_examples=300, deadline=None)
@given(datas=st.lists(activations, min_size=1, max_size=6), source=st.sampled_from(MEMO_SOURCES))
def test_kept_answers_agree_with_the_engine(datas: list[dict[str, Any]], source: str) -> None:
    """One expression answers a run of requests (so later ones may be served from what it
    kept); each answer must be the engine's own for that request."""
    expression = cel.compile_expression(source)
    predicate = (
        cel.compile_predicate(source) if "+" not in source and source != "request.x" else None
    )
    for data in datas * 2:  # the second round is served from the kept answers
        got = expression.evaluate(cel.Activation(data))
        want = _engine(expression, data)
        assert (got is cel.MISSING) == (want is cel.MISSING), (source, data, got, want)
        if got is not cel.MISSING:
            assert got == want and type(got) is type(want), (source, data, got, want)
        if predicate is not None:
            assert predicate.test(cel.Activation(data)) is (want is True), (source, data)


def test_kept_answers_are_bounded() -> None:
    expression = cel.compile_expression('request.path.startsWith("/v1")')
    for i in range(cel.MEMO_SIZE + 50):
        assert expression.evaluate(cel.Activation({"request": {"path": f"/v1/{i}"}})) is True
    assert len(expression._memo) == cel.MEMO_SIZE
