"""Kuadrant AuthPolicy enforcement, as Authorino does it, as a library with no HTTP in it.

The gateway builds an :class:`AuthRequest` per request and calls
:meth:`AuthEngine.evaluate`; the :class:`AuthDecision` says whether to forward (with extra
upstream headers and the `auth` binding for the rate limits) or deny (status, headers,
reason). Engines are compiled once per configuration by :func:`compile_auth`, which raises
:class:`AuthConfigError` for anything that cannot be enforced faithfully here.

Module map: ``engine`` (pipeline), ``identity`` (API key Secrets), ``jwt`` (tokens and the key
sets of identity providers), ``x509`` (client certificates), ``credentials`` (where
credentials are read), ``rego`` (OPA), ``values`` (values and conditions), ``selector``
(GJSON paths, reusable outside auth). See ``engine``'s docstring for what is unsupported.
"""

from tokengateway.auth.engine import AuthEngine, compile_auth
from tokengateway.auth.jwt import KeySet
from tokengateway.auth.model import AuthConfigError, AuthDecision, AuthRequest, SecretRecord
from tokengateway.auth.selector import MISSING, Selector, SelectorError, compile_selector

__all__ = [
    "MISSING",
    "AuthConfigError",
    "AuthDecision",
    "AuthEngine",
    "AuthRequest",
    "KeySet",
    "SecretRecord",
    "Selector",
    "SelectorError",
    "compile_auth",
    "compile_selector",
]
