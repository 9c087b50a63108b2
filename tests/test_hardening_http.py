"""Hardening at the HTTP and connection level, against a real `tokengateway serve` over real
sockets on loopback (raw sockets for protocol abuse): slow clients, thousands of idle
connections, request smuggling, header injection, Authorization edge cases, oversized bodies.

Every case checks what reached the upstream (a recording test upstream): nothing that should
not, and never a hidden second request."""

from __future__ import annotations

import contextlib
import json
import resource
import select
import socket
import time
import weakref
from dataclasses import dataclass

import httpx
import pytest

from tests.conftest import HOST, TUTORIAL, chat

FREE = "iamafreeuser"
GOLD = "iamagolduser"
CHAT = json.dumps(chat(max_tokens=5)).encode()
COMPLETION = json.dumps(
    {
        "id": "x",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}}],
        "usage": {"prompt_tokens": 1, "completion_tokens": 0, "total_tokens": 1},
    }
).encode()
#: what a smuggling attempt hides after its first request: a path no honest request uses
SMUGGLED = (
    f"GET /v1/smuggled HTTP/1.1\r\nHost: {HOST}\r\nAuthorization: APIKEY {FREE}\r\n\r\n".encode()
)


@pytest.fixture
def recorder(upstream):
    return upstream(lambda path, body: (200, {"content-type": "application/json"}, COMPLETION))


@pytest.fixture
def gateway(start_gateway, recorder):
    """The tutorial's gateway in front of `recorder`, with extra `serve` options."""

    def start(*args: str):
        backend = f"trlp-tutorial-llm-sim={recorder.url}"
        return start_gateway(TUTORIAL, args=("--backend", backend, *args))

    return start


# --- raw HTTP ---------------------------------------------------------------------------


def head(*lines: bytes, method: bytes = b"POST", path: bytes = b"/v1/chat/completions") -> bytes:
    """A request head: the request line, Host, then `lines` as given."""
    out = [method + b" " + path + b" HTTP/1.1", b"Host: " + HOST.encode(), *lines]
    return b"\r\n".join(out) + b"\r\n\r\n"


def auth(key: str = FREE) -> bytes:
    return f"Authorization: APIKEY {key}".encode()


def post(
    body: bytes = CHAT, *lines: bytes, key: str | None = FREE, path: bytes = b"/v1/chat/completions"
) -> bytes:
    """A complete, well-formed request (a chat completion unless told otherwise)."""
    extra = [auth(key)] if key is not None else []
    length = b"Content-Length: %d" % len(body)
    return head(*extra, b"Content-Type: application/json", length, *lines, path=path) + body


