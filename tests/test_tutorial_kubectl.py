"""The tutorial as a user runs it: each of its shell blocks (`tests/data/tutorial-blocks.sh`,
byte for byte) run by bash, in order, against a gateway started with no manifests, with
only KUBECONFIG set (from `tokengateway kubeconfig`) and the real kubectl and curl.

One departure, the tutorial's own: the Gateway's listener says port 80, and the gateway
serves where `serve --listen` put it, so after the block that exports
`KUADRANT_GATEWAY_URL` the test sets it to that address, as the tutorial's note does for a
port-forward. The `kubectl get wasmplugin` block has no equivalent here and must fail
clearly (docs/kubectl.md says so).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, Gateway, run_cli
from tests.test_kubeapi import KUBECTL

BLOCKS = ROOT / "tests" / "data" / "tutorial-blocks.sh"


def blocks() -> list[tuple[str, str]]:
    """(section, script) for each block, in the tutorial's order."""
    found: list[tuple[str, list[str]]] = []
    for line in BLOCKS.read_text().splitlines():
        if line.startswith("### block: "):
            found.append((line.removeprefix("### block: "), []))
        elif found:
            found[-1][1].append(line)
    return [(section, "\n".join(lines) + "\n") for section, lines in found]


class Shell:
    """Runs blocks with bash; what a block exports is there for the next ones."""

    def __init__(self, tmp_path: Path, kubeconfig: Path) -> None:
        self.env = {
            "PATH": os.environ["PATH"],
            "HOME": str(tmp_path),
            "KUBECONFIG": str(kubeconfig),
        }
        self._dump = tmp_path / "env.bin"

    def run(self, script: str) -> subprocess.CompletedProcess[str]:
        wrapped = f'{script}\n__rc=$?\nenv -0 > "{self._dump}"\nexit $__rc\n'
        done = subprocess.run(
            ["bash", "-c", wrapped],
            capture_output=True,
            text=True,
            env=self.env,
            timeout=60,
            check=False,
        )
        pairs = self._dump.read_bytes().decode().split("\0")
        self.env = dict(p.split("=", 1) for p in pairs if "=" in p)
        return done


