"""The upstream client alone: CPU per request of `Upstream.send()` + `read()` / `chunks()`.

    python benchmarks/client.py [-n 20000] [--concurrency 32] [--rounds 3] [--impl raw]

Starts the fixed upstream (`benchmarks/upstream.py`, its `raw` implementation unless told)
in its own process, then drives requests through two clients in this one, on uvloop:

- `aiohttp`: the client the gateway had (an aiohttp ClientSession), kept here verbatim for
  the comparison;
- `ours`: `tokengateway.http.client`, HTTP/1.1 on an asyncio protocol with httptools.

Three cases each: requests one after another, `--concurrency` in flight at once (each of
that many workers sends its share one after another), and streamed requests (`"stream":
true`: the upstream answers 14 SSE events; read with `chunks()`). The measure is this
process's CPU time (`time.process_time`) per request, which is all client (the upstream is
another process), and requests per second. Streams also report CPU per event. Each
measurement is the median of `--rounds` rounds, after an unmeasured warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import resource
import statistics
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, HOST, MODEL, Proc, free_port, stop_all, wait_http

from tokengateway.http.client import (
    DEFAULT_TIMEOUTS,
    Timeouts,
    Upstream,
    UpstreamBroken,
    UpstreamClosed,
    UpstreamTimeout,
    UpstreamUnreachable,
)
from tokengateway.http.client.request import HOP_BY_HOP

EVENTS = 14  # SSE events in the fixed upstream's stream (usage and [DONE] included)


def chat_body(stream: bool) -> bytes:
    doc = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What is Kubernetes?"}],
        "max_tokens": 20,
        "stream": stream,
        "stream_options": {"include_usage": True} if stream else None,
    }
    return json.dumps(doc).encode()


#: what the gateway sends upstream for a typical request (hop-by-hop ones already dropped)
HEADERS = [
    ("content-type", "application/json"),
    ("user-agent", "OpenAI/Python 1.30.0"),
    ("accept", "application/json"),
    ("x-stainless-lang", "python"),
    ("x-forwarded-host", "trlp-tutorial.example.com"),
    ("x-forwarded-proto", "http"),
    ("x-forwarded-for", "127.0.0.1"),
    ("x-request-id", "0f8fad5b-d9cb-469f-a165-70867728950e"),
    ("accept-encoding", "identity"),
    ("authorization", "Bearer sk-upstream-key"),
]


# --- the client the gateway had: aiohttp, verbatim (only renamed) --------------------------

_INCOMPLETE = "upstream closed the connection before the response was complete"


@dataclass(slots=True)
class AiohttpResponse:
    status: int
    headers: list[tuple[bytes, bytes]]
    content_type: str
    _resp: aiohttp.ClientResponse
    idle: float | None = None  # the longest silence allowed between two chunks

    async def read(self) -> bytes:
        """The whole body (the same reads, timeout and errors as `chunks`)."""
        return b"".join([chunk async for chunk in self.chunks()])

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives; `idle` bounds the silence before each chunk."""
        content = self._resp.content
        idle = self.idle
        loop = asyncio.get_running_loop()
        try:
            # one timeout moved forward at each chunk: cheaper than a new one per chunk
            async with asyncio.timeout(None) as silence:
                while True:
                    if idle is not None:
                        silence.reschedule(loop.time() + idle)
                    chunk = await content.readany()
                    if not chunk:
                        return
                    silence.reschedule(None)
                    yield chunk
        except TimeoutError:
            raise UpstreamTimeout(f"upstream sent nothing for {self.idle:g}s") from None
        except aiohttp.ClientPayloadError:
            raise UpstreamClosed(_INCOMPLETE) from None
        except aiohttp.ClientError as exc:
            raise UpstreamBroken(f"upstream answer broken: {exc}") from None
        finally:
            self._resp.release()

    def close(self) -> None:
        self._resp.close()


_RESPONSE_OWN = frozenset({"date"})


