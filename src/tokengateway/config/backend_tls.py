"""BackendTLSPolicy: verified TLS from the gateway to the Services it targets (docs/backend-tls.md).

Once per configuration, each Service targeted by a policy gets an `UpstreamTLS`: a client
context that trusts the PEM authorities in `ca.crt` of the ConfigMaps or Secrets the policy
names (or the system's, `wellKnownCACertificates: System`), the policy's `hostname` sent in
SNI and checked against the certificate, or its `subjectAltNames` checked in its place.
Contexts are made once per PEM and reused by the next configuration while the PEM is the
same (the pools of the upstream client then stay warm); a changed PEM gets a new one, and
new connections, from the next request on.

A Service whose policy cannot be used (a reference that does not resolve, a PEM that does
not load, `wellKnownCACertificates` other than System) is not reached in clear: it gets an
`UpstreamTLS` that refuses every request (502 `upstream_tls_error`, naming the policy).

Status as Gateway API says: one ancestor per Gateway whose routes send to the Service (the
Service itself when none does), with `Accepted` (Accepted; Invalid, TargetNotFound,
Conflicted, NoValidCACertificate) and `ResolvedRefs` (ResolvedRefs; InvalidKind,
InvalidCACertificateRef). Of several policies on one Service, the oldest wins (then
namespace/name), the others are `Conflicted`.
"""

from __future__ import annotations

import ssl
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from tokengateway.config import status as st
from tokengateway.http.client import UpstreamTLS, client_context
from tokengateway.resources import (
    BackendTLSPolicy,
    ConfigMap,
    HTTPRoute,
    Resource,
    Secret,
    Service,
)

__all__ = ["CA_KEY", "BackendTLS", "TLSCache", "backend_tls"]

#: the key of the CA bundle in a ConfigMap or Secret, as Gateway API implementations read it
CA_KEY = "ca.crt"

#: (PEM or None for the system's, server name, names) -> the UpstreamTLS made for them
TLSCache = dict[tuple[str | None, str, tuple[tuple[str, str], ...]], UpstreamTLS]

_KIND = "BackendTLSPolicy"


@dataclass
class BackendTLS:
    """What the BackendTLSPolicies of one configuration decide."""

    #: "namespace/service" -> how to speak TLS to it
    by_service: dict[str, UpstreamTLS] = field(default_factory=dict)
    statuses: dict[tuple[str, str, str], st.AncestorStatus] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    #: reused by the next configuration while PEM and names are the same
    cache: TLSCache = field(default_factory=dict)


def _key(res: Resource) -> str:
    return f"{res.metadata.namespace}/{res.metadata.name}"


def _age(res: Resource) -> tuple[str, str]:
    return (str(res.metadata.creationTimestamp or ""), _key(res))


def _gateways_of(resources: Sequence[Resource]) -> dict[str, set[tuple[str, str]]]:
    """ "namespace/service" -> the (namespace, name) of Gateways whose routes send to it."""
    out: dict[str, set[tuple[str, str]]] = {}
    for route in resources:
        if not isinstance(route, HTTPRoute):
            continue
        parents = {
            (ref.namespace or str(route.metadata.namespace), ref.name)
            for ref in route.spec.parentRefs
            if ref.kind == "Gateway"
        }
        for rule in route.spec.rules:
            for ref in rule.backendRefs:
                if ref.kind == "Service" and ref.group in ("", "core"):
                    service = f"{ref.namespace or route.metadata.namespace}/{ref.name}"
                    out.setdefault(service, set()).update(parents)
    return out


