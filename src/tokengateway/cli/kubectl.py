"""`tokengateway apply`, `get`, `delete`, `counters`, `limits`: the gateway's own verbs,
for a machine without kubectl.

The gateway is its own API server, and the real kubectl is its client (`tokengateway
kubeconfig`). These commands are a thin convenience beside it: `apply` and `delete` send
manifests to the admin API and print one kubectl-style line per object; `get` prints the
Table the Kubernetes API serves (the same columns kubectl shows, chosen by the server) or
the objects as yaml/json. What kubectl does on its own (JSONPath, templates, custom
columns) is left to kubectl. `counters` and `limits` show the gateway's own listings.

Only the standard library speaks HTTP here: the CLI stays light and starts fast.
"""

from __future__ import annotations

import functools
import http.client
import json
import os
import re
import ssl
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, NoReturn

import click
import yaml

from tokengateway.controlplane.kubeapi.discovery import KINDS
from tokengateway.http.target import is_loopback
from tokengateway.resources import ManifestError, load_paths
from tokengateway.resources.kinds import CLUSTER_SCOPED, UnknownKindError, resolve_kind

__all__ = [
    "DEFAULT_ADMIN",
    "AdminClient",
    "AdminError",
    "AdminUnreachableError",
    "counters_table",
    "format_window",
    "group_of",
    "limits_table",
    "list_object",
    "plural_of",
    "reference",
    "register",
    "render_table",
    "to_json",
    "to_yaml",
]

DEFAULT_ADMIN = "http://127.0.0.1:9090"
ADMIN_ENV = "TOKENGATEWAY_ADMIN"
TOKEN_ENV = "TOKENGATEWAY_ADMIN_TOKEN"
#: the CA an https admin API's certificate is checked against (the system's when unset)
CA_ENV = "TOKENGATEWAY_ADMIN_CA"
DEFAULT_NAMESPACE = "default"
NONE = "<none>"

#: API group per kind, as kubectl prints it in `kind.group/name` ("" for the core group)
GROUPS: dict[str, str] = {
    "Gateway": "gateway.networking.k8s.io",
    "HTTPRoute": "gateway.networking.k8s.io",
    "AuthPolicy": "kuadrant.io",
    "RateLimitPolicy": "kuadrant.io",
    "TokenRateLimitPolicy": "kuadrant.io",
    "Kuadrant": "kuadrant.io",
    "Deployment": "apps",
    "Service": "",
    "Secret": "",
    "Namespace": "",
}
OUTPUT_FORMATS = ("json", "name", "wide", "yaml")
#: what `get` asks the Kubernetes API for: the Table kubectl prints
TABLE = "application/json;as=Table;v=v1;g=meta.k8s.io"

_HTTP_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "Conflict",
    413: "RequestEntityTooLarge",
    415: "UnsupportedMediaType",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


# --- the admin API client ------------------------------------------------------------------


class AdminError(Exception):
    """An error answer of the admin API (`{"error": {"message", "details"}}` with a 4xx/5xx)."""

    def __init__(self, status: int, message: str, details: Sequence[str] = ()) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.details = list(details)

    @property
    def reason(self) -> str:
        """kubectl's name for the status (`NotFound`, `BadRequest`, ...)."""
        return _HTTP_REASONS.get(self.status, str(self.status))


class AdminUnreachableError(Exception):
    """No usable answer: nothing listens there, a timeout, a bad `--admin` URL, or a server
    that does not speak the admin API."""


