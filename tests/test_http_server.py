"""The gateway's own HTTP/1.1 server (http/server.py) with small ASGI apps, over real
sockets on loopback: what the apps are given (scope, receive, send), how answers are framed,
keep-alive and pipelining, flow control, errors, timeouts, the connection cap, the lifespan,
graceful stops and signals. The server here is given the gateway's error envelope, as
`make_server` gives it (OpenAI's); without one it answers plain JSON. The defences against hostile clients are also checked end to end
through a real gateway in test_hardening_http.py."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest
import uvloop

from tokengateway.dataplane.errors import http_error_body
from tokengateway.http import server as connections
from tokengateway.http.asgi import RequestAborted, read_body
from tokengateway.http.server import ConnectionLimits, Server, plain_error_body
from tokengateway.runtime.serve import bind_socket

# --- a server in a thread -------------------------------------------------------------------


@dataclass
class Running:
    server: Server
    ports: list[int]
    loop: asyncio.AbstractEventLoop
    thread: threading.Thread
    errors: list[BaseException] = field(default_factory=list)

    @property
    def port(self) -> int:
        return self.ports[0]

    def connect(self, index: int = 0, timeout: float = 5.0) -> Client:
        return Client(socket.create_connection(("127.0.0.1", self.ports[index]), timeout=timeout))

    def stop(self, timeout: float = 20.0) -> float:
        """Ask the server to stop, as a signal would; how long it took."""
        start = time.monotonic()
        if self.thread.is_alive():
            with contextlib.suppress(RuntimeError):  # the loop is closed already
                self.loop.call_soon_threadsafe(setattr, self.server, "should_exit", True)
            self.thread.join(timeout)
            assert not self.thread.is_alive(), "the server did not stop"
        return time.monotonic() - start


@pytest.fixture
def serve() -> Iterator[Callable[..., Running]]:
    """Start `Server(app, limits)` on loopback sockets, in a thread with its own uvloop, with
    the gateway's error envelope unless `error_body` is given."""
    started: list[Running] = []

    def start(
        app: Any,
        limits: ConnectionLimits | None = None,
        sockets: int = 1,
        error_body: Any = http_error_body,
    ) -> Running:
        socks = [bind_socket("127.0.0.1", 0) for _ in range(sockets)]
        server = Server(app, limits or ConnectionLimits(), error_body=error_body)
        loop = uvloop.new_event_loop()
        running = Running(server, [s.getsockname()[1] for s in socks], loop, None)  # type: ignore[arg-type]

        def run() -> None:
            asyncio.set_event_loop(loop)
            try:
                loop.run_until_complete(server.serve(socks))
            except BaseException as exc:
                running.errors.append(exc)
            finally:
                loop.close()

        running.thread = threading.Thread(target=run, daemon=True)
        running.thread.start()
        deadline = time.monotonic() + 10
        while not server.started:
            if not running.thread.is_alive():
                raise RuntimeError(f"the server did not start: {running.errors}")
            assert time.monotonic() < deadline, "the server did not start"
            time.sleep(0.01)
        started.append(running)
        return running

    yield start
    for running in started:
        running.stop()


# --- a raw HTTP client ------------------------------------------------------------------------


@dataclass
class Response:
    status: int
    reason: str
    headers: list[tuple[bytes, bytes]]
    body: bytes
    #: the chunked body ended with its last chunk
    complete: bool = True

    def header(self, name: bytes) -> bytes | None:
        values = [v for k, v in self.headers if k == name]
        return values[0] if values else None

    def error(self) -> dict:
        doc = json.loads(self.body)
        assert set(doc["error"]) == {"message", "type", "param", "code"}, doc
        return doc["error"]


