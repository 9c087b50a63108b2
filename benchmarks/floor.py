"""The floor under a refusal: what the HTTP server alone costs per request.

    .venv/bin/python benchmarks/floor.py [--seconds 6]

The gateway's HTTP server (http/server.py on uvloop, as `serve` configures it: every
connection-level defence on) in front of an ASGI app that answers every request with a
fixed 429 in OpenAI's envelope and does nothing else. Its CPU per request is what any
refusal costs before a single line of policy runs: the part of the 429 target that this
server spends by itself. For comparison, in the same run: plain uvicorn (uvloop, httptools,
no defences of ours) with the same app.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import textwrap
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import BENCH, HOST, Proc, free_port, parse_wrk, stop_all, wait_http

APP = textwrap.dedent(
    """
    import sys
    from tokengateway.runtime.serve import bind_socket

    BODY = (b'{"error": {"message": "rate limit exceeded", "type": "rate_limit_exceeded", '
            b'"param": null, "code": "rate_limit_exceeded"}}')
    HEADERS = [(b"content-type", b"application/json"), (b"content-length", str(len(BODY)).encode()),
               (b"retry-after", b"1")]

    async def app(scope, receive, send):
        if scope["type"] != "http":
            return
        await receive()
        await send({"type": "http.response.start", "status": 429, "headers": HEADERS})
        await send({"type": "http.response.body", "body": BODY})

    sock = bind_socket("127.0.0.1", int(sys.argv[1]))
    if sys.argv[2] == "ours":
        import uvloop
        from tokengateway.runtime.process import make_server

        uvloop.run(make_server(app).serve([sock]))
    else:
        import uvicorn

        config = uvicorn.Config(app, loop="uvloop", http="httptools", lifespan="off",
                                access_log=False, log_level="warning", server_header=False)
        uvicorn.Server(config).run(sockets=[sock])
    """
)

SERVERS = {
    "ours": "tokengateway's server (http/server.py) + uvloop + httptools",
    "uvicorn": "uvicorn + uvloop + httptools, no defences",
}


def measure(work: Path, script: Path, which: str, seconds: float) -> tuple[float, float]:
    """(requests per second, CPU ms per request) of one server, pinned to CPU 1."""
    port = free_port()
    try:
        server = Proc(
            f"floor-{which}", [sys.executable, str(script), str(port), which], work, cpus={1}
        )
        wait_http(server, port)
        wrk = ["wrk", "-t", "1", "-c", "32", "-s", str(BENCH / "chat.lua")]
        url = f"http://{HOST}:{port}/v1/chat/completions"
        subprocess.run([*wrk, "-d", "2s", url], capture_output=True, check=True)
        cpu0 = server.cpu()
        done = subprocess.run(
            [*wrk, "-d", f"{seconds:g}s", "--latency", url],
            capture_output=True,
            text=True,
            check=True,
        )
        cpu = server.cpu() - cpu0
        result = parse_wrk(done.stdout)
    finally:
        stop_all()
    return result["rps"], 1000 * cpu / result["requests"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seconds", type=float, default=6)
    args = parser.parse_args()
    work = Path("/tmp") / f"floor-{int(time.time())}"
    work.mkdir(parents=True, exist_ok=True)
    script = work / "floor_app.py"
    script.write_text(APP)
    rows = [(which, *measure(work, script, which, args.seconds)) for which in SERVERS]
    print("| server alone, fixed 429 | req/s | CPU per request |")
    print("|---|---:|---:|")
    for which, rps, per_request in rows:
        print(f"| {SERVERS[which]} | {rps:,.0f} | {per_request:.4f} ms |")


if __name__ == "__main__":
    main()