class AdminClient:
    """The admin API over urllib; every failure becomes `AdminError` or
    `AdminUnreachableError`, so commands never show a traceback."""

    def __init__(
        self, base_url: str = DEFAULT_ADMIN, token: str | None = None, timeout: float = 30
    ):
        self.base_url = normalize_admin_url(base_url)
        self.token = token or None
        self.timeout = timeout
        try:
            host = urllib.parse.urlsplit(self.base_url).hostname or ""
        except ValueError:
            host = ""  # reported by the first request, where the user sees it
        # a loopback admin API must not go through an HTTP proxy taken from the environment
        handlers: list[urllib.request.BaseHandler] = (
            [urllib.request.ProxyHandler({})] if is_loopback(host) else []
        )
        ca = os.environ.get(CA_ENV)
        if ca:  # an admin API serving TLS with the certificate the gateway made
            try:
                context = ssl.create_default_context(cafile=ca)
            except (OSError, ssl.SSLError) as exc:
                raise AdminUnreachableError(f"cannot read ${CA_ENV} {ca!r}: {exc}") from None
            handlers.append(urllib.request.HTTPSHandler(context=context))
        self._opener = urllib.request.build_opener(*handlers)

    def request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str | None] | None = None,
        body: bytes | None = None,
        content_type: str | None = None,
        accept: str = "application/json",
    ) -> Any:
        """Send one request; the decoded JSON answer."""
        url = self.base_url + path
        params = {k: v for k, v in (query or {}).items() if v is not None}
        if params:
            url += "?" + urllib.parse.urlencode(params)
        headers = {"Accept": accept, "User-Agent": "tokengateway-cli"}
        if content_type:
            headers["Content-Type"] = content_type
        if self.token:
            headers["Authorization"] = f"Bearer {self.token}"
        try:
            req = urllib.request.Request(url, data=body, headers=headers, method=method)
            with self._opener.open(req, timeout=self.timeout) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            raise _error_from(exc.code, _read_quietly(exc)) from None
        except urllib.error.URLError as exc:
            raise AdminUnreachableError(self._unreachable(exc.reason)) from None
        except (OSError, http.client.HTTPException) as exc:  # timeouts, resets, not HTTP
            raise AdminUnreachableError(self._unreachable(exc)) from None
        except ValueError as exc:  # urllib's word for a malformed URL
            raise AdminUnreachableError(f"invalid --admin URL {self.base_url!r}: {exc}") from None
        try:
            return json.loads(raw) if raw else None
        except ValueError:
            raise AdminUnreachableError(self._not_admin("something that is not JSON")) from None

    def _not_admin(self, what: str) -> str:
        return (
            f"{self.base_url} answered with {what}: is it the gateway's admin address "
            "(serve's --admin), not the address it serves requests on?"
        )

    def _field(self, answer: Any, key: str) -> list[dict[str, Any]]:
        """`answer[key]`, a list, or a clear error when the answer has another shape."""
        value = answer.get(key) if isinstance(answer, dict) else None
        if not isinstance(value, list):
            raise AdminUnreachableError(self._not_admin(f"no {key!r} list"))
        return [v for v in value if isinstance(v, dict)]

    def _rows(self, answer: Any) -> list[dict[str, Any]]:
        if not isinstance(answer, list):
            raise AdminUnreachableError(self._not_admin("something that is not a list"))
        return [v for v in answer if isinstance(v, dict)]

    def _unreachable(self, reason: object) -> str:
        if isinstance(reason, ConnectionRefusedError):
            return (
                f"cannot reach the gateway's admin API at {self.base_url} "
                "(is tokengateway serve running? --admin sets the address)"
            )
        if isinstance(reason, TimeoutError):
            return (
                f"the gateway's admin API at {self.base_url} did not answer within "
                f"{self.timeout:g}s (--request-timeout sets the limit)"
            )
        return f"cannot reach the gateway's admin API at {self.base_url}: {reason}"

    # the contract's endpoints

    def apply(self, manifests: str) -> list[dict[str, Any]]:
        """`POST /apis/apply`: the results (kind, namespace, name, action) in document order."""
        answer = self.request(
            "POST", "/apis/apply", body=manifests.encode(), content_type="application/yaml"
        )
        return self._field(answer, "results")

    def delete_manifests(self, manifests: str) -> list[dict[str, Any]]:
        """`POST /apis/delete`: all or nothing, a 404 when one is missing."""
        answer = self.request(
            "POST", "/apis/delete", body=manifests.encode(), content_type="application/yaml"
        )
        return self._field(answer, "results")

    def table(self, kind: str, namespace: str | None, name: str | None) -> dict[str, Any]:
        """The Kubernetes API's Table of `kind` (`namespace` None: every namespace), the one
        the real kubectl prints: the server chooses the columns, the CLI only lays them out.
        One named object is a Table of one row."""
        found = next(k for k in KINDS if k.kind == kind)
        path = f"/apis/{found.group}/{found.version}" if found.group else "/api/v1"
        if found.namespaced and namespace is not None:
            path += f"/namespaces/{urllib.parse.quote(namespace, safe='')}"
        path += f"/{found.plural}"
        if name is not None:
            path += f"/{urllib.parse.quote(name, safe='')}"
        answer = self.request("GET", path, accept=TABLE)
        if not isinstance(answer, dict) or answer.get("kind") != "Table":
            raise AdminUnreachableError(self._not_admin("no Table"))
        return answer

    def delete(self, kind: str, namespace: str | None, name: str) -> list[dict[str, Any]]:
        answer = self.request(
            "DELETE", "/apis/resources", query={"kind": kind, "namespace": namespace, "name": name}
        )
        return self._field(answer, "results")

    def limits(self, namespace: str) -> list[dict[str, Any]]:
        return self._rows(self.request("GET", "/limits/" + _path_segment(namespace)))

    def counters(self, namespace: str) -> list[dict[str, Any]]:
        return self._rows(self.request("GET", "/counters/" + _path_segment(namespace)))


