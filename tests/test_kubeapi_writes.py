"""Writes beyond apply, with the real kubectl: server-side dry runs (`--dry-run=server`,
nothing changes), JSON patches (`kubectl patch --type json`, RFC 6902) and Secrets
created as protobuf (`kubectl create secret generic`), each checked on the data
path as well as in kubectl's answer."""

from __future__ import annotations

import base64
import json

import httpx
import pytest
import yaml

from tests.conftest import TUTORIAL, chat
from tests.test_kubeapi import POLICY, kubectl, ok, policy_with, spend, watch_lines
from tokengateway.controlplane.kubeapi.apply import ApplyConflict, record_update, server_side_apply
from tokengateway.controlplane.kubeapi.discovery import AGGREGATED
from tokengateway.controlplane.kubeapi.patch import PatchError, PatchNotApplicable, json_patch
from tokengateway.controlplane.kubeapi.protobuf import ProtobufError, decode

__all__ = ["kubectl"]  # the fixture, used by name

NS = "gateway-system"
TRLP = f"/apis/kuadrant.io/v1alpha1/namespaces/{NS}/tokenratelimitpolicies"


def test_server_dry_run_checks_everything_and_changes_nothing(
    start_gateway, kubectl, tmp_path
) -> None:
    gw = start_gateway(TUTORIAL)
    k = kubectl(gw)
    before = yaml.safe_load(ok(k("get", "trlp", POLICY, "-n", NS, "-o", "yaml")))
    listed = httpx.get(f"{gw.admin_url}{TRLP}").json()["metadata"]["resourceVersion"]
    lowered = tmp_path / "lowered.yaml"
    lowered.write_text(policy_with(("limit: 50 ", "limit: 1 ")))

    dry = ok(k("apply", "--dry-run=server", "-f", str(lowered), "-o", "yaml"))
    shown = yaml.safe_load(dry)
    assert shown["spec"]["limits"]["free"]["rates"] == [{"limit": 1, "window": "1m"}]
    assert shown["metadata"]["generation"] == 2  # as it would be
    assert shown["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert ok(k("apply", "--dry-run=server", "-f", str(lowered))) == (
        f"tokenratelimitpolicy.kuadrant.io/{POLICY} configured (server dry run)\n"
    )
    after = yaml.safe_load(ok(k("get", "trlp", POLICY, "-n", NS, "-o", "yaml")))
    assert after["metadata"] == before["metadata"]
    gold = tmp_path / "gold.yaml"
    gold.write_text(policy_with(("limit: 200 ", "limit: 1 ")))
    ok(k("apply", "--dry-run=server", "-f", str(gold)))
    # gold's limit of 200 is the one enforced (1 would refuse the second request)
    assert spend(gw, "iamagolduser", n=2) == [200, 200]

    # an invalid object is still refused under a dry run, with its problem named
    bad = tmp_path / "bad.yaml"
    bad.write_text(policy_with(("window: 1m", "window: 1d")))
    refused = k("apply", "--dry-run=server", "-f", str(bad))
    assert refused.returncode == 1 and "1d" in refused.stderr

    # a create and a delete, dry: nothing is made, nothing goes
    new = tmp_path / "new.yaml"
    new.write_text(policy_with((f"name: {POLICY}", "name: another")))
    assert ok(k("apply", "--dry-run=server", "-f", str(new))) == (
        "tokenratelimitpolicy.kuadrant.io/another created (server dry run)\n"
    )
    assert "(NotFound)" in k("get", "trlp", "another", "-n", NS).stderr
    assert ok(k("delete", "trlp", POLICY, "-n", NS, "--dry-run=server")) == (
        f'tokenratelimitpolicy.kuadrant.io "{POLICY}" deleted (server dry run)\n'
    )
    ok(k("get", "trlp", POLICY, "-n", NS))
    # no event was recorded: the list is as of the same resourceVersion
    assert httpx.get(f"{gw.admin_url}{TRLP}").json()["metadata"]["resourceVersion"] == listed

    wrong = httpx.post(f"{gw.admin_url}{TRLP}", params={"dryRun": "Some"}, content=b"{}")
    assert wrong.status_code == 400 and "dry run" in wrong.json()["message"]


