"""The upstream client against real servers on loopback: scripted asyncio servers that
answer byte for byte what each test needs (well or badly), on both event loops."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import hashlib
import re
import socket
import ssl
import struct
import subprocess
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import uvloop

from tests.conftest import require, unconnectable_port
from tokengateway.http import client as upstream_module
from tokengateway.http.client import (
    READ_HIGH,
    BadTarget,
    Origin,
    Timeouts,
    Upstream,
    UpstreamError,
    UpstreamResponse,
)

INCOMPLETE = "upstream closed the connection before the response was complete"
LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[Any]]], Any]:
    """Runs a scenario (an async function) on a new event loop of each kind."""

    def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(scenario())  # type: ignore[arg-type]

    return run


Script = Callable[["Server", asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Server:
    """An HTTP server on a loopback port whose every connection runs `script`."""

    def __init__(self, script: Script, ssl_context: ssl.SSLContext | None = None) -> None:
        self.script = script
        self.ssl_context = ssl_context
        self.connections = 0  # accepted so far
        self.ended = 0  # connections the client closed (seen while waiting for a request)
        self.requests: list[tuple[bytes, bytes]] = []  # (head, body) of each, in order
        self.writers: list[asyncio.StreamWriter] = []
        self.port = 0

    async def __aenter__(self) -> Server:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.ssl_context)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        self.server.close()
        for writer in self.writers:
            writer.transport.abort()

    def url(self, path: str = "/v1/chat/completions", scheme: str = "http") -> str:
        host = "localhost" if scheme == "https" else "127.0.0.1"
        return f"{scheme}://{host}:{self.port}{path}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.CancelledError, ssl.SSLError):
            await self.script(self, reader, writer)
        writer.transport.close()

    async def read_request(self, reader: asyncio.StreamReader) -> tuple[bytes, bytes] | None:
        """The next request on a connection; None when the client closed it."""
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            self.ended += 1
            return None
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        body = await reader.readexactly(length) if length else b""
        self.requests.append((head, body))
        return head, body


def answer(
    body: bytes = b'{"ok": true}',
    status: bytes = b"200 OK",
    headers: bytes = b"content-type: application/json\r\n",
    version: bytes = b"HTTP/1.1",
) -> bytes:
    return (
        version + b" " + status + b"\r\n" + headers
        + b"content-length: " + str(len(body)).encode() + b"\r\n\r\n" + body
    )  # fmt: skip


def serving(response: bytes | Callable[[bytes, bytes], bytes]) -> Script:
    """Answers every request of a connection with `response` (or what it makes of one)."""

    async def script(srv: Server, reader: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while (request := await srv.read_request(reader)) is not None:
            w.write(response(*request) if callable(response) else response)
            await w.drain()

    return script


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a RST rather than a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


async def failure(coro: Awaitable[Any]) -> UpstreamError:
    with pytest.raises(UpstreamError) as info:
        await coro
    return info.value


async def until(condition: Callable[[], bool], timeout: float = 5) -> None:
    async with asyncio.timeout(timeout):
        while not condition():
            await asyncio.sleep(0.01)


# --- what goes out, what comes back -----------------------------------------------------------


def test_an_answer_has_its_status_headers_and_body(run) -> None:
    head = (
        b"content-type: Application/JSON; charset=utf-8\r\nDate: Mon, 01 Jan 2024 00:00:00 GMT\r\n"
        b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\nX-Up: 1\r\n"
        b"Set-Cookie: a=1\r\nset-cookie: b=2\r\nServer: up\r\n"
    )

    async def scenario() -> None:
        async with Server(serving(answer(b"hello", b"201 Created", head))) as srv:
            up = Upstream()
            resp = await up.send("POST", srv.url(), [], b"{}")
            assert resp.status == 201
            assert resp.headers == [
                (b"content-type", b"Application/JSON; charset=utf-8"),
                (b"x-up", b"1"),
                (b"set-cookie", b"a=1"),
                (b"set-cookie", b"b=2"),
                (b"server", b"up"),
            ]
            assert resp.content_type == "application/json"
            assert await resp.read() == b"hello"
            await up.close()

    run(scenario)


@pytest.mark.parametrize(
    ("header", "media"),
    [
        (b"content-type: Text/Event-Stream ; charset=utf-8\r\n", "text/event-stream"),
        (b"content-type: text/event-stream\r\n", "text/event-stream"),
        (b"", "application/octet-stream"),
        (b"content-type: garbage\r\n", "application/octet-stream"),
    ],
)
def test_the_content_type_is_the_media_type_alone(run, header: bytes, media: str) -> None:
    async def scenario() -> None:
        async with Server(serving(answer(b"x", headers=header))) as srv:
            up = Upstream()
            resp = await up.send("GET", srv.url(), [], b"")
            assert resp.content_type == media
            await resp.read()
            await up.close()

    run(scenario)


def test_the_request_goes_out_as_given(run) -> None:
    async def scenario() -> None:
        async with Server(serving(answer())) as srv:
            up = Upstream()
            headers = [("Content-Type", "application/json"), ("x-a", "1"), ("x-a", "2")]
            await (await up.send("POST", srv.url("/v1/x?y=1&z"), headers, b"{}")).read()
            # a value read from a client as Latin-1 goes back as its bytes; text of our own
            # beyond Latin-1 (an AuthPolicy's header, say) as UTF-8
            latin = [("x-b", "é")]
            await (await up.send("GET", srv.url("/v1/models"), latin, b"")).read()
            await (await up.send("GET", srv.url("/v1/models"), [("x-c", "用")], b"")).read()
            await (await up.send("POST", srv.url("/v1/empty"), [], b"")).read()
            given = [("host", "api.example.com"), ("Content-Length", "99"), ("x", "y")]
            await (await up.send("PUT", srv.url(""), given, b"abc")).read()
            host = f"127.0.0.1:{srv.port}".encode()
            assert [head for head, _ in srv.requests] == [
                b"POST /v1/x?y=1&z HTTP/1.1\r\nHost: " + host + b"\r\n"
                b"Content-Type: application/json\r\nx-a: 1\r\nx-a: 2\r\n"
                b"Content-Length: 2\r\n\r\n",
                b"GET /v1/models HTTP/1.1\r\nHost: " + host + b"\r\nx-b: \xe9\r\n\r\n",
                b"GET /v1/models HTTP/1.1\r\nHost: " + host + b"\r\nx-c: \xe7\x94\xa8\r\n\r\n",
                b"POST /v1/empty HTTP/1.1\r\nHost: " + host + b"\r\nContent-Length: 0\r\n\r\n",
                # a Host given is kept (and ours not added); the framing is ours
                b"PUT / HTTP/1.1\r\nhost: api.example.com\r\nx: y\r\nContent-Length: 3\r\n\r\n",
            ]
            assert [body for _, body in srv.requests] == [b"{}", b"", b"", b"", b"abc"]
            await up.close()

    run(scenario)


def test_a_target_goes_out_as_given_or_not_at_all(run) -> None:
    """Nothing is quoted or re-read: a target that cannot go out as it is is refused."""

    async def scenario() -> None:
        async with Server(serving(answer())) as srv:
            up = Upstream()
            good = "/v1/a%20b/%C3%A9;p=1:@!$&'()*+,=~?q=1%202&p=/?:@"
            await (await up.send("GET", srv.url(good), [], b"")).read()
            assert srv.requests[0][0].split(b"\r\n")[0] == f"GET {good} HTTP/1.1".encode()
            for bad, why in [
                ("/v1/a b", "a space"),
                ("/v1/\u00e9", "a character a URL may not carry ('\u00e9' at 4)"),
                ("/v1/x?p=100%", "'%' that does not start an escape"),
                ("/v1/x#frag", "a fragment"),
                ("/v1/x\r\nX: 1", "control character"),
                ("/v1/[x]", "a character a URL may not carry ('[' at 4)"),
            ]:
                with pytest.raises(BadTarget, match=re.escape(why)):
                    await up.send("GET", srv.url(bad), [], b"")
            assert len(srv.requests) == 1 and srv.connections == 1
            await up.close()

    run(scenario)


def test_a_line_break_in_a_header_is_refused(run) -> None:
    async def scenario() -> None:
        async with Server(serving(answer())) as srv:
            up = Upstream()
            with pytest.raises(ValueError):
                await up.send("GET", srv.url(), [("x", "a\r\nevil: 1")], b"")
            assert srv.requests == []
            await up.close()

    run(scenario)


@pytest.mark.parametrize(
    ("url", "host", "port", "header"),
    [
        ("http://Example.com", "example.com", 80, "example.com"),
        ("http://example.com:80", "example.com", 80, "example.com"),
        ("http://example.com:8000", "example.com", 8000, "example.com:8000"),
        ("https://example.com", "example.com", 443, "example.com"),
        ("https://example.com:8443", "example.com", 8443, "example.com:8443"),
        ("http://[::1]:8000", "::1", 8000, "[::1]:8000"),
        ("https://[::1]", "::1", 443, "[::1]"),
    ],
)
def test_an_origin_gives_the_address_and_the_host_header(url, host, port, header) -> None:
    origin = Origin(url)
    assert (origin.host, origin.port, origin.host_header) == (host, port, header)
    assert origin.base_path == "" and origin.auth is None


@pytest.mark.parametrize(
    "url",
    [
        "ftp://example.com",
        "http://",
        "http://exa mple.com",
        "http://example.com:99999",
        "http://example.com:0",
        "http://example.com:8x",
        "http://example.com/v1?x=1",
        "http://example.com/v1#x",
        "http://exa%2fmple.com",
        "http://example.com/a b",
        "http://example.com/\u00e9",
    ],
)
def test_an_origin_that_is_not_one_is_refused(url: str) -> None:
    with pytest.raises(ValueError):
        Origin(url)


def test_credentials_in_the_url_become_basic_auth(run) -> None:
    async def scenario() -> None:
        async with Server(serving(answer())) as srv:
            up = Upstream()
            url = f"http://us%40er:p%3Ass@127.0.0.1:{srv.port}/x"
            await (await up.send("GET", url, [], b"")).read()
            await (await up.send("GET", url, [("Authorization", "Bearer k")], b"")).read()
            first, second = (head for head, _ in srv.requests)
            assert b"Authorization: Basic dXNAZXI6cDpzcw==\r\n" in first  # us@er:p:ss
            assert b"Basic" not in second and b"Authorization: Bearer k\r\n" in second
            await srv.__aexit__()
            error = await failure(up.send("GET", url, [], b""))  # refused: no password in it
            assert str(error).startswith(f"upstream http://127.0.0.1:{srv.port} unreachable")
            await up.close()

    run(scenario)


# --- bodies -----------------------------------------------------------------------------------


def test_a_chunked_body_comes_as_it_is_sent(run) -> None:
    async def scenario() -> None:
        received = asyncio.Event()

        async def script(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
            while await srv.read_request(reader) is not None:
                w.write(
                    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                    b"transfer-encoding: chunked\r\n\r\n7\r\ndata: 1\r\n"
                )
                await received.wait()
                received.clear()
                w.write(b"7\r\ndata: 2\r\n0\r\nx-trailer: t\r\n\r\n")

        async with Server(script) as srv:
            up = Upstream()
            for _ in range(2):
                resp = await up.send("POST", srv.url(), [], b"{}")
                assert resp.content_type == "text/event-stream"
                got = []
                async for chunk in resp.chunks():
                    got.append(chunk)
                    if chunk == b"data: 1":
                        received.set()
                assert got == [b"data: 1", b"data: 2"]
                assert resp.headers == [(b"content-type", b"text/event-stream")]  # no trailer
            assert srv.connections == 1  # kept alive, after the trailer too
            await up.close()

    run(scenario)


def test_a_body_until_the_connection_closes(run) -> None:
    async def scenario() -> None:
        async def script(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\n\r\nhello ")
            await w.drain()
            await asyncio.sleep(0.05)
            w.write(b"world")
            await w.drain()

        async with Server(script) as srv:
            up = Upstream()
            for _ in range(2):
                resp = await up.send("GET", srv.url(), [], b"")
                assert await resp.read() == b"hello world"
            assert srv.connections == 2
            await up.close()

    run(scenario)


def test_no_body_after_head_204_304_and_1xx_skipped(run) -> None:
    async def scenario() -> None:
        def respond(head: bytes, body: bytes) -> bytes:
            if head.startswith(b"HEAD"):  # a length, but no body
                return b"HTTP/1.1 200 OK\r\ncontent-type: text/plain\r\ncontent-length: 10\r\n\r\n"
            if b"/204" in head:
                return b"HTTP/1.1 204 No Content\r\nx-a: 1\r\n\r\n"
            if b"/304" in head:
                return b"HTTP/1.1 304 Not Modified\r\ncontent-length: 10\r\n\r\n"
            return (
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
                + answer(b"ok", headers=b"x-b: 2\r\n")
            )

        async with Server(serving(respond)) as srv:
            up = Upstream(Timeouts(idle=1))
            for path, status in (("/204", 204), ("/304", 304), ("/continue", 200)):
                resp = await up.send("GET", srv.url(path), [], b"")
                assert resp.status == status
                assert await resp.read() == (b"ok" if status == 200 else b"")
            assert resp.headers == [(b"x-b", b"2")]  # none of the 1xx answers' headers
            assert srv.connections == 1
            resp = await up.send("HEAD", srv.url(), [], b"")
            assert resp.status == 200 and await resp.read() == b""
            assert resp.content_type == "text/plain"
            resp = await up.send("GET", srv.url("/204"), [], b"")
            assert resp.status == 204
            assert srv.connections == 2  # a HEAD answer's connection is not reused
            await up.close()

    run(scenario)


def test_a_large_body_arrives_whole_by_chunks_and_by_read(run) -> None:
    payload = bytes(range(256)) * 4096 * 4  # 4 MiB

    async def scenario() -> None:
        async with Server(serving(answer(payload))) as srv:
            up = Upstream()
            resp = await up.send("GET", srv.url(), [], b"")
            assert await resp.read() == payload
            resp = await up.send("GET", srv.url(), [], b"")
            assert b"".join([c async for c in resp.chunks()]) == payload
            assert srv.connections == 1
            await up.close()

    run(scenario)


# --- the pool ---------------------------------------------------------------------------------


def test_connections_are_kept_alive_and_reused(run) -> None:
    async def scenario() -> None:
        def echo(head: bytes, body: bytes) -> bytes:
            return answer(body)

        async with Server(serving(echo)) as srv:
            up = Upstream()
            for i in range(5):
                resp = await up.send("POST", srv.url(), [], str(i).encode())
                assert await resp.read() == str(i).encode()
            assert srv.connections == 1

            async def one(i: int) -> bytes:
                resp = await up.send("POST", srv.url(), [], b"x" * i)
                return await resp.read()

            bodies = await asyncio.gather(*(one(i) for i in range(40)))
            assert bodies == [b"x" * i for i in range(40)]
            opened = srv.connections
            assert opened > 1  # as many as were needed at once, no limit
            await asyncio.gather(*(one(i) for i in range(opened)))
            assert srv.connections == opened  # all of them back in the pool
            await up.close()

    run(scenario)


@pytest.mark.parametrize(
    ("response", "reused"),
    [
        (answer(headers=b"connection: close\r\n"), False),
        (answer(headers=b"Connection: Close\r\n"), False),
        (answer(version=b"HTTP/1.0"), False),
        (answer(version=b"HTTP/1.0", headers=b"connection: keep-alive\r\n"), True),
        (answer(headers=b"connection: keep-alive\r\n"), True),
    ],
)
def test_a_connection_the_server_closes_is_not_reused(run, response: bytes, reused) -> None:
    async def scenario() -> None:
        async with Server(serving(response)) as srv:
            up = Upstream()
            for _ in range(3):
                await (await up.send("GET", srv.url(), [], b"")).read()
            assert srv.connections == (1 if reused else 3)
            await up.close()

    run(scenario)


def test_a_pooled_connection_the_server_closed_is_dropped(run) -> None:
    async def scenario() -> None:
        async def script(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            w.write(answer())  # keep-alive, says HTTP/1.1, and yet closes
            await w.drain()

        async with Server(script) as srv:
            up = Upstream()
            await (await up.send("GET", srv.url(), [], b"")).read()
            await asyncio.sleep(0.1)
            await (await up.send("GET", srv.url(), [], b"")).read()
            assert srv.connections == 2 and len(srv.requests) == 2
            await up.close()

    run(scenario)


def test_a_reused_connection_found_closed_is_retried_once_if_idempotent(run) -> None:
    """The keep-alive race: the server closes the idle connection just as a request goes
    out on it. Nothing was answered: a GET goes again, on a new connection; a POST does not
    (the server may have read it: a completion run twice costs twice)."""

    async def scenario() -> None:
        async def script(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            w.write(answer(b"first"))
            await w.drain()
            await srv.read_request(reader)  # read, never answered
            if srv.connections in (1, 3):
                reset(w)
            else:
                w.write(answer(b"again"))
                await w.drain()

        async with Server(script) as srv:
            up = Upstream()
            assert await (await up.send("GET", srv.url("/1"), [], b"")).read() == b"first"
            assert await (await up.send("GET", srv.url("/2"), [], b"")).read() == b"first"
            assert srv.connections == 2
            assert [h.split(b" ")[1] for h, _ in srv.requests] == [b"/1", b"/2", b"/2"]
            await up.close()

        async with Server(script) as srv:
            srv.connections = 2  # this server's first connection is the third: it resets
            up = Upstream()
            assert await (await up.send("POST", srv.url(), [], b"1")).read() == b"first"
            error = await failure(up.send("POST", srv.url(), [], b"2"))
            assert error.kind == "broken"
            assert "the POST request is not sent again" in str(error)
            assert srv.connections == 3  # no new connection for it
            assert [body for _, body in srv.requests] == [b"1", b"2"]
            await up.close()

    run(scenario)


def test_a_new_connection_or_a_started_answer_is_never_retried(run) -> None:
    async def scenario() -> None:
        async def silent(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)  # then closes without a word

        async with Server(silent) as srv:
            up = Upstream()
            error = await failure(up.send("POST", srv.url(), [], b"x"))
            assert error.kind == "broken"
            assert str(error) == f"upstream http://127.0.0.1:{srv.port} failed: Server disconnected"
            assert len(srv.requests) == 1
            await up.close()

        async def half(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            w.write(answer())
            await srv.read_request(reader)
            w.write(b"HTTP/1.1 200 OK\r\ncontent-le")
            await w.drain()

        async with Server(half) as srv:
            up = Upstream()
            await (await up.send("POST", srv.url(), [], b"x")).read()
            error = await failure(up.send("POST", srv.url(), [], b"x"))
            assert error.kind == "broken" and "Server disconnected" in str(error)
            assert len(srv.requests) == 2
            await up.close()

    run(scenario)


def test_an_idle_connection_is_closed_after_the_keepalive(run) -> None:
    async def scenario() -> None:
        async with Server(serving(answer())) as srv:
            up = Upstream(keepalive=0.3)
            await (await up.send("GET", srv.url(), [], b"")).read()
            await asyncio.sleep(0.1)
            await (await up.send("GET", srv.url(), [], b"")).read()  # still there
            assert srv.connections == 1 and srv.ended == 0
            await until(lambda: srv.ended == 1, timeout=2)
            await (await up.send("GET", srv.url(), [], b"")).read()
            assert srv.connections == 2
            await up.close()

    run(scenario)


def test_close_closes_the_pooled_connections(run) -> None:
    async def scenario() -> None:
        async with Server(serving(answer())) as srv:
            up = Upstream()
            await asyncio.gather(*(up.send("GET", srv.url(), [], b"") for _ in range(3)))
            await until(lambda: srv.connections == 3)
            # the answers are complete as they come: their connections are in the pool
            await up.close()
            await until(lambda: srv.ended == 3, timeout=2)

    run(scenario)


def test_bytes_on_an_idle_connection_spoil_it(run) -> None:
    async def scenario() -> None:
        async def script(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            w.write(answer())
            await asyncio.sleep(0.05)
            w.write(answer(b"unasked"))
            await srv.read_request(reader)

        async with Server(script) as srv:
            up = Upstream()
            assert await (await up.send("GET", srv.url(), [], b"")).read() == b'{"ok": true}'
            await asyncio.sleep(0.2)
            await until(lambda: srv.ended == 1)
            assert await (await up.send("GET", srv.url(), [], b"")).read() == b'{"ok": true}'
            assert srv.connections == 2
            await up.close()

    run(scenario)


def test_bytes_after_the_answer_close_the_connection(run) -> None:
    async def scenario() -> None:
        async with Server(serving(answer(b"ok") + b"HTTP/1.1 200 OK\r\n\r\n")) as srv:
            up = Upstream()
            for _ in range(2):
                assert await (await up.send("GET", srv.url(), [], b"")).read() == b"ok"
            assert srv.connections == 2
            await up.close()

    run(scenario)


# --- faults -----------------------------------------------------------------------------------


def test_nothing_listening_is_unreachable(run) -> None:
    async def scenario() -> None:
        sock = socket.socket()
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
        sock.close()
        up = Upstream()
        error = await failure(up.send("GET", f"http://127.0.0.1:{port}/v1/models", [], b""))
        assert error.kind == "unreachable"
        assert str(error) == f"upstream http://127.0.0.1:{port} unreachable: Connection refused"
        error = await failure(up.send("GET", "http://no-such-host.invalid/v1/models", [], b""))
        assert error.kind == "unreachable"
        await up.close()

    run(scenario)


async def _reset_before(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
    await srv.read_request(reader)
    reset(w)


async def _garbage(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
    await srv.read_request(reader)
    w.write(b"SSH-2.0-OpenSSH_9.2\r\n\r\n")
    await w.drain()
    await asyncio.sleep(1)


@pytest.mark.parametrize(
    ("script", "message"),
    [
        (_reset_before, "failed: [Errno 104] Connection reset by peer"),
        (_garbage, "failed: invalid response"),
    ],
)
def test_a_broken_answer_before_the_head(run, script: Script, message: str) -> None:
    async def scenario() -> None:
        async with Server(script) as srv:
            up = Upstream()
            error = await failure(up.send("GET", srv.url(), [], b""))
            assert error.kind == "broken"
            assert str(error).startswith(f"upstream http://127.0.0.1:{srv.port} {message}")
            await up.close()

    run(scenario)


def test_an_answer_dribbled_byte_by_byte(run) -> None:
    response = (
        b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
        b"x-long: " + b"v" * 300 + b"\r\ntransfer-encoding: chunked\r\n\r\n"
        b"7\r\ndata: 1\r\n7\r\ndata: 2\r\n0\r\n\r\n"
    )

    async def scenario() -> None:
        async def dribble(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
            while await srv.read_request(reader) is not None:
                for i in range(len(response)):
                    w.write(response[i : i + 1])
                    await w.drain()
                    await asyncio.sleep(0)

        async with Server(dribble) as srv:
            up = Upstream()
            for _ in range(2):
                resp = await up.send("POST", srv.url(), [], b"{}")
                assert resp.headers == [
                    (b"content-type", b"text/event-stream"),
                    (b"x-long", b"v" * 300),
                ]
                assert b"".join([c async for c in resp.chunks()]) == b"data: 1data: 2"
            assert srv.connections == 1
            await up.close()

    run(scenario)


def test_an_endless_head_is_refused(run) -> None:
    async def scenario() -> None:
        async def endless(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            w.write(b"HTTP/1.1 200 OK\r\n")
            for _ in range(2000):
                w.write(b"x-more: " + b"a" * 1000 + b"\r\n")
                await w.drain()

        async with Server(endless) as srv:
            up = Upstream()
            error = await failure(up.send("GET", srv.url(), [], b""))
            assert error.kind == "broken" and "an answer head over 1048576 bytes" in str(error)
            await up.close()

    run(scenario)


def _body_fault(first: bytes, then: bytes = b"", how: str = "close") -> Script:
    async def script(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        w.write(first)
        await w.drain()
        await asyncio.sleep(0.05)
        w.write(then)
        await w.drain()
        await asyncio.sleep(0.05)
        if how == "reset":
            reset(w)
        elif how == "wait":
            await asyncio.sleep(5)

    return script


CHUNKED = (
    b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n\r\n"
)
LENGTH = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n"


@pytest.mark.parametrize(
    ("script", "message", "first"),
    [
        (_body_fault(LENGTH + b'{"id": "x", "usage":'), INCOMPLETE, [b'{"id": "x", "usage":']),
        (_body_fault(LENGTH + b'{"id": "x"', b", ", "reset"), INCOMPLETE, [b'{"id": "x"', b", "]),
        (
            _body_fault(CHUNKED + b"7\r\ndata: 1\r\n", b"7\r\ndata: 2\r\n"),
            INCOMPLETE,
            [b"data: 1", b"data: 2"],
        ),
        (
            _body_fault(CHUNKED + b"7\r\ndata: 1\r\n", b"zz\r\nxx\r\n", "wait"),
            "upstream answer broken: Invalid character in chunk size",
            [b"data: 1"],
        ),
    ],
    ids=["cut-length", "reset", "cut-chunked", "bad-chunk"],
)
@pytest.mark.parametrize("reader", ["read", "chunks"])
def test_a_broken_body(run, script: Script, message: str, first: list[bytes], reader: str) -> None:
    async def scenario() -> None:
        async with Server(script) as srv:
            up = Upstream(Timeouts(idle=3))
            resp = await up.send("POST", srv.url(), [], b"{}")
            assert resp.status == 200
            got: list[bytes] = []
            with pytest.raises(UpstreamError) as info:
                if reader == "read":
                    await resp.read()
                else:
                    async for chunk in resp.chunks():
                        got.append(chunk)
            assert info.value.kind == "broken" and str(info.value) == message
            if reader == "chunks":  # what came before the fault was handed on
                assert got == first
            await up.close()

    run(scenario)


# --- timeouts ---------------------------------------------------------------------------------


def _silent_after_head(head: bytes | None) -> Script:
    async def script(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
        await srv.read_request(reader)
        if head is not None:
            w.write(head)
            await w.drain()
        await asyncio.sleep(10)

    return script


def test_no_head_within_first_byte_is_a_timeout(run) -> None:
    async def scenario() -> None:
        async with Server(_silent_after_head(None)) as srv:
            up = Upstream()
            loop = asyncio.get_running_loop()
            began = loop.time()
            error = await failure(
                up.send("POST", srv.url(), [], b"{}", timeouts=Timeouts(first_byte=0.2))
            )
            assert 0.15 < loop.time() - began < 1
            assert error.kind == "timeout"
            assert str(error) == f"upstream http://127.0.0.1:{srv.port} sent no answer within 0.2s"
            error = await failure(
                up.send("POST", srv.url(), [], b"{}", 0.2, Timeouts(first_byte=5))
            )
            assert str(error) == (
                f"upstream http://127.0.0.1:{srv.port} timed out (route timeout 0.2s)"
            )
            await until(lambda: srv.ended == 0 and srv.connections == 2)
            await up.close()

    run(scenario)


def test_the_route_timeout_bounds_the_body_too(run) -> None:
    async def scenario() -> None:
        async def trickle(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            w.write(CHUNKED)
            for _ in range(100):
                w.write(b"1\r\nx\r\n")
                await w.drain()
                await asyncio.sleep(0.05)

        async with Server(trickle) as srv:
            up = Upstream()
            resp = await up.send("POST", srv.url(), [], b"{}", 0.4, Timeouts(idle=0.2))
            with pytest.raises(UpstreamError) as info:
                async for _ in resp.chunks():
                    pass
            assert info.value.kind == "timeout" and "route timeout 0.4s" in str(info.value)
            await up.close()

    run(scenario)


@pytest.mark.parametrize("reader", ["read", "chunks"])
def test_silence_between_chunks_is_a_timeout(run, reader: str) -> None:
    async def scenario() -> None:
        script = _silent_after_head(CHUNKED + b"7\r\ndata: 1\r\n")
        async with Server(script) as srv:
            up = Upstream()
            resp = await up.send("POST", srv.url(), [], b"{}", timeouts=Timeouts(idle=0.2))
            loop = asyncio.get_running_loop()
            began = loop.time()
            with pytest.raises(UpstreamError) as info:
                if reader == "read":
                    await resp.read()
                else:
                    async for chunk in resp.chunks():
                        assert chunk == b"data: 1"
                        began = loop.time()
            assert 0.15 < loop.time() - began < 1
            assert info.value.kind == "timeout"
            assert str(info.value) == "upstream sent nothing for 0.2s"
            await up.close()

    run(scenario)


@pytest.mark.parametrize("reader", ["read", "chunks"])
def test_a_steady_stream_longer_than_idle_is_fine(run, reader: str) -> None:
    async def scenario() -> None:
        async def steady(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            w.write(CHUNKED)
            for _ in range(12):
                w.write(b"1\r\nx\r\n")
                await w.drain()
                await asyncio.sleep(0.05)
            w.write(b"0\r\n\r\n")
            await w.drain()

        async with Server(steady) as srv:
            up = Upstream()
            resp = await up.send("POST", srv.url(), [], b"{}", timeouts=Timeouts(idle=0.2))
            if reader == "read":
                assert await resp.read() == b"x" * 12
            else:
                assert b"".join([c async for c in resp.chunks()]) == b"x" * 12
            await up.close()

    run(scenario)


def test_a_slow_reader_is_not_a_silent_upstream(run) -> None:
    async def scenario() -> None:
        async def quick(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            w.write(CHUNKED + b"1\r\na\r\n")
            await w.drain()
            await asyncio.sleep(0.05)
            w.write(b"1\r\nb\r\n0\r\n\r\n")
            await w.drain()
            await asyncio.sleep(2)

        async with Server(quick) as srv:
            up = Upstream()
            resp = await up.send("POST", srv.url(), [], b"{}", timeouts=Timeouts(idle=0.1))
            got = b""
            async for chunk in resp.chunks():
                got += chunk
                await asyncio.sleep(0.3)  # slower than idle: only waiting counts
            assert got == b"ab"
            await up.close()

    run(scenario)


def test_no_connection_within_connect_is_a_timeout(run) -> None:
    async def scenario() -> None:
        with unconnectable_port() as port:
            up = Upstream(Timeouts(connect=0.3))
            error = await failure(up.send("GET", f"http://127.0.0.1:{port}/", [], b""))
            assert error.kind == "timeout"
            assert str(error) == f"upstream http://127.0.0.1:{port}: no connection within 0.3s"
            await up.close()

    run(scenario)


# --- flow control -----------------------------------------------------------------------------


def test_a_reader_that_lags_pauses_the_upstream(run) -> None:
    payload = hashlib.sha256(b"seed").digest() * (8 * 1024 * 1024 // 32)  # 8 MiB

    async def scenario() -> None:
        async with Server(serving(answer(payload))) as srv:
            up = Upstream()
            resp = await up.send("GET", srv.url(), [], b"")
            await asyncio.sleep(0.3)  # nobody reads
            assert READ_HIGH < resp.buffered < 4 * READ_HIGH  # buffered: no more than this
            assert srv.writers[0].transport.get_write_buffer_size() > 0  # the server waits
            got = []
            async for chunk in resp.chunks():
                got.append(chunk)
                assert len(chunk) < 4 * READ_HIGH
            assert b"".join(got) == payload
            await up.close()

    run(scenario)


def test_a_large_request_body_is_written_as_the_server_takes_it(run, monkeypatch) -> None:
    body = hashlib.sha256(b"body").digest() * (24 * 1024 * 1024 // 32)  # 24 MiB
    pauses = []
    pause = upstream_module.Connection.pause_writing

    def counted(self: Any) -> None:
        pauses.append(1)
        pause(self)

    monkeypatch.setattr(upstream_module.Connection, "pause_writing", counted)

    async def scenario() -> None:
        async def slow(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
            head = await reader.readuntil(b"\r\n\r\n")
            length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
            digest = hashlib.sha256()
            while length:
                await asyncio.sleep(0.001)
                chunk = await reader.read(min(length, 65536))
                digest.update(chunk)
                length -= len(chunk)
            w.write(answer(digest.hexdigest().encode()))
            await w.drain()
            await srv.read_request(reader)

        async with Server(slow) as srv:
            up = Upstream()
            resp = await up.send("POST", srv.url(), [], body)
            assert await resp.read() == hashlib.sha256(body).hexdigest().encode()
            assert pauses  # the transport asked us to wait, and we did
            await up.close()

    run(scenario)


def test_an_answer_before_the_whole_body_spoils_the_connection(run) -> None:
    async def scenario() -> None:
        async def early(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
            await reader.readuntil(b"\r\n\r\n")
            w.write(answer(b"too large", b"413 Content Too Large"))
            await w.drain()
            await asyncio.sleep(0.5)

        async with Server(early) as srv:
            up = Upstream()
            resp = await up.send("POST", srv.url(), [], b"x" * (64 * 1024 * 1024))
            assert resp.status == 413 and await resp.read() == b"too large"
            await up.close()
            assert srv.connections == 1

    run(scenario)


# --- ending early -----------------------------------------------------------------------------


def test_close_ends_a_read_in_progress_and_the_connection(run) -> None:
    async def scenario() -> None:
        script = _silent_after_head(CHUNKED + b"7\r\ndata: 1\r\n")
        async with Server(script) as srv:
            up = Upstream()
            resp = await up.send("POST", srv.url(), [], b"{}")
            got: list[bytes] = []
            errors: list[UpstreamError] = []

            async def relay() -> None:
                try:
                    async for chunk in resp.chunks():
                        got.append(chunk)
                except UpstreamError as exc:
                    errors.append(exc)

            task = asyncio.ensure_future(relay())
            await until(lambda: bool(got))
            resp.close()
            await asyncio.wait_for(task, 1)
            assert errors and errors[0].kind == "broken"
            await until(lambda: srv.writers[0].transport.is_closing() or srv.ended == 0)
            resp.close()  # again: nothing happens
            await up.close()

    run(scenario)


def test_an_abandoned_stream_closes_its_connection(run) -> None:
    async def scenario() -> None:
        async def script(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            w.write(CHUNKED + b"7\r\ndata: 1\r\n")
            await w.drain()
            await reader.read()  # until the client closes
            srv.ended += 1

        async with Server(script) as srv:
            up = Upstream()
            resp = await up.send("POST", srv.url(), [], b"{}")
            chunks = resp.chunks()
            async for _ in chunks:
                break
            del chunks
            gc.collect()
            await until(lambda: srv.ended == 1)
            await up.close()

    run(scenario)


def test_a_cancelled_request_closes_its_connection(run) -> None:
    async def scenario() -> None:
        async def script(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            await reader.read()
            srv.ended += 1

        async with Server(script) as srv:
            up = Upstream()
            task = asyncio.ensure_future(up.send("POST", srv.url(), [], b"{}"))
            await until(lambda: bool(srv.requests))
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            await until(lambda: srv.ended == 1)
            await up.close()

    run(scenario)


def test_a_made_up_response_is_complete() -> None:
    async def scenario() -> None:
        resp = UpstreamResponse(
            200, [(b"content-type", b"application/json")], "application/json", b"{}"
        )
        assert await resp.read() == b"{}"
        resp = UpstreamResponse(200, [], "text/event-stream", b"data: 1\n\n")
        assert [c async for c in resp.chunks()] == [b"data: 1\n\n"]
        resp.close()

    asyncio.run(scenario())


# --- TLS --------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A self-signed certificate for localhost and 127.0.0.1, made by openssl."""
    openssl = require("openssl")
    folder = tmp_path_factory.mktemp("tls")
    cert, key = folder / "cert.pem", folder / "key.pem"
    subprocess.run(
        [openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
         "-nodes", "-keyout", str(key), "-out", str(cert), "-days", "2", "-subj", "/CN=localhost",
         "-addext", "subjectAltName=DNS:localhost,IP:127.0.0.1"],
        check=True, capture_output=True,
    )  # fmt: skip
    yield cert, key


def test_https_with_a_trusted_certificate(run, certificate: tuple[Path, Path]) -> None:
    cert, key = certificate

    async def scenario() -> None:
        server_side = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        server_side.load_cert_chain(cert, key)
        client_side = ssl.create_default_context(cafile=str(cert))
        async with Server(serving(answer(b"secret")), server_side) as srv:
            up = Upstream(ssl_context=client_side)
            for _ in range(3):
                resp = await up.send("GET", srv.url("/v1/models", "https"), [], b"")
                assert await resp.read() == b"secret"
            assert srv.connections == 1
            assert srv.requests[0][0].startswith(
                b"GET /v1/models HTTP/1.1\r\nHost: localhost:%d\r\n" % srv.port
            )
            await up.close()
            untrusting = Upstream()  # the system's authorities do not know this certificate
            error = await failure(untrusting.send("GET", srv.url("/", "https"), [], b""))
            assert error.kind == "tls" and "certificate verify failed" in str(error)
            await untrusting.close()

    run(scenario)