class Client:
    """A socket and what it received but did not parse yet (pipelined answers)."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.buf = b""

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc: object) -> None:
        self.sock.close()

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def _more(self) -> bytes:
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed; unparsed: {self.buf[:200]!r}")
        self.buf += chunk
        return chunk

    def _until(self, marker: bytes) -> bytes:
        while marker not in self.buf:
            self._more()
        out, _, self.buf = self.buf.partition(marker)
        return out

    def _exactly(self, size: int) -> bytes:
        while len(self.buf) < size:
            self._more()
        out, self.buf = self.buf[:size], self.buf[size:]
        return out

    def response(self, head_only: bool = False, timeout: float = 5.0) -> Response:
        self.sock.settimeout(timeout)
        raw = self._until(b"\r\n\r\n")
        lines = raw.split(b"\r\n")
        version, status, reason = lines[0].split(b" ", 2)  # reason: maybe empty, not absent
        assert version == b"HTTP/1.1", lines[0]
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            headers.append((name.strip().lower(), value.strip()))
        r = Response(int(status), reason.decode(), headers, b"")
        code = r.status
        if head_only or code in (204, 304) or 100 <= code < 200:
            return r
        if r.header(b"transfer-encoding") == b"chunked":
            body = b""
            try:
                while True:
                    size = int(self._until(b"\r\n"), 16)
                    if size == 0:
                        self._until(b"\r\n")  # no trailers from this server
                        break
                    body += self._exactly(size)
                    assert self._exactly(2) == b"\r\n"
            except EOFError:
                r.complete = False
            r.body = body
        elif r.header(b"content-length") is not None:
            r.body = self._exactly(int(r.header(b"content-length") or 0))
        else:  # delimited by the end of the connection
            try:
                while True:
                    self._more()
            except EOFError:
                pass
            r.body, self.buf = self.buf, b""
        return r

    def closed(self, within: float = 3.0) -> bool:
        """True once the server closed (end of file or reset) within `within` seconds."""
        deadline = time.monotonic() + within
        try:
            while True:
                self.sock.settimeout(max(0.01, deadline - time.monotonic()))
                if not self.sock.recv(65536):
                    return True
        except (ConnectionResetError, BrokenPipeError):
            return True
        except TimeoutError:
            return False


def request(
    method: str = "GET",
    path: str = "/",
    *headers: str,
    body: bytes | None = None,
    version: str = "1.1",
) -> bytes:
    lines = [f"{method} {path} HTTP/{version}", "Host: test", *headers]
    if body is not None:
        lines.append(f"Content-Length: {len(body)}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


async def answer(send: Any, status: int = 200, body: bytes = b"ok", *headers: Any) -> None:
    raw = [(b"content-type", b"text/plain"), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": status, "headers": raw + list(headers)})
    await send({"type": "http.response.body", "body": body})


async def echo(scope: Any, receive: Any, send: Any) -> None:
    """Answers with the request's body (the whole of it)."""
    if scope["type"] != "http":
        return
    body = await read_body(receive, 1 << 30)
    await answer(send, 200, body or b"")


# --- what the app is given --------------------------------------------------------------------


def test_the_scope_describes_the_request_and_the_connection(serve) -> None:
    scopes: list[dict] = []

    async def app(scope, receive, send):
        if scope["type"] == "http":
            scopes.append(dict(scope))
            await answer(send)

    running = serve(app, sockets=2)
    with running.connect() as c:
        c.send(request("GET", "/a%20b/c%2Fd?x=1&y=%20", "X-Twice: 1", "X-Case: AbC", "X-Twice: 2"))
        assert c.response().status == 200
        c.send(request("POST", "http://example.com/p/q?r=1", body=b"{}", version="1.0"))
        assert c.response().status == 200
        client = c.sock.getsockname()
    with running.connect(1) as c:
        c.send(request("GET", "/other"))
        assert c.response().status == 200

    first, second, third = scopes
    assert first["type"] == "http"
    assert first["asgi"] == {"version": "3.0", "spec_version": "2.3"}
    assert first["http_version"] == "1.1"
    assert first["method"] == "GET"
    assert first["scheme"] == "http"
    # normalised, and still percent-encoded (unlike ASGI's decoded path): "%2F" stays a
    # character of its segment for routing and upstream alike (http/target.py)
    assert first["path"] == "/a%20b/c%2Fd"
    assert first["raw_path"] == b"/a%20b/c%2Fd"
    assert first["query_string"] == b"x=1&y=%20"
    assert first["root_path"] == ""
    assert first["headers"] == [
        (b"host", b"test"),
        (b"x-twice", b"1"),
        (b"x-case", b"AbC"),
        (b"x-twice", b"2"),
    ]
    assert tuple(first["client"]) == client
    assert tuple(first["server"]) == ("127.0.0.1", running.ports[0])
    # the absolute form, HTTP/1.0
    assert (second["method"], second["path"], second["raw_path"]) == ("POST", "/p/q", b"/p/q")
    assert second["query_string"] == b"r=1"
    assert (b"host", b"example.com") in second["headers"]  # the target's authority
    assert second["http_version"] == "1.0"
    # the server address is the socket the connection came in on (the admin API's dispatch)
    assert tuple(third["server"]) == ("127.0.0.1", running.ports[1])


