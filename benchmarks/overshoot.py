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

The third table is two replicas (two gateway processes) on one Redis, check-then-report, for
the exact store (`redis://`) and the cached one (`redis+cached://`, at its default flush
period and at `--flush-period 0.1`): `--replica-clients` clients per replica (4) send
requests one after the other on a fresh `--paced-limit` (2000 tokens an hour) until each is
refused once; then the `--concurrent` burst, half to each replica, on a limit with about
`--left` left. A cached replica sees the other's reports only at its flushes, so it keeps
admitting for up to a flush period after the limit was crossed elsewhere.
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


def gateway(
    name: str,
    folder: Path,
    redis: Redis | None,
    logs: Path,
    extra: tuple[str, ...] = (),
    cached: bool = False,
    flush: bool = True,
) -> tuple[Proc, int]:
    """A gateway on the manifests in `folder` (counters in `redis`, flushed first unless
    `flush` is false, `redis+cached://` when `cached`), ready to serve: the process and its
    port."""
    port, admin = free_port(), free_port()
    cmd = [sys.executable, "-m", "tokengateway", "serve", "-f", str(folder)]
    cmd += ["--listen", f"127.0.0.1:{port}", "--admin", f"127.0.0.1:{admin}"]
    cmd += ["--state-dir", str(folder / f"state-{name}"), "--no-access-log", *extra]
    if redis is not None:
        if flush:
            redis.flush()
        url = redis.url.replace("redis://", "redis+cached://") if cached else redis.url
        cmd += ["--storage", url]
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


async def paced(ports: list[int], clients: int) -> list[tuple[int, int]]:
    """`clients` per port, each sending one request after another until refused once:
    (status, total tokens) of every request."""
    out: list[tuple[int, int]] = []
    connector = aiohttp.TCPConnector(limit=clients * len(ports) + 8)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def one(port: int) -> None:
            while True:
                async with session.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", data=BODY, headers=HEADERS
                ) as r:
                    doc = await r.json(content_type=None)
                    out.append((r.status, (doc.get("usage") or {}).get("total_tokens", 0)))
                    if r.status != 200:
                        return

        await asyncio.gather(*(one(p) for p in ports for _ in range(clients)))
    return out


async def halves(ports: list[int], half: int) -> list[tuple[int, int]]:
    a, b = await asyncio.gather(burst(ports[0], half), burst(ports[1], half))
    return a + b


def replicas(
    redis: Redis, flush_period: float | None, args: argparse.Namespace, logs: Path
) -> list[dict]:
    """Two gateways on one Redis (exact, or cached with `flush_period`; None: exact):
    the paced run, then the burst."""
    if flush_period is None:
        store, extra, cached = "redis:// (exact)", (), False
    else:
        store, cached = f"redis+cached://, flush {flush_period:g} s", True
        extra = ("--flush-period", f"{flush_period:g}") if flush_period != 1.0 else ()
    rows = []
    for scenario in ("paced", "burst"):
        folder = Path(tempfile.mkdtemp(prefix="replicas-"))
        limit = args.paced_limit if scenario == "paced" else args.limit
        try:
            manifests(folder, limit, False)
            gws = [
                gateway(
                    f"gw-{n}-{scenario}-{flush_period}", folder, redis, logs, extra, cached, n == 0
                )
                for n in range(2)
            ]
            ports = [port for _, port in gws]
            try:
                spent = 0
                if scenario == "burst":
                    n = 0
                    while spent < limit - args.left:
                        status, body = http_post(
                            ports[n % 2], "/v1/chat/completions", BODY, HEADERS
                        )
                        assert status == 200, body
                        spent += json.loads(body)["usage"]["total_tokens"]
                        n += 1
                    time.sleep(2 * (flush_period or 0))  # both replicas know what was spent
                    half = args.concurrent // 2

                    results = asyncio.run(halves(ports, half))
                else:
                    results = asyncio.run(paced(ports, args.replica_clients))
            finally:
                for gw, _ in gws:
                    gw.stop()
        finally:
            shutil.rmtree(folder, ignore_errors=True)
        admitted = [tokens for status, tokens in results if status == 200]
        used = spent + sum(admitted)
        rows.append(
            {
                "store": store,
                "scenario": (
                    f"{args.replica_clients} clients per replica, one request after another"
                    if scenario == "paced"
                    else f"{args.concurrent} at once, half to each"
                ),
                "limit": limit,
                "admitted": len(admitted),
                "used": used,
                "over": max(0, used - limit),
                "over_pct": round(100 * max(0, used - limit) / limit, 1),
                "biggest": max(admitted, default=0),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--concurrent", type=int, default=64)
    parser.add_argument("--limit", type=int, default=400)
    parser.add_argument("--left", type=int, default=150)
    parser.add_argument("--burst", type=int, default=48)
    parser.add_argument("--seconds", type=float, default=12.0)
    parser.add_argument("--no-redis", action="store_true")
    parser.add_argument("--paced-limit", type=int, default=2000)
    parser.add_argument("--replica-clients", type=int, default=4)
    parser.add_argument("--only-replicas", action="store_true", help="only the two-replica table")
    args = parser.parse_args()
    logs = Path(tempfile.mkdtemp(prefix="overshoot-logs-"))
    redis = None if args.no_redis else Redis(logs)
    rows = []
    used = []
    two: list[dict] = []
    try:
        for store in ("memory", "redis"):
            if args.only_replicas or (store == "redis" and redis is None):
                continue
            shared = redis if store == "redis" else None
            for reserve in (False, True):
                rows.append(run(store, shared, reserve, args, logs))
            for mode in ("check", "reserve", "wait"):
                used.append(utilisation(store, shared, mode, args, logs))
        if redis is not None:
            for flush_period in (None, 1.0, 0.1):
                two += replicas(redis, flush_period, args, logs)
    finally:
        if redis is not None:
            redis.stop()
        stop_all()
    if rows:
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

    if two:
        print(
            "\nTwo replicas on one Redis, check-then-report: tokens used past the limit "
            "(exact against cached)\n"
        )
        print(
            "| store | requests | limit | admitted | tokens used | over the limit | one request |"
        )
        print("|---|---|---:|---:|---:|---:|---:|")
        for r in two:
            print(
                f"| {r['store']} | {r['scenario']} | {r['limit']} | {r['admitted']} "
                f"| {r['used']} | {r['over']} ({r['over_pct']} %) | {r['biggest']} |"
            )


if __name__ == "__main__":
    main()
