"""`kubectl get`'s table: columns as the kinds' CRDs (Kuadrant, Gateway API) declare their
printer columns, or as Kubernetes prints its own kinds; AGE formatted here, as a server does."""

from __future__ import annotations

import datetime
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = ["format_age", "table"]

Cell = Callable[[Mapping[str, Any]], Any]
POLICIES = ("TokenRateLimitPolicy", "RateLimitPolicy", "AuthPolicy")


def format_age(created: Any, now: datetime.datetime | None = None) -> str:
    """`12s`, `5m3s`, `3h`, `4d5h`: the short forms kubectl users read."""
    try:
        then = datetime.datetime.fromisoformat(str(created).replace("Z", "+00:00"))
    except ValueError:
        return "<unknown>"
    seconds = int(((now or datetime.datetime.now(datetime.UTC)) - then).total_seconds())
    seconds = max(seconds, 0)
    minutes, hours, days = seconds // 60, seconds // 3600, seconds // 86400
    if seconds < 120:
        return f"{seconds}s"
    if minutes < 10:
        return f"{minutes}m{seconds % 60}s" if seconds % 60 else f"{minutes}m"
    if hours < 3:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if days < 2:
        return f"{hours}h"
    if days < 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    return f"{days}d" if days < 365 * 2 else f"{days // 365}y"


def _get(obj: Mapping[str, Any], *path: str) -> Any:
    value: Any = obj
    for part in path:
        value = value.get(part) if isinstance(value, Mapping) else None
    return value


def _condition(kind: str) -> Cell:
    def cell(obj: Mapping[str, Any]) -> Any:
        for c in _get(obj, "status", "conditions") or []:
            if isinstance(c, Mapping) and c.get("type") == kind:
                return c.get("status")
        return None

    return cell


def _join(values: Any) -> str | None:
    return ",".join(str(v) for v in values) if values else None


#: (name, type, priority, cell); priority 1 shows only with -o wide
Column = tuple[str, str, int, Cell]


def _columns(kind: str) -> list[Column]:
    if kind in POLICIES:
        return [
            ("Accepted", "string", 0, _condition("Accepted")),
            ("Enforced", "string", 0, _condition("Enforced")),
            ("TargetKind", "string", 1, lambda o: _get(o, "spec", "targetRef", "kind")),
            ("TargetName", "string", 1, lambda o: _get(o, "spec", "targetRef", "name")),
            ("TargetSection", "string", 1, lambda o: _get(o, "spec", "targetRef", "sectionName")),
        ]
    if kind == "Gateway":
        return [
            ("Class", "string", 0, lambda o: _get(o, "spec", "gatewayClassName")),
            (
                "Address",
                "string",
                0,
                lambda o: (_get(o, "status", "addresses") or [{}])[0].get("value"),
            ),
            ("Programmed", "string", 0, _condition("Programmed")),
        ]
    if kind == "GatewayClass":
        return [
            ("Controller", "string", 0, lambda o: _get(o, "spec", "controllerName")),
            ("Accepted", "string", 0, _condition("Accepted")),
        ]
    if kind == "Lease":
        return [("Holder", "string", 0, lambda o: _get(o, "spec", "holderIdentity") or "")]
    if kind in ("ReferenceGrant", "BackendTLSPolicy"):
        return []
    if kind == "ConfigMap":
        return [
            (
                "Data",
                "integer",
                0,
                lambda o: len(o.get("data") or {}) + len(o.get("binaryData") or {}),
            )
        ]
    if kind == "HTTPRoute":
        return [("Hostnames", "string", 0, lambda o: _join(_get(o, "spec", "hostnames")))]
    if kind == "Secret":
        return [
            ("Type", "string", 0, lambda o: o.get("type") or "Opaque"),
            ("Data", "integer", 0, lambda o: len(o.get("data") or {})),
        ]
    if kind == "Service":
        return [
            ("Type", "string", 0, lambda o: _get(o, "spec", "type") or "ClusterIP"),
            (
                "Port(s)",
                "string",
                0,
                lambda o: _join(
                    f"{p.get('port')}/{p.get('protocol', 'TCP')}"
                    for p in _get(o, "spec", "ports") or []
                ),
            ),
        ]
    if kind == "Namespace":
        return [("Status", "string", 0, lambda o: _get(o, "status", "phase") or "Active")]
    if kind == "Deployment":
        return [("Replicas", "integer", 0, lambda o: _get(o, "spec", "replicas") or 1)]
    return []


def table(
    kind: str, objects: Sequence[dict[str, Any]], resource_version: str, now: Any = None
) -> dict[str, Any]:
    """A `meta.k8s.io/v1` Table; each row carries its whole object, so `-A` can show the
    namespace and `-o name` still works."""
    columns = _columns(kind)
    definitions = [{"name": "Name", "type": "string", "format": "name", "priority": 0}]
    definitions += [{"name": n, "type": t, "format": "", "priority": p} for n, t, p, _ in columns]
    definitions.append({"name": "Age", "type": "date", "format": "", "priority": 0})
    rows = []
    for obj in objects:
        meta = obj.get("metadata") or {}
        cells: list[Any] = [meta.get("name")]
        for _, _, _, cell in columns:
            value = cell(obj)
            cells.append("<none>" if value is None else value)
        cells.append(format_age(meta.get("creationTimestamp"), now))
        rows.append({"cells": cells, "object": obj})
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": definitions,
        "rows": rows,
    }
