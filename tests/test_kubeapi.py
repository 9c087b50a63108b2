"""The real kubectl against a served gateway: `tokengateway kubeconfig`, discovery, get
(tables, yaml, json, jsonpath), apply (create, merge and strategic patches, invalid input),
delete, and what each change does to the data path at once.

`/usr/bin/kubectl` is the Google Cloud SDK's dispatcher (Debian package `kubectl` from
packages.cloud.google.com); it runs `kubectl.1.32` because the gateway says minor 32.
Debian's own `kubernetes-client` is 1.20, too old. A machine without it fails these tests.
"""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from collections.abc import Callable
from pathlib import Path

import httpx
import pytest
import yaml

from tests.conftest import TUTORIAL, Gateway, chat, run_cli
from tokengateway.controlplane.kubeapi.patch import merge_patch, strategic_merge_patch

KUBECTL = "/usr/bin/kubectl"
POLICY = "trlp-tutorial-token-limits"
Kubectl = Callable[..., subprocess.CompletedProcess[str]]


@pytest.fixture
def kubectl(tmp_path: Path) -> Callable[[Gateway], Kubectl]:
    """kubectl for a gateway, with only KUBECONFIG (and a private HOME and cache) set."""
    if not os.access(KUBECTL, os.X_OK):
        pytest.fail(
            f"{KUBECTL} (kubectl 1.32, e.g. the Google Cloud SDK's `kubectl` package) is "
            "required by these tests"
        )

    def bind(gw: Gateway) -> Kubectl:
        made = run_cli("kubeconfig", "--admin", gw.admin_url)
        assert made.returncode == 0, made.stderr
        config = tmp_path / "kubeconfig.yaml"
        config.write_text(made.stdout)
        env = {"PATH": os.environ["PATH"], "HOME": str(tmp_path), "KUBECONFIG": str(config)}

        def run(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [KUBECTL, "--cache-dir", str(tmp_path / "kube-cache"), *args],
                input=stdin,
                capture_output=True,
                text=True,
                env=env,
                timeout=60,
                check=False,
            )

        def popen(*args: str) -> subprocess.Popen[str]:
            return subprocess.Popen(
                [KUBECTL, "--cache-dir", str(tmp_path / "kube-cache"), *args],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
                env=env,
            )

        run.popen = popen  # type: ignore[attr-defined]
        return run

    return bind


