"""Lease (coordination.k8s.io/v1) and GatewayClass, the kinds follower replicas elect a
status writer with and list like a cluster's: served by the admin API, written without
building or publishing a configuration, and guarded by optimistic concurrency as leader
election needs it (a stale update is 409 Conflict, a taken name 409 AlreadyExists, two
writers racing from one version cannot both win).

In process (a ControlPlane counting its publishes, the KubeAPI handler driven directly),
then against a served gateway with the official `kubernetes` client and the real kubectl."""

from __future__ import annotations

import asyncio
import contextlib
import datetime
import json
import queue
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from tests.conftest import TUTORIAL
from tests.test_kubeapi import POLICY, kubectl, ok, policy_with
from tokengateway.config.compile import CompiledConfig, compile_config
from tokengateway.controlplane.control import ControlPlane
from tokengateway.controlplane.kubeapi.handler import KubeAPI, Request
from tokengateway.resources import ManifestError, load_paths, parse_resources

__all__ = ["kubectl"]  # the fixture, used by name

NS = "gateway-system"
LEASES = f"/apis/coordination.k8s.io/v1/namespaces/{NS}/leases"
GATEWAY_CLASSES = "/apis/gateway.networking.k8s.io/v1/gatewayclasses"


def a_lease(holder: str = "replica-a", name: str = "tokengateway-status") -> dict[str, Any]:
    return {
        "apiVersion": "coordination.k8s.io/v1",
        "kind": "Lease",
        "metadata": {"name": name, "namespace": NS},
        "spec": {
            "holderIdentity": holder,
            "leaseDurationSeconds": 15,
            "acquireTime": "2026-12-04T13:00:00.000000Z",
            "renewTime": "2026-12-04T13:00:00.123456Z",
            "leaseTransitions": 0,
        },
    }


GATEWAY_CLASS = {
    "apiVersion": "gateway.networking.k8s.io/v1",
    "kind": "GatewayClass",
    "metadata": {"name": "tokengateway"},
    "spec": {"controllerName": "tokengateway.io/gateway", "description": "one process"},
}


class Published:
    """A ControlPlane's `publish`: what it was handed, in order."""

    def __init__(self) -> None:
        self.configs: list[CompiledConfig] = []

    def __call__(self, config: CompiledConfig) -> None:
        self.configs.append(config)


def control_plane(state: Path) -> tuple[ControlPlane, Published]:
    published = Published()

    def start_backends(plans: Mapping[str, Any]) -> dict[str, str]:
        return {key: "http://127.0.0.1:9" for key in plans}  # no simulator: nothing is sent

    control = ControlPlane([str(TUTORIAL)], {}, state, start_backends, published)
    control.start()
    return control, published


def handle(api: KubeAPI, method: str, path: str, body: Any = None, **query: str) -> Any:
    content_type = "application/merge-patch+json" if method == "PATCH" else "application/json"
    request = Request(
        method, path, query, "", content_type, json.dumps(body).encode() if body else b""
    )
    return asyncio.run(api.handle(request))


# --- in process ---------------------------------------------------------------------------------


