"""A hostile upstream: raw servers on loopback answering what no well-behaved server would
(1xx before the answer, an unsolicited 101, headers named in Connection, transfer and
content codings, impossible status codes, oversize bodies, a connection closed under a
POST, every connection busy). Each case is checked at the client's API and, end to end,
through a gateway: the client gets the honest answer, or a clear 502/503/504 in the OpenAI
envelope, and is charged what it should be. Plus targets that try to name another host:
they never reach a decoy listener."""

from __future__ import annotations

import asyncio
import gzip
import json
import socket
import zlib
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import httpx
import pytest
import uvloop

from tests.conftest import Gateway, chat
from tests.test_gateway import GATEWAY, TOKEN_LIMIT, client, completion, write
from tests.test_upstream_client import Server, answer, failure, serving, until
from tests.test_upstream_faults import ScriptedUpstream, annotated, remaining
from tokengateway.http.client import (
    BadTarget,
    Origin,
    Timeouts,
    Upstream,
    check_target,
    decode_content,
)

LOOPS = {"uvloop": uvloop.new_event_loop, "asyncio": asyncio.new_event_loop}
USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
JSON = b"content-type: application/json\r\n"


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Callable[[], Awaitable[Any]]], Any]:
    def run(scenario: Callable[[], Awaitable[Any]]) -> Any:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as runner:
            return runner.run(scenario())  # type: ignore[arg-type]

    return run


def chunked(*pieces: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces) + b"0\r\n\r\n"


# --- at the client's API ----------------------------------------------------------------------


def test_1xx_answers_are_read_past_to_the_final_one(run) -> None:
    interim = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 102 Processing\r\nx-interim: 1\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nlink: </a>; rel=preload\r\n\r\n"
    )

    async def scenario() -> None:
        async with Server(serving(interim + answer(b"final", headers=b"x-b: 2\r\n"))) as srv:
            up = Upstream()
            for _ in range(2):
                resp = await up.send("POST", srv.url(), [], b"{}")
                assert resp.status == 200 and resp.headers == [(b"x-b", b"2")]
                assert await resp.read() == b"final"
            assert srv.connections == 1  # the connection is sound and reused
            await up.close()

    run(scenario)


def test_an_unsolicited_101_is_refused_and_its_connection_never_reused(run) -> None:
    switch = (
        b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\nconnection: upgrade\r\n\r\n"
    )

    async def scenario() -> None:
        async with Server(serving(switch + b"\x81\x05hello")) as srv:
            up = Upstream()
            for n in (1, 2):
                error = await failure(up.send("POST", srv.url(), [], b"{}"))
                assert error.kind == "invalid"
                assert str(error) == (
                    f"upstream http://127.0.0.1:{srv.port} switched protocols (101) though "
                    "the request asked for no upgrade"
                )
                assert srv.connections == n  # a new connection each time
            await up.close()

    run(scenario)


def test_headers_named_in_connection_and_hop_by_hop_ones_are_not_passed_on(run) -> None:
    headers = (
        b"Connection: X-Secret, keep-alive\r\nconnection: x-other\r\nX-Secret: 1\r\n"
        b"x-other: 2\r\nKeep-Alive: timeout=5\r\nProxy-Authenticate: Basic\r\n"
        b"Upgrade: h2c\r\nTrailer: x-t\r\nx-kept: 3\r\n" + JSON
    )

    async def scenario() -> None:
        async with Server(serving(answer(headers=headers))) as srv:
            up = Upstream()
            resp = await up.send("GET", srv.url(), [], b"")
            assert resp.headers == [(b"x-kept", b"3"), (b"content-type", b"application/json")]
            assert await resp.read() == b'{"ok": true}'
            await up.close()

    run(scenario)


@pytest.mark.parametrize("status", [b"999 Nine", b"099 Low", b"600 Six", b"000 Zero"])
def test_a_status_outside_100_599_is_refused(run, status: bytes) -> None:
    async def scenario() -> None:
        async with Server(serving(answer(status=status))) as srv:
            up = Upstream()
            for n in (1, 2):
                error = await failure(up.send("GET", srv.url(), [], b""))
                code = int(status[:3])
                assert error.kind == "invalid"
                assert str(error).endswith(f"answered with status {code}, outside 100-599")
                assert srv.connections == n  # never reused
            await up.close()

    run(scenario)


