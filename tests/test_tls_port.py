"""The TLS port's first-byte look (http/tlsport.py), on the bare server over real sockets.

A client whose ClientHello arrives in pieces (one byte, then the rest) still completes its
handshake, with nothing lost; a plain request gets the 400; a connection that says nothing
is closed after the header timeout, without an answer. The client here drives OpenSSL
through memory buffers, so the test decides exactly how the bytes are cut.
"""

from __future__ import annotations

import asyncio
import json
import socket
import ssl
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import uvloop

from tokengateway.http.server import ConnectionLimits, Server


async def _app(scope, receive, send) -> None:  # type: ignore[no-untyped-def]
    if scope["type"] == "lifespan":
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await send({"type": "lifespan.startup.complete"})
            else:
                await send({"type": "lifespan.shutdown.complete"})
                return
    body = json.dumps({"path": scope["path"], "scheme": scope["scheme"]}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls-port")
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
            "-nodes", "-days", "2", "-subj", "/CN=port.test",
            "-addext", "subjectAltName=DNS:port.test",
            "-keyout", str(folder / "key.pem"), "-out", str(folder / "cert.pem"),
        ],
        check=True, capture_output=True,
    )  # fmt: skip
    return folder / "cert.pem", folder / "key.pem"


class Running:
    def __init__(self, server: Server, loop: asyncio.AbstractEventLoop, thread: threading.Thread):
        self.server, self.loop, self.thread = server, loop, thread

    def stop(self) -> float:
        """Stop gracefully; how long it took."""
        started = time.monotonic()
        self.loop.call_soon_threadsafe(setattr, self.server, "should_exit", True)
        self.thread.join(timeout=15)
        return time.monotonic() - started


@pytest.fixture
def running(certificate: tuple[Path, Path]) -> Iterator[tuple[int, Running]]:
    """The bare server on a TLS socket (uvloop, as `serve` runs it), in its own thread."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    context.load_cert_chain(*certificate)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(64)
    server = Server(_app, ConnectionLimits(header_timeout=0.5))
    loop = uvloop.new_event_loop()
    thread = threading.Thread(
        target=loop.run_until_complete, args=(server.serve([sock], {sock: context}),)
    )
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert time.monotonic() < deadline
        time.sleep(0.01)
    handle = Running(server, loop, thread)
    yield sock.getsockname()[1], handle
    if thread.is_alive():
        handle.stop()


@pytest.fixture
def port(running: tuple[int, Running]) -> int:
    return running[0]


def _read_all(sock: socket.socket) -> bytes:
    out = b""
    try:
        while chunk := sock.recv(65536):
            out += chunk
    except (ConnectionResetError, TimeoutError):
        pass
    return out


def test_a_client_hello_in_pieces_completes_the_handshake(
    port: int, certificate: tuple[Path, Path]
) -> None:
    client = ssl.create_default_context(cafile=str(certificate[0]))
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    tls = client.wrap_bio(incoming, outgoing, server_hostname="port.test")
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        with pytest.raises(ssl.SSLWantReadError):
            tls.do_handshake()
        hello = outgoing.read()
        assert hello[0] == 0x16
        for piece in (hello[:1], hello[1:5], hello[5:]):  # the record header cut too
            sock.sendall(piece)
            time.sleep(0.05)
        while True:
            try:
                tls.do_handshake()
                break
            except ssl.SSLWantReadError:
                sock.sendall(outgoing.read())
                data = sock.recv(65536)
                assert data, "closed during the handshake"
                incoming.write(data)
        tls.write(b"GET /split HTTP/1.1\r\nHost: port.test\r\nConnection: close\r\n\r\n")
        sock.sendall(outgoing.read())
        answer = b""
        while b"\r\n\r\n" not in answer or not answer.endswith(b"}"):
            data = sock.recv(65536)
            if not data:
                break
            incoming.write(data)
            try:
                answer += tls.read(65536)
            except ssl.SSLWantReadError:
                continue
    assert answer.startswith(b"HTTP/1.1 200 "), answer
    assert json.loads(answer.partition(b"\r\n\r\n")[2]) == {"path": "/split", "scheme": "https"}


def test_plain_http_gets_a_400_and_silence_gets_a_close(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /secret HTTP/1.1\r\nHost: port.test\r\n\r\n")
        answer = _read_all(sock)
    assert answer.startswith(b"HTTP/1.1 400 Bad Request\r\n"), answer
    assert b"plain_http_on_https_port" in answer and b"/secret" not in answer

    started = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        assert _read_all(sock) == b""  # nothing sent: closed without an answer
    assert 0.3 < time.monotonic() - started < 5


def test_the_port_serves_many_clients_at_once(port: int, certificate: tuple[Path, Path]) -> None:
    context = ssl.create_default_context(cafile=str(certificate[0]))

    async def one(i: int) -> bytes:
        reader, writer = await asyncio.open_connection(
            "127.0.0.1", port, ssl=context, server_hostname="port.test"
        )
        writer.write(f"GET /{i} HTTP/1.1\r\nHost: port.test\r\nConnection: close\r\n\r\n".encode())
        answer = await reader.read()
        writer.close()
        return answer

    async def run() -> list[bytes]:
        return await asyncio.gather(*(one(i) for i in range(50)))

    answers = asyncio.run(run())
    assert all(a.startswith(b"HTTP/1.1 200 ") for a in answers)
    assert {json.loads(a.partition(b"\r\n\r\n")[2])["path"] for a in answers} == {
        f"/{i}" for i in range(50)
    }


def test_an_idle_tls_client_does_not_hold_the_stop(
    running: tuple[int, Running], certificate: tuple[Path, Path]
) -> None:
    """A client that keeps its connection after an answer and never reads again: the stop
    sends close_notify, waits a second for the reply, then drops the connection, instead
    of waiting the whole graceful timeout (10 s)."""
    port, server = running
    context = ssl.create_default_context(cafile=str(certificate[0]))
    with (
        socket.create_connection(("127.0.0.1", port), timeout=10) as raw,
        context.wrap_socket(raw, server_hostname="port.test") as tls,
    ):
        tls.sendall(b"GET /kept HTTP/1.1\r\nHost: port.test\r\n\r\n")
        assert tls.recv(65536).startswith(b"HTTP/1.1 200 ")
        took = server.stop()  # the client holds its connection, reading nothing
    assert took < 4, took
