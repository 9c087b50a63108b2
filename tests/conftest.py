"""Real servers on loopback: the gateway (the CLI in a subprocess) and small upstreams."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

from tokengateway.http.asgi import read_body

pytest_plugins = ["tests.redis_server", "tests.oidc_provider"]  # real servers, as fixtures

ROOT = Path(__file__).resolve().parent.parent
TUTORIAL = ROOT / "examples" / "tutorial"
HOST = "trlp-tutorial.example.com"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def free_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    sock.listen(512)
    sock.set_inheritable(True)
    return sock


class Gateway:
    """A `tokengateway serve` process on a loopback port, stopped by the fixture."""

    def __init__(
        self,
        paths: list[Path],
        args: list[str],
        log: Path,
        state_dir: Path,
        https: bool = False,
    ) -> None:
        sock = free_socket()
        admin = free_socket()
        tls = free_socket() if https else None
        #: the `--listen-https` port, with https=True
        self.https_port = tls.getsockname()[1] if tls is not None else 0
        self.port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{admin.getsockname()[1]}"
        self.log = log
        self.state_dir = state_dir
        cmd = [sys.executable, "-m", "tokengateway", "serve", "--fd", str(sock.fileno())]
        cmd += ["--admin-fd", str(admin.fileno()), "--state-dir", str(state_dir)]
        for p in paths:
            cmd += ["-f", str(p)]
        cmd += ["--listen", f"127.0.0.1:{self.port}", *args]
        fds = [sock.fileno(), admin.fileno()]
        if tls is not None:
            cmd += ["--listen-https-fd", str(tls.fileno())]
            fds.append(tls.fileno())
        self._log = open(log, "wb")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            cmd,
            pass_fds=fds,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=self._log,
        )
        sock.close()
        admin.close()
        if tls is not None:
            tls.close()
        deadline = time.monotonic() + 30
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway exited {self.proc.returncode}: {self.output()}")
            try:
                httpx.get(self.url + "/", timeout=1)
                break
            except httpx.TransportError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"gateway did not start: {self.output()}") from None
                time.sleep(0.05)

    def access_log(self, at_least: int = 0) -> list[dict]:
        """The JSON lines the gateway logged for routed requests (not the start-up probe),
        waiting briefly until there are `at_least`: a line is written after its response."""
        import json

        deadline = time.monotonic() + 5
        while True:
            lines = [json.loads(x) for x in self.output().splitlines() if x.startswith("{")]
            lines = [x for x in lines if x["route"] is not None]
            if len(lines) >= at_least or time.monotonic() > deadline:
                return lines
            time.sleep(0.02)

    def output(self) -> str:
        self._log.flush()
        return self.log.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self._log.close()

    def client(self, key: str | None = "iamafreeuser", prefix: str = "APIKEY") -> httpx.Client:
        headers = {"Host": HOST}
        if key is not None:
            headers["Authorization"] = f"{prefix} {key}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=30)


@pytest.fixture
def manifests(tmp_path: Path) -> Callable[..., Path]:
    """A copy of the tutorial's manifests with text replaced, plus extra documents."""

    def make(
        replace: dict[str, str] | None = None, extra: str = "", skip: tuple[str, ...] = ()
    ) -> Path:
        folder = tmp_path / f"manifests-{len(list(tmp_path.glob('manifests-*')))}"
        folder.mkdir()
        for src in sorted(TUTORIAL.glob("*.yaml")):
            if src.name in skip:
                continue
            text = src.read_text()
            for old, new in (replace or {}).items():
                text = text.replace(old, new)
            (folder / src.name).write_text(text)
        if extra:
            (folder / "99-extra.yaml").write_text(extra)
        return folder

    return make


@pytest.fixture
def start_gateway(tmp_path: Path) -> Iterator[Callable[..., Gateway]]:
    started: list[Gateway] = []

    def start(
        *paths: Path,
        args: tuple[str, ...] = (),
        state_dir: Path | None = None,
        https: bool = False,
    ) -> Gateway:
        n = len(started)
        state = state_dir or tmp_path / f"state-{n}"
        gw = Gateway(list(paths), list(args), tmp_path / f"gateway-{n}.log", state, https)
        started.append(gw)
        return gw

    yield start
    for gw in started:
        gw.stop()