def test_json_patch_with_kubectl_is_live_at_once(start_gateway, kubectl) -> None:
    gw = start_gateway(TUTORIAL)
    k = kubectl(gw)
    ops = [
        {"op": "test", "path": "/spec/limits/free/rates/0/limit", "value": 50},
        {"op": "replace", "path": "/spec/limits/free/rates/0/limit", "value": 1},
    ]
    patched = k("patch", "trlp", POLICY, "-n", NS, "--type", "json", "-p", json.dumps(ops))
    assert ok(patched) == f"tokenratelimitpolicy.kuadrant.io/{POLICY} patched\n"
    assert spend(gw) == [200, 429]

    # a `test` that fails changes nothing: a 422, and the limit stays
    failed = k("patch", "trlp", POLICY, "-n", NS, "--type", "json", "-p", json.dumps(ops))
    assert failed.returncode == 1 and failed.stderr.startswith("The request is invalid: ")
    assert "the value at /spec/limits/free/rates/0/limit is not the one tested" in failed.stderr
    shown = yaml.safe_load(ok(k("get", "trlp", POLICY, "-n", NS, "-o", "yaml")))
    assert shown["spec"]["limits"]["free"]["rates"][0]["limit"] == 1

    # removing the free tier's limit: a free user is no longer limited
    removed = k(
        "patch", "trlp", POLICY, "-n", NS, "--type", "json",
        "-p", '[{"op": "remove", "path": "/spec/limits/free"}]',
    )  # fmt: skip
    ok(removed)
    assert spend(gw, n=4) == [200] * 4

    merged = k("patch", "trlp", POLICY, "-n", NS, "--type", "merge", "-p", '{"metadata":'
               '{"labels":{"team":"a"}}}')  # fmt: skip
    assert ok(merged) == f"tokenratelimitpolicy.kuadrant.io/{POLICY} patched\n"
    assert "team=a" in ok(k("get", "trlp", POLICY, "-n", NS, "--show-labels"))

    # a malformed patch is a 400 naming what is wrong
    bad = httpx.patch(
        f"{gw.admin_url}{TRLP}/{POLICY}",
        content=b'{"op": "replace"}',
        headers={"content-type": "application/json-patch+json"},
    )
    assert bad.status_code == 400 and "list of operations" in bad.json()["message"]


def test_json_patch_follows_rfc_6902() -> None:
    doc = {"a": {"b": [1, 2, 3]}, "c~d": 1, "e/f": 2}
    assert json_patch(doc, [{"op": "add", "path": "/a/b/-", "value": 4}])["a"]["b"] == [
        1,
        2,
        3,
        4,
    ]
    assert json_patch(doc, [{"op": "add", "path": "/a/b/0", "value": 0}])["a"]["b"][0] == 0
    assert json_patch(doc, [{"op": "remove", "path": "/c~0d"}]) == {
        "a": {"b": [1, 2, 3]},
        "e/f": 2,
    }
    assert json_patch(doc, [{"op": "replace", "path": "/e~1f", "value": 9}])["e/f"] == 9
    moved = json_patch(doc, [{"op": "move", "from": "/a/b", "path": "/b"}])
    assert moved["b"] == [1, 2, 3] and moved["a"] == {}
    copied = json_patch(doc, [{"op": "copy", "from": "/a/b/1", "path": "/x"}])
    assert copied["x"] == 2 and copied["a"]["b"] == [1, 2, 3]
    assert json_patch(doc, [{"op": "replace", "path": "", "value": 7}]) == 7
    assert doc == {"a": {"b": [1, 2, 3]}, "c~d": 1, "e/f": 2}  # the target is not changed

    for ops in (
        [{"op": "remove", "path": "/nope"}],
        [{"op": "replace", "path": "/a/b/3", "value": 1}],
        [{"op": "test", "path": "/c~0d", "value": 2}],
        [{"op": "add", "path": "/a/b/01", "value": 1}],
        [{"op": "add", "path": "/a/b/0/x", "value": 1}],
    ):
        with pytest.raises(PatchNotApplicable):
            json_patch(doc, ops)
    for ops in (
        {"op": "add"},
        [{"op": "frob", "path": "/a"}],
        [{"op": "add", "path": "/a"}],
        [{"op": "add", "path": "a", "value": 1}],
        [{"op": "move", "from": "/a", "path": "/a/b/x"}],
    ):
        with pytest.raises(PatchError) as raised:
            json_patch(doc, ops)
        assert not isinstance(raised.value, PatchNotApplicable)