def normalize_admin_url(url: str) -> str:
    """`127.0.0.1:9090` means `http://127.0.0.1:9090`; no trailing slash."""
    url = url.strip() or DEFAULT_ADMIN
    if "://" not in url:
        url = "http://" + url
    return url.rstrip("/")


def _path_segment(namespace: str) -> str:
    """A limits namespace (`default/my-route`) goes in the path as is: its slash stays."""
    return urllib.parse.quote(namespace, safe="/")


def _read_quietly(exc: urllib.error.HTTPError) -> bytes:
    try:
        return exc.read()
    except OSError:
        return b""


def _error_from(status: int, raw: bytes) -> AdminError:
    try:
        body = json.loads(raw)
    except ValueError:
        text = raw.decode("utf-8", "replace").strip()
        return AdminError(status, text[:500] or f"HTTP {status}")
    if isinstance(body, dict) and body.get("kind") == "Status":  # the Kubernetes API's
        causes = (body.get("details") or {}).get("causes") or []
        return AdminError(
            status,
            str(body.get("message") or f"HTTP {status}"),
            [str(c.get("message")) for c in causes if isinstance(c, dict)],
        )
    error = body.get("error") if isinstance(body, dict) else None
    if isinstance(error, dict):
        details = error.get("details") or []
        if not isinstance(details, list):
            details = [details]
        message = str(error.get("message") or f"HTTP {status}")
        if "type" in error and "details" not in error:  # OpenAI's envelope: the data plane
            message += " (this is the gateway's data plane answering: --admin names the admin API)"
        return AdminError(status, message, [str(d) for d in details])
    if isinstance(error, str):
        return AdminError(status, error)
    return AdminError(status, json.dumps(body)[:500])


# --- naming --------------------------------------------------------------------------------


def group_of(kind: str, api_version: str = "") -> str:
    """The API group kubectl shows for `kind` (`kuadrant.io`; `""` for core kinds)."""
    if kind in GROUPS:
        return GROUPS[kind]
    group, _, _ = api_version.rpartition("/")
    return group


def reference(kind: str, name: str, api_version: str = "") -> str:
    """`kind.group/name` as kubectl prints it (`tokenratelimitpolicy.kuadrant.io/x`,
    `secret/x`)."""
    return f"{_kind_group(kind, api_version)}/{name}"


def _kind_group(kind: str, api_version: str = "") -> str:
    group = group_of(kind, api_version)
    return f"{kind.lower()}.{group}" if group else kind.lower()


def plural_of(kind: str) -> str:
    """The resource name in kubectl's errors: `tokenratelimitpolicies.kuadrant.io`."""
    lower = kind.lower()
    consonant_y = lower.endswith("y") and lower[-2:-1] not in ("a", "e", "i", "o", "u")
    plural = lower[:-1] + "ies" if consonant_y else lower + "s"
    group = group_of(kind)
    return f"{plural}.{group}" if group else plural


def _resolve(text: str) -> str:
    """The kind for what the user typed; a group suffix must be the kind's own."""
    kind = resolve_kind(text)
    _, _, suffix = text.strip().lower().partition(".")
    group = group_of(kind)
    if suffix and not (suffix == group or (suffix.endswith("." + group) and group)):
        raise UnknownKindError(f"unknown kind {text!r}: {kind} is in group {group or 'core'!r}")
    return kind


# --- formatting ----------------------------------------------------------------------------


