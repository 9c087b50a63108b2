"""A minimal fixed-response OpenAI-compatible upstream for the benchmarks.

It answers every POST with the same chat completion (a `usage` block included) or, when the
request body asks for `"stream": true`, with the same short SSE stream ending in a usage
chunk and `data: [DONE]`. No latency, no parsing of the body beyond that one test, so the
upstream is never what limits a benchmark.

    python benchmarks/upstream.py --port 8000 [--impl raw|asgi|aiohttp]

- `raw` (default, the fastest): an asyncio protocol on uvloop with httptools' parser.
- `asgi`: the same answers from a raw ASGI app under uvicorn (uvloop, httptools).
- `aiohttp`: the same answers from an aiohttp web app.

`GET /__stats` answers `{"requests": N, "stream": M}`: how many POSTs it has answered
(streamed ones in M). The benchmark reads it to prove that a refused request (429) never
reached the upstream.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import socket

MODEL = "meta-llama/Llama-3.1-8B-Instruct"
CONTENT = "Kubernetes is an open-source system for automating deployment of containers."
WORDS = CONTENT.split(" ")
PROMPT_TOKENS = 3
COMPLETION_TOKENS = len(WORDS)
USAGE = {
    "prompt_tokens": PROMPT_TOKENS,
    "completion_tokens": COMPLETION_TOKENS,
    "total_tokens": PROMPT_TOKENS + COMPLETION_TOKENS,
}

COMPLETION = json.dumps(
    {
        "id": "chatcmpl-bench",
        "object": "chat.completion",
        "created": 1700000000,
        "model": MODEL,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": CONTENT},
                "finish_reason": "stop",
            }
        ],
        "usage": USAGE,
    },
    separators=(",", ":"),
).encode()


def _chunk(delta: dict, finish: str | None = None, usage: dict | None = None) -> bytes:
    choices = [] if usage else [{"index": 0, "delta": delta, "finish_reason": finish}]
    event = {
        "id": "chatcmpl-bench",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": MODEL,
        "choices": choices,
        "usage": usage,
    }
    return b"data: " + json.dumps(event, separators=(",", ":")).encode() + b"\n\n"


STREAM = b"".join(
    [
        _chunk({"role": "assistant", "content": ""}),
        *(_chunk({"content": (" " if i else "") + w}) for i, w in enumerate(WORDS)),
        _chunk({}, finish="stop"),
        _chunk({}, usage=USAGE),
        b"data: [DONE]\n\n",
    ]
)


def is_stream(body: bytes) -> bool:
    return b'"stream":true' in body or b'"stream": true' in body


class Stats:
    requests = 0
    stream = 0

    @classmethod
    def body(cls) -> bytes:
        return json.dumps({"requests": cls.requests, "stream": cls.stream}).encode()


# --- raw: asyncio protocol + httptools --------------------------------------------------------


def _response(status: bytes, ctype: bytes, body: bytes, keep_alive: bool) -> bytes:
    head = b"HTTP/1.1 " + status + b"\r\ncontent-type: " + ctype
    head += b"\r\ncontent-length: " + str(len(body)).encode()
    if not keep_alive:
        head += b"\r\nconnection: close"
    return head + b"\r\n\r\n" + body


def _stream_response(keep_alive: bool) -> bytes:
    # Chunked, as a real streaming server answers: one chunk per event.
    head = b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\ncache-control: no-cache"
    head += b"\r\ntransfer-encoding: chunked"
    if not keep_alive:
        head += b"\r\nconnection: close"
    parts = [head, b"\r\n\r\n"]
    for event in STREAM.split(b"\n\n")[:-1]:
        event += b"\n\n"
        parts.append(f"{len(event):x}\r\n".encode() + event + b"\r\n")
    parts.append(b"0\r\n\r\n")
    return b"".join(parts)


_CACHE: dict[tuple[str, bool], bytes] = {}


def _cached(kind: str, keep_alive: bool) -> bytes:
    key = (kind, keep_alive)
    out = _CACHE.get(key)
    if out is None:
        if kind == "json":
            out = _response(b"200 OK", b"application/json", COMPLETION, keep_alive)
        elif kind == "stream":
            out = _stream_response(keep_alive)
        else:
            out = _response(b"404 Not Found", b"application/json", b'{"error":"no"}', keep_alive)
        _CACHE[key] = out
    return out


class RawProtocol(asyncio.Protocol):
    def __init__(self) -> None:
        import httptools

        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None
        self.url = b""
        self.body: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def data_received(self, data: bytes) -> None:
        import httptools

        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError:
            assert self.transport is not None
            self.transport.write(_response(b"400 Bad Request", b"text/plain", b"bad", False))
            self.transport.close()

    # httptools callbacks
    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []

    def on_url(self, url: bytes) -> None:
        self.url += url

    def on_body(self, body: bytes) -> None:
        self.body.append(body)

    def on_message_complete(self) -> None:
        assert self.transport is not None
        keep_alive = self.parser.should_keep_alive()
        method = self.parser.get_method()
        if method == b"POST":
            Stats.requests += 1
            if is_stream(b"".join(self.body)):
                Stats.stream += 1
                out = _cached("stream", keep_alive)
            else:
                out = _cached("json", keep_alive)
        elif self.url.startswith(b"/__stats"):
            out = _response(b"200 OK", b"application/json", Stats.body(), keep_alive)
        elif self.url.startswith((b"/health", b"/v1/models")):
            out = _response(b"200 OK", b"application/json", b"{}", keep_alive)
        else:
            out = _cached("404", keep_alive)
        self.transport.write(out)
        if not keep_alive:
            self.transport.close()


async def serve_raw(sock: socket.socket) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(RawProtocol, sock=sock, backlog=2048)
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    async with server:
        await stop.wait()


# --- asgi: uvicorn -----------------------------------------------------------------------------

JSON_HEADERS = [(b"content-type", b"application/json")]
SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


async def asgi_app(scope, receive, send):  # type: ignore[no-untyped-def]
    if scope["type"] != "http":
        return
    body = b""
    while True:
        message = await receive()
        body += message.get("body", b"")
        if not message.get("more_body"):
            break
    if scope["method"] == "POST":
        Stats.requests += 1
        if is_stream(body):
            Stats.stream += 1
            await send({"type": "http.response.start", "status": 200, "headers": SSE_HEADERS})
            for event in STREAM.split(b"\n\n")[:-1]:
                await send(
                    {"type": "http.response.body", "body": event + b"\n\n", "more_body": True}
                )
            await send({"type": "http.response.body", "body": b""})
            return
        payload, status = COMPLETION, 200
    elif scope["path"] == "/__stats":
        payload, status = Stats.body(), 200
    else:
        payload, status = b"{}", 200 if scope["path"] in ("/health", "/v1/models") else 404
    await send({"type": "http.response.start", "status": status, "headers": JSON_HEADERS})
    await send({"type": "http.response.body", "body": payload})


def serve_asgi(sock: socket.socket) -> None:
    import uvicorn

    config = uvicorn.Config(
        asgi_app,
        loop="uvloop",
        http="httptools",
        lifespan="off",
        access_log=False,
        log_level="warning",
        server_header=False,
        date_header=False,
    )
    uvicorn.Server(config).run(sockets=[sock])


# --- aiohttp web -------------------------------------------------------------------------------


def serve_aiohttp(sock: socket.socket) -> None:
    import logging

    from aiohttp import web

    # wrk closes its connections mid-response when its time is up: not worth a traceback.
    logging.getLogger("aiohttp.server").setLevel(logging.CRITICAL)

    async def post(request: web.Request) -> web.StreamResponse:
        body = await request.read()
        Stats.requests += 1
        if is_stream(body):
            Stats.stream += 1
            resp = web.StreamResponse(headers={"content-type": "text/event-stream"})
            await resp.prepare(request)
            for event in STREAM.split(b"\n\n")[:-1]:
                await resp.write(event + b"\n\n")
            await resp.write_eof()
            return resp
        return web.Response(body=COMPLETION, content_type="application/json")

    async def stats(request: web.Request) -> web.Response:
        return web.Response(body=Stats.body(), content_type="application/json")

    app = web.Application()
    app.router.add_get("/__stats", stats)
    app.router.add_post("/{tail:.*}", post)
    web.run_app(app, sock=sock, print=None, access_log=None, handle_signals=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument("--impl", choices=("raw", "asgi", "aiohttp"), default="raw")
    args = parser.parse_args()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)
    print(f"upstream ({args.impl}) on http://{args.host}:{args.port} pid {os.getpid()}", flush=True)
    if args.impl == "raw":
        import uvloop

        uvloop.run(serve_raw(sock))
    elif args.impl == "asgi":
        serve_asgi(sock)
    else:
        import uvloop

        uvloop.install()
        serve_aiohttp(sock)


if __name__ == "__main__":
    main()
