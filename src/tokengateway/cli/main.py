"""Command line: serve · validate · sim · demo.

Async only on the serving path; commands call into it at their edge.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from tokengateway import __version__
from tokengateway.cli.kubectl import register as register_resource_commands
from tokengateway.cli.top import register as register_top_command
from tokengateway.http.target import is_loopback

if TYPE_CHECKING:  # imported lazily at run time: the commands start faster
    from tokengateway.config.compile import CompiledConfig
    from tokengateway.limits import OnError
    from tokengateway.runtime.serve import LoadedConfig

TUTORIAL_DIR = Path(__file__).parent.parent / "tutorial"
DEFAULT_LISTEN = "127.0.0.1:8080"
DEFAULT_ADMIN = "127.0.0.1:9090"


def _fail(message: str) -> None:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="tokengateway")
def main() -> None:
    """Token-based rate limits for OpenAI-compatible LLM servers, configured by Kuadrant's
    manifests (Gateway, HTTPRoute, AuthPolicy, TokenRateLimitPolicy, ...)."""


def _load(paths: Sequence[str], backends: Sequence[str]) -> LoadedConfig:
    from tokengateway.config.backends import parse_backend_overrides
    from tokengateway.runtime.serve import load

    try:
        overrides = parse_backend_overrides(backends)
        return load(paths, overrides, stdin=sys.stdin)
    except (ValueError, OSError) as exc:
        _fail(str(exc))
        raise AssertionError from exc  # unreachable


class _Size(click.ParamType):
    """A number of bytes: 1048576, 512KiB, 8MiB, 1GiB (also K, M, G: binary)."""

    name = "size"
    _UNITS = {"": 1, "k": 1024, "m": 1024**2, "g": 1024**3}

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> int:
        if isinstance(value, int):
            return value
        text = str(value).strip().lower().removesuffix("ib").removesuffix("b")
        number, unit = text.rstrip("kmg"), text[len(text.rstrip("kmg")) :]
        if not number.isdigit() or unit not in self._UNITS or int(number) < 1:
            self.fail(f"{value!r}: expected a number of bytes, e.g. 1048576 or 8MiB", param, ctx)
        return int(number) * self._UNITS[unit]


_SIZE = _Size()

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


def _with_flush_period(storage: str, seconds: float) -> str:
    """The storage URI carrying `--flush-period` as its `flush_period` option: the URI is
    what reaches every worker process, so the period travels with it."""
    from tokengateway.storage import CACHED_REDIS_SCHEMES, hide_password

    scheme = storage.partition("://")[0].lower()
    if scheme not in CACHED_REDIS_SCHEMES:
        _fail(
            f"--flush-period applies to a cached Redis store (redis+cached://...), not "
            f"{hide_password(storage)}"
        )
    if "flush_period=" in storage[storage.rfind("@") + 1 :]:
        _fail("--flush-period and the URI's ?flush_period= both set the period; give one")
    rest = storage[storage.rfind("@") + 1 :]
    joiner = "&" if "?" in rest else "?"
    return f"{storage}{joiner}flush_period={seconds:g}"


@main.command()
@click.option(
    "-f",
    "--filename",
    "paths",
    multiple=True,
    help="Manifest file or folder (repeatable; watched for changes); - reads standard input.",
)
@click.option("--listen", default=DEFAULT_LISTEN, show_default=True, help="HOST:PORT to serve on.")
@click.option(
    "--listen-https",
    default=None,
    help="HOST:PORT serving every HTTPS listener of the Gateways over TLS, the certificate "
    "chosen by SNI (docs/tls.md) [default: HTTPS listeners are not served].",
)
@click.option("--listen-https-fd", type=int, default=None, hidden=True)
@click.option(
    "--admin",
    default=DEFAULT_ADMIN,
    show_default=True,
    help="HOST:PORT of the admin API (apply, get, delete, counters).",
)
@click.option(
    "--admin-token",
    envvar="TOKENGATEWAY_ADMIN_TOKEN",
    default=None,
    help="Bearer token the admin API requires when it serves TLS [default: made and kept "
    "in the state dir].",
)
@click.option(
    "--admin-tls",
    is_flag=True,
    default=False,
    help="Serve the admin API over HTTPS with a token also on loopback (always so elsewhere).",
)
@click.option(
    "--admin-cert",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="PEM certificate (chain) of the admin API [default: one made for its address].",
)
@click.option(
    "--admin-key",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="PEM private key of --admin-cert.",
)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Where resources applied through the admin API are kept across restarts "
    "[default: the user's data dir, per admin address].",
)
@click.option(
    "--storage",
    default="memory://",
    show_default=True,
    help="Counter store URI: memory://, sqlite:///path.db (survives restarts), "
    "redis://host:port/db, rediss://, redis+cluster://host:port,..., and each Redis form "
    "cached per process (redis+cached://...).",
)
@click.option(
    "--flush-period",
    type=click.FloatRange(min=0, max=3600, min_open=True),
    default=None,
    metavar="SECONDS",
    help="With --storage redis+cached://...: how often each process sends its counts to "
    "Redis and reads the others' [default: 1, or the URI's ?flush_period=].",
)
@click.option(
    "--on-storage-error",
    type=click.Choice(["allow", "deny"]),
    default="allow",
    show_default=True,
    help="When the counter store fails: let requests through and replay their reports "
    "later (allow), or answer 503 (deny).",
)
@_backend
@click.option(
    "--access-log/--no-access-log",
    default=True,
    show_default=True,
    help="One JSON line per request on standard output.",
)
@click.option(
    "--workers",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Processes serving --listen and --listen-https (use several CPU cores); more "
    "than 1 needs --storage redis://... so that they share the counters.",
)
@click.option(
    "--header-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=10.0,
    show_default=True,
    metavar="SECONDS",
    help="Time a client has to send a request's line and headers; then 408 and close.",
)
@click.option(
    "--body-timeout",
    type=click.FloatRange(min=0, min_open=True),
    default=30.0,
    show_default=True,
    metavar="SECONDS",
    help="Time a client may send nothing of a request body (408 and close), or read "
    "nothing of its answer (connection cut).",
)
@click.option(
    "--max-connections",
    type=click.IntRange(min=1),
    default=10_000,
    show_default=True,
    help="Open connections per process and address; more are answered 503 and closed.",
)
@click.option(
    "--max-body-size",
    type=_SIZE,
    default="8MiB",
    show_default=True,
    metavar="BYTES",
    help="Largest request body (413 beyond); suffixes KiB, MiB, GiB.",
)
@click.option(
    "--max-header-size",
    type=_SIZE,
    default="32KiB",
    show_default=True,
    metavar="BYTES",
    help="Largest request line and headers together (431 beyond).",
)
@click.option(
    "--upstream-max-connections",
    type=click.IntRange(min=1),
    default=1024,
    show_default=True,
    help="Open connections per backend (scheme, host, port) and process; a request that "
    "finds them all busy waits for one within the connect timeout, else 503.",
)
@click.option(
    "--upstream-keepalive",
    type=click.FloatRange(min=0),
    default=4.0,
    show_default=True,
    metavar="SECONDS",
    help="Time an idle upstream connection is kept; keep it below the upstream's own "
    "(uvicorn and vLLM: 5 s).",
)
@click.option(
    "--upstream-max-response-bytes",
    type=_SIZE,
    default="64MiB",
    show_default=True,
    metavar="BYTES",
    help="Largest non-streamed answer the gateway reads from a backend (502 beyond); "
    "streams are relayed, not capped.",
)
@click.option(
    "--max-reservation-fraction",
    type=click.FloatRange(min=0, max=1, min_open=True),
    default=0.5,
    show_default=True,
    help="Largest hold of one reservation, as a fraction of each counter's limit "
    "(Limitador's --max-reservation-fraction).",
)
@click.option(
    "--max-reservation-ttl",
    type=click.FloatRange(min=0, min_open=True),
    default=60.0,
    show_default=True,
    metavar="SECONDS",
    help="Longest a reservation holds tokens (Limitador's --max-reservation-ttl).",
)
@click.option(
    "--kubeconfig",
    default=None,
    metavar="PATH|in-cluster",
    help="Take the resources from this Kubernetes API (a cluster, or another gateway's "
    "admin API) instead of -f files: list, watch, follow (docs/cluster.md).",
)
@click.option(
    "--gateway-class",
    default=None,
    metavar="NAME",
    help="Serve only Gateways of this GatewayClass and what attaches to them; others are "
    "left alone [default: every Gateway].",
)
@click.option(
    "--lease-namespace",
    default=None,
    help="Namespace of the Lease that elects the one replica writing status [default: the "
    "pod's namespace in a cluster, else the kubeconfig context's].",
)
@click.option(
    "--lease-duration",
    type=click.FloatRange(min=1),
    default=15.0,
    show_default=True,
    metavar="SECONDS",
    help="How long the status writer's Lease lasts without renewal before another "
    "replica takes over.",
)
@click.option("--fd", type=int, default=None, hidden=True)
@click.option("--admin-fd", type=int, default=None, hidden=True)
def serve(
    paths: tuple[str, ...],
    listen: str,
    listen_https: str | None,
    listen_https_fd: int | None,
    admin: str,
    admin_token: str | None,
    admin_tls: bool,
    admin_cert: Path | None,
    admin_key: Path | None,
    state_dir: Path | None,
    storage: str,
    flush_period: float | None,
    on_storage_error: OnError,  # click.Choice: allow or deny
    backends: tuple[str, ...],
    access_log: bool,
    workers: int,
    header_timeout: float,
    body_timeout: float,
    max_connections: int,
    max_body_size: int,
    max_header_size: int,
    upstream_max_connections: int,
    upstream_keepalive: float,
    upstream_max_response_bytes: int,
    max_reservation_fraction: float,
    max_reservation_ttl: float,
    kubeconfig: str | None,
    gateway_class: str | None,
    lease_namespace: str | None,
    lease_duration: float,
    fd: int | None,
    admin_fd: int | None,
) -> None:
    """Serve the gateway described by the manifests (and by what `apply` adds later)."""
    from tokengateway.config.backends import parse_backend_overrides
    from tokengateway.config.compile import ConfigError
    from tokengateway.controlplane.follower.follow import FollowOptions
    from tokengateway.http.client import UpstreamLimits
    from tokengateway.http.server import ConnectionLimits
    from tokengateway.runtime.serve import ServeOptions, parse_listen, serve_gateway
    from tokengateway.storage import StorageURIError, open_store

    if kubeconfig is not None and paths:
        _fail("--kubeconfig and -f both say where the resources come from; give one")
    if flush_period is not None:
        storage = _with_flush_period(storage, flush_period)
    try:
        address = parse_listen(listen)
        admin_address = parse_listen(admin)
        https_address = parse_listen(listen_https, "--listen-https") if listen_https else None
        open_store(storage)
        overrides = parse_backend_overrides(backends)
    except (ValueError, StorageURIError) as exc:
        _fail(str(exc))
    if workers > 1:
        from tokengateway.runtime.workers import storage_problem

        problem = storage_problem(storage, workers)
        if problem is not None:
            _fail(problem)
    admin_sock = socket.socket(fileno=admin_fd) if admin_fd is not None else None
    admin_host = admin_sock.getsockname()[0] if admin_sock is not None else admin_address[0]
    state = state_dir or _default_state_dir(admin_address)
    tls = None
    if admin_tls or admin_cert is not None or not is_loopback(admin_host):
        from tokengateway.http.tls import CertificateError
        from tokengateway.runtime.admin_tls import admin_tls as make_admin_tls

        try:
            tls = make_admin_tls(state, admin_host, admin_token, admin_cert, admin_key)
        except (CertificateError, ValueError, OSError) as exc:
            _fail(str(exc))
        else:
            admin_token = tls.token
    options = ServeOptions(
        paths=list(paths),
        listen=socket.socket(fileno=fd) if fd is not None else address,
        admin=admin_sock if admin_sock is not None else admin_address,
        listen_https=socket.socket(fileno=listen_https_fd)
        if listen_https_fd is not None
        else https_address,
        storage=storage,
        overrides=overrides,
        admin_token=admin_token,
        admin_tls=tls.context if tls is not None else None,
        state_dir=state,
        access_log=access_log,
        on_storage_error=on_storage_error,
        workers=workers,
        max_body_size=max_body_size,
        reservation_clamps=(max_reservation_fraction, max_reservation_ttl),
        connections=ConnectionLimits(
            header_timeout=header_timeout,
            body_timeout=body_timeout,
            max_connections=max_connections,
            max_header_bytes=max_header_size,
        ),
        upstream=UpstreamLimits(
            max_connections=upstream_max_connections,
            keepalive=upstream_keepalive,
            max_response_bytes=upstream_max_response_bytes,
        ),
        gateway_class=gateway_class,
        follow=FollowOptions(
            kubeconfig,
            lease_namespace=lease_namespace or "",
            lease_seconds=lease_duration,
        )
        if kubeconfig is not None
        else None,
    )

    def ready(config: CompiledConfig, where: tuple[str, int], admin_where: tuple[str, int]) -> None:
        for warning in config.warnings:
            click.echo(f"warning: {warning}", err=True)
        click.echo(_banner(config, *where), err=True)
        if workers > 1:
            from tokengateway.storage import hide_password

            click.echo(
                f"{workers} worker processes on this address, counters in {hide_password(storage)}",
                err=True,
            )
        if config.https_listeners and (listen_https or listen_https_fd is not None):
            served = len(config.certificates)
            click.echo(
                f"HTTPS listeners on {listen_https or 'the given socket'} "
                f"({served} certificate(s) chosen by SNI)",
                err=True,
            )
        scheme = "https" if tls is not None else "http"
        click.echo(f"admin API on {scheme}://{admin_where[0]}:{admin_where[1]}", err=True)

    try:
        serve_gateway(options, stdin=sys.stdin, on_ready=ready)
    except ConfigError as exc:
        _fail(str(exc))
    except (ValueError, RuntimeError, OSError) as exc:
        _fail(str(exc))


def _default_state_dir(admin: tuple[str, int]) -> Path:
    base = os.environ.get("XDG_DATA_HOME") or os.path.join(
        os.path.expanduser("~"), ".local", "share"
    )
    return Path(base) / "tokengateway" / f"{admin[0]}_{admin[1]}"


def _banner(config: CompiledConfig, host: str, port: int) -> str:
    lines = [f"tokengateway {__version__} listening on http://{host}:{port}"]
    seen = set()
    for match in config.router._matches:
        target = match.target
        key = (match.hostname, target.route, target.rule)
        if key in seen:
            continue
        seen.add(key)
        backends = ", ".join(
            b.url + (f" (verified TLS, {b.tls.server_name})" if b.tls is not None else "")
            for b in target.backends
        )
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
    from tokengateway.config.compile import ConfigError, compile_config

    loaded = _load(paths, backends)
    placeholder = {k: p.url or "http://127.0.0.1:1" for k, p in loaded.plans.items()}
    try:
        config = compile_config(loaded.resources, placeholder, strict=True)
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
    [--time-to-first-token MS] [--inter-token-latency MS] [--fault DIRECTIVE]

    Faults for tests (also per request with the x-sim-fault header): drop-usage,
    zero-usage, cut-after=N, stall-after=N:MS, non-json, status=CODE.
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
    from tokengateway.cli.demo import run_demo

    sys.exit(run_demo(str(TUTORIAL_DIR), listen))


@main.command()
@click.option(
    "--admin",
    envvar="TOKENGATEWAY_ADMIN",
    default=DEFAULT_ADMIN,
    show_default=True,
    help="HOST:PORT (or http://HOST:PORT) of the gateway's admin API.",
)
@click.option("-n", "--namespace", default="default", show_default=True)
@click.option(
    "--state-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="The gateway's state dir, where it keeps the admin API's certificate and token "
    "[default: as serve's, per admin address].",
)
@click.option(
    "--token",
    envvar="TOKENGATEWAY_ADMIN_TOKEN",
    default=None,
    help="The admin token [default: the one the gateway keeps in its state dir].",
)
@click.option(
    "--ca-file",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    default=None,
    help="The CA that signed --admin-cert [default: the certificate the gateway made].",
)
@click.option("--tls", is_flag=True, default=False, help="The admin API serves HTTPS.")
def kubeconfig(
    admin: str,
    namespace: str,
    state_dir: Path | None,
    token: str | None,
    ca_file: Path | None,
    tls: bool,
) -> None:
    """Print a kubeconfig that points kubectl at the admin API:
    `tokengateway kubeconfig > ~/.kube/tokengateway.yaml; export KUBECONFIG=...`.

    On loopback: plain http, no credentials. Beyond loopback, or when the gateway made a
    certificate for its admin API (serve --admin-tls): https, with the CA and the token."""
    from tokengateway.controlplane.kubeapi.kubeconfig import Credentials
    from tokengateway.controlplane.kubeapi.kubeconfig import kubeconfig as build
    from tokengateway.runtime.admin_tls import kept_ca, kept_token
    from tokengateway.runtime.serve import parse_listen

    try:
        host, port = parse_listen(
            admin.removeprefix("http://").removeprefix("https://").rstrip("/")
        )
        state = state_dir or _default_state_dir((host, port))
        ca = ca_file.read_bytes() if ca_file is not None else kept_ca(state)
        credentials = None
        if tls or ca is not None or admin.startswith("https://") or not is_loopback(host):
            secret = token or kept_token(state)
            if ca is None or secret is None:
                raise ValueError(
                    f"the admin API at {host}:{port} serves TLS: give --ca-file and --token, "
                    "or --state-dir of the gateway that keeps them"
                )
            credentials = Credentials(ca, secret)
        click.echo(build(host, port, namespace, credentials), nl=False)
    except ValueError as exc:
        _fail(str(exc))


register_resource_commands(main)
register_top_command(main)