def ok(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr
    return result.stdout


def spend(gw: Gateway, key: str = "iamafreeuser", n: int = 12) -> list[int]:
    statuses = []
    with gw.client(key) as c:
        for _ in range(n):
            statuses.append(c.post("/v1/chat/completions", json=chat()).status_code)
            if statuses[-1] == 429:
                break
    return statuses


def policy_with(replace: tuple[str, str]) -> str:
    return (TUTORIAL / "06-token-limits.yaml").read_text().replace(*replace)


def test_kubeconfig_is_for_loopback_only() -> None:
    made = run_cli("kubeconfig", "--admin", "127.0.0.1:9191")
    config = yaml.safe_load(made.stdout)
    assert config["clusters"][0]["cluster"]["server"] == "http://127.0.0.1:9191"
    assert config["current-context"] == "tokengateway"
    refused = run_cli("kubeconfig", "--admin", "10.1.2.3:9090")
    assert refused.returncode == 1 and "serves TLS: give --ca-file and --token" in refused.stderr


def test_version_and_discovery(start_gateway, kubectl) -> None:
    k = kubectl(start_gateway(TUTORIAL))
    assert "Server Version: v1.32.0" in ok(k("version"))
    rows = {line.split()[0]: line.split() for line in ok(k("api-resources")).splitlines()[1:]}
    assert rows["tokenratelimitpolicies"][1:] == [
        "trlp",
        "kuadrant.io/v1alpha1",
        "true",
        "TokenRateLimitPolicy",
    ]
    assert rows["namespaces"][1:] == ["ns", "v1", "false", "Namespace"]
    assert rows["gateways"][1] == "gtw" and rows["deployments"][1:3] == ["deploy", "apps/v1"]
    assert rows["ratelimitpolicies"][1:3] == ["rlp", "kuadrant.io/v1"]
    assert rows["kuadrants"][1] == "kuadrant.io/v1beta1" and rows["services"][1] == "svc"
    assert "authpolicies" in rows and "secrets" in rows and "httproutes" in rows


def test_get_tables_yaml_json_and_jsonpath(start_gateway, kubectl) -> None:
    k = kubectl(start_gateway(TUTORIAL))
    table = ok(k("get", "trlp", "-A")).splitlines()
    assert table[0].split() == ["NAMESPACE", "NAME", "ACCEPTED", "ENFORCED", "AGE"]
    assert table[1].split()[:4] == ["gateway-system", POLICY, "True", "True"]
    wide = ok(k("get", "trlp", "-n", "gateway-system", "-o", "wide")).splitlines()
    assert wide[0].split()[3:6] == ["TARGETKIND", "TARGETNAME", "TARGETSECTION"]
    assert wide[1].split()[3:5] == ["Gateway", "trlp-tutorial-gateway"]
    gateways = ok(k("get", "gtw", "-n", "gateway-system")).splitlines()
    assert gateways[0].split() == ["NAME", "CLASS", "ADDRESS", "PROGRAMMED", "AGE"]
    assert gateways[1].split()[:4] == ["trlp-tutorial-gateway", "istio", "127.0.0.1", "True"]
    secrets = ok(k("get", "secrets", "-n", "kuadrant-system")).splitlines()
    assert [s.split()[:3] for s in secrets[1:]] == [
        ["trlp-tutorial-api-key-free-user-1", "Opaque", "1"],
        ["trlp-tutorial-api-key-gold-user-1", "Opaque", "1"],
    ]
    assert ok(k("get", "ns")).split()[:5] == ["NAME", "STATUS", "AGE", "gateway-system", "Active"]

    obj = yaml.safe_load(
        ok(k("get", "tokenratelimitpolicy", "-n", "gateway-system", POLICY, "-o", "yaml"))
    )
    meta = obj["metadata"]
    assert obj["apiVersion"] == "kuadrant.io/v1alpha1" and meta["generation"] == 1
    assert meta["uid"] and meta["creationTimestamp"] and int(meta["resourceVersion"]) > 0
    assert {c["type"]: c["status"] for c in obj["status"]["conditions"]} == {
        "Accepted": "True",
        "Enforced": "True",
    }
    listed = json.loads(ok(k("get", "httproute", "-A", "-o", "json")))
    assert listed["kind"] == "List" and listed["items"][0]["spec"]["hostnames"] == [
        "trlp-tutorial.example.com"
    ]
    ns = ok(k("get", "kuadrant", "-A", "-o", "jsonpath={.items[0].metadata.namespace}"))
    assert ns == "kuadrant-system"
    messages = ok(
        k(
            "get",
            "gateway",
            "trlp-tutorial-gateway",
            "-n",
            "gateway-system",
            '-o=jsonpath={.status.conditions[?(@.type=="Accepted")].message}{"\\n"}'
            '{.status.conditions[?(@.type=="Programmed")].message}{"\\n"}',
        )
    )
    assert messages.splitlines()[0] == "Resource accepted" and len(messages.splitlines()) == 2
    assert ok(k("get", "gtw", "-A", "-o", "jsonpath={.items[0].status.addresses[0].value}")) == (
        "127.0.0.1"
    )

    met = k("wait", "--for=condition=Enforced", f"trlp/{POLICY}", "-n", "gateway-system")
    assert ok(met) == f"tokenratelimitpolicy.kuadrant.io/{POLICY} condition met\n"

    missing = k("get", "trlp", "nope", "-n", "gateway-system")
    assert missing.returncode == 1
    assert missing.stderr.strip() == (
        'Error from server (NotFound): tokenratelimitpolicies.kuadrant.io "nope" not found'
    )


def test_apply_a_lower_limit_then_delete_it(start_gateway, kubectl, tmp_path) -> None:
    gw = start_gateway(TUTORIAL)
    k = kubectl(gw)
    before = yaml.safe_load(ok(k("get", "trlp", POLICY, "-n", "gateway-system", "-o", "yaml")))
    lowered = tmp_path / "lowered.yaml"
    lowered.write_text(policy_with(("limit: 50 ", "limit: 1 ")))
    applied = k("apply", "-f", str(lowered))
    assert applied.stdout == f"tokenratelimitpolicy.kuadrant.io/{POLICY} configured\n"
    assert spend(gw) == [200, 429]  # the first report spends the single token at once
    after = yaml.safe_load(ok(k("get", "trlp", POLICY, "-n", "gateway-system", "-o", "yaml")))
    meta = after["metadata"]
    assert meta["generation"] == 2 and meta["uid"] == before["metadata"]["uid"]
    assert int(meta["resourceVersion"]) > int(before["metadata"]["resourceVersion"])
    last = json.loads(meta["annotations"]["kubectl.kubernetes.io/last-applied-configuration"])
    assert last["spec"]["limits"]["free"]["rates"] == [{"limit": 1, "window": "1m"}]
    assert ok(k("apply", "-f", str(lowered))) == (
        f"tokenratelimitpolicy.kuadrant.io/{POLICY} unchanged\n"
    )

    deleted = ok(k("delete", "trlp", POLICY, "-n", "gateway-system"))
    assert deleted == f'tokenratelimitpolicy.kuadrant.io "{POLICY}" deleted\n'
    assert spend(gw) == [200] * 12  # no limit any more
    gone = k("get", "trlp", POLICY, "-n", "gateway-system")
    assert "Error from server (NotFound)" in gone.stderr and gone.returncode == 1
    again = k("delete", "trlp", POLICY, "-n", "gateway-system")
    assert again.returncode == 1 and "(NotFound)" in again.stderr

    created = ok(k("apply", "-f", str(lowered)))  # back again: a create (POST)
    assert created == f"tokenratelimitpolicy.kuadrant.io/{POLICY} created\n"
    assert spend(gw) == [200, 429]  # enforced again, with a fresh counter


def test_apply_secrets_with_strategic_patches(start_gateway, kubectl, tmp_path) -> None:
    gw = start_gateway(TUTORIAL)
    k = kubectl(gw)
    secret = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": "another-user",
            "namespace": "kuadrant-system",
            "labels": {"app": "my-llm"},
            "annotations": {
                "kuadrant.io/groups": "gold",  # 200 tokens a minute: room for two requests
                "secret.kuadrant.io/user-id": "user-3",
            },
        },
        "stringData": {"api_key": "another-key"},
        "type": "Opaque",
    }
    assert spend(gw, "another-key", 1) == [401]
    out = ok(k("apply", "-f", "-", stdin=yaml.safe_dump(secret)))
    assert out == "secret/another-user created\n"
    assert spend(gw, "another-key", 1) == [200]
    listed = ok(k("get", "secrets", "-n", "kuadrant-system", "-l", "app=my-llm", "-o", "name"))
    assert listed.split() == [
        "secret/another-user",
        "secret/trlp-tutorial-api-key-free-user-1",
        "secret/trlp-tutorial-api-key-gold-user-1",
    ]
    secret["stringData"] = {"api_key": "a-new-key"}  # a rotated key: a strategic merge patch
    assert ok(k("apply", "-f", "-", stdin=yaml.safe_dump(secret))) == (
        "secret/another-user configured\n"
    )
    assert spend(gw, "another-key", 1) == [401]
    assert spend(gw, "a-new-key", 1) == [200]
    del secret["metadata"]["labels"]  # no longer selected by the AuthPolicy
    assert ok(k("apply", "-f", "-", stdin=yaml.safe_dump(secret))) == (
        "secret/another-user configured\n"
    )
    shown = json.loads(
        ok(k("get", "secret", "another-user", "-n", "kuadrant-system", "-o", "json"))
    )
    assert "labels" not in shown["metadata"]  # removed from the file, so from the object
    assert spend(gw, "a-new-key", 1) == [401]
    assert ok(k("delete", "secret", "-n", "kuadrant-system", "another-user")) == (
        'secret "another-user" deleted\n'
    )
    gone = k("get", "secret", "another-user", "-n", "kuadrant-system")
    assert gone.returncode == 1 and "(NotFound)" in gone.stderr


