"""The data path, one request from top to bottom.

    route -> read body -> authenticate/authorize -> check (or reserve) limits -> forward
          -> read usage -> report (or commit) tokens -> rate-limit headers, metrics, log

(authenticate/authorize come before the body when the AuthPolicy reads no part of it.) The
path is the HTTP server's normalised, percent-encoded one (`http/target.py`), the same
for routing, policies, the access log and the request sent upstream.

Each stage is a call into its own module (routing, auth, limits, proxy); this file only
translates between HTTP (ASGI) and those libraries, and owns the order of the stages:
`GatewayApp.handle` calls them in turn, each a method taking the request's
`RequestContext`, which holds what the request carries from one stage to the next.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import random
import time
import zlib
from collections.abc import Callable, Coroutine
from typing import Any
from urllib.parse import quote

import msgspec

from tokengateway import auth as authlib
from tokengateway.config.compile import CompiledConfig, RuleTarget
from tokengateway.dataplane.body import read_json_body
from tokengateway.dataplane.errors import error_body, send_error, send_json
from tokengateway.dataplane.keys import KeyFetcher
from tokengateway.dataplane.ratelimit_headers import limited_headers, success_headers
from tokengateway.expr import cel
from tokengateway.http.asgi import Receive, RequestAborted, Scope, Send, read_body
from tokengateway.http.client import (
    HOP_BY_HOP,
    BadTarget,
    Upstream,
    UpstreamError,
    UpstreamResponse,
    content_decoder,
    decode_content,
)
from tokengateway.limits import Applicable, Limiter, OnError, StorageUnavailable
from tokengateway.limits.limiter import MAX_RESERVATION_FRACTION, MAX_RESERVATION_TTL
from tokengateway.observability.accesslog import AccessLog, Entry, utc_now_text
from tokengateway.observability.metrics import Metrics
from tokengateway.storage import CheckResult, CounterStore
from tokengateway.wire.tokens import Usage, estimate_usage
from tokengateway.wire.usage import SSEStream, ask_for_usage, completion_text_of, usage_from_json

__all__ = ["GatewayApp"]

log = logging.getLogger("tokengateway.gateway")

DEFAULT_MAX_BODY = 8 * 1024 * 1024
#: how many times a request's AuthPolicy is decided again after fetching what it lacked
#: (keys, introspection answers, metadata: one round per metadata priority group)
MAX_AUTH_ROUNDS = 8
#: (largest hold as a fraction of a counter's limit, longest hold in seconds): Limitador's
RESERVATION_CLAMPS = (MAX_RESERVATION_FRACTION, MAX_RESERVATION_TTL)


#: what a stage that refuses a request returns: its answer, not sent yet (`handle` awaits it)
Answer = Coroutine[Any, Any, None]


class RequestContext:
    """What one request carries through the stages of `GatewayApp.handle`: made once as it
    arrives; each stage reads what the stages before it found and adds its own.

    `config` is the configuration the request started with (a swap does not change it).
    `send` records the answer's status in `entry` (`Entry.recording`). `started` is set once
    an answer began that may still fail part way (a stream): from then on a failure can only
    cut the answer short, never start a second one (a 500)."""

    __slots__ = (
        "applicable",
        "auth",
        "body",
        "checked",
        "config",
        "decision",
        "doc",
        "entry",
        "headers",
        "host",
        "method",
        "path",
        "query",
        "receive",
        "request_id",
        "scope",
        "send",
        "started",
        "target",
        "well_known",
    )

    #: the route's target, set by the routing stage
    target: RuleTarget
    #: the counters the request counts on, set by the limits stage
    applicable: Applicable

    def __init__(
        self, config: CompiledConfig, scope: Scope, receive: Receive, send: Send, entry: Entry
    ) -> None:
        self.config = config
        self.scope = scope
        self.receive = receive
        self.send = send
        self.entry = entry
        self.method: str = scope["method"]
        self.path: str = scope["path"]
        self.query: str = scope.get("query_string", b"").decode("latin-1")
        headers: dict[str, str] = {}
        for raw_name, raw_value in scope["headers"]:
            name = raw_name.decode("latin-1")
            value = raw_value.decode("latin-1")
            if name in headers:  # repeated headers are one list; cookies join with "; "
                value = f"{headers[name]}{'; ' if name == 'cookie' else ', '}{value}"
            headers[name] = value
        self.headers = headers
        self.host = _hostname(headers.get("host", ""))
        self.request_id = entry.request_id = headers.get("x-request-id") or new_request_id()
        self.body = b""
        #: the body decoded, for a model request whose body is JSON
        self.doc: dict[str, Any] | None = None
        #: Kuadrant's well-known attributes; built only when a policy may read them
        self.well_known: dict[str, Any] = {}
        self.decision: authlib.AuthDecision | None = None
        #: what the AuthPolicy found (`auth.identity`, ...), for the limits' CEL
        self.auth: dict[str, Any] = {}
        #: the store's answer to the check, when some counter applied
        self.checked: CheckResult | None = None
        self.started = False


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
        on_storage_error: OnError = "allow",
        reservation_clamps: tuple[float, float] = RESERVATION_CLAMPS,
    ) -> None:
        self.config = config
        self.store = store
        self.limiter = Limiter(
            store,
            on_error=on_storage_error,
            max_reservation_fraction=reservation_clamps[0],
            max_reservation_ttl=reservation_clamps[1],
        )
        self.upstream = upstream or Upstream()
        #: fetches the identity providers' keys for `jwt` rules (dataplane/keys.py)
        self.keys = KeyFetcher(self.upstream)
        self.max_body_bytes = max_body_bytes
        self.access_log = access_log
        self.metrics = Metrics()
        #: responses charged by an estimate because the upstream reported no usage
        self.estimated_usage = 0

    def swap(self, config: CompiledConfig, loop: asyncio.AbstractEventLoop | None) -> None:
        """Serve `config` from now on, in one assignment (requests in flight keep the one
        they started with); from any thread. The metrics of routes it no longer has are
        forgotten on `loop`, so their series stay bounded across reloads. Refusals kept by
        the limiter go: the new limits are the store's to answer."""
        self.config = config
        self.limiter.forget()
        if loop is not None:
            routes = {t.route for t in config.rules}
            loop.call_soon_threadsafe(self.metrics.retain, routes)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            entry = Entry(scope["method"], scope["path"])
            # the status, and x-request-id on every answer
            request = RequestContext(self.config, scope, receive, entry.recording(send), entry)
            try:
                await self.handle(request)
            except Exception:  # the last line of defence: never a stack trace to a client
                log.exception("unhandled error on %s %s", scope.get("method"), scope.get("path"))
                if not request.started:
                    await send_error(
                        request.send,
                        500,
                        "internal gateway error",
                        "server_error",
                        "internal_error",
                    )
            finally:  # also when the request was aborted (RequestAborted, cancellation)
                if entry.route is not None:
                    self._count(entry)
                if self.access_log is not None:
                    self.access_log.write(entry)
        elif scope["type"] == "lifespan":
            await self._lifespan(receive, send)

    def _count(self, entry: Entry) -> None:
        usage = entry.usage
        upstream = first_token = overhead = None
        sent, done = entry.forwarded, entry.upstream_done
        if sent is not None and done is not None:
            upstream = done - sent
            overhead = (sent - entry.start) + (time.perf_counter() - done)
            if entry.first_chunk is not None:
                first_token = entry.first_chunk - sent
        self.metrics.request(
            entry.route or "",
            entry.status,
            usage.prompt_tokens if usage is not None else 0,
            usage.completion_tokens if usage is not None else 0,
            upstream,
            first_token,
            overhead,
        )

    async def _lifespan(self, receive: Receive, send: Send) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                await self.upstream.start()  # the store is started (and checked) before serving
                # the identity providers' keys, before the first token arrives
                await self.keys.load(self.config.key_sets.values())
                self.keys.start(lambda: self.config.key_sets.values())
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.keys.stop()
                await self.upstream.close()
                await self.store.close()
                await send({"type": "lifespan.shutdown.complete"})
                return

    async def handle(self, request: RequestContext) -> None:
        """The stages, in order. A stage that refuses the request answers it and the request
        ends there: a synchronous stage returns its answer (awaited here), an asynchronous
        one sends it and returns False."""
        # 1. route
        answer = self._route(request)
        if answer is not None:
            await answer
            return
        target = request.target

        # 2. body (needed to forward, for requestBodyJSON and for estimates), read after
        # authentication when the AuthPolicy does not read it: a client without a valid key
        # then makes the gateway buffer nothing (and gets no 100 Continue)
        auth_first = target.auth is not None and not target.auth.reads_body
        if not auth_first and not await self._read_body(request):
            return
        if target.auth is not None or target.limits:
            request.well_known = _well_known(request)

        # 3. authenticate and authorize
        if target.auth is not None:
            answer = self._authorize(request, target.auth)
            if answer is not None and _waits(request.decision):
                answer.close()
                answer = await self._authorize_again(request, target.auth)
            if answer is not None:
                await answer
                return
        if auth_first:
            if not await self._read_body(request):
                return
            request.well_known["request"]["size"] = len(request.body)

        # 3b. a model request's body must be JSON the gateway can read (nothing is charged)
        answer = self._parse_body(request)
        if answer is not None:
            await answer
            return

        # 4. check limits
        if not target.limits:
            request.applicable = Applicable()
        elif not await self._check_limits(request):
            return

        # 5-7. forward, relay, report; a reservation is committed or released whatever happens
        usage: Usage | None = None
        try:
            usage = await self._forward(request)
        finally:
            applicable = request.applicable
            if applicable.tokens:
                deltas = await self.limiter.report(applicable, usage)
                if deltas:
                    self.metrics.hits(target.route, applicable.token_limits, deltas)
        request.entry.usage = usage

    def _route(self, request: RequestContext) -> Answer | None:
        """1. The rule the request matches (`request.target`); else a 404."""
        host, path = request.host, request.path
        config = request.config
        # a request over TLS reaches only routes of HTTPS listeners, a plain one only HTTP's
        router = config.https_router if request.scope.get("scheme") == "https" else config.router
        match = router.match(host, request.method, path, request.headers, request.query)
        if match is None:
            return send_error(
                request.send,
                404,
                f"no route for {host or '(no host)'}{path}",
                "not_found_error",
                "route_not_found",
            )
        target: RuleTarget = match.target
        request.target = target
        request.entry.route = target.route
        request.entry.host = host
        return None

    async def _read_body(self, request: RequestContext) -> bool:
        """2. The whole request body (`request.body`); False once a 413 is sent."""
        try:
            body = await read_body(request.receive, self.max_body_bytes)
        except RequestAborted as exc:
            # the connection layer answers a timeout with 408; a client that left gets
            # nothing (499, as nginx logs it)
            request.entry.status = 408 if exc.timed_out else 499
            raise
        if body is None:
            await send_error(
                request.send,
                413,
                f"request body larger than {self.max_body_bytes} bytes",
                "invalid_request_error",
                "request_too_large",
            )
            return False
        request.body = body
        return True

    async def _authorize_again(
        self, request: RequestContext, policy: authlib.AuthEngine
    ) -> Answer | None:
        """3, again, once what the decision waited for is there: for a token whose key its
        key set lacked (rotated keys, or none fetched yet), the set refreshed (rate
        limited, dataplane/keys.py) if that changed it; for a token an introspection
        endpoint must be asked about, its answer; for metadata rules, their answers (one
        round per priority group that has calls to make)."""
        decision = request.decision
        for _ in range(MAX_AUTH_ROUNDS):
            assert decision is not None
            changed = False
            if decision.refresh_keys:
                changed = await self.keys.refresh_for(decision.refresh_keys)
            waits = [rule.introspect(token, self.keys.post) for rule, token in decision.introspect]
            waits += [call.fetch(self.keys.send) for call in decision.metadata_calls]
            if waits:
                await asyncio.gather(*waits)
                changed = True
            if not changed:
                break
            answer = self._authorize(request, policy)
            decision = request.decision
            if answer is None or not _waits(decision):
                return answer
            answer.close()
        assert decision is not None
        if decision.metadata_calls:
            return send_error(
                request.send,
                503,
                "the AuthPolicy's metadata could not be fetched",
                "service_unavailable",
                "metadata_unavailable",
            )
        return _send_denied(request.send, decision)

    def _authorize(self, request: RequestContext, policy: authlib.AuthEngine) -> Answer | None:
        """3. The AuthPolicy's decision (`request.decision`, `request.auth`); a refusal is
        the policy's deny answer."""
        well_known = request.well_known
        full_path = well_known["request"]["path"]  # with the query: a key may be in it
        decision = policy.decide(
            request.headers,
            full_path,
            lambda: authlib.AuthRequest(  # built only when no kept decision answers
                method=request.method,
                scheme=well_known["request"]["scheme"],
                host=request.host,
                path=full_path,
                headers=request.headers,
                source_address=well_known["source"]["address"],
                source_port=well_known["source"]["port"],
                destination_address=well_known["destination"]["address"],
                destination_port=well_known["destination"]["port"],
                request_id=request.request_id,
                well_known=well_known,
                client_certificate=_client_certificate(request.scope),
            ),
        )
        request.decision = decision
        if not decision.allowed:
            return _send_denied(request.send, decision)
        request.auth = decision.auth
        request.entry.user = _user_of(decision.auth)
        return None

    def _parse_body(self, request: RequestContext) -> Answer | None:
        """3b. A model request's body, decoded (`request.doc`); a 400 when it cannot be."""
        content_type = request.headers.get("content-type", "")
        doc, problem = read_json_body(request.method, request.path, content_type, request.body)
        if problem is not None:
            return send_error(
                request.send,
                400,
                problem.message,
                "invalid_request_error",
                problem.code,
                param=problem.param,
            )
        request.doc = doc
        return None

    async def _check_limits(self, request: RequestContext) -> bool:
        """4. The counters that apply (`request.applicable`), checked or reserved on
        (`request.checked`); False once a 429 or 503 is sent."""
        target = request.target
        cel.bind_bodies(request.body, request_json=request.doc)
        activation = cel.Activation({**request.well_known, "auth": request.auth})
        applicable = request.applicable = self.limiter.applicable(
            target.limits,
            target.route,
            activation,
            body=request.body,
            request=request.doc,
            reservations=request.config.reservations,
            default_ttl=target.timeout,
        )
        if not applicable:
            return True
        try:
            # a request refused only by other requests' holds may wait for them
            # (`reservation.wait`), until the client leaves (its receive() returns then)
            result = await self.limiter.check(applicable, request.receive)
        except StorageUnavailable as exc:
            await send_error(
                request.send,
                503,
                f"rate limits cannot be checked: {exc}",
                "service_unavailable",
                "counter_store_unavailable",
                headers=[("retry-after", "1")],
            )
            return False
        if result.limited:
            owners = applicable.token_limits + applicable.request_limits
            limited_by = request.entry.limited_by = owners[result.limiting or 0]
            self.metrics.limited(target.route, limited_by)
            await _send_limited(request.send, result, len(applicable.tokens))
            return False
        self.metrics.authorized(target.route, applicable.names)
        request.checked = result
        return True

    async def _forward(self, request: RequestContext) -> Usage | None:
        """5-6. Send the request upstream and relay the answer; the usage to charge, if any."""
        send, entry, target = request.send, request.entry, request.target
        method, path, query, headers = request.method, request.path, request.query, request.headers
        applicable, checked = request.applicable, request.checked

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
        upstream_body, hide_usage = request.body, False
        if applicable.tokens:
            upstream_body, hide_usage = ask_for_usage(path, request.body, request.doc)
        backend = target.pick_backend()
        extra: list[tuple[str, str]] = []
        decision = request.decision
        if decision is not None:
            extra = decision.success_headers
            if decision.credential is not None and not backend.forward_credentials:
                headers = dict(headers)  # the gateway's own API key is not the upstream's
                query = decision.credential.strip(headers, query)
        # where it goes is the backend's origin and base path (parsed with the config), and
        # the path routing saw: nothing a client wrote can name another host or port
        request_target = f"{path}?{query}" if query else path
        out_headers = _upstream_headers(request.scope, headers, request.request_id, extra)
        if backend.authorization is not None:
            out_headers = [h for h in out_headers if h[0] != "authorization"]
            out_headers.append(("authorization", backend.authorization))
        entry.forwarded = time.perf_counter()
        # a client that leaves while its reservation holds tokens gives them back at once:
        # the upstream request is dropped and nothing is charged (Kuadrant's Envoy resets
        # the upstream stream and reports nothing), so requests waiting for holds get in
        leaving = _Leaving(request.receive) if applicable.reservation is not None else None
        try:
            resp = await self.upstream.send_to(
                method,
                backend.origin,
                request_target,
                out_headers,
                upstream_body,
                target.timeout,
                backend.timeouts,
            )
        except UpstreamError as exc:
            entry.upstream_done = time.perf_counter()
            await _send_upstream_error(send, exc)
            return None
        except BadTarget as exc:  # nothing was sent
            entry.upstream_done = time.perf_counter()
            await send_error(send, 400, str(exc), "invalid_request_error", "invalid_target")
            return None
        except asyncio.CancelledError:
            if leaving is None or not leaving.resume():
                raise
            entry.upstream_done = time.perf_counter()
            entry.status = 499  # the client closed the request (nginx's word for it)
            return None

        # 6. relay the answer, reading its usage; a response without usage is charged an
        # estimate. Rate-limit headers replace the upstream's own.
        if resp.content_type == "text/event-stream":
            if leaving is not None:
                leaving.stop()  # the relay watches the client itself
            # a stream in a content coding passes as it came: nothing can be hidden in it
            stream = SSEStream(hide_usage and resp.content_encoding is None)
            if checked is not None:
                n = len(applicable.tokens)
                _with_limits(resp.headers, success_headers(checked, n, applicable.countings, None))
            await self._relay_stream(request, resp, stream)
            entry.upstream_done = time.perf_counter()
            usage = stream.usage
            if applicable.tokens and usage is None and 200 <= resp.status < 300:
                usage = self._estimate(request, stream.text)
            return usage
        try:
            payload = await resp.read()
        except UpstreamError as exc:
            entry.upstream_done = time.perf_counter()
            await _send_upstream_error(send, exc)
            return None
        except asyncio.CancelledError:
            if leaving is None or not leaving.resume():
                raise
            resp.close()
            entry.upstream_done = time.perf_counter()
            entry.status = 499
            return None
        finally:
            if leaving is not None:
                leaving.stop()  # the answer is the client's from here
        entry.upstream_done = time.perf_counter()
        readable = payload
        if resp.content_encoding is not None:  # passed on as it came; decoded to read usage
            limit = self.upstream.max_response_bytes
            readable = decode_content(resp.content_encoding, payload, limit) or b""
        usage = usage_from_json(readable)
        if applicable.tokens and usage is None and 200 <= resp.status < 300:
            usage = self._estimate(request, completion_text_of(readable))
        if checked is not None:
            limit_headers = success_headers(
                checked, len(applicable.tokens), applicable.countings, usage
            )
            _with_limits(resp.headers, limit_headers)
        # none on 204/304, and none on HEAD: its length would have to be the GET's (RFC 9110
        # 8.6), which the gateway does not know
        if resp.status >= 200 and resp.status != 204 and resp.status != 304 and method != "HEAD":
            resp.headers.append((b"content-length", str(len(payload)).encode()))
        await send({"type": "http.response.start", "status": resp.status, "headers": resp.headers})
        await send({"type": "http.response.body", "body": payload})
        return usage

    def _estimate(self, request: RequestContext, answer: str) -> Usage | None:
        """What a successful answer without usage is charged: an estimate for a request
        that can generate (any method with a body: POST, PUT, PATCH), nothing for one that
        only reads or deletes (`GET /v1/models`), as Kuadrant charges an answer without
        usage (docs/counting.md)."""
        if request.method in _READS:
            return None
        self.estimated_usage += 1
        doc = request.doc
        return estimate_usage(doc if doc is not None else _json_or_none(request.body), answer)

    async def _relay_stream(
        self, request: RequestContext, resp: UpstreamResponse, stream: SSEStream
    ) -> None:
        """Pass events on as they arrive. A client that goes away stops the upstream (its
        tokens so far are still charged); an upstream that breaks gets an error event.

        A stream in a content coding (the upstream ignored `Accept-Encoding: identity`) is
        passed on byte for byte, nothing hidden in it nor added to it (an error event would
        not be in its coding: a broken one just ends, and the client's decoder sees it cut);
        its usage is read from a decoded copy (gzip, deflate), else estimated."""
        send, entry, path = request.send, request.entry, request.path
        request.started = True  # whatever fails from here, the client has its status
        await send({"type": "http.response.start", "status": resp.status, "headers": resp.headers})
        coding = resp.content_encoding
        feed = stream.feed if coding is None else _copy_reader(stream, coding)
        # A client that disconnects completes `gone`, which closes the upstream response:
        # the read in progress ends at once (no task per chunk is needed to notice).
        gone = asyncio.ensure_future(request.receive())

        def client_left(_: object) -> None:
            resp.close()

        gone.add_done_callback(client_left)
        failure: UpstreamError | None = None
        try:
            async for chunk in resp.chunks():
                if entry.first_chunk is None:
                    entry.first_chunk = time.perf_counter()
                out = feed(chunk)
                if out:
                    await send({"type": "http.response.body", "body": out, "more_body": True})
                if gone.done():
                    break
        except UpstreamError as exc:
            if not gone.done():
                failure = exc
                log.warning("%s: %s", path, exc)
        finally:
            gone.remove_done_callback(client_left)  # ending normally keeps the connection
            gone.cancel()
        if gone.done() and not gone.cancelled():
            resp.close()  # the client left: stop the upstream (what came is charged)
            return
        tail = stream.close(complete=failure is None)
        if coding is not None:
            tail = b""  # what the decoded copy's close would add is not in the coding
        elif failure is not None:
            tail += _stream_error(path, failure)
        await send({"type": "http.response.body", "body": tail})


