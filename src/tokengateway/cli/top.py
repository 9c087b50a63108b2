"""`tokengateway top`: who uses what, live, in a terminal.

One table per route with limits, refreshed every second from the admin API's `GET /usage`
(the answer the usage page at `/ui` draws): each limit, each live counter (a user, say)
with its use against the limit as numbers and a bar, what remains and when its window
resets, most used first. `--once` prints one snapshot and exits.
"""

from __future__ import annotations

import os
import sys
import time
import unicodedata
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import click

from tokengateway.cli.kubectl import (
    AdminClient,
    AdminError,
    AdminUnreachableError,
    _admin_options,
    _fail,
    _server_error,
    format_window,
)

if TYPE_CHECKING:  # rich is imported when `top` runs: every other command starts faster
    from rich.console import Console, RenderableType
    from rich.table import Table
    from rich.text import Text

__all__ = ["WARN", "register", "render_usage", "top_command"]

WARN = 0.8  # a counter at 80 % of its limit is a warning; at 100 % it is over the limit
BAR_WIDTH = 20
_STYLES = {"ok": "green", "warn": "yellow", "over": "bold red"}
_LABELS = {"ok": "ok", "warn": "warning", "over": "OVER LIMIT"}
_SHORT_LABELS = {"ok": "ok", "warn": "WARN", "over": "OVER"}


def level(used: float) -> str:
    """`ok`, `warn` (from 80 %) or `over` (at or over the limit)."""
    return "over" if used >= 1 else "warn" if used >= WARN else "ok"


def fetch_usage(client: AdminClient) -> list[dict[str, Any]]:
    """`GET /usage`: its `namespaces`, or a clear error when the answer has another shape."""
    answer = client.request("GET", "/usage")
    namespaces = answer.get("namespaces") if isinstance(answer, dict) else None
    if not isinstance(namespaces, list):
        raise AdminUnreachableError(
            f"{client.base_url}/usage answered without a 'namespaces' list: is it the "
            "gateway's admin address (serve's --admin), and the gateway a recent one?"
        )
    return [ns for ns in namespaces if isinstance(ns, dict)]


def render_usage(
    namespaces: Sequence[Mapping[str, Any]], wide: bool = True
) -> list[RenderableType]:
    """One table per limits namespace (route): a row per live counter, most used first.
    Narrow (under 120 columns) leaves out the policy's name and shortens the columns so
    that a row fits in 80."""
    from rich import box
    from rich.table import Table
    from rich.text import Text

    tables: list[RenderableType] = []
    for ns in namespaces:
        table = Table(
            title=Text.assemble(("route ", "dim"), (_printable(ns.get("namespace")), "bold")),
            title_justify="left",
            box=box.SIMPLE_HEAD,
            show_edge=False,
            header_style="bold dim",
        )
        table.add_column("POLICY / LIMIT" if wide else "LIMIT", overflow="fold", min_width=16)
        table.add_column("COUNTER", overflow="fold", min_width=10 if wide else 8)
        table.add_column("USED / LIMIT" if wide else "USED", justify="right", no_wrap=True)
        table.add_column("", no_wrap=True)  # the bar and the percentage
        table.add_column("REMAINING" if wide else "LEFT", justify="right", no_wrap=True)
        table.add_column("RESET IN" if wide else "RESET", justify="right", no_wrap=True)
        table.add_column("STATUS", no_wrap=True)
        for limit in ns.get("limits") or []:
            _limit_rows(table, limit, wide)
        tables.append(table)
    return tables


def _limit_rows(table: Table, limit: Mapping[str, Any], wide: bool) -> None:
    from rich.text import Text

    rates = " · ".join(
        f"{r.get('limit')} {limit.get('unit', '')} / {r.get('window')}".replace("  ", " ")
        for r in limit.get("rates") or []
        if isinstance(r, dict)
    )
    name = Text(_printable(limit.get("name")), "bold")
    name.append(f"  {rates}" if wide else f"\n{rates}", "dim" if not wide else "")
    if wide:
        name.append("\n" + _printable(limit.get("policy")), "dim")
    counters = sorted(
        (c for c in limit.get("counters") or [] if isinstance(c, dict)),
        key=lambda c: (-_number(c.get("used")), -_number(c.get("value"))),
    )
    if not counters:
        table.add_row(name, Text("no traffic in this window", "dim"), end_section=True)
        return
    several_rates = len(limit.get("rates") or []) > 1
    for n, counter in enumerate(counters):
        used = _number(counter.get("used"))
        state = level(used)
        style = _STYLES[state]
        who = _who(counter.get("values"))
        if several_rates:
            who.append(f" per {_printable(counter.get('window'))}", "dim")
        bar = _bar(used, style, BAR_WIDTH if wide else 8)
        bar.append(f" {round(used * 100):>3}%", style if state != "ok" else "")
        table.add_row(
            name if n == 0 else "",
            who,
            Text(
                f"{counter.get('value')} / {counter.get('limit')}", style if state != "ok" else ""
            ),
            bar,
            str(counter.get("remaining", "")),
            _reset(counter.get("reset_in_seconds")),
            Text(_LABELS[state] if wide else _SHORT_LABELS[state], style),
            end_section=n == len(counters) - 1,
        )


