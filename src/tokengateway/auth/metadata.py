"""`metadata` rules that call an HTTP service: Authorino's `http` metadata evaluator.

After the identity is resolved and before authorization, each rule (by priority, then
name; its `when` may skip it) sends one request and exposes the answer as
`auth.metadata.<rule>` to the authorization rules, the success responses and the limits:

- `url` with `{selector}` placeholders over the authorization JSON (a `\\{` is a brace),
  or `urlExpression` (CEL); `method` GET (the default) or POST;
- a POST's body: `body` (a value, selector or expression, sent as text or JSON), or
  `bodyParameters` (named values) encoded by `contentType`:
  `application/x-www-form-urlencoded` (the default) or `application/json`;
- `headers`: named values, each sent as text;
- the answer is JSON when its Content-Type says `application/json` (several JSON
  documents in a row make a list), else its text. The status is not looked at (Authorino
  does not either).

A rule that fails (a value that does not resolve, the service unreachable, a JSON answer
that does not parse) leaves `auth.metadata.<rule>` unset and the request goes on, as
Authorino only logs such a failure.

Nothing here does I/O. The engine reports the calls a request needs and the gateway makes
them (`MetadataCall.fetch`, with its HTTP client) and asks again. An answer is used by the
request it was made for only, unless the rule has `cache` (`ttl` seconds): then requests
that would send the very same call (method, URL, headers, body) share it for that long.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlencode

from tokengateway.auth.selector import to_string
from tokengateway.auth.values import Condition, EvalContext, Value

__all__ = ["HttpMetadata", "MetadataCall", "Send"]

#: (method, url, headers, body, timeout) -> (status, content type, body); raises when the
#: service cannot be reached
Send = Callable[[str, str, list[tuple[str, str]], bytes, float], Awaitable[tuple[int, str, bytes]]]

#: answers kept per rule (the oldest goes first when full)
KEPT = 4096
#: seconds an answer made for one request waits for that request to read it
FOR_ONE_REQUEST = 30.0

FORM = "application/x-www-form-urlencoded"
JSON = "application/json"


@dataclass(frozen=True, slots=True)
class _Answer:
    ok: bool
    value: Any
    until: float


@dataclass(frozen=True, slots=True)
class MetadataCall:
    """One request a metadata rule needs sent, and where its answer goes."""

    rule: HttpMetadata
    key: bytes
    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: bytes

    def __repr__(self) -> str:  # never the headers or body (they may carry credentials)
        return f"MetadataCall({self.rule.name!r}, {self.method} {self.url.split('?')[0]})"

    def fetch(self, send: Send) -> Awaitable[None]:
        return self.rule.fetch(self, send)


class HttpMetadata:
    """One `metadata` rule with `http`."""

    __slots__ = (
        "_answers",
        "_running",
        "body",
        "content_type",
        "headers",
        "keep_for",
        "method",
        "name",
        "parameters",
        "priority",
        "timeout",
        "url",
        "when",
    )

    def __init__(
        self,
        name: str,
        priority: int,
        *,
        url: Value,
        method: str = "GET",
        body: Value | None = None,
        parameters: list[tuple[str, Value]] | None = None,
        content_type: str = FORM,
        headers: list[tuple[str, Value]] | None = None,
        timeout: float = 5.0,
        keep_for: float | None = None,
    ) -> None:
        self.name = name
        self.priority = priority
        self.when: Condition | None = None
        self.url = url
        self.method = method
        self.body = body
        self.parameters = parameters or []
        self.content_type = content_type
        self.headers = headers or []
        self.timeout = timeout
        #: seconds a call's answer is shared by requests making the same call (None: none)
        self.keep_for = keep_for
        self._answers: dict[bytes, _Answer] = {}
        self._running: dict[bytes, asyncio.Future[None]] = {}

    def __repr__(self) -> str:
        return f"HttpMetadata({self.name!r})"

    def call(self, ctx: EvalContext, request_id: str) -> MetadataCall:
        """The request this rule sends for this authorization JSON (ResolveError when a
        value does not resolve)."""
        url = to_string(self.url.resolve(ctx))
        headers = [(name, to_string(value.resolve(ctx))) for name, value in self.headers]
        body = b""
        if self.method == "POST":
            if self.body is not None:
                body = to_string(self.body.resolve(ctx)).encode()
            else:
                params = {name: value.resolve(ctx) for name, value in self.parameters}
                if self.content_type == JSON:
                    body = json.dumps(params, separators=(",", ":")).encode()
                else:
                    body = urlencode({k: to_string(v) for k, v in params.items()}).encode()
            headers.append(("content-type", self.content_type))
        else:
            headers.append(("content-type", "text/plain"))
        digest = hashlib.sha256()
        if self.keep_for is None:  # an answer for this request only
            digest.update(request_id.encode("utf-8", "surrogateescape") + b"\0")
        text = json.dumps([self.method, url, headers], separators=(",", ":"))
        digest.update(text.encode("utf-8", "surrogateescape") + b"\0" + body)
        return MetadataCall(self, digest.digest(), self.method, url, tuple(headers), body)

    def answer(self, call: MetadataCall, now: float | None = None) -> tuple[bool, Any] | None:
        """(ok, value) kept for `call`, or None when it must be sent."""
        found = self._answers.get(call.key)
        now = time.time() if now is None else now
        if found is None or now >= found.until:
            return None
        return found.ok, found.value

    def fetch(self, call: MetadataCall, send: Send) -> Awaitable[None]:
        running = self._running.get(call.key)
        if running is None or running.done():
            running = asyncio.ensure_future(self._send(call, send))
            self._running[call.key] = running
            running.add_done_callback(lambda _: self._running.pop(call.key, None))
        return asyncio.shield(running)

    async def _send(self, call: MetadataCall, send: Send) -> None:
        try:
            _, content_type, text = await send(
                call.method, call.url, list(call.headers), call.body, self.timeout
            )
            value = _read(content_type, text)
            ok = True
        except Exception as exc:  # Authorino logs it and goes on without this metadata
            ok, value = False, f"{type(exc).__name__}: {exc}"
        keep_for = self.keep_for if self.keep_for is not None else FOR_ONE_REQUEST
        if len(self._answers) >= KEPT:
            self._answers.pop(next(iter(self._answers)), None)
        self._answers[call.key] = _Answer(ok, value, time.time() + keep_for)


def _read(content_type: str, text: bytes) -> Any:
    if JSON not in content_type:
        return text.decode("utf-8", "replace")
    decoder = json.JSONDecoder()
    source = text.decode("utf-8")
    documents = []
    index = 0
    while True:
        while index < len(source) and source[index].isspace():
            index += 1
        if index >= len(source):
            break
        document, index = decoder.raw_decode(source, index)
        documents.append(document)
    if not documents:
        raise ValueError("an empty JSON answer")
    return documents[0] if len(documents) == 1 else documents
