"""The base of every model: apiVersion, kind, metadata, and where the document came from."""

from typing import Any, ClassVar

from pydantic import Field, field_validator, model_validator
from pydantic_core import PydanticCustomError

from .common import CUSTOM_ERROR, K8sModel, ObjectMeta

__all__ = ["Resource", "api_version_problem"]


class Resource(K8sModel):
    """A validated Kubernetes object.

    `source` is the document it came from (`file#N`) and `raw` the document exactly as
    written (for `get -o yaml` and for fields we do not model); neither is read from the
    manifest itself.
    """

    KIND: ClassVar[str] = ""
    API_VERSIONS: ClassVar[tuple[str, ...]] = ()
    """Versions accepted; the first is the one to suggest."""

    apiVersion: str
    kind: str
    metadata: ObjectMeta
    source: str = Field(default="", exclude=True, repr=False)
    raw: dict[str, Any] = Field(default_factory=dict, exclude=True, repr=False)

    @model_validator(mode="before")
    @classmethod
    def _prepare(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {k: v for k, v in data.items() if k not in ("source", "raw")}
            if data.get("metadata") is None:
                data["metadata"] = {}  # so a missing name is reported as metadata.name
        return data

    @field_validator("kind")
    @classmethod
    def _right_kind(cls, value: str) -> str:
        if cls.KIND and value != cls.KIND:
            raise PydanticCustomError(
                CUSTOM_ERROR, "{reason}", {"reason": f'expected "{cls.KIND}", got "{value}"'}
            )
        return value

    @field_validator("apiVersion")
    @classmethod
    def _served_version(cls, value: str) -> str:
        if (problem := api_version_problem(cls, value)) is not None:
            raise PydanticCustomError(CUSTOM_ERROR, "{reason}", {"reason": problem})
        return value

    @classmethod
    def namespaced(cls) -> bool:
        """Whether objects of this kind live in a namespace."""
        meta = cls.model_fields["metadata"].annotation
        return bool(getattr(meta, "NAMESPACED", True))

    @property
    def key(self) -> tuple[str, str, str]:
        """(kind, namespace, name); namespace is "" for cluster-scoped kinds."""
        return (self.kind, self.metadata.namespace or "", self.metadata.name)


def api_version_problem(cls: type[Resource], api_version: str) -> str | None:
    """Why `api_version` is not served for `cls`'s kind, or None if it is."""
    if api_version in cls.API_VERSIONS:
        return None
    wanted = " or ".join(cls.API_VERSIONS)
    group = cls.API_VERSIONS[0].rpartition("/")[0]
    given_group = api_version.rpartition("/")[0]
    if group and given_group == group:
        return (
            f'"{api_version}" is not served for {cls.KIND}: current versions serve only {wanted} '
            "(older versions were removed and their fields differ)"
        )
    return f'"{api_version}" is not an apiVersion of {cls.KIND}: use {wanted}'