def test_lease_and_gatewayclass_writes_store_and_record_but_publish_nothing(tmp_path) -> None:
    control, published = control_plane(tmp_path / "state")
    config = control.config
    assert published.configs == [config]
    api = KubeAPI(control)
    since = control.history.last

    status, created = handle(api, "POST", LEASES, a_lease())
    assert status == 201
    renewed = a_lease()
    renewed["spec"]["renewTime"] = "2026-12-04T13:00:02.000000Z"
    renewed["metadata"]["resourceVersion"] = created["metadata"]["resourceVersion"]
    status, updated = handle(api, "PUT", f"{LEASES}/tokengateway-status", renewed)
    assert status == 200
    status, _ = handle(api, "POST", GATEWAY_CLASSES, GATEWAY_CLASS)
    assert status == 201
    handle(api, "PATCH", f"{LEASES}/tokengateway-status", {"spec": {"holderIdentity": "b"}})

    # nothing was built nor published: the live configuration is the very same object
    assert published.configs == [config] and control.config is config
    assert all(r.kind not in ("Lease", "GatewayClass") for r in config.resources)
    # ...yet every write is stored, has its own resourceVersion and event, and is saved
    versions = [int(e.version) for e in control.history.since(since)[1]]
    assert len(versions) == 4 and versions == sorted(versions) and versions[0] > since
    lease = control.objects("Lease", NS, "tokengateway-status")[0]
    assert lease["spec"]["holderIdentity"] == "b"
    assert lease["spec"]["renewTime"] == "2026-12-04T13:00:02.000000Z"
    assert int(lease["metadata"]["resourceVersion"]) > int(updated["metadata"]["resourceVersion"])
    saved = list(yaml.safe_load_all((tmp_path / "state" / "applied.yaml").read_text()))
    assert {d["kind"] for d in saved} == {"Lease", "GatewayClass"}

    # the same through `apply` (the admin API's and `tokengateway apply`'s way), and a delete
    again = a_lease()
    again["spec"]["leaseTransitions"] = 1
    assert [r.action for r in control.apply(yaml.safe_dump(again))] == ["configured"]
    assert [r.action for r in control.delete([("Lease", NS, "tokengateway-status")])] == ["deleted"]
    assert published.configs == [config]

    # a write that also changes what the configuration reads does build and publish
    both = yaml.safe_dump_all([a_lease(), yaml.safe_load(policy_with(("limit: 50 ", "limit: 1 ")))])
    control.apply(both)
    assert len(published.configs) == 2 and control.config is published.configs[1]

    # a restart reads both kinds back from the state directory
    restarted, _ = control_plane(tmp_path / "state")
    assert restarted.objects("GatewayClass")[0]["spec"]["controllerName"] == (
        "tokengateway.io/gateway"
    )
    assert restarted.objects("Lease", NS)[0]["spec"]["holderIdentity"] == "replica-a"


def test_compile_leaves_config_neutral_kinds_out() -> None:
    docs = load_paths([str(TUTORIAL)])
    extra = load_paths(["-"], stdin=__import__("io").StringIO(yaml.safe_dump_all(
        [a_lease(), GATEWAY_CLASS]
    )))  # fmt: skip
    resources = parse_resources(docs + extra)
    urls = {"default/trlp-tutorial-llm-sim": "http://127.0.0.1:9"}
    plain = compile_config(parse_resources(docs), urls, strict=True)
    with_them = compile_config(resources, urls, strict=True)
    assert [r.key for r in with_them.resources] == [r.key for r in plain.resources]
    assert with_them.warnings == plain.warnings and with_them.statuses.keys() == (
        plain.statuses.keys()
    )


def test_lease_and_gatewayclass_are_checked_as_the_api_server_checks_them() -> None:
    def problems(obj: dict[str, Any]) -> list[str]:
        text = yaml.safe_dump(obj)
        try:
            parse_resources(load_paths(["-"], stdin=__import__("io").StringIO(text)))
        except ManifestError as exc:
            return [f"{e.field}: {e.reason}" for e in exc.errors]
        return []

    assert problems(a_lease()) == []
    assert problems({**a_lease(), "spec": {}}) == []  # every field optional
    bad = a_lease()
    bad["spec"].update(
        leaseDurationSeconds=0, leaseTransitions=-1, renewTime="yesterday", preferredHolder="x"
    )
    found = problems(bad)
    assert any(p.startswith("spec.leaseDurationSeconds: must be > 0") for p in found), found
    assert any(p.startswith("spec.leaseTransitions: must be >= 0") for p in found), found
    assert any(p.startswith('spec.renewTime: "yesterday" is not a time') for p in found), found
    assert "spec.preferredHolder: may only be specified if `strategy` is defined" in found
    assert problems({**a_lease(), "spec": {"leaseDurationSeconds": "15"}}) == [
        'spec.leaseDurationSeconds: must be an integer, got string "15"'
    ]

    assert problems(GATEWAY_CLASS) == []
    assert problems({**GATEWAY_CLASS, "spec": {}}) == ["spec.controllerName: required"]
    found = problems({**GATEWAY_CLASS, "spec": {"controllerName": ""}})
    assert found == ["spec.controllerName: must not be empty"], found
    found = problems({**GATEWAY_CLASS, "spec": {"controllerName": "no-path"}})
    assert found and found[0].startswith('spec.controllerName: "no-path" does not match'), found
    ref = {"group": "example.com", "kind": "Config", "name": "c", "namespace": "ns"}
    assert (
        problems({**GATEWAY_CLASS, "spec": {**GATEWAY_CLASS["spec"], "parametersRef": ref}}) == []
    )


