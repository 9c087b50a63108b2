"""The gateway as its own control plane, through the admin API: apply, get, delete, status,
counters, hot reload under load, and state kept across restarts."""

from __future__ import annotations

import json
import threading
import time

import httpx
import yaml

from tests.conftest import HOST, TUTORIAL, chat, run_cli

STEPS_4_TO_6 = ("04-api-keys.yaml", "05-authpolicy.yaml", "06-token-limits.yaml")


def admin(gw) -> httpx.Client:
    return httpx.Client(base_url=gw.admin_url, timeout=30)


def apply(gw, text: str) -> httpx.Response:
    return admin(gw).post("/apis/apply", content=text, headers={"content-type": "application/yaml"})


def spend(gw, key: str = "iamafreeuser") -> list[int]:
    statuses = []
    with gw.client(key) as c:
        for _ in range(12):
            statuses.append(c.post("/v1/chat/completions", json=chat()).status_code)
            if statuses[-1] == 429:
                break
    return statuses


def test_tutorial_step_by_step_through_apply(manifests, start_gateway) -> None:
    gw = start_gateway(manifests(skip=STEPS_4_TO_6))
    assert httpx.get(gw.url + "/v1/models", headers={"Host": HOST}).status_code == 200  # Step 3
    results = []
    for name in STEPS_4_TO_6:
        r = apply(gw, (TUTORIAL / name).read_text())
        assert r.status_code == 200, r.text
        results += r.json()["results"]
    assert [(x["kind"], x["action"]) for x in results] == [
        ("Secret", "created"),
        ("Secret", "created"),
        ("AuthPolicy", "created"),
        ("TokenRateLimitPolicy", "created"),
    ]
    assert httpx.get(gw.url + "/v1/models", headers={"Host": HOST}).status_code == 401
    assert spend(gw)[-1] == 429
    policy = admin(gw).get(
        "/apis/resources",
        params={
            "kind": "trlp",
            "namespace": "gateway-system",
            "name": "trlp-tutorial-token-limits",
        },
    )
    assert policy.status_code == 200
    item = policy.json()["items"][0]
    assert item["metadata"]["generation"] == 1 and item["metadata"]["creationTimestamp"]
    again = apply(gw, (TUTORIAL / "06-token-limits.yaml").read_text())
    assert again.json()["results"][0]["action"] == "unchanged"


def test_changing_a_limit_keeps_its_counters_removing_it_drops_them(start_gateway) -> None:
    gw = start_gateway(TUTORIAL)
    assert spend(gw)[-1] == 429
    counters = admin(gw).get("/counters/default/trlp-tutorial-llm-sim").json()
    assert len(counters) == 1
    spent = counters[0]
    assert spent["set_variables"] == {"auth.identity.userid": "user-1"}
    assert spent["limit"]["max_value"] == 50 and spent["remaining"] == 0
    raised = (TUTORIAL / "06-token-limits.yaml").read_text().replace("limit: 50 ", "limit: 5000 ")
    r = apply(gw, raised)
    assert r.json()["results"][0]["action"] == "configured"
    counters = admin(gw).get("/counters/default/trlp-tutorial-llm-sim").json()
    assert counters[0]["limit"]["max_value"] == 5000
    used = sum(e.get("total_tokens", 0) for e in gw.access_log())
    assert used >= 50 and counters[0]["remaining"] == 5000 - used  # the same counter, kept
    with gw.client() as c:
        assert c.post("/v1/chat/completions", json=chat()).status_code == 200
    got = admin(gw).get("/apis/resources", params={"kind": "trlp", "namespace": "gateway-system"})
    assert got.json()["items"][0]["metadata"]["generation"] == 2
    r = admin(gw).delete(
        "/apis/resources",
        params={
            "kind": "trlp",
            "namespace": "gateway-system",
            "name": "trlp-tutorial-token-limits",
        },
    )
    assert r.status_code == 200
    assert admin(gw).get("/counters/default/trlp-tutorial-llm-sim").json() == []
    assert spend(gw) == [200] * 12  # no limit any more


def test_bad_input_is_refused_and_nothing_changes(start_gateway) -> None:
    gw = start_gateway(TUTORIAL)
    bad = (TUTORIAL / "06-token-limits.yaml").read_text().replace("window: 1m", "window: 1d", 1)
    r = apply(gw, bad)
    assert r.status_code == 400
    assert any("spec.limits.free.rates[0].window" in d for d in r.json()["error"]["details"])
    r = apply(gw, "kind: [unclosed\n")
    assert r.status_code == 400 and "line" in str(r.json()["error"])
    r = apply(gw, "apiVersion: v1\nkind: Widget\nmetadata: {name: w}\n")
    assert r.status_code == 400 and "Widget" in str(r.json()["error"])
    r = admin(gw).get("/apis/resources", params={"kind": "nosuchkind"})
    assert r.status_code == 400 and "unknown kind" in r.json()["error"]["message"]
    r = admin(gw).delete(
        "/apis/resources", params={"kind": "trlp", "namespace": "x", "name": "nope"}
    )
    assert r.status_code == 404 and "not found" in r.json()["error"]["message"]
    r = admin(gw).get("/nowhere")
    assert r.status_code == 404
    assert spend(gw)[-1] == 429  # the tutorial's policy is still enforced


