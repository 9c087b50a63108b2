"""The Kubernetes API paths of the admin app: discovery, then get/list/create/update/patch/
delete of the control plane's objects, errors as `Status`.

`KubeAPI.handle` takes a parsed `Request` and returns `(status, payload)`; only
`__call__` speaks ASGI. Writes go through `ControlPlane.apply`/`delete` in a worker thread,
exactly as `tokengateway apply` does, so a change is live on the data path when the answer
is sent.

Optimistic concurrency as on Kubernetes: a create is refused (409 AlreadyExists) when the
name is taken, an update or patch naming a `metadata.resourceVersion` other than the
object's (409 Conflict). Both are checked by the control plane under the lock it writes
with (`Expect`), not only before the write: two replicas renewing one Lease from the same
version cannot both succeed. A patch, a server-side apply or an update without a
resourceVersion is computed from the object as read, stored only if it is still at that
version, and computed again from the new one otherwise (the API server's GuaranteedUpdate).
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import dataclasses
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar
from urllib.parse import parse_qs, unquote

import yaml

from tokengateway.config.compile import ConfigError
from tokengateway.controlplane.control import (
    ConflictError,
    ControlPlane,
    Expect,
    NotFoundError,
)
from tokengateway.controlplane.history import Expired
from tokengateway.http.asgi import Receive, Scope, Send, read_body
from tokengateway.resources import ManifestError

from . import discovery, openapi, protobuf
from .apply import ApplyConflict, dotted, record_update, server_side_apply
from .discovery import KubeKind
from .objects import writable
from .patch import PatchError, PatchNotApplicable, json_patch, merge_patch, strategic_merge_patch
from .status import KubeError, success
from .tables import table
from .watch import bookmark, expired, next_bookmark

__all__ = ["KubeAPI", "Request", "claims"]

log = logging.getLogger("tokengateway.kubeapi")

MAX_BODY = 4 * 1024 * 1024
#: how many times a write computed from the object as read is tried again when the object
#: changed under it (the API server retries without bound; a client can always resend)
UPDATE_ATTEMPTS = 8
#: the admin API's own routes under /apis/ (see admin.py); no Kubernetes group has these names
ADMIN_ROUTES = frozenset({"/apis/apply", "/apis/delete", "/apis/resources"})


def claims(path: str) -> bool:
    """Whether `path` is a Kubernetes API path rather than one of the admin API's own."""
    if path in ADMIN_ROUTES:
        return False
    return path in ("/version", "/api", "/apis") or path.startswith(
        ("/api/", "/apis/", "/openapi/")
    )


@dataclass(frozen=True, slots=True)
class Request:
    method: str
    path: str
    query: dict[str, str]
    accept: str = ""
    content_type: str = ""
    body: bytes = b""


_AGGREGATED = discovery.AGGREGATED.encode()
_T = TypeVar("_T")
#: the media type of server-side apply's PATCH
APPLY_PATCH = "application/apply-patch+yaml"


def _manager(request: Request) -> str:
    """The field manager a write names (kubectl always names one); empty when none."""
    return str(request.query.get("fieldManager", ""))


@dataclass(frozen=True, slots=True)
class _Target:
    kind: KubeKind
    namespace: str  # "" when cluster-scoped or listing every namespace
    name: str
    subresource: str = ""  # "status", or "" for the object itself


