"""The live usage page (`GET /ui`, fed by `GET /usage`) in headless Chromium, and
`tokengateway top`.

Chromium is Debian's (`/usr/bin/chromium`, installed by scripts/setup-system.sh) driven by
the playwright package; `playwright install` is never run. A missing Chromium fails.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from tests.conftest import ROOT, TUTORIAL, run_cli
from tests.test_openai_sdk import ask, sdk
from tokengateway.observability import ui

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
#: the README's picture, rewritten only when asked (`UPDATE_SCREENSHOT=1 make test`) so that
#: a test run leaves the tree clean; otherwise the screenshot goes to the test's temp dir
README_SCREENSHOT = ROOT / "docs" / "images" / "usage-page.png"
TOKEN = "s3cret-admin-token"
ROUTE = "default/trlp-tutorial-llm-sim"
POLICY = "gateway-system/trlp-tutorial-token-limits"
EVIL_ID = '<img src=x onerror="window.pwned=1"><script>window.pwned=2</script>&amp;<b>x</b>'

# a second free user, and a gold user whose id is markup: ids come from requests
MORE_USERS = f"""
apiVersion: v1
kind: Secret
metadata:
  name: free-user-3
  namespace: kuadrant-system
  labels: {{app: my-llm}}
  annotations:
    kuadrant.io/groups: free
    secret.kuadrant.io/user-id: user-3
stringData:
  api_key: another-free-key
---
apiVersion: v1
kind: Secret
metadata:
  name: gold-user-markup
  namespace: kuadrant-system
  labels: {{app: my-llm}}
  annotations:
    kuadrant.io/groups: gold
    secret.kuadrant.io/user-id: {json.dumps(EVIL_ID)}
stringData:
  api_key: iamamarkupuser
