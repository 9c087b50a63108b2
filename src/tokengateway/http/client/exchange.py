"""One request and its answer: the `Exchange`, and the `UpstreamResponse` its reader holds.

An exchange is made for every try of a request (a retry gets a fresh one, under the same
deadlines) and lives through three stages (`Stage`): the answer's head is coming, its body
is coming, it is over (complete, or failed with `error`). It owns what the answer's reader
and the connection share: the header list and the body queue (which the connection fills
as it parses, and the reader empties), the reader's wake-up, and one timer for all the
timeouts. The connection tells it what happened through a few methods (`headers_done`,
`feed`, `finish`, `fail`, `lost`); the reader calls `read`, `chunks` or `close`.

One timer per exchange enforces the first-byte timeout, the silence between two chunks of
the body and the route's timeout: it is moved lazily (when it fires it re-arms itself at
the deadline now in force) rather than replaced at every chunk.
"""

from __future__ import annotations

import asyncio
import enum
from collections.abc import AsyncIterator
from typing import Protocol

from tokengateway.http.client.errors import (
    UpstreamAborted,
    UpstreamError,
    UpstreamTimeout,
    UpstreamTooLarge,
)
from tokengateway.http.client.request import Timeouts

__all__ = ["READ_HIGH", "Carrier", "Exchange", "Stage", "UpstreamResponse"]

#: Unread body bytes at which reading from the upstream pauses until the reader catches up.
READ_HIGH = 256 * 1024
_INF = float("inf")


class Stage(enum.Enum):
    """Where an answer is (an exchange's, and the connection's parse of it)."""

    HEAD = 0  # its status line and headers are coming
    BODY = 1  # its body is coming
    DONE = 2  # over: complete, or failed


# the members as module globals: compared on every callback, faster than `Stage.X`
_HEAD, _BODY, _DONE = Stage.HEAD, Stage.BODY, Stage.DONE


class Carrier(Protocol):
    """What an exchange needs of the connection it is on."""

    #: reading is paused (the reader is behind); `resume` starts it again
    paused: bool

    def resume(self) -> None: ...

    def abort(self) -> None:
        """Close the connection at once, the exchange on it no longer its business."""