def _who(values: Any) -> Text:
    from rich.text import Text

    if not isinstance(values, dict) or not values:
        return Text("(everyone)", "dim")
    if len(values) == 1:
        return Text(_printable(next(iter(values.values()))))
    return Text(", ".join(f"{_printable(k)}={_printable(v)}" for k, v in values.items()))


def _bar(used: float, style: str, width: int) -> Text:
    from rich.text import Text

    filled = round(min(max(used, 0.0), 1.0) * width)
    return Text.assemble(("█" * filled, style), ("░" * (width - filled), "dim"))


def _reset(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return ""
    return format_window(max(0, int(seconds + 0.999)))  # rounded up: never "0s" too early


def _number(value: Any) -> float:
    return float(value) if isinstance(value, int | float) else 0.0


def _printable(value: Any) -> str:
    """Values come from requests (user ids): control characters are shown, not sent to the
    terminal, and rich markup is never read from them (they go in as `Text`)."""
    text = "" if value is None else str(value)
    return "".join(_visible(ch) for ch in text)


def _visible(ch: str) -> str:
    if unicodedata.category(ch)[0] != "C":
        return ch
    return f"\\x{ord(ch):02x}" if ord(ch) < 0x100 else f"\\u{ord(ch):04x}"


def _header(source: str, namespaces: Sequence[Mapping[str, Any]], error: str | None) -> Text:
    from rich.text import Text

    counts = {"ok": 0, "warn": 0, "over": 0}
    for ns in namespaces:
        for limit in ns.get("limits") or []:
            for counter in limit.get("counters") or []:
                counts[level(_number(counter.get("used")))] += 1
    total = sum(counts.values())
    header = Text.assemble(
        ("tokengateway top", "bold"),
        f"  {source}  {time.strftime('%H:%M:%S')}  ",
        f"{total} counter{'s' if total != 1 else ''}, ",
        (f"{counts['warn']} warning", "yellow" if counts["warn"] else ""),
        ", ",
        (f"{counts['over']} over limit", "bold red" if counts["over"] else ""),
    )
    if error:
        header.append(f"\n{error}", "bold red")
    return header


def _view(
    source: str,
    namespaces: Sequence[Mapping[str, Any]],
    route: str | None,
    error: str | None,
    width: int,
) -> RenderableType:
    from rich.console import Group
    from rich.text import Text

    shown = [ns for ns in namespaces if route is None or ns.get("namespace") == route]
    parts: list[RenderableType] = [_header(source, shown, error), Text("")]
    parts += render_usage(shown, wide=width >= 120)
    if not shown and error is None:
        parts.append(
            Text(
                f"No limits on route {route}." if route else "No limits in force on any route.",
                "dim",
            )
        )
    return Group(*parts)


@click.command("top")
@click.argument("route", metavar="[NAMESPACE/ROUTE]", required=False)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.2),
    default=1.0,
    show_default=True,
    metavar="SECONDS",
    help="How often to refresh.",
)
@click.option("--once", is_flag=True, help="Print one snapshot and exit.")
@_admin_options
def top_command(
    route: str | None,
    interval: float,
    once: bool,
    admin: str,
    token: str | None,
    request_timeout: float,
) -> None:
    """Live usage: each limit's counters (users, say) against the limit, most used first,
    refreshed every second (Ctrl-C quits). The same data as the admin API's /ui page.
    NAMESPACE/ROUTE shows one route only, e.g. `default/trlp-tutorial-llm-sim`."""
    from rich.console import Console

    client = AdminClient(admin, token, request_timeout)
    console = Console(highlight=False)
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console.width = 160  # piped: wide rows, never folded mid-name
    if once:
        try:
            namespaces = fetch_usage(client)
        except AdminUnreachableError as exc:
            _fail(str(exc))
        except AdminError as exc:
            _server_error(exc)
            sys.exit(1)
        console.print(_view(client.base_url, namespaces, route, None, console.width))
        return
    _live(client, console, route, interval)


def _live(client: AdminClient, console: Console, route: str | None, interval: float) -> None:
    from rich.live import Live

    namespaces: list[dict[str, Any]] = []
    try:
        with Live(console=console, auto_refresh=False, vertical_overflow="visible") as live:
            while True:
                started = time.monotonic()
                error = None
                try:
                    namespaces = fetch_usage(client)
                except AdminUnreachableError as exc:
                    error = f"{exc} (retrying)"
                except AdminError as exc:
                    if exc.status in (401, 403, 404):  # waiting will not fix these
                        live.stop()
                        _server_error(exc)
                        sys.exit(1)
                    error = f"Error from server ({exc.reason}): {exc.message} (retrying)"
                view = _view(client.base_url, namespaces, route, error, console.width)
                live.update(view, refresh=True)
                time.sleep(max(0.0, interval - (time.monotonic() - started)))
    except KeyboardInterrupt:
        pass


def register(group: click.Group) -> None:
    """Add `top` to the `tokengateway` command group."""
    group.add_command(top_command)
