"""OAuth2 token introspection (RFC 7662) identities, as Authorino's `oauth2Introspection`.

The token is POSTed, form-encoded (`token`, `token_type_hint`: `access_token` unless the
rule says otherwise), to the rule's `endpoint` with HTTP Basic client credentials from the
Secret `credentialsRef` names (keys `clientID` and `clientSecret`, in Kuadrant's system
namespace, where the AuthConfig lives). A 200 answer whose `active` is `true` makes the
answer's claims the identity; `active: false` is a 401 "token is not active"; any other
status "token introspection request failed: <status>", and a missing or non-boolean
`active` says so.

Unlike Authorino, which asks the server on every request, answers are kept per token
(by its SHA-256 digest): an active one until the token's `exp` and at most `cache.ttl`
seconds (60 when the rule has no `cache`), so a revoked token is refused within that
time; a refusal from the server for `REFUSED_FOR` seconds; a failure to reach it not at
all. Nothing here does I/O: the engine reports a token it has no answer for, and the
gateway awaits `Introspector.introspect` with its HTTP client (`Post`) and asks again.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote, urlencode

__all__ = ["Introspector", "Post"]

#: (url, headers, body, timeout) -> (status, body); raises when the server cannot be reached
Post = Callable[[str, list[tuple[str, str]], bytes, float], Awaitable[tuple[int, bytes]]]

#: seconds an active answer is kept when the rule sets no `cache.ttl`
DEFAULT_KEEP = 60.0
#: seconds a refusal (`active: false`, an error status) is kept
REFUSED_FOR = 10.0
#: seconds a failure to reach the server is kept: just long enough for the request that
#: waited for it to read it
FAILED_FOR = 1.0
#: answers kept per rule (the oldest goes first when full)
KEPT = 4096

_REASONS = {400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found"}
_REASONS |= {500: "Internal Server Error", 502: "Bad Gateway", 503: "Service Unavailable"}


@dataclass(frozen=True, slots=True)
class Answer:
    claims: dict[str, Any] | None
    error: str | None
    until: float


class Introspector:
    """One `oauth2Introspection` rule: its endpoint, client credentials and answers."""

    __slots__ = ("_answers", "_auth", "_running", "endpoint", "hint", "keep_for", "timeout")

    def __init__(
        self,
        endpoint: str,
        client_id: str,
        client_secret: str,
        *,
        hint: str = "access_token",
        timeout: float = 5.0,
        keep_for: float = DEFAULT_KEEP,
    ) -> None:
        self.endpoint = endpoint
        self.hint = hint
        self.timeout = timeout
        self.keep_for = keep_for
        # RFC 6749 2.3.1: each part form-encoded, then Basic
        pair = f"{quote(client_id, safe='')}:{quote(client_secret, safe='')}"
        self._auth = "Basic " + base64.b64encode(pair.encode()).decode("ascii")
        self._answers: dict[bytes, Answer] = {}
        self._running: dict[bytes, asyncio.Future[None]] = {}

    def __repr__(self) -> str:  # never the client secret
        return f"Introspector({self.endpoint!r})"

    def answer(self, token: str, now: float | None = None) -> Answer | None:
        """The answer kept for `token`, or None when the server must be asked."""
        found = self._answers.get(hashlib.sha256(token.encode()).digest())
        now = time.time() if now is None else now
        return found if found is not None and now < found.until else None

    def introspect(self, token: str, post: Post) -> Awaitable[None]:
        """Ask the server about `token` and keep its answer; requests for the same token at
        the same time share one call."""
        key = hashlib.sha256(token.encode()).digest()
        running = self._running.get(key)
        if running is None or running.done():
            running = asyncio.ensure_future(self._ask(key, token, post))
            self._running[key] = running
            running.add_done_callback(lambda _: self._running.pop(key, None))
        return asyncio.shield(running)

    async def _ask(self, key: bytes, token: str, post: Post) -> None:
        body = urlencode({"token": token, "token_type_hint": self.hint}).encode()
        headers = [
            ("content-type", "application/x-www-form-urlencoded"),
            ("accept", "application/json"),
            ("authorization", self._auth),
        ]
        now = time.time()
        try:
            status, text = await post(self.endpoint, headers, body, self.timeout)
        except Exception as exc:  # the server down: nothing worth keeping
            answer = Answer(None, f"token introspection request failed: {exc}", now + FAILED_FOR)
        else:
            answer = self._read(status, text, now)
        if len(self._answers) >= KEPT:
            self._answers.pop(next(iter(self._answers)), None)
        self._answers[key] = answer

    def _read(self, status: int, text: bytes, now: float) -> Answer:
        refused = now + REFUSED_FOR
        if status != 200:
            reason = f"{status} {_REASONS.get(status, '')}".strip()
            return Answer(None, f"token introspection request failed: {reason}", refused)
        try:
            claims = json.loads(text)
        except ValueError as exc:
            return Answer(None, f"invalid token introspection response: {exc}", refused)
        active = claims.get("active") if isinstance(claims, dict) else None
        if not isinstance(active, bool):
            return Answer(
                None,
                'invalid token introspection response: missing or non-boolean "active" field',
                refused,
            )
        if not active:
            return Answer(None, "token is not active", refused)
        until = now + self.keep_for
        exp = claims.get("exp")
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            until = min(until, float(exp))
        return Answer(claims, None, until)
