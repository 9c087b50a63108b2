"""A hand-written ASGI app that imitates llm-d-inference-sim's OpenAI-compatible API, plus the
other usage shapes the gateway counts (embeddings, the Responses API, Anthropic Messages).

It exists so the gateway can be run, demonstrated and tested on one machine with no model
server: it answers with fake text and, above all, with usage numbers that are predictable (a
token is a whitespace-separated word), which is what token rate limits are charged from. On
request it misbehaves (see `faults`), so the gateway's handling of broken upstreams can be
tested too. No framework: the request path is a dict lookup, one msgspec decode and one
encode, so the simulator is never the bottleneck of a benchmark.

One module per endpoint family: `completions` (chat and text), `embeddings`, `responses`,
`messages`; `streaming` applies latency and faults to every answer, `wire` holds the shared
ASGI and JSON plumbing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any
from urllib.parse import unquote

from tokengateway.simulator.completions import handle_completion
from tokengateway.simulator.embeddings import handle_embeddings
from tokengateway.simulator.faults import FAULT_HEADER, FaultError, Faults, parse_faults
from tokengateway.simulator.generation import Model
from tokengateway.simulator.messages import handle_messages
from tokengateway.simulator.options import SimOptions
from tokengateway.simulator.responses import handle_responses
from tokengateway.simulator.streaming import Exchange, Timing
from tokengateway.simulator.wire import (
    MAX_BODY_BYTES,
    ApiError,
    ConnectionCut,
    Disconnected,
    Receive,
    Scope,
    Send,
    encode,
    error_body,
    parse_object,
    read_body,
    respond,
)

__all__ = ["MAX_BODY_BYTES", "MESSAGES_PATH", "NON_JSON_BODY", "SimulatorApp", "build_app"]

#: The one path that speaks Anthropic's API (and so answers errors in Anthropic's envelope).
MESSAGES_PATH = "/v1/messages"

#: What the `non-json` fault answers, with `content-type: application/json`.
NON_JSON_BODY = b"<html>oops</html>"

Handler = Callable[[Scope, Receive, Send], Awaitable[None]]
Generator = Callable[[Model, Exchange, dict[str, Any]], Awaitable[None]]


class _HideRequestedCuts(logging.Filter):
    """Keeps uvicorn from logging a `cut-after` fault as an application crash."""

    def filter(self, record: logging.LogRecord) -> bool:
        exc = record.exc_info[1] if record.exc_info else None
        return not isinstance(exc, ConnectionCut)


def _hide_requested_cuts() -> None:
    logger = logging.getLogger("uvicorn.error")
    if not any(isinstance(f, _HideRequestedCuts) for f in logger.filters):
        logger.addFilter(_HideRequestedCuts())


class SimulatorApp:
    """The ASGI3 callable; all per-process state (options, model, random source) lives here."""

    def __init__(self, opts: SimOptions) -> None:
        self.opts = opts
        self.model = Model(opts.model_names, opts.mode, opts.seed, opts.max_model_len)
        self.timing = Timing(opts.time_to_first_token_ms / 1000, opts.inter_token_latency_ms / 1000)
        self.default_faults = parse_faults(opts.faults)
        created = int(time.time())
        self._model_cards = {
            name: {
                "id": name,
                "object": "model",
                "created": created,
                "owned_by": "tokengateway-sim",
                "root": opts.model,
                "parent": None,
                "max_model_len": opts.max_model_len,
            }
            for name in opts.model_names
        }
        self._models_body = encode({"object": "list", "data": list(self._model_cards.values())})
        generators: dict[str, Generator] = {
            "/v1/chat/completions": partial(handle_completion, chat=True),
            "/v1/completions": partial(handle_completion, chat=False),
            "/v1/embeddings": handle_embeddings,
            "/v1/responses": handle_responses,
            MESSAGES_PATH: handle_messages,
        }
        self._routes: dict[str, dict[str, Handler]] = {
            path: {"POST": partial(self._generate, gen)} for path, gen in generators.items()
        }
        self._routes["/v1/models"] = {"GET": self._models}
        self._routes["/health"] = {"GET": self._health}
        _hide_requested_cuts()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                await self._dispatch(scope, receive, send)
            except ApiError as err:
                body = err.body(anthropic=scope["path"] == MESSAGES_PATH)
                await respond(send, err.status, body, err.headers)
            except Disconnected:
                return
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        methods = self._routes.get(path)
        if methods is None:
            if path.startswith("/v1/models/") and scope["method"] == "GET":
                # the server keeps escapes (a model id may hold "%2F"): decoded once here
                await self._model(unquote(path.removeprefix("/v1/models/")), send)
                return
            raise ApiError(404, f"Not Found: {path}")
        handler = methods.get(scope["method"])
        if handler is None:
            allow = ", ".join(methods).encode()
            raise ApiError(
                405, f"Method Not Allowed: {scope['method']} {path}", headers=[(b"allow", allow)]
            )
        await handler(scope, receive, send)

    async def _models(self, scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, 200, self._models_body)

    async def _model(self, name: str, send: Send) -> None:
        card = self._model_cards.get(name)
        if card is None:
            raise ApiError(404, f"The model `{name}` does not exist.")
        await respond(send, 200, encode(card))

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await respond(send, 200, b"{}")

    def _faults(self, scope: Scope) -> Faults:
        """The request's `x-sim-fault` directives, or the `--fault` defaults without one."""
        given = [v.decode("latin-1") for k, v in scope["headers"] if k.lower() == FAULT_HEADER]
        if not given:
            return self.default_faults
        try:
            return parse_faults(given)
        except FaultError as exc:
            raise ApiError(400, f"x-sim-fault: {exc}", "x-sim-fault") from None

    async def _generate(self, gen: Generator, scope: Scope, receive: Receive, send: Send) -> None:
        """Run a generation endpoint, unless a fault replaces its answer altogether."""
        faults = self._faults(scope)
        body = await read_body(receive)
        ex = Exchange(send, receive, faults, self.timing)
        if faults.status is not None:
            message = f"Simulated failure: status={faults.status} (x-sim-fault)"
            anthropic = scope["path"] == MESSAGES_PATH
            await ex.answer(faults.status, error_body(faults.status, message, None, anthropic))
        elif faults.non_json:
            await ex.answer(200, NON_JSON_BODY)
        else:
            await gen(self.model, ex, parse_object(body))


async def _lifespan(receive: Receive, send: Send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await send({"type": "lifespan.shutdown.complete"})
            return


def build_app(opts: SimOptions) -> SimulatorApp:
    """The simulator as an ASGI3 app, ready for uvicorn or an in-process test transport."""
    return SimulatorApp(opts)