def render_table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """Columns as kubectl's tabwriter lays them out: left-aligned, three spaces apart."""
    table = [list(headers), *([str(c) for c in row] for row in rows)]
    widths = [max(len(row[i]) for row in table) for i in range(len(headers))]
    lines = []
    for row in table:
        cells = [cell.ljust(max(width + 3, 6)) for cell, width in zip(row, widths, strict=True)]
        cells[-1] = row[-1]
        lines.append("".join(cells).rstrip())
    return "\n".join(lines)


def format_window(seconds: float) -> str:
    """Seconds in the manifests' window syntax (`1m`, `1h30m`, `24h`, `500ms`)."""
    ms = round(float(seconds) * 1000)
    if ms <= 0:
        return "0s"
    hours, ms = divmod(ms, 3_600_000)
    minutes, ms = divmod(ms, 60_000)
    secs, ms = divmod(ms, 1000)
    parts = [(hours, "h"), (minutes, "m"), (secs, "s"), (ms, "ms")]
    return "".join(f"{value}{unit}" for value, unit in parts if value)


def _expires_in(seconds: Any) -> str:
    if not isinstance(seconds, int | float):
        return NONE
    if seconds < 1:
        return f"{max(0, round(seconds * 1000))}ms"
    return format_window(int(seconds))  # truncated, so "1m" is never 59.6 s


class _KubectlDumper(yaml.SafeDumper):
    """YAML as kubectl writes it: sorted keys, block style, multi-line strings as `|`, and
    double quotes where quotes are needed (`status: "True"`), so its output greps the same."""

    def choose_scalar_style(self) -> str:
        style = super().choose_scalar_style()
        return '"' if style == "'" else style


def _represent_str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_KubectlDumper.add_representer(str, _represent_str)


def to_yaml(obj: Any) -> str:
    """kubectl's `-o yaml` for one object or a List."""
    return yaml.dump(
        obj,
        Dumper=_KubectlDumper,
        sort_keys=True,
        default_flow_style=False,
        allow_unicode=True,
        width=1 << 20,
    )


def to_json(obj: Any) -> str:
    """kubectl's `-o json`: four-space indent, sorted keys."""
    return json.dumps(obj, indent=4, sort_keys=True, ensure_ascii=False) + "\n"


