"""A fuzz target for everything the gateway parses out of a request and its response.

Run it with atheris (`pip install atheris`), for as long as you like:

    .venv/bin/python tests/fuzz_request.py -runs=100000        # or -max_total_time=600
    .venv/bin/python tests/fuzz_request.py corpus/ -jobs=2      # keeps what it finds

Without atheris, `tests/test_properties.py` drives `fuzz_one` with hypothesis (bounded), and
runs this script for a few thousand inputs when atheris is installed. Every call must return
normally: any exception, or a broken invariant (an AssertionError), is a finding.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any


def _coverage() -> Any:
    """Under the fuzzer, the gateway's modules are instrumented as they are imported."""
    if __name__ != "__main__":
        return contextlib.nullcontext()
    import atheris

    return atheris.instrument_imports(include=["tokengateway"])


with _coverage():
    from tokengateway.dataplane.body import BodyProblem, check_body
    from tokengateway.wire.tokens import Usage
    from tokengateway.wire.usage import (
        MAX_COUNT,
        SSEStream,
        ask_for_usage,
        completion_text_of,
        usage_from_json,
    )

PATHS = (
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/responses",
    "/v1/messages",
    "/v1/models",
    "/openai/deployments/x/chat/completions",
)
CONTENT_TYPES = ("application/json", "", "text/plain", "application/json; charset=utf-8")


def check_usage(usage: Usage | None) -> None:
    if usage is None:
        return
    assert isinstance(usage, Usage), usage
    for count in (
        usage.prompt_tokens,
        usage.completion_tokens,
        usage.total_tokens,
        usage.cached_prompt_tokens,
    ):
        assert type(count) is int and 0 <= count <= MAX_COUNT, usage


def fuzz_one(data: bytes) -> None:
    """One input: its first bytes choose the path, content type and chunking; the rest is
    the body (and, fed in chunks, the upstream's event stream)."""
    head, body = data[:3], data[3:]
    a, b, c = (head + b"\0\0\0")[:3]
    path = PATHS[a % len(PATHS)]
    content_type = CONTENT_TYPES[b % len(CONTENT_TYPES)]

    problem = check_body("POST", path, content_type, body)
    assert problem is None or isinstance(problem, BodyProblem), problem

    sent, added = ask_for_usage(path, body)
    assert isinstance(sent, bytes) and isinstance(added, bool)
    if not added:
        assert sent is body

    check_usage(usage_from_json(body))
    assert isinstance(completion_text_of(body), str)

    # the body as an upstream's event stream, cut every `step` bytes
    step = c % 17 + 1
    for hide in (False, True):
        reader = SSEStream(hide_usage=hide)
        out = []
        for i in range(0, len(body), step):
            out.append(reader.feed(body[i : i + step]))
        out.append(reader.close(complete=bool(c & 0x80)))
        sent_back = b"".join(out)
        assert len(sent_back) <= len(body)
        if not hide:
            assert body.startswith(sent_back)
            if c & 0x80:
                assert sent_back == body
        check_usage(reader.usage)
        assert isinstance(reader.text, str)


def main() -> None:
    import atheris

    atheris.Setup(sys.argv, fuzz_one)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