def test_no_body_and_no_length_on_204_304_even_if_announced(run) -> None:
    async def scenario() -> None:
        def respond(head: bytes, body: bytes) -> bytes:
            if b"/204" in head:
                return b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n"
            return b"HTTP/1.1 304 Not Modified\r\ncontent-length: 5\r\n\r\n"

        async with Server(serving(respond)) as srv:
            up = Upstream(Timeouts(idle=1))
            for path, status in (("/204", 204), ("/304", 304), ("/204", 204)):
                resp = await up.send("GET", srv.url(path), [], b"")
                assert resp.status == status and resp.headers == []
                assert await resp.read() == b""
            assert srv.connections == 1
            await up.close()

    run(scenario)


def test_a_gzip_transfer_coding_is_decoded(run) -> None:
    """Transfer codings are hop-by-hop: what the client gets is the body itself."""
    text = b'{"usage": {"total_tokens": 7}}' * 50
    coded = gzip.compress(text)

    async def scenario() -> None:
        def respond(head: bytes, body: bytes) -> bytes:
            if b"/deflate" in head:
                return (
                    b"HTTP/1.1 200 OK\r\ntransfer-encoding: deflate, chunked\r\n" + JSON + b"\r\n"
                ) + chunked(zlib.compress(text))
            half = len(coded) // 2
            return (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip, chunked\r\n" + JSON + b"\r\n"
            ) + chunked(coded[:half], coded[half:])

        async with Server(serving(respond)) as srv:
            up = Upstream()
            for path in ("/gzip", "/deflate"):
                resp = await up.send("GET", srv.url(path), [], b"")
                assert resp.content_encoding is None
                assert resp.headers == [(b"content-type", b"application/json")]
                assert await resp.read() == text
            resp = await up.send("GET", srv.url("/gzip"), [], b"")
            assert b"".join([c async for c in resp.chunks()]) == text
            assert srv.connections == 1
            await up.close()

        async def until_close(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)  # no chunked: the body ends with the connection
            w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip\r\n" + JSON + b"\r\n" + coded)
            await w.drain()

        async with Server(until_close) as srv:
            up = Upstream()
            assert await (await up.send("GET", srv.url(), [], b"")).read() == text
            await up.close()

    run(scenario)


@pytest.mark.parametrize(
    ("coding", "body", "kind", "message"),
    [
        (b"br, chunked", chunked(b"xx"), "invalid", "the gateway decodes gzip and deflate only"),
        (b"compress, chunked", chunked(b"xx"), "invalid", "decodes gzip and deflate only"),
        (b"chunked, gzip", b"", "invalid", "decodes gzip and deflate only"),
        (b"gzip, chunked", chunked(b"not gzip at all"), "broken", "does not decode"),
        (b"gzip, chunked", chunked(gzip.compress(b"x" * 1000)[:20]), "broken", "ends before"),
    ],
)
def test_a_transfer_coding_that_cannot_be_decoded_is_refused(
    run, coding: bytes, body: bytes, kind: str, message: str
) -> None:
    async def scenario() -> None:
        head = b"HTTP/1.1 200 OK\r\ntransfer-encoding: " + coding + b"\r\n" + JSON + b"\r\n"
        async with Server(serving(head + body)) as srv:
            up = Upstream()
            with pytest.raises(Exception) as info:
                await (await up.send("GET", srv.url(), [], b"")).read()
            error = info.value
            assert getattr(error, "kind", None) == kind and message in str(error), error
            await up.close()

    run(scenario)


def test_a_content_coding_is_passed_on_with_its_header(run) -> None:
    text = json.dumps({"usage": USAGE}).encode()
    coded = gzip.compress(text)

    async def scenario() -> None:
        headers = JSON + b"Content-Encoding: GZIP\r\nvary: accept-encoding\r\n"
        async with Server(serving(answer(coded, headers=headers))) as srv:
            up = Upstream()
            resp = await up.send("GET", srv.url(), [], b"")
            assert resp.content_encoding == "gzip"
            assert (b"content-encoding", b"GZIP") in resp.headers
            payload = await resp.read()
            assert payload == coded  # as it came
            assert decode_content("gzip", payload, 10_000) == text
            assert decode_content("gzip", payload, 10) is None  # beyond the limit
            assert decode_content("br", payload, 10_000) is None
            await up.close()

    run(scenario)


