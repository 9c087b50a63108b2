"""The upstream client's parts on their own: the error classes and the codes they become,
an exchange driven by hand (no socket), and a retry that is a fresh exchange."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from tests.test_upstream_client import Server, answer, reset
from tokengateway.dataplane.app import _UPSTREAM_ERRORS, _stream_error
from tokengateway.http.client import (
    DEFAULT_TIMEOUTS,
    READ_HIGH,
    Connection,
    Exchange,
    Stage,
    Timeouts,
    Upstream,
    UpstreamAborted,
    UpstreamBroken,
    UpstreamBusy,
    UpstreamClosed,
    UpstreamError,
    UpstreamInvalid,
    UpstreamResponse,
    UpstreamTimeout,
    UpstreamTooLarge,
    UpstreamUnreachable,
)

# --- errors -------------------------------------------------------------------------------------

#: each error class -> its kind, the status and the error code a client gets for it
ANSWERS = [
    (UpstreamUnreachable, "unreachable", 502, "upstream_unreachable"),
    (UpstreamBusy, "busy", 503, "upstream_busy"),
    (UpstreamTimeout, "timeout", 504, "upstream_timeout"),
    (UpstreamInvalid, "invalid", 502, "upstream_invalid_response"),
    (UpstreamTooLarge, "too_large", 502, "upstream_response_too_large"),
    (UpstreamBroken, "broken", 502, "upstream_failed"),
    (UpstreamClosed, "broken", 502, "upstream_failed"),
    (UpstreamAborted, "broken", 502, "upstream_failed"),
]


@pytest.mark.parametrize(("cls", "kind", "status", "code"), ANSWERS)
def test_each_error_class_has_its_kind_and_its_answer(
    cls: type[UpstreamError], kind: str, status: int, code: str
) -> None:
    error = cls("what happened")
    assert isinstance(error, UpstreamError) and str(error) == "what happened"
    assert error.kind == kind
    assert _UPSTREAM_ERRORS.get(error.kind, (502, "upstream_failed")) == (status, code)
    event = _stream_error("/v1/chat/completions", error)
    stream_code = "upstream_timeout" if cls is UpstreamTimeout else "upstream_failed"
    assert f'"code":"{stream_code}"'.encode() in event


def test_the_ends_of_an_answer_are_kinds_of_broken() -> None:
    assert issubclass(UpstreamClosed, UpstreamBroken)
    assert issubclass(UpstreamAborted, UpstreamBroken)
    assert str(UpstreamAborted()) == "upstream answer broken: Connection closed"
    too_large = UpstreamTooLarge.over("http://u", 10)
    assert str(too_large) == (
        "upstream http://u sent an answer over 10 bytes, the most the gateway reads of a "
        "non-streamed answer"
    )


# --- an exchange by hand --------------------------------------------------------------------


class Carrier:
    """A connection's stand-in: what the exchange asks of it, counted."""

    def __init__(self) -> None:
        self.paused = False
        self.resumed = 0
        self.aborted = 0

    def resume(self) -> None:
        self.paused = False
        self.resumed += 1

    def abort(self) -> None:
        self.aborted += 1


def exchange(
    loop: asyncio.AbstractEventLoop,
    timeouts: Timeouts = DEFAULT_TIMEOUTS,
    timeout: float | None = None,
    cap: int = 1000,
) -> tuple[Exchange, Carrier]:
    now = loop.time()
    first = now + timeouts.first_byte if timeouts.first_byte is not None else float("inf")
    deadline = now + timeout if timeout is not None else float("inf")
    made = Exchange(loop, "http://u", timeouts, timeout, cap, first, deadline, now)
    carrier = Carrier()
    made.conn = carrier
    return made, carrier


def test_an_exchange_told_head_body_and_end_reads_its_body() -> None:
    async def scenario() -> None:
        made, carrier = exchange(asyncio.get_running_loop())
        assert made.stage is Stage.HEAD
        made.headers.append((b"content-type", b"text/plain"))
        made.headers_done(200, "text/plain", None)
        assert made.stage is Stage.BODY and made.status == 200
        made.body.append(b"hello ")
        assert made.feed(6, 6) is False
        made.body.append(b"world")
        made.finish()
        assert made.stage is Stage.DONE and made.conn is None
        assert await made.read() == b"hello world"
        assert made.headers == [(b"content-type", b"text/plain")]
        assert carrier.aborted == 0

    asyncio.run(scenario())


