"""Where each Service a route names is reached.

In order: `serve --backend SERVICE=URL`; the Service annotation `tokengateway.io/backend-url`;
an `ExternalName` Service; a Deployment the Service selects whose image is
llm-d-inference-sim, for which the gateway runs its built-in simulator with the Deployment's
args on a free loopback port (a container port is private to its pod, so the manifest's port
is not used and two gateways on one machine never collide).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass

from tokengateway.http.client import Origin
from tokengateway.resources import Deployment, Resource, Service

__all__ = [
    "BACKEND_ANNOTATION",
    "SIMULATOR_IMAGE",
    "BackendError",
    "BackendPlan",
    "parse_backend_overrides",
    "plan_backends",
]

BACKEND_ANNOTATION = "tokengateway.io/backend-url"
SIMULATOR_IMAGE = "llm-d-inference-sim"


class BackendError(ValueError):
    """A Service that cannot be reached; the message says how to map it."""


@dataclass(frozen=True, slots=True)
class BackendPlan:
    service: str  # "namespace/name"
    url: str | None  # known address, or None when a simulator must be started
    sim_args: tuple[str, ...] = ()
    origin: str = ""  # how the address was found, for the start-up banner

    @property
    def needs_simulator(self) -> bool:
        return self.url is None


def check_url(url: str, where: str) -> str:
    """`url` without a final `/`, if requests can go to it: http or https, a host, maybe a
    port, a base path and credentials, and no query or fragment (`Origin` parses it)."""
    try:
        Origin(url)
    except ValueError as exc:
        raise BackendError(
            f"{where}: {url!r} is not an http:// or https:// URL with a host ({exc})"
        ) from None
    return url.rstrip("/")


def parse_backend_overrides(items: Iterable[str]) -> dict[str, str]:
    """`SERVICE=URL` strings (SERVICE as `name` or `namespace/name`) to a dict."""
    out: dict[str, str] = {}
    for item in items:
        service, sep, url = item.partition("=")
        if not sep or not service or not url:
            raise BackendError(
                f"--backend {item!r}: expected SERVICE=URL, e.g. my-llm=http://127.0.0.1:8000"
            )
        out[service] = check_url(url, f"--backend {service}")
    return out


def _selects(selector: Mapping[str, str], labels: Mapping[str, str]) -> bool:
    """A Service's selector: an empty one selects no pod (Kubernetes: no endpoints)."""
    return bool(selector) and all(labels.get(k) == v for k, v in selector.items())


def plan_backends(
    resources: Sequence[Resource],
    needed: Iterable[str],
    overrides: Mapping[str, str] | None = None,
    *,
    unknown_overrides: bool = False,
) -> dict[str, BackendPlan]:
    """Plan an address for each needed Service ("namespace/name"); all errors at once.

    An override naming no Service is an error (a typo in `--backend`), unless
    `unknown_overrides`: a gateway that follows an API server gets its Services later, and
    they may come and go."""
    overrides = dict(overrides or {})
    services = {
        f"{r.metadata.namespace}/{r.metadata.name}": r for r in resources if isinstance(r, Service)
    }
    deployments = [r for r in resources if isinstance(r, Deployment)]
    errors: list[str] = []
    for key in () if unknown_overrides else overrides:
        if key not in services and not any(s.split("/", 1)[1] == key for s in services):
            errors.append(f"--backend {key}: no Service named {key!r} in the manifests")
    plans: dict[str, BackendPlan] = {}
    for key in sorted(set(needed)):
        try:
            plans[key] = _plan(key, services.get(key), deployments, overrides)
        except BackendError as exc:
            errors.append(str(exc))
    if errors:
        raise BackendError("\n".join(errors))
    return plans


def _plan(
    key: str,
    service: Service | None,
    deployments: Sequence[Deployment],
    overrides: Mapping[str, str],
) -> BackendPlan:
    namespace, name = key.split("/", 1)
    url = overrides.get(key) or overrides.get(name)
    if url:
        return BackendPlan(key, url, origin="--backend")
    hint = (
        f"map it with `serve --backend {key}=http://HOST:PORT` or the Service annotation "
        f"{BACKEND_ANNOTATION}"
    )
    if service is None:
        raise BackendError(f"Service {key} is referenced by an HTTPRoute but not defined; {hint}")
    annotated = service.metadata.annotations.get(BACKEND_ANNOTATION)
    if annotated:
        return BackendPlan(
            key, check_url(annotated, f"Service {key} annotation"), origin="annotation"
        )
    spec = service.spec
    if spec.type == "ExternalName" and spec.externalName:
        port = spec.ports[0].port if spec.ports else 80
        scheme = "https" if port == 443 else "http"
        return BackendPlan(key, f"{scheme}://{spec.externalName}:{port}", origin="ExternalName")
    for dep in deployments:
        if dep.metadata.namespace != namespace:
            continue
        template = dep.spec.template
        if not _selects(spec.selector, template.metadata.labels):
            continue
        containers = template.spec.containers
        for container in containers:
            if SIMULATOR_IMAGE in container.image:
                return BackendPlan(
                    key,
                    None,
                    tuple(container.args),
                    origin=f"simulator for Deployment {namespace}/{dep.metadata.name}",
                )
        images = ", ".join(c.image for c in containers) or "no containers"
        raise BackendError(
            f"Service {key} selects Deployment {namespace}/{dep.metadata.name} ({images}), "
            f"which tokengateway cannot run (only {SIMULATOR_IMAGE} is built in); {hint}"
        )
    raise BackendError(f"Service {key} selects no Deployment and has no address; {hint}")