def test_secrets_created_as_protobuf_are_keys_at_once(start_gateway, kubectl) -> None:
    gw = start_gateway(TUTORIAL)
    k = kubectl(gw)
    ns = ("-n", "kuadrant-system")
    made = k("create", "secret", "generic", "key-9", *ns, "--from-literal=api_key=iamuser9")
    assert ok(made) == "secret/key-9 created\n"  # kubectl sends it as protobuf
    with gw.client("iamuser9") as c:
        assert c.post("/v1/chat/completions", json=chat()).status_code == 401  # no label yet
    ok(k("label", "secret", "key-9", *ns, "app=my-llm"))
    ok(k("annotate", "secret", "key-9", *ns, "kuadrant.io/groups=gold",
         "secret.kuadrant.io/user-id=user-9"))  # fmt: skip
    with gw.client("iamuser9") as c:
        answer = c.post("/v1/chat/completions", json=chat())
    assert answer.status_code == 200, answer.text

    shown = yaml.safe_load(ok(k("get", "secret", "key-9", *ns, "-o", "yaml")))
    assert shown["type"] == "Opaque"
    assert base64.b64decode(shown["data"]["api_key"]) == b"iamuser9"
    assert shown["metadata"]["labels"] == {"app": "my-llm"}

    tls = k("create", "secret", "tls", "t", *ns, "--cert=/nonexistent", "--key=/nonexistent")
    assert tls.returncode == 1  # kubectl's own refusal: nothing reached the server
    assert ok(k("create", "secret", "generic", "dry", *ns, "--from-literal=a=b",
                "--dry-run=server")) == "secret/dry created (server dry run)\n"  # fmt: skip
    assert "(NotFound)" in k("get", "secret", "dry", *ns).stderr


def test_protobuf_fields_of_other_kinds_are_refused_not_half_read() -> None:
    # envelope: type {apiVersion "v1", kind "Service"}, raw {metadata {name "s"}, spec {...}}
    meta = b"\x0a\x01s"
    spec = b"\x12\x02\x08\x01"
    raw = b"\x0a" + bytes([len(meta)]) + meta + spec
    type_meta = b"\x0a\x02v1\x12\x07Service"
    body = b"k8s\x00\x0a" + bytes([len(type_meta)]) + type_meta + b"\x12" + bytes([len(raw)])
    with pytest.raises(ProtobufError, match="Service: field 2 cannot be read"):
        decode(body + raw)


def test_kubectl_discovers_everything_in_two_aggregated_answers(start_gateway, kubectl) -> None:
    gw = start_gateway(TUTORIAL)
    k = kubectl(gw)
    traced = k("api-resources", "-v=6")
    rows = {line.split()[0]: line.split() for line in ok(traced).splitlines()[1:]}
    assert rows["tokenratelimitpolicies"][1:] == [
        "trlp",
        "kuadrant.io/v1alpha1",
        "true",
        "TokenRateLimitPolicy",
    ]
    assert rows["namespaces"][1:] == ["ns", "v1", "false", "Namespace"]
    asked = [line.split("GET ")[1].split()[0] for line in traced.stderr.splitlines()
             if "GET " in line]  # fmt: skip
    paths = [url.split(gw.admin_url.rsplit(":", 1)[1], 1)[1] for url in asked]
    assert sorted(p.split("?")[0] for p in paths) == ["/api", "/apis"]  # nothing per group

    answer = httpx.get(f"{gw.admin_url}/apis", headers={"accept": AGGREGATED + ",application/json"})
    assert answer.headers["content-type"] == AGGREGATED
    listed = answer.json()
    assert listed["apiVersion"] == "apidiscovery.k8s.io/v2"
    kuadrant = next(g for g in listed["items"] if g["metadata"]["name"] == "kuadrant.io")
    assert kuadrant["versions"][0]["version"] == "v1"  # the preferred version first
    v1alpha1 = next(v for v in kuadrant["versions"] if v["version"] == "v1alpha1")
    trlp = next(r for r in v1alpha1["resources"] if r["resource"] == "tokenratelimitpolicies")
    assert trlp["responseKind"] == {
        "group": "kuadrant.io",
        "version": "v1alpha1",
        "kind": "TokenRateLimitPolicy",
    }
    assert trlp["scope"] == "Namespaced" and trlp["shortNames"] == ["trlp"]
    assert trlp["subresources"][0]["subresource"] == "status"
    core = httpx.get(f"{gw.admin_url}/api", headers={"accept": AGGREGATED}).json()
    assert core["items"][0]["metadata"] == {} and core["items"][0]["versions"][0]["version"] == "v1"
    legacy = httpx.get(f"{gw.admin_url}/apis", headers={"accept": "application/json"})
    assert legacy.headers["content-type"] == "application/json"
    assert legacy.json()["kind"] == "APIGroupList"


