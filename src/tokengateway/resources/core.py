"""Kubernetes built-in kinds the gateway reads: Namespace, Service, Deployment, Secret,
ConfigMap.

Only the fields the gateway uses are modelled; anything else in the document is ignored here
and kept in `raw`. The checks are the ones the API server would make on those fields.
"""

import base64
import binascii
import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BeforeValidator, Field, PrivateAttr, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .common import (
    CUSTOM_ERROR,
    ClusterObjectMeta,
    K8sModel,
    LabelSelector,
    NonEmptyStr,
    ObjectMeta,
    ServiceObjectMeta,
    check_each,
    issue,
    name_problem,
    raise_issues,
    unique,
)
from .resource import Resource

__all__ = [
    "ConfigMap",
    "Container",
    "ContainerPort",
    "Deployment",
    "DeploymentSpec",
    "EnvVar",
    "Namespace",
    "PodSpec",
    "PodTemplateMeta",
    "PodTemplateSpec",
    "Secret",
    "Service",
    "ServicePort",
    "ServiceSpec",
]

Port = Annotated[int, Field(ge=1, le=65535)]
Protocol = Literal["TCP", "UDP", "SCTP"]


def _label_problem(value: str) -> str | None:
    return name_problem(value, "label")


DNSLabel = Annotated[str, check_each(_label_problem)]


class Namespace(Resource):
    """A namespace; its labels matter for Gateway `allowedRoutes.namespaces.selector`."""

    KIND: ClassVar[str] = "Namespace"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("v1",)

    metadata: ClusterObjectMeta
    spec: dict[str, Any] | None = None
    status: dict[str, Any] | None = None


# --- Service ------------------------------------------------------------------------------------

_IANA_SVC_NAME_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?")


def _target_port_problem(value: int | str) -> str | None:
    if isinstance(value, int):
        return None if 1 <= value <= 65535 else f"{value} is not a port number (1-65535)"
    if (
        len(value) > 15
        or not _IANA_SVC_NAME_RE.fullmatch(value)
        or "--" in value
        or not re.search("[a-z]", value)
    ):
        return (
            f'"{value}" is neither a port number nor a port name (at most 15 lower-case '
            "letters, digits and '-', with a letter, no '--', not starting or ending with '-')"
        )
    return None


def _int_or_str(value: Any) -> Any:
    if isinstance(value, bool) or not isinstance(value, int | str):
        raise PydanticCustomError(
            CUSTOM_ERROR, "{reason}", {"reason": "must be a port number or a port name"}
        )
    return value


class ServicePort(K8sModel):
    """One port of a Service; `targetPort` defaults to `port` as in Kubernetes."""

    name: DNSLabel | None = None
    port: Port
    targetPort: (
        Annotated[int | str, BeforeValidator(_int_or_str), check_each(_target_port_problem)] | None
    ) = None
    protocol: Protocol = "TCP"
    nodePort: Port | None = None
    appProtocol: str | None = None

    @model_validator(mode="after")
    def _default_target(self) -> "ServicePort":
        if self.targetPort is None:
            self.targetPort = self.port
        return self


class ServiceSpec(K8sModel):
    """Service spec; the gateway resolves backendRefs through `selector` and `ports`."""

    selector: dict[str, str] = Field(default_factory=dict)
    ports: list[ServicePort] = Field(default_factory=list)
    type: Literal["ClusterIP", "NodePort", "LoadBalancer", "ExternalName"] = "ClusterIP"
    externalName: str | None = None
    clusterIP: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "ServiceSpec":
        problems = []
        if self.type == "ExternalName":
            if not self.externalName:
                problems.append(issue(("externalName",), "required when type is ExternalName"))
            elif (p := name_problem(self.externalName.rstrip("."), "subdomain")) is not None:
                problems.append(issue(("externalName",), p))
        elif not self.ports and self.clusterIP != "None":
            problems.append(issue(("ports",), "required (at least one port)"))
        if len(self.ports) > 1:
            for i, port in enumerate(self.ports):
                if not port.name:
                    problems.append(
                        issue(("ports", i, "name"), "required when the Service has several ports")
                    )
        for name in unique(p.name for p in self.ports if p.name):
            problems.append(issue(("ports",), f'duplicate port name "{name}"'))
        for port, proto in unique((p.port, p.protocol) for p in self.ports):
            problems.append(issue(("ports",), f"duplicate port {port}/{proto}"))
        raise_issues("ServiceSpec", problems)
        return self


class Service(Resource):
    """A Service: names a backend of an HTTPRoute (port + selected Deployment)."""

    KIND: ClassVar[str] = "Service"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("v1",)

    metadata: ServiceObjectMeta
    spec: ServiceSpec
    status: dict[str, Any] | None = None


# --- Deployment ---------------------------------------------------------------------------------


class EnvVar(K8sModel):
    """An environment variable; `valueFrom` is kept as written (the gateway cannot resolve it)."""

    name: NonEmptyStr
    value: str | None = None
    valueFrom: dict[str, Any] | None = None


class ContainerPort(K8sModel):
    """A port a container listens on."""

    containerPort: Port
    name: str | None = None
    protocol: Protocol = "TCP"
    hostPort: Port | None = None