def test_invalid_apply_is_refused_and_nothing_changes(start_gateway, kubectl, tmp_path) -> None:
    gw = start_gateway(TUTORIAL)
    k = kubectl(gw)
    bad = tmp_path / "bad.yaml"
    bad.write_text(policy_with(("window: 1m", "window: 1d")))
    refused = k("apply", "-f", str(bad))
    assert refused.returncode == 1
    assert f'The TokenRateLimitPolicy "{POLICY}" is invalid:' in refused.stderr
    assert 'spec.limits.free.rates[0].window: "1d" does not match' in refused.stderr
    unknown = tmp_path / "unknown.yaml"
    unknown.write_text(policy_with(("  limits:", "  limitz:")))
    refused = k("apply", "-f", str(unknown))
    assert refused.returncode == 1 and 'spec.limitz: unknown field "limitz"' in refused.stderr
    shown = yaml.safe_load(ok(k("get", "trlp", POLICY, "-n", "gateway-system", "-o", "yaml")))
    assert shown["metadata"]["generation"] == 1
    assert spend(gw)[-1] == 429  # the tutorial's limit is still enforced


def test_replace_with_a_stale_resource_version_is_a_conflict(start_gateway, kubectl, tmp_path):
    gw = start_gateway(TUTORIAL)
    k = kubectl(gw)
    saved = tmp_path / "saved.yaml"
    saved.write_text(ok(k("get", "trlp", POLICY, "-n", "gateway-system", "-o", "yaml")))
    lowered = tmp_path / "lowered.yaml"
    lowered.write_text(policy_with(("limit: 50 ", "limit: 1 ")))
    ok(k("apply", "-f", str(lowered)))  # someone else's change since the save
    stale = k("replace", "-f", str(saved))
    assert stale.returncode == 1
    assert stale.stderr.strip() == (
        f'Error from server (Conflict): error when replacing "{saved}": Operation cannot be '
        f'fulfilled on tokenratelimitpolicies.kuadrant.io "{POLICY}": the object has been '
        "modified; please apply your changes to the latest version and try again"
    )
    assert spend(gw) == [200, 429]  # the lowered limit stands
    fresh = tmp_path / "fresh.yaml"
    fresh.write_text(ok(k("get", "trlp", POLICY, "-n", "gateway-system", "-o", "yaml")))
    fresh.write_text(fresh.read_text().replace("limit: 1\n", "limit: 100000\n"))
    assert ok(k("replace", "-f", str(fresh))) == (
        f"tokenratelimitpolicy.kuadrant.io/{POLICY} replaced\n"
    )
    assert spend(gw, n=3) == [200] * 3  # the raised limit is live


