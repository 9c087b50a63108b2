"""The admin API: apply / get / delete resources, and Limitador-style limits and counters.

Served on its own address (default 127.0.0.1:9090). Beyond loopback it needs a bearer
token. Every error is a 4xx with `{"error": {"message", "details"}}`, never a 500 for bad
input; changes run in a worker thread so the data path never waits for a reload.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
from typing import Any
from urllib.parse import parse_qs, unquote

import msgspec

from tokengateway.gateway.config import ConfigError
from tokengateway.gateway.control import ControlPlane, NotFoundError
from tokengateway.gateway.types import Receive, Scope, Send, read_body
from tokengateway.limits import Limit, parse_counter_key
from tokengateway.resources import ManifestError
from tokengateway.resources.kinds import CLUSTER_SCOPED, UnknownKindError, resolve_kind

__all__ = ["AdminApp"]

log = logging.getLogger("tokengateway.admin")

MAX_BODY = 4 * 1024 * 1024


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

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return
        try:
            self._authorize(scope)
            if scope["path"] == "/metrics" and scope["method"] == "GET":
                await _send(send, 200, self._metrics().encode(), b"text/plain; version=0.0.4")
                return
            status, payload = await self._route(scope, receive)
        except _HTTPError as exc:
            status = exc.status
            payload = {"error": {"message": str(exc), "details": exc.details}}
        except Exception:  # never a stack trace to a client
            log.exception("admin API error")
            status = 500
            payload = {"error": {"message": "internal error; see the gateway's log", "details": []}}
        await _send(send, status, msgspec.json.encode(payload), b"application/json")

    def _metrics(self) -> str:
        """Prometheus text; the full set of metrics is the observability work's."""
        limiter = self.gateway.limiter
        metrics = [
            (
                "usage_estimated_total",
                "counter",
                "Responses charged by an estimate because the upstream reported no usage.",
                self.gateway.estimated_usage,
            ),
            (
                "storage_errors_total",
                "counter",
                "Counter store calls that failed.",
                limiter.storage_errors,
            ),
            (
                "storage_reports_pending",
                "gauge",
                "Token reports kept while the counter store is failing, waiting to be replayed.",
                len(limiter.pending),
            ),
            (
                "storage_reports_replayed_total",
                "counter",
                "Kept token reports applied once the counter store answered again.",
                limiter.replayed,
            ),
            (
                "storage_reports_dropped_total",
                "counter",
                "Kept token reports lost because the bound was reached.",
                limiter.dropped,
            ),
        ]
        lines = []
        for name, kind, text, value in metrics:
            lines += [f"# HELP tokengateway_{name} {text}", f"# TYPE tokengateway_{name} {kind}"]
            lines.append(f"tokengateway_{name} {value}")
        return "\n".join(lines) + "\n"

    def _authorize(self, scope: Scope) -> None:
        if self.token is None:
            return
        sent = ""
        for name, value in scope["headers"]:
            if name == b"authorization":
                sent = value.decode("latin-1")
        if not hmac.compare_digest(sent.encode(), f"Bearer {self.token}".encode()):
            raise _HTTPError(401, "missing or wrong admin token (Authorization: Bearer TOKEN)")

    async def _route(self, scope: Scope, receive: Receive) -> tuple[int, Any]:
        method = scope["method"]
        path = unquote(scope["path"])
        query = {k: v[-1] for k, v in parse_qs(scope.get("query_string", b"").decode()).items()}
        if path == "/healthz":
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
        except (ValueError, RuntimeError) as exc:
            raise _HTTPError(400, f"{exc}; nothing was changed") from None

    def _limit_entries(self, namespace: str) -> dict[tuple[str, int], tuple[Limit, Any]]:
        found: dict[tuple[str, int], tuple[Limit, Any]] = {}
        for target in self.gateway.config.rules:
            if target.route != namespace:
                continue
            for limit in target.limits:
                for rate in limit.rates:
                    found[(limit.identifier, int(rate.window * 1000))] = (limit, rate)
        return found

    def _limits(self, namespace: str) -> list[dict[str, Any]]:
        return [
            _limit_json(namespace, limit, rate)
            for limit, rate in self._limit_entries(namespace).values()
        ]

    async def _counters(self, namespace: str) -> list[dict[str, Any]]:
        entries = self._limit_entries(namespace)
        out = []
        for key, value, expires_in in await self.gateway.store.counters():
            parsed = parse_counter_key(key)
            if parsed is None or parsed[0] != namespace:
                continue
            _, identifier, window_ms, values = parsed
            found = entries.get((identifier, window_ms))
            if found is None:
                continue
            limit, rate = found
            names = [c.source for c in limit.counters]
            out.append(
                {
                    "limit": _limit_json(namespace, limit, rate),
                    "set_variables": dict(zip(names, values, strict=False)),
                    "remaining": max(0, rate.limit - value),
                    "expires_in_seconds": round(expires_in, 3),
                }
            )
        return out


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


async def _send(send: Send, status: int, body: bytes, content_type: bytes) -> None:
    await send(
        {
            "type": "http.response.start",
            "status": status,
            "headers": [
                (b"content-type", content_type),
                (b"content-length", str(len(body)).encode()),
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
