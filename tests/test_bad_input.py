"""Bad request bodies: a clear 400 naming what is wrong, nothing charged, nothing forwarded,
and the gateway keeps serving."""

from __future__ import annotations

import httpx
import pytest

from tests.conftest import chat
from tests.test_gateway import GATEWAY, TOKEN_LIMIT, client, completion, write
from tokengateway.dataplane.body import check_body

USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}

CASES = [
    (b"", "the request body is empty", None),
    (b"   ", "the request body is empty", None),
    (b'{"model": "m", "messages": [', "the request body is not valid JSON", None),
    (b'{"model": "\xff\xfe"}', "the request body is not valid UTF-8", None),
    (b"[1, 2]", "must be a JSON object, not an array", None),
    (b'"hello"', "must be a JSON object, not a string", None),
    (b'{"max_tokens": "ten"}', "max_tokens must be an integer, not a string", "max_tokens"),
    (b'{"max_tokens": -5}', "max_tokens must be at least 1, not -5", "max_tokens"),
    (b'{"max_tokens": 0}', "max_tokens must be at least 1, not 0", "max_tokens"),
    (b'{"max_tokens": 2.5}', "max_tokens must be an integer, not a number", "max_tokens"),
    (b'{"max_tokens": true}', "max_tokens must be an integer, not a boolean", "max_tokens"),
    (
        b'{"max_completion_tokens": 99999999999999999999}',
        "max_completion_tokens must be at most 2147483647",
        "max_completion_tokens",
    ),
    (b'{"n": "2"}', "n must be an integer, not a string", "n"),
    (b'{"stream": "yes"}', "stream must be a boolean, not a string", "stream"),
    (
        b'{"stream": true, "stream_options": 1}',
        "stream_options must be an object",
        "stream_options",
    ),
]


@pytest.mark.parametrize(("body", "message", "param"), CASES)
def test_check_body_names_the_problem(body: bytes, message: str, param: str | None) -> None:
    problem = check_body("POST", "/v1/chat/completions", "application/json", body)
    assert problem is not None and message in problem.message
    assert problem.param == param


def test_check_body_leaves_other_requests_alone() -> None:
    assert check_body("GET", "/v1/models", "", b"") is None
    assert check_body("POST", "/v1/audio/transcriptions", "multipart/form-data", b"--x") is None
    assert check_body("POST", "/v1/embeddings", "multipart/form-data", b"--x") is None
    assert check_body("POST", "/v1/chat/completions", "", b'{"max_tokens": null}') is None
    ok = b'{"model": "m", "messages": [], "max_tokens": 5, "n": 2, "stream": false}'
    assert check_body("POST", "/v1/chat/completions", "application/json", ok) is None


def test_bad_bodies_are_refused_before_limits_and_upstream(
    tmp_path, start_gateway, upstream
) -> None:
    up = upstream(lambda path, body: (200, {"content-type": "application/json"}, completion(USAGE)))
    path = write(tmp_path, GATEWAY + TOKEN_LIMIT.replace("LIMIT", "10"))
    gw = start_gateway(path, args=("--backend", f"default/llm={up.url}"))
    c = client(gw)
    for body, message, param in CASES:
        r = c.post(
            "/v1/chat/completions", content=body, headers={"content-type": "application/json"}
        )
        assert r.status_code == 400, (body, r.text)
        error = r.json()["error"]
        assert message in error["message"] and error["param"] == param
        assert error["type"] == "invalid_request_error"
    assert up.requests == []  # none reached the upstream
    # nothing was charged: the whole limit (10 tokens, 7 per answer) is still there
    assert [c.post("/v1/chat/completions", json=chat()).status_code for _ in range(3)] == [
        200,
        200,
        429,
    ]
    assert httpx.get(gw.url + "/", headers={"Host": "api.example.com"}).status_code != 500


@pytest.mark.parametrize(
    ("usage", "charged"),
    [
        ({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}, 7),
        ({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": -7}, 7),
        ({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": "7"}, 7),
        ({"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7.5}, 7),
        ({"prompt_tokens": -3, "completion_tokens": 4}, 4),
        ({"prompt_tokens": 10**30, "completion_tokens": 4, "total_tokens": 10**30}, 10**12),
        ({"prompt_tokens": "x", "total_tokens": None}, None),
    ],
)
def test_odd_upstream_usage_never_crashes(
    tmp_path, start_gateway, upstream, usage, charged
) -> None:
    up = upstream(lambda path, body: (200, {"content-type": "application/json"}, completion(usage)))
    path = write(tmp_path, GATEWAY + TOKEN_LIMIT.replace("LIMIT", str(10**13)))
    gw = start_gateway(path, args=("--backend", f"default/llm={up.url}"))
    r = client(gw).post("/v1/chat/completions", json=chat())
    assert r.status_code == 200
    used = 10**13 - int(r.headers["x-ratelimit-remaining-tokens"])
    if charged is not None:
        assert used == charged
    else:  # no usable count: charged an estimate (prompt + the answer's text), never 0
        assert 5 <= used <= 20
    assert client(gw).post("/v1/chat/completions", json=chat()).status_code == 200