def test_the_body_comes_in_parts_with_its_declared_length(serve) -> None:
    seen: list[Any] = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        seen.append(("length", receive.content_length))
        while True:
            message = await receive()
            seen.append((message["type"], message.get("body"), message.get("more_body")))
            if not message.get("more_body"):
                break
        await answer(send)

    running = serve(app)
    with running.connect() as c:
        c.send(request("POST", "/", "Content-Length: 10"))
        time.sleep(0.2)
        c.send(b"hello")
        time.sleep(0.2)
        c.send(b"world")
        assert c.response().status == 200
    assert seen == [
        ("length", 10),
        ("http.request", b"hello", True),
        ("http.request", b"world", False),
    ]

    # chunked: no declared length, and the trailers are not headers
    seen.clear()
    scopes = []

    async def chunked(scope, receive, send):
        if scope["type"] == "http":
            scopes.append(scope)
            await app(scope, receive, send)

    running = serve(chunked)
    with running.connect() as c:
        c.send(request("POST", "/", "Transfer-Encoding: chunked") + b"3\r\nabc\r\n")
        time.sleep(0.2)
        c.send(b"2\r\nde\r\n0\r\nX-Trailer: 1\r\n\r\n")
        assert c.response().status == 200
    assert seen[0] == ("length", None)
    assert b"".join(m[1] for m in seen[1:]) == b"abcde"
    assert seen[-1][2] is False
    assert (b"x-trailer", b"1") not in scopes[0]["headers"]

    # no body at all: one empty message
    seen.clear()
    with running.connect() as c:
        c.send(request("GET", "/"))
        assert c.response().status == 200
    assert seen == [("length", None), ("http.request", b"", False)]


def test_receive_after_the_body_waits_until_the_client_leaves(serve) -> None:
    """What the gateway's stream relay relies on: `receive()` after the whole body never
    completes while the answer goes on, and completes as soon as the client disconnects."""
    notes: dict[str, Any] = {}
    done = threading.Event()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await read_body(receive, 1000)
        gone = asyncio.ensure_future(receive())
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await asyncio.sleep(0.3)
        notes["done while streaming"] = gone.done()
        start = time.monotonic()
        notes["message"] = await asyncio.wait_for(gone, 5)
        notes["after"] = time.monotonic() - start
        await send({"type": "http.response.body", "body": b"ignored", "more_body": True})
        done.set()

    running = serve(app)
    with running.connect() as c:
        c.send(request("POST", "/", body=b"{}"))
        c.sock.settimeout(5)
        while b"first" not in c.buf:
            c._more()
        time.sleep(0.5)
    assert done.wait(5)
    assert notes["done while streaming"] is False
    assert notes["message"] == {"type": "http.disconnect"}
    assert notes["after"] < 1.0

    # after a complete answer, receive says the request is over at once
    after: list[Any] = []

    async def finished(scope, receive, send):
        if scope["type"] == "http":
            await read_body(receive, 1000)
            await answer(send)
            after.append(await asyncio.wait_for(receive(), 1))

    running = serve(finished)
    with running.connect() as c:
        c.send(request("GET", "/"))
        assert c.response().status == 200
        time.sleep(0.2)
    assert after == [{"type": "http.disconnect"}]


def test_a_client_that_leaves_in_the_middle_of_the_body_aborts_the_request(serve) -> None:
    outcome: list[str] = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        try:
            await read_body(receive, 1 << 20)
        except RequestAborted as exc:
            outcome.append(f"{exc} (timed out: {exc.timed_out})")
            raise
        outcome.append("complete")

    running = serve(app)
    with running.connect() as c:
        c.send(request("POST", "/", "Content-Length: 100") + b"x" * 10)
        time.sleep(0.2)
    deadline = time.monotonic() + 3
    while not outcome and time.monotonic() < deadline:
        time.sleep(0.02)
    assert len(outcome) == 1 and "disconnected" in outcome[0]
    assert outcome[0].endswith("(timed out: False)")


