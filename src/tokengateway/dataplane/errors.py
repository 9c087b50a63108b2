"""Errors the gateway itself answers, always in OpenAI's envelope.

`{"error": {"message", "type", "param", "code"}}` is what OpenAI's SDKs parse; the status
picks the SDK's exception class (401 AuthenticationError, 403 PermissionDeniedError,
429 RateLimitError, ...).
"""

from __future__ import annotations

from collections.abc import Iterable

import msgspec

from tokengateway.http.asgi import Send

__all__ = ["error_body", "http_error_body", "send_error", "send_json"]

_encode = msgspec.json.encode


def error_body(
    message: str, type_: str, code: str | None = None, param: str | None = None
) -> bytes:
    return _encode({"error": {"message": message, "type": type_, "param": param, "code": code}})


def http_error_body(status: int, message: str, code: str) -> bytes:
    """The HTTP server's own answers (http/server.py: a bad request, a timeout, too many
    connections, an app that failed) in the same envelope: `server_error` for its 500,
    `invalid_request_error` for the others. `make_server` hands it to every server."""
    return error_body(message, "server_error" if status == 500 else "invalid_request_error", code)


async def send_error(
    send: Send,
    status: int,
    message: str,
    type_: str,
    code: str | None = None,
    headers: Iterable[tuple[str, str]] = (),
    param: str | None = None,
    raw_headers: Iterable[tuple[bytes, bytes]] = (),
) -> None:
    raw = [(k.lower().encode("latin-1"), v.encode("latin-1", "replace")) for k, v in headers]
    raw.extend(raw_headers)
    await send_json(send, status, error_body(message, type_, code, param), raw)


async def send_json(
    send: Send, status: int, body: bytes, headers: Iterable[tuple[bytes, bytes]] = ()
) -> None:
    """Answer with a JSON body already encoded (an error envelope, say), and `headers`."""
    raw = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    raw.extend(headers)
    await send({"type": "http.response.start", "status": status, "headers": raw})
    await send({"type": "http.response.body", "body": body})