#: the most of a content-coded stream's chunk decoded to read its usage
_DECODED_CHUNK = 16 * 1024 * 1024


def _copy_reader(stream: SSEStream, coding: str) -> Callable[[bytes], bytes]:
    """A feed for a coded stream: each chunk goes on as it came, and a decoded copy to
    `stream` for its usage, until the copy cannot be decoded (then the usage is estimated)."""
    decoder = content_decoder(coding)

    def feed(chunk: bytes) -> bytes:
        nonlocal decoder
        if decoder is not None:
            try:
                stream.feed(decoder.decompress(chunk, _DECODED_CHUNK))
                if decoder.unconsumed_tail:
                    decoder = None
            except zlib.error:
                decoder = None  # not what it says it is: estimated
        return chunk

    return feed


def _upstream_headers(
    scope: Scope,
    headers: dict[str, str],
    request_id: str,
    extra: list[tuple[str, str]],
) -> list[tuple[str, str]]:
    dropped = _NOT_FORWARDED
    listed = headers.get("connection")
    if listed:  # headers the client named in Connection are hop-by-hop too (RFC 9110 7.6.1)
        dropped = dropped | {h.strip().lower() for h in listed.split(",")}
    out = [(k, v) for k, v in headers.items() if k not in dropped]
    if "_" in "".join(headers):  # rare: then look closer (every name, dropped ones too)
        out = _without_lookalikes(out, dropped, extra)
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


