"""What live counters cost in the in-memory store (`memory://`): bytes each, µs per verb.

    .venv/bin/python benchmarks/memory.py [--counters 1000000] [--delta 1] [--samples 200000]
                                          [--json out.json]

One limit of the tutorial's shape, `--counters` users: keys
`default/trlp-tutorial-llm-sim\\x1fgateway-system/trlp-tutorial-token-limits/free\\x1f60000\\x1fuser-<i>`,
each counter opened by one `update` of `--delta` tokens. The window is an hour, so that none
ends during the run (the key's window field is the reference measurement's, 60000 ms). A
value past 256 is worth a try: a small int is shared, a larger one may cost its own object.

The resident set (VmRSS in /proc/self/status) is read before and after, each time after a
garbage collection; the difference divided by the counters is what one live counter costs
(key, value, window end, expiry bookkeeping, the dict slots). The CounterRef of each update
is dropped at once, as the gateway drops a request's, so only what the store keeps counts.

Then, with all of them live, `--samples` verbs on counters picked at random (one counter
each), as the gateway calls them on every request: `update` of a live counter, `check`, a
`check` then an `update` of the same CounterRef (a request without reservations),
`check_and_update`, and `reserve` then `commit`. The figures include awaiting the (never
suspending) coroutines.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import sys
import time
from pathlib import Path

from tokengateway.storage import CounterRef, MemoryStore

PREFIX = (
    "default/trlp-tutorial-llm-sim\x1fgateway-system/trlp-tutorial-token-limits/free"
    "\x1f60000\x1fuser-"
)
WINDOW = 3600.0
LIMIT = 1_000_000_000


def rss_bytes() -> int:
    """The resident set of this process (VmRSS), in bytes."""
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS in /proc/self/status")


def settled_rss() -> int:
    gc.collect()
    return rss_bytes()


async def fill(store: MemoryStore, n: int, delta: int) -> float:
    """Open `n` counters, one `update` each; µs per update."""
    start = time.perf_counter_ns()
    for i in range(n):
        amount = delta + 0 * i  # an int of its own (past 256), as each request's count is
        await store.update([CounterRef(f"{PREFIX}{i}", LIMIT, WINDOW)], [amount])
    return (time.perf_counter_ns() - start) / n / 1000


async def verbs(store: MemoryStore, n: int, samples: int) -> dict[str, float]:
    """µs per verb on live counters picked at random. Each run gets new CounterRefs (new key
    strings, their hash not computed yet), as each request of the gateway does; the figure
    is the best of three runs."""
    rng = random.Random(42)
    picks = [rng.randrange(n) for _ in range(samples)]

    def fresh() -> list[list[CounterRef]]:
        return [[CounterRef(f"{PREFIX}{i}", LIMIT, WINDOW)] for i in picks]

    async def update(refs: list[list[CounterRef]]) -> None:
        for one in refs:
            await store.update(one, [1])

    async def check(refs: list[list[CounterRef]]) -> None:
        for one in refs:
            await store.check(one, 1)

    async def check_then_update(refs: list[list[CounterRef]]) -> None:
        for one in refs:
            await store.check(one, 1)
            await store.update(one, [13])

    async def check_and_update(refs: list[list[CounterRef]]) -> None:
        for one in refs:
            await store.check_and_update(one, 1)

    async def reserve_commit(refs: list[list[CounterRef]]) -> None:
        for one in refs:
            await store.reserve(one, [20], [60.0], "r")
            await store.commit(one, [13], "r")

    out: dict[str, float] = {}
    for name, run in (
        ("update (live counter)", update),
        ("check", check),
        ("check, then update (a request)", check_then_update),
        ("check_and_update", check_and_update),
        ("reserve, then commit", reserve_commit),
    ):
        best = float("inf")
        for _ in range(3):
            refs = fresh()
            start = time.perf_counter_ns()
            await run(refs)
            best = min(best, (time.perf_counter_ns() - start) / samples / 1000)
        out[name] = best
    return out


async def measure(n: int, delta: int, samples: int) -> dict[str, object]:
    store = MemoryStore()
    before = settled_rss()
    create_us = await fill(store, n, delta)
    after = settled_rss()
    assert len(store) == n, len(store)
    timings = await verbs(store, n, samples)
    grown = after - before
    return {
        "counters": n,
        "delta": delta,
        "rss_before_mib": before / 2**20,
        "rss_after_mib": after / 2**20,
        "mib": grown / 2**20,
        "bytes_per_counter": grown / n,
        "us": {"update (new counter)": create_us, **timings},
        "python": sys.version.split()[0],
    }


def markdown(r: dict[str, object]) -> str:
    us = r["us"]
    assert isinstance(us, dict)
    lines = [
        f"{r['counters']:,} live counters in memory:// (values of {r['delta']}; "
        f"Python {r['python']})",
        "",
        "| measure | value |",
        "|---|---:|",
        f"| RSS growth | {r['mib']:.1f} MiB |",
        f"| per counter | {r['bytes_per_counter']:.0f} B |",
    ]
    lines += [f"| {name} | {value:.2f} µs |" for name, value in us.items()]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--counters", type=int, default=1_000_000)
    parser.add_argument("--delta", type=int, default=1, help="each counter's value")
    parser.add_argument("--samples", type=int, default=200_000)
    parser.add_argument("--json", type=Path, help="write the results here as JSON")
    args = parser.parse_args()
    result = asyncio.run(measure(args.counters, args.delta, args.samples))
    print(markdown(result))
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