def test_a_body_read_whole_is_capped_a_stream_is_not(run) -> None:
    big = b"x" * 5000

    async def scenario() -> None:
        def respond(head: bytes, body: bytes) -> bytes:
            if b"/bomb" in head:  # 2 KB on the wire, 1 MB decoded
                coded = gzip.compress(b"0" * 1_000_000)
                return b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n\r\n" + chunked(
                    coded
                )
            if b"/chunked" in head:
                return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + chunked(
                    *[big[i : i + 100] for i in range(0, 5000, 100)]
                )
            return answer(big)

        async with Server(serving(respond)) as srv:
            up = Upstream(max_response_bytes=1000)

            async def fetch(path: str) -> bytes:  # the error may come with the head
                return await (await up.send("GET", srv.url(path), [], b"")).read()

            for path in ("/length", "/chunked", "/bomb"):
                error = await failure(fetch(path))
                assert error.kind == "too_large"
                assert str(error) == (
                    f"upstream http://127.0.0.1:{srv.port} sent an answer over 1000 bytes, the "
                    "most the gateway reads of a non-streamed answer"
                )
            resp = await up.send("GET", srv.url("/length"), [], b"")
            assert b"".join([c async for c in resp.chunks()]) == big  # relayed, not kept
            await up.close()

    run(scenario)


