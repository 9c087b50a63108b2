"""`tokengateway demo`: the tutorial's Step 7, replayed against a gateway it starts.

The first thing to show a newcomer: each request, its status and the tokens counted.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

from tokengateway.runtime.serve import bind_socket, parse_listen

HOST = "trlp-tutorial.example.com"
MODEL = "meta-llama/Llama-3.1-8B-Instruct"


def _request(base: str, path: str, key: str | None, body: dict | None) -> tuple[int, dict, dict]:
    headers = {"Host": HOST, "Content-Type": "application/json"}
    if key is not None:
        headers["Authorization"] = f"APIKEY {key}"
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(
        base + path, data=data, headers=headers, method="POST" if data else "GET"
    )
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:
            return resp.status, dict(resp.headers), json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        payload = err.read()
        try:
            doc = json.loads(payload or b"{}")
        except ValueError:
            doc = {}
        return err.code, dict(err.headers), doc


def _chat(question: str, max_tokens: int) -> dict:
    return {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "stream": False,
        "usage": True,
    }


def _show(label: str, status: int, headers: dict, doc: dict) -> None:
    detail = ""
    if "usage" in doc:
        detail = f"usage: {doc['usage']}"
    elif "error" in doc:
        detail = doc["error"].get("message", "")
        if status == 429:
            detail += f" (Retry-After: {headers.get('Retry-After') or headers.get('retry-after')})"
    print(f"  {label:<44} -> {status}  {detail}")


def _wait(base: str, proc: subprocess.Popen[bytes], timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"gateway exited with code {proc.returncode}")
        try:
            urllib.request.urlopen(base + "/", timeout=1)
            return
        except urllib.error.HTTPError:
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError("gateway did not start in time")


def run_demo(manifests: str, listen: str) -> int:
    host, port = parse_listen(listen)
    sock = bind_socket(host, port)
    admin = bind_socket(host, 0)
    port = sock.getsockname()[1]
    base = f"http://{host}:{port}"
    with tempfile.TemporaryDirectory() as state:
        cmd = [
            sys.executable,
            "-m",
            "tokengateway",
            "serve",
            "-f",
            manifests,
            "--fd",
            str(sock.fileno()),
            "--listen",
            f"{host}:{port}",
            "--admin-fd",
            str(admin.fileno()),
            "--state-dir",
            state,
            "--no-access-log",
        ]
        proc = subprocess.Popen(
            cmd,
            pass_fds=(sock.fileno(), admin.fileno()),
            stdin=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        sock.close()
        admin.close()
        return _replay(base, proc)


def _replay(base: str, proc: subprocess.Popen[bytes]) -> int:
    try:
        _wait(base, proc)
        print(f"Gateway on {base} serving the tutorial's manifests (Host: {HOST})\n")
        print("Step 3: connectivity")
        _show("GET /v1/models", *_request(base, "/v1/models", "iamafreeuser", None))
        for user, key, limit, question, max_tokens in (
            ("free", "iamafreeuser", 50, "What is Kubernetes?", 100),
            ("gold", "iamagolduser", 200, "Explain cloud native architecture", 200),
        ):
            print(f"\nStep 7: {user} user ({limit} tokens per minute, a counter per user)")
            counted = 0
            for i in range(1, 12):
                status, headers, doc = _request(
                    base, "/v1/chat/completions", key, _chat(question, max_tokens)
                )
                _show(f"{user} user, chat completion #{i}", status, headers, doc)
                if status == 429:
                    break
                counted += doc.get("usage", {}).get("total_tokens", 0)
                print(f"  {'':<44}    counted so far: {counted} of {limit}")
        print("\nAuthentication")
        _show("no API key", *_request(base, "/v1/chat/completions", None, _chat("hi", 10)))
        _show(
            "wrong API key", *_request(base, "/v1/chat/completions", "not-a-key", _chat("hi", 10))
        )
        return 0
    except RuntimeError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
