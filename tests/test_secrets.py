"""Credentials: the gateway's API key stays at the gateway, the backend can get its own,
and a rotated key takes effect on reload."""

from __future__ import annotations

import json
import time

import httpx

from tests.conftest import HOST, chat

LOCATION = "        credentials:\n          authorizationHeader:\n            prefix: APIKEY\n"
SERVICE = "metadata:\n  name: trlp-tutorial-llm-sim\nspec:"


def _completion(path: str, body: bytes):  # type: ignore[no-untyped-def]
    usage = {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    doc = {"choices": [{"index": 0, "message": {"content": "ok"}}], "usage": usage}
    return 200, {"content-type": "application/json"}, json.dumps(doc).encode()


def _post(gw, headers: dict[str, str], query: str = "") -> httpx.Response:  # type: ignore[no-untyped-def]
    return httpx.post(
        f"{gw.url}/v1/chat/completions{query}",
        json=chat(),
        headers={"Host": HOST, **headers},
        timeout=30,
    )


def test_the_credential_never_reaches_the_upstream_wherever_it_is(
    manifests, start_gateway, upstream
) -> None:
    up = upstream(_completion)
    cases = {
        "customHeader": (
            "          customHeader:\n            name: x-api-key\n",
            {"x-api-key": "iamagolduser"},
            "",
        ),
        "queryString": (
            "          queryString:\n            name: key\n",
            {},
            "?key=iamagolduser&keep=1",
        ),
        "cookie": (
            "          cookie:\n            name: k\n",
            {"cookie": "a=1; k=iamagolduser; b=2"},
            "",
        ),
    }
    for kind, (location, headers, query) in cases.items():
        folder = manifests({LOCATION: "        credentials:\n" + location})
        gw = start_gateway(folder, args=("--backend", f"trlp-tutorial-llm-sim={up.url}"))
        sent = {**headers, "authorization": "Bearer sk-the-clients-own-upstream-key"}
        r = _post(gw, sent, query)
        assert r.status_code == 200, (kind, r.text)
        path, seen, _body = up.requests[-1]
        assert "iamagolduser" not in json.dumps([path, seen, up.queries[-1]]), kind
        # what was not the gateway's credential passes on
        assert seen["authorization"] == "Bearer sk-the-clients-own-upstream-key"
        if kind == "queryString":
            assert up.queries[-1] == "keep=1"
        if kind == "cookie":
            assert seen["cookie"] == "a=1; b=2"
        gw.stop()


def test_the_backend_gets_its_own_key_or_the_clients_when_told(
    manifests, start_gateway, upstream
) -> None:
    up = upstream(_completion)
    secret = (
        "apiVersion: v1\nkind: Secret\nmetadata:\n  name: upstream-key\n  namespace: default\n"
        "stringData:\n  api_key: sk-backend-own-key\n"
    )
    own = manifests(
        {
            SERVICE: SERVICE.replace("spec:", "")
            + "  annotations:\n    tokengateway.io/upstream-api-key-secret: upstream-key\nspec:"
        },
        extra=secret,
    )
    gw = start_gateway(own, args=("--backend", f"trlp-tutorial-llm-sim={up.url}"))
    assert _post(gw, {"authorization": "APIKEY iamagolduser"}).status_code == 200
    assert up.requests[-1][1]["authorization"] == "Bearer sk-backend-own-key"
    assert "sk-backend-own-key" not in gw.output()
    gw.stop()
    forward = manifests(
        {
            SERVICE: SERVICE.replace("spec:", "")
            + '  annotations:\n    tokengateway.io/forward-client-credentials: "true"\nspec:'
        }
    )
    gw = start_gateway(forward, args=("--backend", f"trlp-tutorial-llm-sim={up.url}"))
    assert _post(gw, {"authorization": "APIKEY iamagolduser"}).status_code == 200
    assert up.requests[-1][1]["authorization"] == "APIKEY iamagolduser"


def test_a_rotated_key_takes_effect_on_reload(manifests, start_gateway, upstream) -> None:
    up = upstream(_completion)
    folder = manifests()
    gw = start_gateway(folder, args=("--backend", f"trlp-tutorial-llm-sim={up.url}"))
    assert _post(gw, {"authorization": "APIKEY iamagolduser"}).status_code == 200
    keys = folder / "04-api-keys.yaml"
    keys.write_text(keys.read_text().replace("api_key: iamagolduser", "api_key: rotated-gold-key"))
    deadline = time.monotonic() + 15
    while _post(gw, {"authorization": "APIKEY iamagolduser"}).status_code != 401:
        assert time.monotonic() < deadline, "the old key still works"
        time.sleep(0.2)
    assert _post(gw, {"authorization": "APIKEY rotated-gold-key"}).status_code == 200
    wrong = _post(gw, {"authorization": "APIKEY not-a-key-9f8e7d"})
    assert wrong.status_code == 401
    for secret in ("iamagolduser", "rotated-gold-key", "not-a-key-9f8e7d"):
        assert secret not in gw.output()
        assert secret not in wrong.text
    assert "rotated-gold-key" not in httpx.get(gw.admin_url + "/metrics").text
