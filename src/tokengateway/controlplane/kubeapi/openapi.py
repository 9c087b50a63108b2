"""Just enough OpenAPI v3 for `kubectl apply` to validate on the server.

kubectl validates with `fieldValidation=Strict` when the group/version's document says the
kind's PATCH takes that query parameter; otherwise it downloads schemas and validates
itself. So each document lists, per kind, the PATCH operation with that parameter and its
`x-kubernetes-group-version-kind`, and no schemas: the gateway's own validator (the one
`tokengateway validate` runs) judges every write.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from .discovery import KINDS, KubeKind

__all__ = ["document"]

_ROOT = "/openapi/v3"


def _gv_path(kind: KubeKind) -> str:
    return f"apis/{kind.group}/{kind.version}" if kind.group else f"api/{kind.version}"


def _operation(kind: KubeKind) -> dict[str, Any]:
    return {
        "operationId": f"patch{kind.kind}",
        "parameters": [
            {"name": "fieldValidation", "in": "query", "schema": {"type": "string"}},
            {"name": "fieldManager", "in": "query", "schema": {"type": "string"}},
            {"name": "dryRun", "in": "query", "schema": {"type": "string"}},
        ],
        "responses": {"200": {"description": "OK"}},
        "x-kubernetes-action": "patch",
        "x-kubernetes-group-version-kind": {
            "group": kind.group,
            "version": kind.version,
            "kind": kind.kind,
        },
    }


def _gv_document(gv_path: str) -> dict[str, Any] | None:
    kinds = [k for k in KINDS if _gv_path(k) == gv_path]
    if not kinds:
        return None
    paths = {}
    for k in kinds:
        where = f"/{gv_path}/namespaces/{{namespace}}" if k.namespaced else f"/{gv_path}"
        paths[f"{where}/{k.plural}/{{name}}"] = {"patch": _operation(k)}
    return {
        "openapi": "3.0.0",
        "info": {"title": "tokengateway", "version": gv_path},
        "paths": paths,
    }


def _hash(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32].upper()


def document(path: str) -> dict[str, Any] | None:
    """The root (`/openapi/v3`: where each group/version's document is) or one of those."""
    if path == _ROOT:
        out = {}
        for gv_path in dict.fromkeys(_gv_path(k) for k in KINDS):
            doc = _gv_document(gv_path)
            out[gv_path] = {"serverRelativeURL": f"{_ROOT}/{gv_path}?hash={_hash(doc)}"}
        return {"paths": out}
    if path.startswith(_ROOT + "/"):
        return _gv_document(path[len(_ROOT) + 1 :])
    return None