def test_expect_100_continue(serve) -> None:
    def app_for(limit: int):
        async def app(scope, receive, send):
            if scope["type"] != "http":
                return
            body = await read_body(receive, limit)
            if body is None:
                await answer(send, 413, b"too large")
            else:
                await answer(send, 200, body)

        return app

    running = serve(app_for(1000))
    with running.connect() as c:
        c.send(request("POST", "/", "Expect: 100-continue", "Content-Length: 5"))
        c.sock.settimeout(3)
        assert c._until(b"\r\n\r\n") == b"HTTP/1.1 100 Continue"
        c.send(b"hello")
        r = c.response()
        assert (r.status, r.body) == (200, b"hello")

    # an app that answers without reading: no 100, and the connection closes after it
    running = serve(app_for(3))
    with running.connect() as c:
        c.send(request("POST", "/", "Expect: 100-continue", "Content-Length: 5"))
        r = c.response()
        assert r.status == 413
        assert r.header(b"connection") == b"close"
        assert c.closed()


# --- how answers are framed -------------------------------------------------------------------


async def shapes(scope: Any, receive: Any, send: Any) -> None:
    if scope["type"] != "http":
        return
    await read_body(receive, 1 << 20)
    path = scope["path"]
    if path == "/length":
        await answer(send, 429, b"limited")
    elif path == "/stream":
        await send({"type": "http.response.start", "status": 200, "headers": []})
        for part in (b"one ", b"", b"two ", b"three"):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/empty":
        await send({"type": "http.response.start", "status": 204, "headers": []})
        await send({"type": "http.response.body", "body": b""})
    elif path == "/dated":
        await answer(send, 200, b"ok", (b"Date", b"yesterday"))
    elif path == "/close":
        await answer(send, 200, b"ok", (b"connection", b"close"))
    elif path == "/odd-status":
        await answer(send, 299, b"ok")


def test_answers_are_framed_by_length_chunks_or_the_close(serve) -> None:
    running = serve(shapes)
    with running.connect() as c:
        # a Content-Length from the app: the body as it is
        c.send(request("GET", "/length"))
        r = c.response()
        assert (r.status, r.reason, r.body) == (429, "Too Many Requests", b"limited")
        assert r.header(b"transfer-encoding") is None
        assert r.header(b"date") is not None
        assert r.header(b"server") is None
        assert r.header(b"connection") is None
        # none: chunked, each part a chunk (the empty one is not the last chunk)
        c.send(request("GET", "/stream"))
        r = c.response()
        assert (r.status, r.body) == (200, b"one two three")
        assert r.header(b"transfer-encoding") == b"chunked"
        assert r.header(b"content-length") is None
        # HEAD: the head alone, and the connection goes on (no body bytes were written)
        c.send(request("HEAD", "/length"))
        r = c.response(head_only=True)
        assert (r.status, r.header(b"content-length")) == (429, b"7")
        c.send(request("HEAD", "/stream"))
        r = c.response(head_only=True)
        assert r.status == 200 and r.header(b"transfer-encoding") is None
        # 204: no body, no framing
        c.send(request("GET", "/empty"))
        r = c.response()
        assert r.status == 204 and r.header(b"transfer-encoding") is None
        # the app's Date stays the only one
        c.send(request("GET", "/dated"))
        r = c.response()
        assert [v for k, v in r.headers if k == b"date"] == [b"yesterday"]
        c.send(request("GET", "/odd-status"))
        r = c.response()
        assert (r.status, r.reason) == (299, "")
        # every answer so far on this one connection: kept alive
        c.send(request("GET", "/length"))
        assert c.response().status == 429
        # the app closes
        c.send(request("GET", "/close"))
        r = c.response()
        assert [v for k, v in r.headers if k == b"connection"] == [b"close"]
        assert c.closed()

    # HTTP/1.0: a stream is delimited by the close, keep-alive only when asked
    with running.connect() as c:
        c.send(request("GET", "/stream", version="1.0"))
        r = c.response()
        assert r.body == b"one two three"
        assert r.header(b"transfer-encoding") is None
        assert r.header(b"connection") == b"close"
    with running.connect() as c:
        c.send(request("GET", "/length", "Connection: keep-alive", version="1.0"))
        r = c.response()
        assert r.header(b"connection") == b"keep-alive"
        c.send(request("GET", "/length", version="1.0"))
        r = c.response()
        assert r.header(b"connection") == b"close"
        assert c.closed()

    # the client closes
    with running.connect() as c:
        c.send(request("GET", "/length", "Connection: close"))
        r = c.response()
        assert r.header(b"connection") == b"close"
        assert c.closed()


