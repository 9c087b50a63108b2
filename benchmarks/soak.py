"""Soak: the gateway at full load for minutes, many distinct users, books checked at the end.

    .venv/bin/python benchmarks/soak.py [--minutes 3] [--users 100000] [--connections 32]

The tutorial's policy path (API key, Rego, TokenRateLimitPolicy) with the token limit
counted per `x-user` header instead of per API key, so that wrk's Lua script can spread the
load over `--users` distinct users (one counter each, windows of an hour: none expires
during the run). The upstream is the fixed-response one of the benchmarks (13 tokens per
answer). Reported: requests and errors, RSS every 10 s (after a 30 s warm-up it must stay
flat), live counters, and the books: tokens the upstream reported = tokens charged, in the
counter store and in `authorized_hits`.
"""

from __future__ import annotations

import argparse
import json
import re
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench import TOKENS_PER_ANSWER, parse_wrk, write_manifests
from common import BENCH, HOST, Proc, free_port, http_get, stop_all, wait_http

LUA = """
-- one of N users per request, as the x-user header
local users = tonumber(os.getenv("SOAK_USERS") or "100000")
wrk.method = "POST"
wrk.headers["Host"] = "trlp-tutorial.example.com"
wrk.headers["Authorization"] = "APIKEY iamagolduser"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model": "meta-llama/Llama-3.1-8B-Instruct", '
  .. '"messages": [{"role": "user", "content": "What is Kubernetes?"}], "max_tokens": 20}'
request = function()
  wrk.headers["x-user"] = "user-" .. math.random(1, users)
  return wrk.format()
end
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--minutes", type=float, default=3.0)
    parser.add_argument("--users", type=int, default=100_000)
    parser.add_argument("--connections", type=int, default=32)
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="soak-"))
    folder = write_manifests(
        work / "manifests",
        {
            "- limit: 200 # 200 tokens per minute for gold users (small for testing)\n"
            "          window: 1m": "- limit: 1000000000\n          window: 1h",
            '            auth.identity.groups.split(",").exists(g, g == "gold")\n'
            "      counters:\n        - expression: auth.identity.userid": (
                '            auth.identity.groups.split(",").exists(g, g == "gold")\n'
                "      counters:\n        - expression: request.headers['x-user']"
            ),
        },
    )
    script = work / "soak.lua"
    script.write_text(LUA)
    up_port, gw_port, admin_port = free_port(), free_port(), free_port()
    try:
        upstream = Proc(
            "upstream", [sys.executable, str(BENCH / "upstream.py"), "--port", str(up_port)], work
        )
        wait_http(upstream, up_port)
        cmd = [sys.executable, "-m", "tokengateway", "serve", "-f", str(folder)]
        cmd += ["--listen", f"127.0.0.1:{gw_port}", "--admin", f"127.0.0.1:{admin_port}"]
        cmd += ["--state-dir", str(work / "state"), "--no-access-log"]
        cmd += ["--backend", f"trlp-tutorial-llm-sim=http://127.0.0.1:{up_port}"]
        gw = Proc("gateway", cmd, work)
        wait_http(gw, gw_port)
        seconds = int(args.minutes * 60)
        samples: list[tuple[float, float]] = []
        done = threading.Event()

        def sample() -> None:
            started = time.monotonic()
            while not done.wait(10):
                samples.append((time.monotonic() - started, gw.rss_mb()))

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        wrk = ["wrk", "-t", "1", "-c", str(args.connections), "-d", f"{seconds}s"]
        wrk += [
            "--timeout",
            "5s",
            "-s",
            str(script),
            f"http://{HOST}:{gw_port}/v1/chat/completions",
        ]
        load = subprocess.run(
            wrk,
            capture_output=True,
            text=True,
            timeout=seconds + 60,
            env={"SOAK_USERS": str(args.users), "PATH": "/usr/bin:/bin"},
            check=True,
        )
        done.set()
        sampler.join()
        result = parse_wrk(load.stdout)
        time.sleep(2)  # requests wrk left in flight finish (and are charged) before the count
        stats = json.loads(http_get(up_port, "/__stats"))
        counters = json.loads(http_get(admin_port, "/counters/default/trlp-tutorial-llm-sim"))
        metrics = http_get(admin_port, "/metrics").decode()
        hits = sum(
            float(v)
            for v in re.findall(
                r'^authorized_hits\{[^}]*limit_name="[^"]*/gold"\} (\S+)$', metrics, re.M
            )
        )
        rss_end = gw.rss_mb()
    finally:
        stop_all()
    reported = stats["requests"] * TOKENS_PER_ANSWER
    charged = sum(c["value"] for c in counters)
    warm = [mb for t, mb in samples if t >= 30]
    print(f"{args.minutes:g} min at full load, {args.connections} connections, {args.users} users")
    print(f"requests: {result['requests']}  ({result['rps']:.0f}/s)")
    print(f"errors: non-2xx {result['non2xx']}, sockets {result['socket_errors'] or 'none'}")
    print(f"live counters: {len(counters)}")
    print(f"tokens reported by the upstream: {reported}")
    print(f"tokens charged in the store: {charged}; authorized_hits: {hits:.0f}")
    print(f"tokens lost: {reported - charged}")
    if warm:
        print(f"RSS after warm-up: {warm[0]:.0f} MB -> {max(warm):.0f} MB max", end="")
        print(f", {rss_end:.0f} MB at the end")
    print("RSS samples (s, MB):", ", ".join(f"{t:.0f}:{mb:.0f}" for t, mb in samples))


if __name__ == "__main__":
    main()