def test_a_lagging_reader_asks_for_a_pause_and_a_read_resumes() -> None:
    async def scenario() -> None:
        made, carrier = exchange(asyncio.get_running_loop())
        made.headers_done(200, "text/event-stream", None)
        made.body.append(b"x" * READ_HIGH)
        assert made.feed(READ_HIGH, READ_HIGH) is False
        made.body.append(b"y")
        assert made.feed(1, READ_HIGH + 1) is True  # more than READ_HIGH wait
        carrier.paused = True
        stream = made.chunks()
        assert await anext(stream) == b"x" * READ_HIGH + b"y"
        assert carrier.resumed == 1 and made.buffered == 0
        made.finish()
        assert [c async for c in stream] == []

    asyncio.run(scenario())


def test_a_failed_exchange_aborts_its_connection_once() -> None:
    async def scenario() -> None:
        made, carrier = exchange(asyncio.get_running_loop())
        made.headers_done(200, "application/json", None)
        error = UpstreamClosed("gone")
        made.fail(error)
        made.fail(UpstreamAborted())  # over already: ignored
        made.close()
        assert carrier.aborted == 1 and made.error is error and not made.retryable
        with pytest.raises(UpstreamClosed):
            await made.read()

    asyncio.run(scenario())


def test_a_lost_connection_is_not_aborted_again() -> None:
    async def scenario() -> None:
        made, carrier = exchange(asyncio.get_running_loop())
        made.lost(UpstreamClosed("closed"), retryable=True)
        assert carrier.aborted == 0 and made.retryable and made.stage is Stage.DONE

    asyncio.run(scenario())


def test_a_body_read_whole_over_the_cap_fails_as_it_comes() -> None:
    async def scenario() -> None:
        made, carrier = exchange(asyncio.get_running_loop(), cap=10)
        made.headers_done(200, "application/json", None)
        reading = asyncio.ensure_future(made.read())
        await asyncio.sleep(0)
        made.body.append(b"x" * 11)
        made.feed(11, 11)
        with pytest.raises(UpstreamTooLarge, match="over 10 bytes"):
            await reading
        assert carrier.aborted == 1

    asyncio.run(scenario())


def test_the_exchange_timer_enforces_the_first_byte() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        made, carrier = exchange(loop, Timeouts(first_byte=0.05, idle=0.01))
        while made.stage is Stage.HEAD:
            await made.waiter()
        assert isinstance(made.error, UpstreamTimeout)
        assert str(made.error) == "upstream http://u sent no answer within 0.05s"
        assert carrier.aborted == 1

    asyncio.run(scenario())


def test_again_is_a_fresh_exchange_under_the_same_deadlines() -> None:
    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        made, _ = exchange(loop, Timeouts(first_byte=5), timeout=9)
        made.headers.append((b"a", b"b"))
        made.lost(UpstreamClosed("raced"), retryable=True)
        fresh = made.again(loop.time())
        assert fresh is not made
        assert fresh.stage is Stage.HEAD and fresh.error is None and not fresh.retryable
        assert fresh.headers == [] and fresh.body == [] and fresh.conn is None
        assert (fresh.first_byte_at, fresh.deadline) == (made.first_byte_at, made.deadline)
        fresh.close()

    asyncio.run(scenario())


def test_a_made_up_response_carries_its_coding() -> None:
    async def scenario() -> None:
        resp = UpstreamResponse(200, [], "application/json", b"x", content_encoding="gzip")
        assert resp.content_encoding == "gzip" and await resp.read() == b"x"
        assert not isinstance(resp, Exchange)

    asyncio.run(scenario())


# --- a retry is a fresh exchange ----------------------------------------------------------------


def test_the_retry_after_the_keepalive_race_is_a_fresh_exchange(monkeypatch) -> None:
    """The server resets a kept-alive connection on a GET: the GET goes again on a new
    connection, as a new exchange; the first one stays failed, the second is returned."""
    carried: list[Exchange] = []
    begin = Connection.begin

    def recorded(self: Connection, made: Exchange | None, head: bool) -> None:
        if made is not None:
            carried.append(made)
        begin(self, made, head)

    monkeypatch.setattr(Connection, "begin", recorded)

    async def scenario() -> None:
        async def script(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
            while await srv.read_request(reader) is not None:
                if srv.connections == 1 and len(srv.requests) == 2:
                    reset(w)  # the second request on the first connection: never answered
                    return
                w.write(answer(b"ok"))
                await w.drain()

        async with Server(script) as srv:
            up = Upstream()
            assert await (await up.send("GET", srv.url("/1"), [], b"")).read() == b"ok"
            resp = await up.send("GET", srv.url("/2"), [], b"")
            assert await resp.read() == b"ok"
            assert srv.connections == 2 and len(carried) == 3
            _, raced, again = carried
            assert resp is again and raced is not again
            assert raced.stage is Stage.DONE and isinstance(raced.error, UpstreamClosed)
            assert raced.retryable and again.error is None
            await up.close()

    asyncio.run(scenario())
