"""A bare pass-through proxy: the baseline the gateway is held to, on two stacks.

It forwards every request (method, path, headers, body) to one upstream and relays the
answer, streamed chunk by chunk when it is an event stream. There is no routing, no auth,
no limits and no usage parsing: what is left is the cost of the stack itself.

* `--stack uvicorn-aiohttp`: uvicorn (uvloop, httptools) and one pooled aiohttp session.
  This is the issue's reference stack, and the gateway's own until it got its own server
  and client.
* `--stack tokengateway`: the gateway's own HTTP server (`http/server.py`, with its
  connection limits) and upstream client (`http/client/`): the gateway's stack today.

    python benchmarks/passthrough.py --port 8081 --upstream http://127.0.0.1:8000 [--stack ...]
"""

from __future__ import annotations

import argparse

import aiohttp
import uvicorn

from tokengateway.http.asgi import read_body

#: request bodies larger than this are not forwarded (none in a benchmark comes close)
MAX_BODY = 1 << 30

#: not forwarded (hop-by-hop, or recomputed by aiohttp / uvicorn)
SKIP = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"te",
        b"upgrade",
        b"host",
        b"content-length",
        b"date",
        b"server",
    }
)


class _Forwarder:
    """What both stacks do alike: the lifespan, reading the body, the target of a request."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")

    async def start(self) -> None: ...

    async def close(self) -> None: ...

    async def forward(self, scope, body, headers, url, send):  # type: ignore[no-untyped-def]
        raise NotImplementedError

    async def __call__(self, scope, receive, send):  # type: ignore[no-untyped-def]
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await self.start()
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await self.close()
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        if scope["type"] != "http":
            return
        body = await read_body(receive, MAX_BODY) or b""
        headers = [
            (k.decode("latin-1"), v.decode("latin-1")) for k, v in scope["headers"] if k not in SKIP
        ]
        url = self.upstream + scope["path"]
        if scope.get("query_string"):
            url += "?" + scope["query_string"].decode("latin-1")
        await self.forward(scope, body, headers, url, send)


async def _bad_gateway(send, exc: Exception) -> None:  # type: ignore[no-untyped-def]
    await send({"type": "http.response.start", "status": 502, "headers": []})
    await send({"type": "http.response.body", "body": f"upstream failed: {exc}".encode()})


class Passthrough(_Forwarder):
    """uvicorn's app: one pooled aiohttp session."""

    session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self.session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, keepalive_timeout=30),
            auto_decompress=False,
            skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
            cookie_jar=aiohttp.DummyCookieJar(),
        )

    async def close(self) -> None:
        if self.session is not None:
            await self.session.close()

    async def forward(self, scope, body, headers, url, send):  # type: ignore[no-untyped-def]
        assert self.session is not None
        try:
            resp = await self.session.request(
                scope["method"], url, headers=headers, data=body or None, allow_redirects=False
            )
        except aiohttp.ClientError as exc:
            await _bad_gateway(send, exc)
            return
        out = [(k.lower(), v) for k, v in resp.raw_headers if k.lower() not in SKIP]
        try:
            if resp.content_type == "text/event-stream":
                await send({"type": "http.response.start", "status": resp.status, "headers": out})
                async for chunk in resp.content.iter_any():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
            else:
                payload = await resp.read()
                out.append((b"content-length", str(len(payload)).encode()))
                await send({"type": "http.response.start", "status": resp.status, "headers": out})
                await send({"type": "http.response.body", "body": payload})
        finally:
            resp.release()


class OwnPassthrough(_Forwarder):
    """The same forwarding on the gateway's own server and client."""

    def __init__(self, upstream: str) -> None:
        from tokengateway.http.client import Upstream

        super().__init__(upstream)
        self.client = Upstream()

    async def start(self) -> None:
        await self.client.start()

    async def close(self) -> None:
        await self.client.close()

    async def forward(self, scope, body, headers, url, send):  # type: ignore[no-untyped-def]
        from tokengateway.http.client import UpstreamError

        try:
            resp = await self.client.send(scope["method"], url, headers, body)
            if resp.content_type == "text/event-stream":
                start = {"type": "http.response.start", "status": resp.status}
                await send({**start, "headers": resp.headers})
                async for chunk in resp.chunks():
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
                await send({"type": "http.response.body", "body": b""})
                return
            payload = await resp.read()
        except UpstreamError as exc:
            await _bad_gateway(send, exc)
            return
        out = resp.headers
        out.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": resp.status, "headers": out})
        await send({"type": "http.response.body", "body": payload})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8081)
    parser.add_argument("--upstream", required=True, help="base URL, e.g. http://127.0.0.1:8000")
    parser.add_argument(
        "--stack", choices=("uvicorn-aiohttp", "tokengateway"), default="uvicorn-aiohttp"
    )
    args = parser.parse_args()
    if args.stack == "tokengateway":
        import uvloop

        from tokengateway.runtime.process import make_server
        from tokengateway.runtime.serve import bind_socket

        sock = bind_socket(args.host, args.port)
        uvloop.run(make_server(OwnPassthrough(args.upstream)).serve([sock]))
        return
    uvicorn.run(
        Passthrough(args.upstream),
        host=args.host,
        port=args.port,
        loop="uvloop",
        http="httptools",
        lifespan="on",
        access_log=False,
        log_level="warning",
        server_header=False,
        timeout_keep_alive=30,
    )


if __name__ == "__main__":
    main()