def backend_tls(
    resources: Sequence[Resource], previous: TLSCache | None = None, when: str | None = None
) -> BackendTLS:
    """Every BackendTLSPolicy of `resources`: the TLS of each Service, and their status."""
    old = previous or {}
    out = BackendTLS()
    services = {_key(s): s for s in resources if isinstance(s, Service)}
    config_maps = {_key(c): c for c in resources if isinstance(c, ConfigMap)}
    secrets = {_key(s): s for s in resources if isinstance(s, Secret)}
    gateways = _gateways_of(resources)
    winners: dict[str, str] = {}  # service -> the policy in force on it
    policies = sorted((r for r in resources if isinstance(r, BackendTLSPolicy)), key=_age)
    for policy in policies:
        key, namespace = _key(policy), str(policy.metadata.namespace)
        accepted: tuple[str, str] | None = None  # (reason, message) when not accepted
        resolved: tuple[str, str] | None = None
        targets: list[str] = []
        for ref in policy.spec.targetRefs:
            if ref.group not in ("", "core") or ref.kind != "Service":
                accepted = ("Invalid", f"targetRef {ref.kind} {ref.name}: only Services")
                continue
            service = services.get(f"{namespace}/{ref.name}")
            if service is None:
                accepted = accepted or ("TargetNotFound", f"Service {ref.name} was not found")
                continue
            if ref.sectionName and not any(p.name == ref.sectionName for p in service.spec.ports):
                accepted = accepted or (
                    "TargetNotFound",
                    f"Service {ref.name} has no port named {ref.sectionName}",
                )
                continue
            targets.append(f"{namespace}/{ref.name}")
        validation = policy.spec.validation
        cadata: str | None = None
        if validation.wellKnownCACertificates not in (None, "System"):
            accepted = (
                "Invalid",
                f"wellKnownCACertificates {validation.wellKnownCACertificates} is not "
                "supported (only System)",
            )
        pems: list[str] = []
        problems: list[tuple[str, str]] = []
        for ca in validation.caCertificateRefs:
            pem, problem = _ca_pem(
                ca.group, ca.kind, f"{namespace}/{ca.name}", config_maps, secrets
            )
            if problem is not None:
                problems.append(problem)
            else:
                assert pem is not None
                pems.append(pem)
        if problems:
            kinds = [p for p in problems if p[0] == "InvalidKind"]
            resolved = (kinds or problems)[0][0], "; ".join(m for _, m in problems)
            if not pems and accepted is None:
                accepted = ("NoValidCACertificate", "no valid CA certificate: " + resolved[1])
        if validation.caCertificateRefs:
            cadata = "\n".join(pems)
        names = tuple(
            ("DNS", san.hostname or "") if san.type == "Hostname" else ("URI", san.uri or "")
            for san in validation.subjectAltNames
        )
        tls: UpstreamTLS | None = None
        refusal = None
        if problems or (accepted is not None and accepted[0] == "Invalid"):
            why = resolved[1] if resolved is not None else accepted[1] if accepted else ""
            refusal = f"BackendTLSPolicy {key} cannot be used ({why}); nothing is sent in clear"
        else:
            try:
                tls = _tls(cadata, validation.hostname, names, old, out.cache)
            except ssl.SSLError as exc:
                message = f"the CA certificates do not load: {exc.reason or exc}"
                resolved = ("InvalidCACertificateRef", message)
                accepted = accepted or ("NoValidCACertificate", message)
                refusal = (
                    f"BackendTLSPolicy {key} cannot be used ({message}); nothing is sent in clear"
                )
        conflicted = [t for t in targets if t in winners]
        if conflicted and accepted is None:
            accepted = (
                "Conflicted",
                f"Service {conflicted[0].split('/', 1)[1]} is already the target of "
                f"BackendTLSPolicy {winners[conflicted[0]]}, which is older",
            )
        for target in targets:
            if target in winners:
                continue
            winners[target] = key
            if refusal is not None:
                out.by_service[target] = UpstreamTLS(None, validation.hostname, refusal=refusal)
            elif tls is not None:
                out.by_service[target] = tls
        if accepted is not None or refusal is not None:
            shown = accepted[1] if accepted is not None else refusal
            out.warnings.append(f"BackendTLSPolicy {key}: {shown}")
        conditions = [
            ("Accepted", False, *accepted)
            if accepted is not None
            else ("Accepted", True, "Accepted", "Policy has been accepted"),
            ("ResolvedRefs", False, *resolved)
            if resolved is not None
            else ("ResolvedRefs", True, "ResolvedRefs", "All references resolved"),
        ]
        ancestors = _ancestors(policy, targets, gateways)
        out.statuses[(_KIND, namespace, policy.metadata.name)] = st.ancestor_status(
            ancestors, conditions, int(policy.metadata.generation or 1), when
        )
    return out


def _ancestors(
    policy: BackendTLSPolicy, targets: list[str], gateways: Mapping[str, set[tuple[str, str]]]
) -> list[dict[str, Any]]:
    """The Gateways whose routes reach the targets; the targeted Service itself when none
    does (so a policy no route uses still shows why)."""
    found = sorted({gw for t in targets for gw in gateways.get(t, ())})
    if found:
        return [
            {"group": "gateway.networking.k8s.io", "kind": "Gateway", "namespace": ns, "name": n}
            for ns, n in found
        ]
    ref = policy.spec.targetRefs[0]
    return [
        {
            "group": ref.group,
            "kind": ref.kind,
            "namespace": str(policy.metadata.namespace),
            "name": ref.name,
        }
    ]


def _ca_pem(
    group: str,
    kind: str,
    key: str,
    config_maps: Mapping[str, ConfigMap],
    secrets: Mapping[str, Secret],
) -> tuple[str | None, tuple[str, str] | None]:
    """The PEM in `ca.crt` of the ConfigMap or Secret `key`, or (None, (reason, message))."""
    name = key.split("/", 1)[1]
    if group not in ("", "core") or kind not in ("ConfigMap", "Secret"):
        return None, ("InvalidKind", f"caCertificateRef {kind} {name}: only ConfigMaps and Secrets")
    if kind == "ConfigMap":
        cm = config_maps.get(key)
        pem = cm.text(CA_KEY) if cm is not None else None
        found = cm is not None
    else:
        secret = secrets.get(key)
        pem = secret.decoded_data().get(CA_KEY) if secret is not None else None
        found = secret is not None
    if not found:
        return None, ("InvalidCACertificateRef", f"{kind} {name} was not found")
    if not pem or "-----BEGIN CERTIFICATE-----" not in pem:
        return None, (
            "InvalidCACertificateRef",
            f"{kind} {name} has no PEM certificate in {CA_KEY}",
        )
    return pem, None


def _tls(
    cadata: str | None,
    hostname: str,
    names: tuple[tuple[str, str], ...],
    old: TLSCache,
    new: TLSCache,
) -> UpstreamTLS:
    """The UpstreamTLS of these settings: the one made for them before, else a new one
    (SSLError when the PEM does not load)."""
    key = (cadata, hostname, names)
    found = new.get(key) or old.get(key)
    if found is None:
        # one context per PEM (and hostname check), shared by the policies that trust it
        context = next(
            (
                tls.context
                for cache in (new, old)
                for (pem, _, others), tls in cache.items()
                if pem == cadata and bool(others) == bool(names)
            ),
            None,
        ) or client_context(cadata, check_hostname=not names)
        found = UpstreamTLS(context, hostname, names)
    new[key] = found
    return found
