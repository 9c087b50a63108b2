"""A gateway that takes its resources from a Kubernetes API (`serve --kubeconfig`).

One `Informer` per kind of `kinds.WATCHED` keeps a local copy (list, then watch). After a
change, and once every kind has been listed, the whole set goes to
`ControlPlane.replace_cluster`, which builds a new configuration and swaps it in with one
assignment, as a file reload does. While the API server is away, the copies and the last
configuration stay: requests never notice; `/healthz` and the metrics say how old the
configuration is and how many watches failed.

Secrets are the exception to "keep a copy of everything": only those an AuthPolicy's API key
selector picks, a Gateway names as a certificate or a BackendTLSPolicy names as CA bundle are
held (API keys only as key digests once compiled); a change of the selectors lists the Secrets
again. ConfigMaps likewise: only those a BackendTLSPolicy names.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tokengateway.auth.identity import compile_label_selector
from tokengateway.controlplane.control import ControlPlane

from .informer import Informer, ObjectKey
from .kinds import WATCHED
from .lease import LeaseElector
from .status import StatusWriter, desired_statuses

__all__ = ["IN_CLUSTER", "FollowOptions", "Follower", "load_client"]

log = logging.getLogger("tokengateway.follower")

IN_CLUSTER = "in-cluster"
#: in the state dir: the objects last served, with the server they came from
SAVED_FILE = "followed.json"
#: after a change, wait this long for more (a `kubectl apply` of many documents) before building
SETTLE_SECONDS = 0.05


@dataclass(frozen=True)
class FollowOptions:
    kubeconfig: str  # a path, or "in-cluster" (the pod's service account)
    #: who this replica is, in the Lease and in logs (the pod's name in a cluster)
    identity: str = ""
    #: the Lease (name, namespace) one replica holds to write status; "" namespace: the
    #: service account's namespace in a cluster, else the kubeconfig context's or "default"
    lease_name: str = "tokengateway-status"
    lease_namespace: str = ""
    lease_seconds: float = 15.0

    def who(self) -> str:
        return self.identity or os.environ.get("TOKENGATEWAY_POD_NAME") or _host_identity()


def _host_identity() -> str:
    return f"{socket.gethostname()}-{os.getpid()}"


def load_client(kubeconfig: str) -> tuple[Any, str, str]:
    """lightkube's client for `kubeconfig`, the server's URL and the default namespace."""
    from lightkube import AsyncClient, ConfigError, KubeConfig
    from lightkube.config.kubeconfig import SERVICE_ACCOUNT

    if kubeconfig == IN_CLUSTER:
        if not os.environ.get("KUBERNETES_SERVICE_HOST"):
            raise ValueError(
                "--kubeconfig in-cluster: KUBERNETES_SERVICE_HOST is not set (not in a pod?); "
                "give a kubeconfig file instead"
            )
        account = os.environ.get("TOKENGATEWAY_SERVICE_ACCOUNT_DIR", SERVICE_ACCOUNT)
        try:
            config = KubeConfig.from_service_account(account)
        except ConfigError as exc:
            raise ValueError(
                f"--kubeconfig in-cluster: no service account in {account} ({exc})"
            ) from None
    else:
        path = Path(kubeconfig).expanduser()
        if not path.is_file():
            raise ValueError(f"--kubeconfig {kubeconfig}: no such file (or use 'in-cluster')")
        try:
            config = KubeConfig.from_file(path)
        except ConfigError as exc:
            raise ValueError(f"--kubeconfig {kubeconfig}: {exc}") from None
    single = config.get()
    if single is None:
        raise ValueError(f"--kubeconfig {kubeconfig}: no current context to use")
    client = AsyncClient(config=single, field_manager="tokengateway")
    return client, single.cluster.server, single.namespace or "default"


class Follower:
    """Keeps `control` serving what the API server holds."""

    def __init__(
        self, control: ControlPlane, options: FollowOptions, state_dir: Path | None = None
    ) -> None:
        self.control = control
        self.options = options
        #: the last set served, kept so that a restart while the server is away serves it
        self.saved = state_dir / SAVED_FILE if state_dir is not None else None
        #: wall-clock time the set restored at start was saved; None when none was
        self.restored_at: float | None = None
        self.client, self.server, self.namespace = load_client(options.kubeconfig)
        self.informers: list[Informer] = []
        for kind in WATCHED:
            keep = {"Secret": self._selected_secret, "ConfigMap": self._selected_config_map}
            self.informers.append(Informer(self.client, kind, self._changed, keep.get(kind.kind)))
        self._change = asyncio.Event()
        self._selectors: list[Any] = []
        #: (namespace, name) of the Secrets named as certificates or CA bundles
        self._certificates: set[tuple[str, str]] = set()
        #: (namespace, name) of the ConfigMaps BackendTLSPolicies name as CA bundles
        self._config_maps: set[tuple[str, str]] = set()
        self._selector_text = ""
        #: when the running configuration was last known to match the API server
        self.confirmed_at: float | None = None
        self.applied = 0
        self.build_errors = 0
        self.last_build_error = ""
        self.ready = asyncio.Event()
        self.elector = LeaseElector(
            self.client,
            options.lease_name,
            options.lease_namespace or self.namespace,
            options.who(),
            options.lease_seconds,
        )
        self.writer = StatusWriter(self.client)
        self._built = asyncio.Event()

    # --- what is held ---------------------------------------------------------------------

    def _changed(self) -> None:
        self._change.set()

    def _selected_secret(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        if (str(meta.get("namespace") or ""), str(meta.get("name") or "")) in self._certificates:
            return True
        labels = meta.get("labels") or {}
        return any(match(labels) for match in self._selectors)

    def _selected_config_map(self, obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        return (str(meta.get("namespace") or ""), str(meta.get("name") or "")) in self._config_maps

    def _held(self, kind: str) -> list[dict[str, Any]]:
        for informer in self.informers:
            if informer.kind.kind == kind:
                return list(informer.objects.values())
        return []

    def _update_selectors(self) -> bool:
        """Which Secrets to hold: those the API key selectors of every AuthPolicy pick, and
        those a Gateway's listeners name as certificates. True when that changed."""
        found: list[Any] = []
        for policy in self._held("AuthPolicy"):
            _api_key_selectors(policy.get("spec"), found)
        certificates = set()
        for gateway in self._held("Gateway"):
            certificates |= _certificate_refs(gateway)
        config_maps: set[tuple[str, str]] = set()
        for policy in self._held("BackendTLSPolicy"):
            for kind, key in _ca_refs(policy):
                (config_maps if kind == "ConfigMap" else certificates).add(key)
        text = (
            repr(sorted(repr(s) for s in found))
            + repr(sorted(certificates))
            + repr(sorted(config_maps))
        )
        if text == self._selector_text:
            return False
        matchers = []
        for selector in found:
            try:
                matchers.append(compile_label_selector(selector, "AuthPolicy", "apiKey.selector"))
            except ValueError:
                continue  # the policy's own status says what is wrong with it
        self._selectors = matchers
        self._certificates = certificates
        self._config_maps = config_maps
        self._selector_text = text
        return True

    def objects(self) -> dict[ObjectKey, dict[str, Any]]:
        out: dict[ObjectKey, dict[str, Any]] = {}
        for informer in self.informers:
            out.update(informer.objects)
        return out

    # --- running --------------------------------------------------------------------------

    @property
    def synced(self) -> bool:
        return all(i.synced.is_set() for i in self.informers)

    @property
    def connected(self) -> bool:
        return all(i.connected for i in self.informers)

    async def run(self) -> None:
        tasks = []
        selected = [i for i in self.informers if i.keep is not None]  # Secrets, ConfigMaps
        try:
            # policies first: the Secrets and ConfigMaps listed next are those they name
            for informer in self.informers:
                if informer in selected:
                    continue
                tasks.append(asyncio.create_task(informer.run(), name=informer.kind.plural))
            while not all(i.synced.is_set() for i in self.informers if i not in selected):
                await self._change.wait()
                self._change.clear()
            self._update_selectors()
            for informer in selected:
                tasks.append(asyncio.create_task(informer.run(), name=informer.kind.plural))
            tasks.append(asyncio.create_task(self.elector.run(), name="lease"))
            tasks.append(asyncio.create_task(self._write_status(), name="status"))
            while True:
                await self._change.wait()
                await asyncio.sleep(SETTLE_SECONDS)
                self._change.clear()
                if self._update_selectors():
                    # build once the Secrets and ConfigMaps now named are in, not before
                    for informer in selected:
                        informer.synced.clear()
                        informer.relist()
                if self.synced:
                    await self._build()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await self.elector.release()

    def restore(self) -> bool:
        """Serve what was saved by the last run (from the same server), until the first
        list is in: a replica restarted while the API server is away still serves."""
        if self.saved is None:
            return False
        try:
            saved = json.loads(self.saved.read_text())
            if saved.get("server") != self.server:
                return False
            objects = {tuple(item["key"]): item["object"] for item in saved["objects"]}
            self.control.replace_cluster(objects)
        except FileNotFoundError:
            return False
        except Exception as exc:  # unreadable or no longer builds: start from the server
            log.warning("not serving the saved configuration %s: %s", self.saved, exc)
            return False
        self.restored_at = float(saved.get("saved_at") or time.time())
        self.ready.set()
        log.warning("serving the configuration saved from %s until it answers", self.server)
        return True

    def _save(self, objects: Mapping[ObjectKey, Mapping[str, Any]]) -> None:
        if self.saved is None:
            return
        body = {
            "server": self.server,
            "saved_at": time.time(),
            "objects": [{"key": list(k), "object": v} for k, v in objects.items()],
        }
        self.saved.parent.mkdir(parents=True, exist_ok=True)
        partial = self.saved.with_suffix(f".{os.getpid()}.tmp")
        # the API keys of the selected Secrets are in it: readable by this user only
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            json.dump(body, out)
        partial.replace(self.saved)

    async def _build(self) -> None:
        objects = self.objects()
        try:
            changed = await asyncio.to_thread(self.control.replace_cluster, objects)
        except Exception as exc:  # a set that does not build: keep serving the last one
            self.build_errors += 1
            self.last_build_error = str(exc)
            log.error("configuration from %s refused, still serving the last: %s", self.server, exc)
            return
        self.last_build_error = ""
        if changed or self.restored_at is not None:
            self.applied += 1
            self.restored_at = None
            try:
                await asyncio.to_thread(self._save, objects)
            except OSError as exc:
                log.warning("cannot save the configuration in %s: %s", self.saved, exc)
        self.confirmed_at = time.monotonic()
        self.ready.set()
        self._built.set()

    async def _write_status(self) -> None:
        """While this replica holds the Lease: after each build (and on taking the Lease
        over), write the statuses that changed."""
        elector = self.elector
        while True:
            built = asyncio.ensure_future(self._built.wait())
            turned = asyncio.ensure_future(elector.changed.wait())
            try:
                await asyncio.wait([built, turned], return_when=asyncio.FIRST_COMPLETED)
            finally:
                built.cancel()
                turned.cancel()
            if elector.changed.is_set():
                elector.changed.clear()
                self.writer.forget()
            self._built.clear()
            if not elector.is_leader or self.control.config is None:
                continue
            objects = self.objects()
            desired = desired_statuses(
                self.control.config.statuses, self.control.skipped, objects, self._address()
            )
            try:
                await self.writer.write(desired, objects)
            except Exception as exc:  # the server away: the next build or turn tries again
                log.warning("writing status to %s: %s", self.server, exc)

    def _address(self) -> str | None:
        """The address a Gateway's status shows: TOKENGATEWAY_GATEWAY_ADDRESS (e.g. the
        Service's, set in deploy/), else where this replica listens unless on all
        interfaces."""
        given = os.environ.get("TOKENGATEWAY_GATEWAY_ADDRESS")
        if given:
            return given
        where = self.control.listen_address
        if where is None or where[0] in ("0.0.0.0", "::", ""):
            return None
        return where[0]

    # --- what it says about itself --------------------------------------------------------

    def config_age(self) -> float:
        """Seconds since the configuration was last known to be the API server's: 0 while
        every watch is connected, the time since the first failed one otherwise; inf
        before the first list."""
        if self.confirmed_at is None:
            if self.restored_at is not None:
                return max(0.0, time.time() - self.restored_at)
            return float("inf")
        down = [i.down_since for i in self.informers if i.down_since is not None]
        return time.monotonic() - min(down) if down else 0.0

    def health(self) -> dict[str, Any]:
        age = self.config_age()
        details: dict[str, Any] = {
            "follows": self.server,
            "synced": self.synced,
            "connected": self.connected,
            "config_age_seconds": None if age == float("inf") else round(age, 3),
            "watch_errors": sum(i.errors for i in self.informers),
        }
        if self.restored_at is not None and self.confirmed_at is None:
            details["restored"] = "serving the configuration saved by the last run"
        details["status_writer"] = self.elector.is_leader
        details["lease"] = f"{self.elector.namespace}/{self.elector.name}"
        problems = {i.kind.plural: i.last_error for i in self.informers if i.last_error}
        if problems:
            details["watch_problems"] = problems
        if self.last_build_error:
            details["build_error"] = self.last_build_error
        if self.control.skipped:
            details["skipped"] = {"/".join(k): why for k, why in self.control.skipped.items()}
        return details

    def figures(self) -> dict[str, float]:
        age = self.config_age()
        return {
            "config_age_seconds": -1.0 if age == float("inf") else age,
            "watch_errors_total": float(sum(i.errors for i in self.informers)),
            "watch_relists_total": float(sum(i.relists for i in self.informers)),
            "config_builds_total": float(self.applied),
            "config_build_errors_total": float(self.build_errors),
            "objects_skipped": float(len(self.control.skipped)),
            "status_writes_total": float(self.writer.writes),
            "status_writer": float(self.elector.is_leader),
        }

    async def close(self) -> None:
        await self.client.close()


