"""The two patch forms `kubectl apply` sends: JSON merge patch (RFC 7386, for custom
resources) and strategic merge patch (for Deployment, Service, Secret, Namespace).

The strategic form is merge patch plus: lists of objects merged by a key (containers by
`name`, ports by `containerPort`/`port`, ...) and the directives kubectl writes
(`$patch`, `$setElementOrder/<field>`, `$retainKeys`, `$deleteFromPrimitiveList/<field>`).
Lists without a known merge key are replaced, as Kubernetes does for them.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["PatchError", "merge_patch", "strategic_merge_patch"]


class PatchError(ValueError):
    pass


#: list fields merged by a key, wherever they appear (field name -> key)
MERGE_KEYS: dict[str, str | tuple[str, ...]] = {
    "containers": "name",
    "initContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "imagePullSecrets": "name",
    "ports": ("containerPort", "port"),
    "conditions": "type",
}


def merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = dict(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        else:
            out[key] = merge_patch(out.get(key), value)
    return out


def strategic_merge_patch(target: Any, patch: Any) -> Any:
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if k != "$patch"}
    if directive == "delete":
        return None
    if directive not in (None, "merge"):
        raise PatchError(f"unknown $patch directive {directive!r}")
    out = dict(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    orders: dict[str, list[Any]] = {}
    for key, value in patch.items():
        if key in ("$patch", "$retainKeys"):
            continue
        if key.startswith("$setElementOrder/"):
            orders[key.split("/", 1)[1]] = value
            continue
        if key.startswith("$deleteFromPrimitiveList/"):
            field = key.split("/", 1)[1]
            out[field] = [v for v in out.get(field) or [] if v not in value]
            continue
        if value is None:
            out.pop(key, None)
        elif isinstance(value, list) and key in MERGE_KEYS:
            out[key] = _merge_list(out.get(key), value, MERGE_KEYS[key])
        else:
            out[key] = strategic_merge_patch(out.get(key), value)
    for field, order in orders.items():
        if isinstance(out.get(field), list):
            out[field] = _reorder(out[field], order, MERGE_KEYS.get(field))
    if isinstance(retain, list):
        out = {k: v for k, v in out.items() if k in retain}
    return out


def _key_of(item: Any, keys: str | tuple[str, ...]) -> tuple[str, Any] | None:
    if not isinstance(item, dict):
        return None
    for key in (keys,) if isinstance(keys, str) else keys:
        if key in item:
            return (key, item[key])
    return None


def _merge_list(current: Any, patch: list[Any], keys: str | tuple[str, ...]) -> list[Any]:
    items = list(current) if isinstance(current, list) else []
    for entry in patch:
        found = _key_of(entry, keys)
        if found is None:  # not a keyed object: a primitive list, merged as a set
            if entry not in items:
                items.append(copy.deepcopy(entry))
            continue
        index = next((i for i, it in enumerate(items) if _key_of(it, keys) == found), None)
        if isinstance(entry, dict) and entry.get("$patch") == "delete":
            if index is not None:
                items.pop(index)
            continue
        if index is None:
            items.append(strategic_merge_patch({}, entry))
        else:
            items[index] = strategic_merge_patch(items[index], entry)
    return items


def _reorder(items: list[Any], order: list[Any], keys: str | tuple[str, ...] | None) -> list[Any]:
    def rank(item: Any) -> int:
        for i, wanted in enumerate(order):
            if keys is None and item == wanted:
                return i
            if keys is not None and _key_of(item, keys) == _key_of(wanted, keys):
                return i
        return len(order)

    return sorted(items, key=rank)