def test_applied_state_survives_a_restart(manifests, start_gateway, tmp_path) -> None:
    state = tmp_path / "kept-state"
    folder = manifests(skip=STEPS_4_TO_6)
    gw = start_gateway(folder, state_dir=state)
    for name in STEPS_4_TO_6:
        assert apply(gw, (TUTORIAL / name).read_text()).status_code == 200
    gw.stop()
    again = start_gateway(folder, state_dir=state)
    items = admin(again).get(
        "/apis/resources", params={"kind": "trlp", "namespace": "gateway-system"}
    )
    assert [i["metadata"]["name"] for i in items.json()["items"]] == ["trlp-tutorial-token-limits"]
    assert spend(again)[-1] == 429


def test_reload_under_load_fails_no_request(manifests, start_gateway) -> None:
    folder = manifests(
        replace={"limit: 50 ": "limit: 100000000 ", "limit: 200 ": "limit: 100000000 "}
    )
    gw = start_gateway(folder)
    failures: list[str] = []
    done = threading.Event()
    count = [0]

    def load() -> None:
        with gw.client("iamagolduser") as c:
            while not done.is_set():
                r = c.post("/v1/chat/completions", json=chat(max_tokens=5))
                count[0] += 1
                if r.status_code != 200:
                    failures.append(f"{r.status_code} {r.text[:200]}")

    workers = [threading.Thread(target=load) for _ in range(4)]
    for w in workers:
        w.start()
    policy = (folder / "06-token-limits.yaml").read_text()
    for i in range(8):  # apply changes while requests flow: new limits, new keys
        text = policy.replace("limit: 100000000 ", f"limit: {100000000 + i} ")
        assert apply(gw, text).status_code == 200
        secret = (
            (TUTORIAL / "04-api-keys.yaml")
            .read_text()
            .replace("free-user-1", f"free-user-{i + 10}")
        )
        secret = secret.replace("iamafreeuser", f"free-key-{i}").replace(
            "trlp-tutorial-api-key-gold-user-1", f"gold-{i}"
        )
        secret = secret.replace("iamagolduser", f"gold-key-{i}")
        assert apply(gw, secret).status_code == 200
        time.sleep(0.1)
    done.set()
    for w in workers:
        w.join()
    assert count[0] > 50
    assert failures == []


def test_file_changes_are_picked_up(manifests, start_gateway) -> None:
    folder = manifests()
    gw = start_gateway(folder)
    assert spend(gw)[-1] == 429
    limits = folder / "06-token-limits.yaml"
    limits.write_text(limits.read_text().replace("limit: 50 ", "limit: 100000 "))
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with gw.client() as c:
            if c.post("/v1/chat/completions", json=chat()).status_code == 200:
                break
        time.sleep(0.2)
    else:
        raise AssertionError(f"the change was not picked up: {gw.output()[-2000:]}")
    limits.write_text("this: [is not yaml\n")
    time.sleep(2.5)
    with gw.client() as c:
        assert c.post("/v1/chat/completions", json=chat()).status_code == 200  # still serving
    assert "reload refused" in gw.output()


def test_admin_token(tmp_path, manifests, start_gateway) -> None:
    gw = start_gateway(TUTORIAL, args=("--admin-token", "s3cret"))
    assert admin(gw).get("/apis/resources", params={"kind": "gtw"}).status_code == 401
    # on the Kubernetes paths, a refusal is a Status, as kubectl and client libraries read it
    for path in ("/version", "/api/v1/namespaces", "/apis/kuadrant.io/v1alpha1"):
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            refused = admin(gw).get(path, headers=headers)
            assert refused.status_code == 401
            assert refused.json() == {
                "kind": "Status",
                "apiVersion": "v1",
                "metadata": {},
                "status": "Failure",
                "message": "missing or wrong admin token (Authorization: Bearer TOKEN)",
                "reason": "Unauthorized",
                "code": 401,
            }
    ok = admin(gw).get(
        "/apis/resources",
        params={"kind": "gtw", "namespace": "gateway-system"},
        headers={"Authorization": "Bearer s3cret"},
    )
    assert (
        ok.status_code == 200
        and ok.json()["items"][0]["metadata"]["name"] == "trlp-tutorial-gateway"
    )


def test_limits_endpoint(start_gateway) -> None:
    gw = start_gateway(TUTORIAL)
    limits = admin(gw).get("/limits/default/trlp-tutorial-llm-sim").json()
    assert sorted((x["name"].rsplit("/", 1)[1], x["max_value"], x["seconds"]) for x in limits) == [
        ("free", 50, 60.0),
        ("gold", 200, 60.0),
    ]
    assert all(x["variables"] == ["auth.identity.userid"] for x in limits)