class KubeAPI:
    def __init__(self, control: ControlPlane) -> None:
        self.control = control

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        headers = {k.decode("latin-1"): v.decode("latin-1") for k, v in scope["headers"]}
        query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
        try:
            body = await read_body(receive, MAX_BODY)
            if body is None:
                raise KubeError(413, f"request body over {MAX_BODY} bytes")
            request = Request(
                scope["method"],
                unquote(scope["path"]),
                {k: v[-1] for k, v in query.items()},
                headers.get("accept", ""),
                headers.get("content-type", ""),
                body,
            )
            if request.query.get("watch") in ("true", "1"):
                request, target = self.watch_target(request)
                await self._stream(request, target, receive, send)
                return
            status, payload = await self.handle(request)
        except KubeError as exc:
            status, payload = exc.code, exc.status()
        except Exception:  # never a stack trace to a client
            log.exception("Kubernetes API error")
            error = KubeError(500, "internal error; see the gateway's log")
            status, payload = error.code, error.status()
        body = json.dumps(payload).encode()
        aggregated = isinstance(payload, dict) and payload.get("kind") == "APIGroupDiscoveryList"
        await send(
            {
                "type": "http.response.start",
                "status": status,
                "headers": [
                    (b"content-type", _AGGREGATED if aggregated else b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    def watch_target(self, request: Request) -> tuple[Request, _Target]:
        parts = request.path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 3 and parts[1] == "v1":
            target = self._target("", "v1", parts[2:])
        elif parts[0] == "apis" and len(parts) >= 4:
            target = self._target(parts[1], parts[2], parts[3:])
        else:
            raise KubeError(404, f"nothing to watch at {request.path}")
        if request.method != "GET":
            raise KubeError(405, "a watch is a GET")
        if target.subresource:
            raise KubeError(405, f"a {target.subresource} subresource cannot be watched")
        if target.name:  # /.../NAME?watch=true: the old form of fieldSelector=metadata.name
            query = dict(request.query, fieldSelector=f"metadata.name={target.name}")
            request = dataclasses.replace(request, query=query)
            target = _Target(target.kind, target.namespace, "")
        return request, target

    async def _stream(self, request: Request, t: _Target, receive: Receive, send: Send) -> None:
        """Newline-delimited watch events until `timeoutSeconds` (30 minutes at most) or
        the client leaves: the history's events after `resourceVersion` (or every current
        object as ADDED, without one), then each change as it is recorded."""
        after = request.query.get("resourceVersion", "")
        try:
            since = int(after) if after.strip("0") else None
            timeout = min(float(request.query.get("timeoutSeconds") or 1800), 1800)
        except ValueError:
            raise KubeError(400, "resourceVersion and timeoutSeconds must be numbers") from None
        bookmarks = request.query.get("allowWatchBookmarks") in ("true", "1")
        history = self.control.history
        loop = asyncio.get_running_loop()
        await send(
            {
                "type": "http.response.start",
                "status": 200,
                "headers": [(b"content-type", b"application/json")],
            }
        )

        async def emit(kind: str, obj: dict[str, Any]) -> None:
            line = json.dumps({"type": kind, "object": obj}).encode() + b"\n"
            await send({"type": "http.response.body", "body": line, "more_body": True})

        selecting = bool(request.query.get("labelSelector") or request.query.get("fieldSelector"))
        #: with a selector, the objects this watch has shown as matching: one that stops
        #: matching is DELETED for it, one that starts is ADDED, as the API server sends them
        shown: set[tuple[str, str, str]] = set()

        def translated(kind: str, key: tuple[str, str, str], obj: dict[str, Any]) -> str | None:
            if not selecting:
                return kind if self._follows(request, t, key, obj) else None
            if not self._in_scope(t, key):
                return None
            matches = _selected(obj, request.query)
            was = key in shown
            if kind == "DELETED" or not matches:
                shown.discard(key)
                return "DELETED" if was or (kind == "DELETED" and matches) else None
            shown.add(key)
            return "MODIFIED" if was and kind != "ADDED" else "ADDED"

        gone = asyncio.ensure_future(receive())  # completes when the client disconnects
        deadline = loop.time() + timeout
        marked = next_bookmark(loop.time(), deadline)
        try:
            with history.waiter() as waiter:
                if since is None:  # "any version": the objects as they are, then what follows
                    cursor, current = history.snapshot()
                    for key, obj in sorted(current.items()):
                        if translated("ADDED", key, obj) is not None:
                            await emit("ADDED", self._event_object(request, t, obj, cursor))
                else:
                    cursor = since
                while not history.closed:
                    waiter.event.clear()  # before reading: a change after it wakes the wait
                    try:
                        cursor, events = history.since(cursor)
                    except Expired as exc:
                        await emit("ERROR", expired(exc))
                        break
                    for event in events:
                        kind = translated(event.type, event.key, event.object)
                        if kind is not None:
                            obj = self._event_object(request, t, event.object, event.version)
                            await emit(kind, obj)
                    now = loop.time()
                    if now >= deadline:
                        break
                    if bookmarks and now >= marked:
                        await emit("BOOKMARK", bookmark(t.kind.kind, t.kind.group_version, cursor))
                        marked = next_bookmark(now, deadline)
                    until = min(deadline, marked) if bookmarks else deadline
                    woken = asyncio.ensure_future(waiter.event.wait())
                    try:
                        await asyncio.wait(
                            {gone, woken},
                            timeout=max(until - now, 0),
                            return_when=asyncio.FIRST_COMPLETED,
                        )
                    finally:
                        woken.cancel()
                    if gone.done():
                        return
        except Exception:  # the answer has started: it can only end, as Kubernetes ends a watch
            log.exception("watch ended by an error")
        finally:
            gone.cancel()
        with contextlib.suppress(Exception):  # the client may be gone already
            await send({"type": "http.response.body", "body": b"", "more_body": False})

    @staticmethod
    def _follows(
        request: Request, t: _Target, key: tuple[str, str, str], obj: dict[str, Any]
    ) -> bool:
        """Whether a watch of `t` reports this object's events."""
        return KubeAPI._in_scope(t, key) and _selected(obj, request.query)

    @staticmethod
    def _in_scope(t: _Target, key: tuple[str, str, str]) -> bool:
        """The object is of the watched kind, in the watched namespace (if one)."""
        if key[0] != t.kind.kind:
            return False
        return not (t.namespace and t.kind.namespaced and key[1] != t.namespace)

    @staticmethod
    def _event_object(
        request: Request, t: _Target, obj: dict[str, Any], version: int
    ) -> dict[str, Any]:
        shown = {**obj, "apiVersion": t.kind.group_version}  # history's objects stay as they are
        if "as=Table" in request.accept:
            return table(t.kind.kind, [shown], str(version))
        return shown

    async def handle(self, request: Request) -> tuple[int, Any]:
        path = request.path.rstrip("/") or "/"
        if request.method == "GET":
            if path in ("/api", "/apis") and discovery.AGGREGATED in request.accept:
                return 200, discovery.aggregated(core=path == "/api")
            found = self._discovery(path)
            if found is not None:
                return 200, found
        parts = path.strip("/").split("/")
        if parts[0] == "api" and len(parts) >= 3 and parts[1] == "v1":
            group, version, rest = "", "v1", parts[2:]
        elif parts[0] == "apis" and len(parts) >= 4:
            group, version, rest = parts[1], parts[2], parts[3:]
        else:
            raise KubeError(404, f"the server could not find the requested resource ({path})")
        target = self._target(group, version, rest)
        return await self._resource(request, target)

    def _discovery(self, path: str) -> Any:
        if path == "/version":
            return discovery.version_info()
        if path == "/api":
            return discovery.api_versions()
        if path == "/apis":
            return discovery.api_group_list()
        if path == "/api/v1":
            return discovery.resource_list("", "v1")
        if path.startswith("/openapi/"):
            found = openapi.document(path)
            if found is None:
                raise KubeError(404, f"no OpenAPI document at {path}")
            return found
        parts = path.strip("/").split("/")
        if parts[0] == "apis" and len(parts) == 2:
            for group in discovery.api_group_list()["groups"]:
                if group["name"] == parts[1]:
                    return {"kind": "APIGroup", "apiVersion": "v1", **group}
        if parts[0] == "apis" and len(parts) == 3:
            return discovery.resource_list(parts[1], parts[2])
        return None

    @staticmethod
    def _target(group: str, version: str, rest: list[str]) -> _Target:
        namespace = ""
        if rest[0] == "namespaces" and len(rest) >= 3:
            namespace, rest = rest[1], rest[2:]
        kind = discovery.find(group, version, rest[0])
        if kind is None:
            gv = f"{group}/{version}" if group else version
            raise KubeError(
                404, f"the server could not find the requested resource ({gv} {rest[0]})"
            )
        subresource = "/".join(rest[2:])
        if subresource and (subresource != "status" or not kind.has_status):
            raise KubeError(404, f"subresource {subresource} of {kind.plural} is not served")
        name = rest[1] if len(rest) >= 2 else ""
        if not kind.namespaced:
            namespace = ""
        return _Target(kind, namespace, name, subresource)

    # --- one resource type --------------------------------------------------------------

    async def _resource(self, request: Request, t: _Target) -> tuple[int, Any]:
        method = request.method
        if method != "GET" and self.control.follows is not None:
            raise KubeError(405, self.control.read_only_message())
        dry = _dry_run(request)
        if method == "GET" and not t.name:
            return 200, self._list(request, t)
        if not t.name and method != "POST":
            raise KubeError(405, f"{method} needs a name")
        if t.kind.namespaced and not t.namespace:
            raise KubeError(400, "a namespaced resource needs a namespace in the path")
        if method == "GET":
            obj = self._get(t)
            if "as=Table" in request.accept:
                return 200, table(t.kind.kind, [obj], obj["metadata"]["resourceVersion"])
            return 200, obj
        if t.subresource:
            return 200, await self._write_status(request, t, dry)
        if method == "POST":
            return 201, await self._create(request, t, dry)
        if method == "PUT":
            return 200, await self._update(request, t, dry)
        if method == "PATCH" and request.content_type.startswith(APPLY_PATCH):
            return await self._apply(request, t, dry)
        if method == "PATCH":
            return 200, await self._patch(request, t, dry)
        if method == "DELETE":
            uid = self._get(t)["metadata"].get("uid")
            if not dry:
                await self._write(self.control.delete, [(t.kind.kind, t.namespace, t.name)])
            return 200, success(t.name, t.kind.group, t.kind.plural, uid)
        raise KubeError(405, f"{method} is not allowed here")

    @staticmethod
    def _shown(obj: dict[str, Any], t: _Target) -> dict[str, Any]:
        obj["apiVersion"] = t.kind.group_version
        return obj

    def _get(self, t: _Target) -> dict[str, Any]:
        try:
            found = self.control.objects(t.kind.kind, t.namespace, t.name)
        except NotFoundError:
            found = []
        if not found:
            raise self._not_found(t)
        return self._shown(found[0], t)

    @staticmethod
    def _not_found(t: _Target) -> KubeError:
        return KubeError(
            404,
            f'{t.kind.qualified} "{t.name}" not found',
            details={"name": t.name, "group": t.kind.group, "kind": t.kind.plural},
        )

    def _list(self, request: Request, t: _Target) -> dict[str, Any]:
        version, objects = self.control.listing(t.kind.kind, t.namespace or None)
        objects = [self._shown(o, t) for o in objects if _selected(o, request.query)]
        if "as=Table" in request.accept:
            return table(t.kind.kind, objects, str(version))
        return {
            "kind": f"{t.kind.kind}List",
            "apiVersion": t.kind.group_version,
            "metadata": {"resourceVersion": str(version)},
            "items": objects,
        }

    # --- writes ----------------------------------------------------------------------------

    def _body_object(self, request: Request, t: _Target) -> dict[str, Any]:
        try:
            if "protobuf" in request.content_type:
                obj = protobuf.decode(request.body)
            else:
                obj = json.loads(request.body or b"null")
        except protobuf.ProtobufError as exc:
            raise KubeError(415, f"this protobuf body cannot be read ({exc}); send JSON") from None
        except ValueError as exc:
            raise KubeError(400, f"the body is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise KubeError(400, "the body must be a JSON object")
        return self._placed(obj, t)

    def _placed(self, obj: dict[str, Any], t: _Target) -> dict[str, Any]:
        """`obj` checked against the path it was sent to: kind, namespace, name."""
        if obj.get("kind", t.kind.kind) != t.kind.kind:
            raise KubeError(400, f"the body is a {obj.get('kind')}, the path is {t.kind.plural}")
        obj["kind"] = t.kind.kind
        obj.setdefault("apiVersion", t.kind.group_version)
        meta = obj.get("metadata")
        if not isinstance(meta, dict):
            meta = obj["metadata"] = {}
        if t.kind.namespaced:
            if meta.get("namespace", t.namespace) != t.namespace:
                raise KubeError(
                    400,
                    "the namespace of the provided object does not match the namespace sent "
                    "on the request",
                )
            meta["namespace"] = t.namespace
        else:
            meta.pop("namespace", None)
        if t.name and meta.get("name", t.name) != t.name:
            raise KubeError(400, "the name of the object does not match the name on the URL")
        if t.name:
            meta["name"] = t.name
        return obj

    async def _create(self, request: Request, t: _Target, dry: bool) -> dict[str, Any]:
        obj = self._body_object(request, t)
        name = str(obj["metadata"].get("name") or "")
        if not name:
            raise KubeError(422, f"{t.kind.kind} is invalid: metadata.name: Required value")
        t = _Target(t.kind, t.namespace, name)
        if self._current(t, name) is not None:
            raise _already_exists(t)
        return await self._store(obj, t, dry, updater=_manager(request), expect=Expect(absent=True))

    async def _update(self, request: Request, t: _Target, dry: bool) -> dict[str, Any]:
        """PUT: the body replaces the object; with a resourceVersion, only that version of it
        (409 Conflict otherwise); without one, whatever version it is at."""
        obj = self._body_object(request, t)
        sent = _sent_version(obj)

        async def attempt() -> dict[str, Any]:
            current = self._get(t)
            _check_version(obj, current, t)
            expect = Expect(present=True, resource_version=_version_of(current))
            return await self._store(
                copy.deepcopy(obj), t, dry, updater=_manager(request), expect=expect
            )

        return await self._guaranteed(t, attempt, retry=not sent)

    async def _write_status(self, request: Request, t: _Target, dry: bool) -> dict[str, Any]:
        """PUT or PATCH of `.../NAME/status`: only the status changes; what the body says
        of anything else is ignored, as the API server ignores it."""
        if request.method not in ("PUT", "PATCH"):
            raise KubeError(405, f"{request.method} is not allowed on a status")
        body = self._body_object(request, t) if request.method == "PUT" else None
        sent = ""

        async def attempt() -> dict[str, Any]:
            nonlocal sent
            current = self._get(t)
            obj = copy.deepcopy(body) if body is not None else self._patched(request, current)
            sent = _sent_version(obj)
            _check_version(obj, current, t)
            status = obj.get("status") or {}
            if not isinstance(status, dict):
                raise KubeError(
                    422, f'{t.kind.kind} "{t.name}" is invalid: status: must be an object'
                )
            if dry:  # what the gateway computes would still win over what was written
                return {**current, "status": {**status, **(current.get("status") or {})}}
            expect = Expect(present=True, resource_version=_version_of(current))
            key = (t.kind.kind, t.namespace, t.name)
            await self._write(self.control.set_status, key, status, expect, t=t)
            return self._get(t)

        return await self._guaranteed(t, attempt, retry=lambda: not sent)

    def _patched(self, request: Request, current: dict[str, Any]) -> dict[str, Any]:
        """`current` with the request's merge or strategic merge patch applied."""
        content_type = request.content_type.split(";")[0].strip()
        try:
            patch = json.loads(request.body or b"null")
        except ValueError as exc:
            raise KubeError(400, f"the patch is not JSON: {exc}") from None
        try:
            if content_type == "application/merge-patch+json":
                patched = merge_patch(current, patch)
            elif content_type == "application/strategic-merge-patch+json":
                patched = strategic_merge_patch(current, patch)
            elif content_type == "application/json-patch+json":
                patched = json_patch(current, patch)
            else:
                raise KubeError(
                    415,
                    f"patch type {content_type or '(none)'} is not supported yet; use "
                    "application/merge-patch+json, application/strategic-merge-patch+json "
                    "or application/json-patch+json",
                )
        except PatchNotApplicable as exc:
            raise KubeError(422, str(exc)) from None
        except PatchError as exc:
            raise KubeError(400, str(exc)) from None
        if not isinstance(patched, dict):
            raise KubeError(400, "the patch does not leave an object")
        return patched

    async def _patch(self, request: Request, t: _Target, dry: bool) -> dict[str, Any]:
        """A merge, strategic merge or JSON patch of the object as it is: a resourceVersion
        in the patch is a precondition (409 Conflict when it is not the object's)."""
        sent = ""

        async def attempt() -> dict[str, Any]:
            nonlocal sent
            current = self._get(t)
            patched = self._patched(request, writable(current))
            sent = _sent_version(patched)
            _check_version(patched, current, t)
            expect = Expect(present=True, resource_version=_version_of(current))
            placed = self._placed(patched, t)
            return await self._store(placed, t, dry, updater=_manager(request), expect=expect)

        return await self._guaranteed(t, attempt, retry=lambda: not sent)

    async def _guaranteed(
        self,
        t: _Target,
        attempt: Callable[[], Awaitable[_T]],
        retry: bool | Callable[[], bool],
    ) -> _T:
        """`attempt` (a write computed from the object as read, expecting it unchanged), and
        again while it conflicts, when `retry` says the client named no version: the write
        then applies to whatever version is current, as on Kubernetes."""
        for _ in range(UPDATE_ATTEMPTS - 1):
            try:
                return await attempt()
            except _Raced:
                if not (retry() if callable(retry) else retry):
                    raise _conflict(t) from None
        try:
            return await attempt()
        except _Raced:
            raise _conflict(t) from None

    async def _apply(self, request: Request, t: _Target, dry: bool) -> tuple[int, Any]:
        """Server-side apply (apply.py): 201 when it creates the object, 200 otherwise."""
        manager = request.query.get("fieldManager", "")
        if not manager:
            raise KubeError(400, "fieldManager is required for apply requests")
        try:
            applied = yaml.safe_load(request.body or b"")
        except yaml.YAMLError as exc:
            raise KubeError(400, f"the applied configuration is not YAML or JSON: {exc}") from None
        if not isinstance(applied, dict):
            raise KubeError(400, "the applied configuration must be an object")
        placed = self._placed(applied, t)
        sent = _sent_version(placed)  # a precondition, as in any write
        applied = writable(placed)
        force = request.query.get("force") in ("true", "1")

        async def attempt() -> tuple[int, Any]:
            current = self._current(t, t.name)
            if sent:
                if current is None:
                    raise self._not_found(t)
                _check_version({"metadata": {"resourceVersion": sent}}, current, t)
            result, managed = self._server_side_apply(
                t, current, copy.deepcopy(applied), manager, force
            )
            if current is None:
                expect = Expect(absent=True)
            else:
                expect = Expect(present=True, resource_version=_version_of(current))
            stored = await self._store(result, t, dry, managed, expect=expect)
            return (201 if current is None else 200), stored

        return await self._guaranteed(t, attempt, retry=not sent)

    @staticmethod
    def _server_side_apply(
        t: _Target,
        current: dict[str, Any] | None,
        applied: dict[str, Any],
        manager: str,
        force: bool,
    ) -> tuple[dict[str, Any], list[dict[str, Any]]]:
        managed = list((current or {}).get("metadata", {}).get("managedFields") or [])
        try:
            return server_side_apply(
                writable(current) if current is not None else None,
                managed,
                applied,
                manager,
                force,
            )
        except ApplyConflict as exc:
            raise KubeError(
                409,
                str(exc),
                details={
                    "name": t.name,
                    "group": t.kind.group,
                    "kind": t.kind.plural,
                    "causes": [
                        {
                            "type": "FieldManagerConflict",
                            "message": f'conflict with "{other}"',
                            "field": dotted(path),
                        }
                        for other, path in exc.conflicts
                    ],
                },
            ) from None

    def _current(self, t: _Target, name: str) -> dict[str, Any] | None:
        """The stored object named `name`, or None."""
        try:
            return self._get(_Target(t.kind, t.namespace, name))
        except KubeError:
            return None

    async def _store(
        self,
        obj: dict[str, Any],
        t: _Target,
        dry: bool = False,
        managed: list[dict[str, Any]] | None = None,
        updater: str = "",
        expect: Expect | None = None,
    ) -> dict[str, Any]:
        """Create or replace `obj`; with `dry`, every check and the object as it would be
        stored, and nothing changed (`dryRun=All`, kubectl's `--dry-run=server`).
        `managed`: its managedFields (an apply's); None: the ones it has, with an Update
        entry for `updater` (the request's fieldManager) owning what this write changed.
        `expect`: what the object must still be when the write is made (`_Raced` when it
        is not; a create of a taken name is 409 AlreadyExists)."""
        name = str(obj["metadata"].get("name") or t.name)
        doc = writable(obj)
        if managed is None:
            current = self._current(t, name)
            kept = list((current or {}).get("metadata", {}).get("managedFields") or [])
            before = writable(current) if current is not None else None
            managed = record_update(before, doc, kept, updater)
        if managed:
            doc["metadata"]["managedFields"] = managed
        if dry:
            shown = await self._write(
                self.control.preview, json.dumps(doc), kind=t.kind.kind, name=name
            )
            return self._shown(shown[0], t)
        target = _Target(t.kind, t.namespace, name)
        expected = {(t.kind.kind, t.namespace, name): expect} if expect is not None else None
        await self._write(
            self.control.apply, json.dumps(doc), expected, kind=t.kind.kind, name=name, t=target
        )
        return self._get(target)

    async def _write(
        self,
        change: Any,
        *args: Any,
        kind: str = "",
        name: str = "",
        t: _Target | None = None,
    ) -> Any:
        try:
            return await asyncio.to_thread(change, *args)
        except ConflictError as exc:
            if t is None:
                raise KubeError(409, str(exc), reason=exc.reason) from None
            if exc.reason == "AlreadyExists":
                raise _already_exists(t) from None
            raise _Raced from None
        except ManifestError as exc:
            causes = [(e.field, e.reason) for e in exc.errors] or [("", str(exc))]
            raise _invalid(kind, name, causes) from None
        except ConfigError as exc:
            raise _invalid(kind, name, [("", p) for p in exc.problems]) from None
        except NotFoundError as exc:
            if t is not None:  # deleted between the read and the write
                raise self._not_found(t) from None
            raise KubeError(404, str(exc)) from None
        except (ValueError, RuntimeError) as exc:
            raise KubeError(400, f"{exc}; nothing was changed") from None


def _dry_run(request: Request) -> bool:
    """`dryRun=All` (the one value Kubernetes defines) on a write: True; no dryRun: False.
    A DELETE may say it in its body instead, a DeleteOptions with `dryRun: ["All"]` (as
    kubectl does)."""
    value = request.query.get("dryRun")
    if not value and request.method == "DELETE" and request.body:
        try:
            options = json.loads(request.body)
        except ValueError:
            raise KubeError(400, "the body of a DELETE is not JSON DeleteOptions") from None
        listed = options.get("dryRun") if isinstance(options, dict) else None
        if isinstance(listed, list) and listed:
            value = ",".join(str(v) for v in listed)
    if not value:
        return False
    if value != "All":
        raise KubeError(400, f'invalid dry run value "{value}": the only valid value is "All"')
    return True


class _Raced(Exception):
    """The object changed between the read a write was computed from and the write."""


def _sent_version(obj: dict[str, Any]) -> str:
    """The resourceVersion a client named in what it wrote; "" when none."""
    meta = obj.get("metadata")
    return str((meta.get("resourceVersion") if isinstance(meta, dict) else None) or "")


def _version_of(current: dict[str, Any]) -> str:
    return str(current["metadata"]["resourceVersion"])


def _check_version(obj: dict[str, Any], current: dict[str, Any], t: _Target) -> None:
    """Optimistic concurrency: a write that names a resourceVersion must name the current
    one (a write without one always goes through, as on Kubernetes for PATCH and for the
    update of most kinds)."""
    sent = _sent_version(obj)
    if sent and sent != _version_of(current):
        raise _conflict(t)


def _conflict(t: _Target) -> KubeError:
    return KubeError(
        409,
        f'Operation cannot be fulfilled on {t.kind.qualified} "{t.name}": the object has '
        "been modified; please apply your changes to the latest version and try again",
        reason="Conflict",
        details={"name": t.name, "group": t.kind.group, "kind": t.kind.plural},
    )


def _already_exists(t: _Target) -> KubeError:
    return KubeError(
        409,
        f'{t.kind.qualified} "{t.name}" already exists',
        reason="AlreadyExists",
        details={"name": t.name, "group": t.kind.group, "kind": t.kind.plural},
    )


def _invalid(kind: str, name: str, causes: list[tuple[str, str]]) -> KubeError:
    """422 Invalid: kubectl prints `The KIND "NAME" is invalid:` and one line per cause."""
    text = "; ".join(f"{field}: {reason}" if field else reason for field, reason in causes)
    return KubeError(
        422,
        f'{kind} "{name}" is invalid; nothing was changed: {text}',
        details={
            "name": name,
            "kind": kind,
            "causes": [
                {"reason": "FieldValueInvalid", "message": reason, "field": field}
                for field, reason in causes
            ],
        },
    )


def _selected(obj: dict[str, Any], query: dict[str, str]) -> bool:
    """`fieldSelector=metadata.name=X` (or `metadata.namespace`) and equality label
    selectors (`a=b,c`); other selectors select everything, for now."""
    meta = obj.get("metadata") or {}
    for term in filter(None, query.get("fieldSelector", "").split(",")):
        field, _, value = term.partition("=")
        field = field.rstrip("=")
        value = value.lstrip("=")
        if (
            field in ("metadata.name", "metadata.namespace")
            and str(meta.get(field.split(".")[1], "")) != value
        ):
            return False
    labels = meta.get("labels") or {}
    for term in filter(None, query.get("labelSelector", "").split(",")):
        if "!=" in term or " " in term.strip():
            continue
        key, sep, value = term.partition("=")
        key, value = key.strip(), value.lstrip("=").strip()
        if key not in labels or (sep and str(labels[key]) != value):
            return False
    return True
