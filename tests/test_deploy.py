"""deploy/: manifests that load, RBAC that grants exactly what the follower's kind table
(controlplane/follower/kinds.py) says it reads and writes, and a Deployment whose flags
`tokengateway serve` knows (docs/cluster.md).

`kubectl create --dry-run=client` needs an API server for discovery, so the manifests are
checked offline with `kubectl kustomize` (the real kubectl, /usr/bin/kubectl) and here.
"""

from __future__ import annotations

import os
import re
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.conftest import run_cli
from tests.test_kubeapi import KUBECTL
from tokengateway.config.status import CONTROLLER_NAME
from tokengateway.controlplane.follower.kinds import (
    LEASE,
    LEASE_VERBS,
    READ_VERBS,
    STATUS_VERBS,
    WATCHED,
)

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"
NAMESPACE = "tokengateway-system"
SERVICE_ACCOUNT = "tokengateway"
CLUSTER_SCOPED = {"Namespace", "ClusterRole", "ClusterRoleBinding", "GatewayClass"}
RBAC_KINDS = {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"}
KUSTOMIZATION = "kustomization.yaml"

Triple = tuple[str, str, str]  # (API group, resource, verb)


def _load(path: Path) -> list[dict[str, Any]]:
    with path.open() as file:
        return [doc for doc in yaml.safe_load_all(file) if doc is not None]


def _files() -> list[Path]:
    return sorted(DEPLOY.glob("*.yaml"))


def _objects() -> list[dict[str, Any]]:
    """Every object kubectl would apply (the kustomization itself is not one)."""
    return [doc for path in _files() if path.name != KUSTOMIZATION for doc in _load(path)]


def _only(kind: str) -> dict[str, Any]:
    found = [obj for obj in _objects() if obj["kind"] == kind]
    assert len(found) == 1, f"deploy/ should hold one {kind}, holds {len(found)}"
    return found[0]


def _triples(role: dict[str, Any]) -> set[Triple]:
    return {
        (group, resource, verb)
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }


def _difference(granted: set[Triple], needed: set[Triple]) -> str:
    return f"granted but not needed: {sorted(granted - needed)}; needed but not granted: {sorted(needed - granted)}"


def test_every_document_names_itself() -> None:
    assert _files(), "deploy/ holds no manifest"
    for path in _files():
        docs = _load(path)
        assert docs, f"{path.name} is empty"
        for doc in docs:
            where = f"{path.name}: {doc.get('kind')} {doc.get('metadata', {}).get('name')}"
            assert isinstance(doc.get("apiVersion"), str) and doc["apiVersion"], where
            assert isinstance(doc.get("kind"), str) and doc["kind"], where
            assert isinstance(doc.get("metadata", {}).get("name"), str), where


def test_namespaced_objects_are_in_the_gateways_namespace() -> None:
    for obj in _objects():
        namespace = obj["metadata"].get("namespace")
        if obj["kind"] in CLUSTER_SCOPED:
            assert namespace is None, f"{obj['kind']} {obj['metadata']['name']} is cluster-scoped"
        else:
            assert namespace == NAMESPACE, f"{obj['kind']} {obj['metadata']['name']}"
    assert _only("Namespace")["metadata"]["name"] == NAMESPACE


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = _load(DEPLOY / KUSTOMIZATION)
    listed = kustomization["resources"]
    assert len(listed) == len(set(listed))
    assert set(listed) == {path.name for path in _files() if path.name != KUSTOMIZATION}


def test_kubectl_kustomize_builds_every_object(tmp_path: Path) -> None:
    if not os.access(KUBECTL, os.X_OK):
        pytest.fail(f"{KUBECTL} (kubectl 1.32) is required by this test")
    env = {"PATH": os.environ.get("PATH", ""), "HOME": str(tmp_path)}  # no cluster, no kubeconfig
    built = subprocess.run(
        [KUBECTL, "kustomize", str(DEPLOY)],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert built.returncode == 0, built.stderr
    names = Counter(
        (doc["kind"], doc["metadata"]["name"])
        for doc in yaml.safe_load_all(built.stdout)
        if doc is not None
    )
    assert names == Counter((obj["kind"], obj["metadata"]["name"]) for obj in _objects())


def test_cluster_role_grants_exactly_what_the_follower_reads_and_writes() -> None:
    needed = {(kind.group, kind.plural, verb) for kind in WATCHED for verb in READ_VERBS}
    needed |= {
        (kind.group, f"{kind.plural}/status", verb)
        for kind in WATCHED
        if kind.writes_status
        for verb in STATUS_VERBS
    }
    granted = _triples(_only("ClusterRole"))
    assert granted == needed, _difference(granted, needed)


def test_role_grants_the_lease_and_nothing_else() -> None:
    role = _only("Role")
    needed = {(LEASE.group, LEASE.plural, verb) for verb in LEASE_VERBS}
    assert LEASE.group == "coordination.k8s.io"
    granted = _triples(role)
    assert granted == needed, _difference(granted, needed)


def test_rbac_has_nothing_more() -> None:
    """No wildcard, no rule beyond apiGroups / resources / verbs, no other role or binding,
    and the bindings give the roles to the gateway's ServiceAccount only."""
    kinds = Counter(obj["kind"] for obj in _objects() if obj["kind"] in RBAC_KINDS)
    assert kinds == Counter(RBAC_KINDS), kinds
    for kind in ("ClusterRole", "Role"):
        role = _only(kind)
        assert set(role) == {"apiVersion", "kind", "metadata", "rules"}, kind
        for rule in role["rules"]:
            assert set(rule) == {"apiGroups", "resources", "verbs"}, rule
            for value in (*rule["apiGroups"], *rule["resources"], *rule["verbs"]):
                assert "*" not in value, rule
    assert _only("ServiceAccount")["metadata"]["name"] == SERVICE_ACCOUNT
    subject = {"kind": "ServiceAccount", "name": SERVICE_ACCOUNT, "namespace": NAMESPACE}
    for binding_kind, role_kind in (("ClusterRoleBinding", "ClusterRole"), ("RoleBinding", "Role")):
        binding = _only(binding_kind)
        assert binding["subjects"] == [subject], binding_kind
        assert binding["roleRef"] == {
            "apiGroup": "rbac.authorization.k8s.io",
            "kind": role_kind,
            "name": _only(role_kind)["metadata"]["name"],
        }


def test_gateway_class_names_our_controller() -> None:
    gateway_class = _only("GatewayClass")
    assert gateway_class["spec"]["controllerName"] == CONTROLLER_NAME
    assert _arg(_container()["args"], "--gateway-class") == gateway_class["metadata"]["name"]


def _deployment() -> dict[str, Any]:
    (deployment,) = (
        obj
        for obj in _objects()
        if obj["kind"] == "Deployment" and obj["metadata"]["name"] == "tokengateway"
    )
    return deployment


def _container() -> dict[str, Any]:
    (container,) = _deployment()["spec"]["template"]["spec"]["containers"]
    return container


def _arg(args: list[str], flag: str) -> str:
    return args[args.index(flag) + 1]


def _serve_options() -> set[str]:
    """The long options in `tokengateway serve --help`'s option column."""
    help_run = run_cli("serve", "--help")
    assert help_run.returncode == 0, help_run.stderr
    options: set[str] = set()
    for line in help_run.stdout.splitlines():
        if line.lstrip().startswith("-"):
            column = re.split(r"\s{2,}", line.strip())[0]
            options.update(re.findall(r"--[a-z][a-z0-9-]*", column))
    return options


def test_deployment_flags_are_serves() -> None:
    """Every flag of the Deployment's args is one `serve` takes (--kubeconfig and
    --gateway-class come with the follower)."""
    args = _container()["args"]
    assert args[0] == "serve"
    used = {arg.split("=", 1)[0] for arg in args if arg.startswith("--")}
    unknown = used - _serve_options()
    assert not unknown, f"deploy/deployment.yaml uses flags serve does not know: {sorted(unknown)}"


def test_deployment_runs_the_follower_as_its_service_account() -> None:
    spec = _deployment()["spec"]
    pod = spec["template"]["spec"]
    container = _container()
    args = container["args"]
    assert spec["replicas"] == 2
    assert _arg(args, "--kubeconfig") == "in-cluster"
    assert pod["serviceAccountName"] == SERVICE_ACCOUNT
    env = {item["name"]: item for item in container["env"]}
    assert env["TOKENGATEWAY_POD_NAME"]["valueFrom"] == {"fieldRef": {"fieldPath": "metadata.name"}}
    assert "/OWNER/" in container["image"] and container["image"].endswith(":VERSION")
    assert container["resources"]["requests"]
    security = container["securityContext"]
    assert security["runAsNonRoot"] is True
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    # with a read-only root, the admin API's state dir must be a volume
    mounts = {mount["mountPath"] for mount in container["volumeMounts"]}
    assert _arg(args, "--state-dir") in mounts
    # the probes name ports the container declares
    ports = {port["name"]: port["containerPort"] for port in container["ports"]}
    probe = container["readinessProbe"]
    assert (probe.get("tcpSocket") or probe.get("httpGet"))["port"] in ports
    assert ports["http"] == int(_arg(args, "--listen").rsplit(":", 1)[1])
    assert ports["admin"] == int(_arg(args, "--admin").rsplit(":", 1)[1])


def test_image_user_is_the_pods() -> None:
    """runAsNonRoot needs a numeric USER in the image; the pod runs as that user."""
    containerfile = (DEPLOY / "Containerfile").read_text()
    (user,) = re.findall(r"(?m)^USER\s+(\d+)(?::\d+)?\s*$", containerfile)
    assert int(user) != 0
    assert _deployment()["spec"]["template"]["spec"]["securityContext"]["runAsUser"] == int(user)
    assert "--require-hashes --no-deps -r requirements.lock" in containerfile
    assert "--no-deps --no-build-isolation ." in containerfile


def test_services_reach_their_pods() -> None:
    """The gateway's Service selects its pods on the named port, and --storage names the
    Redis Service of redis.yaml."""
    deployments = {
        obj["metadata"]["name"]: obj for obj in _objects() if obj["kind"] == "Deployment"
    }
    for service in (obj for obj in _objects() if obj["kind"] == "Service"):
        name = service["metadata"]["name"]
        pod = deployments[name]["spec"]["template"]
        assert service["spec"]["selector"].items() <= pod["metadata"]["labels"].items(), name
        port_names = {port["name"] for c in pod["spec"]["containers"] for port in c["ports"]}
        for port in service["spec"]["ports"]:
            assert port["targetPort"] in port_names, name
    gateway = next(
        obj
        for obj in _objects()
        if obj["kind"] == "Service" and obj["metadata"]["name"] == "tokengateway"
    )
    assert gateway["spec"]["ports"] == [
        {"name": "http", "port": 8080, "targetPort": "http", "protocol": "TCP"}
    ]
    redis = next(
        obj for obj in _objects() if obj["kind"] == "Service" and obj["metadata"]["name"] == "redis"
    )
    storage = _arg(_container()["args"], "--storage")
    port = redis["spec"]["ports"][0]["port"]
    assert storage == f"redis://{redis['metadata']['name']}.{redis['metadata']['namespace']}:{port}"
