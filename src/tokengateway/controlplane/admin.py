"""The admin API: apply / get / delete resources, Limitador-style limits and counters, and
the usage page (`GET /ui`, fed by `GET /usage`).

Served on its own address (default 127.0.0.1:9090). Beyond loopback it needs a bearer
token; the usage page, opened in a browser, may carry it as `?token=` instead. Every error
is a 4xx with `{"error": {"message", "details"}}`, never a 500 for bad input; changes run
in a worker thread so the data path never waits for a reload.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, NamedTuple
from urllib.parse import parse_qs, unquote

import msgspec

from tokengateway.config.compile import ConfigError
from tokengateway.controlplane.control import ControlPlane, NotFoundError, ReadOnlyError
from tokengateway.controlplane.kubeapi import KubeAPI, claims
from tokengateway.controlplane.kubeapi.status import KubeError
from tokengateway.http.asgi import Receive, Scope, Send, read_body
from tokengateway.limits import Limit, Rate, parse_counter_key
from tokengateway.observability import ui
from tokengateway.observability.metrics import Snapshot, process_snapshot, render_snapshot
from tokengateway.resources import ManifestError
from tokengateway.resources.kinds import CLUSTER_SCOPED, UnknownKindError, resolve_kind
from tokengateway.storage import StorageError

__all__ = ["AdminApp"]

log = logging.getLogger("tokengateway.admin")

MAX_BODY = 4 * 1024 * 1024

#: (limit identifier, window in ms) -> the limit and that rate, for one limits namespace
LimitEntries = dict[tuple[str, int], tuple[Limit, Rate]]


class _LiveCounter(NamedTuple):
    """One counter of the store, matched to the limit and the rate it counts for."""

    namespace: str
    limit: Limit
    rate: Rate
    values: tuple[str, ...]
    value: int
    expires_in: float


class _HTTPError(Exception):
    def __init__(self, status: int, message: str, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.details = details or []


class AdminApp:
    def __init__(self, control: ControlPlane, gateway: Any, token: str | None = None) -> None:
        self.control = control
        self.gateway = gateway  # the GatewayApp: its live config and counter store
        self.token = token
        self.kube = KubeAPI(control)  # the Kubernetes API paths: kubeapi/

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            if scope["path"] == "/readyz" and scope["method"] == "GET":
                # no token: what a kubelet's probe asks, and it says nothing but yes or no
                ready = self.ready is None or self.ready()
                await _send(
                    send,
                    200 if ready else 503,
                    b"ok\n" if ready else b"not ready: no configuration yet\n",
                    b"text/plain",
                )
                return
            self._authorize(scope)
            if claims(scope["path"]):
                await self.kube(scope, receive, send)
                return
            if scope["path"] == "/metrics" and scope["method"] == "GET":
                text = await self._metrics()
                await _send(send, 200, text.encode(), b"text/plain; version=0.0.4")
                return
            if scope["path"] == "/ui" and scope["method"] == "GET":
                body, headers = ui.page()
                await _send(send, 200, body, b"text/html; charset=utf-8", headers)
                return
            status, payload = await self._route(scope, receive)
        except _HTTPError as exc:
            status = exc.status
            payload = {"error": {"message": str(exc), "details": exc.details}}
            if claims(scope["path"]):  # kubectl and client libraries read a Status
                payload = KubeError(status, str(exc)).status()
        except Exception:  # never a stack trace to a client
            log.exception("admin API error")
            status = 500
            message = "internal error; see the gateway's log"
            payload = {"error": {"message": message, "details": []}}
            if claims(scope["path"]):
                payload = KubeError(status, message).status()
        await _send(send, status, msgspec.json.encode(payload), b"application/json")

    #: set by runtime/serve.py on a follower: whether it has its first configuration yet
    #: (`/readyz`, asked without a token); None: always ready once serving
    ready: Callable[[], bool] | None = None

    #: set by runtime/serve.py on a follower: where its configuration comes from and how old
    #: it is (controlplane/follower/follow.py), shown in /healthz
    health_details: Callable[[], dict[str, Any]] | None = None

    #: set by runtime/serve.py: the metrics of every worker process, summed (metrics.merge); without
    #: it, /metrics shows this process's own
    metrics_snapshot: Callable[[], Awaitable[Snapshot]] | None = None

    async def _metrics(self) -> str:
        """Prometheus text: the data path's metrics (observability/metrics.py) and the store's,
        over every worker with `serve --workers N` (bounded wait: see runtime/workers.py)."""
        if self.metrics_snapshot is not None:
            snapshot = await self.metrics_snapshot()
        else:
            snapshot = process_snapshot(self.gateway)
        return render_snapshot(snapshot)

    def _authorize(self, scope: Scope) -> None:
        if self.token is None:
            return
        sent = ""
        for name, value in scope["headers"]:
            if name == b"authorization":
                sent = value.decode("latin-1")
        expected = f"Bearer {self.token}".encode()
        if hmac.compare_digest(sent.encode(), expected):
            return
        if scope["path"] == "/ui":  # a browser's address bar cannot send a header
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            given = (query.get("token") or [""])[-1]
            if hmac.compare_digest(f"Bearer {given}".encode(), expected):
                return
            raise _HTTPError(401, "missing or wrong admin token (open /ui?token=TOKEN)")
        raise _HTTPError(401, "missing or wrong admin token (Authorization: Bearer TOKEN)")

    async def _route(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        method = scope["method"]
        path = unquote(scope["path"])
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        if path == "/healthz":
            if self.health_details is not None:
                return 200, {"status": "ok", "config": self.health_details()}
            return 200, {"status": "ok"}
        if path == "/apis/apply" and method == "POST":
            text = await _text(receive)
            return 200, {
                "results": [r.as_json() for r in await self._change(self.control.apply, text)]
            }
        if path == "/apis/delete" and method == "POST":
            text = await _text(receive)
            results = await self._change(self.control.delete_documents, text)
            return 200, {"results": [r.as_json() for r in results]}
        if path == "/apis/resources":
            kind, namespace, name = self._target(query)
            if method == "GET":
                return 200, {"items": self._get(kind, namespace, name)}
            if method == "DELETE":
                if not name:
                    raise _HTTPError(400, "delete needs a name")
                key = (kind, "" if kind in CLUSTER_SCOPED else namespace or "default", name)
                results = await self._change(self.control.delete, [key])
                return 200, {"results": [r.as_json() for r in results]}
            raise _HTTPError(405, f"{method} is not allowed on /apis/resources")
        if path.startswith("/limits/") and method == "GET":
            return 200, self._limits(path[len("/limits/") :])
        if path.startswith("/counters/") and method == "GET":
            return 200, await self._counters(path[len("/counters/") :])
        if path == "/usage" and method == "GET":
            return 200, await self._usage()
        raise _HTTPError(404, f"no admin endpoint {method} {path}")

    @staticmethod
    def _target(query: dict[str, str]) -> tuple[str, str | None, str | None]:
        if "kind" not in query:
            raise _HTTPError(400, "the query needs kind=KIND")
        try:
            kind = resolve_kind(query["kind"])
        except UnknownKindError as exc:
            raise _HTTPError(400, str(exc)) from None
        return kind, query.get("namespace") or None, query.get("name") or None

    def _get(self, kind: str, namespace: str | None, name: str | None) -> list[dict[str, Any]]:
        try:
            return self.control.objects(kind, namespace, name)
        except NotFoundError as exc:
            raise _HTTPError(404, str(exc)) from None

    async def _change(self, change: Any, *args: Any) -> Any:
        try:
            return await asyncio.to_thread(change, *args)
        except ManifestError as exc:
            details = [str(e) for e in getattr(exc, "errors", [])]
            raise _HTTPError(
                400, "invalid manifests; nothing was changed", details or [str(exc)]
            ) from None
        except ConfigError as exc:
            raise _HTTPError(
                400, "the change cannot be served; nothing was changed", exc.problems
            ) from None
        except NotFoundError as exc:
            raise _HTTPError(404, str(exc)) from None
        except ReadOnlyError as exc:
            raise _HTTPError(405, str(exc)) from None
        except (ValueError, RuntimeError) as exc:
            raise _HTTPError(400, f"{exc}; nothing was changed") from None

    def _limit_entries(self, namespace: str) -> LimitEntries:
        found: LimitEntries = {}
        for target in self.gateway.config.rules:
            if target.route != namespace:
                continue
            for limit in target.limits:
                for rate in limit.rates:
                    found[(limit.identifier, rate.window_ms)] = (limit, rate)
        return found

    def _limits(self, namespace: str) -> list[dict[str, Any]]:
        return [
            _limit_json(namespace, limit, rate)
            for limit, rate in self._limit_entries(namespace).values()
        ]

    async def _live_counters(self, entries: Mapping[str, LimitEntries]) -> list[_LiveCounter]:
        """The store's live counters of these namespaces' limits (`_limit_entries` each);
        counters of limits no longer in force are left out."""
        try:
            stored = await self.gateway.store.counters()
        except StorageError as exc:
            raise _HTTPError(503, f"the counter store is not answering: {exc}") from None
        out = []
        for key, value, expires_in in stored:
            parsed = parse_counter_key(key)
            if parsed is None:
                continue
            namespace, identifier, window_ms, values = parsed
            found = entries.get(namespace, {}).get((identifier, window_ms))
            if found is not None:
                out.append(_LiveCounter(namespace, *found, values, value, expires_in))
        return out

    async def _counters(self, namespace: str) -> list[dict[str, Any]]:
        live = await self._live_counters({namespace: self._limit_entries(namespace)})
        return [
            {
                "limit": _limit_json(namespace, c.limit, c.rate),
                "set_variables": _variables(c.limit, c.values),
                "value": c.value,
                "remaining": max(0, c.rate.limit - c.value),
                "expires_in_seconds": round(c.expires_in, 3),
            }
            for c in live
        ]

    async def _usage(self) -> dict[str, Any]:
        """Every limits namespace with limits, each limit in force and its live counters,
        most used first: all the usage page and `tokengateway top` show, in one answer."""
        namespaces = dict.fromkeys(t.route for t in self.gateway.config.rules if t.limits)
        entries = {ns: self._limit_entries(ns) for ns in namespaces}
        limits: dict[tuple[str, str], dict[str, Any]] = {}
        for namespace, found in entries.items():
            for limit, _ in found.values():
                if (namespace, limit.identifier) not in limits:
                    limits[(namespace, limit.identifier)] = _usage_limit_json(limit)
        for c in await self._live_counters(entries):
            limits[(c.namespace, c.limit.identifier)]["counters"].append(
                {
                    "values": _variables(c.limit, c.values),
                    "window": c.rate.window_text,
                    "seconds": c.rate.window,
                    "value": c.value,
                    "limit": c.rate.limit,
                    "remaining": max(0, c.rate.limit - c.value),
                    "reset_in_seconds": round(c.expires_in, 3),
                    "used": round(c.value / c.rate.limit, 4) if c.rate.limit > 0 else 1.0,
                }
            )
        for entry in limits.values():
            entry["counters"].sort(key=lambda c: (-c["used"], -c["value"], str(c["values"])))
        return {
            "namespaces": [
                {
                    "namespace": ns,
                    "limits": [v for (n, _), v in limits.items() if n == ns],
                }
                for ns in namespaces
            ]
        }


def _variables(limit: Limit, values: tuple[str, ...]) -> dict[str, str]:
    """A counter's values by the expressions that gave them (`auth.identity.userid`)."""
    return dict(zip([c.source for c in limit.counters], values, strict=False))