def test_watch_and_wait_follow_changes(start_gateway, kubectl, tmp_path) -> None:
    gw = start_gateway(TUTORIAL)
    k = kubectl(gw)
    watch = k.popen("get", "trlp", "-A", "-w", "--output-watch-events")
    waiting = k.popen(
        "wait", "--for=condition=Accepted=false", f"trlp/{POLICY}", "-n", "gateway-system"
    )
    try:
        assert watch.stdout.readline().split()[:3] == ["EVENT", "NAMESPACE", "NAME"]
        assert watch.stdout.readline().split()[:5] == [
            "ADDED",
            "gateway-system",
            POLICY,
            "True",
            "True",
        ]
        lowered = tmp_path / "lowered.yaml"
        lowered.write_text(policy_with(("limit: 50 ", "limit: 1 ")))
        ok(k("apply", "-f", str(lowered)))
        assert watch.stdout.readline().split()[:3] == ["MODIFIED", "gateway-system", POLICY]
        # its target gone, the policy is no longer accepted: the status changes, and so
        # does what the watch and the wait see
        ok(k("delete", "gtw", "trlp-tutorial-gateway", "-n", "gateway-system"))
        assert watch.stdout.readline().split()[:5] == [
            "MODIFIED",
            "gateway-system",
            POLICY,
            "False",
            "<none>",  # as Kuadrant: no Enforced condition on a policy not accepted
        ]
        out, err = waiting.communicate(timeout=30)
        assert out == f"tokenratelimitpolicy.kuadrant.io/{POLICY} condition met\n", err
        assert spend(gw, n=3) == [404] * 3  # no Gateway, no route
        ok(k("delete", "trlp", POLICY, "-n", "gateway-system"))
        assert watch.stdout.readline().split()[:3] == ["DELETED", "gateway-system", POLICY]
    finally:
        for proc in (watch, waiting):
            proc.kill()
            proc.communicate()


