"""What every simulator endpoint shares: ASGI types, JSON codecs, request-body reading and
the two error envelopes (OpenAI's for the OpenAI-compatible API, Anthropic's for `/v1/messages`).

No framework on purpose: one msgspec decode and one encode per request keep the simulator from
ever being the bottleneck of a gateway benchmark, and msgspec's compact, insertion-ordered
output makes recorded responses byte-stable.
"""

from __future__ import annotations

import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

import msgspec

__all__ = [
    "JSON_HEADERS",
    "MAX_BODY_BYTES",
    "ApiError",
    "ConnectionCut",
    "Disconnected",
    "Receive",
    "Scope",
    "Send",
    "decode",
    "encode",
    "error_body",
    "optional_bool",
    "parse_object",
    "positive_int",
    "read_body",
    "respond",
    "words_of",
]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: llm-d's default request body limit (fasthttp's 4 MiB).
MAX_BODY_BYTES = 4 * 1024 * 1024

JSON_HEADERS = [(b"content-type", b"application/json")]

encode = msgspec.json.Encoder().encode
decode = msgspec.json.Decoder().decode

# llm-d names error types after the status; OpenAI's SDK raises the class of the same name.
_OPENAI_ERROR_TYPES = {
    400: "BadRequestError",
    401: "AuthenticationError",
    403: "PermissionDeniedError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    409: "ConflictError",
    413: "RequestTooLargeError",
    422: "UnprocessableEntityError",
    429: "RateLimitError",
}

# Anthropic's documented error types (docs.anthropic.com/en/api/errors); other 4xx are
# `invalid_request_error`, other 5xx `api_error`.
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    529: "overloaded_error",
}


def error_body(
    status: int, message: str, param: str | None = None, anthropic: bool = False
) -> bytes:
    """An error envelope: OpenAI's `{"error": {message, type, param, code}}` (code = status, as
    llm-d sends it) or Anthropic's `{"type": "error", "error": {type, message}, "request_id"}`."""
    if anthropic:
        kind = _ANTHROPIC_ERROR_TYPES.get(
            status, "invalid_request_error" if status < 500 else "api_error"
        )
        return encode(
            {
                "type": "error",
                "error": {"type": kind, "message": message},
                "request_id": f"req_{uuid.uuid4().hex[:24]}",
            }
        )
    error = {
        "message": message,
        "type": _OPENAI_ERROR_TYPES.get(status, "InternalServerError"),
        "param": param,
        "code": status,
    }
    return encode({"error": error})


class ApiError(Exception):
    """An error answered with an envelope; raised before any byte of the response."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers

    def body(self, anthropic: bool = False) -> bytes:
        """The envelope of the API the request was for."""
        return error_body(self.status, self.message, self.param, anthropic)


class Disconnected(Exception):
    """The client went away before its request body arrived: nothing to answer."""


class ConnectionCut(Exception):
    """Raised after the response started to make the server drop the connection mid-body.

    ASGI has no "abort" message; an exception after `http.response.start` is the portable way
    to get the transport closed without the terminating chunk (uvicorn closes it). The
    simulator filters this exception out of uvicorn's error log: it is a requested fault.
    """


def words_of(text: str) -> int:
    """Tokens in this simulator: whitespace-separated words (as llm-d v0.1 counted)."""
    return len(text.split())


def parse_object(body: bytes) -> dict[str, Any]:
    """The request body as a JSON object, or a 400 worded like llm-d's."""
    try:
        req = decode(body)
    except (msgspec.MsgspecError, ValueError) as exc:  # not JSON, or bad UTF-8
        raise ApiError(400, f"Failed to read and parse request body, {exc}") from None
    if not isinstance(req, dict):
        raise ApiError(400, "Failed to read and parse request body, expected a JSON object")
    return req


def optional_bool(req: dict[str, Any], name: str) -> bool:
    value = req.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"`{name}` must be a boolean", name)
    return bool(value)


def positive_int(req: dict[str, Any], name: str) -> int | None:
    value = req.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(
            400, f"`{name}` must be a positive integer, got {encode(value).decode()}", name
        )
    return value


async def respond(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    """A complete JSON answer with a Content-Length."""
    headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def read_body(receive: Receive) -> bytes:
    """The whole request body, at most `MAX_BODY_BYTES` (413 beyond)."""
    message = await receive()
    if message["type"] == "http.disconnect":
        raise Disconnected
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        if len(body) > MAX_BODY_BYTES:
            raise _too_large()
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body"):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large() -> ApiError:
    return ApiError(413, f"Request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB")