class UpstreamResponse:
    """An answer: its status, headers and body.

    `headers` are lower-cased, in arrival order, repeats kept, without hop-by-hop ones and
    `date`. `content_type` is the media type alone, lower-case ("application/octet-stream"
    when there is none, as aiohttp); `content_encoding` the answer's Content-Encoding,
    lower-case, when it is not identity (None).

    Made directly (in tests and benchmarks) it is a complete answer whose body is `body`:
    no connection, no timers. The client returns an `Exchange`, whose body arrives as
    `read` or `chunks` waits for it.
    """

    __slots__ = ("body", "content_encoding", "content_type", "headers", "status")

    def __init__(
        self,
        status: int,
        headers: list[tuple[bytes, bytes]] | None = None,
        content_type: str = "",
        body: bytes = b"",
        content_encoding: str | None = None,
    ) -> None:
        self.status = status
        self.headers: list[tuple[bytes, bytes]] = [] if headers is None else headers
        self.content_type = content_type
        self.content_encoding = content_encoding
        #: the body's pieces not yet read
        self.body: list[bytes] = [body] if body else []

    async def read(self) -> bytes:
        """The whole body."""
        body = self.body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        return data

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body, in one piece."""
        body = self.body
        if body:
            data = body[0] if len(body) == 1 else b"".join(body)
            body.clear()
            yield data

    def close(self) -> None:
        """Nothing to abort: the answer is complete."""
        self.body.clear()


class Exchange(UpstreamResponse):
    """One try of a request on a connection, and its answer as it arrives.

    Made with the loop, the origin's `label` (for messages), the backend's `timeouts`, the
    route's `timeout` (seconds, for messages), the most `read` takes (`cap`), and the
    deadlines in force: `first_byte_at` for the head, `deadline` for everything (loop
    times; infinity for none). `now` is the loop's time; the timer is armed at once.
    """

    __slots__ = (
        "_all",
        "_cap",
        "_label",
        "_limits",
        "_loop",
        "_since",
        "_timeout",
        "_timer",
        "_timer_at",
        "_waiter",
        "_waiting",
        "buffered",
        "conn",
        "deadline",
        "error",
        "first_byte_at",
        "idle",
        "retryable",
        "stage",
    )

    def __init__(
        self,
        loop: asyncio.AbstractEventLoop,
        label: str,
        timeouts: Timeouts,
        timeout: float | None,
        cap: int,
        first_byte_at: float,
        deadline: float,
        now: float,
    ) -> None:
        self.status = 0
        self.headers = []
        self.content_type = ""
        self.content_encoding = None
        self.body = []
        self.stage = _HEAD
        self.error: UpstreamError | None = None
        #: failed on a reused connection before any byte of the answer: may go again
        self.retryable = False
        self.conn: Carrier | None = None  # the connection it is on, until it is over
        #: body bytes waiting for the reader (about: the wire's bytes are counted)
        self.buffered = 0
        self.idle = timeouts.idle  # the longest silence allowed between two chunks
        self.first_byte_at = first_byte_at
        self.deadline = deadline
        self._waiter: asyncio.Future[None] | None = None
        self._waiting = False  # the reader waits for body bytes (the idle timeout runs)
        self._all = False  # read(): the reader takes the whole body, no wake-up per chunk
        self._since = 0.0  # when the current silence began
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = _INF
        self._timeout = timeout
        self._limits = timeouts
        self._label = label
        self._loop = loop
        self._cap = cap
        first_at = min(first_byte_at, deadline)
        idle = timeouts.idle
        self._arm(first_at if idle is None else min(first_at, now + idle))

    def again(self, now: float) -> Exchange:
        """A fresh exchange for the same request, under the same deadlines."""
        return Exchange(
            self._loop,
            self._label,
            self._limits,
            self._timeout,
            self._cap,
            self.first_byte_at,
            self.deadline,
            now,
        )

    # --- the reader's side ------------------------------------------------------------------

    async def read(self) -> bytes:
        """The whole body (the same timeouts and errors as `chunks`); `UpstreamTooLarge`
        past `cap` bytes."""
        if self.stage is not _DONE:
            self._all = True
            conn = self.conn
            if conn is not None and conn.paused:
                conn.resume()
            while self.stage is not _DONE:
                await self._wait_body()
        if self.error is not None:
            raise self.error
        body = self.body
        data = body[0] if len(body) == 1 else b"".join(body)
        body.clear()
        self.buffered = 0
        if len(data) > self._cap:
            self.error = UpstreamTooLarge.over(self._label, self._cap)
            raise self.error
        return data

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives (all that is buffered, at each step); `idle` bounds the
        silence before each chunk. Left unfinished, the exchange is aborted when this
        iterator is closed or collected."""
        body = self.body
        try:
            while True:
                if body:
                    data = body[0] if len(body) == 1 else b"".join(body)
                    body.clear()
                    self.buffered = 0
                    conn = self.conn
                    if conn is not None and conn.paused:
                        conn.resume()
                    yield data
                elif self.stage is _DONE:
                    if self.error is not None:
                        raise self.error
                    return
                else:
                    await self._wait_body()
        finally:
            if self.stage is not _DONE:
                self.fail(UpstreamAborted())

    def close(self) -> None:
        """Abort the exchange now (the client went away): the connection is closed, a read
        in progress ends with an error. Nothing to do once the answer is complete."""
        if self.stage is not _DONE:
            self.body.clear()
            self.buffered = 0
            self.fail(UpstreamAborted())

    async def _wait_body(self) -> None:
        idle = self.idle
        loop = self._loop
        if idle is not None:
            now = loop.time()
            self._since = now
            at = now + idle
            if at < self._timer_at:
                self._arm(min(at, self.deadline))
        self._waiting = True
        waiter = self._waiter = loop.create_future()
        try:
            await waiter
        except asyncio.CancelledError:
            self.fail(UpstreamAborted())
            raise
        finally:
            self._waiting = False

    def waiter(self) -> asyncio.Future[None]:
        """A future done at the exchange's next event: bytes of the answer, the connection
        writable again, the end. (A plain method: awaiting it costs no coroutine.)"""
        waiter = self._waiter = self._loop.create_future()
        return waiter

    def wake(self) -> None:
        """Whoever waits on the exchange (`waiter`) goes on."""
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    # --- what the connection tells it ---------------------------------------------------------

    def headers_done(self, status: int, content_type: str, content_encoding: str | None) -> None:
        """The final answer's head is parsed (its headers are in `headers`): the body comes."""
        self.status = status
        self.content_type = content_type
        self.content_encoding = content_encoding
        self.stage = _BODY

    def feed(self, size: int, total: int) -> bool:
        """Bytes of the answer came after its head: `size` of them on the wire, `total`
        bytes of the body (decoded) so far, in `body`. Wakes the reader; a body read whole
        over `cap` fails. True when reading should pause: more than `READ_HIGH` bytes wait."""
        if self._all:
            if total > self._cap:
                self.fail(UpstreamTooLarge.over(self._label, self._cap))
            elif self._waiting:
                self._since = self._loop.time()
            return False
        self.buffered = buffered = self.buffered + size
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)
        return buffered > READ_HIGH

    def finish(self) -> None:
        """The answer was parsed to its end (its connection is the connection's business)."""
        self.stage = _DONE
        self.conn = None
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
            self._timer_at = _INF
        waiter = self._waiter
        if waiter is not None:
            self._waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def fail(self, error: UpstreamError, retryable: bool = False) -> None:
        """End the exchange with `error` (unless it is over): its connection is aborted,
        never pooled. `retryable`: no byte of the answer came on a reused connection."""
        if self.stage is _DONE:
            return
        self.stage = _DONE
        self.error = error
        self.retryable = retryable
        timer = self._timer
        if timer is not None:
            timer.cancel()
            self._timer = None
            self._timer_at = _INF
        conn = self.conn
        if conn is not None:
            self.conn = None
            conn.abort()
        self.wake()

    def lost(self, error: UpstreamError, retryable: bool = False) -> None:
        """The connection ended under the exchange (and closes itself): fail with `error`."""
        self.conn = None
        self.fail(error, retryable)

    # --- the timer ----------------------------------------------------------------------------

    def expired(self, at: float) -> UpstreamTimeout:
        """The error of a wait that ran to `at`: the first byte's deadline, or the route's."""
        return self._no_answer() if at == self.first_byte_at else self._route_timeout()

    def _arm(self, at: float) -> None:
        """Have the timer fire at `at` at the latest (an earlier one is left alone)."""
        timer = self._timer
        if timer is not None:
            if self._timer_at <= at:
                return
            timer.cancel()
        if at == _INF:
            self._timer = None
            self._timer_at = _INF
            return
        self._timer_at = at
        self._timer = self._loop.call_at(at, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        self._timer_at = _INF
        stage = self.stage
        if stage is _DONE:
            return
        now = self._loop.time()
        deadline = self.deadline
        if stage is _HEAD:
            first_byte = self.first_byte_at
            if now >= min(first_byte, deadline):
                if first_byte < deadline:
                    self.fail(self._no_answer())
                else:
                    self.fail(self._route_timeout())
            else:
                self._arm(min(first_byte, deadline))
            return
        if now >= deadline:
            self.fail(self._route_timeout())
            return
        at = deadline
        idle = self.idle
        if self._waiting and idle is not None:
            quiet_until = self._since + idle
            if now >= quiet_until:
                self.fail(UpstreamTimeout(f"upstream sent nothing for {idle:g}s"))
                return
            at = min(at, quiet_until)
        self._arm(at)

    def _no_answer(self) -> UpstreamTimeout:
        return UpstreamTimeout(
            f"upstream {self._label} sent no answer within {self._limits.first_byte:g}s"
        )

    def _route_timeout(self) -> UpstreamTimeout:
        return UpstreamTimeout(
            f"upstream {self._label} timed out (route timeout {self._timeout:g}s)"
        )