def test_cli_round_trip_against_a_running_gateway(manifests, start_gateway) -> None:
    gw = start_gateway(manifests(skip=STEPS_4_TO_6))
    opts = ("--admin", gw.admin_url)
    keys = run_cli("apply", "-f", "-", *opts, stdin=(TUTORIAL / "04-api-keys.yaml").read_text())
    assert keys.returncode == 0, keys.stderr
    assert keys.stdout.splitlines() == [
        "secret/trlp-tutorial-api-key-free-user-1 created",
        "secret/trlp-tutorial-api-key-gold-user-1 created",
    ]
    for name in STEPS_4_TO_6[1:]:
        assert run_cli("apply", "-f", str(TUTORIAL / name), *opts).returncode == 0
    table = run_cli("get", "trlp", "-n", "gateway-system", *opts)
    assert table.returncode == 0 and "trlp-tutorial-token-limits" in table.stdout
    gateway = run_cli("get", "gtw", "trlp-tutorial-gateway", "-n", "gateway-system", *opts,
                      "-o", "json")  # fmt: skip
    assert json.loads(gateway.stdout)["status"]["addresses"][0]["value"] == "127.0.0.1"
    secret = run_cli(
        "get",
        "secret",
        "trlp-tutorial-api-key-free-user-1",
        "-n",
        "kuadrant-system",
        "-o",
        "yaml",
        *opts,
    )
    assert (
        "iamafreeuser" not in secret.stdout and "api_key:" in secret.stdout
    )  # base64, as a cluster shows it
    assert spend(gw)[-1] == 429
    counters = run_cli("counters", "default/trlp-tutorial-llm-sim", *opts)
    assert counters.returncode == 0 and "user-1" in counters.stdout
    gone = run_cli("delete", "trlp", "trlp-tutorial-token-limits", "-n", "gateway-system", *opts)
    assert gone.returncode == 0 and "deleted" in gone.stdout
    missing = run_cli("delete", "trlp", "trlp-tutorial-token-limits", "-n", "gateway-system", *opts)
    assert missing.returncode == 1 and "not found" in missing.stderr
    assert spend(gw) == [200] * 12


def test_troubleshooting_status_checks(start_gateway) -> None:
    """The tutorial's troubleshooting reads, with `tokengateway get -o yaml` (its JSONPath
    lines run with the real kubectl in test_tutorial_kubectl.py)."""
    gw = start_gateway(TUTORIAL)
    opts = ("--admin", gw.admin_url)

    def accepted(kind: str, name: str) -> str:
        shown = run_cli("get", kind, "-n", "gateway-system", name, "-o", "yaml", *opts)
        conditions = yaml.safe_load(shown.stdout)["status"]["conditions"]
        return next(c["message"] for c in conditions if c["type"] == "Accepted")

    assert accepted("authpolicy", "trlp-tutorial-llm-api-keys") == "AuthPolicy has been accepted"
    assert accepted("trlp", "trlp-tutorial-token-limits") == (
        "TokenRateLimitPolicy has been accepted"
    )
    table = run_cli("get", "trlp", "-A", *opts).stdout.splitlines()
    assert table[0].split()[:4] == ["NAMESPACE", "NAME", "ACCEPTED", "ENFORCED"]
    assert table[1].split()[:4] == ["gateway-system", "trlp-tutorial-token-limits", "True", "True"]
    full = run_cli(
        "get", "trlp", "trlp-tutorial-token-limits", "-n", "gateway-system", "-o", "yaml", *opts
    )
    assert "observedGeneration: 1" in full.stdout and "reason: Enforced" in full.stdout


def test_a_broken_policy_does_not_stop_the_gateway(manifests, start_gateway) -> None:
    folder = manifests()
    limits = folder / "06-token-limits.yaml"
    text = limits.read_text()
    limits.write_text(text.replace('request.path == "/v1/chat/completions"', "request.path ==", 1))
    gw = start_gateway(folder)
    deadline = time.monotonic() + 5
    while "does not compile" not in gw.output() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert "does not compile" in gw.output()  # the start-up warning names the problem
    items = admin(gw).get("/apis/resources", params={"kind": "trlp", "namespace": "gateway-system"})
    conditions = {c["type"]: c for c in items.json()["items"][0]["status"]["conditions"]}
    assert conditions["Enforced"]["status"] == "False"
    assert conditions["Enforced"]["reason"] == "InvalidCelExpression"
    assert "'free'" in conditions["Enforced"]["message"]
    assert spend(gw, "iamagolduser")[-1] == 429  # the gold limit is still enforced


def test_a_state_dir_inside_the_served_folder_causes_no_reloads(manifests, start_gateway) -> None:
    """The state file's folder changes when the state is written; it is not a manifest, so
    it must not make the watcher reload (it did, every second, forever)."""
    import time

    folder = manifests()
    gw = start_gateway(folder, state_dir=folder / "state")
    time.sleep(3.5)  # the watcher polls every second
    assert "configuration reloaded" not in gw.output()
    (folder / "06-token-limits.yaml").write_text(
        (folder / "06-token-limits.yaml").read_text().replace("limit: 50 ", "limit: 51 ")
    )
    deadline = time.monotonic() + 10
    while gw.output().count("configuration reloaded") < 1:
        assert time.monotonic() < deadline, gw.output()
        time.sleep(0.1)
    time.sleep(2.5)
    assert gw.output().count("configuration reloaded") == 1
