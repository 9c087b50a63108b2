"""The official `kubernetes` Python client as a second real client of the admin API's
Kubernetes paths, against a served gateway: custom objects (list, create, merge patch, get,
replace, delete, watch), core objects (Namespace, Secret), a conflict and an expired watch,
and what a change does to the data path at once."""

from __future__ import annotations

import base64
import contextlib
import queue
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from kubernetes import client, watch
from kubernetes.client.exceptions import ApiException

from tests.conftest import TUTORIAL, Gateway

GROUP, VERSION, PLURAL = "kuadrant.io", "v1alpha1", "tokenratelimitpolicies"
NS = "gateway-system"
POLICY = "trlp-tutorial-token-limits"


@pytest.fixture
def served(start_gateway) -> Iterator[tuple[Gateway, client.ApiClient]]:
    gw = start_gateway(TUTORIAL)
    config = client.Configuration()
    config.host = gw.admin_url
    with client.ApiClient(config) as api:
        yield gw, api


def spend(gw: Gateway, n: int) -> list[int]:
    body = {
        "model": "meta-llama/Llama-3.1-8B-Instruct",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 20,
    }
    with gw.client("iamafreeuser") as c:
        return [c.post("/v1/chat/completions", json=body).status_code for _ in range(n)]


def a_policy(name: str, limit: int) -> dict[str, Any]:
    doc = yaml.safe_load((TUTORIAL / "06-token-limits.yaml").read_text())
    doc["metadata"]["name"] = name
    doc["spec"]["limits"] = {
        "extra": {
            "rates": [{"limit": limit, "window": "1m"}],
            "counters": [{"expression": "auth.identity.userid"}],
        }
    }
    return doc


def test_custom_objects_list_create_patch_get_replace_delete_and_watch(served) -> None:
    _, api = served
    custom = client.CustomObjectsApi(api)
    listed = custom.list_namespaced_custom_object(GROUP, VERSION, NS, PLURAL)
    assert [i["metadata"]["name"] for i in listed["items"]] == [POLICY]
    since = listed["metadata"]["resourceVersion"]

    events: queue.Queue[dict[str, Any]] = queue.Queue()
    follower = watch.Watch()

    def follow() -> None:
        stream = follower.stream(
            custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            NS,
            PLURAL,
            resource_version=since,
            timeout_seconds=30,
        )
        with contextlib.suppress(Exception):  # stop() cuts the connection under the stream
            for event in stream:
                events.put(event)

    thread = threading.Thread(target=follow, daemon=True)
    thread.start()

    def next_event() -> tuple[str, str, dict[str, Any]]:
        """The next event of the new policy (the tutorial's may change beside it: its
        status says what the new one overrides)."""
        while True:
            event = events.get(timeout=10)
            if event["object"]["metadata"]["name"] == "extra":
                return event["type"], "extra", event["object"]

    try:
        created = custom.create_namespaced_custom_object(
            GROUP, VERSION, NS, PLURAL, a_policy("extra", 1000)
        )
        assert created["metadata"]["generation"] == 1
        assert next_event()[:2] == ("ADDED", "extra")

        with pytest.raises(ApiException) as exists:
            custom.create_namespaced_custom_object(
                GROUP, VERSION, NS, PLURAL, a_policy("extra", 1000)
            )
        assert exists.value.status == 409

        patched = custom.patch_namespaced_custom_object(
            GROUP,
            VERSION,
            NS,
            PLURAL,
            "extra",
            {"spec": {"limits": {"extra": {"rates": [{"limit": 999, "window": "1m"}]}}}},
        )
        assert patched["metadata"]["generation"] == 2
        assert int(patched["metadata"]["resourceVersion"]) > int(
            created["metadata"]["resourceVersion"]
        )
        kind, name, shown = next_event()
        assert (kind, name) == ("MODIFIED", "extra")
        assert shown["spec"]["limits"]["extra"]["rates"][0]["limit"] == 999

        got = custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "extra")
        assert got["spec"]["limits"]["extra"]["counters"] == [
            {"expression": "auth.identity.userid"}
        ]
        assert got["metadata"]["resourceVersion"] == patched["metadata"]["resourceVersion"]

        # a replace from a stale copy is a conflict, and changes nothing
        stale = dict(created)
        with pytest.raises(ApiException) as conflict:
            custom.replace_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "extra", stale)
        assert conflict.value.status == 409
        assert "Conflict" in (conflict.value.body or "")
        fresh = custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "extra")
        assert fresh["metadata"]["resourceVersion"] == got["metadata"]["resourceVersion"]

        custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "extra")
        with pytest.raises(ApiException) as missing:
            custom.get_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, "extra")
        assert missing.value.status == 404
        assert next_event()[:2] == ("DELETED", "extra")
    finally:
        follower.stop()


def test_a_patch_through_the_client_is_live_on_the_data_path(served) -> None:
    gw, api = served
    custom = client.CustomObjectsApi(api)
    custom.patch_namespaced_custom_object(
        GROUP,
        VERSION,
        NS,
        PLURAL,
        POLICY,
        {"spec": {"limits": {"free": {"rates": [{"limit": 1, "window": "1m"}]}}}},
    )
    assert spend(gw, 3)[1:] == [429, 429]
    custom.delete_namespaced_custom_object(GROUP, VERSION, NS, PLURAL, POLICY)
    assert spend(gw, 3) == [200, 200, 200]


def test_a_watch_from_a_too_old_version_is_410(served) -> None:
    _, api = served
    custom = client.CustomObjectsApi(api)
    started = time.monotonic()
    with pytest.raises(ApiException) as expired:
        for _ in watch.Watch().stream(
            custom.list_namespaced_custom_object,
            GROUP,
            VERSION,
            NS,
            PLURAL,
            resource_version="1",
            timeout_seconds=20,
        ):
            pass
    assert expired.value.status == 410
    assert "Expired" in str(expired.value.reason)
    assert time.monotonic() - started < 10


def test_core_namespace_and_secret(served) -> None:
    _, api = served
    core = client.CoreV1Api(api)
    core.create_namespace(client.V1Namespace(metadata=client.V1ObjectMeta(name="team-k8s")))
    assert core.read_namespace("team-k8s").metadata.name == "team-k8s"
    assert "team-k8s" in [n.metadata.name for n in core.list_namespace().items]
    secret = client.V1Secret(
        metadata=client.V1ObjectMeta(
            name="key-1", namespace="team-k8s", labels={"app": "tokengateway"}
        ),
        string_data={"api_key": "s3cret"},
        type="Opaque",
    )
    core.create_namespaced_secret("team-k8s", secret)
    read = core.read_namespaced_secret("key-1", "team-k8s")
    assert base64.b64decode(read.data["api_key"]) == b"s3cret"
    assert read.metadata.labels == {"app": "tokengateway"}
    assert read.metadata.uid and int(read.metadata.resource_version) > 0
    core.delete_namespaced_secret("key-1", "team-k8s")
    with pytest.raises(ApiException) as gone:
        core.read_namespaced_secret("key-1", "team-k8s")
    assert gone.value.status == 404
    core.delete_namespace("team-k8s")
    with pytest.raises(ApiException) as ns_gone:
        core.read_namespace("team-k8s")
    assert ns_gone.value.status == 404
