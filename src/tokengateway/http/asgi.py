"""ASGI type aliases and the one helper both apps need, importing nothing from the rest of
the package.

A request's declared Content-Length reaches `read_body` through the type of the server's
`receive`, not a key of the scope nor an attribute looked up by name: the server's receive
is a `SizedReceive`, a plain base class whose `content_length` an `isinstance` check finds
(a class check costs tens of nanoseconds where a runtime-checkable Protocol's costs
microseconds). Another server's receive is any callable; `read_body` then counts the body
as it comes.
"""

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


class SizedReceive:
    """An ASGI `receive` that knows the request's declared body size before reading it:
    `content_length` is the Content-Length the request announced, None without one (a
    chunked body, or none). The HTTP server's receive (server.py) is one."""

    __slots__ = ()

    content_length: int | None

    async def __call__(self) -> Message:
        raise NotImplementedError


def declared_length(receive: Receive) -> int | None:
    """The body size `receive`'s request announced, when `receive` knows it (a
    `SizedReceive`); else None."""
    return receive.content_length if isinstance(receive, SizedReceive) else None


class RequestAborted(BaseException):
    """The request's body will never be complete: the client went away in the middle of it,
    or sent nothing more for the body timeout (the connection layer then answered 408
    itself, see server.py).

    A BaseException, like asyncio's CancelledError: an app's `except Exception` last line of
    defence must not turn it into a 500 (nobody is there to read it), and no half-received
    body may go further. The server (server.py) catches it. `timed_out` tells the two
    cases apart: the server answered 408, or the client left."""

    def __init__(self, message: str, *, timed_out: bool = False) -> None:
        super().__init__(message)
        self.timed_out = timed_out


async def read_body(receive: Receive, limit: int) -> bytes | None:
    """The whole request body, or None when it is larger than `limit` bytes.

    Refuses at once, before reading anything, when `receive` knows the request's declared
    Content-Length (`declared_length`) and it is over `limit`. Raises RequestAborted when
    the client disconnects before the end of the body: a truncated body is never returned."""
    declared = declared_length(receive)
    if declared is not None and declared > limit:
        return None
    chunks = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise RequestAborted("the client disconnected before the end of the request body")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            return None
        chunks.append(chunk)
        if not message.get("more_body", False):
            break
    return b"".join(chunks)
