"""The Kubernetes API, enough of it for the real kubectl: discovery, objects with
Kubernetes metadata, tables, patches and `Status` errors, over the control plane."""

from .handler import KubeAPI, claims

__all__ = ["KubeAPI", "claims"]