def test_pipelined_requests_are_answered_in_order(serve) -> None:
    events: list[str] = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        path = scope["path"]
        events.append(f"start {path}")
        if path == "/slow":
            await asyncio.sleep(0.3)
        await answer(send, 200, path.encode())
        events.append(f"answered {path}")

    running = serve(app)
    with running.connect() as c:
        c.send(request("GET", "/slow") + request("GET", "/fast") + request("GET", "/third"))
        assert [c.response().body for _ in range(3)] == [b"/slow", b"/fast", b"/third"]
    assert events.index("answered /slow") < events.index("start /fast")


def test_an_answer_before_the_body_closes_the_connection_after_it(serve) -> None:
    async def app(scope, receive, send):
        if scope["type"] == "http":
            await answer(send, 404, b"no such thing")

    running = serve(app)
    # the body is still coming: close after the answer, reading (and dropping) what comes
    with running.connect() as c:
        c.send(request("POST", "/", "Content-Length: 1000000") + b"x" * 1000)
        r = c.response()
        assert r.status == 404
        assert r.header(b"connection") == b"close"
        c.send(b"x" * 100_000)  # no reset: the server lingers, reading
        assert c.closed(within=connections.LINGER + 2)

    # the body is all there, unread: nothing to lose, the connection goes on
    with running.connect() as c:
        c.send(request("POST", "/", body=b"x" * 1000))
        r = c.response()
        assert r.status == 404 and r.header(b"connection") is None
        c.send(request("GET", "/"))
        assert c.response().status == 404


# --- errors -----------------------------------------------------------------------------------


def test_app_errors_are_500_or_a_close_never_a_traceback(serve, caplog) -> None:
    caplog.set_level(logging.INFO, logger="tokengateway.connections")

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        path = scope["path"]
        if path == "/before":
            raise ValueError("secret detail")
        if path == "/after":
            await send({"type": "http.response.start", "status": 200, "headers": []})
            await send({"type": "http.response.body", "body": b"partial", "more_body": True})
            raise ValueError("secret detail")
        if path == "/nothing":
            return
        if path == "/aborted":
            raise RequestAborted("the client left")
        if path == "/bad-header":
            await answer(send, 200, b"ok", (b"x-evil", b"a\r\nx-injected: 1"))
        await answer(send)

    running = serve(app)
    for path in ("/before", "/nothing", "/bad-header"):
        with running.connect() as c:
            c.send(request("GET", path))
            r = c.response()
            assert r.status == 500, path
            assert r.error()["code"] == "internal_error"
            assert r.error()["type"] == "server_error"
            assert b"secret" not in r.body and b"Traceback" not in r.body
            assert r.header(b"x-injected") is None
            assert c.closed()
    with running.connect() as c:
        c.send(request("GET", "/after"))
        r = c.response()
        assert (r.status, r.body, r.complete) == (200, b"partial", False)
    with running.connect() as c:
        c.send(request("GET", "/aborted"))
        assert c.closed()
        with pytest.raises((EOFError, ConnectionResetError)):
            c.response()
    with running.connect() as c:  # the server goes on
        c.send(request("GET", "/"))
        assert c.response().status == 200
    logged = caplog.text
    assert logged.count("ValueError: secret detail") == 2  # the tracebacks: /before, /after
    assert "/nothing" in logged
    assert "the client left" not in logged


def test_a_body_that_stops_coming_gets_408(serve) -> None:
    aborted: list[RequestAborted] = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        try:
            body = await read_body(receive, 1 << 20)
        except RequestAborted as exc:
            aborted.append(exc)
            raise
        await answer(send, 200, body or b"")

    running = serve(app, ConnectionLimits(body_timeout=0.5))
    with running.connect() as c:
        c.send(request("POST", "/", "Content-Length: 10") + b"abc")
        start = time.monotonic()
        r = c.response()
        assert 0.4 < time.monotonic() - start < 2
        assert r.status == 408
        assert r.error()["code"] == "request_timeout"
        assert r.header(b"connection") == b"close"
        assert c.closed()
    # the app hears of it on the server's loop, maybe a moment after the 408 went out
    deadline = time.monotonic() + 5
    while not aborted and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(aborted) == 1 and aborted[0].timed_out  # the app tells it from a client gone

    # a body that keeps coming, each part in time, takes as long as it takes
    with running.connect() as c:
        c.send(request("POST", "/", "Content-Length: 6"))
        for part in (b"ab", b"cd", b"ef"):
            time.sleep(0.3)
            c.send(part)
        assert c.response().body == b"abcdef"