def connect(gw, timeout: float = 5.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", gw.port), timeout=timeout)


@dataclass
class Response:
    status: int
    headers: dict[bytes, list[bytes]]
    body: bytes

    def header(self, name: bytes) -> bytes | None:
        values = self.headers.get(name)
        return values[0] if values else None

    def error(self) -> dict:
        """OpenAI's error envelope, checked for its four fields."""
        doc = json.loads(self.body)
        assert set(doc["error"]) == {"message", "type", "param", "code"}, doc
        return doc["error"]


#: bytes read past the end of a response: the start of the next one on that connection
_after: weakref.WeakKeyDictionary[socket.socket, bytes] = weakref.WeakKeyDictionary()


def read_response(sock: socket.socket, timeout: float = 5.0) -> Response:
    """One response; what arrived after it is kept for the next call (pipelined answers
    may come in one read)."""
    sock.settimeout(timeout)
    buf = _after.pop(sock, b"")
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            raise EOFError(f"connection closed after {buf[:200]!r}")
        buf += chunk
    raw_head, _, rest = buf.partition(b"\r\n\r\n")
    lines = raw_head.split(b"\r\n")
    headers: dict[bytes, list[bytes]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(b":")
        headers.setdefault(name.strip().lower(), []).append(value.strip())
    if headers.get(b"transfer-encoding") == [b"chunked"]:
        while not rest.endswith(b"0\r\n\r\n"):
            rest += sock.recv(65536)
        body, data = b"", rest
        while True:
            size_line, _, data = data.partition(b"\r\n")
            size = int(size_line, 16)
            if size == 0:
                _after[sock] = data.partition(b"\r\n")[2]
                break
            body, data = body + data[:size], data[size + 2 :]
    else:
        length = int(headers.get(b"content-length", [b"0"])[0])
        while len(rest) < length:
            chunk = sock.recv(65536)
            if not chunk:
                raise EOFError("connection closed in the middle of a body")
            rest += chunk
        body = rest[:length]
        _after[sock] = rest[length:]
    return Response(int(lines[0].split()[1]), headers, body)


def exchange(gw, data: bytes, timeout: float = 5.0) -> Response:
    with connect(gw, timeout) as s:
        s.sendall(data)
        return read_response(s, timeout)


def closed(sock: socket.socket, within: float = 3.0) -> bool:
    """True once the gateway closed the connection (end of file or reset) within `within`
    seconds, whatever it sent before."""
    deadline = time.monotonic() + within
    try:
        while True:
            sock.settimeout(max(0.01, deadline - time.monotonic()))
            if not sock.recv(65536):
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def answer_or_reset(sock: socket.socket) -> Response | None:
    """The gateway's answer, or None when it closed or reset the connection without one."""
    try:
        return read_response(sock)
    except (EOFError, ConnectionResetError, BrokenPipeError):
        return None


def paths(recorder) -> list[str]:
    return [path for path, _, _ in recorder.requests]


def serves(gw, key: str = FREE) -> None:
    """The gateway still answers a normal request, quickly."""
    start = time.monotonic()
    r = gw.client(key).post("/v1/chat/completions", json=chat(max_tokens=5))
    assert r.status_code == 200, r.text
    assert time.monotonic() - start < 2.0


# --- 1. slow clients ----------------------------------------------------------------------


def test_slow_headers_get_408_and_the_connection_is_closed(gateway, recorder) -> None:
    gw = gateway("--header-timeout", "1")

    # a slowloris: one more header byte every 0.1 s, never the end of the head
    with connect(gw) as s:
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: " + HOST.encode() + b"\r\n")
        start = time.monotonic()
        for byte in b"X-Slow: " + b"a" * 100:
            if select.select([s], [], [], 0.1)[0]:
                break
            try:
                s.sendall(bytes([byte]))
            except OSError:
                break
        r = read_response(s)
        elapsed = time.monotonic() - start
        assert r.status == 408
        assert r.header(b"connection") == b"close"
        assert r.error()["code"] == "request_timeout"
        assert r.error()["type"] == "invalid_request_error"
        assert 0.8 < elapsed < 3, elapsed
        assert closed(s)

    # a connection that never sends a byte is closed without an answer
    with connect(gw) as s:
        s.settimeout(3)
        start = time.monotonic()
        assert s.recv(100) == b""
        assert 0.8 < time.monotonic() - start < 3

    # the bound applies to each request on a kept-alive connection, from its first byte
    with connect(gw) as s:
        s.sendall(post())
        assert read_response(s).status == 200
        time.sleep(1.2)  # idle between requests: the keep-alive timeout's business
        s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\n")
        start = time.monotonic()
        assert read_response(s).status == 408
        assert 0.8 < time.monotonic() - start < 3

    serves(gw)
    assert paths(recorder) == ["/v1/chat/completions"] * 2


def test_slow_body_gets_408_but_a_steady_one_passes(gateway, recorder) -> None:
    gw = gateway("--body-timeout", "1")

    # half a body, then nothing
    with connect(gw) as s:
        full = post()
        s.sendall(full[: len(full) - 20])
        start = time.monotonic()
        r = read_response(s)
        assert r.status == 408, r
        assert 0.8 < time.monotonic() - start < 3
        assert r.error() | {"message": ""} == {
            "message": "",
            "type": "invalid_request_error",
            "param": None,
            "code": "request_timeout",
        }
        assert r.header(b"connection") == b"close"
        assert closed(s)

    # the same with a chunked body
    with connect(gw) as s:
        s.sendall(head(auth(), b"Transfer-Encoding: chunked") + b"%x\r\n%s\r\n" % (5, CHAT[:5]))
        assert read_response(s).status == 408
        assert closed(s)

    # a body that keeps coming, each part within the timeout, is fine however long it takes
    with connect(gw) as s:
        full = post()
        step = len(full) // 4 + 1
        for i in range(0, len(full), step):
            s.sendall(full[i : i + step])
            time.sleep(0.5)
        assert read_response(s).status == 200

    # a client that leaves in the middle of its body: nothing goes upstream, nothing breaks
    with connect(gw) as s:
        s.sendall(full[: len(full) - 20])
        time.sleep(0.2)
    time.sleep(0.5)

    assert paths(recorder) == ["/v1/chat/completions"]
    serves(gw)
    output = gw.output()
    assert "Traceback" not in output and "Exception" not in output, output


def test_a_client_that_reads_nothing_of_its_answer_is_cut_off(start_gateway, upstream) -> None:
    big = json.dumps({"choices": [{"message": {"content": "x" * (16 << 20)}}]}).encode()
    up = upstream(
        lambda path, body: (
            200,
            {"content-type": "application/json"},
            big if path == "/v1/completions" else COMPLETION,
        )
    )
    gw = start_gateway(
        TUTORIAL, args=("--backend", f"trlp-tutorial-llm-sim={up.url}", "--body-timeout", "1")
    )
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    s.connect(("127.0.0.1", gw.port))
    with s:
        s.sendall(post(path=b"/v1/completions"))  # no token limit there: no estimate to make
        time.sleep(3.5)  # reads nothing: the gateway's buffers fill, then 1 s without progress
        received, ended = 0, False
        s.settimeout(2)
        try:
            while chunk := s.recv(1 << 20):
                received += len(chunk)
            ended = True
        except ConnectionResetError:
            ended = True
        except TimeoutError:
            pass
        assert ended
        assert received < len(big), "the whole answer waited for a client that never read"
    serves(gw)


# --- 2. idle connections ------------------------------------------------------------------


def _fds(needed: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        if hard != resource.RLIM_INFINITY and hard < needed:
            pytest.fail(f"this test needs {needed} open files; the hard limit is {hard}")
        resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise AssertionError("no VmRSS")


def test_thousands_of_idle_connections_cost_little_and_are_closed(gateway, recorder) -> None:
    _fds(2000 + 500)
    gw = gateway("--header-timeout", "3")
    serves(gw)
    before = _rss_kib(gw.proc.pid)
    idle = []
    try:
        for _ in range(2000):
            idle.append(connect(gw))
        time.sleep(0.3)  # every one accepted
        serves(gw)
        grown = _rss_kib(gw.proc.pid) - before
        assert grown < 48 * 1024, f"RSS grew by {grown} KiB for 2000 idle connections"

        # none of them sent a byte: each is closed when its header timeout runs out
        poller = select.poll()
        by_fd = {s.fileno(): s for s in idle}
        for fd in by_fd:
            poller.register(fd, select.POLLIN)
        ended: set[int] = set()
        deadline = time.monotonic() + 8
        while len(ended) < len(idle) and time.monotonic() < deadline:
            for fd, _ in poller.poll(200):
                try:
                    data = by_fd[fd].recv(100)
                except ConnectionResetError:
                    data = b""
                assert data == b"", data
                ended.add(fd)
                poller.unregister(fd)
        assert len(ended) == len(idle)
    finally:
        for s in idle:
            s.close()
    serves(gw)


def test_connections_over_the_cap_are_refused_and_the_others_go_on(gateway, recorder) -> None:
    gw = gateway("--max-connections", "50")
    time.sleep(0.3)  # the start-up probe's connection is gone
    working = connect(gw)
    working.sendall(post())
    assert read_response(working).status == 200
    idle = [connect(gw) for _ in range(49)]
    try:
        time.sleep(0.3)
        with connect(gw) as extra:  # the kernel accepts it; the gateway refuses it
            with contextlib.suppress(OSError):  # it may be closed already
                extra.sendall(post())
            r = answer_or_reset(extra)
            if r is not None:
                assert r.status == 503
                assert r.error()["code"] == "too_many_connections"
            assert closed(extra)
        # the connection in use goes on; the admin API has its own count
        working.sendall(post())
        assert read_response(working).status == 200
        assert httpx.get(gw.admin_url + "/healthz", timeout=5).status_code == 200
        for s in idle[:10]:
            s.close()
        time.sleep(0.3)
        serves(gw)
    finally:
        working.close()
        for s in idle:
            s.close()
    assert paths(recorder) == ["/v1/chat/completions"] * 3
    assert "refusing new ones" in gw.output()


# --- 3. request smuggling -----------------------------------------------------------------

_CHUNKED = b"Transfer-Encoding: chunked"
#: each: a request whose framing is ambiguous, then SMUGGLED where the ambiguity could hide it
REFUSED = {
    "Content-Length and chunked": head(auth(), b"Content-Length: 5", _CHUNKED)
    + b"0\r\n\r\n"
    + SMUGGLED,
    "chunked and Content-Length": head(auth(), _CHUNKED, b"Content-Length: 80")
    + b"0\r\n\r\n"
    + SMUGGLED,
    "two Content-Lengths": head(auth(), b"Content-Length: 0", b"Content-Length: %d" % len(SMUGGLED))
    + SMUGGLED,
    "the same Content-Length twice": head(auth(), b"Content-Length: 2", b"Content-Length: 2")
    + b"{}"
    + SMUGGLED,
    "a Content-Length list": head(auth(), b"Content-Length: 2, 2") + b"{}" + SMUGGLED,
    "a signed Content-Length": head(auth(), b"Content-Length: +2") + b"{}" + SMUGGLED,
    "chunked, identity": head(auth(), b"Transfer-Encoding: chunked, identity")
    + b"0\r\n\r\n"
    + SMUGGLED,
    "chunked then identity": head(auth(), _CHUNKED, b"Transfer-Encoding: identity")
    + b"0\r\n\r\n"
    + SMUGGLED,
    "an unknown coding": head(auth(), b"Transfer-Encoding: xchunked") + b"0\r\n\r\n" + SMUGGLED,
    "a space before the colon": head(auth(), b"Transfer-Encoding : chunked", b"Content-Length: 5")
    + b"0\r\n\r\n"
    + SMUGGLED,
    "a folded Transfer-Encoding": head(auth(), b"Transfer-Encoding:", b" chunked")
    + b"0\r\n\r\n"
    + SMUGGLED,
    "a vertical tab": head(auth(), b"Transfer-Encoding: \x0bchunked") + b"0\r\n\r\n" + SMUGGLED,
    "a chunk size that is not hex": head(auth(), _CHUNKED) + b"zz\r\n{}\r\n0\r\n\r\n" + SMUGGLED,
    "a negative chunk size": head(auth(), _CHUNKED) + b"-2\r\n{}\r\n0\r\n\r\n" + SMUGGLED,
    "a chunk size with 0x": head(auth(), _CHUNKED) + b"0x2\r\n{}\r\n0\r\n\r\n" + SMUGGLED,
    "an overflowing chunk size": head(auth(), _CHUNKED) + b"1" + b"0" * 20 + b"\r\n" + SMUGGLED,
    "a chunk longer than its size": head(auth(), _CHUNKED) + b"1\r\n{}\r\n0\r\n\r\n" + SMUGGLED,
    "bare LF in chunks": head(auth(), _CHUNKED) + b"2\n{}\n0\n\n" + SMUGGLED,
    "bare LF in the head": b"POST /v1/chat/completions HTTP/1.1\nHost: x\n\n" + SMUGGLED,
    "an Upgrade with a body": head(
        auth(), b"Connection: Upgrade", b"Upgrade: h2c", b"Content-Length: %d" % len(SMUGGLED)
    )
    + SMUGGLED,
}


def test_request_smuggling_attempts_are_refused(gateway, recorder) -> None:
    gw = gateway()
    # the control: a request pipelined behind a well-formed one is served, so SMUGGLED
    # would show upstream if any attempt below let it through
    with connect(gw) as s:
        s.sendall(post() + SMUGGLED)
        assert read_response(s).status == 200
        assert read_response(s).status == 200
    assert paths(recorder) == ["/v1/chat/completions", "/v1/smuggled"]
    recorder.requests.clear()

    problems = []
    for name, payload in REFUSED.items():
        with connect(gw) as s:
            s.sendall(payload)
            r = answer_or_reset(s)
            if r is None or r.status != 400:
                problems.append(f"{name}: {r}")
            elif r.error()["code"] != "invalid_request":  # with the parser's reason
                problems.append(f"{name}: {r.error()}")
            elif not closed(s):
                problems.append(f"{name}: the connection stayed open")
    assert problems == []
    assert recorder.requests == []
    serves(gw)


def test_ambiguous_looking_requests_are_read_one_way(gateway, recorder) -> None:
    gw = gateway()

    # a GET whose body looks like a request: it is a body
    r = exchange(
        gw,
        head(auth(), b"Content-Length: %d" % len(SMUGGLED), method=b"GET", path=b"/v1/models")
        + SMUGGLED,
    )
    assert r.status == 200
    assert recorder.requests[-1][0] == "/v1/models"
    assert recorder.requests[-1][2] == SMUGGLED

    # an Upgrade we do not speak: answered as HTTP/1.1, then the connection closes and what
    # followed is never read as a request
    with connect(gw) as s:
        s.sendall(
            head(
                auth(),
                b"Connection: Upgrade",
                b"Upgrade: websocket",
                method=b"GET",
                path=b"/v1/models",
            )
            + SMUGGLED
        )
        r = read_response(s)
        assert r.status == 200
        assert r.header(b"connection") == b"close"
        assert closed(s)
    assert "upgrade" not in recorder.requests[-1][1]

    # trailers are not headers: neither forwarded nor used to authenticate
    trailer = b"2\r\n{}\r\n0\r\nX-Smuggled: 1\r\n\r\n"
    r = exchange(gw, head(auth(), _CHUNKED, path=b"/v1/models") + trailer)
    assert r.status == 200
    assert "x-smuggled" not in recorder.requests[-1][1]
    late_key = b"2\r\n{}\r\n0\r\nAuthorization: APIKEY " + FREE.encode() + b"\r\n\r\n"
    assert exchange(gw, head(_CHUNKED, path=b"/v1/models") + late_key).status == 401

    assert paths(recorder) == ["/v1/models"] * 3
    serves(gw)


# --- 4. header injection ------------------------------------------------------------------


def test_cr_lf_and_control_bytes_in_headers_are_refused(gateway, recorder) -> None:
    gw = gateway()
    for value in (b"a\rX-Evil: 1", b"a\nX-Evil: 1", b"a\x00b", b"a\x7fb", b"a\x0bb"):
        with connect(gw) as s:
            s.sendall(post(b"{}", b"X-Request-Id: " + value))
            r = read_response(s)
            assert r.status == 400, (value, r)
            assert r.error()["code"] == "invalid_request"
            assert closed(s)
    assert recorder.requests == []
    serves(gw)


def test_unusual_header_bytes_are_forwarded_and_echoed_without_injection(gateway, recorder) -> None:
    gw = gateway()
    request_id = b"caf\xe9-\xff%0d%0aX-Evil:%201\t;"
    spoof = (b"X-Forwarded-For: 6.6.6.6", b"X-Forwarded-Proto: https")
    r = exchange(
        gw, post(CHAT, b"X-Request-Id: " + request_id, b"X-Note: \x80\x85 latin-1", *spoof)
    )
    assert r.status == 200
    assert r.header(b"x-request-id") == request_id  # the same bytes back, nothing more
    assert b"x-evil" not in r.headers
    _, sent, _ = recorder.requests[-1]
    assert "x-evil" not in sent
    for name in ("x-request-id", "x-note"):
        assert not any(c in sent[name] for c in "\r\n\x00"), sent[name]
    # the very bytes the client sent (the recorder reads them as Latin-1)
    assert sent["x-request-id"] == request_id.decode("latin-1")
    assert sent["x-note"] == "\x80\x85 latin-1"
    # the client's address and scheme are the connection's, whatever it claims
    assert sent["x-forwarded-for"] == "6.6.6.6, 127.0.0.1"
    assert sent["x-forwarded-proto"] == "http"


# --- 5. Authorization edge cases ----------------------------------------------------------


def test_authorization_edge_cases_are_4xx_and_never_reach_the_upstream(gateway, recorder) -> None:
    gw = gateway()
    secret = "s3cr3t-not-a-key"
    cases = {
        "missing": post(key=None),
        "empty": post(CHAT, b"Authorization:", key=None),
        "prefix only": post(CHAT, b"Authorization: APIKEY", key=None),
        "twice, both valid": post(CHAT, auth(GOLD)),
        "twice, one valid": post(CHAT, auth(secret)),
        "with spaces": post(key=f"{FREE} {secret}"),
        "two spaces": post(key=f" {FREE}"),
        "other scheme": post(CHAT, f"Authorization: Bearer {FREE}".encode(), key=None),
        "unicode": post(CHAT, f"Authorization: APIKEY {FREE}\u20ac{secret}".encode(), key=None),
        "latin-1": post(CHAT, b"Authorization: APIKEY " + FREE.encode() + b"\xe9", key=None),
        "10 KB": post(key=secret * 700),
    }
    for name, payload in cases.items():
        r = exchange(gw, payload)
        assert r.status == 401, (name, r)
        assert r.error()["type"] == "authentication_error", name

    # a 64 KB header block stops at the head size limit (32 KiB), the key in it or not
    for payload in (post(CHAT, b"X-Pad: " + b"a" * 65536), post(key=secret * 4096)):
        with connect(gw) as s:
            s.sendall(payload)
            r = read_response(s)
            assert r.status == 431, r
            assert r.error()["code"] == "request_header_too_large"
            assert closed(s)
    # and when it comes a header at a time, never ending
    with connect(gw) as s:
        s.sendall(head(auth())[:-2])
        for i in range(40):
            s.sendall(b"X-Pad-%d: %s\r\n" % (i, b"a" * 1000))
            time.sleep(0.002)
        r = read_response(s)
        assert r.status == 431
        assert closed(s)

    assert recorder.requests == []
    serves(gw)
    output = gw.output()
    assert secret not in output
    assert FREE not in output and GOLD not in output


# --- 6. body size -------------------------------------------------------------------------


def test_bodies_over_the_limit_get_413(gateway, recorder) -> None:
    gw = gateway("--max-body-size", "64KiB")

    # a Content-Length over the limit: answered before a byte of the body is sent
    for expect in ((), (b"Expect: 100-continue",)):
        with connect(gw) as s:
            s.sendall(head(auth(), b"Content-Length: %d" % (1 << 30), *expect))
            r = read_response(s)
            assert r.status == 413
            assert r.error()["code"] == "request_too_large"
            assert r.header(b"connection") == b"close"
            assert closed(s)

    # a chunked body that grows past it
    with connect(gw) as s:
        s.sendall(head(auth(), _CHUNKED))
        chunk = b"x" * 16384
        for _ in range(5):
            s.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
        r = read_response(s)
        assert r.status == 413
        assert r.error()["code"] == "request_too_large"
        assert closed(s)

    # at the limit is fine
    body = json.dumps(chat(content="y" * (65536 - 200), max_tokens=5)).encode()
    assert len(body) <= 65536
    assert exchange(gw, post(body)).status == 200
    assert len(recorder.requests) == 1
    serves(gw)
