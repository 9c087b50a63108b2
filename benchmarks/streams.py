"""Many concurrent streams through one gateway process: CPU per streamed chunk.

    .venv/bin/python benchmarks/streams.py [--streams 200] [--itl 20] [--tokens 100]

The built-in simulator streams `--tokens` words per answer, one SSE chunk per word every
`--itl` ms (20 ms: 50 chunks/s per stream). `--streams` clients stream at once, as the
gold user through the tutorial's policy path, for two rounds. Reported: chunks relayed per
second, the gateway's CPU per chunk (from its own /proc times), and from that how many
concurrent 50-chunk/s streams one process can carry at 100 % of a core.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import CLK_TCK, ROOT, Proc, free_port, stop_all, wait_http

TUTORIAL = ROOT / "src" / "tokengateway" / "tutorial"
HEADERS = {
    "Host": "trlp-tutorial.example.com",
    "Authorization": "APIKEY iamagolduser",
    "Content-Type": "application/json",
}


async def stream_all(port: int, streams: int, tokens: int) -> tuple[int, int]:
    """(chunks received, streams completed)."""
    body = json.dumps(
        {
            "model": "meta-llama/Llama-3.1-8B-Instruct",
            "messages": [{"role": "user", "content": "What is Kubernetes?"}],
            "max_tokens": tokens,
            "stream": True,
        }
    ).encode()
    connector = aiohttp.TCPConnector(limit=streams + 8)
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> tuple[int, bool]:
            chunks = 0
            async with session.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", data=body, headers=HEADERS
            ) as r:
                assert r.status == 200, await r.text()
                async for line in r.content:
                    if line.startswith(b"data: "):
                        chunks += 1
            return chunks, True

        results = await asyncio.gather(*(one() for _ in range(streams)))
    return sum(c for c, _ in results), sum(ok for _, ok in results)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--streams", type=int, default=200)
    parser.add_argument("--itl", type=int, default=20, help="ms between chunks")
    parser.add_argument("--tokens", type=int, default=100, help="chunks per stream")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="streams-"))
    for src in sorted(TUTORIAL.glob("*.yaml")):
        text = src.read_text().replace("limit: 200 ", "limit: 1000000000000 ")
        text = text.replace(
            '          - "8000"\n',
            f'          - "8000"\n          - --mode\n          - random\n'
            f'          - --inter-token-latency\n          - "{args.itl}"\n',
        )
        (work / src.name).write_text(text)
    port, admin = free_port(), free_port()
    try:
        cmd = [sys.executable, "-m", "tokengateway", "serve", "-f", str(work)]
        cmd += ["--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}"]
        cmd += ["--state-dir", str(work / "state"), "--no-access-log"]
        gw = Proc("gateway", cmd, work)
        wait_http(gw, port)
        asyncio.run(stream_all(port, 10, 5))  # warm up
        cpu0, t0, kernel0 = gw.cpu(), time.monotonic(), kernel_seconds(gw.pid)
        chunks = streamed = 0
        for _ in range(2):
            c, s = asyncio.run(stream_all(port, args.streams, args.tokens))
            chunks += c
            streamed += s
        cpu, wall = gw.cpu() - cpu0, time.monotonic() - t0
        kernel = kernel_seconds(gw.pid) - kernel0
    finally:
        stop_all()
        shutil.rmtree(work, ignore_errors=True)
    per_chunk = cpu / chunks
    rate = 1000 / args.itl
    print(
        f"{streamed} streams of {args.tokens} chunks, {args.streams} at once, "
        f"{rate:g} chunks/s each"
    )
    print(
        "| chunks relayed/s | gateway CPU per chunk | of which in the kernel "
        "| gateway CPU busy | streams at 50/s per core |"
    )
    print("|---:|---:|---:|---:|---:|")
    print(
        f"| {chunks / wall:,.0f} | {per_chunk * 1e6:.1f} µs | {kernel / chunks * 1e6:.1f} µs "
        f"| {100 * cpu / wall:.0f} % | {1 / per_chunk / 50:,.0f} |"
    )


def kernel_seconds(pid: int) -> float:
    """System time of one process (stime, field 15 of /proc/PID/stat), in seconds."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    return int(stat[stat.rindex(")") + 2 :].split()[12]) / CLK_TCK


if __name__ == "__main__":
    main()