def lines_of(proc: subprocess.Popen[str]) -> queue.Queue[str]:
    """A process's output lines as they come, to be read with a timeout."""
    out: queue.Queue[str] = queue.Queue()

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.put(line)

    threading.Thread(target=read, daemon=True).start()
    return out


def test_wait_returns_as_soon_as_enforced_and_watch_shows_it(start_gateway, kubectl) -> None:
    gw = start_gateway(TUTORIAL)
    k = kubectl(gw)
    ok(k("delete", "gtw", "trlp-tutorial-gateway", "-n", "gateway-system"))
    watch = k.popen("get", "trlp", "-A", "-w")
    waiting = k.popen(
        "wait",
        "--for=condition=Enforced",
        f"trlp/{POLICY}",
        "-n",
        "gateway-system",
        "--timeout=30s",
    )
    try:
        seen = lines_of(watch)
        assert seen.get(timeout=20).split()[:2] == ["NAMESPACE", "NAME"]
        assert seen.get(timeout=20).split()[:4] == ["gateway-system", POLICY, "False", "<none>"]
        time.sleep(1)
        assert waiting.poll() is None  # not enforced: its Gateway is gone
        started = time.monotonic()
        ok(k("apply", "-f", str(TUTORIAL / "02-gateway.yaml")))
        out, err = waiting.communicate(timeout=30)
        assert out == f"tokenratelimitpolicy.kuadrant.io/{POLICY} condition met\n", err
        assert time.monotonic() - started < 5  # at once, not at a timeout
        assert seen.get(timeout=10).split()[:4] == ["gateway-system", POLICY, "True", "True"]
        assert watch.poll() is None  # a watch goes on
    finally:
        for proc in (watch, waiting):
            proc.kill()
            proc.communicate()


def test_a_watch_ends_at_its_timeout(start_gateway) -> None:
    gw = start_gateway(TUTORIAL)
    path = "/apis/kuadrant.io/v1alpha1/namespaces/gateway-system/tokenratelimitpolicies"
    started = time.monotonic()
    with httpx.Client(base_url=gw.admin_url, timeout=30) as admin:
        listed = admin.get(path).json()
        answer = admin.get(path, params={"watch": "true", "timeoutSeconds": "1"})
        events = [json.loads(line) for line in answer.text.splitlines()]
        assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [("ADDED", POLICY)]
        since = admin.get(
            path,
            params={
                "watch": "true",
                "timeoutSeconds": "1",
                "resourceVersion": listed["metadata"]["resourceVersion"],
            },
        )
        assert since.status_code == 200 and since.text == ""  # nothing changed since the list
        bad = admin.get(path, params={"watch": "true", "resourceVersion": "yesterday"})
        assert bad.status_code == 400 and bad.json()["reason"] == "BadRequest"
    assert 2 <= time.monotonic() - started < 10


TRLPS = "/apis/kuadrant.io/v1alpha1/namespaces/gateway-system/tokenratelimitpolicies"


