"""coordination.k8s.io kinds: the Lease replicas elect one status writer with.

The gateway stores a Lease and serves it back (get, create, update, watch): nothing in the
configuration reads one (`kinds.CONFIG_NEUTRAL`). The checks are the API server's
(`ValidateLeaseSpec`): a positive duration, no negative transitions, a preferred holder only
with a strategy.
"""

import re
from datetime import datetime
from typing import Annotated, Any, ClassVar

from pydantic import Field, ValidatorFunctionWrapHandler, model_validator
from pydantic_core import InitErrorDetails

from .common import K8sModel, ObjectMeta, check_each, issue, merge_issues, nonempty
from .resource import Resource

__all__ = ["Lease", "LeaseSpec", "MicroTime"]

_RFC3339_RE = re.compile(
    r"\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d{1,9})?(Z|[+-]\d{2}:\d{2})", re.IGNORECASE
)


def _micro_time_problem(value: str) -> str | None:
    if _RFC3339_RE.fullmatch(value):
        try:
            datetime.fromisoformat(value.upper())  # the date and time exist (no month 13)
            return None
        except ValueError:
            pass
    return f'"{value}" is not a time: use RFC 3339, e.g. 2026-12-04T13:00:00.123456Z'


#: metav1.MicroTime: an RFC 3339 time, as written (the API server writes microseconds, in UTC)
MicroTime = Annotated[str, check_each(_micro_time_problem)]


class LeaseSpec(K8sModel):
    """coordination.k8s.io/v1 LeaseSpec; every field optional, as in Kubernetes."""

    holderIdentity: str | None = None
    leaseDurationSeconds: Annotated[int, Field(gt=0)] | None = None
    acquireTime: MicroTime | None = None
    renewTime: MicroTime | None = None
    leaseTransitions: Annotated[int, Field(ge=0)] | None = None
    strategy: str | None = None
    preferredHolder: str | None = None

    @model_validator(mode="wrap")
    @classmethod
    def _rules(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        return merge_issues("spec", data, handler, _lease_spec_rules)


def _lease_spec_rules(data: dict[str, Any]) -> list[InitErrorDetails]:
    """What the API server checks across fields, reported with the fields' own problems."""
    if nonempty(data, "preferredHolder") and not nonempty(data, "strategy"):
        return [issue(("preferredHolder",), "may only be specified if `strategy` is defined")]
    return []


class Lease(Resource):
    """A Lease: who holds it, until when. No status (and no `/status` subresource)."""

    KIND: ClassVar[str] = "Lease"
    API_VERSIONS: ClassVar[tuple[str, ...]] = ("coordination.k8s.io/v1",)

    metadata: ObjectMeta
    spec: LeaseSpec = Field(default_factory=LeaseSpec)