def test_kubectl_explain_reads_the_schemas_of_the_models(start_gateway, kubectl) -> None:
    k = kubectl(start_gateway(TUTORIAL))
    limits = ok(k("explain", "trlp.spec.limits"))
    assert "KIND:       TokenRateLimitPolicy" in limits
    assert "GROUP:      kuadrant.io" in limits and "VERSION:    v1alpha1" in limits
    for field in ("rates", "counters", "when"):
        assert f"  {field}\t" in limits, limits
    listeners = ok(k("explain", "gateway.spec.listeners"))
    for field in ("hostname", "port", "protocol", "allowedRoutes"):
        assert f"  {field}\t" in listeners, listeners
    top = ok(k("explain", "trlp"))
    assert "  spec\t" in top and "  raw\t" not in top and "  source\t" not in top
    missing = k("explain", "trlp.spec.nope")
    assert missing.returncode == 1 and "nope" in missing.stderr


def test_server_side_apply_with_kubectl(start_gateway, kubectl, tmp_path) -> None:
    gw = start_gateway(TUTORIAL)
    k = kubectl(gw)
    lowered = tmp_path / "lowered.yaml"
    lowered.write_text(policy_with(("limit: 50 ", "limit: 1 ")))
    applied = k("apply", "--server-side", "-f", str(lowered))
    assert ok(applied) == f"tokenratelimitpolicy.kuadrant.io/{POLICY} serverside-applied\n"
    assert spend(gw) == [200, 429]  # live at once
    shown = yaml.safe_load(ok(k("get", "trlp", POLICY, "-n", NS, "-o", "yaml",
                                "--show-managed-fields")))  # fmt: skip
    [entry] = shown["metadata"]["managedFields"]
    assert (entry["manager"], entry["operation"], entry["fieldsType"]) == (
        "kubectl",
        "Apply",
        "FieldsV1",
    )
    assert entry["fieldsV1"]["f:spec"]["f:limits"]["f:free"]["f:rates"] == {}
    version = shown["metadata"]["resourceVersion"]

    # the same file again: a no-op, the same resourceVersion
    ok(k("apply", "--server-side", "-f", str(lowered)))
    again = yaml.safe_load(ok(k("get", "trlp", POLICY, "-n", NS, "-o", "yaml")))
    assert again["metadata"]["resourceVersion"] == version

    # another manager changing a field kubectl applied: a conflict, nothing changes
    other = tmp_path / "other.yaml"
    other.write_text(policy_with(("limit: 50 ", "limit: 7 ")))
    clash = k("apply", "--server-side", "--field-manager", "team-b", "-f", str(other))
    assert clash.returncode == 1
    assert 'conflict with "kubectl"' in clash.stderr and ".spec.limits.free.rates" in clash.stderr
    assert spend(gw, n=1) == [429]
    forced = k("apply", "--server-side", "--field-manager", "team-b", "--force-conflicts",
               "-f", str(other))  # fmt: skip
    ok(forced)
    taken = yaml.safe_load(ok(k("get", "trlp", POLICY, "-n", NS, "-o", "yaml",
                                "--show-managed-fields")))  # fmt: skip
    assert taken["spec"]["limits"]["free"]["rates"][0]["limit"] == 7
    managers = {e["manager"]: e["fieldsV1"] for e in taken["metadata"]["managedFields"]}
    assert "f:rates" in managers["team-b"]["f:spec"]["f:limits"]["f:free"]
    assert "f:rates" not in managers["kubectl"]["f:spec"]["f:limits"].get("f:free", {})

    # no field manager: refused as the API server refuses it
    bare = httpx.patch(
        f"{gw.admin_url}{TRLP}/{POLICY}",
        content=b"{}",
        headers={"content-type": "application/apply-patch+yaml"},
    )
    assert bare.status_code == 400 and "fieldManager is required" in bare.json()["message"]


def test_server_side_apply_removes_what_a_manager_stops_applying() -> None:
    live = None
    first = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s",
             "labels": {"a": "1", "b": "2"}}, "type": "Opaque"}  # fmt: skip
    obj, managed = server_side_apply(live, [], first, "m", force=False)
    assert obj["metadata"]["labels"] == {"a": "1", "b": "2"}
    second = {**first, "metadata": {"name": "s", "labels": {"a": "1"}}}
    obj, managed = server_side_apply(obj, managed, second, "m", force=False)
    assert obj["metadata"]["labels"] == {"a": "1"}  # b was m's alone: removed
    # a label another manager also applied stays when one of them stops applying it
    obj, managed = server_side_apply(obj, managed, second, "n", force=False)
    obj, managed = server_side_apply(obj, managed, {**second, "metadata": {"name": "s"}}, "m",
                                     force=False)  # fmt: skip
    assert obj["metadata"]["labels"] == {"a": "1"}
    assert {e["manager"] for e in managed} == {"m", "n"}  # m still owns type
    with pytest.raises(ApplyConflict, match=r'conflict with "n": \.metadata\.labels\.a'):
        server_side_apply(obj, managed, {**first, "metadata": {"name": "s",
                          "labels": {"a": "9"}}}, "m", force=False)  # fmt: skip