def test_request_errors_are_answered_in_openais_envelope(serve) -> None:
    running = serve(echo, ConnectionLimits(header_timeout=0.5, max_header_bytes=1024))
    cases = {
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n": (
            400,
            "invalid_request",
        ),
        request("GET", "/", "X-Pad: " + "a" * 2000): (431, "request_header_too_large"),
        b"GET / HTTP/1.1\r\nHost: x\r\n": (408, "request_timeout"),
    }
    for payload, (status, code) in cases.items():
        with running.connect() as c:
            c.send(payload)
            r = c.response()
            assert (r.status, r.error()["code"]) == (status, code), payload
            assert r.header(b"connection") == b"close"
            assert c.closed()
    # silence from the start: closed without a word
    with running.connect() as c:
        assert c.closed(within=2)
        assert c.buf == b""


def test_without_an_envelope_the_servers_own_answers_are_plain_json(serve) -> None:
    """The HTTP server knows nothing of OpenAI: its own answers take the envelope its owner
    gives (`error_body`), plain `{"error": {"message", "code"}}` when none is given."""

    async def app(scope, receive, send):
        if scope["type"] == "http":
            raise ValueError("secret detail")

    assert Server(app).error_body is plain_error_body  # the default
    running = serve(app, error_body=plain_error_body)
    bad_head = (
        b"GET / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n"
    )
    for payload, status, code in (
        (bad_head, 400, "invalid_request"),
        (request("GET", "/"), 500, "internal_error"),
    ):
        with running.connect() as c:
            c.send(payload)
            r = c.response()
            assert r.status == status
            assert r.header(b"content-type") == b"application/json"
            doc = json.loads(r.body)
            assert set(doc) == {"error"} and set(doc["error"]) == {"message", "code"}, doc
            assert doc["error"]["code"] == code
            assert doc["error"]["message"]
            assert c.closed()

    seen: list[tuple[int, str, str]] = []

    def mine(status: int, message: str, code: str) -> bytes:
        seen.append((status, message, code))
        return b'{"oops": 1}'

    running = serve(app, error_body=mine)
    with running.connect() as c:
        c.send(request("GET", "/"))
        r = c.response()
        assert (r.status, r.body) == (500, b'{"oops": 1}')
        assert r.header(b"content-length") == b"11"
    assert seen == [(500, "internal gateway error", "internal_error")]


def test_an_upgrade_is_answered_as_plain_http_then_closed(serve) -> None:
    running = serve(echo)
    with running.connect() as c:
        c.send(
            request("GET", "/", "Connection: Upgrade", "Upgrade: websocket")
            + request("GET", "/hidden")
        )
        r = c.response()
        assert r.status == 200
        assert r.header(b"connection") == b"close"
        assert c.closed()
        assert b"HTTP/1.1" not in c.buf


# --- flow control -----------------------------------------------------------------------------


def test_reading_pauses_while_the_app_does_not_take_the_body(serve) -> None:
    size = 32 << 20
    release = threading.Event()
    got: list[int] = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        while not release.is_set():
            await asyncio.sleep(0.01)
        body = await read_body(receive, size)
        got.append(len(body or b""))
        await answer(send, 200, str(len(body or b"")).encode())

    running = serve(app)
    with running.connect() as c:
        c.send(request("POST", "/", f"Content-Length: {size}"))
        c.sock.setblocking(False)
        sent = 0
        chunk = b"x" * 65536
        stalled_since = None
        while sent < size:
            try:
                sent += c.sock.send(chunk[: size - sent])
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 0.5:
                    break
                time.sleep(0.01)
        assert sent < size // 2, f"{sent} bytes accepted while the app read nothing"
        buffered = [conn.reading.buffered for conn in running.server.connections if conn.reading]
        assert buffered and max(buffered) < 1 << 20, buffered
        release.set()
        c.sock.setblocking(True)
        c.sock.sendall(b"x" * (size - sent))
        r = c.response(timeout=30)
        assert r.body == str(size).encode()
    assert got == [size]


