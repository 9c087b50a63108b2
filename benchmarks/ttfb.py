"""Time to first byte of a streamed chat completion, one request at a time.

    python benchmarks/ttfb.py --url http://127.0.0.1:8080/v1/chat/completions [-n 300]

For each of N sequential `"stream": true` requests (after a few unmeasured ones) it records
the time from sending to the response headers, to the first body bytes (the first SSE
event) and to the end of the stream. Sequential, so that it measures latency, not queueing.
Prints one JSON object with the percentiles, in milliseconds.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

import aiohttp
import uvloop

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import percentile
from pacer import chat_body, headers_for


async def run(args: argparse.Namespace) -> dict:
    body = chat_body(stream=True)
    headers = headers_for(args.host, args.auth)
    head: list[float] = []
    first: list[float] = []
    whole: list[float] = []
    statuses: Counter[str] = Counter()
    timeout = aiohttp.ClientTimeout(total=args.timeout)
    async with aiohttp.ClientSession(timeout=timeout, skip_auto_headers=("User-Agent",)) as session:
        for i in range(args.warmup + args.n):
            start = time.perf_counter()
            async with session.post(args.url, data=body, headers=headers) as resp:
                t_head = time.perf_counter()
                chunk = await resp.content.readany()
                t_first = time.perf_counter()
                while chunk:
                    chunk = await resp.content.readany()
                t_end = time.perf_counter()
                status = str(resp.status)
            if i >= args.warmup:
                head.append(t_head - start)
                first.append(t_first - start)
                whole.append(t_end - start)
                statuses[status] += 1
    out: dict = {"n": args.n, "statuses": dict(statuses)}
    for name, values in (("headers", head), ("first_byte", first), ("complete", whole)):
        values.sort()
        for q in (50, 90, 99):
            out[f"{name}_p{q}_ms"] = percentile(values, q) * 1000
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("-n", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=30)
    parser.add_argument("--host", default="trlp-tutorial.example.com", help="Host header")
    parser.add_argument("--auth", default="APIKEY iamagolduser", help="Authorization header")
    parser.add_argument("--timeout", type=float, default=10)
    args = parser.parse_args()
    print(json.dumps(uvloop.run(run(args))))


if __name__ == "__main__":
    main()