def test_racing_updates_from_one_version_only_one_wins(tmp_path) -> None:
    """Leader election: every candidate reads the Lease, then updates it naming the version
    it read; one succeeds, every other is told 409 Conflict, even when they all arrive
    before the first write is done."""
    control, _ = control_plane(tmp_path / "state")
    api = KubeAPI(control)
    _, created = handle(api, "POST", LEASES, a_lease(holder=""))
    read = created["metadata"]["resourceVersion"]

    async def candidates() -> list[tuple[int, Any]]:
        async def one(n: int) -> tuple[int, Any]:
            body = a_lease(holder=f"replica-{n}")
            body["metadata"]["resourceVersion"] = read
            request = Request(
                "PUT", f"{LEASES}/tokengateway-status", {}, "", "application/json",
                json.dumps(body).encode(),
            )  # fmt: skip
            try:
                return await api.handle(request)
            except Exception as exc:  # KubeError: what the client is answered
                return exc.code, exc.status()  # type: ignore[attr-defined]

        return await asyncio.gather(*(one(n) for n in range(8)))

    answers = asyncio.run(candidates())
    won = [body for code, body in answers if code == 200]
    lost = [body for code, body in answers if code != 200]
    assert len(won) == 1, [code for code, _ in answers]
    assert {(b["code"], b["reason"]) for b in lost} == {(409, "Conflict")}
    holder = won[0]["spec"]["holderIdentity"]
    assert control.objects("Lease", NS, "tokengateway-status")[0]["spec"]["holderIdentity"] == (
        holder
    )

    # racing creates of one name: one is created, the others are 409 AlreadyExists
    async def creators() -> list[int]:
        async def one(n: int) -> int:
            body = json.dumps(a_lease(holder=f"r{n}", name="fresh")).encode()
            request = Request("POST", LEASES, {}, "", "application/json", body)
            try:
                return (await api.handle(request))[0]
            except Exception as exc:
                assert exc.status()["reason"] == "AlreadyExists"  # type: ignore[attr-defined]
                return exc.code  # type: ignore[attr-defined]

        return await asyncio.gather(*(one(n) for n in range(8)))

    assert sorted(asyncio.run(creators())) == [201] + [409] * 7


def test_patches_without_a_version_are_never_lost(tmp_path) -> None:
    """A merge patch names no version: racing ones are each applied to the object as the
    previous one left it (computed again when it changed under them), none is lost."""
    control, _ = control_plane(tmp_path / "state")
    api = KubeAPI(control)
    handle(api, "POST", LEASES, a_lease())

    async def patches() -> list[int]:
        async def one(n: int) -> int:
            body = json.dumps({"metadata": {"labels": {f"l{n}": "x"}}}).encode()
            path = f"{LEASES}/tokengateway-status"
            request = Request("PATCH", path, {}, "", "application/merge-patch+json", body)
            return (await api.handle(request))[0]

        return await asyncio.gather(*(one(n) for n in range(6)))

    assert asyncio.run(patches()) == [200] * 6
    labels = control.objects("Lease", NS, "tokengateway-status")[0]["metadata"]["labels"]
    assert labels == {f"l{n}": "x" for n in range(6)}


def test_server_side_apply_and_status_writes_honour_a_resource_version(tmp_path) -> None:
    control, published = control_plane(tmp_path / "state")
    api = KubeAPI(control)
    _, created = handle(api, "POST", GATEWAY_CLASSES, GATEWAY_CLASS)
    stale = created["metadata"]["resourceVersion"]
    path = f"{GATEWAY_CLASSES}/tokengateway"
    handle(api, "PATCH", path, {"spec": {"description": "moved on"}})

    def answer(method: str, where: str, content_type: str, body: Any) -> tuple[int, str]:
        request = Request(
            method, where, {"fieldManager": "test"}, "", content_type, json.dumps(body).encode()
        )
        try:
            return asyncio.run(api.handle(request))[0], ""
        except Exception as exc:
            return exc.code, exc.status()["reason"]  # type: ignore[attr-defined]

    applied = {**GATEWAY_CLASS, "metadata": {"name": "tokengateway", "resourceVersion": stale}}
    assert answer("PATCH", path, "application/apply-patch+yaml", applied) == (409, "Conflict")
    status = {
        "metadata": {"resourceVersion": stale},
        "status": {"conditions": [{"type": "Accepted", "status": "True"}]},
    }
    assert answer("PUT", f"{path}/status", "application/json", status) == (409, "Conflict")
    status["metadata"] = {}
    assert answer("PUT", f"{path}/status", "application/json", status) == (200, "")
    shown = control.objects("GatewayClass")[0]
    assert shown["spec"]["description"] == "moved on"
    assert shown["status"]["conditions"] == [{"type": "Accepted", "status": "True"}]
    assert len(published.configs) == 1  # (status writes never build, of any kind)


