"""The SSE reader alone: µs of CPU per stream relayed through `SSEStream`, in-process.

    .venv/bin/python benchmarks/sse.py [--repeats 7]

The stream is the fixed upstream's (benchmarks/upstream.py): 14 events, a `"usage":null`
member in each and the usage-only chunk before `data: [DONE]`, read with `hide_usage` on
as the gateway reads it when it asked for usage the client did not ask for. Each case
builds a new reader, feeds it and closes it, and checks that the client's bytes are the
stream without the usage (so a faster reader cannot be a wrong one). Cases:

- one read: the whole stream in one chunk (how the fixed upstream's answer arrives);
- one event per read: as a model streams token by token;
- CRLF: the same with CRLF line ends (as sse-starlette writes them), in one read, and cut
  every 7 bytes (a CR at the end of a read: the line-by-line path);
- 1,000 events: a long answer, one event per read (per event, µs).

The figure is the median over `--repeats` runs of a `perf_counter_ns` loop sized to about
0.1 s, with the minimum beside it.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from upstream import STREAM

from tokengateway.wire.usage import SSEStream

#: the stream as the client asked for it: no usage chunk, no `"usage":null` members
EXPECTED = re.sub(rb'data: \{[^\n]*"choices":\[\][^\n]*\n\n', b"", STREAM).replace(
    b',"usage":null', b""
)
EVENTS = [e + b"\n\n" for e in STREAM.split(b"\n\n")[:-1]]


def relay(chunks: list[bytes]) -> Callable[[], bytes]:
    def run() -> bytes:
        reader = SSEStream(hide_usage=True)
        out = [reader.feed(chunk) for chunk in chunks]
        out.append(reader.close())
        assert reader.usage is not None
        return b"".join(out)

    return run


def measure(fn: Callable[[], object], repeats: int) -> tuple[float, float]:
    """(median, min) µs per call."""
    start = time.perf_counter_ns()
    fn()
    once = max(time.perf_counter_ns() - start, 1)
    loops = max(1, int(0.1e9 / once))
    runs = []
    for _ in range(repeats):
        start = time.perf_counter_ns()
        for _ in range(loops):
            fn()
        runs.append((time.perf_counter_ns() - start) / loops / 1000)
    return statistics.median(runs), min(runs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=7)
    args = parser.parse_args()

    crlf = STREAM.replace(b"\n", b"\r\n")
    long_events = [EVENTS[1]] * 1000 + EVENTS[-3:]
    cases = [
        ("one read", relay([STREAM]), EXPECTED, 1),
        ("one event per read", relay(EVENTS), EXPECTED, 1),
        ("CRLF, one read", relay([crlf]), EXPECTED.replace(b"\n", b"\r\n"), 1),
        (
            "CRLF, cut every 7 bytes",
            relay([crlf[i : i + 7] for i in range(0, len(crlf), 7)]),
            EXPECTED.replace(b"\n", b"\r\n"),
            1,
        ),
        ("1,000 events, one per read (per event)", relay(long_events), None, len(long_events)),
    ]
    print(f"SSEStream, hide_usage on, {len(EVENTS)}-event stream of {len(STREAM)} B")
    print("| case | µs median | µs min |")
    print("|---|---:|---:|")
    for name, fn, expected, per in cases:
        got = fn()
        assert expected is None or got == expected, (name, got)
        median, best = measure(fn, args.repeats)
        print(f"| {name} | {median / per:.2f} | {best / per:.2f} |")


if __name__ == "__main__":
    main()
