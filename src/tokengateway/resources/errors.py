"""Error types for the manifest layer.

Every problem is reported against the document it came from, so a user with twenty files can
jump straight to the line that needs fixing, and all problems come out in one go (like `kubectl
apply`, which reports every invalid field of an object at once).
"""

from dataclasses import dataclass

__all__ = ["ManifestError", "ManifestIssue"]


@dataclass(frozen=True, slots=True)
class ManifestIssue:
    """One problem in one document.

    `name` is `namespace/name` for namespaced objects, `name` for cluster-scoped ones and empty
    when the document has no usable name; `kind` and `field` may be empty too.
    """

    source: str
    kind: str
    name: str
    field: str
    reason: str

    def __str__(self) -> str:
        subject = " ".join(part for part in (self.kind, self.name) if part)
        head = f"{self.source} {subject}" if subject else self.source
        return f"{head}: {self.field}: {self.reason}" if self.field else f"{head}: {self.reason}"


class ManifestError(ValueError):
    """Manifests that cannot be loaded; `.errors` lists every problem found."""

    def __init__(self, errors: list[ManifestIssue]) -> None:
        self.errors = list(errors)
        super().__init__(self._render())

    def _render(self) -> str:
        if len(self.errors) == 1:
            return str(self.errors[0])
        lines = "\n".join(f"  {issue}" for issue in self.errors)
        return f"{len(self.errors)} problems in the manifests:\n{lines}"