def watch_lines(admin: httpx.Client, path: str, **params: str) -> list[dict]:
    answer = admin.get(path, params={"watch": "true", **params})
    assert answer.status_code == 200, answer.text
    return [json.loads(line) for line in answer.text.splitlines()]


def test_a_watch_replays_the_history_then_expires_when_it_is_gone(start_gateway) -> None:
    gw = start_gateway(TUTORIAL)
    merge = {"content-type": "application/merge-patch+json"}
    with httpx.Client(base_url=gw.admin_url, timeout=30) as admin:
        listed = admin.get(TRLPS).json()["metadata"]["resourceVersion"]
        labelled = admin.patch(
            f"{TRLPS}/{POLICY}", content='{"metadata":{"labels":{"tier":"x"}}}', headers=merge
        ).json()
        assert int(labelled["metadata"]["resourceVersion"]) > int(listed)
        assert admin.delete(f"{TRLPS}/{POLICY}").status_code == 200
        # what happened since the list, deletion included, each at its own version
        events = watch_lines(admin, TRLPS, resourceVersion=listed, timeoutSeconds="1")
        assert [e["type"] for e in events] == ["MODIFIED", "DELETED"]
        versions = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
        assert versions[0] == int(labelled["metadata"]["resourceVersion"]) < versions[1]
        assert events[1]["object"]["metadata"]["name"] == POLICY
        assert all(e["object"]["apiVersion"] == "kuadrant.io/v1alpha1" for e in events)
        # from before the history begins: one ERROR event, 410 Expired, as the API server
        [gone] = watch_lines(admin, TRLPS, resourceVersion="1", timeoutSeconds="5")
        assert gone["type"] == "ERROR"
        assert gone["object"]["kind"] == "Status"
        assert (gone["object"]["code"], gone["object"]["reason"]) == (410, "Expired")


def test_bookmarks_and_live_events_without_polling(start_gateway) -> None:
    gw = start_gateway(TUTORIAL)
    merge = {"content-type": "application/merge-patch+json"}
    with httpx.Client(base_url=gw.admin_url, timeout=30) as admin:
        listed = admin.get(TRLPS).json()["metadata"]["resourceVersion"]
        # a bookmark comes shortly before timeoutSeconds is up, with only the version
        events = watch_lines(
            admin, TRLPS, resourceVersion=listed, timeoutSeconds="3", allowWatchBookmarks="true"
        )
        assert events == [
            {
                "type": "BOOKMARK",
                "object": {
                    "kind": "TokenRateLimitPolicy",
                    "apiVersion": "kuadrant.io/v1alpha1",
                    "metadata": {"resourceVersion": listed},
                },
            }
        ]
        # a change made while a watch waits arrives at once, not at the next look
        with (
            httpx.Client(base_url=gw.admin_url, timeout=30) as other,
            admin.stream(
                "GET",
                TRLPS,
                params={"watch": "true", "resourceVersion": listed, "timeoutSeconds": "20"},
            ) as stream,
        ):
            lines = stream.iter_lines()
            time.sleep(0.3)
            started = time.monotonic()
            other.patch(
                f"{TRLPS}/{POLICY}", content='{"metadata":{"labels":{"a":"b"}}}', headers=merge
            )
            event = json.loads(next(lines))
            assert event["type"] == "MODIFIED"
            assert event["object"]["metadata"]["labels"] == {"a": "b"}
            assert time.monotonic() - started < 2


def test_resource_versions_keep_growing_across_a_restart(start_gateway, tmp_path) -> None:
    state = tmp_path / "kept"
    gw = start_gateway(TUTORIAL, state_dir=state)
    with httpx.Client(base_url=gw.admin_url, timeout=30) as admin:
        before = int(admin.get(TRLPS).json()["metadata"]["resourceVersion"])
    gw.stop()
    assert int((state / "resourceversion").read_text()) == before
    (state / "resourceversion").write_text(f"{before + 10**12}\n")  # as if the clock went back
    again = start_gateway(TUTORIAL, state_dir=state)
    with httpx.Client(base_url=again.admin_url, timeout=30) as admin:
        listed = admin.get(TRLPS).json()
        after = int(listed["metadata"]["resourceVersion"])
        assert after > before + 10**12
        assert int(listed["items"][0]["metadata"]["resourceVersion"]) > before + 10**12


