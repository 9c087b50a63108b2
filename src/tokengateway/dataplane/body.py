"""The request-body stage: a body the gateway must understand is checked before anything else
is done with it.

For the model endpoints whose JSON the gateway reads (chat/completions, completions,
embeddings, responses, messages), a body that is not a JSON object, or whose fields the
gateway relies on have the wrong type, is refused with 400 naming what is wrong. Such a
request reaches neither the limits (nothing is charged or held) nor the upstream. Fields the
gateway does not read are the upstream's business and pass untouched.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import msgspec

__all__ = ["BodyProblem", "check_body", "read_json_body"]

#: paths (by their end) whose JSON body the gateway reads
JSON_ENDPOINTS = ("/chat/completions", "/completions", "/embeddings", "/responses", "/messages")
#: the largest token count accepted in a max_* field (what int32-based servers take)
MAX_TOKENS_BOUND = 2**31 - 1

_decode = msgspec.json.decode


@dataclass(frozen=True, slots=True)
class BodyProblem:
    message: str
    param: str | None = None
    code: str = "invalid_request_body"


def _type_name(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _count(doc: dict[str, Any], name: str, minimum: int) -> BodyProblem | None:
    value = doc.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool):
        return BodyProblem(
            f"{name} must be an integer, not {_type_name(value)}", name, "invalid_type"
        )
    if value < minimum:
        return BodyProblem(f"{name} must be at least {minimum}, not {value}", name, "invalid_value")
    if value > MAX_TOKENS_BOUND:
        return BodyProblem(
            f"{name} must be at most {MAX_TOKENS_BOUND}, not {value}", name, "invalid_value"
        )
    return None


def check_body(method: str, path: str, content_type: str, body: bytes) -> BodyProblem | None:
    """What is wrong with a model request's body, or None (also for any other request)."""
    return read_json_body(method, path, content_type, body)[1]


def read_json_body(
    method: str, path: str, content_type: str, body: bytes
) -> tuple[dict[str, Any] | None, BodyProblem | None]:
    """(the model request's body as a JSON object, what is wrong with it). Decoded once
    here, so that the later stages (usage asked for, estimates, reservations) read this
    object rather than the bytes again; (None, None) for any other request."""
    if method != "POST" or not path.endswith(JSON_ENDPOINTS):
        return None, None
    if content_type and "json" not in content_type.lower():
        return None, None  # e.g. multipart uploads: not ours to read
    if not body.strip():
        return None, BodyProblem("the request body is empty; expected a JSON object")
    try:
        doc = _decode(body)
    except (msgspec.MsgspecError, ValueError, RecursionError) as exc:  # a ValueError only lately
        return None, _decode_problem(body, exc)
    if not isinstance(doc, dict):
        return None, BodyProblem(f"the request body must be a JSON object, not {_type_name(doc)}")
    return doc, _field_problem(doc)


def _decode_problem(body: bytes, exc: Exception) -> BodyProblem:
    """Why a body did not decode, found by the gateway itself: the decoder's own wording
    (and whether it reports bad UTF-8 as its own error or as UnicodeDecodeError) changes
    between releases, so invalid UTF-8 is located here, and only the JSON syntax error
    keeps the decoder's text."""
    try:
        body.decode("utf-8")
    except UnicodeDecodeError as bad:
        return BodyProblem(
            f"the request body is not valid UTF-8 (byte {bad.start})", code="invalid_encoding"
        )
    if isinstance(exc, RecursionError):
        return BodyProblem("the request body's JSON is nested too deeply", code="invalid_json")
    return BodyProblem(f"the request body is not valid JSON: {exc}", code="invalid_json")


def _field_problem(doc: dict[str, Any]) -> BodyProblem | None:
    """A field the gateway reads, of the wrong type or out of range."""
    for name in ("max_tokens", "max_completion_tokens", "max_output_tokens"):
        problem = _count(doc, name, 1)
        if problem is not None:
            return problem
    problem = _count(doc, "n", 1)
    if problem is not None:
        return problem
    stream = doc.get("stream")
    if stream is not None and not isinstance(stream, bool):
        return BodyProblem(
            f"stream must be a boolean, not {_type_name(stream)}", "stream", "invalid_type"
        )
    options = doc.get("stream_options")
    if options is not None and not isinstance(options, dict):
        return BodyProblem(
            f"stream_options must be an object, not {_type_name(options)}",
            "stream_options",
            "invalid_type",
        )
    return None
