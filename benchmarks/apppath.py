"""The data path in-process, without sockets: microseconds of gateway code per request.

    .venv/bin/python benchmarks/apppath.py [--profile] [--requests 20000]

The tutorial's compiled configuration (API key, Rego, TokenRateLimitPolicy) drives
`GatewayApp` through ASGI calls with an in-memory upstream that answers at once, so what is
timed is only this project's code per request: the admitted path (routing, auth, limits,
forwarding bookkeeping, usage, report, headers, metrics) and the refused one (the 429). The
HTTP server and client costs are what the load benchmarks add on top. `--profile` prints
cProfile's top entries for each path.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
from micro import CHAT_BODY, HEADERS, TUTORIAL, completion_body

from tokengateway.config.backends import parse_backend_overrides
from tokengateway.config.compile import CompiledConfig, compile_config
from tokengateway.dataplane.app import GatewayApp
from tokengateway.http.client import UpstreamResponse
from tokengateway.runtime.serve import load
from tokengateway.storage import MemoryStore

ANSWER = completion_body(600)


def config(limit: int) -> CompiledConfig:
    with tempfile.TemporaryDirectory() as tmp:
        for src in sorted(TUTORIAL.glob("*.yaml")):
            text = src.read_text()
            text = text.replace("limit: 50 ", f"limit: {limit} ").replace(
                "limit: 200 ", f"limit: {limit} "
            )
            (Path(tmp) / src.name).write_text(text)
        overrides = parse_backend_overrides(["trlp-tutorial-llm-sim=http://127.0.0.1:9"])
        loaded = load([tmp], overrides)
        urls = {k: p.url or "http://127.0.0.1:9" for k, p in loaded.plans.items()}
        return compile_config(loaded.resources, urls, strict=True)


class InstantUpstream:
    async def start(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def send_to(self, *args: Any, **kwargs: Any) -> UpstreamResponse:
        headers = [(b"content-type", b"application/json"), (b"server", b"bench")]
        return UpstreamResponse(200, headers, "application/json", ANSWER)


SCOPE = {
    "type": "http",
    "http_version": "1.1",
    "method": "POST",
    "scheme": "http",
    "path": "/v1/chat/completions",
    "raw_path": b"/v1/chat/completions",
    "query_string": b"",
    "headers": [(k.encode(), v.encode()) for k, v in HEADERS.items()],
    "client": ("127.0.0.1", 40000),
    "server": ("127.0.0.1", 8080),
}


async def _receive() -> dict[str, Any]:
    return {"type": "http.request", "body": CHAT_BODY, "more_body": False}


async def _run(app: GatewayApp, n: int, expect: int) -> float:
    statuses: list[int] = []

    async def send(message: dict[str, Any]) -> None:
        if message["type"] == "http.response.start":
            statuses.append(message["status"])

    started = time.process_time()
    for _ in range(n):
        await app(dict(SCOPE), _receive, send)
    elapsed = time.process_time() - started
    assert set(statuses) == {expect}, set(statuses)
    return elapsed / n * 1e6


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    import uvloop

    for name, limit, status in (("admitted (200)", 10**12, 200), ("refused (429)", 1, 429)):
        app = GatewayApp(config(limit), MemoryStore(), upstream=InstantUpstream())  # type: ignore[arg-type]
        if status == 429:  # one admitted request spends the limit of 1
            uvloop.run(_run(app, 1, 200))
        uvloop.run(_run(app, 2000, status))  # warm caches
        best = min(uvloop.run(_run(app, args.requests, status)) for _ in range(3))
        print(f"{name}: {best:.1f} us per request of gateway code")
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            uvloop.run(_run(app, args.requests, status))
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(18)


if __name__ == "__main__":
    main()