"""


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    if not os.access(CHROMIUM, os.X_OK):
        pytest.fail(
            f"{CHROMIUM} is required by the usage page's tests: Debian's chromium package "
            "(`make test` or scripts/setup-system.sh installs it)"
        )
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        chromium = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser) -> Iterator[object]:
    context = browser.new_context(viewport={"width": 1200, "height": 760})
    tab = context.new_page()
    tab.errors = []  # uncaught exceptions and console errors (a CSP refusal is one)
    tab.on("pageerror", lambda exc: tab.errors.append(str(exc)))
    tab.on("console", lambda m: m.type == "error" and tab.errors.append(m.text))
    yield tab
    context.close()


def row(page, user: str):
    """The table row of one counter, by its exact value (a user id)."""
    return page.locator("tr.counter").filter(has=page.get_by_text(user, exact=True))


def tokens(client: openai.OpenAI, max_tokens: int = 10) -> int:
    return ask(client, max_tokens).usage.total_tokens


def usage(gw, token: str | None = None) -> dict:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(gw.admin_url + "/usage", headers=headers, timeout=10)
    assert r.status_code == 200, r.text
    return r.json()


def limit_of(answer: dict, name: str) -> dict:
    (ns,) = [n for n in answer["namespaces"] if n["namespace"] == ROUTE]
    (found,) = [x for x in ns["limits"] if x["name"] == name]
    return found


# --- /usage and tokengateway top ---------------------------------------------------------


def test_usage_counts_the_tokens_of_each_answer_and_top_shows_them(start_gateway) -> None:
    gw = start_gateway(TUTORIAL)
    empty = usage(gw)
    assert [n["namespace"] for n in empty["namespaces"]] == [ROUTE]
    free = limit_of(empty, "free")
    assert free == {
        "kind": "TokenRateLimitPolicy",
        "policy": POLICY,
        "name": "free",
        "unit": "tokens",
        "rates": [{"limit": 50, "window": "1m", "seconds": 60.0}],
        "conditions": [
            'request.path == "/v1/chat/completions"',
            'auth.identity.groups.split(",").exists(g, g == "free")',
        ],
        "variables": ["auth.identity.userid"],
        "counters": [],
    }
    assert limit_of(empty, "gold")["rates"] == [{"limit": 200, "window": "1m", "seconds": 60.0}]

    free_used = tokens(sdk(gw, "iamafreeuser"))
    gold = sdk(gw, "iamagolduser")
    gold_used = tokens(gold, 20) + tokens(gold, 20)
    answer = usage(gw)
    (one,) = limit_of(answer, "free")["counters"]
    assert 0 < one.pop("reset_in_seconds") <= 60
    assert one == {
        "values": {"auth.identity.userid": "user-1"},
        "window": "1m",
        "seconds": 60.0,
        "value": free_used,
        "limit": 50,
        "remaining": max(0, 50 - free_used),
        "used": round(free_used / 50, 4),
    }
    (two,) = limit_of(answer, "gold")["counters"]
    assert (two["values"], two["value"], two["remaining"]) == (
        {"auth.identity.userid": "user-2"},
        gold_used,
        200 - gold_used,
    )
    assert two["used"] == round(gold_used / 200, 4)

    top = run_cli("top", "--once", "--admin", gw.admin_url)
    assert top.returncode == 0, top.stderr
    lines = top.stdout.splitlines()
    assert lines[0].startswith("tokengateway top") and "2 counters" in lines[0]
    (free_line,) = [x for x in lines if " user-1 " in x]
    (gold_line,) = [x for x in lines if " user-2 " in x]
    assert f"{free_used} / 50" in free_line and f" {max(0, 50 - free_used)} " in free_line
    assert f"{gold_used} / 200" in gold_line and f" {200 - gold_used} " in gold_line
    assert "free" in free_line and "gold" in gold_line  # the limit's name on its first row
    assert POLICY in top.stdout and "50 tokens / 1m" in top.stdout

    # the free user past the limit: marked, and first in its table
    client = sdk(gw, "iamafreeuser")
    with pytest.raises(openai.RateLimitError):  # spend until refused
        for _ in range(20):
            free_used += tokens(client, 30)
    top = run_cli("top", "--once", ROUTE, "--admin", gw.admin_url)
    (free_line,) = [x for x in top.stdout.splitlines() if " user-1 " in x]
    assert f"{free_used} / 50" in free_line and "OVER LIMIT" in free_line
    assert "1 over limit" in top.stdout.splitlines()[0]
    narrow = subprocess.run(
        [sys.executable, "-m", "tokengateway", "top", "--once", "--admin", gw.admin_url],
        capture_output=True,
        text=True,
        env=os.environ | {"COLUMNS": "80"},
        check=False,
    )
    assert narrow.returncode == 0 and max(len(x) for x in narrow.stdout.splitlines()) <= 80
    (free_line,) = [x for x in narrow.stdout.splitlines() if " user-1 " in x]
    assert f"{free_used} / 50" in free_line and "OVER" in free_line
    other = run_cli("top", "--once", "default/no-such-route", "--admin", gw.admin_url)
    assert other.returncode == 0 and "No limits on route default/no-such-route." in other.stdout


def test_admin_token_guards_usage_page_and_top(start_gateway) -> None:
    gw = start_gateway(TUTORIAL, args=("--admin-token", TOKEN))
    bearer = {"Authorization": f"Bearer {TOKEN}"}
    for path in ("/usage", f"/usage?token={TOKEN}", "/ui", "/ui?token=wrong"):
        r = httpx.get(gw.admin_url + path)
        assert r.status_code == 401, path
        assert "admin token" in r.json()["error"]["message"]
    assert "/ui?token=TOKEN" in httpx.get(gw.admin_url + "/ui").json()["error"]["message"]
    assert httpx.get(gw.admin_url + "/usage", headers=bearer).status_code == 200
    for page_request in (
        httpx.get(gw.admin_url + "/ui", params={"token": TOKEN}),
        httpx.get(gw.admin_url + "/ui", headers=bearer),
    ):
        assert page_request.status_code == 200
        assert page_request.headers["content-type"] == "text/html; charset=utf-8"
        assert "script-src 'nonce-" in page_request.headers["content-security-policy"]
        assert page_request.headers["referrer-policy"] == "no-referrer"
        assert "{{nonce}}" not in page_request.text and "<script nonce=" in page_request.text
    assert httpx.get(gw.admin_url + "/metrics").status_code == 401  # unchanged

    refused = run_cli("top", "--once", "--admin", gw.admin_url)
    assert refused.returncode == 1
    assert "Error from server (Unauthorized)" in refused.stderr and "--token" in refused.stderr
    allowed = run_cli("top", "--once", "--admin", gw.admin_url, "--token", TOKEN)
    assert allowed.returncode == 0 and "trlp-tutorial-token-limits" in allowed.stdout


def test_top_says_when_nothing_listens() -> None:
    result = run_cli("top", "--once", "--admin", "127.0.0.1:1")
    assert result.returncode == 1 and "cannot reach the gateway's admin API" in result.stderr


# --- the page in Chromium ------------------------------------------------------------------


def test_usage_page_follows_live_traffic(manifests, start_gateway, page, tmp_path) -> None:
    """Counters appear and change as users spend tokens, an exhausted user is marked over
    the limit, and a user id made of markup is shown as text."""
    from playwright.sync_api import expect

    gw = start_gateway(manifests(extra=MORE_USERS), args=("--admin-token", TOKEN))
    page.goto(f"{gw.admin_url}/ui?token={TOKEN}&interval=0.2")
    expect(page.locator("#status")).to_have_class("live")
    expect(page.locator('article.limit[data-limit="free"] .empty')).to_be_visible()

    free, gold = sdk(gw, "iamafreeuser"), sdk(gw, "iamagolduser")
    free_used = tokens(free)
    expect(row(page, "user-1")).to_have_attribute("data-value", str(free_used))
    time.sleep(0.4)  # here and below: steps in the history, for the screenshot
    gold_used = tokens(gold, 30)
    expect(row(page, "user-2")).to_have_attribute("data-value", str(gold_used))
    expect(row(page, "user-2").locator(".used")).to_have_text(f"{gold_used} / 200")
    for _ in range(3):  # more traffic: the numbers follow
        time.sleep(0.3)
        gold_used += tokens(gold, 30)
        expect(row(page, "user-2")).to_have_attribute("data-value", str(gold_used))
    expect(row(page, "user-2").locator(".remaining")).to_have_text(str(200 - gold_used))
    expect(row(page, "user-2")).to_have_attribute("data-state", "ok")

    # user-3 near the limit (80 % or more: a warning), user-1 over it
    third, third_used = sdk(gw, "another-free-key"), 0
    while third_used < 40:
        third_used += tokens(third, max(1, 45 - third_used - 8))
        time.sleep(0.4)
    with pytest.raises(openai.RateLimitError):  # spend until refused
        for _ in range(20):
            time.sleep(0.4)
            free_used += tokens(free, 20)
    over = row(page, "user-1")
    expect(over).to_have_attribute("data-value", str(free_used))
    expect(over).to_have_class("counter over")
    expect(over.locator(".state")).to_have_text("over limit")
    expect(over.locator(".used")).to_have_text(f"{free_used} / 50")
    state = "over" if third_used >= 50 else "warn"
    expect(row(page, "user-3")).to_have_attribute("data-state", state)
    # most used first
    values = page.locator('article.limit[data-limit="free"] tr.counter').evaluate_all(
        "rows => rows.map(r => Number(r.dataset.value) / Number(r.dataset.limit))"
    )
    assert values == sorted(values, reverse=True) and len(values) == 2
    expect(page.locator("#summary")).to_contain_text("3 counters")
    expect(page.locator(".sparkline polyline").first).to_be_attached()

    shot = README_SCREENSHOT if os.environ.get("UPDATE_SCREENSHOT") else tmp_path / "usage.png"
    shot.parent.mkdir(parents=True, exist_ok=True)
    page.set_viewport_size({"width": 1200, "height": 600})
    page.screenshot(path=str(shot), full_page=True)
    assert shot.read_bytes().startswith(b"\x89PNG") and shot.stat().st_size > 10_000

    # a user id that is markup is displayed as the text it is, and runs nothing
    markup = sdk(gw, "iamamarkupuser")
    markup_used = tokens(markup)
    shown = row(page, EVIL_ID)
    expect(shown).to_have_attribute("data-value", str(markup_used))
    assert shown.locator(".who .value").text_content() == EVIL_ID
    assert page.locator("#routes img, #routes script").count() == 0
    assert page.evaluate("typeof window.pwned") == "undefined"
    assert page.errors == []


def test_usage_page_escapes_everything_and_marks_levels(page) -> None:
    """A /usage answer made up for the page: markup in every field stays text, counters are
    sorted most used first, warn at 80 % and over at 100 %; a failing /usage is shown."""
    from playwright.sync_api import expect

    mark = '<img src=x onerror="window.pwned=1">'
    fake = {
        "namespaces": [
            {
                "namespace": f"ns/{mark}",
                "limits": [
                    {
                        "kind": f"Kind{mark}",
                        "policy": f"policies/{mark}",
                        "name": f"limit{mark}",
                        "unit": f"tokens{mark}",
                        "rates": [{"limit": 100, "window": f"1m{mark}", "seconds": 60.0}],
                        "conditions": [f"cond == '{mark}'"],
                        "variables": [f"var{mark}"],
                        "counters": [
                            counter({f"var{mark}": f"low{mark}"}, 10),
                            counter({f"var{mark}": f"over{mark}"}, 130),
                            counter({f"var{mark}": f"warn{mark}"}, 80),
                            counter({f"var{mark}": "full"}, 100),
                        ],
                    }
                ],
            }
        ]
    }
    answers = {"status": 200, "body": json.dumps(fake)}
    requests: list[dict] = []

    def serve(route) -> None:
        request = route.request
        if request.url.endswith("/ui?interval=200ms&token=t0k"):
            body, headers = ui.page()
            route.fulfill(
                status=200,
                body=body,
                headers={k.decode(): v.decode() for k, v in headers}
                | {"content-type": "text/html; charset=utf-8"},
            )
        elif "/usage" in request.url:
            requests.append(request.headers)
            route.fulfill(
                status=answers["status"],
                body=answers["body"],
                headers={"content-type": "application/json"},
            )
        else:
            route.fulfill(status=404, body="")

    page.route("http://gateway.test/**", serve)
    page.goto("http://gateway.test/ui?interval=200ms&token=t0k")
    expect(page.locator("tr.counter")).to_have_count(4)
    assert requests[0]["authorization"] == "Bearer t0k"
    names = page.locator("tr.counter .who .value").all_text_contents()
    assert names == [f"over{mark}", "full", f"warn{mark}", f"low{mark}"]
    states = page.locator("tr.counter").evaluate_all("rows => rows.map(r => r.className)")
    assert states == ["counter over", "counter over", "counter warn", "counter ok"]
    text = page.locator("#routes").inner_text()
    for shown in (f"ns/{mark}", f"Kind{mark}", f"policies/{mark}", f"limit{mark}", f"var{mark}"):
        assert shown in text
    assert f"1m{mark}" in text and f"cond == '{mark}'" in text
    assert page.locator("#routes img, #routes script").count() == 0
    assert page.evaluate("typeof window.pwned") == "undefined"
    expect(page.locator("#summary")).to_have_text("4 counters1 warning2 over limit")
    assert page.title() == "(2 over) usage · tokengateway"
    polled = len(requests)
    page.wait_for_timeout(700)
    assert len(requests) >= polled + 2  # ?interval=200ms
    assert page.errors == []  # the strict CSP lets the page's own script and style run

    answers.update(status=401, body=json.dumps({"error": {"message": f"no{mark}"}}))
    expect(page.locator("#status")).to_have_class("error")
    expect(page.locator("#status")).to_contain_text(f"HTTP 401: no{mark}")
    expect(page.locator("#routes")).to_have_class("stale")  # the last data, dimmed


def counter(values: dict, value: int, limit: int = 100) -> dict:
    return {
        "values": values,
        "window": "1m",
        "seconds": 60.0,
        "value": value,
        "limit": limit,
        "remaining": max(0, limit - value),
        "reset_in_seconds": 42.5,
        "used": value / limit,
    }
