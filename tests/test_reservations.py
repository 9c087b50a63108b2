"""Reservation mode (Kuadrant RFC 0021) against check-then-report, through real gateways.

64 requests arrive together on a limit with room for a few of them. With check-then-report
(Kuadrant's behaviour without `reservation`) every one passes the check before any reports,
so the limit is overshot many times over. With a reservation each request holds its estimate
first, so the tokens admitted stay within the limit plus what the estimates missed.
"""

from __future__ import annotations

import asyncio

import httpx
import pytest

from tests.conftest import HOST, chat
from tokengateway.wire.tokens import prompt_tokens

LIMIT = 400
CONCURRENT = 64
MAX_TOKENS = 20
GOLD = "iamagolduser"

# the simulator answers after 300 ms, so the 64 requests are in flight together
SLOW_SIM = {
    '          - "8000"\n': '          - "8000"\n          - --time-to-first-token\n          - "300"\n'
}


def _limits(reservation: str) -> dict[str, str]:
    return {
        "- limit: 200 # 200 tokens per minute for gold users (small for testing)\n          window: 1m": (
            f"- limit: {LIMIT}\n          window: 1h"
        ),
        "        - expression: auth.identity.userid\n    gold:": (
            "        - expression: auth.identity.userid\n    gold:" + reservation
        ),
    }


RESERVE = "\n      reservation: {}"


async def _burst(url: str, n: int) -> list[httpx.Response]:
    headers = {"Host": HOST, "Authorization": f"APIKEY {GOLD}"}
    limits = httpx.Limits(max_connections=n + 8)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=30, limits=limits) as c:
        return await asyncio.gather(
            *(c.post("/v1/chat/completions", json=chat(max_tokens=MAX_TOKENS)) for _ in range(n))
        )


def _spend(gw, tokens: int) -> int:  # type: ignore[no-untyped-def]
    """Use about `tokens` of the gold user's limit one request at a time; what was used."""
    used = 0
    with gw.client(GOLD) as client:
        while used < tokens:
            r = client.post("/v1/chat/completions", json=chat(max_tokens=MAX_TOKENS))
            assert r.status_code == 200, r.text
            used += r.json()["usage"]["total_tokens"]
    return used


def _counted(gw) -> int:  # type: ignore[no-untyped-def]
    rows = httpx.get(f"{gw.admin_url}/counters/default/trlp-tutorial-llm-sim").json()
    return sum(row["value"] for row in rows if row["limit"]["name"].endswith("/gold"))


def _estimate() -> int:
    body = chat(max_tokens=MAX_TOKENS)
    return prompt_tokens(body) + MAX_TOKENS


@pytest.mark.parametrize("storage", ["memory", "redis"])
def test_reservations_bound_the_overshoot(
    storage: str, start_gateway, manifests, request: pytest.FixtureRequest
) -> None:
    args: tuple[str, ...] = ()
    if storage == "redis":
        server = request.getfixturevalue("redis_server")
        server.cli("FLUSHALL")
        args = ("--storage", server.url)
    gw = start_gateway(manifests({**SLOW_SIM, **_limits(RESERVE)}), args=args)
    spent = _spend(gw, LIMIT - 150)
    responses = asyncio.run(_burst(gw.url, CONCURRENT))
    admitted = [r.json()["usage"]["total_tokens"] for r in responses if r.status_code == 200]
    refused = [r for r in responses if r.status_code == 429]
    assert len(admitted) + len(refused) == CONCURRENT
    assert admitted, "some requests fit in the room left"
    # each request held its estimate, which is never below what it used here
    error = max(0, max(admitted) - _estimate())
    assert spent + sum(admitted) <= LIMIT + error
    assert len(admitted) <= (LIMIT - spent) // min(admitted)
    # the books are exact: every admitted token counted once, no hold left as a charge
    assert _counted(gw) == spent + sum(admitted)
    assert all(r.json()["error"]["type"] == "rate_limit_exceeded" for r in refused)


def test_check_then_report_overshoots_as_kuadrant_does(start_gateway, manifests) -> None:
    gw = start_gateway(manifests({**SLOW_SIM, **_limits("")}))
    spent = _spend(gw, LIMIT - 150)
    responses = asyncio.run(_burst(gw.url, CONCURRENT))
    admitted = [r.json()["usage"]["total_tokens"] for r in responses if r.status_code == 200]
    # every request passed the check before any reported: the documented overshoot
    assert len(admitted) == CONCURRENT
    assert spent + sum(admitted) > 2 * LIMIT
    assert _counted(gw) == spent + sum(admitted)


def test_mode_checkreport_on_the_kuadrant_resource_turns_reservations_off(
    start_gateway, manifests
) -> None:
    kuadrant = "kind: Kuadrant\nmetadata:\n  name: kuadrant\n  namespace: kuadrant-system"
    mode = {kuadrant: kuadrant + "\nspec:\n  tokenRateLimiting:\n    mode: CheckReport"}
    gw = start_gateway(manifests({**SLOW_SIM, **_limits(RESERVE), **mode}))
    _spend(gw, LIMIT - 150)
    responses = asyncio.run(_burst(gw.url, CONCURRENT))
    assert all(r.status_code == 200 for r in responses)


def test_a_failed_request_gives_its_hold_back(start_gateway, manifests) -> None:
    """A request refused upstream is not charged, and its hold is released at once
    (not left to expire): the room it held is usable by the very next request."""
    one_request = {
        "- limit: 200 # 200 tokens per minute for gold users (small for testing)\n          window: 1m": (
            "- limit: 50\n          window: 1h"
        ),
        "        - expression: auth.identity.userid\n    gold:": (
            "        - expression: auth.identity.userid\n    gold:"
            "\n      reservation:\n        amount: requestBodyJSON('/max_tokens')"
        ),
    }
    gw = start_gateway(manifests(one_request))
    with gw.client(GOLD) as client:
        for _ in range(2):  # each holds 25 (half the limit, the clamp) until it fails
            bad = client.post("/v1/chat/completions", json={**chat(max_tokens=30), "model": "nope"})
            assert bad.status_code == 404  # the simulator's answer, passed through
        ok = client.post("/v1/chat/completions", json=chat(max_tokens=30))
        assert ok.status_code == 200, ok.text
        assert _counted(gw) == ok.json()["usage"]["total_tokens"]


@pytest.mark.parametrize(("fraction", "admitted"), [("0.5", 2), ("1", 1)])
def test_the_reservation_clamp_is_a_serve_option(
    fraction: str, admitted: int, start_gateway, manifests
) -> None:
    """Two requests in flight holding 40 tokens each on a 50-token limit: clamped to half
    the limit (25), both fit; with --max-reservation-fraction 1, the second does not."""
    holds = {
        "- limit: 200 # 200 tokens per minute for gold users (small for testing)\n          window: 1m": (
            "- limit: 50\n          window: 1h"
        ),
        "        - expression: auth.identity.userid\n    gold:": (
            "        - expression: auth.identity.userid\n    gold:"
            "\n      reservation:\n        amount: uint(40)"
        ),
    }
    gw = start_gateway(
        manifests({**SLOW_SIM, **holds}), args=("--max-reservation-fraction", fraction)
    )
    responses = asyncio.run(_burst(gw.url, 2))
    assert sum(r.status_code == 200 for r in responses) == admitted
