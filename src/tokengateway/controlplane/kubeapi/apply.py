"""Server-side apply (`kubectl apply --server-side`): an applied configuration merged into
the live object, with the fields each field manager applied recorded in
`metadata.managedFields`, as the API server records them.

What is kept of Kubernetes' structured merge:

* a field is a path of map keys; a list is one field as a whole (atomic), as for a custom
  resource whose schema marks no list as a map, and a scalar is one field;
* the applied object is merged over the live one (maps merged key by key, lists and
  scalars replaced); a field the same manager applied last time and leaves out now is
  removed, unless another manager also applied it;
* a field another manager applied, set to a different value, is a conflict: nothing
  changes and the answer is a 409 naming each field and its manager, unless the apply is
  forced (`force=true`, kubectl's `--force-conflicts`), which takes the fields over;
* applying the same configuration again changes nothing (the same managedFields, the
  same resourceVersion).

Writes that are not applies (create, update, merge and JSON patches) record an Update
entry for their `fieldManager` (kubectl names itself, e.g. `kubectl-client-side-apply`,
`kubectl-patch`): the fields whose values they changed become that manager's and leave
every other entry, so a later apply that sets them to another value conflicts with it.
A write naming no manager changes no entry.
"""

from __future__ import annotations

import copy
import datetime
from typing import Any

__all__ = ["ApplyConflict", "FieldPath", "fields_of", "record_update", "server_side_apply"]

FieldPath = tuple[str, ...]

#: what names an object rather than configuring it: not owned by anyone
_IDENTITY: frozenset[FieldPath] = frozenset(
    {("apiVersion",), ("kind",), ("metadata", "name"), ("metadata", "namespace")}
)


class ApplyConflict(Exception):
    """Fields another manager applied with other values: `conflicts` is (manager, path)."""

    def __init__(self, conflicts: list[tuple[str, FieldPath]]) -> None:
        self.conflicts = conflicts
        super().__init__(
            f"Apply failed with {len(conflicts)} conflict{'s' if len(conflicts) != 1 else ''}: "
            + "; ".join(f'conflict with "{m}": {dotted(p)}' for m, p in conflicts)
        )


def dotted(path: FieldPath) -> str:
    return "." + ".".join(path)


def fields_of(obj: Any, prefix: FieldPath = ()) -> set[FieldPath]:
    """The leaf fields an object sets: map keys down to a scalar, a list or an empty map."""
    out: set[FieldPath] = set()
    if isinstance(obj, dict) and obj:
        for key, value in obj.items():
            path = (*prefix, str(key))
            if path in _IDENTITY or path == ("metadata", "managedFields"):
                continue
            out |= fields_of(value, path)
    elif prefix:
        out.add(prefix)
    return out


def _encode(fields: set[FieldPath]) -> dict[str, Any]:
    """FieldsV1: nested `f:<key>` maps, a leaf an empty map."""
    root: dict[str, Any] = {}
    for path in sorted(fields):
        node = root
        for key in path:
            node = node.setdefault(f"f:{key}", {})
    return root


def _decode(node: Any, prefix: FieldPath = ()) -> set[FieldPath]:
    if not isinstance(node, dict) or not node:
        return {prefix} if prefix else set()
    out: set[FieldPath] = set()
    for key, value in node.items():
        if key.startswith("f:"):
            out |= _decode(value, (*prefix, key[2:]))
    return out


def _get(obj: Any, path: FieldPath) -> tuple[bool, Any]:
    for key in path:
        if not isinstance(obj, dict) or key not in obj:
            return False, None
        obj = obj[key]
    return True, obj


def _remove(obj: dict[str, Any], path: FieldPath) -> None:
    parents = [obj]
    for key in path[:-1]:
        child = parents[-1].get(key)
        if not isinstance(child, dict):
            return
        parents.append(child)
    parents[-1].pop(path[-1], None)
    # maps left empty by the removal go too
    for depth in range(len(path) - 1, 0, -1):
        if parents[depth] == {}:
            parents[depth - 1].pop(path[depth - 1], None)