def test_generation_observed_generation_and_the_status_subresource(start_gateway) -> None:
    gw = start_gateway(TUTORIAL)
    merge = {"content-type": "application/merge-patch+json"}
    policy = f"{TRLPS}/{POLICY}"
    with httpx.Client(base_url=gw.admin_url, timeout=30) as admin:
        first = admin.get(policy).json()
        assert first["metadata"]["generation"] == 1
        # metadata is not spec: no new generation
        labelled = admin.patch(policy, content='{"metadata":{"labels":{"a":"b"}}}', headers=merge)
        assert labelled.json()["metadata"]["generation"] == 1
        # a write to the object ignores its status; a spec change is a new generation, and
        # every condition says it observed it
        body = {"spec": {"limits": {"free": {"rates": [{"limit": 7, "window": "1m"}]}}}}
        body["status"] = {"conditions": []}
        changed = admin.patch(policy, content=json.dumps(body), headers=merge).json()
        assert changed["metadata"]["generation"] == 2
        assert changed["status"]["conditions"], changed["status"]
        assert {c["observedGeneration"] for c in changed["status"]["conditions"]} == {2}
        assert changed["status"]["observedGeneration"] == 2
        # a write to /status changes only the status: not the spec, not the generation;
        # what the gateway computes (the conditions) stays
        status = admin.patch(
            f"{policy}/status",
            content=json.dumps({"spec": {"targetRef": {"name": "x"}}, "status": {"note": "hi"}}),
            headers=merge,
        )
        assert status.status_code == 200, status.text
        shown = admin.get(f"{policy}/status").json()
        assert shown["status"]["note"] == "hi"
        assert shown["status"]["conditions"] == changed["status"]["conditions"]
        assert shown["spec"] == changed["spec"]
        assert shown["metadata"]["generation"] == 2
        assert int(shown["metadata"]["resourceVersion"]) > int(
            changed["metadata"]["resourceVersion"]
        )
        # PUT /status with a stale resourceVersion: 409 Conflict
        stale = dict(shown, metadata=dict(shown["metadata"], resourceVersion="1"))
        conflict = admin.put(f"{policy}/status", json=stale)
        assert conflict.status_code == 409 and conflict.json()["reason"] == "Conflict"
        # a kind no gateway computes the status of keeps what is written
        deploy = "/apis/apps/v1/namespaces/default/deployments/trlp-tutorial-llm-sim"
        current = admin.get(deploy).json()
        current["status"] = {"replicas": 1, "readyReplicas": 1}
        assert admin.put(f"{deploy}/status", json=current).status_code == 200
        assert admin.get(deploy).json()["status"] == {"replicas": 1, "readyReplicas": 1}
        assert admin.get(deploy).json()["metadata"]["generation"] == 1
        # secrets have no status subresource
        assert admin.get("/api/v1/namespaces/x/secrets/y/status").status_code == 404
        resources = admin.get("/apis/kuadrant.io/v1alpha1").json()["resources"]
        assert {"tokenratelimitpolicies", "tokenratelimitpolicies/status"} <= {
            r["name"] for r in resources
        }
    assert spend(gw, n=3)[-1] == 429  # the limit of 7 applied through the API is live


def test_create_namespace_sent_as_protobuf(start_gateway, kubectl) -> None:
    k = kubectl(start_gateway(TUTORIAL))
    assert ok(k("create", "ns", "team-a")) == "namespace/team-a created\n"
    again = k("create", "ns", "team-a")
    assert (
        again.stderr.strip()
        == 'Error from server (AlreadyExists): namespaces "team-a" already exists'
    )
    shown = yaml.safe_load(ok(k("get", "ns", "team-a", "-o", "yaml")))
    assert shown["metadata"]["name"] == "team-a" and "namespace" not in shown["metadata"]
    assert [line.split()[0] for line in ok(k("get", "ns")).splitlines()] == [
        "NAME",
        "gateway-system",
        "team-a",
    ]
    dry = k("create", "ns", "team-b", "--dry-run=server")
    assert ok(dry) == "namespace/team-b created (server dry run)\n"
    assert "(NotFound)" in k("get", "ns", "team-b").stderr
    assert ok(k("delete", "ns", "team-a")) == 'namespace "team-a" deleted\n'
    assert "team-a" not in ok(k("get", "ns"))


