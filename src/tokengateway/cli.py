"""Command line: serve · validate · sim · demo.

Async only on the serving path; commands call into it at their edge.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from pathlib import Path

import click

from tokengateway import __version__

TUTORIAL_DIR = Path(__file__).parent / "tutorial"
DEFAULT_LISTEN = "127.0.0.1:8080"


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tokengateway")
def main() -> None:
    """Token-based rate limits for OpenAI-compatible LLM servers, configured by Kuadrant's
    manifests (Gateway, HTTPRoute, AuthPolicy, TokenRateLimitPolicy, ...)."""


def _load(paths: Sequence[str], backends: Sequence[str]):  # type: ignore[no-untyped-def]
    from tokengateway.gateway.backends import parse_backend_overrides
    from tokengateway.gateway.server import load

    try:
        overrides = parse_backend_overrides(backends)
        return load(paths, overrides, stdin=sys.stdin)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
        raise AssertionError from exc  # unreachable


_files = click.option(
    "-f",
    "--filename",
    "paths",
    multiple=True,
    required=True,
    help="Manifest file or folder (repeatable); - reads standard input.",
)
_backend = click.option(
    "--backend",
    "backends",
    multiple=True,
    metavar="SERVICE=URL",
    help="Reach a Service (name or namespace/name) at URL instead of what the manifests say.",
)


@main.command()
@_files
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, help="HOST:PORT to serve on.")
@click.option("--storage", default="memory://", show_default=True, help="Counter store URI.")
@_backend
@click.option(
    "--access-log/--no-access-log",
    default=True,
    show_default=True,
    help="One JSON line per request on standard output.",
)
@click.option("--fd", type=int, default=None, hidden=True)
def serve(
    paths: tuple[str, ...],
    listen: str,
    storage: str,
    backends: tuple[str, ...],
    access_log: bool,
    fd: int | None,
) -> None:
    """Serve the gateway described by the manifests."""
    from tokengateway.gateway.config import ConfigError
    from tokengateway.gateway.server import parse_listen, run_gateway, started
    from tokengateway.storage import StorageURIError, open_store

    try:
        address = parse_listen(listen)
        open_store(storage)
    except (ValueError, StorageURIError) as exc:
        _fail(str(exc))
    loaded = _load(paths, backends)
    try:
        with started(loaded) as config:
            for warning in config.warnings:
                click.echo(f"warning: {warning}", err=True)

            def ready(host: str, port: int) -> None:
                click.echo(_banner(config, host, port), err=True)

            where = socket.socket(fileno=fd) if fd is not None else address
            run_gateway(config, where, storage, on_ready=ready, access_log=access_log)
    except ConfigError as exc:
        _fail(str(exc))
    except (RuntimeError, OSError) as exc:
        _fail(str(exc))


def _banner(config, host: str, port: int) -> str:  # type: ignore[no-untyped-def]
    lines = [f"tokengateway {__version__} listening on http://{host}:{port}"]
    seen = set()
    for match in config.router._matches:
        target = match.target
        key = (match.hostname, target.route, target.rule)
        if key in seen:
            continue
        seen.add(key)
        backends = ", ".join(b.url for b in target.backends)
        policies = [p for p in (target.auth_policy and f"AuthPolicy {target.auth_policy}",) if p]
        policies += list(target.limit_policies)
        lines.append(
            f"  {match.hostname or '*'}{match.path.value} -> HTTPRoute {target.route} -> {backends}"
            + (f"  [{'; '.join(policies)}]" if policies else "")
        )
    return "\n".join(lines)


@main.command()
@_files
@_backend
def validate(paths: tuple[str, ...], backends: tuple[str, ...]) -> None:
    """Check manifests the way `serve` would, without serving; exit 1 with the errors."""
    from tokengateway.gateway.config import ConfigError, compile_config

    loaded = _load(paths, backends)
    placeholder = {k: p.url or "http://127.0.0.1:1" for k, p in loaded.plans.items()}
    try:
        config = compile_config(loaded.resources, placeholder)
    except ConfigError as exc:
        _fail(str(exc))
    for warning in config.warnings:
        click.echo(f"warning: {warning}", err=True)
    kinds: dict[str, int] = {}
    for res in loaded.resources:
        kinds[res.kind] = kinds.get(res.kind, 0) + 1
    summary = ", ".join(f"{n} {k}" for k, n in sorted(kinds.items()))
    click.echo(f"valid: {summary}; {len(config.rules)} route rule(s)")


@main.command(
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
    add_help_option=False,
)
@click.option("--fd", type=int, default=None, hidden=True)
@click.pass_context
def sim(ctx: click.Context, fd: int | None) -> None:
    """Run the built-in OpenAI-compatible LLM simulator (llm-d-inference-sim's flags):

    tokengateway sim --model M [--port P] [--mode random|echo]
    [--time-to-first-token MS] [--inter-token-latency MS]
    """
    from tokengateway.simulator import parse_sim_args, run_simulator

    args = list(ctx.args)
    if "-h" in args or "--help" in args:
        click.echo(ctx.get_help())
        return
    try:
        opts, warnings = parse_sim_args(args)
    except ValueError as exc:
        _fail(str(exc))
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    if fd is None:
        click.echo(f"simulator serving {opts.model} on http://{opts.host}:{opts.port}", err=True)
    run_simulator(opts, fd=fd)


@main.command()
@click.option(
    "--listen", default="127.0.0.1:0", show_default=True, help="HOST:PORT for the gateway."
)
def demo(listen: str) -> None:
    """Replay the tutorial's Step 7 against a gateway started on the tutorial's manifests."""
    from tokengateway.demo import run_demo

    sys.exit(run_demo(str(TUTORIAL_DIR), listen))