#: methods whose answers are never charged an estimate: they generate nothing
_READS = frozenset({"GET", "HEAD", "OPTIONS", "DELETE"})


def _without_lookalikes(
    out: list[tuple[str, str]], dropped: frozenset[str], extra: list[tuple[str, str]]
) -> list[tuple[str, str]]:
    """Without a client's header whose name, `_` read as `-`, is one the gateway drops or
    writes itself (`Transfer_Encoding`, `Content_Length`, `X_Forwarded_For`, `X_Request_Id`,
    a policy's identity header): CGI, WSGI and many frameworks read both spellings as one
    name (`HTTP_X_FORWARDED_FOR`), so such a header could pass for the gateway's."""
    owned = dropped | _GATEWAY_OWN | {name.lower() for name, _ in extra}
    return [(k, v) for k, v in out if "_" not in k or k.replace("_", "-") not in owned]


#: written upstream by the gateway (with HOP_BY_HOP and _FORWARDED, and a policy's headers)
_GATEWAY_OWN = frozenset({"x-request-id"})

#: set by the gateway itself (x-forwarded-for extends the client's chain): a client's own
#: host and proto would be read first by some upstreams
_FORWARDED = frozenset({"x-forwarded-for", "x-forwarded-host", "x-forwarded-proto"})
#: a client's headers never sent upstream as they came
_NOT_FORWARDED = HOP_BY_HOP | _FORWARDED