class AiohttpUpstream:
    def __init__(self, timeouts: Timeouts = DEFAULT_TIMEOUTS) -> None:
        self._session: aiohttp.ClientSession | None = None
        self.timeouts = timeouts
        self._client_timeouts: dict[tuple[float | None, float | None], aiohttp.ClientTimeout] = {}

    async def start(self) -> None:
        if self._session is None:
            connector = aiohttp.TCPConnector(limit=0, ttl_dns_cache=300, keepalive_timeout=30)
            self._session = aiohttp.ClientSession(
                connector=connector,
                auto_decompress=False,
                skip_auto_headers=("User-Agent", "Accept-Encoding", "Content-Type"),
                cookie_jar=aiohttp.DummyCookieJar(),
            )

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    async def send(
        self,
        method: str,
        url: str,
        headers: Sequence[tuple[str, str]],
        body: bytes,
        timeout: float | None = None,
        timeouts: Timeouts | None = None,
    ) -> AiohttpResponse:
        if self._session is None:
            await self.start()
        assert self._session is not None
        limits = timeouts or self.timeouts
        key = (timeout, limits.connect)
        client_timeout = self._client_timeouts.get(key)
        if client_timeout is None:
            client_timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=limits.connect)
            self._client_timeouts[key] = client_timeout
        waiting = asyncio.timeout(limits.first_byte)
        try:
            async with waiting:
                resp = await self._session.request(
                    method,
                    url,
                    headers=list(headers),
                    data=body or None,
                    timeout=client_timeout,
                    allow_redirects=False,
                )
        except aiohttp.ConnectionTimeoutError:
            raise UpstreamTimeout("no connection") from None
        except TimeoutError:
            raise UpstreamTimeout("timed out") from None
        except aiohttp.ClientConnectorError as exc:
            raise UpstreamUnreachable(str(exc)) from None
        except aiohttp.ClientError as exc:
            raise UpstreamBroken(str(exc)) from None
        out_headers = [
            (k.lower(), v)
            for k, v in resp.raw_headers
            if (name := k.decode("latin-1").lower()) not in HOP_BY_HOP and name not in _RESPONSE_OWN
        ]
        return AiohttpResponse(resp.status, out_headers, resp.content_type or "", resp, limits.idle)


# --- the measurements -----------------------------------------------------------------------


class Client(Protocol):
    async def start(self) -> None: ...
    async def close(self) -> None: ...
    async def send(
        self, method: str, url: str, headers: Sequence[tuple[str, str]], body: bytes
    ) -> Any: ...


CLIENTS = {"aiohttp": AiohttpUpstream, "ours": Upstream}


async def one(client: Client, url: str, body: bytes, stream: bool) -> int:
    """One exchange; the number of body chunks the reader got."""
    resp = await client.send("POST", url, HEADERS, body)
    if not stream:
        data = await resp.read()
        assert resp.status == 200 and data.startswith(b"{"), (resp.status, data[:100])
        return 1
    n = 0
    async for _ in resp.chunks():
        n += 1
    assert resp.content_type == "text/event-stream"
    return n


@dataclass(slots=True)
class Run:
    cpu: float  # seconds, user + system
    user: float
    wall: float
    chunks: int  # body chunks the readers got