def test_every_tutorial_block_runs_verbatim(start_gateway, tmp_path) -> None:
    if not os.access(KUBECTL, os.X_OK):
        pytest.fail(f"{KUBECTL} (kubectl 1.32) is required by this test")
    gw: Gateway = start_gateway()
    made = run_cli("kubeconfig", "--admin", gw.admin_url)
    assert made.returncode == 0, made.stderr
    kubeconfig = tmp_path / "kubeconfig.yaml"
    kubeconfig.write_text(made.stdout)
    sh = Shell(tmp_path, kubeconfig)
    todo = blocks()
    assert [s for s, _ in todo][:3] == [
        "Prerequisites",
        "Environment variables",
        "Step 1: Deploy an LLM service",
    ]

    def step(section: str) -> subprocess.CompletedProcess[str]:
        name, script = todo.pop(0)
        assert name == section
        done = sh.run(script)
        assert done.returncode == 0 or section == "Monitoring usage", done.stderr
        return done

    assert step("Prerequisites").stdout == "kuadrant.kuadrant.io/kuadrant created\n"
    step("Environment variables")
    assert sh.env["KUADRANT_SYSTEM_NS"] == "kuadrant-system"
    assert step("Step 1: Deploy an LLM service").stdout == (
        "deployment.apps/trlp-tutorial-llm-sim created\nservice/trlp-tutorial-llm-sim created\n"
    )
    assert step("Step 2: Create a Gateway").stdout == "namespace/gateway-system created\n"
    assert step("Step 2: Create a Gateway").stdout == (
        "gateway.gateway.networking.k8s.io/trlp-tutorial-gateway created\n"
    )
    accepted, programmed = step("Step 2: Create a Gateway").stdout.splitlines()
    assert accepted and programmed  # the Accepted and Programmed conditions' messages
    assert step("Step 3: Expose the service via HTTPRoute").stdout == (
        "httproute.gateway.networking.k8s.io/trlp-tutorial-llm-sim created\n"
    )
    step("Step 3: Expose the service via HTTPRoute")
    assert sh.env["KUADRANT_INGRESS_HOST"] == "127.0.0.1"
    assert sh.env["KUADRANT_INGRESS_PORT"] == "80"  # the listener's port, as written
    sh.env["KUADRANT_GATEWAY_URL"] = gw.url.removeprefix("http://")
    models = step("Step 3: Expose the service via HTTPRoute").stdout
    assert models.startswith("HTTP/1.1 200 OK\n"), models  # text mode: \r\n read as \n

    for user in ("free-user-1", "gold-user-1"):
        assert step("Step 4: Set up API key authentication").stdout == (
            f"secret/trlp-tutorial-api-key-{user} created\n"
        )
    assert step("Step 5: Configure authentication policy").stdout == (
        "authpolicy.kuadrant.io/trlp-tutorial-llm-api-keys created\n"
    )
    assert step("Step 6: Apply token rate limiting").stdout == (
        "tokenratelimitpolicy.kuadrant.io/trlp-tutorial-token-limits created\n"
    )

    _, free = todo[0]
    answer = json.loads(step("Test with a free user").stdout)
    assert answer["usage"]["total_tokens"] > 0
    # the same request again, until the free tier's 50 tokens a minute are spent
    refused = None
    for _ in range(10):
        again = json.loads(sh.run(free).stdout)
        if "error" in again:
            refused = again
            break
    assert refused is not None and refused["error"]["code"] == "rate_limit_exceeded", refused
    _, gold_request = todo[0]
    gold = json.loads(step("Test with a gold user").stdout)
    assert gold["usage"]["total_tokens"] > 0  # gold has its own counter

    # Step 6's manifest again with the gold limit lowered, applied with kubectl apply:
    # the gold user, who was served, is refused now.
    limits = dict(blocks())["Step 6: Apply token rate limiting"]
    lowered = limits.replace("- limit: 200 #", "- limit: 1 #")
    assert lowered != limits
    done = sh.run(lowered)
    assert done.returncode == 0, done.stderr
    assert done.stdout == "tokenratelimitpolicy.kuadrant.io/trlp-tutorial-token-limits configured\n"
    again = json.loads(sh.run(gold_request).stdout)
    assert again.get("error", {}).get("code") == "rate_limit_exceeded", again

    wasm = step("Monitoring usage")
    assert wasm.returncode == 1
    assert 'the server doesn\'t have a resource type "wasmplugin"' in wasm.stderr

    status = step("Troubleshooting").stdout
    assert status.count("type: Enforced") == 2 and "kind: AuthPolicy" in status
    assert "kind: TokenRateLimitPolicy" in status

    # The cleanup's first line alone: deleting the TokenRateLimitPolicy lifts the limits
    # (the free user, refused above, is served again); then the rest of the block.
    section, cleanup_script = todo.pop(0)
    assert section == "Cleanup"
    first, rest = cleanup_script.split("\n", 2)[1], cleanup_script.split("\n", 2)[2]
    assert first.startswith("kubectl delete tokenratelimitpolicy "), first
    lifted = sh.run(first)
    assert lifted.returncode == 0, lifted.stderr
    assert (
        lifted.stdout == 'tokenratelimitpolicy.kuadrant.io "trlp-tutorial-token-limits" deleted\n'
    )
    served = json.loads(sh.run(free).stdout)
    assert served["usage"]["total_tokens"] > 0, served
    done = sh.run(rest)
    assert done.returncode == 0, done.stderr
    cleanup = done.stdout
    assert cleanup.splitlines() == [
        'authpolicy.kuadrant.io "trlp-tutorial-llm-api-keys" deleted',
        'secret "trlp-tutorial-api-key-free-user-1" deleted',
        'secret "trlp-tutorial-api-key-gold-user-1" deleted',
        'httproute.gateway.networking.k8s.io "trlp-tutorial-llm-sim" deleted',
        'gateway.gateway.networking.k8s.io "trlp-tutorial-gateway" deleted',
        'service "trlp-tutorial-llm-sim" deleted',
        'deployment.apps "trlp-tutorial-llm-sim" deleted',
    ]
    assert todo == []
    with gw.client() as c:  # nothing routes any more
        assert c.get("/v1/models").status_code == 404