def _json_or_none(body: bytes) -> Any:
    try:
        return msgspec.json.decode(body) if body else None
    except (msgspec.MsgspecError, ValueError, RecursionError):  # not JSON, bad UTF-8, too deep
        return None


def _stream_error(path: str, exc: UpstreamError) -> bytes:
    """The SSE event that tells a client the stream broke (the status is already sent)."""
    code = "upstream_timeout" if exc.kind == "timeout" else "upstream_failed"
    if path.endswith("/messages"):  # Anthropic's shape for its own clients
        body = {"type": "error", "error": {"type": "api_error", "message": str(exc)}}
        return b"event: error\ndata: " + msgspec.json.encode(body) + b"\n\n"
    error = {"message": str(exc), "type": "upstream_error", "param": None, "code": code}
    return b"data: " + msgspec.json.encode({"error": error}) + b"\n\n"


_UUID_MASK = ~((0xF << 76) | (0xC << 60)) & ((1 << 128) - 1)
_UUID_V4 = (4 << 76) | (0x8 << 60)


def new_request_id() -> str:
    """A random (version 4) UUID, as text: str(uuid.uuid4()) costs ~2 us, this ~0.5 us.
    The bits come from `random` (reseeded in a forked child), not from os.urandom: a request
    id is a label, not a secret."""
    digits = "%032x" % (random.getrandbits(128) & _UUID_MASK | _UUID_V4)
    return f"{digits[:8]}-{digits[8:12]}-{digits[12:16]}-{digits[16:20]}-{digits[20:]}"