def test_a_post_is_never_resent_after_a_kept_alive_connection_closes_under_it(run) -> None:
    """The server reads the second POST, then closes (a FIN, as a keep-alive timeout or a
    crash would): the gateway cannot know whether the completion ran, so it is not sent
    again. A connection seen closed *before* the write is not used at all: that request
    provably never went out, and goes on a new connection."""

    async def scenario() -> None:
        async def script(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
            await srv.read_request(reader)
            w.write(answer(b"first"))
            await w.drain()
            if await srv.read_request(reader) is not None and srv.connections == 1:
                return  # read, never answered: closed

        async with Server(script) as srv:
            up = Upstream()
            assert await (await up.send("POST", srv.url(), [], b"1")).read() == b"first"
            error = await failure(up.send("POST", srv.url(), [], b"2"))
            assert error.kind == "broken"
            assert str(error) == (
                f"upstream http://127.0.0.1:{srv.port} closed a kept-alive connection without "
                "answering; the POST request is not sent again, as it may have reached the "
                "upstream"
            )
            assert [body for _, body in srv.requests] == [b"1", b"2"]
            assert srv.connections == 1
            # the second connection: its first answer, then the server closes it idle
            assert await (await up.send("POST", srv.url(), [], b"3")).read() == b"first"
            await until(lambda: srv.ended == 0 and len(srv.writers) == 2)
            srv.writers[1].transport.close()
            await asyncio.sleep(0.1)  # the client sees the FIN while the connection is idle
            assert await (await up.send("POST", srv.url(), [], b"4")).read() == b"first"
            assert [body for _, body in srv.requests] == [b"1", b"2", b"3", b"4"]
            assert srv.connections == 3
            await up.close()

    run(scenario)


def test_the_connection_cap_makes_requests_wait_then_refuses_them(run) -> None:
    async def scenario() -> None:
        release = asyncio.Event()

        async def script(srv: Server, reader: Any, w: asyncio.StreamWriter) -> None:
            while (request := await srv.read_request(reader)) is not None:
                if b"/slow" in request[0]:
                    await release.wait()
                w.write(answer(b"done"))
                await w.drain()

        async with Server(script) as srv:
            up = Upstream(Timeouts(connect=0.3), max_connections=2)
            slow = [
                asyncio.ensure_future(up.send("GET", srv.url("/slow"), [], b"")) for _ in range(2)
            ]
            await until(lambda: len(srv.requests) == 2)
            error = await failure(up.send("GET", srv.url("/fast"), [], b""))
            assert error.kind == "busy"
            assert str(error) == (
                f"upstream http://127.0.0.1:{srv.port}: all 2 connections (the cap per "
                "backend) stayed busy for 0.3s"
            )
            waiting = asyncio.ensure_future(up.send("GET", srv.url("/fast"), [], b""))
            await asyncio.sleep(0.05)
            assert not waiting.done() and len(srv.requests) == 2  # it waits for a connection
            release.set()
            for task in slow:
                assert await (await task).read() == b"done"
            assert await (await waiting).read() == b"done"
            assert srv.connections == 2  # it went on one of the two, freed
            await up.close()

    run(scenario)


def test_an_idle_connection_is_closed_after_4_seconds_by_default() -> None:
    assert Upstream().keepalive == 4.0
    assert Upstream().max_connections == 1024
    assert Upstream().max_response_bytes == 64 * 1024 * 1024


# --- targets: nothing from the client names another host -----------------------------------


@pytest.fixture
def decoy() -> Iterator[tuple[int, list[socket.socket]]]:
    """A listener no request may reach: its port, and the connections it accepted."""
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen(16)
    sock.setblocking(False)
    accepted: list[socket.socket] = []
    yield sock.getsockname()[1], accepted
    while True:
        try:
            accepted.append(sock.accept()[0])
        except BlockingIOError:
            break
    sock.close()


def hostile_targets(port: int) -> list[str]:
    at = f"127.0.0.1:{port}"
    return [
        f"*@{at}/stolen",
        "*",
        f"@{at}/x",
        f":{port}/x",
        f"http://{at}/x",
        f"//user@{at}/x",
        f"/v1\\@{at}/x",
        f"/x#@{at}",
        f"/x\r\nHost: {at}",
        f"/x HTTP/1.1\r\nHost: {at}\r\n\r\nGET /",
        f"/x?y=%@{at}",
        f"/\u00e9@{at}",
    ]


def test_targets_that_name_another_host_are_refused_and_reach_nothing(run, decoy) -> None:
    port, accepted = decoy

    async def scenario() -> None:
        async with Server(serving(answer())) as srv:
            up = Upstream()
            origin = Origin(f"http://key:s3cret@127.0.0.1:{srv.port}/base")
            for target in hostile_targets(port):
                with pytest.raises(BadTarget):
                    check_target(target)
                with pytest.raises(BadTarget):
                    await up.send_to("GET", origin, target, [], b"")
            assert srv.requests == []
            # an odd but valid target goes to the backend's origin, under its base path
            odd = f"/x/@127.0.0.1:{port}/..//127.0.0.1:{port}?u=//@127.0.0.1:{port}"
            await (await up.send_to("GET", origin, odd, [], b"")).read()
            head = srv.requests[0][0]
            assert head.startswith(f"GET /base{odd} HTTP/1.1\r\n".encode())
            assert f"Host: 127.0.0.1:{srv.port}\r\n".encode() in head
            assert b"Authorization: Basic a2V5OnMzY3JldA==\r\n" in head  # key:s3cret
            await up.close()

    run(scenario)
    assert accepted == []


def test_a_url_given_to_send_is_taken_as_it_is_or_refused(run, decoy) -> None:
    port, accepted = decoy

    async def scenario() -> None:
        async with Server(serving(answer())) as srv:
            up = Upstream()
            base = f"http://127.0.0.1:{srv.port}"
            for target in hostile_targets(port):
                if target.startswith("/"):
                    with pytest.raises(BadTarget):
                        await up.send("GET", base + target, [], b"")
            assert srv.requests == []
            await up.close()

    run(scenario)
    assert accepted == []


# --- end to end, through a gateway --------------------------------------------------------------

COMPLETION = completion(USAGE)
GZIPPED = gzip.compress(COMPLETION)
EVENTS = (
    b'data: {"choices": [{"index": 0, "delta": {"content": "four words of text"}}]}\n\n'
    b'data: {"choices": [], "usage": ' + json.dumps(USAGE).encode() + b"}\n\ndata: [DONE]\n\n"
)
GZIPPED_EVENTS = gzip.compress(EVENTS)
CASES: dict[str, bytes] = {
    "interim": b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 103 Early Hints\r\nlink: </a>\r\n\r\n"
    + answer(COMPLETION),
    "switch": b"HTTP/1.1 101 Switching Protocols\r\nupgrade: websocket\r\n\r\n",
    "named": answer(COMPLETION, headers=JSON + b"connection: x-secret\r\nx-secret: 1\r\n"),
    "te-gzip": b"HTTP/1.1 200 OK\r\ntransfer-encoding: gzip, chunked\r\n"
    + JSON
    + b"\r\n"
    + chunked(GZIPPED),
    "te-br": b"HTTP/1.1 200 OK\r\ntransfer-encoding: br, chunked\r\n\r\n" + chunked(b"??"),
    "ce-gzip": answer(GZIPPED, headers=JSON + b"content-encoding: gzip\r\n"),
    "status-999": answer(COMPLETION, status=b"999 Odd"),
    "status-099": answer(COMPLETION, status=b"099 Odd"),
    "ce-gzip-sse": b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
    b"content-encoding: gzip\r\ntransfer-encoding: chunked\r\n\r\n"
    + chunked(GZIPPED_EVENTS[:40], GZIPPED_EVENTS[40:]),
    "no-content": b"HTTP/1.1 204 No Content\r\ncontent-length: 5\r\n\r\n",
    "oversize": answer(json.dumps({"usage": USAGE, "pad": "x" * 5000}).encode()),
}


class Hostile:
    """A raw upstream answering each request with CASES[its `case` query parameter]; the
    heads it received."""

    def __init__(self) -> None:
        self.heads: list[bytes] = []

        async def script(srv: ScriptedUpstream, reader: Any, writer: Any) -> None:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                length = 0
                for line in head.split(b"\r\n")[1:]:
                    name, _, value = line.partition(b":")
                    if name.strip().lower() == b"content-length":
                        length = int(value)
                await reader.readexactly(length)
                target = head.split(b" ")[1].decode()
                case = parse_qs(target.partition("?")[2]).get("case", ["interim"])[0]
                writer.write(CASES[case])
                await writer.drain()

        self.server = ScriptedUpstream(script)


@pytest.fixture(scope="module")
def hostile_gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Gateway, Hostile]]:
    tmp = tmp_path_factory.mktemp("hostile")
    hostile = Hostile()
    text = GATEWAY + TOKEN_LIMIT.replace("LIMIT", "100000")
    gw = Gateway(
        [Path(write(tmp, text))],
        ["--backend", f"default/llm={hostile.server.url}", "--upstream-max-response-bytes", "4KiB"],
        tmp / "gateway.log",
        tmp / "state",
    )
    yield gw, hostile
    gw.stop()
    hostile.server.stop()


