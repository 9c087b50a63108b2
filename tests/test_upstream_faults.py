"""Faults upstream: each timeout set per backend, resets, bad bodies. The client gets a clear
502/504 (or an SSE error event once a stream has started) and the books stay true."""

from __future__ import annotations

import asyncio
import json
import socket

import httpx

from tests.conftest import chat, unconnectable_port
from tests.test_gateway import GATEWAY, TOKEN_LIMIT, client, completion, write

USAGE = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def annotated(connect: str = "", first_byte: str = "", idle: str = "") -> str:
    """The test gateway with timeout annotations on its Service."""
    notes = {
        "tokengateway.io/connect-timeout": connect,
        "tokengateway.io/first-byte-timeout": first_byte,
        "tokengateway.io/idle-timeout": idle,
    }
    body = ", ".join(f'"{k}": "{v}"' for k, v in notes.items() if v)
    return GATEWAY.replace(
        "metadata: {name: llm, namespace: default}\nspec:\n  ports",
        "metadata: {name: llm, namespace: default, annotations: {" + body + "}}\nspec:\n  ports",
    )


def remaining(gw) -> int:  # type: ignore[no-untyped-def]
    """Tokens left of the 1000 the test limit allows (asked with a request that succeeds)."""
    rows = httpx.get(gw.admin_url + "/counters/default/llm").json()
    return 1000 - sum(row["value"] for row in rows)


def test_a_slow_first_byte_is_a_504_and_costs_nothing(tmp_path, start_gateway, upstream) -> None:
    async def slow(path, body):  # type: ignore[no-untyped-def]
        await asyncio.sleep(2)
        return 200, {"content-type": "application/json"}, completion(USAGE)

    up = upstream(slow)
    text = annotated(first_byte="300ms") + TOKEN_LIMIT.replace("LIMIT", "1000")
    gw = start_gateway(write(tmp_path, text), args=("--backend", f"default/llm={up.url}"))
    r = client(gw).post("/v1/chat/completions", json=chat())
    assert r.status_code == 504
    error = r.json()["error"]
    assert error["code"] == "upstream_timeout" and "no answer within 0.3s" in error["message"]
    assert remaining(gw) == 1000


def test_a_connect_timeout_is_a_504(tmp_path, start_gateway) -> None:
    with unconnectable_port() as port:
        text = annotated(connect="400ms") + TOKEN_LIMIT.replace("LIMIT", "1000")
        gw = start_gateway(
            write(tmp_path, text), args=("--backend", f"default/llm=http://127.0.0.1:{port}")
        )
        r = client(gw).post("/v1/chat/completions", json=chat())
        assert r.status_code == 504, r.text
        assert "no connection within 0.4s" in r.json()["error"]["message"]


def stream_to_its_error(gw) -> tuple[str, dict]:  # type: ignore[no-untyped-def]
    """Stream a chat through `gw`: the whole body, and the error its last event carries."""
    with client(gw).stream("POST", "/v1/chat/completions", json=chat(stream=True)) as r:
        assert r.status_code == 200
        body = r.read().decode()
    last = [line for line in body.splitlines() if line.startswith("data: ")][-1]
    return body, json.loads(last[len("data: ") :])["error"]


def test_a_stalled_stream_ends_with_an_error_event(tmp_path, start_gateway, upstream) -> None:
    async def stalls(path, body):  # type: ignore[no-untyped-def]
        async def events():  # type: ignore[no-untyped-def]
            chunk = {"choices": [{"index": 0, "delta": {"content": "four words of text"}}]}
            yield b"data: " + json.dumps(chunk).encode() + b"\n\n"
            await asyncio.sleep(3)
            yield b"data: [DONE]\n\n"

        return 200, {"content-type": "text/event-stream"}, events()

    up = upstream(stalls)
    text = annotated(idle="300ms") + TOKEN_LIMIT.replace("LIMIT", "1000")
    gw = start_gateway(write(tmp_path, text), args=("--backend", f"default/llm={up.url}"))
    body, error = stream_to_its_error(gw)
    assert "four words of text" in body
    assert error["code"] == "upstream_timeout" and "nothing for 0.3s" in error["message"]
    # what was streamed is charged, by an estimate: the prompt and the four words
    assert 5 <= 1000 - remaining(gw) <= 20


