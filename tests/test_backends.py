"""Where each Service a route names is reached (config/backends.py)."""

import io

import pytest

from tokengateway.config.backends import BackendError, plan_backends
from tokengateway.resources import Resource, load_paths, parse_resources

MANIFESTS = """
apiVersion: v1
kind: Service
metadata: {name: tls}
spec: {type: ExternalName, externalName: api.example.com, ports: [{port: 443}]}
---
apiVersion: v1
kind: Service
metadata: {name: plain}
spec: {type: ExternalName, externalName: api.example.com}
---
apiVersion: v1
kind: Service
metadata: {name: mapped, annotations: {tokengateway.io/backend-url: "http://127.0.0.1:5/"}}
spec: {ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: sim}
spec: {selector: {app: sim}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: vllm}
spec: {selector: {app: vllm}, ports: [{port: 80}]}
---
apiVersion: v1
kind: Service
metadata: {name: headless}
spec: {ports: [{port: 80}]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: sim}
spec:
  selector: {matchLabels: {app: sim}}
  template:
    metadata: {labels: {app: sim, tier: test}}
    spec:
      containers:
      - {name: sidecar, image: busybox}
      - {name: llm, image: "ghcr.io/llm-d/llm-d-inference-sim:v0.4", args: [--model, m]}
---
apiVersion: apps/v1
kind: Deployment
metadata: {name: vllm}
spec:
  selector: {matchLabels: {app: vllm}}
  template:
    metadata: {labels: {app: vllm}}
    spec: {containers: [{name: llm, image: vllm/vllm-openai}]}
"""


@pytest.fixture(scope="module")
def resources() -> list[Resource]:
    return parse_resources(load_paths(["-"], stdin=io.StringIO(MANIFESTS)))


def plan(resources: list[Resource], service: str) -> tuple[str | None, tuple[str, ...], str]:
    found = plan_backends(resources, [f"default/{service}"])[f"default/{service}"]
    return found.url, found.sim_args, found.origin


def test_external_name_uses_the_first_port_and_https_on_443(resources: list[Resource]) -> None:
    assert plan(resources, "tls") == ("https://api.example.com:443", (), "ExternalName")
    assert plan(resources, "plain") == ("http://api.example.com:80", (), "ExternalName")


def test_the_annotation_maps_a_service(resources: list[Resource]) -> None:
    assert plan(resources, "mapped") == ("http://127.0.0.1:5", (), "annotation")


def test_a_selected_simulator_deployment_is_run_with_its_args(resources: list[Resource]) -> None:
    assert plan(resources, "sim") == (
        None,
        ("--model", "m"),
        "simulator for Deployment default/sim",
    )


def test_services_without_an_address_are_named_with_how_to_map_them(
    resources: list[Resource],
) -> None:
    with pytest.raises(BackendError) as caught:
        plan_backends(resources, ["default/vllm", "default/headless", "default/gone"])
    assert str(caught.value).splitlines() == [
        "Service default/gone is referenced by an HTTPRoute but not defined; map it with "
        "`serve --backend default/gone=http://HOST:PORT` or the Service annotation "
        "tokengateway.io/backend-url",
        "Service default/headless selects no Deployment and has no address; map it with "
        "`serve --backend default/headless=http://HOST:PORT` or the Service annotation "
        "tokengateway.io/backend-url",
        "Service default/vllm selects Deployment default/vllm (vllm/vllm-openai), which "
        "tokengateway cannot run (only llm-d-inference-sim is built in); map it with "
        "`serve --backend default/vllm=http://HOST:PORT` or the Service annotation "
        "tokengateway.io/backend-url",
    ]


def test_an_override_beats_everything_and_must_name_a_service(resources: list[Resource]) -> None:
    found = plan_backends(resources, ["default/sim"], {"sim": "http://127.0.0.1:9"})
    assert found["default/sim"].url == "http://127.0.0.1:9"
    with pytest.raises(BackendError, match="no Service named 'nope'"):
        plan_backends(resources, [], {"nope": "http://127.0.0.1:9"})
