"""The data path, one request from top to bottom.

    route -> read body -> authenticate/authorize -> check limits -> forward -> read usage
          -> report tokens

Each stage is a call into its own module (routing, auth, limits, proxy); this file only
translates between HTTP (ASGI) and those libraries, and owns the order of the stages.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid
from typing import Any

import msgspec

from tokengateway import auth as authlib
from tokengateway import cel
from tokengateway.gateway.accesslog import AccessLog, Entry
from tokengateway.gateway.config import CompiledConfig, RuleTarget
from tokengateway.gateway.errors import send_error
from tokengateway.gateway.types import Receive, Scope, Send, read_body
from tokengateway.limits import Applicable, Limiter, StorageUnavailable
from tokengateway.proxy.upstream import HOP_BY_HOP, Upstream, UpstreamError, UpstreamResponse
from tokengateway.proxy.usage import SSEStream, ask_for_usage, completion_text_of, usage_from_json
from tokengateway.storage import CheckResult, CounterStore
from tokengateway.tokens import Usage, estimate_usage

__all__ = ["GatewayApp"]

log = logging.getLogger("tokengateway.gateway")

DEFAULT_MAX_BODY = 8 * 1024 * 1024


class GatewayApp:
    """The ASGI application. `config` may be replaced at any time; a request keeps the one
    it started with."""

    def __init__(
        self,
        config: CompiledConfig,
        store: CounterStore,
        upstream: Upstream | None = None,
        max_body_bytes: int = DEFAULT_MAX_BODY,
        access_log: AccessLog | None = None,
        on_storage_error: str = "allow",
    ) -> None:
        self.config = config
        self.store = store
        self.limiter = Limiter(store, on_error=on_storage_error)
        self.upstream = upstream or Upstream()
        self.max_body_bytes = max_body_bytes
        self.access_log = access_log
        #: responses charged by an estimate because the upstream reported no usage
        self.estimated_usage = 0

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            entry = Entry(scope["method"], scope["path"])
            if self.access_log is not None:
                send = entry.recording(send)
            try:
                await self.handle(scope, receive, send, entry)
            except Exception:  # the last line of defence: never a stack trace to a client
                log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
                if not scope.get("tokengateway.started"):
                    await send_error(
                        send, 500, "internal gateway error", "server_error", "internal_error"
                    )
            if self.access_log is not None:
                self.access_log.write(entry)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.upstream.start()  # the store is started (and checked) before serving
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.upstream.close()
                await self.store.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def handle(self, scope: Scope, receive: Receive, send: Send, entry: Entry) -> None:
        config = self.config
        method: str = scope["method"]
        path: str = scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name = raw_name.decode("latin-1")
            value = raw_value.decode("latin-1")
            if name in headers:  # repeated headers are one list; cookies join with "; "
                value = f"{headers[name]}{'; ' if name == 'cookie' else ', '}{value}"
            headers[name] = value
        host = _hostname(headers.get("host", ""))

        # 1. route
        match = config.router.match(host, method, path, headers, query)
        if match is None:
            await send_error(
                send,
                404,
                f"no route for {host or '(no host)'}{path}",
                "not_found_error",
                "route_not_found",
            )
            return
        target: RuleTarget = match.target
        entry.route = target.route
        entry.host = host

        # 2. body (needed to forward, for requestBodyJSON and for estimates)
        body = await read_body(receive, self.max_body_bytes)
        if body is None:
            await send_error(
                send,
                413,
                f"request body larger than {self.max_body_bytes} bytes",
                "invalid_request_error",
                "request_too_large",
            )
            return

        request_id = headers.get("x-request-id") or str(uuid.uuid4())
        entry.request_id = request_id
        needs_attributes = target.auth is not None or bool(target.limits)
        well_known = (
            _well_known(scope, method, path, query, host, headers, body, request_id)
            if needs_attributes
            else {}
        )

        # 3. authenticate and authorize
        auth_binding: dict[str, Any] = {}
        upstream_extra: list[tuple[str, str]] = []
        if target.auth is not None:
            decision = target.auth.evaluate(
                authlib.AuthRequest(
                    method=method,
                    scheme=well_known["request"]["scheme"],
                    host=host,
                    path=well_known["request"]["path"],
                    headers=headers,
                    source_address=well_known["source"]["address"],
                    source_port=well_known["source"]["port"],
                    destination_address=well_known["destination"]["address"],
                    destination_port=well_known["destination"]["port"],
                    request_id=request_id,
                    well_known=well_known,
                )
            )
            if not decision.allowed:
                await _send_denied(send, decision)
                return
            auth_binding = decision.auth
            upstream_extra.extend(decision.success_headers)

        # 4. check limits
        applicable = Applicable()
        if target.limits:
            cel.bind_bodies(body)
            activation = cel.Activation({**well_known, "auth": auth_binding})
            applicable = self.limiter.applicable(
                target.limits,
                target.route,
                activation,
                body=body,
                reservations=config.reservations,
                default_ttl=target.timeout,
            )
            if applicable:
                try:
                    result = await self.limiter.check(applicable)
                except StorageUnavailable as exc:
                    await send_error(
                        send,
                        503,
                        f"rate limits cannot be checked: {exc}",
                        "service_unavailable",
                        "counter_store_unavailable",
                        headers=[("retry-after", "1")],
                    )
                    return
                if result.limited:
                    await _send_limited(send, result)
                    return

        # 5-7. forward, relay, report; a reservation is committed or released whatever happens
        usage: Usage | None = None
        try:
            usage = await self._forward(
                scope, receive, send, target, headers, body, applicable, request_id, upstream_extra
            )
        finally:
            if applicable.tokens:
                await self.limiter.report(applicable, usage)
        entry.usage = usage

    async def _forward(
        self,
        scope: Scope,
        receive: Receive,
        send: Send,
        target: RuleTarget,
        headers: dict[str, str],
        body: bytes,
        applicable: Applicable,
        request_id: str,
        upstream_extra: list[tuple[str, str]],
    ) -> Usage | None:
        """Send the request upstream and relay the answer; the usage to charge, if any."""
        method: str = scope["method"]
        path: str = scope["path"]
        query = scope.get("query_string", b"").decode("latin-1")

        # 5. forward
        if not target.backends:
            await send_error(
                send,
                500,
                f"route {target.route} has no usable backend",
                "server_error",
                "no_backend",
            )
            return None
        upstream_body, hide_usage = body, False
        if applicable.tokens:
            upstream_body, hide_usage = ask_for_usage(path, body)
        url = target.pick_backend() + path + (f"?{query}" if query else "")
        out_headers = _upstream_headers(scope, target, headers, request_id, upstream_extra)
        try:
            resp = await self.upstream.send(method, url, out_headers, upstream_body, target.timeout)
        except UpstreamError as exc:
            await _send_upstream_error(send, exc)
            return None

        # 6. relay the answer, reading its usage
        stream: SSEStream | None = None
        payload = b""
        if resp.content_type == "text/event-stream":
            stream = SSEStream(hide_usage)
            scope["tokengateway.started"] = True
            await self._relay_stream(resp, stream, receive, send, path)
            usage = stream.usage
        else:
            relayed = await self._relay_body(resp, send)
            if relayed is None:
                return None
            payload = relayed
            usage = usage_from_json(payload)

        # 7. what to report: a response without usage is charged an estimate
        if applicable.tokens and usage is None and 200 <= resp.status < 300:
            answer = stream.text if stream is not None else completion_text_of(payload)
            usage = estimate_usage(_json_or_none(body), answer)
            self.estimated_usage += 1
        return usage

    async def _relay_body(self, resp: UpstreamResponse, send: Send) -> bytes | None:
        try:
            payload = await resp.read()
        except UpstreamError as exc:
            await _send_upstream_error(send, exc)
            return None
        resp.headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": resp.status, "headers": resp.headers})
        await send({"type": "http.response.body", "body": payload})
        return payload

    async def _relay_stream(
        self, resp: UpstreamResponse, stream: SSEStream, receive: Receive, send: Send, path: str
    ) -> None:
        """Pass events on as they arrive. A client that goes away stops the upstream (its
        tokens so far are still charged); an upstream that breaks gets an error event."""
        await send({"type": "http.response.start", "status": resp.status, "headers": resp.headers})
        gone = asyncio.ensure_future(receive())  # completes when the client disconnects
        chunks = resp.chunks()
        failure: UpstreamError | None = None
        try:
            while True:
                step = asyncio.ensure_future(anext(chunks))
                await asyncio.wait((step, gone), return_when=asyncio.FIRST_COMPLETED)
                if not step.done():
                    step.cancel()
                    resp.close()
                    return
                try:
                    chunk = step.result()
                except StopAsyncIteration:
                    break
                except UpstreamError as exc:
                    failure = exc
                    log.warning("%s: %s", path, exc)
                    break
                out = stream.feed(chunk)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
        finally:
            gone.cancel()
        tail = stream.close(complete=failure is None)
        if failure is not None:
            tail += _stream_error(path, failure)
        await send({"type": "http.response.body", "body": tail})


def _upstream_headers(
    scope: Scope,
    target: RuleTarget,
    headers: dict[str, str],
    request_id: str,
    extra: list[tuple[str, str]],
) -> list[tuple[str, str]]:
    out = [
        (k, v)
        for k, v in headers.items()
        if k not in HOP_BY_HOP and not (target.auth is not None and k == "authorization")
    ]
    out.append(("x-forwarded-host", headers.get("host", "")))
    out.append(("x-forwarded-proto", scope.get("scheme", "http")))
    client = scope.get("client")
    if client:
        prior = headers.get("x-forwarded-for")
        out.append(("x-forwarded-for", f"{prior}, {client[0]}" if prior else client[0]))
    if "x-request-id" not in headers:
        out.append(("x-request-id", request_id))
    out.append(("accept-encoding", "identity"))
    out.extend(extra)
    return out


def _json_or_none(body: bytes) -> Any:
    try:
        return msgspec.json.decode(body) if body else None
    except msgspec.DecodeError:
        return None


def _stream_error(path: str, exc: UpstreamError) -> bytes:
    """The SSE event that tells a client the stream broke (the status is already sent)."""
    code = "upstream_timeout" if exc.kind == "timeout" else "upstream_failed"
    if path.endswith("/messages"):  # Anthropic's shape for its own clients
        body = {"type": "error", "error": {"type": "api_error", "message": str(exc)}}
        return b"event: error\ndata: " + msgspec.json.encode(body) + b"\n\n"
    error = {"message": str(exc), "type": "upstream_error", "param": None, "code": code}
    return b"data: " + msgspec.json.encode({"error": error}) + b"\n\n"


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1].lower()
    return host.rsplit(":", 1)[0].lower() if ":" in host else host.lower()


def _well_known(
    scope: Scope,
    method: str,
    path: str,
    query: str,
    host: str,
    headers: dict[str, str],
    body: bytes,
    request_id: str,
) -> dict[str, Any]:
    """Kuadrant's well-known attributes (Envoy's names): `request.path` includes the query."""
    client = scope.get("client") or ("", 0)
    server = scope.get("server") or ("", 0)
    full_path = f"{path}?{query}" if query else path
    return {
        "request": {
            "id": request_id,
            "method": method,
            "path": full_path,
            "url_path": path,
            "host": headers.get("host", host),
            "scheme": scope.get("scheme", "http"),
            "query": query,
            "headers": headers,
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "size": len(body),
            "protocol": f"HTTP/{scope.get('http_version', '1.1')}",
            "useragent": headers.get("user-agent", ""),
        },
        "source": {
            "address": client[0] or "",
            "port": int(client[1] or 0),
            "remote_address": client[0] or "",
        },
        "destination": {"address": server[0] or "", "port": int(server[1] or 0)},
    }


async def _send_denied(send: Send, decision: authlib.AuthDecision) -> None:
    if decision.body is not None:  # the policy's own deny body, sent as written
        payload = decision.body.encode()
        headers = [
            (k.lower().encode("latin-1"), v.encode("latin-1", "replace"))
            for k, v in decision.deny_headers
        ]
        if not any(k == b"content-type" for k, _ in headers):
            headers.append((b"content-type", b"text/plain; charset=utf-8"))
        headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": decision.status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
        return
    if decision.status == 401:
        type_, code = "authentication_error", "invalid_api_key"
        default = "authentication failed"
    else:
        type_, code = "permission_error", "permission_denied"
        default = "not allowed"
    message = decision.message or (f"{default}: {decision.reason}" if decision.reason else default)
    await send_error(send, decision.status, message, type_, code, headers=decision.deny_headers)


async def _send_limited(send: Send, result: CheckResult) -> None:
    retry = max(1, math.ceil(result.retry_after))
    state = result.states[result.limiting] if result.limiting is not None else None
    limit = state.ref.limit if state else 0
    window = _window_text(state.ref.window) if state else "window"
    await send_error(
        send,
        429,
        f"rate limit exceeded: limit of {limit} per {window} reached; retry in {retry}s",
        "rate_limit_exceeded",
        "rate_limit_exceeded",
        headers=[("retry-after", str(retry))],
    )


def _window_text(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds >= 1:
        return f"{seconds:g}s"
    return f"{int(seconds * 1000)}ms"


async def _send_upstream_error(send: Send, exc: UpstreamError) -> None:
    if exc.kind == "timeout":
        await send_error(send, 504, str(exc), "upstream_error", "upstream_timeout")
    else:
        await send_error(
            send,
            502,
            str(exc),
            "upstream_error",
            "upstream_unreachable" if exc.kind == "unreachable" else "upstream_failed",
        )
