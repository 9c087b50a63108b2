"""OpenAPI v3 documents, one per group/version, for `kubectl apply` and `kubectl explain`.

kubectl validates with `fieldValidation=Strict` when the group/version's document says the
kind's PATCH takes that query parameter; otherwise it downloads schemas and validates
itself. So each document lists, per kind, the PATCH operation with that parameter, and the
gateway's own validator (the one `tokengateway validate` runs) judges every write.

Each document also carries every kind's schema, made from the manifest model that
validates it (`resources.parse.MODEL_BY_KIND`), with `x-kubernetes-group-version-kind`:
what `kubectl explain trlp.spec.limits` prints. Built once per process, not per request.
"""

from __future__ import annotations

import functools
import hashlib
import json
from typing import Any

from tokengateway.resources.parse import MODEL_BY_KIND

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


#: what the models hold that is not part of the API: where a manifest came from, as read
_INTERNAL = ("source", "raw")


def _name(kind: KubeKind) -> str:
    """The schema's name, reversed-domain as Kubernetes names them."""
    group = ".".join(reversed(kind.group.split("."))) if kind.group else "io.k8s.api.core"
    return f"{group}.{kind.version}.{kind.kind}"


def _clean(node: Any) -> Any:
    """A pydantic JSON schema made OpenAPI 3.0: `anyOf [X, null]` becomes X (`nullable`),
    exclusive bounds become booleans, titles and null defaults go."""
    if isinstance(node, list):
        return [_clean(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _clean(v) for k, v in node.items() if k != "title"}
    options = out.get("anyOf")
    if isinstance(options, list):
        kept = [o for o in options if o != {"type": "null"}]
        if len(kept) < len(options):
            del out["anyOf"]
            out.update(kept[0] if len(kept) == 1 else {"anyOf": kept})
            out["nullable"] = True
    if "default" in out and out["default"] is None:
        del out["default"]
    # JSON Schema's `exclusiveMinimum: 0` (a `gt`) is OpenAPI 3.0's `minimum: 0` plus
    # `exclusiveMinimum: true`: kubectl cannot read the number where it wants a boolean
    for bound, exclusive in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        value = out.get(exclusive)
        if isinstance(value, int | float) and not isinstance(value, bool):
            out[bound] = value
            out[exclusive] = True
    return out


def _schemas(kind: KubeKind) -> dict[str, Any]:
    """The kind's schema and the ones it refers to, by name."""
    name = _name(kind)
    model = MODEL_BY_KIND[kind.kind]
    schema = model.model_json_schema(ref_template=f"#/components/schemas/{name}.{{model}}")
    defs = schema.pop("$defs", {})
    for field in _INTERNAL:
        schema.get("properties", {}).pop(field, None)
    if "required" in schema:
        schema["required"] = [r for r in schema["required"] if r not in _INTERNAL]
    schema["x-kubernetes-group-version-kind"] = [
        {"group": kind.group, "version": kind.version, "kind": kind.kind}
    ]
    out = {name: _clean(schema)}
    out.update({f"{name}.{d}": _clean(s) for d, s in defs.items()})
    return out


@functools.cache
def _gv_document(gv_path: str) -> dict[str, Any] | None:
    kinds = [k for k in KINDS if _gv_path(k) == gv_path]
    if not kinds:
        return None
    paths = {}
    schemas: dict[str, Any] = {}
    for k in kinds:
        where = f"/{gv_path}/namespaces/{{namespace}}" if k.namespaced else f"/{gv_path}"
        paths[f"{where}/{k.plural}/{{name}}"] = {"patch": _operation(k)}
        schemas.update(_schemas(k))
    return {
        "openapi": "3.0.0",
        "info": {"title": "tokengateway", "version": gv_path},
        "paths": paths,
        "components": {"schemas": schemas},
    }


def _hash(doc: Any) -> str:
    return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:32].upper()


@functools.cache
def _root() -> dict[str, Any]:
    out = {}
    for gv_path in dict.fromkeys(_gv_path(k) for k in KINDS):
        doc = _gv_document(gv_path)
        out[gv_path] = {"serverRelativeURL": f"{_ROOT}/{gv_path}?hash={_hash(doc)}"}
    return {"paths": out}


def document(path: str) -> dict[str, Any] | None:
    """The root (`/openapi/v3`: where each group/version's document is) or one of those.
    Shared and cached: the caller must not change it."""
    if path == _ROOT:
        return _root()
    if path.startswith(_ROOT + "/"):
        return _gv_document(path[len(_ROOT) + 1 :])
    return None
