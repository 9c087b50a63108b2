"""The official openai SDK pointed at the gateway, as a user's program would be."""

from __future__ import annotations

import openai
import pytest

from tests.conftest import HOST, MODEL, TUTORIAL
from tests.test_tutorial import FREE_EXTRA


def sdk(gw, key: str, max_retries: int = 0) -> openai.OpenAI:
    return openai.OpenAI(
        base_url=gw.url + "/v1",
        api_key="unused",  # the gateway reads the APIKEY header below
        default_headers={"Authorization": f"APIKEY {key}", "Host": HOST},
        max_retries=max_retries,
    )


def ask(client: openai.OpenAI, max_tokens: int = 100):
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What is Kubernetes?"}],
        max_tokens=max_tokens,
    )


def test_completions_then_rate_limit_error(start_gateway) -> None:
    gw = start_gateway(TUTORIAL)
    client = sdk(gw, "iamafreeuser")
    first = ask(client)
    assert first.choices[0].message.content
    assert first.usage is not None and first.usage.total_tokens > 0
    used = first.usage.total_tokens
    while used < 50:
        used += ask(client).usage.total_tokens
    with pytest.raises(openai.RateLimitError) as caught:
        ask(client)
    assert caught.value.status_code == 429
    assert caught.value.body["type"] == "rate_limit_exceeded"
    # The legacy completions endpoint is routed too (and not limited by the chat predicate).
    text = client.completions.create(model=MODEL, prompt="Say hello", max_tokens=5)
    assert text.usage is not None and text.usage.completion_tokens <= 5
    assert [m.id for m in client.models.list()] == [MODEL]


def test_bad_key_is_authentication_error(start_gateway) -> None:
    gw = start_gateway(TUTORIAL)
    with pytest.raises(openai.AuthenticationError) as caught:
        ask(sdk(gw, "not-a-key"))
    assert caught.value.status_code == 401


def test_group_not_allowed_is_permission_denied(manifests, start_gateway) -> None:
    gw = start_gateway(manifests(extra=FREE_EXTRA))
    with pytest.raises(openai.PermissionDeniedError):
        ask(sdk(gw, "iamasilveruser"))


def test_unknown_model_is_not_found_from_upstream(start_gateway) -> None:
    gw = start_gateway(TUTORIAL)
    client = sdk(gw, "iamagolduser")
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(
            model="no-such-model", messages=[{"role": "user", "content": "hi"}]
        )