def test_a_body_cut_mid_way_is_a_502_and_costs_nothing(tmp_path, start_gateway) -> None:
    """An upstream that promises 1,000 bytes, sends 20 and closes."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    port = server.getsockname()[1]

    async def serve_one() -> None:
        loop = asyncio.get_running_loop()
        server.setblocking(False)
        conn, _ = await loop.sock_accept(server)
        await loop.sock_recv(conn, 65536)
        head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: 1000\r\n\r\n"
        await loop.sock_sendall(conn, head + b'{"id": "x", "usage":')
        conn.close()

    text = GATEWAY + TOKEN_LIMIT.replace("LIMIT", "1000")
    gw = start_gateway(
        write(tmp_path, text), args=("--backend", f"default/llm=http://127.0.0.1:{port}")
    )

    async def scenario() -> httpx.Response:
        task = asyncio.ensure_future(serve_one())
        async with httpx.AsyncClient(
            base_url=gw.url, headers={"Host": "api.example.com"}, timeout=10
        ) as c:
            r = await c.post("/v1/chat/completions", json=chat())
        await task
        return r

    r = asyncio.run(scenario())
    server.close()
    assert r.status_code == 502
    assert r.json()["error"]["code"] == "upstream_failed"
    assert remaining(gw) == 1000


def test_a_bad_timeout_annotation_is_reported(tmp_path) -> None:
    from tests.conftest import run_cli

    path = write(tmp_path, annotated(idle="soon"))
    result = run_cli("validate", "-f", path, "--backend", "default/llm=http://127.0.0.1:9")
    assert result.returncode != 0
    assert "tokengateway.io/idle-timeout" in result.stderr + result.stdout


class ScriptedUpstream:
    """A raw HTTP server in a thread: `script(self, reader, writer)` serves each connection."""

    def __init__(self, script) -> None:  # type: ignore[no-untyped-def]
        import threading

        self.script = script
        self.connections = 0
        self.requests: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        self.tasks: set[asyncio.Task] = set()
        started = threading.Event()

        async def main() -> None:
            self.stopping = asyncio.Event()
            server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
            self.port = server.sockets[0].getsockname()[1]
            started.set()
            await self.stopping.wait()
            server.close()
            for task in self.tasks:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)

        self.thread = threading.Thread(target=self.loop.run_until_complete, args=(main(),))
        self.thread.daemon = True
        self.thread.start()
        started.wait(5)
        self.url = f"http://127.0.0.1:{self.port}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        task = asyncio.current_task()
        assert task is not None
        self.tasks.add(task)
        try:
            await self.script(self, reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.CancelledError):
            pass
        finally:
            writer.transport.close()
            self.tasks.discard(task)

    async def request(self, reader: asyncio.StreamReader) -> bytes:
        head = await reader.readuntil(b"\r\n\r\n")
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        body = await reader.readexactly(length)
        self.requests.append(body)
        return body

    def stop(self) -> None:
        self.loop.call_soon_threadsafe(self.stopping.set)
        self.thread.join(5)
        self.loop.close()


def test_a_post_on_a_keep_alive_connection_closed_under_it_is_not_resent(
    tmp_path, start_gateway
) -> None:
    """The upstream closes a kept-alive connection after reading a POST, without a word (its
    keep-alive timeout racing the request, or a crash): the upstream may have started the
    completion, so the gateway does not run it a second time. The client gets a 502 saying
    so, and is charged nothing; the next request goes on a new connection."""
    answer = completion(USAGE)
    ok = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n\r\n" % len(
        answer
    )

    async def script(srv: ScriptedUpstream, reader, writer) -> None:  # type: ignore[no-untyped-def]
        first = srv.connections == 1
        while True:
            await srv.request(reader)
            if first and len(srv.requests) == 2:
                return  # read, never answered: closed
            writer.write(ok + answer)
            await writer.drain()

    up = ScriptedUpstream(script)
    try:
        text = GATEWAY + TOKEN_LIMIT.replace("LIMIT", "1000")
        gw = start_gateway(write(tmp_path, text), args=("--backend", f"default/llm={up.url}"))
        c = client(gw)
        responses = [c.post("/v1/chat/completions", json=chat()) for _ in range(3)]
        assert [r.status_code for r in responses] == [200, 502, 200]
        error = responses[1].json()["error"]
        assert error["code"] == "upstream_failed" and error["type"] == "upstream_error"
        assert "the POST request is not sent again" in error["message"]
        assert len(up.requests) == 3 and up.connections == 2  # sent once each
        assert remaining(gw) == 1000 - 2 * USAGE["total_tokens"]
    finally:
        up.stop()


def test_a_chunk_encoding_broken_mid_stream_ends_with_an_error_event(
    tmp_path, start_gateway
) -> None:
    event = {"choices": [{"index": 0, "delta": {"content": "four words of text"}}]}
    data = b"data: " + json.dumps(event).encode() + b"\n\n"

    async def script(srv: ScriptedUpstream, reader, writer) -> None:  # type: ignore[no-untyped-def]
        await srv.request(reader)
        writer.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ntransfer-encoding: chunked\r\n"
            b"\r\n%x\r\n%s\r\n" % (len(data), data)
        )
        await writer.drain()
        await asyncio.sleep(0.1)
        writer.write(b"not-a-chunk-size\r\n")
        await writer.drain()
        await asyncio.sleep(5)

    up = ScriptedUpstream(script)
    try:
        text = GATEWAY + TOKEN_LIMIT.replace("LIMIT", "1000")
        gw = start_gateway(write(tmp_path, text), args=("--backend", f"default/llm={up.url}"))
        body, error = stream_to_its_error(gw)
        assert "four words of text" in body
        assert error["code"] == "upstream_failed" and "upstream answer broken" in error["message"]
        assert 5 <= 1000 - remaining(gw) <= 20  # what came is charged, by an estimate
    finally:
        up.stop()
