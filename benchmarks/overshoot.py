"""Overshoot and utilisation under concurrency: check-then-report (Kuadrant) against
reservations, with and without an admission wait.

    .venv/bin/python benchmarks/overshoot.py [--concurrent 64] [--limit 400] [--left 150]

For each store (memory, Redis) and mode, a gateway serves the tutorial's manifests with the
gold user's limit set to `--limit` tokens per hour and a simulator answering after 300 ms (so
that requests are in flight together). The user first spends all but about `--left` tokens
one request at a time, then `--concurrent` requests arrive at once. The table shows how
many were admitted and how far the tokens used went past the limit. Reservation mode holds
each request's estimate (prompt tokens + max_tokens) before forwarding, so it admits what
fits; check-then-report admits every request that arrives before the first one reports.

The second table is utilisation (issue 21's burst): `--burst` clients (48) at once on a
fresh 300-token-a-minute limit, each asking `max_tokens: 20` and honouring Retry-After
(`retry-after-ms`) as the OpenAI SDK does, for `--seconds` (12). It shows the share of the
limit served in that time beside the overshoot, for check-then-report, reservations, and
reservations with `wait: 2s`.
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


def manifests(
    folder: Path, limit: int, reserve: bool, window: str = "1h", reservation: str = "{}"
) -> None:
    for src in sorted(TUTORIAL.glob("*.yaml")):
        text = src.read_text()
        text = text.replace(
            '          - "8000"\n',
            '          - "8000"\n          - --time-to-first-token\n          - "300"\n',
        )
        text = text.replace(
            "- limit: 200 # 200 tokens per minute for gold users (small for testing)\n"
            "          window: 1m",
            f"- limit: {limit}\n          window: {window}",
        )
        if reserve:
            text = text.replace(
                "        - expression: auth.identity.userid\n    gold:",
                "        - expression: auth.identity.userid\n    gold:\n      reservation: "
                + reservation,
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


async def honouring(port: int, n: int, seconds: float) -> dict:
    """`n` clients at once, each retrying after `retry-after-ms` until served or told to
    wait past `seconds`: tokens served, and the refusals by kind."""
    deadline = time.monotonic() + seconds
    served, held, spent, longest = 0, 0, 0, 0.0
    connector = aiohttp.TCPConnector(limit=n + 8)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one() -> None:
            nonlocal served, held, spent, longest
            while time.monotonic() < deadline:
                async with session.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", data=BODY, headers=HEADERS
                ) as r:
                    doc = await r.json(content_type=None)
                    if r.status == 200:
                        served += doc["usage"]["total_tokens"]
                        return
                    wait = int(r.headers["retry-after-ms"]) / 1000
                if doc["error"]["code"] == "rate_limit_held":
                    held += 1
                    longest = max(longest, wait)
                else:
                    spent += 1
                if time.monotonic() + wait > deadline:
                    return
                await asyncio.sleep(wait)

        await asyncio.gather(*(one() for _ in range(n)))
    return {"served": served, "held": held, "spent": spent, "longest_held_wait": longest}


def gateway(name: str, folder: Path, redis: Redis | None, logs: Path) -> tuple[Proc, int]:
    """A gateway on the manifests in `folder` (counters in `redis`, flushed, when given),
    ready to serve: the process and its port."""
    port, admin = free_port(), free_port()
    cmd = [sys.executable, "-m", "tokengateway", "serve", "-f", str(folder)]
    cmd += ["--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}"]
    cmd += ["--state-dir", str(folder / "state"), "--no-access-log"]
    if redis is not None:
        redis.flush()
        cmd += ["--storage", redis.url]
    gw = Proc(name, cmd, logs)
    wait_http(gw, port)
    return gw, port


def utilisation(
    store: str, redis: Redis | None, mode: str, args: argparse.Namespace, logs: Path
) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="utilisation-"))
    try:
        reservation = "{wait: 2s}" if mode == "wait" else "{}"
        manifests(folder, 300, mode != "check", window="1m", reservation=reservation)
        gw, port = gateway(f"gateway-{store}-{mode}", folder, redis, logs)
        try:
            row = asyncio.run(honouring(port, args.burst, args.seconds))
        finally:
            gw.stop()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    names = {
        "check": "check-then-report (Kuadrant)",
        "reserve": "reservation",
        "wait": "reservation, wait: 2s",
    }
    return {"store": store, "mode": names[mode], **row}


def run(
    store: str, redis: Redis | None, reserve: bool, args: argparse.Namespace, logs: Path
) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="overshoot-"))
    try:
        manifests(folder, args.limit, reserve)
        gw, port = gateway(
            f"gateway-{store}-{'reserve' if reserve else 'check'}", folder, redis, logs
        )
        try:
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
    parser.add_argument("--burst", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--no-redis", action="store_true")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="overshoot-logs-"))
    redis = None if args.no_redis else Redis(logs)
    rows = []
    used = []
    try:
        for store in ("memory", "redis"):
            if store == "redis" and redis is None:
                continue
            shared = redis if store == "redis" else None
            for reserve in (False, True):
                rows.append(run(store, shared, reserve, args, logs))
            for mode in ("check", "reserve", "wait"):
                used.append(utilisation(store, shared, mode, args, logs))
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
    print(
        f"\n{args.burst} clients at once on a fresh 300-token-a-minute limit, honouring "
        f"Retry-After for {args.seconds:g} s\n"
    )
    print(
        "| store | mode | tokens served | of the limit | over the limit | 429 by holds "
        "| 429 spent | longest wait told by holds |"
    )
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for r in used:
        print(
            f"| {r['store']} | {r['mode']} | {r['served']} | {100 * r['served'] / 300:.0f} % "
            f"| {max(0, r['served'] - 300)} | {r['held']} | {r['spent']} "
            f"| {r['longest_held_wait']:.2f} s |"
        )


if __name__ == "__main__":
    main()