async def measure(client: Client, url: str, n: int, concurrency: int, stream: bool) -> Run:
    """`n` requests, `concurrency` at a time."""
    body = chat_body(stream)

    async def worker(count: int) -> int:
        return sum([await one(client, url, body, stream) for _ in range(count)])

    shares = [n // concurrency + (1 if i < n % concurrency else 0) for i in range(concurrency)]
    before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    cpu = time.process_time()
    if concurrency == 1:
        chunks = await worker(n)
    else:
        chunks = sum(await asyncio.gather(*(worker(k) for k in shares)))
    cpu = time.process_time() - cpu
    wall, after = time.perf_counter() - wall, resource.getrusage(resource.RUSAGE_SELF)
    return Run(cpu, after.ru_utime - before.ru_utime, wall, chunks)


async def bench(args: argparse.Namespace, url: str, paced_url: str) -> list[dict[str, Any]]:
    c = args.concurrency
    cases = [
        ("sequential", url, 1, False, args.n),
        (f"concurrent x{c}", url, c, False, args.n),
        ("streamed", url, 1, True, args.n // 2),
        (f"streamed x{c}", url, c, True, args.n // 2),
        # one event per millisecond, as a model streams (slower): every event its own read
        (f"paced x{args.paced_concurrency}", paced_url, args.paced_concurrency, True, args.n // 10),
    ]
    rows = []
    for name, where, concurrency, stream, n in cases:
        for label in args.clients:
            client: Client = CLIENTS[label]()
            await client.start()
            await measure(client, where, max(200, n // 10), concurrency, stream)  # warm-up
            runs = [
                await measure(client, where, n, concurrency, stream) for _ in range(args.rounds)
            ]
            await client.close()
            row: dict[str, Any] = {
                "case": name,
                "client": label,
                "n": n,
                "cpu_us_per_request": statistics.median(r.cpu for r in runs) / n * 1e6,
                "user_us_per_request": statistics.median(r.user for r in runs) / n * 1e6,
                "requests_per_s": n / statistics.median(r.wall for r in runs),
            }
            if stream:
                chunks = statistics.median(r.chunks for r in runs)
                row["cpu_us_per_event"] = row["cpu_us_per_request"] / EVENTS
                row["reads_per_stream"] = chunks / n
                row["cpu_us_per_read"] = row["cpu_us_per_request"] * n / chunks
            rows.append(row)
            print(_line(row), flush=True)
    return rows


def _line(row: dict[str, Any]) -> str:
    text = (
        f"{row['case']:<14} {row['client']:<8} {row['cpu_us_per_request']:7.1f} us/req CPU"
        f" (user {row['user_us_per_request']:5.1f}) {row['requests_per_s']:7.0f} req/s"
    )
    if "cpu_us_per_event" in row:
        text += (
            f"  {row['cpu_us_per_event']:5.2f} us/event,"
            f" {row['reads_per_stream']:4.1f} reads/stream, {row['cpu_us_per_read']:5.1f} us/read"
        )
    return text


# --- a paced upstream: the fixed stream, one event per interval --------------------------


class PacedProtocol(asyncio.Protocol):
    """Answers a POST with the fixed upstream's SSE events, chunked, one per `interval`;
    anything else with an empty 200."""

    def __init__(self, interval: float) -> None:
        import httptools
        from upstream import STREAM

        self.interval = interval
        self.events = [
            f"{len(e) + 2:x}\r\n".encode() + e + b"\n\n\r\n" for e in STREAM.split(b"\n\n")[:-1]
        ]
        self.parser = httptools.HttpRequestParser(self)
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)

    def on_message_complete(self) -> None:
        transport = self.transport
        assert transport is not None
        if self.parser.get_method() != b"POST":
            transport.write(b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n")
            return
        transport.write(
            b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n"
        )
        loop = asyncio.get_running_loop()
        for i, event in enumerate([*self.events, b"0\r\n\r\n"], 1):
            loop.call_later(self.interval * i, self._write, event)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(data)


async def serve_paced(port: int, interval: float) -> None:
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: PacedProtocol(interval), HOST, port, backlog=2048)
    async with server:
        await asyncio.Event().wait()  # until the benchmark stops this process


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("-n", type=int, default=20000, help="requests per round and case")
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--impl", choices=("raw", "asgi", "aiohttp"), default="raw")
    parser.add_argument(
        "--clients", nargs="+", choices=sorted(CLIENTS), default=["aiohttp", "ours"]
    )
    parser.add_argument(
        "--paced-concurrency", type=int, default=64, help="streams in flight, paced case"
    )
    parser.add_argument("--paced-ms", type=float, default=1.0, help="between two events")
    parser.add_argument(
        "--cpus",
        help="pin this process to the first CPU given and the upstreams to the others, e.g. 0,1",
    )
    parser.add_argument("--json", type=Path, help="also write the rows here")
    parser.add_argument("--serve-paced", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_paced:
        uvloop.run(serve_paced(args.serve_paced, args.paced_ms / 1000))
        return
    port, paced = free_port(), free_port()
    with tempfile.TemporaryDirectory() as logs:
        try:
            cmd = [sys.executable, str(BENCH / "upstream.py"), "--port", str(port)]
            up = Proc("upstream", [*cmd, "--impl", args.impl], Path(logs))
            cmd = [sys.executable, __file__, "--serve-paced", str(paced)]
            pacer = Proc("paced", [*cmd, "--paced-ms", str(args.paced_ms)], Path(logs))
            wait_http(up, port, "/health")
            wait_http(pacer, paced, "/health")
            if args.cpus:
                mine, *theirs = (int(c) for c in args.cpus.split(","))
                os.sched_setaffinity(0, {mine})
                up.pin(set(theirs) or {mine})
                pacer.pin(set(theirs) or {mine})
            path = "/v1/chat/completions"
            rows = uvloop.run(
                bench(args, f"http://{HOST}:{port}{path}", f"http://{HOST}:{paced}{path}")
            )
        finally:
            stop_all()
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