def test_a_slow_reader_that_keeps_reading_gets_all_of_a_large_answer(serve) -> None:
    """While the kernel's send buffer (megabytes) drains, the server's own buffer does not
    move: a steady reader must not be taken for one that reads nothing."""
    size = 6 << 20
    finished: list[str] = []

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await send({"type": "http.response.start", "status": 200, "headers": []})
        part = b"y" * (256 << 10)
        for _ in range(size // len(part)):
            await send({"type": "http.response.body", "body": part, "more_body": True})
        await send({"type": "http.response.body", "body": b""})
        finished.append(scope["path"])

    running = serve(app, ConnectionLimits(body_timeout=0.5))
    # at most 64 KiB every 0.05 s: slow (seconds in all), never stuck for the body timeout
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    sock.connect(("127.0.0.1", running.port))
    with Client(sock) as c:
        c.send(request("GET", "/slow"))
        c.sock.settimeout(5)
        total = 0
        start = time.monotonic()
        while not c.buf.endswith(b"0\r\n\r\n"):
            got = c._more()
            total += len(got)
            time.sleep(0.05 if len(got) > 16384 else 0.005)
        assert total > size
        assert time.monotonic() - start > 2  # much longer than the body timeout
    # one that reads nothing is cut off after the body timeout, and the app goes on
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.connect(("127.0.0.1", running.port))
    with Client(sock) as c:
        c.send(request("GET", "/stuck"))
        time.sleep(2.5)
        received = 0
        try:
            c.sock.settimeout(3)
            while chunk := c.sock.recv(1 << 20):
                received += len(chunk)
        except ConnectionResetError:
            pass
        assert received < size
    deadline = time.monotonic() + 3
    while "/stuck" not in finished and time.monotonic() < deadline:
        time.sleep(0.05)
    assert finished == ["/slow", "/stuck"]


# --- connections --------------------------------------------------------------------------------


def test_idle_keep_alive_connections_are_closed(serve, monkeypatch) -> None:
    monkeypatch.setattr(connections, "KEEP_ALIVE", 0.6)
    running = serve(echo)
    # a connection in use stays open, however long in all
    with running.connect() as c:
        for _ in range(5):
            c.send(request("GET", "/"))
            assert c.response().status == 200
            time.sleep(0.3)
        # then idle: closed silently
        start = time.monotonic()
        assert c.closed(within=3)
        assert 0.2 < time.monotonic() - start < 2
        assert c.buf == b""


def test_the_connection_cap_is_per_listening_socket(serve, caplog) -> None:
    running = serve(echo, ConnectionLimits(max_connections=2), sockets=2)
    first, second = running.connect(), running.connect()
    try:
        for c in (first, second):
            c.send(request("GET", "/"))
            assert c.response().status == 200
        with running.connect() as extra:
            r = extra.response()
            assert r.status == 503
            assert r.error()["code"] == "too_many_connections"
            assert extra.closed()
        with running.connect(1) as other:  # the other socket has its own count
            other.send(request("GET", "/"))
            assert other.response().status == 200
        first.sock.close()
        time.sleep(0.2)
        with running.connect() as again:
            again.send(request("GET", "/"))
            assert again.response().status == 200
    finally:
        first.sock.close()
        second.sock.close()
    assert "refusing new ones" in caplog.text


# --- lifespan, stopping, signals --------------------------------------------------------------


def test_lifespan_and_a_graceful_stop(serve) -> None:
    events: list[str] = []

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await asyncio.sleep(0.2)
                    events.append("startup")
                    await send({"type": "lifespan.startup.complete"})
                else:
                    events.append("shutdown")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        events.append(f"request {scope['path']}")
        if scope["path"] == "/slow":
            await asyncio.sleep(1.0)
        await answer(send, 200, scope["path"].encode())
        events.append(f"answered {scope['path']}")

    running = serve(app)
    assert events == ["startup"]
    idle = running.connect()
    idle.send(request("GET", "/quick"))
    assert idle.response().status == 200
    busy = running.connect()
    busy.send(request("GET", "/slow"))
    time.sleep(0.2)
    stopper = threading.Thread(target=running.stop)
    stopper.start()
    try:
        assert idle.closed(within=1)  # idle: closed at once
        r = busy.response()  # in flight: finished, then closed
        assert (r.status, r.body) == (200, b"/slow")
        assert r.header(b"connection") == b"close"
        assert busy.closed()
        stopper.join(10)
        with pytest.raises(OSError):
            socket.create_connection(("127.0.0.1", running.port), timeout=1).close()
    finally:
        idle.sock.close()
        busy.sock.close()
    assert events == [
        "startup",
        "request /quick",
        "answered /quick",
        "request /slow",
        "answered /slow",
        "shutdown",
    ]


def test_a_graceful_stop_is_bounded(serve, monkeypatch) -> None:
    monkeypatch.setattr(connections, "GRACEFUL_TIMEOUT", 0.5)
    cancelled = threading.Event()

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        try:
            await asyncio.sleep(60)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    running = serve(app)
    with running.connect() as c:
        c.send(request("GET", "/forever"))
        time.sleep(0.2)
        assert running.stop() < 3
        assert cancelled.is_set()
        assert c.closed()


def test_a_request_task_is_held_until_it_ends_and_cancelled_before_the_shutdown(serve) -> None:
    """The app's task of a request that still works after its answer is held by the server
    (the event loop keeps only weak references: a task waiting on a future nothing else
    holds would be collected), and a stop cancels it before the lifespan shutdown."""
    import gc

    events: list[str] = []

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                else:
                    events.append("shutdown")
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        await answer(send, 200, b"ok")
        try:  # work after the answer, on a future only this task holds
            await asyncio.get_running_loop().create_future()
        except asyncio.CancelledError:
            events.append("cancelled")
            raise

    running = serve(app)
    with running.connect() as c:
        c.send(request("GET", "/"))
        assert c.response().status == 200
        time.sleep(0.1)
        gc.collect()
        tasks = list(running.server.tasks)
        assert len(tasks) == 1 and not tasks[0].done()
        running.stop()
    assert events == ["cancelled", "shutdown"]
    assert not running.server.tasks


def test_an_app_whose_startup_fails_is_not_served() -> None:
    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            await receive()
            raise RuntimeError("no database")

    sock = bind_socket("127.0.0.1", 0)
    server = Server(app)
    with sock, pytest.raises(RuntimeError, match="startup failed"):
        uvloop.run(server.serve([sock]))
    assert not server.started


SIGNALLED = textwrap.dedent(
    """
    import asyncio, signal, sys, uvloop
    from tokengateway.http.server import Server
    from tokengateway.runtime.serve import bind_socket

    def before(signum, frame):
        print("previous handler", flush=True)

    signal.signal(signal.SIGTERM, before)
    signal.signal(signal.SIGINT, before)

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    print("lifespan shutdown", flush=True)
                    return
        await asyncio.sleep(0.5)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-length", b"4")]})
        await send({"type": "http.response.body", "body": b"done"})

    async def main():
        sock = bind_socket("127.0.0.1", 0)
        server = Server(app)
        task = asyncio.create_task(server.serve([sock]))
        while not server.started:
            await asyncio.sleep(0.01)
        print("port", sock.getsockname()[1], flush=True)
        await task

    uvloop.run(main())
    restored = signal.getsignal(signal.SIGTERM) is before and signal.getsignal(signal.SIGINT) is before
    print("handlers restored", restored, flush=True)
    """
)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_server_gracefully(tmp_path, sig) -> None:
    script = tmp_path / "signalled.py"
    script.write_text(SIGNALLED)
    proc = subprocess.Popen(
        [sys.executable, str(script)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line.startswith("port "), line + (proc.stderr.read() if proc.stderr else "")
        port = int(line.split()[1])
        with Client(socket.create_connection(("127.0.0.1", port), timeout=5)) as c:
            c.send(request("GET", "/"))
            time.sleep(0.2)
            proc.send_signal(sig)
            r = c.response()
            assert (r.status, r.body) == (200, b"done")
        out, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "previous handler" not in out  # the server had the signal, not the old handler
    assert "lifespan shutdown" in out
    assert "handlers restored True" in out
    assert "Traceback" not in err


def test_read_body_refuses_a_declared_oversize_body_before_reading_it() -> None:
    """The server's receive is an `asgi.SizedReceive`: `read_body` reads its declared
    Content-Length by type and answers None (413) without asking for a byte. Any other
    receive is read and counted."""
    from tokengateway.http.asgi import SizedReceive, declared_length, read_body

    class Declared(SizedReceive):
        __slots__ = ("calls", "content_length")

        def __init__(self, content_length: int | None) -> None:
            self.content_length = content_length
            self.calls = 0

        async def __call__(self) -> dict[str, Any]:
            self.calls += 1
            return {"type": "http.request", "body": b"x" * 10, "more_body": False}

    big = Declared(1_000_000)
    assert declared_length(big) == 1_000_000
    assert asyncio.run(read_body(big, 100)) is None
    assert big.calls == 0
    chunked = Declared(None)
    assert asyncio.run(read_body(chunked, 100)) == b"x" * 10 and chunked.calls == 1

    async def plain() -> dict[str, Any]:
        return {"type": "http.request", "body": b"y" * 200, "more_body": False}

    assert declared_length(plain) is None
    assert asyncio.run(read_body(plain, 100)) is None  # counted as it came
    assert issubclass(connections._Cycle, SizedReceive)