@pytest.mark.parametrize(
    ("case", "status", "code", "message"),
    [
        ("switch", 502, "upstream_invalid_response", "switched protocols (101)"),
        ("status-999", 502, "upstream_invalid_response", "status 999, outside 100-599"),
        ("status-099", 502, "upstream_invalid_response", "status 99, outside 100-599"),
        ("te-br", 502, "upstream_invalid_response", "Transfer-Encoding 'br, chunked'"),
        ("oversize", 502, "upstream_response_too_large", "over 4096 bytes"),
    ],
)
def test_a_refused_answer_is_a_clear_error_and_costs_nothing(
    hostile_gateway, case: str, status: int, code: str, message: str
) -> None:
    gw, _ = hostile_gateway
    before = remaining(gw)
    r = client(gw).post(f"/v1/chat/completions?case={case}", json=chat())
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "upstream_error" and error["code"] == code
    assert message in error["message"] and "Traceback" not in r.text
    assert remaining(gw) == before


@pytest.mark.parametrize("case", ["interim", "named", "te-gzip", "ce-gzip", "ce-gzip-sse"])
def test_an_honest_answer_is_passed_on_and_charged_its_usage(hostile_gateway, case: str) -> None:
    gw, _ = hostile_gateway
    before = remaining(gw)
    with client(gw).stream("POST", f"/v1/chat/completions?case={case}", json=chat()) as r:
        raw = b"".join(r.iter_raw())
        headers = r.headers
    assert r.status_code == 200
    assert "x-secret" not in headers and "connection" not in headers
    if case == "ce-gzip-sse":  # a stream, coded: passed on byte for byte, nothing added
        assert headers["content-encoding"] == "gzip" and raw == GZIPPED_EVENTS
        assert gzip.decompress(raw) == EVENTS
    elif case == "ce-gzip":  # the client's business: passed on coded, with its header
        assert headers["content-encoding"] == "gzip" and raw == GZIPPED
        assert headers["content-length"] == str(len(raw))
    else:
        assert "content-encoding" not in headers and raw == COMPLETION
        assert "transfer-encoding" not in headers
        assert headers["content-length"] == str(len(raw))
    assert before - remaining(gw) == USAGE["total_tokens"]  # the real usage, not an estimate


def test_a_204_is_relayed_without_length_or_body(hostile_gateway) -> None:
    gw, _ = hostile_gateway
    with socket.create_connection(("127.0.0.1", gw.port)) as sock:
        sock.sendall(
            b"POST /v1/chat/completions?case=no-content HTTP/1.1\r\nHost: api.example.com\r\n"
            b"content-type: application/json\r\ncontent-length: 2\r\n\r\n{}"
        )
        sock.settimeout(5)
        data = b""
        while b"\r\n\r\n" not in data:
            data += sock.recv(65536)
    head = data.split(b"\r\n\r\n")[0].lower()
    assert head.startswith(b"http/1.1 204")
    assert b"content-length" not in head and b"transfer-encoding" not in head


