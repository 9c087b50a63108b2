"""The gateway as its own control plane: the live set of resources and how it changes.

Resources come from the files given to `serve -f` (watched) and from `apply` through the
admin API (kept in the state directory, so they survive a restart). Every change builds a
whole new configuration and swaps it in one assignment: a request keeps the configuration
it started with, so none is dropped or fails during a reload. A change that cannot be built
is refused and nothing changes.

Each change is also recorded in `history` (history.py): the objects as clients see them,
status included, each with its resourceVersion, and the events a watch follows. The last
resourceVersion is kept in the state directory, so versions keep growing across restarts.

A change of only kinds no configuration reads (`CONFIG_NEUTRAL`: the Lease replicas renew
every few seconds, GatewayClass) is stored, saved and recorded like any other, but builds and
publishes nothing: the live configuration stays the very same object.

A write may carry an `Expect` (a create: the object must not exist; an update: it must, at
the resourceVersion named), checked under the same lock as the write itself, so two writers
racing from one version cannot both succeed (`ConflictError`), as leader election needs.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import copy
import dataclasses
import datetime
import io
import logging
import os
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tokengateway.config.backends import plan_backends
from tokengateway.config.compile import CompiledConfig, compile_config, needed_services
from tokengateway.controlplane.classes import left_alone
from tokengateway.controlplane.history import History
from tokengateway.resources import (
    Document,
    ManifestError,
    Resource,
    load_paths,
    parse_resources,
)
from tokengateway.resources.kinds import CLUSTER_SCOPED, CONFIG_NEUTRAL
from tokengateway.resources.loader import MANIFEST_EXTENSIONS

__all__ = [
    "ApplyResult",
    "ConflictError",
    "ControlPlane",
    "Expect",
    "NotFoundError",
    "ReadOnlyError",
    "ResourceKey",
]

log = logging.getLogger("tokengateway.control")

ResourceKey = tuple[str, str, str]  # (kind, namespace, name); namespace "" when cluster-scoped
STATE_FILE = "applied.yaml"
#: the last resourceVersion given, so that versions only grow across restarts
VERSION_FILE = "resourceversion"


class NotFoundError(LookupError):
    pass


class ReadOnlyError(PermissionError):
    """A write to a gateway that follows a Kubernetes API: it is made there, not here."""


class ConflictError(Exception):
    """A write's `Expect` does not hold: the object exists (`reason` "AlreadyExists") or is
    not at the resourceVersion named ("Conflict"). Nothing was changed."""

    def __init__(self, key: ResourceKey, reason: str) -> None:
        kind, namespace, name = key
        what = "already exists" if reason == "AlreadyExists" else "has been modified"
        super().__init__(f"{kind} {namespace + '/' if namespace else ''}{name} {what}")
        self.key = key
        self.reason = reason


@dataclass(frozen=True, slots=True)
class Expect:
    """What a write needs of the object it replaces, checked with the write, under the lock."""

    #: a create: the object must not exist yet
    absent: bool = False
    #: an update: the object must exist...
    present: bool = False
    #: ...at this resourceVersion, when one is named
    resource_version: str = ""


@dataclass(frozen=True, slots=True)
class ApplyResult:
    api_version: str
    kind: str
    namespace: str
    name: str
    action: str  # created | configured | unchanged | deleted

    def as_json(self) -> dict[str, str]:
        return {
            "apiVersion": self.api_version,
            "kind": self.kind,
            "namespace": self.namespace,
            "name": self.name,
            "action": self.action,
        }


@dataclass
class _Stored:
    doc: dict[str, Any]  # the manifest as applied, without our metadata
    origin: str  # "api" or "file"
    generation: int
    created: str
    uid: str
    #: what clients wrote to the `status` subresource; what the gateway computes wins over it
    status: dict[str, Any] | None = None


def _now() -> str:
    return datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def _key_of(doc: Mapping[str, Any]) -> ResourceKey:
    kind = str(doc.get("kind", ""))
    meta = doc.get("metadata") or {}
    namespace = "" if kind in CLUSTER_SCOPED else str(meta.get("namespace") or "default")
    return (kind, namespace, str(meta.get("name", "")))


def _problem(obj: Mapping[str, Any]) -> str | None:
    """Why `obj` does not validate on its own, or None."""
    try:
        parse_resources([Document("cluster", dict(obj))])
    except ManifestError as exc:
        return "; ".join(str(e) for e in exc.errors) or str(exc)
    return None


def _spec_of(doc: Mapping[str, Any]) -> Any:
    """What a change of generation looks at: everything but metadata and status."""
    return {k: v for k, v in doc.items() if k not in ("metadata", "status")}


class ControlPlane:
    """Owns the resources; `rebuild` turns them into a CompiledConfig handed to `publish`."""

    def __init__(
        self,
        paths: Sequence[str],
        overrides: Mapping[str, str],
        state_dir: Path | None,
        start_backends: Callable[[Mapping[str, Any]], dict[str, str]],
        publish: Callable[[CompiledConfig], None],
        gateway_class: str | None = None,
        follows: str | None = None,
    ) -> None:
        self.paths = list(paths)
        #: serve only Gateways of this class and what attaches to them (classes.py)
        self.gateway_class = gateway_class
        #: the API server this gateway follows (`serve --kubeconfig`): writes go there
        self.follows = follows
        #: objects from that server that do not validate, with why: skipped, not served
        self.skipped: dict[ResourceKey, str] = {}
        self._valid: dict[tuple[ResourceKey, str], str | None] = {}
        self.overrides = dict(overrides)
        self.state_dir = state_dir
        self._start_backends = start_backends
        self._publish = publish
        self._stored: dict[ResourceKey, _Stored] = {}
        self._lock = threading.Lock()
        self.config: CompiledConfig | None = None
        self._mtimes: dict[str, float] = {}
        #: where the gateway listens and each Service's address, for `get` to show
        self._listen_address: tuple[str, int] | None = None
        self.backend_urls: dict[str, str] = {}
        #: whether HTTPS listeners are served (`serve --listen-https`); set before start
        self.https = False
        #: where they are served, shown beside `listen_address`
        self.https_address: tuple[str, int] | None = None
        self.history = History(self._read_version())

    @property
    def listen_address(self) -> tuple[str, int] | None:
        return self._listen_address

    @listen_address.setter
    def listen_address(self, address: tuple[str, int] | None) -> None:
        """Where the gateway listens: shown in each Gateway's status, so a change is one."""
        with self._lock:
            self._listen_address = address
            self._record()

    # --- loading ----------------------------------------------------------------------------

    def start(self, stdin: Any = None) -> CompiledConfig:
        """First load: the files, then what was applied before the last stop."""
        files = [p for p in self.paths if p != "-"]
        file_docs = load_paths(files) if files else []
        stdin_docs = load_paths(["-"], stdin=stdin) if "-" in self.paths else []
        self._mtimes = self._scan()
        applied = self._read_state()
        with self._lock:
            stored = self._merge_files({}, file_docs)
            for doc in stdin_docs:  # read once; not watched
                stored[_key_of(doc.obj)] = self._next(None, doc.obj, "stdin")
            for obj in applied:
                meta = obj.get("metadata") or {}
                extra = meta.pop("tokengateway.io/stored", None) or {}
                stored[_key_of(obj)] = _Stored(
                    obj,
                    "api",
                    int(extra.get("generation", 1)),
                    str(extra.get("created") or _now()),
                    str(extra.get("uid") or uuid.uuid4()),
                    extra.get("status") or None,
                )
            # Not strict: what was applied before a restart was accepted then, and a broken
            # policy is reported in its status while the rest is served (validate is strict).
            return self._commit(stored)

    def _merge_files(
        self, current: dict[ResourceKey, _Stored], docs: Sequence[Document]
    ) -> dict[ResourceKey, _Stored]:
        stored = {k: v for k, v in current.items() if v.origin != "file"}
        for doc in docs:
            key = _key_of(doc.obj)
            previous = current.get(key)
            stored[key] = self._next(previous, doc.obj, "file")
        return stored

    @staticmethod
    def _next(previous: _Stored | None, doc: dict[str, Any], origin: str) -> _Stored:
        doc = copy.deepcopy(doc)
        if previous is None:
            meta = doc.get("metadata") or {}
            created = str(meta.get("creationTimestamp") or _now())
            return _Stored(
                doc, origin, int(meta.get("generation") or 1), created, str(uuid.uuid4())
            )
        generation = previous.generation
        if _spec_of(previous.doc) != _spec_of(doc):
            generation += 1
        return _Stored(doc, origin, generation, previous.created, previous.uid, previous.status)

    # --- changes ----------------------------------------------------------------------------

    def apply(
        self, text: str, expect: Mapping[ResourceKey, Expect] | None = None
    ) -> list[ApplyResult]:
        """Validate every document, then add or replace them all in one new configuration.
        `expect`: what each object named must be for the write to happen (`ConflictError`,
        `NotFoundError` otherwise, and nothing changes)."""
        self._writable()
        docs = self._documents(text)
        with self._lock:
            for key, wanted in (expect or {}).items():
                self._check(key, wanted)
            stored, results = self._merged(docs)
            if any(r.action != "unchanged" for r in results):
                self._commit(stored)
            return results

    def _check(self, key: ResourceKey, wanted: Expect) -> None:
        """Raise when `key` is not what `wanted` says. Called with `_lock` held."""
        exists = key in self._stored
        if wanted.absent and exists:
            raise ConflictError(key, "AlreadyExists")
        if (wanted.present or wanted.resource_version) and not exists:
            kind, namespace, name = key
            raise NotFoundError(f"{kind} {namespace + '/' if namespace else ''}{name} not found")
        if wanted.resource_version:
            shown = self.history.objects().get(key) or {}
            if str(wanted.resource_version) != shown.get("metadata", {}).get("resourceVersion"):
                raise ConflictError(key, "Conflict")

    def preview(self, text: str) -> list[dict[str, Any]]:
        """A dry run of `apply`: every check `apply` makes (each document, then the whole
        configuration compiled with it), and the objects as `apply` would leave them, but
        nothing changes: no new configuration, no backend started, no event, no new
        resourceVersion (an object keeps the one it has; a new one has none)."""
        docs = self._documents(text)
        with self._lock:
            stored, _ = self._merged(docs)
            if self.config is not None and self._neutral(self._changed(stored)):
                statuses = self.config.statuses
            else:
                statuses = self._compile_only(stored).statuses
            current = self.history.snapshot()[1]
            shown = []
            for doc in docs:
                key = _key_of(doc.obj)
                obj = self._show(key, stored[key], statuses)
                meta = obj["metadata"]
                meta.pop("resourceVersion", None)  # a dry create has none yet
                if key in current:
                    meta["resourceVersion"] = current[key]["metadata"]["resourceVersion"]
                shown.append(obj)
            return shown

    @staticmethod
    def _documents(text: str) -> list[Document]:
        docs = load_paths(["-"], stdin=io.StringIO(text))
        if not docs:
            raise ValueError("no resources in the request")
        parse_resources(docs)  # raises ManifestError naming each problem; nothing changes
        return docs

    def _merged(
        self, docs: Sequence[Document]
    ) -> tuple[dict[ResourceKey, _Stored], list[ApplyResult]]:
        """The stored objects with `docs` added or replaced, and what each became."""
        stored = dict(self._stored)
        results = []
        for doc in docs:
            key = _key_of(doc.obj)
            previous = stored.get(key)
            new = self._next(previous, doc.obj, "api")
            if previous is None:
                action = "created"
            elif previous.doc == new.doc:
                action = "unchanged"
            else:
                action = "configured"
            stored[key] = new
            results.append(ApplyResult(str(doc.obj.get("apiVersion", "")), *key, action))
        return stored, results

    def delete(self, keys: Sequence[ResourceKey]) -> list[ApplyResult]:
        self._writable()
        with self._lock:
            missing = [k for k in keys if k not in self._stored]
            if missing:
                raise NotFoundError(
                    "; ".join(
                        f"{k} {n + '/' if n else ''}{name} not found" for k, n, name in missing
                    )
                )
            stored = dict(self._stored)
            results = []
            for key in keys:
                gone = stored.pop(key)
                results.append(ApplyResult(str(gone.doc.get("apiVersion", "")), *key, "deleted"))
            self._commit(stored)
            return results

    def set_status(
        self, key: ResourceKey, status: Mapping[str, Any], expect: Expect | None = None
    ) -> None:
        """A write to the `status` subresource: the status changes, nothing else does (no
        new generation, no new configuration). What the gateway computes (conditions,
        addresses) stays what it is, as its controller would set it again at once."""
        self._writable()
        with self._lock:
            if expect is not None:
                self._check(key, expect)
            previous = self._stored.get(key)
            if previous is None:
                kind, namespace, name = key
                raise NotFoundError(
                    f"{kind} {namespace + '/' if namespace else ''}{name} not found"
                )
            stored = dict(self._stored)
            stored[key] = dataclasses.replace(previous, status=copy.deepcopy(dict(status)) or None)
            self._stored = stored
            self._write_state()
            self._record()

    def read_only_message(self) -> str:
        return (
            f"this gateway follows the Kubernetes API at {self.follows}; "
            "make changes there (kubectl --kubeconfig pointing at it)"
        )

    def _writable(self) -> None:
        if self.follows is not None:
            raise ReadOnlyError(self.read_only_message())

    def replace_cluster(self, objects: Mapping[ResourceKey, Mapping[str, Any]]) -> bool:
        """Serve `objects`, the whole set a Kubernetes API holds now (`serve --kubeconfig`).

        Each object keeps the server's uid and generation; its status is what we compute.
        One that does not validate is skipped and named in `skipped` (its status says why);
        the rest is served, as a file reload serves what builds. False when nothing changed."""
        stored: dict[ResourceKey, _Stored] = {}
        skipped: dict[ResourceKey, str] = {}
        valid: dict[tuple[ResourceKey, str], str | None] = {}
        docs = {key: {k: v for k, v in o.items() if k != "status"} for key, o in objects.items()}
        others = left_alone(docs, self.gateway_class)  # another implementation's: as they are
        for key, obj in objects.items():
            meta = obj.get("metadata") or {}
            doc = copy.deepcopy(docs[key])
            # what the server changes on every write or restart: not part of what is served
            for field in ("resourceVersion", "managedFields"):
                doc.get("metadata", {}).pop(field, None)
            if key not in others:
                version = str(meta.get("resourceVersion") or "")
                ident = (key, version)
                known = ident in self._valid and version
                problem = self._valid[ident] if known else _problem(doc)
                valid[ident] = problem
                if problem is not None:
                    skipped[key] = problem
                    continue
            stored[key] = _Stored(
                doc,
                "cluster",
                int(meta.get("generation") or 1),
                str(meta.get("creationTimestamp") or _now()),
                str(meta.get("uid") or uuid.uuid4()),
                None,  # what we serve is computed; a status-only change rebuilds nothing
            )
        with self._lock:
            self._valid = valid
            if skipped != self.skipped:
                for key in skipped.keys() - self.skipped.keys():
                    log.error("%s %s/%s skipped: %s", *key, skipped[key])
                self.skipped = skipped
            if stored == self._stored and self.config is not None:
                return False
            self._commit(stored)
            return True

    def delete_documents(self, text: str) -> list[ApplyResult]:
        docs = load_paths(["-"], stdin=io.StringIO(text))
        return self.delete([_key_of(d.obj) for d in docs])

    def reload_files(self) -> bool:
        """Re-read the watched files when one changed; False when nothing did."""
        mtimes = self._scan()
        if mtimes == self._mtimes:
            return False
        self._mtimes = mtimes
        docs = load_paths([p for p in self.paths if p != "-"])
        with self._lock:
            self._commit(self._merge_files(self._stored, docs))
        return True

    def _scan(self) -> dict[str, float]:
        found: dict[str, float] = {}
        for raw in self.paths:
            if raw == "-":
                continue
            path = Path(raw)
            if path.is_file():
                files = [path]
            elif path.is_dir():  # the files load_paths reads: a state dir inside is not one
                files = sorted(f for f in path.glob("*") if f.suffix.lower() in MANIFEST_EXTENSIONS)
            else:
                files = []
            for f in files:
                with contextlib.suppress(OSError):
                    found[str(f)] = f.stat().st_mtime_ns
        return found

    def _resources(self, stored: dict[ResourceKey, _Stored]) -> list[Resource]:
        """What is served of `stored`: all of it, or with a GatewayClass what is ours."""
        others = left_alone({k: s.doc for k, s in stored.items()}, self.gateway_class)
        return parse_resources(
            [
                Document(f"{s.origin}:{k[0]}/{k[1]}/{k[2]}", self._with_meta(s))
                for k, s in stored.items()
                if k not in others
            ]
        )

    def _changed(self, stored: Mapping[ResourceKey, _Stored]) -> set[ResourceKey]:
        """The keys `stored` adds, removes or changes, against the objects stored now."""
        before = self._stored
        changed = {k for k in before if k not in stored}
        for key, new in stored.items():
            old = before.get(key)
            if old is not new and old != new:
                changed.add(key)
        return changed

    def _neutral(self, changed: set[ResourceKey]) -> bool:
        """Whether a change of `changed` touches only kinds no configuration reads, so the
        live configuration (once there is one) stays as it is."""
        return (
            self.config is not None
            and bool(changed)
            and all(kind in CONFIG_NEUTRAL for kind, _, _ in changed)
        )

    def _commit(self, stored: dict[ResourceKey, _Stored], strict: bool = False) -> CompiledConfig:
        """Build a configuration from `stored`; on success it becomes the live one. A change
        of config-neutral kinds only is stored, saved and recorded, and nothing is built."""
        changed = self._changed(stored)
        if self.config is not None and self._neutral(changed):
            # what a build would have checked of them (apply has already; a watched file not)
            self._resources({k: stored[k] for k in changed if k in stored})
            self._stored = stored
            self._write_state()
            self._record()
            return self.config
        resources = self._resources(stored)
        plans = plan_backends(
            resources,
            needed_services(resources),
            self.overrides,
            unknown_overrides=self.follows is not None,
        )
        urls = self._start_backends(plans)
        config = compile_config(
            resources, urls, strict=strict, previous=self.config, https=self.https
        )
        self._stored = stored
        self.config = config
        self.backend_urls = dict(urls)
        self._publish(config)
        self._write_state()
        self._record()
        return config

    def _compile_only(self, stored: dict[ResourceKey, _Stored]) -> CompiledConfig:
        """What `_commit` checks, without its effects: a Service with no address yet gets a
        placeholder, since a dry run starts no simulator."""
        resources = self._resources(stored)
        plans = plan_backends(
            resources,
            needed_services(resources),
            self.overrides,
            unknown_overrides=self.follows is not None,
        )
        urls = {key: self.backend_urls.get(key, "http://127.0.0.1:9") for key in plans}
        return compile_config(resources, urls, previous=self.config, https=self.https)

    def _record(self) -> None:
        """Hand the objects as now shown to `history`, which makes events of what changed.
        Called with `_lock` held, after each change."""
        statuses = getattr(self.config, "statuses", {}) or {}
        shown = {key: self._show(key, stored, statuses) for key, stored in self._stored.items()}
        if self.history.record(shown):
            self._write_version()

    @staticmethod
    def _with_meta(stored: _Stored) -> dict[str, Any]:
        doc = copy.deepcopy(stored.doc)
        meta = doc.setdefault("metadata", {})
        meta.setdefault("creationTimestamp", stored.created)
        meta["generation"] = stored.generation
        meta["uid"] = stored.uid
        return doc

    # --- reading ----------------------------------------------------------------------------

    def objects(
        self, kind: str, namespace: str | None = None, name: str | None = None
    ) -> list[dict[str, Any]]:
        """The stored objects of a kind, as `get` shows them (with status and
        resourceVersion), each a copy the caller may change."""
        return self.listing(kind, namespace, name)[1]

    def listing(
        self, kind: str, namespace: str | None = None, name: str | None = None
    ) -> tuple[int, list[dict[str, Any]]]:
        """`objects` and the resourceVersion they are as of (a list's), taken together."""
        version, current = self.history.snapshot()
        out = []
        for (k, ns, n), obj in sorted(current.items()):
            if k != kind or (namespace is not None and ns != namespace and k not in CLUSTER_SCOPED):
                continue
            if name is not None and n != name:
                continue
            out.append(copy.deepcopy(obj))
        if name is not None and not out:
            where = f"{namespace}/{name}" if namespace else name
            raise NotFoundError(f"{kind} {where} not found")
        return version, out

    def _show(
        self, key: ResourceKey, stored: _Stored, statuses: Mapping[Any, Any]
    ) -> dict[str, Any]:
        obj = self._with_meta(stored)
        if key[1]:
            obj["metadata"]["namespace"] = key[1]
        if stored.status:
            obj["status"] = copy.deepcopy(stored.status)
        status = statuses.get(key)
        if status is not None:
            computed = status.as_dict() if hasattr(status, "as_dict") else status
            obj["status"] = {**obj.get("status", {}), **computed}
        self._decorate(obj)
        return obj

    def _decorate(self, obj: dict[str, Any]) -> None:
        """What a cluster would show that a manifest does not say: where a Gateway listens,
        where a Service is reached, a GatewayClass's status before a controller wrote one
        (the CRD's default: Accepted Unknown), a Secret's stringData folded into base64 data
        and its type defaulted to Opaque."""
        kind = obj.get("kind")
        if kind == "Gateway" and self._listen_address is not None:
            status = obj.setdefault("status", {})
            status["addresses"] = [{"type": "IPAddress", "value": self._listen_address[0]}]
            host, port = self._listen_address
            status.setdefault("tokengateway", {})["listen"] = f"{host}:{port}"
            if self.https_address is not None:
                host, port = self.https_address
                status["tokengateway"]["listenHttps"] = f"{host}:{port}"
        elif kind == "Service":
            key = f"{obj['metadata'].get('namespace')}/{obj['metadata'].get('name')}"
            if key in self.backend_urls:
                obj.setdefault("status", {}).setdefault("tokengateway", {})["backend"] = (
                    self.backend_urls[key]
                )
        elif kind == "GatewayClass":
            status = obj.setdefault("status", {})
            if not status.get("conditions"):  # the CRD's default, until a controller writes
                status["conditions"] = [
                    {
                        "type": "Accepted",
                        "status": "Unknown",
                        "reason": "Pending",
                        "message": "Waiting for controller",
                        "lastTransitionTime": "1970-01-01T00:00:00Z",
                    }
                ]
        elif kind == "Secret":
            obj["type"] = obj.get("type") or "Opaque"  # the API server's default
            if "stringData" in obj:
                data = dict(obj.get("data") or {})
                for name, value in (obj.pop("stringData") or {}).items():
                    data[name] = base64.b64encode(str(value).encode()).decode()
                obj["data"] = data

    # --- state directory --------------------------------------------------------------------

    def _read_state(self) -> list[dict[str, Any]]:
        if self.state_dir is None:
            return []
        path = self.state_dir / STATE_FILE
        if not path.exists():
            return []
        return [d for d in yaml.safe_load_all(path.read_text()) if isinstance(d, dict)]

    def _read_version(self) -> int | None:
        if self.state_dir is None:
            return None
        try:
            return int((self.state_dir / VERSION_FILE).read_text().strip())
        except (OSError, ValueError):
            return None

    def _write_version(self) -> None:
        if self.state_dir is None:
            return
        self.state_dir.mkdir(parents=True, exist_ok=True)
        target = self.state_dir / VERSION_FILE
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(f"{self.history.last}\n")
        partial.replace(target)

    def _write_state(self) -> None:
        if self.state_dir is None:
            return
        docs = []
        for stored in self._stored.values():
            if stored.origin != "api":
                continue
            doc = copy.deepcopy(stored.doc)
            extra: dict[str, Any] = {
                "generation": stored.generation,
                "created": stored.created,
                "uid": stored.uid,
            }
            if stored.status:
                extra["status"] = stored.status
            doc.setdefault("metadata", {})["tokengateway.io/stored"] = extra
            docs.append(doc)
        self.state_dir.mkdir(parents=True, exist_ok=True)
        target = self.state_dir / STATE_FILE
        text = yaml.safe_dump_all(docs, sort_keys=False)
        with contextlib.suppress(OSError):
            if target.read_text() == text:
                return  # unchanged: no write (a file watcher may be looking at this folder)
        partial = target.with_suffix(f".{os.getpid()}.tmp")
        partial.write_text(text)
        partial.replace(target)

    async def watch(self, interval: float = 1.0) -> None:
        """Poll the files given to `serve -f`; a change that does not build is logged and the
        running configuration stays."""
        while True:
            await asyncio.sleep(interval)
            if not any(p != "-" for p in self.paths):
                return
            try:
                changed = await asyncio.to_thread(self.reload_files)
            except Exception as exc:
                log.error("reload refused, still serving the previous configuration: %s", exc)
                continue
            if changed:
                log.warning("configuration reloaded from %s", ", ".join(self.paths))
