"""The follower's parts without a server: what a set of objects from a Kubernetes API
becomes (skipped, served, left to another GatewayClass), what status is written for it, and
which Secrets are held."""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

from tests.conftest import TUTORIAL
from tokengateway.controlplane.classes import left_alone
from tokengateway.controlplane.control import ControlPlane, ReadOnlyError
from tokengateway.controlplane.follower.follow import Follower, FollowOptions
from tokengateway.controlplane.follower.status import desired_statuses
from tokengateway.resources import load_paths

Key = tuple[str, str, str]


def tutorial_objects() -> dict[Key, dict[str, Any]]:
    out = {}
    for i, doc in enumerate(load_paths([str(TUTORIAL)])):
        obj = copy.deepcopy(doc.obj)
        meta = obj.setdefault("metadata", {})
        meta.setdefault("namespace", "default")
        meta["resourceVersion"] = str(100 + i)
        meta["uid"] = f"uid-{i}"
        ns = "" if obj["kind"] == "Namespace" else meta["namespace"]
        out[(obj["kind"], ns, meta["name"])] = obj
    return out


def follower_plane(gateway_class: str | None = None) -> tuple[ControlPlane, list[Any]]:
    published: list[Any] = []
    control = ControlPlane(
        [],
        {},
        None,
        lambda plans: {key: "http://127.0.0.1:9" for key in plans},
        published.append,
        gateway_class=gateway_class,
        follows="https://api.example:6443",
    )
    control.start()
    return control, published


def test_an_invalid_object_is_skipped_and_the_rest_served() -> None:
    control, published = follower_plane()
    objects = tutorial_objects()
    broken = copy.deepcopy(
        objects[("TokenRateLimitPolicy", "gateway-system", "trlp-tutorial-token-limits")]
    )
    broken["metadata"]["name"] = "broken"
    broken["spec"]["limits"]["free"]["rates"] = [{"limit": "many"}]
    objects[("TokenRateLimitPolicy", "gateway-system", "broken")] = broken
    assert control.replace_cluster(objects) is True
    assert list(control.skipped) == [("TokenRateLimitPolicy", "gateway-system", "broken")]
    assert "limit" in control.skipped[("TokenRateLimitPolicy", "gateway-system", "broken")]
    config = published[-1]
    assert config.rules and any(t.limits for t in config.rules)  # the tutorial's limits
    # the same set again (a relist, new resourceVersions) builds nothing
    for obj in objects.values():
        obj["metadata"]["resourceVersion"] += "0"
    assert control.replace_cluster(objects) is False and len(published) == 2

    desired = desired_statuses(config.statuses, control.skipped, objects, "10.0.0.7")
    invalid = desired[("TokenRateLimitPolicy", "gateway-system", "broken")]["conditions"][0]
    assert (invalid["type"], invalid["status"], invalid["reason"]) == (
        "Accepted",
        "False",
        "Invalid",
    )
    gateway = next(v for k, v in desired.items() if k[0] == "Gateway")
    assert gateway["addresses"] == [{"type": "IPAddress", "value": "10.0.0.7"}]
    good = desired[("TokenRateLimitPolicy", "gateway-system", "trlp-tutorial-token-limits")]
    assert {c["type"]: c["status"] for c in good["conditions"]} == {
        "Accepted": "True",
        "Enforced": "True",
    }
    assert not any(k[0] in ("Secret", "Service", "Namespace") for k in desired)


def test_a_follower_refuses_writes_naming_the_server() -> None:
    control, _ = follower_plane()
    for write in (
        lambda: control.apply("apiVersion: v1\nkind: Namespace\nmetadata: {name: x}\n"),
        lambda: control.delete([("Namespace", "", "x")]),
        lambda: control.set_status(("Namespace", "", "x"), {}),
    ):
        try:
            write()
        except ReadOnlyError as exc:
            assert "https://api.example:6443" in str(exc)
        else:
            raise AssertionError("a follower took a write")


def test_only_our_class_is_served() -> None:
    objects = tutorial_objects()
    theirs = {
        ("Gateway", "gateway-system", "theirs"): {
            "kind": "Gateway",
            "spec": {"gatewayClassName": "other", "listeners": []},
        },
        ("HTTPRoute", "default", "on-theirs"): {
            "kind": "HTTPRoute",
            "spec": {"parentRefs": [{"name": "theirs", "namespace": "gateway-system"}]},
        },
        ("HTTPRoute", "default", "on-both"): {
            "kind": "HTTPRoute",
            "spec": {
                "parentRefs": [
                    {"name": "theirs", "namespace": "gateway-system"},
                    {"name": "trlp-tutorial-gateway", "namespace": "gateway-system"},
                ]
            },
        },
        ("AuthPolicy", "default", "on-their-route"): {
            "kind": "AuthPolicy",
            "spec": {"targetRef": {"kind": "HTTPRoute", "name": "on-theirs"}},
        },
        ("AuthPolicy", "default", "on-nothing"): {
            "kind": "AuthPolicy",
            "spec": {"targetRef": {"kind": "HTTPRoute", "name": "missing"}},
        },
    }
    objects.update(theirs)
    gateway = next(k for k in objects if k[0] == "Gateway" and k[2] != "theirs")
    assert gateway == ("Gateway", "gateway-system", "trlp-tutorial-gateway")
    assert left_alone(objects, None) == set()
    alone = left_alone(objects, "istio")  # the tutorial's Gateway is of class istio
    assert alone == {
        ("Gateway", "gateway-system", "theirs"),
        ("HTTPRoute", "default", "on-theirs"),
        ("AuthPolicy", "default", "on-their-route"),
    }
    # with another class, the tutorial is left alone, down to its policies
    alone = left_alone(objects, "other")
    assert ("Gateway", "gateway-system", "trlp-tutorial-gateway") in alone
    assert ("TokenRateLimitPolicy", "gateway-system", "trlp-tutorial-token-limits") in alone
    assert ("HTTPRoute", "default", "on-both") not in alone


