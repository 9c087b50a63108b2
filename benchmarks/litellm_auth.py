"""LiteLLM custom auth for the side-by-side benchmark (loaded by LiteLLM, not by us).

LiteLLM keeps per-key limits on *virtual keys*, which live in its Postgres database. To give
one API key a tokens-per-minute limit without a database, its proxy accepts a custom auth
function (`general_settings.custom_auth`) that returns the key's `UserAPIKeyAuth`; a
`tpm_limit` set on it is enforced by LiteLLM's own rate limiter, per key, in memory — the
equivalent of the gateway's per-user token limit. This is that function: one key
(BENCH_KEY), one user, BENCH_TPM_LIMIT tokens a minute; any other key is refused with 401.
"""

import os

from fastapi import Request
from litellm.proxy._types import ProxyException, UserAPIKeyAuth

KEY = os.environ.get("BENCH_KEY", "sk-bench-gold")
TPM_LIMIT = int(os.environ.get("BENCH_TPM_LIMIT", "1000000000000"))


async def user_api_key_auth(request: Request, api_key: str) -> UserAPIKeyAuth:
    if api_key == KEY:
        return UserAPIKeyAuth(api_key=api_key, user_id="user-2", tpm_limit=TPM_LIMIT)
    raise ProxyException(message="invalid API key", type="auth_error", param="api_key", code=401)