# --- served: the official client, kubectl, watches --------------------------------------------


@pytest.fixture
def served(start_gateway):
    gw = start_gateway(TUTORIAL)
    config = client.Configuration()
    config.host = gw.admin_url
    with client.ApiClient(config) as api:
        yield gw, api


def test_coordination_v1_api_create_read_replace_and_conflicts(served) -> None:
    gw, api = served
    leases = client.CoordinationV1Api(api)
    now = datetime.datetime(2026, 12, 4, 13, 0, 0, 123456, tzinfo=datetime.UTC)
    body = client.V1Lease(
        metadata=client.V1ObjectMeta(name="tokengateway-status", namespace=NS),
        spec=client.V1LeaseSpec(
            holder_identity="replica-a",
            lease_duration_seconds=15,
            acquire_time=now,
            renew_time=now,
            lease_transitions=0,
        ),
    )
    created = leases.create_namespaced_lease(NS, body)
    assert created.spec.holder_identity == "replica-a"
    assert created.spec.renew_time == now  # a MicroTime, read back as the same instant

    read = leases.read_namespaced_lease("tokengateway-status", NS)
    assert read.metadata.resource_version == created.metadata.resource_version
    stale = read.metadata.resource_version
    read.spec.renew_time = now + datetime.timedelta(seconds=2)
    replaced = leases.replace_namespaced_lease("tokengateway-status", NS, read)
    assert int(replaced.metadata.resource_version) > int(stale)
    assert replaced.spec.renew_time == now + datetime.timedelta(seconds=2)

    # another replica, still holding the version read before: refused, nothing changes
    read.metadata.resource_version = stale
    read.spec.holder_identity = "replica-b"
    with pytest.raises(ApiException) as conflict:
        leases.replace_namespaced_lease("tokengateway-status", NS, read)
    assert conflict.value.status == 409
    status = json.loads(conflict.value.body)
    assert status["reason"] == "Conflict"
    assert status["message"] == (
        'Operation cannot be fulfilled on leases.coordination.k8s.io "tokengateway-status": '
        "the object has been modified; please apply your changes to the latest version and "
        "try again"
    )
    assert status["details"] == {
        "name": "tokengateway-status",
        "group": "coordination.k8s.io",
        "kind": "leases",
    }
    kept = leases.read_namespaced_lease("tokengateway-status", NS)
    assert kept.spec.holder_identity == "replica-a"

    with pytest.raises(ApiException) as exists:
        leases.create_namespaced_lease(NS, body)
    assert exists.value.status == 409
    assert json.loads(exists.value.body)["reason"] == "AlreadyExists"
    assert json.loads(exists.value.body)["message"] == (
        'leases.coordination.k8s.io "tokengateway-status" already exists'
    )

    # a merge patch naming a stale version is refused the same way; the current one goes
    with pytest.raises(ApiException) as patched:
        leases.patch_namespaced_lease(
            "tokengateway-status",
            NS,
            {"metadata": {"resourceVersion": stale}, "spec": {"holderIdentity": "replica-b"}},
        )
    assert patched.value.status == 409 and json.loads(patched.value.body)["reason"] == "Conflict"
    current = kept.metadata.resource_version
    moved = leases.patch_namespaced_lease(
        "tokengateway-status",
        NS,
        {"metadata": {"resourceVersion": current}, "spec": {"holderIdentity": "replica-b"}},
    )
    assert moved.spec.holder_identity == "replica-b"

    # an update without a version is unconditional, as Kubernetes allows
    kept = leases.read_namespaced_lease("tokengateway-status", NS)
    kept.metadata.resource_version = None
    kept.spec.lease_transitions = 1
    assert leases.replace_namespaced_lease("tokengateway-status", NS, kept).spec.lease_transitions

    # no status subresource on a Lease; a missing one is 404 NotFound
    assert httpx.get(f"{gw.admin_url}{LEASES}/tokengateway-status/status").status_code == 404
    with pytest.raises(ApiException) as missing:
        leases.read_namespaced_lease("nobody", NS)
    assert missing.value.status == 404

    listed = leases.list_namespaced_lease(NS)
    assert [i.metadata.name for i in listed.items] == ["tokengateway-status"]
    leases.delete_namespaced_lease("tokengateway-status", NS)
    assert leases.list_namespaced_lease(NS).items == []