def test_only_selected_secrets_are_held(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config.yaml"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "users: [{name: u, user: {}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u, namespace: ns1}}]\n"
        "current-context: x\n"
    )
    control, _ = follower_plane()
    follower = Follower(control, FollowOptions(str(kubeconfig)))
    assert follower.namespace == "ns1" and follower.server == "http://127.0.0.1:9"
    objects = tutorial_objects()
    policies = next(i for i in follower.informers if i.kind.kind == "AuthPolicy")
    policies.objects = {k: v for k, v in objects.items() if k[0] == "AuthPolicy"}
    assert follower._update_selectors() is True
    assert follower._update_selectors() is False  # unchanged: no relist of the Secrets
    keys = [v for k, v in objects.items() if k[0] == "Secret"]
    assert keys and all(follower._selected_secret(s) for s in keys)
    other = {"metadata": {"name": "db-password", "labels": {"app": "db"}}}
    assert not follower._selected_secret(other)
    policies.objects = {}
    assert follower._update_selectors() is True
    assert not any(follower._selected_secret(s) for s in keys)


def test_secrets_a_gateway_names_as_certificates_are_held(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config.yaml"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\n"
        "clusters: [{name: c, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "users: [{name: u, user: {}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n"
    )
    control, _ = follower_plane()
    follower = Follower(control, FollowOptions(str(kubeconfig)))
    gateways = next(i for i in follower.informers if i.kind.kind == "Gateway")
    listener = {
        "name": "https",
        "port": 443,
        "protocol": "HTTPS",
        "tls": {
            "mode": "Terminate",
            "certificateRefs": [{"name": "site"}, {"name": "shared", "namespace": "certs"}],
        },
    }
    gateways.objects = {
        ("Gateway", "edge", "gw"): {
            "metadata": {"name": "gw", "namespace": "edge"},
            "spec": {"gatewayClassName": "x", "listeners": [listener]},
        }
    }
    assert follower._update_selectors() is True
    assert follower._selected_secret({"metadata": {"name": "site", "namespace": "edge"}})
    assert follower._selected_secret({"metadata": {"name": "shared", "namespace": "certs"}})
    assert not follower._selected_secret({"metadata": {"name": "site", "namespace": "other"}})
    gateways.objects = {}
    assert follower._update_selectors() is True
    assert not follower._selected_secret({"metadata": {"name": "site", "namespace": "edge"}})


def test_config_maps_and_secrets_a_backend_tls_policy_names_are_held(tmp_path: Path) -> None:
    kubeconfig = tmp_path / "config.yaml"
    kubeconfig.write_text(
        "apiVersion: v1\nkind: Config\n"
        "clusters: [{name: c, cluster: {server: 'http://127.0.0.1:9'}}]\n"
        "users: [{name: u, user: {}}]\n"
        "contexts: [{name: x, context: {cluster: c, user: u}}]\ncurrent-context: x\n"
    )
    control, _ = follower_plane()
    follower = Follower(control, FollowOptions(str(kubeconfig)))
    policies = next(i for i in follower.informers if i.kind.kind == "BackendTLSPolicy")
    refs = [
        {"group": "", "kind": "ConfigMap", "name": "llm-ca"},
        {"group": "", "kind": "Secret", "name": "llm-ca-secret"},
    ]
    policies.objects = {
        ("BackendTLSPolicy", "llm", "tls"): {
            "metadata": {"name": "tls", "namespace": "llm"},
            "spec": {"validation": {"caCertificateRefs": refs, "hostname": "llm.test"}},
        }
    }
    assert follower._update_selectors() is True
    assert follower._selected_config_map({"metadata": {"name": "llm-ca", "namespace": "llm"}})
    assert follower._selected_secret({"metadata": {"name": "llm-ca-secret", "namespace": "llm"}})
    assert not follower._selected_config_map({"metadata": {"name": "llm-ca", "namespace": "x"}})
    assert not follower._selected_config_map({"metadata": {"name": "other", "namespace": "llm"}})
    policies.objects = {}
    assert follower._update_selectors() is True
    assert not follower._selected_config_map({"metadata": {"name": "llm-ca", "namespace": "llm"}})
