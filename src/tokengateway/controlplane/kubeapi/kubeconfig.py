"""The kubeconfig that points kubectl at a gateway's admin API."""

from __future__ import annotations

import yaml

from tokengateway.http.target import is_loopback

__all__ = ["kubeconfig"]

NAME = "tokengateway"


def kubeconfig(host: str, port: int, namespace: str = "default") -> str:
    """Plain http, no credentials: kubectl never sends a bearer token over plain http, so
    this only serves an admin API on loopback (TLS beyond loopback is not built yet)."""
    if not is_loopback(host):
        raise ValueError(
            f"the admin API at {host}:{port} is not on loopback; kubectl needs TLS to send a "
            "token there, which tokengateway does not serve yet"
        )
    server = f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"
    config = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": NAME, "cluster": {"server": server}}],
        "users": [{"name": NAME, "user": {}}],
        "contexts": [
            {"name": NAME, "context": {"cluster": NAME, "user": NAME, "namespace": namespace}}
        ],
        "current-context": NAME,
        "preferences": {},
    }
    return yaml.safe_dump(config, sort_keys=False)