def test_a_watch_on_leases_sees_each_renewal(served) -> None:
    gw, api = served
    leases = client.CoordinationV1Api(api)
    since = leases.list_namespaced_lease(NS).metadata.resource_version
    events: queue.Queue[dict[str, Any]] = queue.Queue()
    follower = watch.Watch()

    def follow() -> None:
        stream = follower.stream(
            leases.list_namespaced_lease, NS, resource_version=since, timeout_seconds=30
        )
        with contextlib.suppress(Exception):  # stop() cuts the connection under the stream
            for event in stream:
                events.put(event)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()
    try:
        with httpx.Client(base_url=gw.admin_url, timeout=30) as admin:
            created = admin.post(LEASES, json=a_lease())
            assert created.status_code == 201, created.text
            renewed = a_lease()
            renewed["spec"]["renewTime"] = "2026-12-04T13:00:02.000000Z"
            renewed["metadata"]["resourceVersion"] = created.json()["metadata"]["resourceVersion"]
            answer = admin.put(f"{LEASES}/tokengateway-status", json=renewed)
            assert answer.status_code == 200, answer.text
        first = events.get(timeout=10)
        assert first["type"] == "ADDED"
        second = events.get(timeout=10)
        assert second["type"] == "MODIFIED"
        assert second["object"].spec.renew_time == datetime.datetime(
            2026, 12, 4, 13, 0, 2, tzinfo=datetime.UTC
        )
        assert (
            second["object"].metadata.resource_version
            == answer.json()["metadata"]["resourceVersion"]
        )
    finally:
        follower.stop()
        thread.join(timeout=5)


def test_kubectl_applies_and_lists_gatewayclasses_and_leases(
    start_gateway, kubectl, tmp_path
) -> None:
    gw = start_gateway(TUTORIAL)
    k = kubectl(gw)
    manifest = tmp_path / "kinds.yaml"
    manifest.write_text(yaml.safe_dump_all([GATEWAY_CLASS, a_lease()]))
    assert ok(k("apply", "-f", str(manifest))) == (
        "gatewayclass.gateway.networking.k8s.io/tokengateway created\n"
        "lease.coordination.k8s.io/tokengateway-status created\n"
    )
    assert ok(k("apply", "-f", str(manifest))).endswith("unchanged\n")

    classes = ok(k("get", "gc")).splitlines()
    assert classes[0].split() == ["NAME", "CONTROLLER", "ACCEPTED", "AGE"]
    assert classes[1].split()[:3] == ["tokengateway", "tokengateway.io/gateway", "Unknown"]
    leases = ok(k("get", "leases", "-n", NS)).splitlines()
    assert leases[0].split() == ["NAME", "HOLDER", "AGE"]
    assert leases[1].split()[:2] == ["tokengateway-status", "replica-a"]
    assert ok(k("get", "leases", "-A")).splitlines()[1].split()[:3] == [
        NS,
        "tokengateway-status",
        "replica-a",
    ]

    # a controller's status write shows in ACCEPTED (GatewayClass has a status subresource)
    accepted = {"status": {"conditions": [{
        "type": "Accepted", "status": "True", "reason": "Accepted", "message": "",
        "lastTransitionTime": "2026-12-04T13:00:00Z", "observedGeneration": 1,
    }]}}  # fmt: skip
    ok(k("patch", "gc", "tokengateway", "--subresource", "status", "--type", "merge",
         "-p", json.dumps(accepted)))  # fmt: skip
    assert ok(k("get", "gc", "tokengateway")).splitlines()[1].split()[2] == "True"

    # a GatewayClass is cluster-scoped: -n changes nothing; a Lease without one is "default"
    assert ok(k("get", "gatewayclass", "tokengateway", "-n", NS, "-o", "name")) == (
        "gatewayclass.gateway.networking.k8s.io/tokengateway\n"
    )
    shown = yaml.safe_load(ok(k("get", "gc", "tokengateway", "-o", "yaml")))
    assert "namespace" not in shown["metadata"]
    assert shown["spec"]["description"] == "one process"

    # what the configuration reads is untouched: the tutorial's limits hold as before
    assert ok(k("get", "trlp", POLICY, "-n", NS, "-o", "jsonpath={.spec.limits.free.rates}"))
    refused = k("create", "-f", str(manifest))
    assert refused.returncode == 1
    assert 'leases.coordination.k8s.io "tokengateway-status" already exists' in refused.stderr
    ok(k("delete", "-f", str(manifest)))
    assert ok(k("get", "gc")) == ""
