"""Overshoot under concurrency: check-then-report (Kuadrant) against reservations.

    .venv/bin/python benchmarks/overshoot.py [--concurrent 64] [--limit 400] [--left 150]

For each store (memory, Redis) and mode, a gateway serves the tutorial's manifests with the
gold user's limit set to `--limit` tokens per hour and a simulator answering after 300 ms (so
that requests are in flight together). The user first spends all but about `--left` tokens
one request at a time, then `--concurrent` requests arrive at once. The table shows how
many were admitted and how far the tokens used went past the limit. Reservation mode holds
each request's estimate (prompt tokens + max_tokens) before forwarding, so it admits what
fits; check-then-report admits every request that arrives before the first one reports.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import sys
import tempfile
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import ROOT, Proc, Redis, free_port, http_post, stop_all, wait_http

TUTORIAL = ROOT / "src" / "tokengateway" / "tutorial"
HOST = "trlp-tutorial.example.com"
BODY = json.dumps(
    {
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "messages": [{"role": "user", "content": "What is Kubernetes?"}],
        "max_tokens": 20,
    }
).encode()
HEADERS = {"Host": HOST, "Authorization": "APIKEY iamagolduser", "Content-Type": "application/json"}


def manifests(folder: Path, limit: int, reserve: bool) -> None:
    for src in sorted(TUTORIAL.glob("*.yaml")):
        text = src.read_text()
        text = text.replace(
            '          - "8000"\n',
            '          - "8000"\n          - --time-to-first-token\n          - "300"\n',
        )
        text = text.replace(
            "- limit: 200 # 200 tokens per minute for gold users (small for testing)\n"
            "          window: 1m",
            f"- limit: {limit}\n          window: 1h",
        )
        if reserve:
            text = text.replace(
                "        - expression: auth.identity.userid\n    gold:",
                "        - expression: auth.identity.userid\n    gold:\n      reservation: {}",
            )
        (folder / src.name).write_text(text)


async def burst(port: int, n: int) -> list[tuple[int, int]]:
    """(status, total tokens) of `n` requests sent together."""
    connector = aiohttp.TCPConnector(limit=n + 8)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> tuple[int, int]:
            async with session.post(
                f"http://127.0.0.1:{port}/v1/chat/completions", data=BODY, headers=HEADERS
            ) as r:
                doc = await r.json(content_type=None)
                return r.status, (doc.get("usage") or {}).get("total_tokens", 0)

        return await asyncio.gather(*(one() for _ in range(n)))


def run(
    store: str, redis: Redis | None, reserve: bool, args: argparse.Namespace, logs: Path
) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="overshoot-"))
    try:
        manifests(folder, args.limit, reserve)
        port, admin = free_port(), free_port()
        cmd = [sys.executable, "-m", "tokengateway", "serve", "-f", str(folder)]
        cmd += ["--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}"]
        cmd += ["--state-dir", str(folder / "state"), "--no-access-log"]
        if redis is not None:
            redis.flush()
            cmd += ["--storage", redis.url]
        gw = Proc(f"gateway-{store}-{'reserve' if reserve else 'check'}", cmd, logs)
        try:
            wait_http(gw, port)
            spent = 0
            while spent < args.limit - args.left:
                status, body = http_post(port, "/v1/chat/completions", BODY, HEADERS)
                assert status == 200, body
                spent += json.loads(body)["usage"]["total_tokens"]
            results = asyncio.run(burst(port, args.concurrent))
        finally:
            gw.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    admitted = [tokens for status, tokens in results if status == 200]
    used = spent + sum(admitted)
    return {
        "store": store,
        "mode": "reservation" if reserve else "check-then-report (Kuadrant)",
        "left": args.limit - spent,
        "admitted": len(admitted),
        "refused": sum(1 for status, _ in results if status == 429),
        "used": used,
        "over": max(0, used - args.limit),
        "over_pct": round(100 * max(0, used - args.limit) / args.limit, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrent", type=int, default=64)
    parser.add_argument("--limit", type=int, default=400)
    parser.add_argument("--left", type=int, default=150)
    parser.add_argument("--no-redis", action="store_true")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="overshoot-logs-"))
    redis = None if args.no_redis else Redis(logs)
    rows = []
    try:
        for store in ("memory", "redis"):
            if store == "redis" and redis is None:
                continue
            for reserve in (False, True):
                rows.append(run(store, redis if store == "redis" else None, reserve, args, logs))
    finally:
        if redis is not None:
            redis.stop()
        stop_all()
    print(
        f"{args.concurrent} concurrent requests (max_tokens 20) on a {args.limit}-token limit "
        f"with about {args.left} left\n"
    )
    print("| store | mode | tokens left | admitted | refused | tokens used | over the limit |")
    print("|---|---|---:|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['store']} | {r['mode']} | {r['left']} | {r['admitted']} | {r['refused']} "
            f"| {r['used']} | {r['over']} ({r['over_pct']} %) |"
        )


if __name__ == "__main__":
    main()
