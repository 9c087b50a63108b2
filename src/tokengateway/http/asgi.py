"""ASGI type aliases and the one helper both apps need, importing nothing from the rest of
the package."""

from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


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
    Content-Length (the `content_length` attribute of the server's receive, server.py)
    and it is over `limit`. Raises RequestAborted when the client disconnects before the
    end of the body: a truncated body is never returned."""
    declared = getattr(receive, "content_length", None)
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
