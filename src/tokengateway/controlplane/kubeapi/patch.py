"""The patch forms of the Kubernetes API: the two `kubectl apply` sends, JSON merge patch
(RFC 7386, for custom resources) and strategic merge patch (for Deployment, Service,
Secret, Namespace), and JSON patch (RFC 6902, `kubectl patch --type json`).

The strategic form is merge patch plus: lists of objects merged by a key (containers by
`name`, ports by `containerPort`/`port`, ...) and the directives kubectl writes
(`$patch`, `$setElementOrder/<field>`, `$retainKeys`, `$deleteFromPrimitiveList/<field>`).
Lists without a known merge key are replaced, as Kubernetes does for them.
"""

from __future__ import annotations

import copy
from typing import Any

__all__ = ["PatchError", "PatchNotApplicable", "json_patch", "merge_patch", "strategic_merge_patch"]


class PatchError(ValueError):
    """The patch itself is malformed (the API server's 400 Bad Request)."""


class PatchNotApplicable(PatchError):
    """A well-formed JSON patch that does not apply to the object: a path that is not
    there, a failed `test` (the API server's 422)."""


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


# --- JSON patch (RFC 6902) ------------------------------------------------------------------

_OPS = {"add": ("value",), "remove": (), "replace": ("value",), "move": ("from",)}
_OPS |= {"copy": ("from",), "test": ("value",)}


def json_patch(target: Any, patch: Any) -> Any:
    """`target` with the operations of `patch` applied in order, on a copy: all of them or,
    at the first that fails, none (RFC 6902 section 5)."""
    if not isinstance(patch, list):
        raise PatchError("a JSON patch is a list of operations")
    doc = copy.deepcopy(target)
    for i, op in enumerate(patch):
        if not isinstance(op, dict) or not isinstance(op.get("op"), str):
            raise PatchError(f"operation {i}: an object with an `op` is required")
        name = op["op"]
        if name not in _OPS:
            raise PatchError(f"operation {i}: unknown op {name!r}")
        for member in ("path", *_OPS[name]):
            if member not in op:
                raise PatchError(f"operation {i} ({name}): `{member}` is required")
        path = _pointer(op["path"], i)
        try:
            if name == "add":
                doc = _add(doc, path, copy.deepcopy(op["value"]))
            elif name == "remove":
                doc = _remove(doc, path)
            elif name == "replace":
                doc = _add(_remove(doc, path), path, copy.deepcopy(op["value"]))
            elif name == "test":
                if _get(doc, path) != op["value"]:
                    raise PatchNotApplicable(f"the value at {op['path']} is not the one tested")
            else:  # move, copy
                source = _pointer(op["from"], i)
                if name == "move" and path[: len(source)] == source and path != source:
                    raise PatchError(f"operation {i}: cannot move {op['from']} into itself")
                value = copy.deepcopy(_get(doc, source))
                if name == "move":
                    doc = _remove(doc, source)
                doc = _add(doc, path, value)
        except PatchNotApplicable as exc:
            raise PatchNotApplicable(f"operation {i} ({name} {op['path']}): {exc}") from None
    return doc


def _pointer(text: Any, i: int) -> list[str]:
    """RFC 6901: "" is the whole document, "/a/b~1c~0" is ["a", "b/c~"]."""
    if not isinstance(text, str) or (text and not text.startswith("/")):
        raise PatchError(f"operation {i}: {text!r} is not a JSON pointer")
    if not text:
        return []
    return [t.replace("~1", "/").replace("~0", "~") for t in text[1:].split("/")]


def _index(container: list[Any], token: str, adding: bool) -> int:
    if adding and token == "-":
        return len(container)
    if not token.isdigit() or (token != "0" and token.startswith("0")):
        raise PatchNotApplicable(f"{token!r} is not an index of a list")
    index = int(token)
    if index > len(container) or (index == len(container) and not adding):
        raise PatchNotApplicable(f"index {index} is out of range")
    return index


def _get(doc: Any, path: list[str]) -> Any:
    for token in path:
        if isinstance(doc, dict):
            if token not in doc:
                raise PatchNotApplicable(f"there is no {token!r}")
            doc = doc[token]
        elif isinstance(doc, list):
            doc = doc[_index(doc, token, adding=False)]
        else:
            raise PatchNotApplicable(f"{token!r} is below a value that is not a container")
    return doc


def _add(doc: Any, path: list[str], value: Any) -> Any:
    if not path:
        return value
    parent = _get(doc, path[:-1])
    token = path[-1]
    if isinstance(parent, dict):
        parent[token] = value
    elif isinstance(parent, list):
        parent.insert(_index(parent, token, adding=True), value)
    else:
        raise PatchNotApplicable(f"{token!r} is below a value that is not a container")
    return doc


def _remove(doc: Any, path: list[str]) -> Any:
    if not path:
        return None
    parent = _get(doc, path[:-1])
    token = path[-1]
    if isinstance(parent, dict):
        if token not in parent:
            raise PatchNotApplicable(f"there is no {token!r} to remove")
        del parent[token]
    elif isinstance(parent, list):
        del parent[_index(parent, token, adding=False)]
    else:
        raise PatchNotApplicable(f"{token!r} is below a value that is not a container")
    return doc