class Container(K8sModel):
    """A container; the simulator reads `image` and `args` to mimic the tutorial's LLM."""

    name: DNSLabel
    image: NonEmptyStr
    args: list[str] = Field(default_factory=list)
    command: list[str] = Field(default_factory=list)
    env: list[EnvVar] = Field(default_factory=list)
    ports: list[ContainerPort] = Field(default_factory=list)


class PodSpec(K8sModel):
    """The pod part of a template."""

    containers: list[Container] = Field(min_length=1)

    @field_validator("containers")
    @classmethod
    def _unique_names(cls, containers: list[Container]) -> list[Container]:
        raise_issues(
            "containers",
            [
                issue((), f'duplicate container name "{n}"')
                for n in unique(c.name for c in containers)
            ],
        )
        return containers


class PodTemplateMeta(K8sModel):
    """Template metadata: only labels and annotations matter (no name, no namespace)."""

    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class PodTemplateSpec(K8sModel):
    """The pod template of a Deployment."""

    metadata: PodTemplateMeta = Field(default_factory=PodTemplateMeta)
    spec: PodSpec


class DeploymentSpec(K8sModel):
    """apps/v1 DeploymentSpec: the selector is required and must select the template."""

    replicas: Annotated[int, Field(ge=0)] = 1
    selector: LabelSelector
    template: PodTemplateSpec

    @model_validator(mode="after")
    def _selector_matches_template(self) -> "DeploymentSpec":
        if not self.selector.matchLabels and not self.selector.matchExpressions:
            raise_issues("DeploymentSpec", [issue(("selector",), "empty selector is invalid")])
        if not self.selector.matches(self.template.metadata.labels):
            raise_issues(
                "DeploymentSpec",
                [
                    issue(
                        ("template", "metadata", "labels"),
                        "`selector` does not match template `labels`",
                    )
                ],
            )
        return self


class Deployment(Resource):
    """A Deployment: tells the gateway which image (e.g. the LLM simulator) backs a Service."""

    KIND: ClassVar[str] = "Deployment"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("apps/v1",)

    metadata: ObjectMeta
    spec: DeploymentSpec
    status: dict[str, Any] | None = None


# --- Secret -------------------------------------------------------------------------------------

_SECRET_KEY_RE = re.compile(r"[-._a-zA-Z0-9]+")


def _secret_key_problem(key: str) -> str | None:
    if len(key) > 253 or not _SECRET_KEY_RE.fullmatch(key) or key in (".", ".."):
        return f'"{key}" is not a valid key: use letters, digits, "-", "_" or "." (at most 253)'
    return None


def _base64_problem(value: str) -> str | None:
    # Never echo the value: it is a secret.
    try:
        base64.b64decode(value.replace("\r", "").replace("\n", ""), validate=True)
    except (binascii.Error, ValueError) as exc:
        return f"is not valid base64 ({exc})"
    return None


SecretKey = Annotated[str, check_each(_secret_key_problem)]
Base64Value = Annotated[str, check_each(_base64_problem)]


class Secret(Resource):
    """A Secret; API keys for AuthPolicy `apiKey` live here (`api_key`)."""

    KIND: ClassVar[str] = "Secret"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("v1",)

    data: dict[SecretKey, Base64Value] = Field(default_factory=dict)
    stringData: dict[SecretKey, str] = Field(default_factory=dict)
    type: str = "Opaque"
    immutable: bool | None = None

    _decoded: dict[str, str] = PrivateAttr(default_factory=dict)

    @model_validator(mode="after")
    def _decode(self) -> "Secret":
        decoded = {
            k: base64.b64decode(v.replace("\r", "").replace("\n", "")).decode(
                "utf-8", errors="replace"
            )
            for k, v in self.data.items()
        }
        decoded.update(self.stringData)  # stringData wins, as the API server merges it
        self._decoded = decoded
        return self

    def decoded_data(self) -> dict[str, str]:
        """`data` base64-decoded (UTF-8) merged with `stringData`, which wins on conflicts."""
        return dict(self._decoded)


# --- ConfigMap ----------------------------------------------------------------------------------


class ConfigMap(Resource):
    """A ConfigMap; a BackendTLSPolicy reads the CA bundle in its `ca.crt`."""

    KIND: ClassVar[str] = "ConfigMap"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("v1",)

    data: dict[SecretKey, str] = Field(default_factory=dict)
    binaryData: dict[SecretKey, Base64Value] = Field(default_factory=dict)
    immutable: bool | None = None

    @model_validator(mode="after")
    def _distinct_keys(self) -> "ConfigMap":
        raise_issues(
            "ConfigMap",
            [
                issue(("binaryData", key), f'"{key}" is also in data: a key is in one of them')
                for key in sorted(set(self.data) & set(self.binaryData))
            ],
        )
        return self

    def text(self, key: str) -> str | None:
        """The value of `key`, from `data` or (base64-decoded, as UTF-8) `binaryData`."""
        if key in self.data:
            return self.data[key]
        raw = self.binaryData.get(key)
        if raw is None:
            return None
        return base64.b64decode(raw.replace("\r", "").replace("\n", "")).decode(
            "utf-8", errors="replace"
        )