def test_lookalike_request_headers_are_not_forwarded(hostile_gateway) -> None:
    """`_` for `-` in the name of a header the gateway drops or writes: dropped (CGI, WSGI
    and many frameworks read both spellings as one); other underscored names go on."""
    gw, hostile = hostile_gateway
    r = client(gw).post(
        "/v1/chat/completions?case=interim",
        json=chat(),
        headers={
            "X_Forwarded_For": "6.6.6.6",
            "X_Forwarded_Host": "evil.example",
            "Transfer_Encoding": "chunked",
            "Content_Length": "5",
            "X_Request_Id": "forged",
            "Keep_Alive": "1",
            "X_Custom_Thing": "kept",
        },
    )
    assert r.status_code == 200
    head = hostile.heads[-1].lower()
    for name in (b"x_forwarded", b"transfer_encoding", b"content_length", b"x_request_id"):
        assert name not in head
    assert b"keep_alive" not in head
    assert b"\r\nx_custom_thing: kept\r\n" in head
    assert b"\r\nx-forwarded-for: 127.0.0.1\r\n" in head


def test_the_connection_cap_through_the_gateway_is_a_503(tmp_path) -> None:
    release = asyncio.Event()

    async def script(srv: ScriptedUpstream, reader: Any, writer: Any) -> None:
        while True:
            await srv.request(reader)
            if len(srv.requests) == 1:
                await release.wait()
            writer.write(answer(COMPLETION))
            await writer.drain()

    up = ScriptedUpstream(script)
    text = annotated(connect="300ms") + TOKEN_LIMIT.replace("LIMIT", "1000")
    gw = Gateway(
        [Path(write(tmp_path, text))],
        ["--backend", f"default/llm={up.url}", "--upstream-max-connections", "1"],
        tmp_path / "gateway.log",
        tmp_path / "state",
    )
    try:

        async def scenario() -> tuple[httpx.Response, httpx.Response]:
            async with httpx.AsyncClient(
                base_url=gw.url, headers={"Host": "api.example.com"}, timeout=10
            ) as c:
                first = asyncio.ensure_future(c.post("/v1/chat/completions", json=chat()))
                while not up.requests:
                    await asyncio.sleep(0.01)
                second = await c.post("/v1/chat/completions", json=chat())
                up.loop.call_soon_threadsafe(release.set)
                return await first, second

        first, second = asyncio.run(scenario())
        assert first.status_code == 200
        assert second.status_code == 503
        error = second.json()["error"]
        assert error["code"] == "upstream_busy" and error["type"] == "upstream_error"
        assert "all 1 connections (the cap per backend) stayed busy for 0.3s" in error["message"]
        assert len(up.requests) == 1 and up.connections == 1
        assert remaining(gw) == 1000 - USAGE["total_tokens"]
    finally:
        gw.stop()
        up.stop()


def test_request_targets_through_the_gateway_never_reach_a_decoy(hostile_gateway, decoy) -> None:
    """Whatever the server makes of these request lines (the server's own tests check how
    each is answered), nothing goes to another host than the route's backend."""
    gw, hostile = hostile_gateway
    port, accepted = decoy
    at = f"127.0.0.1:{port}"
    for line in (
        f"GET *@{at}/stolen",
        "OPTIONS *",
        f"GET @{at}/x",
        f"GET http://{at}/x",
        f"GET //{at}/x",
        f"GET /v1/..//{at}/x",
        f"GET /x?u=@{at}",
    ):
        with socket.create_connection(("127.0.0.1", gw.port)) as sock:
            sock.sendall(f"{line} HTTP/1.1\r\nHost: api.example.com\r\n\r\n".encode())
            sock.settimeout(5)
            data = b""
            while b"\r\n\r\n" not in data:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                data += chunk
        status = int(data.split(b" ", 2)[1])
        assert status in (200, 400, 404), (line, data[:200])
        assert b"Traceback" not in data and status != 500
    for head in hostile.heads:
        assert head.split(b" ")[1].startswith(b"/") and not head.split(b" ")[1].startswith(b"//")
    assert accepted == []