def list_object(items: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """What kubectl prints for several objects: a `v1` List."""
    return {
        "apiVersion": "v1",
        "items": list(items),
        "kind": "List",
        "metadata": {"resourceVersion": ""},
    }


def _meta(obj: Mapping[str, Any]) -> Mapping[str, Any]:
    meta = obj.get("metadata")
    return meta if isinstance(meta, dict) else {}


def _or_none(value: Any) -> str:
    return NONE if value is None or value == "" or value == [] else str(value)


def limits_table(limits: Sequence[Mapping[str, Any]]) -> str:
    """`GET /limits/{namespace}` as NAME, MAX, WINDOW, VARIABLES, CONDITIONS."""
    rows = [
        [
            _or_none(limit.get("name")),
            str(limit.get("max_value", "")),
            _window(limit.get("seconds")),
            ", ".join(map(str, limit.get("variables") or [])) or NONE,
            "; ".join(" ".join(str(c).split()) for c in limit.get("conditions") or []) or NONE,
        ]
        for limit in sorted(limits, key=lambda lim: (str(lim.get("name")), lim.get("seconds") or 0))
    ]
    return render_table(["NAME", "MAX", "WINDOW", "VARIABLES", "CONDITIONS"], rows)


def counters_table(counters: Sequence[Mapping[str, Any]]) -> str:
    """`GET /counters/{namespace}` as LIMIT, MAX, WINDOW, VARIABLES, REMAINING, EXPIRES IN."""
    rows = []
    for counter in counters:
        limit = counter.get("limit")
        if not isinstance(limit, dict):
            limit = {}
        values = counter.get("set_variables") or {}
        order = [str(v) for v in limit.get("variables") or []]
        order += sorted(str(k) for k in values if str(k) not in order)
        variables = ", ".join(f"{k}={values[k]}" for k in order if k in values) or NONE
        rows.append(
            [
                _or_none(limit.get("name")),
                str(limit.get("max_value", "")),
                _window(limit.get("seconds")),
                variables,
                str(counter.get("remaining", "")),
                _expires_in(counter.get("expires_in_seconds")),
            ]
        )
    rows.sort(key=lambda r: (r[0], r[2], r[3]))
    headers = ["LIMIT", "MAX", "WINDOW", "VARIABLES", "REMAINING", "EXPIRES IN"]
    return render_table(headers, rows)


def _window(seconds: Any) -> str:
    return format_window(seconds) if isinstance(seconds, int | float) else NONE


# --- command plumbing ----------------------------------------------------------------------


def _fail(message: str) -> NoReturn:
    click.echo(f"error: {message}", err=True)
    sys.exit(1)


def _server_error(exc: AdminError, sources: Sequence[str] = ()) -> None:
    """kubectl's `Error from server (Reason): message`, the details below it."""
    message = _map_sources(exc.message, sources)
    click.echo(f"Error from server ({exc.reason}): {message}", err=True)
    for detail in exc.details:
        detail = _map_sources(detail, sources)
        if detail not in message:
            click.echo(f"  {detail}", err=True)
    if exc.status == 401:
        click.echo(
            f"(the admin API wants a token: --token or {TOKEN_ENV} gives it)",
            err=True,
        )


_STDIN_DOC = re.compile(r"<stdin>#(\d+)")


def _map_sources(text: str, sources: Sequence[str]) -> str:
    """The server numbers the documents it received (`<stdin>#3`); name the user's file."""
    if not sources:
        return text

    def name(match: re.Match[str]) -> str:
        index = int(match.group(1)) - 1
        return sources[index] if 0 <= index < len(sources) else match.group(0)

    return _STDIN_DOC.sub(name, text)


def _admin_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """--admin, --token and --request-timeout, the same on every command."""
    func = click.option(
        "--request-timeout",
        "request_timeout",
        type=click.FloatRange(min=0, min_open=True),
        default=30.0,
        show_default=True,
        metavar="SECONDS",
        help="How long to wait for the admin API.",
    )(func)
    func = click.option(
        "--token",
        envvar=TOKEN_ENV,
        default=None,
        metavar="TOKEN",
        help=f"Bearer token for the admin API [env {TOKEN_ENV}].",
    )(func)
    func = click.option(
        "--admin",
        envvar=ADMIN_ENV,
        default=DEFAULT_ADMIN,
        show_default=True,
        metavar="URL",
        help=f"The gateway's admin API [env {ADMIN_ENV}].",
    )(func)
    return func


def _call(action: Callable[[], Any]) -> Any:
    """Run one API call; an unreachable server ends the command with its message."""
    try:
        return action()
    except AdminUnreachableError as exc:
        _fail(str(exc))


def _read_manifests(paths: Sequence[str], namespace: str | None) -> tuple[str, list[str]]:
    """The files as one multi-document YAML, and each document's `file#N` (for errors)."""
    try:
        docs = load_paths(list(paths), stdin=sys.stdin)
    except ManifestError as exc:
        _fail(str(exc))
    objects = []
    for doc in docs:
        obj = dict(doc.obj)
        if namespace and obj.get("kind") not in CLUSTER_SCOPED:
            meta = dict(obj.get("metadata") or {})
            given = meta.get("namespace")
            if given and given != namespace:
                _fail(
                    f'the namespace from the provided object "{given}" does not match the '
                    f'namespace "{namespace}" ({doc.source}); you must pass '
                    f"'--namespace={given}' to perform this operation"
                )
            meta["namespace"] = namespace
            obj["metadata"] = meta
        objects.append(obj)
    if not objects:
        _fail("no objects passed to the command (the files hold no documents)")
    text = yaml.safe_dump_all(objects, sort_keys=False, allow_unicode=True, width=1 << 20)
    return text, [doc.source for doc in docs]


def _result_line(result: Mapping[str, Any], deleted: bool = False) -> str:
    kind = str(result.get("kind", ""))
    name = str(result.get("name", ""))
    api_version = str(result.get("apiVersion", ""))
    action = str(result.get("action", "deleted" if deleted else ""))
    if deleted:
        return f'{_kind_group(kind, api_version)} "{name}" {action}'
    return f"{reference(kind, name, api_version)} {action}"


def _is_not_found(exc: AdminError) -> bool:
    """The object is missing (not a 404 from something that is not the admin API)."""
    return exc.status == 404 and "not found" in exc.message


def _not_found_line(kind: str, name: str) -> str:
    return f'Error from server (NotFound): {plural_of(kind)} "{name}" not found'


@dataclass(frozen=True)
class _Target:
    kind: str
    name: str | None


def _targets(args: Sequence[str], verb: str) -> list[_Target]:
    """`KIND[,KIND...] [NAME...]` or `KIND/NAME...`, the forms kubectl accepts."""
    if not args:
        _fail(
            f"you must specify the type of resource to {verb} "
            "(for example: tokengateway get trlp -n gateway-system)"
        )
    try:
        if "/" in args[0]:
            targets = []
            for arg in args:
                kind, sep, name = arg.partition("/")
                if not sep or not name or "/" in name:
                    _fail(f"arguments in resource/name form must all be KIND/NAME (got {arg!r})")
                targets.append(_Target(_resolve(kind), name))
            return targets
        kinds = list(dict.fromkeys(_resolve(k) for k in args[0].split(",") if k.strip()))
    except UnknownKindError as exc:
        _fail(str(exc))
    if not kinds:
        _fail(f"no kind given in {args[0]!r}")
    names = args[1:]
    for name in names:
        if "/" in name:
            _fail(f"a resource name may not contain '/': {name!r}")
    return [_Target(kind, name) for kind in kinds for name in (names or (None,))]


def _namespace_for(kind: str, namespace: str | None) -> str | None:
    return None if kind in CLUSTER_SCOPED else (namespace or DEFAULT_NAMESPACE)


def _parse_output(value: str | None) -> str:
    """`-o` as kubectl takes it: `yaml`, `-o=yaml`. JSONPath and templates are kubectl's:
    the real one is a client of the same API (`tokengateway kubeconfig`)."""
    text = (value or "").lstrip("=")
    if not text:
        return "table"
    fmt = text.partition("=")[0]
    if fmt in ("jsonpath", "go-template", "custom-columns", "template"):
        _fail(
            f"-o {fmt} is kubectl's: run kubectl against the gateway "
            "(tokengateway kubeconfig > kubeconfig.yaml; KUBECONFIG=kubeconfig.yaml kubectl ...)"
        )
    if fmt in OUTPUT_FORMATS and "=" not in text:
        return fmt
    _fail(
        f'unable to match a printer suitable for the output format "{text}", '
        f"allowed formats are: {','.join(OUTPUT_FORMATS)}"
    )


# --- commands ------------------------------------------------------------------------------

_filename_help = "Manifest file or folder (repeatable); - reads standard input."


@click.command("apply")
@click.option("-f", "--filename", "paths", multiple=True, required=True, help=_filename_help)
@click.option(
    "-n", "--namespace", default=None, help="Namespace for documents that do not name one."
)
@_admin_options
def apply_command(
    paths: tuple[str, ...],
    namespace: str | None,
    admin: str,
    token: str | None,
    request_timeout: float,
) -> None:
    """Create or update resources in the running gateway (like `kubectl apply -f`).

    All documents are validated by the gateway first; if one is invalid nothing changes.
    """
    text, sources = _read_manifests(paths, namespace)
    client = AdminClient(admin, token, request_timeout)
    try:
        results = _call(lambda: client.apply(text))
    except AdminError as exc:
        _server_error(exc, sources)
        sys.exit(1)
    for result in results:
        click.echo(_result_line(result))


@click.command("get")
@click.argument("args", nargs=-1, metavar="KIND [NAME...] | KIND/NAME...")
@click.option("-n", "--namespace", default=None, help="Namespace (default: default).")
@click.option(
    "-A", "--all-namespaces", is_flag=True, help="List across all namespaces (not with a NAME)."
)
@click.option(
    "-o",
    "--output",
    default=None,
    metavar="FORMAT",
    help="yaml | json | wide | name (JSONPath and templates: use kubectl).",
)
@_admin_options
def get_command(
    args: tuple[str, ...],
    namespace: str | None,
    all_namespaces: bool,
    output: str | None,
    admin: str,
    token: str | None,
    request_timeout: float,
) -> None:
    """Show resources and their status (like `kubectl get`).

    KIND takes kubectl's names: trlp, rlp, authpolicy, gtw, httproute, svc, secret, ns,
    plurals, and kind.group (tokenratelimitpolicy.kuadrant.io).
    """
    fmt = _parse_output(output)
    targets = _targets(args, "get")
    named = [t for t in targets if t.name is not None]
    if named and all_namespaces:
        _fail("a resource cannot be retrieved by name across all namespaces")
    client = AdminClient(admin, token, request_timeout)
    tables: list[tuple[str, dict[str, Any]]] = []
    failed = False
    for target in targets:
        ns = None if all_namespaces else _namespace_for(target.kind, namespace)
        try:
            tables.append(
                (target.kind, _call(functools.partial(client.table, target.kind, ns, target.name)))
            )
        except AdminError as exc:
            failed = True
            if _is_not_found(exc) and target.name is not None:
                click.echo(_not_found_line(target.kind, target.name), err=True)
            else:
                _server_error(exc)
    single = len(targets) == 1 and targets[0].name is not None
    _print_tables(tables, fmt, single, targets, namespace, all_namespaces)
    if failed:
        sys.exit(1)


def _print_tables(
    tables: Sequence[tuple[str, dict[str, Any]]],
    fmt: str,
    single: bool,
    targets: Sequence[_Target],
    namespace: str | None,
    all_namespaces: bool,
) -> None:
    """The server's Tables as kubectl lays them out (NAMESPACE first with `-A`, the
    columns of priority above 0 only with `-o wide`), or their rows' objects."""
    found = [(kind, row) for kind, table in tables for row in table.get("rows") or []]
    objects = [row.get("object") or {} for _, row in found]
    if fmt in ("yaml", "json"):
        if single and not objects:
            return  # the not-found error is all kubectl prints
        data: Any = objects[0] if single else list_object(objects)
        click.echo(to_yaml(data) if fmt == "yaml" else to_json(data), nl=False)
        return
    if fmt == "name":
        for (kind, _), obj in zip(found, objects, strict=True):
            click.echo(reference(kind, _name(obj), str(obj.get("apiVersion", ""))))
        return
    if not found:
        if all(t.name is None for t in targets):
            kind = targets[0].kind
            where = (
                ""
                if all_namespaces or kind in CLUSTER_SCOPED
                else f" in {namespace or DEFAULT_NAMESPACE} namespace"
            )
            click.echo(f"No resources found{where}.", err=True)
        return
    several = len({kind for kind, table in tables if table.get("rows")}) > 1
    out = []
    for kind, table in tables:
        if table.get("rows"):
            out.append(_layout(kind, table, all_namespaces, fmt == "wide", several))
    click.echo("\n\n".join(out))


def _layout(
    kind: str, table: Mapping[str, Any], all_namespaces: bool, wide: bool, with_kind: bool
) -> str:
    columns = [
        (i, str(c.get("name", "")).upper())
        for i, c in enumerate(table.get("columnDefinitions") or [])
        if wide or not c.get("priority")
    ]
    show_namespace = all_namespaces and kind not in CLUSTER_SCOPED
    headers = (["NAMESPACE"] if show_namespace else []) + [name for _, name in columns]
    rows = []
    for row in table.get("rows") or []:
        cells = list(row.get("cells") or [])
        obj = row.get("object") or {}
        shown = [_or_none(cells[i] if i < len(cells) else None) for i, _ in columns]
        if with_kind and shown:
            shown[0] = reference(kind, shown[0], str(obj.get("apiVersion", "")))
        rows.append(([_or_none(_meta(obj).get("namespace"))] if show_namespace else []) + shown)
    return render_table(headers, rows)


def _name(obj: Mapping[str, Any]) -> str:
    return str(_meta(obj).get("name", ""))


@click.command("delete")
@click.argument("args", nargs=-1, metavar="KIND NAME... | KIND/NAME...")
@click.option("-f", "--filename", "paths", multiple=True, help=_filename_help)
@click.option("-n", "--namespace", default=None, help="Namespace (default: default).")
@click.option(
    "--ignore-not-found", is_flag=True, help="Treat what does not exist as already deleted."
)
@_admin_options
def delete_command(
    args: tuple[str, ...],
    paths: tuple[str, ...],
    namespace: str | None,
    ignore_not_found: bool,
    admin: str,
    token: str | None,
    request_timeout: float,
) -> None:
    """Delete resources from the running gateway (like `kubectl delete`).

    With -f, every document must exist or nothing is deleted (unless --ignore-not-found).
    """
    client = AdminClient(admin, token, request_timeout)
    if paths:
        if args:
            _fail("when files are given with -f, you may not specify resource arguments as well")
        _delete_files(client, paths, namespace, ignore_not_found)
        return
    targets = _targets(args, "delete")
    if any(t.name is None for t in targets):
        _fail("resource(s) were provided, but no name was specified")
    failed = False
    for target in targets:
        assert target.name is not None
        ns = _namespace_for(target.kind, namespace)
        try:
            results = _call(functools.partial(client.delete, target.kind, ns, target.name))
        except AdminError as exc:
            if _is_not_found(exc):
                if not ignore_not_found:
                    failed = True
                    click.echo(_not_found_line(target.kind, target.name), err=True)
            else:
                failed = True
                _server_error(exc)
            continue
        for result in results or [{"kind": target.kind, "name": target.name}]:
            click.echo(_result_line(result, deleted=True))
    if failed:
        sys.exit(1)


def _delete_files(
    client: AdminClient, paths: Sequence[str], namespace: str | None, ignore_not_found: bool
) -> None:
    text, sources = _read_manifests(paths, namespace)
    try:
        results = _call(lambda: client.delete_manifests(text))
    except AdminError as exc:
        if not _is_not_found(exc) or not ignore_not_found:
            _server_error(exc, sources)
            sys.exit(1)
        results = _delete_one_by_one(client, text)
    for result in results:
        click.echo(_result_line(result, deleted=True))


def _delete_one_by_one(client: AdminClient, text: str) -> list[dict[str, Any]]:
    """--ignore-not-found with -f: delete what exists, skip what does not."""
    results: list[dict[str, Any]] = []
    for obj in yaml.safe_load_all(text):
        kind = str(obj.get("kind", ""))
        meta = obj.get("metadata") or {}
        ns = _namespace_for(kind, meta.get("namespace"))
        try:
            results += _call(functools.partial(client.delete, kind, ns, str(meta.get("name"))))
        except AdminError as exc:
            if not _is_not_found(exc):
                _server_error(exc)
                sys.exit(1)
    return results


def _inspection_output(value: str | None) -> str:
    fmt = (value or "").lstrip("=") or "table"
    if fmt not in ("table", "json", "yaml"):
        _fail(f'unknown output format "{fmt}": use json or yaml, or leave -o out for a table')
    return fmt


_inspection_output_option = click.option(
    "-o", "--output", default=None, metavar="FORMAT", help="json | yaml (default: a table)."
)


def _inspect(what: str, namespace: str, output: str | None, client: AdminClient) -> None:
    """`counters` and `limits`: fetch one Limitador-style listing and print it."""
    fmt = _inspection_output(output)
    fetch = client.counters if what == "counters" else client.limits
    try:
        found = _call(lambda: fetch(namespace))
    except AdminError as exc:
        _server_error(exc)
        sys.exit(1)
    table = counters_table if what == "counters" else limits_table
    _print_inspection(found, fmt, table, f"No {what} in {namespace}.")


@click.command("counters")
@click.argument("namespace", metavar="NAMESPACE")
@_inspection_output_option
@_admin_options
def counters_command(
    namespace: str, output: str | None, admin: str, token: str | None, request_timeout: float
) -> None:
    """Live counters of a limits namespace: a route's NAMESPACE/NAME (like Limitador's
    /counters), e.g. `tokengateway counters default/trlp-tutorial-llm-sim`."""
    _inspect("counters", namespace, output, AdminClient(admin, token, request_timeout))


@click.command("limits")
@click.argument("namespace", metavar="NAMESPACE")
@_inspection_output_option
@_admin_options
def limits_command(
    namespace: str, output: str | None, admin: str, token: str | None, request_timeout: float
) -> None:
    """Limits in force for a limits namespace: a route's NAMESPACE/NAME (like Limitador's
    /limits), e.g. `tokengateway limits default/trlp-tutorial-llm-sim`."""
    _inspect("limits", namespace, output, AdminClient(admin, token, request_timeout))


def _print_inspection(
    rows: list[dict[str, Any]],
    fmt: str,
    table: Callable[[Sequence[Mapping[str, Any]]], str],
    empty: str,
) -> None:
    if fmt == "json":
        click.echo(to_json(rows), nl=False)
    elif fmt == "yaml":
        click.echo(to_yaml(rows), nl=False)
    elif not rows:
        click.echo(empty, err=True)
    else:
        click.echo(table(rows))


COMMANDS: tuple[click.Command, ...] = (
    apply_command,
    get_command,
    delete_command,
    counters_command,
    limits_command,
)


def register(group: click.Group) -> None:
    """Add apply, get, delete, counters and limits to the `tokengateway` command group."""
    for command in COMMANDS:
        group.add_command(command)