def _api_key_selectors(node: Any, found: list[Any]) -> None:
    """Every `apiKey.selector` anywhere in a policy's spec (rules, defaults, overrides)."""
    if isinstance(node, Mapping):
        api_key = node.get("apiKey")
        if isinstance(api_key, Mapping) and isinstance(api_key.get("selector"), Mapping):
            found.append(api_key["selector"])
        for value in node.values():
            _api_key_selectors(value, found)
    elif isinstance(node, list):
        for value in node:
            _api_key_selectors(value, found)


def _certificate_refs(gateway: Mapping[str, Any]) -> set[tuple[str, str]]:
    """(namespace, name) of every Secret a Gateway's listeners name in tls.certificateRefs
    (a ReferenceGrant decides later whether one in another namespace may be used)."""
    namespace = str((gateway.get("metadata") or {}).get("namespace") or "default")
    out = set()
    spec = gateway.get("spec") or {}
    for listener in spec.get("listeners") or []:
        tls = listener.get("tls") if isinstance(listener, Mapping) else None
        for ref in (tls or {}).get("certificateRefs") or []:
            if isinstance(ref, Mapping) and ref.get("kind", "Secret") == "Secret":
                out.add((str(ref.get("namespace") or namespace), str(ref.get("name"))))
    return out


def _ca_refs(policy: Mapping[str, Any]) -> set[tuple[str, tuple[str, str]]]:
    """(kind, (namespace, name)) of the ConfigMaps and Secrets a BackendTLSPolicy names as
    CA bundles (in its own namespace, the only one it may name)."""
    namespace = str((policy.get("metadata") or {}).get("namespace") or "default")
    validation = (policy.get("spec") or {}).get("validation") or {}
    out = set()
    for ref in validation.get("caCertificateRefs") or []:
        if isinstance(ref, Mapping) and ref.get("kind") in ("ConfigMap", "Secret"):
            out.add((str(ref["kind"]), (namespace, str(ref.get("name")))))
    return out