def _merge(live: Any, applied: Any) -> Any:
    if isinstance(live, dict) and isinstance(applied, dict):
        out = dict(live)
        for key, value in applied.items():
            out[key] = _merge(live.get(key), value)
        return out
    return copy.deepcopy(applied)


def _overlaps(a: FieldPath, b: FieldPath) -> bool:
    shorter = min(len(a), len(b))
    return a[:shorter] == b[:shorter]


def server_side_apply(
    live: dict[str, Any] | None,
    managed: list[dict[str, Any]],
    applied: dict[str, Any],
    manager: str,
    force: bool,
    now: datetime.datetime | None = None,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """The object after `manager` applies `applied` to `live` (None: it does not exist
    yet), and the managedFields that go with it. Raises ApplyConflict."""
    owned: dict[tuple[str, str], set[FieldPath]] = {
        _key(entry): _decode(entry.get("fieldsV1")) for entry in managed
    }
    entries = {_key(entry): entry for entry in managed}
    me = (manager, "Apply")
    mine = fields_of(applied)
    base = live or {}
    conflicts = []
    for other, theirs in owned.items():
        if other == me:
            continue
        clashing = {
            q
            for q in theirs
            for p in mine
            if _overlaps(p, q) and _get(applied, p) != _get(base, p) and _get(base, q)[0]
        }
        if clashing and not force:
            conflicts += [(other[0], q) for q in sorted(clashing)]
        owned[other] = theirs - clashing
    if conflicts:
        raise ApplyConflict(conflicts)
    result = _merge(base, applied)
    others = set().union(*(s for k, s in owned.items() if k != me))
    for path in owned.get(me, set()) - mine:
        if not any(_overlaps(path, p) for p in mine | others):
            _remove(result, path)
    owned[me] = mine
    version = str(applied.get("apiVersion", ""))
    return result, _entries(owned, entries, version, now)


def record_update(
    live: dict[str, Any] | None,
    new: dict[str, Any],
    managed: list[dict[str, Any]],
    manager: str,
    now: datetime.datetime | None = None,
) -> list[dict[str, Any]]:
    """The managedFields after `manager` writes `new` over `live` with a create, update or
    patch (operation Update): the fields whose values it changed become its own and no
    one else's, fields it removed are no one's, and the rest stay as recorded. Nothing
    changed, or no manager named: the same entries."""
    old = live or {}
    touched = fields_of(old) | fields_of(new)
    changed = {p for p in touched if _get(old, p) != _get(new, p)}
    if not changed or not manager:
        return managed
    present = fields_of(new)
    owned: dict[tuple[str, str], set[FieldPath]] = {}
    for entry in managed:
        owned[_key(entry)] = {
            q for q in _decode(entry.get("fieldsV1")) if not any(_overlaps(p, q) for p in changed)
        }
    me = (manager, "Update")
    owned[me] = owned.get(me, set()) | (changed & present)
    entries = {_key(entry): entry for entry in managed}
    return _entries(owned, entries, str(new.get("apiVersion", "")), now)


def _key(entry: dict[str, Any]) -> tuple[str, str]:
    return str(entry.get("manager", "")), str(entry.get("operation", "Apply"))


def _entries(
    owned: dict[tuple[str, str], set[FieldPath]],
    entries: dict[tuple[str, str], dict[str, Any]],
    version: str,
    now: datetime.datetime | None,
) -> list[dict[str, Any]]:
    """managedFields from each (manager, operation)'s fields: an entry whose fields did
    not change is kept as it was (its time too), an entry left with none is dropped."""
    stamp = (now or datetime.datetime.now(datetime.UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")
    out = []
    for (name, operation), fields in owned.items():
        if not fields:
            continue
        previous = entries.get((name, operation))
        if previous is not None and _decode(previous.get("fieldsV1")) == fields:
            out.append(previous)
            continue
        out.append(
            {
                "manager": name,
                "operation": operation,
                "apiVersion": version,
                "time": stamp,
                "fieldsType": "FieldsV1",
                "fieldsV1": _encode(fields),
            }
        )
    return out
