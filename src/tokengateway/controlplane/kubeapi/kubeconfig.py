"""The kubeconfig that points kubectl at a gateway's admin API."""

from __future__ import annotations

import base64
from dataclasses import dataclass

import yaml

from tokengateway.http.target import is_loopback

__all__ = ["Credentials", "kubeconfig"]

NAME = "tokengateway"


@dataclass(frozen=True, slots=True)
class Credentials:
    """What a client needs for an admin API that serves TLS: the CA to trust (PEM) and the
    bearer token."""

    ca: bytes
    token: str


def kubeconfig(
    host: str, port: int, namespace: str = "default", credentials: Credentials | None = None
) -> str:
    """With `credentials`: https, the CA's data and the token. Without: plain http and no
    credentials, which only serves an admin API on loopback (kubectl never sends a bearer
    token over plain http, and the admin API beyond loopback serves only TLS)."""
    if credentials is None and not is_loopback(host):
        raise ValueError(
            f"the admin API at {host}:{port} is not on loopback, so it serves TLS and asks "
            "for a token: give the CA and the token"
        )
    scheme = "https" if credentials is not None else "http"
    server = f"{scheme}://[{host}]:{port}" if ":" in host else f"{scheme}://{host}:{port}"
    cluster: dict[str, str] = {"server": server}
    user: dict[str, str] = {}
    if credentials is not None:
        cluster["certificate-authority-data"] = base64.b64encode(credentials.ca).decode()
        user["token"] = credentials.token
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": NAME, "cluster": cluster}],
        "users": [{"name": NAME, "user": user}],
        "contexts": [
            {"name": NAME, "context": {"cluster": NAME, "user": NAME, "namespace": namespace}}
        ],
        "current-context": NAME,
        "preferences": {},
    }
    return yaml.safe_dump(config, sort_keys=False)