def test_old_admin_routes_and_kubernetes_paths_side_by_side(start_gateway) -> None:
    gw = start_gateway(TUTORIAL)
    with httpx.Client(base_url=gw.admin_url, timeout=30) as admin:
        old = admin.get("/apis/resources", params={"kind": "trlp"})
        assert old.status_code == 200 and old.json()["items"][0]["metadata"]["name"] == POLICY
        listed = admin.get("/apis/kuadrant.io/v1alpha1/tokenratelimitpolicies")
        assert listed.json()["items"][0]["metadata"]["name"] == POLICY
        assert listed.json()["kind"] == "TokenRateLimitPolicyList"
        assert admin.get("/healthz").json() == {"status": "ok"}
        missing = admin.get("/apis/kuadrant.io/v1alpha1/namespaces/x/tokenratelimitpolicies/y")
        assert missing.status_code == 404 and missing.json()["reason"] == "NotFound"
        taken = admin.post(
            "/apis/kuadrant.io/v1alpha1/namespaces/gateway-system/tokenratelimitpolicies",
            json=old.json()["items"][0],
        )
        assert taken.status_code == 409 and taken.json()["reason"] == "AlreadyExists"
        unsupported = admin.patch(
            f"/apis/kuadrant.io/v1alpha1/namespaces/gateway-system/tokenratelimitpolicies/{POLICY}",
            content=b"{}",
            headers={"content-type": "application/x-unknown-patch"},
        )
        assert unsupported.status_code == 415 and "json-patch+json" in unsupported.json()["message"]


def test_merge_patch_follows_rfc_7386() -> None:
    target = {"a": "b", "c": {"d": "e", "f": "g"}, "l": [1, 2]}
    patch = {"a": "z", "c": {"f": None}, "l": [3]}
    assert merge_patch(target, patch) == {"a": "z", "c": {"d": "e"}, "l": [3]}


def test_strategic_merge_patch_keys_and_directives() -> None:
    current = {
        "spec": {
            "containers": [
                {"name": "a", "image": "a:1", "env": [{"name": "X", "value": "1"}]},
                {"name": "b", "image": "b:1"},
            ],
            "ports": [{"port": 80}, {"port": 443}],
            "finalizers": ["x", "y"],
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1}},
        }
    }
    patch = {
        "spec": {
            "$setElementOrder/containers": [{"name": "b"}, {"name": "a"}],
            "containers": [
                {"name": "a", "env": [{"name": "Y", "value": "2"}]},
                {"name": "c", "$patch": "delete"},
            ],
            "ports": [{"port": 443, "$patch": "delete"}, {"port": 8080}],
            "$deleteFromPrimitiveList/finalizers": ["x"],
            "strategy": {"$retainKeys": ["type"], "type": "Recreate"},
        }
    }
    spec = strategic_merge_patch(current, patch)["spec"]
    assert [c["name"] for c in spec["containers"]] == ["b", "a"]
    assert spec["containers"][1] == {
        "name": "a",
        "image": "a:1",
        "env": [{"name": "X", "value": "1"}, {"name": "Y", "value": "2"}],
    }
    assert spec["ports"] == [{"port": 80}, {"port": 8080}]
    assert spec["finalizers"] == ["y"]
    assert spec["strategy"] == {"type": "Recreate"}
    assert strategic_merge_patch({"a": {"b": 1}}, {"a": {"$patch": "replace", "c": 2}}) == {
        "a": {"c": 2}
    }