def _usage_limit_json(limit: Limit) -> dict[str, Any]:
    return {
        "kind": limit.policy_kind,
        "policy": limit.policy,
        "name": limit.name,
        "unit": "tokens" if limit.counts_tokens else "requests",
        "rates": [
            {"limit": r.limit, "window": r.window_text, "seconds": r.window} for r in limit.rates
        ],
        "conditions": [p.source for p in limit.predicates],
        "variables": [c.source for c in limit.counters],
        "counters": [],
    }


def _limit_json(namespace: str, limit: Limit, rate: Any) -> dict[str, Any]:
    return {
        "namespace": namespace,
        "name": limit.identifier,
        "max_value": rate.limit,
        "seconds": rate.window,
        "conditions": [p.source for p in limit.predicates],
        "variables": [c.source for c in limit.counters],
        "kind": limit.policy_kind,
    }


async def _send(
    send: Send,
    status: int,
    body: bytes,
    content_type: bytes,
    headers: list[tuple[bytes, bytes]] | None = None,
) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
                *(headers or ()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": body})


async def _text(receive: Receive) -> str:
    body = await read_body(receive, MAX_BODY)
    if body is None:
        raise _HTTPError(413, f"request body over {MAX_BODY} bytes")
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError:
        raise _HTTPError(400, "the body is not UTF-8 text") from None
