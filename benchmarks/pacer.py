"""An open-loop load generator: requests sent at a fixed rate, whatever the answers do.

wrk keeps N connections busy (closed loop): a slow server gets fewer requests. This sends
request i at t0 + i/rate on uvloop with one pooled aiohttp session, so a server that slows
down sees a queue build, as it would in production. Debian has no wrk2, hence this.

    python benchmarks/pacer.py --url http://127.0.0.1:8080/v1/chat/completions \
        --rate 1000 --duration 6 --warmup 1 [--auth 'APIKEY iamagolduser'] [--stream]

Prints one JSON object: the offered and achieved rates, the latency percentiles of the
requests sent after the warm-up (measured from the moment each one was actually sent), the
statuses, and the pacer's own lag behind its schedule and CPU use — if the lag grows the
pacer, not the server, is the bottleneck and the result says so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import MODEL, percentile


def chat_body(stream: bool) -> bytes:
    return json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "What is Kubernetes?"}],
            "max_tokens": 20,
            "stream": stream,
        }
    ).encode()


def headers_for(host: str, auth: str) -> dict[str, str]:
    return {"Host": host, "Authorization": auth, "Content-Type": "application/json"}


async def run(args: argparse.Namespace) -> dict:
    body = chat_body(args.stream)
    headers = headers_for(args.host, args.auth)
    connector = aiohttp.TCPConnector(limit=args.max_connections, keepalive_timeout=30)
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    latencies: list[float] = []
    lags: list[float] = []
    statuses: Counter[str] = Counter()
    interval = 1.0 / args.rate
    total = int(args.rate * (args.warmup + args.duration))
    measured_from = int(args.rate * args.warmup)
    in_flight: set[asyncio.Task] = set()

    async with aiohttp.ClientSession(
        connector=connector, timeout=timeout, skip_auto_headers=("User-Agent",)
    ) as session:

        async def one(i: int, scheduled: float) -> None:
            start = time.perf_counter()
            try:
                async with session.post(args.url, data=body, headers=headers) as resp:
                    await resp.read()
                    status = str(resp.status)
            except (aiohttp.ClientError, TimeoutError) as exc:
                status = type(exc).__name__
            end = time.perf_counter()
            if i >= measured_from:
                latencies.append(end - start)
                lags.append(start - scheduled)
                statuses[status] += 1

        cpu0 = time.process_time()
        t0 = time.perf_counter() + 0.01
        measure_start = t0 + measured_from * interval
        sent = 0
        while sent < total:
            now = time.perf_counter()
            due = min(total, int((now - t0) / interval) + 1)
            while sent < due:
                task = asyncio.create_task(one(sent, t0 + sent * interval))
                in_flight.add(task)
                task.add_done_callback(in_flight.discard)
                sent += 1
            next_at = t0 + sent * interval
            # uvloop's timers count whole milliseconds: a shorter sleep returns at once and
            # the loop would spin; requests due meanwhile go out together on the next turn
            await asyncio.sleep(max(0.001, next_at - time.perf_counter()))
        send_end = time.perf_counter()
        if in_flight:
            await asyncio.wait(in_flight, timeout=args.timeout + 1)
        end = time.perf_counter()
        cpu = time.process_time() - cpu0

    latencies.sort()
    lags.sort()
    window = max(end, send_end) - measure_start
    ms = 1000.0
    completed = len(latencies)
    return {
        "offered_rps": args.rate,
        "achieved_rps": completed / window if window > 0 else 0.0,
        "sent": total - measured_from,
        "completed": completed,
        "statuses": dict(statuses),
        "p50_ms": percentile(latencies, 50) * ms,
        "p90_ms": percentile(latencies, 90) * ms,
        "p99_ms": percentile(latencies, 99) * ms,
        "max_ms": (latencies[-1] if latencies else float("nan")) * ms,
        "lag_p50_ms": percentile(lags, 50) * ms,
        "lag_p99_ms": percentile(lags, 99) * ms,
        "pacer_cpu_pct": 100.0 * cpu / (end - t0),
        "duration_s": window,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--rate", type=float, default=1000)
    parser.add_argument("--duration", type=float, default=6)
    parser.add_argument("--warmup", type=float, default=1)
    parser.add_argument("--host", default="trlp-tutorial.example.com", help="Host header")
    parser.add_argument("--auth", default="APIKEY iamagolduser", help="Authorization header")
    parser.add_argument("--stream", action="store_true", help='"stream": true requests')
    parser.add_argument("--max-connections", type=int, default=512)
    parser.add_argument("--timeout", type=float, default=10)
    args = parser.parse_args()
    result = uvloop.run(run(args))
    print(json.dumps(result))


if __name__ == "__main__":
    main()