def test_a_watch_with_a_selector_sees_objects_enter_and_leave_it(start_gateway) -> None:
    gw = start_gateway(TUTORIAL)
    path = f"{TRLP}/{POLICY}"
    merge = {"content-type": "application/merge-patch+json"}
    with httpx.Client(base_url=gw.admin_url, timeout=30) as admin:
        start = admin.get(TRLP).json()["metadata"]["resourceVersion"]
        for labels in ({"team": "a"}, {"team": "b"}, {"team": "a"}):
            patch = json.dumps({"metadata": {"labels": labels}})
            assert admin.patch(path, content=patch, headers=merge).status_code == 200
        lowered = {"spec": {"limits": {"free": {"rates": [{"limit": 5, "window": "1m"}]}}}}
        assert admin.patch(path, content=json.dumps(lowered), headers=merge).status_code == 200
        events = watch_lines(
            admin, TRLP, resourceVersion=start, labelSelector="team=a", timeoutSeconds="1"
        )
        assert [e["type"] for e in events] == ["ADDED", "DELETED", "ADDED", "MODIFIED"]
        assert events[1]["object"]["metadata"]["labels"] == {"team": "b"}
        # without a selector, the same changes are all MODIFIED
        plain = watch_lines(admin, TRLP, resourceVersion=start, timeoutSeconds="1")
        assert [e["type"] for e in plain] == ["MODIFIED"] * len(plain) and len(plain) >= 4


def test_writes_that_are_not_applies_record_update_managers(
    start_gateway, kubectl, tmp_path
) -> None:
    gw = start_gateway(TUTORIAL)
    k = kubectl(gw)
    ok(k("patch", "trlp", POLICY, "-n", NS, "--type", "json", "-p",
         '[{"op":"replace","path":"/spec/limits/free/rates/0/limit","value":1}]'))  # fmt: skip
    shown = yaml.safe_load(ok(k("get", "trlp", POLICY, "-n", NS, "-o", "yaml",
                                "--show-managed-fields")))  # fmt: skip
    entries = {e["manager"]: e for e in shown["metadata"]["managedFields"]}
    assert entries["kubectl-patch"]["operation"] == "Update"
    assert entries["kubectl-patch"]["fieldsV1"] == {
        "f:spec": {"f:limits": {"f:free": {"f:rates": {}}}}
    }
    # an apply setting what the patch set to another value conflicts with the patch
    other = tmp_path / "other.yaml"
    other.write_text(policy_with(("limit: 50 ", "limit: 7 ")))
    clash = k("apply", "--server-side", "-f", str(other))
    assert clash.returncode == 1
    assert 'conflict with "kubectl-patch"' in clash.stderr
    assert spend(gw) == [200, 429]  # still the patched limit
    ok(k("apply", "--server-side", "--force-conflicts", "-f", str(other)))
    taken = yaml.safe_load(ok(k("get", "trlp", POLICY, "-n", NS, "-o", "yaml",
                                "--show-managed-fields")))  # fmt: skip
    assert "kubectl-patch" not in {e["manager"] for e in taken["metadata"]["managedFields"]}


def test_an_update_owns_what_it_changed_and_nothing_else() -> None:
    live = {"kind": "Secret", "metadata": {"name": "s", "labels": {"a": "1"}}, "type": "x"}
    applied = [{"manager": "m", "operation": "Apply", "apiVersion": "v1", "time": "t",
                "fieldsType": "FieldsV1",
                "fieldsV1": {"f:metadata": {"f:labels": {"f:a": {}}}, "f:type": {}}}]  # fmt: skip
    assert record_update(live, live, applied, "u") is applied  # nothing changed
    changed = {**live, "type": "y"}
    assert record_update(live, changed, applied, "") is applied  # no manager named
    after = record_update(live, changed, applied, "u")
    owners = {(e["manager"], e["operation"]): e["fieldsV1"] for e in after}
    assert owners == {
        ("m", "Apply"): {"f:metadata": {"f:labels": {"f:a": {}}}},
        ("u", "Update"): {"f:type": {}},
    }