def chat(content: str = "What is Kubernetes?", max_tokens: int = 100, **extra: object) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
        "stream": False,
        "usage": True,
        **extra,
    }


class Upstream:
    """A tiny OpenAI-shaped upstream whose answer each test chooses, run in a thread."""

    def __init__(
        self,
        handler: Callable[[str, bytes], tuple[int, dict[str, str], bytes]],
        tls: tuple[Path, Path] | None = None,
    ) -> None:
        """`tls`: (certificate, key) PEM files; the upstream then speaks HTTPS."""
        import uvicorn

        self.requests: list[tuple[str, dict[str, str], bytes]] = []
        self.queries: list[str] = []  # the query string of each request, in order
        self.raw_headers: list[list[tuple[str, str]]] = []  # each request's, repeats kept
        self.disconnects = 0

        async def app(scope, receive, send):  # type: ignore[no-untyped-def]
            if scope["type"] != "http":
                return
            body = await read_body(receive, 1 << 30) or b""
            headers = {k.decode(): v.decode("latin-1") for k, v in scope["headers"]}
            self.requests.append((scope["path"], headers, body))
            self.queries.append(scope.get("query_string", b"").decode("latin-1"))
            self.raw_headers.append(
                [(k.decode(), v.decode("latin-1")) for k, v in scope["headers"]]
            )
            result = handler(scope["path"], body)
            if hasattr(result, "__await__"):
                result = await result
            status, out_headers, payload = result
            await send(
                {
                    "type": "http.response.start",
                    "status": status,
                    "headers": [(k.encode(), v.encode()) for k, v in out_headers.items()],
                }
            )
            if isinstance(payload, bytes):
                await send({"type": "http.response.body", "body": payload})
                return
            gone = asyncio.ensure_future(receive())  # completes when the client disconnects
            try:
                async for chunk in payload:  # a stream: an async iterator of chunks
                    if gone.done():
                        self.disconnects += 1
                        return
                    await send({"type": "http.response.body", "body": chunk, "more_body": True})
            finally:
                gone.cancel()
            await send({"type": "http.response.body", "body": b""})

        sock = free_socket()
        self.port = sock.getsockname()[1]
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"
        certfile, keyfile = tls if tls is not None else (None, None)
        config = uvicorn.Config(
            app, log_level="error", lifespan="off", ssl_certfile=certfile, ssl_keyfile=keyfile
        )
        self._sock = sock
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(
            target=self.server.run, kwargs={"sockets": [sock]}, daemon=True
        )
        self.thread.start()
        deadline = time.monotonic() + 10
        while not self.server.started:
            if time.monotonic() > deadline:
                raise RuntimeError("test upstream did not start")
            time.sleep(0.01)

    def stop(self) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=5)
        with contextlib.suppress(OSError):
            self._sock.close()


@pytest.fixture
def upstream() -> Iterator[Callable[..., Upstream]]:
    made: list[Upstream] = []

    def make(
        handler: Callable[[str, bytes], tuple[int, dict[str, str], bytes]],
        tls: tuple[Path, Path] | None = None,
    ) -> Upstream:
        up = Upstream(handler, tls)
        made.append(up)
        return up

    yield make
    for up in made:
        up.stop()


def run_cli(
    *args: str, stdin: str | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    return subprocess.run(
        [sys.executable, "-m", "tokengateway", *args],
        input=stdin,
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


def require(tool: str) -> str:
    """A missing tool fails the run: never a silent skip in CI."""
    path = shutil.which(tool)
    if path is None:
        pytest.fail(f"{tool} is required by this test; `make test` installs it")
    return path


@contextlib.contextmanager
def unconnectable_port() -> Iterator[int]:
    """A loopback port nobody can connect to in time: its listener's backlog is full, so the
    kernel drops further SYNs and a connect hangs (until the connect timeout under test)."""
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.1", 0))
    blackhole.listen(0)
    port = blackhole.getsockname()[1]
    fillers = []
    try:
        for _ in range(4):
            s = socket.socket()
            fillers.append(s)
            s.setblocking(False)
            s.connect_ex(("127.0.0.1", port))
        yield port
    finally:
        for s in fillers:
            s.close()
        blackhole.close()