def _hostname(host: str) -> str:
    if host.startswith("["):
        return host[: host.find("]") + 1].lower()
    return host.rsplit(":", 1)[0].lower() if ":" in host else host.lower()


def _client_certificate(scope: Scope) -> str | None:
    """The PEM certificate the client presented over TLS (ASGI's `tls` extension)."""
    extensions = scope.get("extensions")  # set only when the client sent a certificate
    tls = extensions.get("tls") if extensions else None
    chain = tls.get("client_cert_chain") if tls else None
    return chain[0] if chain else None


def _well_known(request: RequestContext) -> dict[str, Any]:
    """Kuadrant's well-known attributes (Envoy's names): `request.path` includes the query."""
    scope, path, query, headers = request.scope, request.path, request.query, request.headers
    client = scope.get("client") or ("", 0)
    server = scope.get("server") or ("", 0)
    full_path = f"{path}?{query}" if query else path
    attributes: dict[str, Any] = {
        "request": {
            "id": request.request_id,
            "method": request.method,
            "path": full_path,
            "url_path": path,
            "host": headers.get("host", request.host),
            "scheme": scope.get("scheme", "http"),
            "query": query,
            "headers": headers,
            "time": utc_now_text(),
            "size": len(request.body),
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
    certificate = _client_certificate(scope)
    if certificate is not None:  # Envoy's attribute: the peer's certificate, URL-encoded PEM
        attributes["source"]["certificate"] = quote(certificate, safe="")
    return attributes


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


class _Leaving:
    """Cancels the request's task when its client disconnects while the gateway waits for
    the upstream (the task catches the CancelledError and calls `resume`)."""

    __slots__ = ("gone", "left", "task")

    def __init__(self, receive: Receive) -> None:
        self.task = asyncio.current_task()
        self.left = False
        self.gone = asyncio.ensure_future(receive())  # completes when the client leaves
        self.gone.add_done_callback(self._left)

    def _left(self, gone: asyncio.Future[Any]) -> None:
        if not gone.cancelled() and self.task is not None:
            self.left = True
            self.task.cancel()

    def resume(self) -> bool:
        """After a CancelledError: True when it was this client leaving (the task goes on
        to give the hold back), False for any other cancellation."""
        if not self.left or self.task is None:
            return False
        self.task.uncancel()
        return True

    def stop(self) -> None:
        self.gone.remove_done_callback(self._left)
        self.gone.cancel()


async def _send_limited(send: Send, result: CheckResult, token_counters: int) -> None:
    refusal = limited_headers(result, token_counters)
    state = refusal.state
    ref = state.ref
    if result.held_only:
        body = _held_body(ref.limit, ref.window, state.value, state.held, result.retry_after)
    else:
        body = _refusal_body(ref.limit, refusal.kind, ref.window, refusal.quota, refusal.retry)
    await send_json(send, 429, body, refusal.headers)


def _held_body(limit: int, window: float, used: int, held: int, retry: float) -> bytes:
    """A 429 caused only by holds: the limit is not reached, it is taken by requests in
    flight, and the wait is until some of them settle."""
    message = (
        f"rate limit busy: the limit of {limit} tokens per {_window_text(window)} is not "
        f"reached ({used} used), but {held} are held by requests in flight and this request "
        f"does not fit beside them; retry in {_seconds_text(retry)}"
    )
    return error_body(message, _RATE, "rate_limit_held")


def _seconds_text(seconds: float) -> str:
    return f"{seconds:.1f}s" if seconds < 10 else f"{math.ceil(seconds)}s"


@functools.lru_cache(maxsize=4096)
def _refusal_body(limit: int, kind: str, window: float, quota: bool, retry: int) -> bytes:
    """A 429's body in OpenAI's envelope: made once per limit, kind and wait (a refusal
    is the cheapest answer the gateway gives, and the one a client may send most)."""
    what, type_ = ("quota", "insufficient_quota") if quota else ("rate limit", _RATE)
    per = _window_text(window)
    message = f"{what} exceeded: limit of {limit} {kind} per {per} reached; retry in {retry}s"
    return error_body(message, type_, type_)


_RATE = "rate_limit_exceeded"


def _with_limits(headers: list[tuple[bytes, bytes]], limits: list[tuple[bytes, bytes]]) -> None:
    """Put our rate-limit headers in place of any the upstream sent."""
    if not limits:
        return
    headers[:] = [h for h in headers if not h[0].startswith(b"x-ratelimit-")]
    headers.extend(limits)


def _waits(decision: authlib.AuthDecision | None) -> bool:
    """Whether a denial only waits for keys, an introspection or metadata to be fetched."""
    return decision is not None and bool(
        decision.refresh_keys or decision.introspect or decision.metadata_calls
    )


def _user_of(auth: dict[str, Any]) -> str | None:
    """Who the request is, for the access log: the identity's user id, subject or name."""
    identity = auth.get("identity")
    if isinstance(identity, dict):
        for key in ("userid", "sub", "username"):
            value = identity.get(key)
            if isinstance(value, str) and value:
                return value
        meta = identity.get("metadata")
        if isinstance(meta, dict) and isinstance(meta.get("name"), str):
            return str(meta["name"])
    return None


def _window_text(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{int(seconds // 3600)}h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{int(seconds // 60)}m"
    if seconds >= 1:
        return f"{seconds:g}s"
    return f"{int(seconds * 1000)}ms"


#: UpstreamError.kind -> the status and the error code the client gets
_UPSTREAM_ERRORS = {
    "timeout": (504, "upstream_timeout"),
    "unreachable": (502, "upstream_unreachable"),
    "tls": (502, "upstream_tls_error"),
    "busy": (503, "upstream_busy"),
    "invalid": (502, "upstream_invalid_response"),
    "too_large": (502, "upstream_response_too_large"),
}


async def _send_upstream_error(send: Send, exc: UpstreamError) -> None:
    status, code = _UPSTREAM_ERRORS.get(exc.kind, (502, "upstream_failed"))
    await send_error(send, status, str(exc), "upstream_error", code)
