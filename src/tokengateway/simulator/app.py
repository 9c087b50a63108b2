"""A hand-written ASGI app that imitates llm-d-inference-sim's OpenAI-compatible API.

It exists so the gateway can be run, demonstrated and tested on one machine with no model
server: it answers the chat and text completion APIs with fake text and, above all, with a
`usage` block whose numbers are predictable (a token is a whitespace-separated word), which is
what token rate limits are charged from. No framework: the request path is a dict lookup,
one msgspec decode and one encode, so the simulator is never the bottleneck of a benchmark.
"""

from __future__ import annotations

import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable, MutableMapping
from dataclasses import dataclass
from typing import Any

import msgspec

from tokengateway.simulator.options import SimOptions

__all__ = ["MAX_BODY_BYTES", "SimulatorApp", "build_app"]

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]

#: llm-d's default request body limit (fasthttp's 4 MiB).
MAX_BODY_BYTES = 4 * 1024 * 1024

#: Plain sentences for `random` mode; a response is a run of their words cut to length.
SENTENCES: tuple[str, ...] = (
    "The quick brown fox jumps over the lazy dog.",
    "Rate limits keep a shared service fair for everyone who uses it.",
    "In this simulator one token is simply one word.",
    "Clouds drift slowly across a pale blue sky.",
    "Every request gets a short and friendly reply.",
    "A gateway counts tokens so that each budget is respected.",
    "It is a fine day for a long walk by the river.",
    "Simple tests often catch surprising bugs.",
    "Please try again later if your limit has been reached.",
    "Coffee tastes better when it is shared with friends.",
    "The library closes at six on weekdays and at noon on Saturdays.",
    "Small steps, taken every day, lead to long journeys.",
)

# Lengths of `random` replies when the request sets no maximum: most are short, like chat.
_RANDOM_LEN_MEAN = 40
_RANDOM_LEN_STDDEV = 20
# Share of `random` replies that run to `max_tokens` (and so end with finish_reason "length").
_FULL_LENGTH_SHARE = 0.15

_ERROR_TYPES = {
    400: "BadRequestError",
    404: "NotFoundError",
    405: "MethodNotAllowedError",
    413: "RequestTooLargeError",
}

_JSON_HEADERS = [(b"content-type", b"application/json")]
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]
_DONE = b"data: [DONE]\n\n"

_encode = msgspec.json.Encoder().encode
_decode = msgspec.json.Decoder().decode


class ApiError(Exception):
    """An error answered with OpenAI's envelope; raised before any byte of the response."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        headers: list[tuple[bytes, bytes]] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.headers = headers

    def body(self) -> bytes:
        """The envelope llm-d sends: `{"error": {message, type, param, code}}`, code = status."""
        error = {
            "message": self.message,
            "type": _ERROR_TYPES.get(self.status, "InternalServerError"),
            "param": self.param,
            "code": self.status,
        }
        return _encode({"error": error})


class _Disconnected(Exception):
    """The client went away before its request body arrived: nothing to answer."""


@dataclass(slots=True)
class _Reply:
    """What one completion request will answer, decided before the response starts."""

    chat: bool
    model: str
    words: list[str]
    finish_reason: str
    prompt_tokens: int
    stream: bool
    include_usage: bool

    def usage(self) -> dict[str, int]:
        completion = len(self.words)
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }


def _words_of(text: str) -> int:
    return len(text.split())


def _content_text(content: Any, where: str) -> str:
    """The text of a chat message's `content`: a string, or the `text` parts of a list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict):
                raise ApiError(400, f"{where} parts must be objects", "messages")
            if part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ApiError(400, f"{where} text part needs a string `text`", "messages")
                texts.append(text)
        return " ".join(texts)
    raise ApiError(400, f"{where} must be a string or a list of content parts", "messages")


def _positive_int(req: dict[str, Any], name: str) -> int | None:
    value = req.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ApiError(
            400, f"`{name}` must be a positive integer, got {_encode(value).decode()}", name
        )
    return value


class SimulatorApp:
    """The ASGI3 callable; all per-process state (options, random source) lives here."""

    def __init__(self, opts: SimOptions) -> None:
        self.opts = opts
        self._names = frozenset(opts.model_names)
        self._rng = random.Random(opts.seed)
        self._sentences = tuple(tuple(s.split()) for s in SENTENCES)
        self._ttft = opts.time_to_first_token_ms / 1000
        self._itl = opts.inter_token_latency_ms / 1000
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
        self._models_body = _encode({"object": "list", "data": list(self._model_cards.values())})
        self._routes: dict[str, dict[str, Callable[[Scope, Receive, Send], Awaitable[None]]]] = {
            "/v1/chat/completions": {"POST": self._chat},
            "/v1/completions": {"POST": self._completions},
            "/v1/models": {"GET": self._models},
            "/health": {"GET": self._health},
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            try:
                await self._dispatch(scope, receive, send)
            except ApiError as err:
                await _respond(send, err.status, err.body(), err.headers)
            except _Disconnected:
                return
        elif scope["type"] == "lifespan":
            await _lifespan(receive, send)

    async def _dispatch(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        methods = self._routes.get(path)
        if methods is None:
            if path.startswith("/v1/models/") and scope["method"] == "GET":
                await self._model(path.removeprefix("/v1/models/"), send)
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
        await _respond(send, 200, self._models_body)

    async def _model(self, name: str, send: Send) -> None:
        card = self._model_cards.get(name)
        if card is None:
            raise ApiError(404, f"The model `{name}` does not exist.")
        await _respond(send, 200, _encode(card))

    async def _health(self, scope: Scope, receive: Receive, send: Send) -> None:
        await _respond(send, 200, b"{}")

    async def _chat(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._complete(True, receive, send)

    async def _completions(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._complete(False, receive, send)

    async def _complete(self, chat: bool, receive: Receive, send: Send) -> None:
        reply = self._plan(chat, await _read_body(receive))
        if reply.stream:
            await self._send_stream(reply, receive, send)
            return
        delay = self._ttft + self._itl * max(len(reply.words) - 1, 0)
        if delay > 0:
            await asyncio.sleep(delay)
        text = " ".join(reply.words)
        choice: dict[str, Any]
        if chat:
            rid, obj = f"chatcmpl-{uuid.uuid4().hex}", "chat.completion"
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            rid, obj = f"cmpl-{uuid.uuid4().hex}", "text_completion"
            choice = {"index": 0, "text": text}
        choice["logprobs"] = None
        choice["finish_reason"] = reply.finish_reason
        body = {
            "id": rid,
            "object": obj,
            "created": int(time.time()),
            "model": reply.model,
            "choices": [choice],
            "usage": reply.usage(),
        }
        await _respond(send, 200, _encode(body))

    def _plan(self, chat: bool, body: bytes) -> _Reply:
        """Validate a completion request (in llm-d's order) and decide the reply's words."""
        try:
            req = _decode(body)
        except msgspec.DecodeError as exc:
            raise ApiError(400, f"Failed to read and parse request body, {exc}") from None
        if not isinstance(req, dict):
            raise ApiError(400, "Failed to read and parse request body, expected a JSON object")

        model = req.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "`model` must be a string", "model")
        if model not in self._names:
            raise ApiError(404, f"The model `{model or ''}` does not exist.")

        stream = req.get("stream")
        if stream is not None and not isinstance(stream, bool):
            raise ApiError(400, "`stream` must be a boolean", "stream")
        include_usage = False
        options = req.get("stream_options")
        if options is not None:
            if not isinstance(options, dict):
                raise ApiError(400, "`stream_options` must be an object", "stream_options")
            flag = options.get("include_usage")
            if flag is not None and not isinstance(flag, bool):
                raise ApiError(
                    400, "`stream_options.include_usage` must be a boolean", "stream_options"
                )
            include_usage = bool(flag)

        # Like vLLM, max_completion_tokens wins when both are given; text completions only
        # know max_tokens.
        max_tokens = _positive_int(req, "max_tokens")
        max_name = "max_tokens"
        if chat:
            max_completion = _positive_int(req, "max_completion_tokens")
            if max_completion is not None:
                max_tokens, max_name = max_completion, "max_completion_tokens"
            prompt_tokens, echo_text = self._chat_prompt(req)
            prompt_name = "messages"
        else:
            prompt_tokens, echo_text = self._text_prompt(req)
            prompt_name = "prompt"

        requested = max_tokens if max_tokens is not None else 1
        limit = self.opts.max_model_len
        if prompt_tokens + requested > limit:
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + requested} tokens ({prompt_tokens} in the {prompt_name}, "
                f"{requested} in the completion). Please reduce the length of the "
                f"{prompt_name} or completion.",
                max_name if max_tokens is not None else prompt_name,
            )

        if self.opts.mode == "echo":
            words = echo_text.split()
            cap = max_tokens
        else:
            cap = max_tokens if max_tokens is not None else limit - prompt_tokens
            words = self._random_words(self._random_length(cap, max_tokens is not None))
        if cap is not None and len(words) >= cap:
            del words[cap:]
            finish = "length"
        else:
            finish = "stop"
        return _Reply(
            chat=chat,
            model=model,
            words=words,
            finish_reason=finish,
            prompt_tokens=prompt_tokens,
            stream=bool(stream),
            include_usage=include_usage,
        )

    @staticmethod
    def _chat_prompt(req: dict[str, Any]) -> tuple[int, str]:
        """Prompt tokens of all messages, and the text echo mode answers with."""
        messages = req.get("messages")
        if messages is None:
            raise ApiError(400, "`messages` is required", "messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "`messages` must be a non-empty list of messages", "messages")
        tokens = 0
        last_user: str | None = None
        text = ""
        for i, message in enumerate(messages):
            if not isinstance(message, dict):
                raise ApiError(400, f"`messages[{i}]` must be an object", "messages")
            text = _content_text(message.get("content"), f"`messages[{i}].content`")
            tokens += _words_of(text)
            if message.get("role") == "user":
                last_user = text
        # llm-d echoes the last user message, or the last message when no user spoke.
        return tokens, text if last_user is None else last_user

    @staticmethod
    def _text_prompt(req: dict[str, Any]) -> tuple[int, str]:
        prompt = req.get("prompt")
        if prompt is None:
            raise ApiError(400, "`prompt` is required", "prompt")
        if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
            prompt = " ".join(prompt)
        if not isinstance(prompt, str):
            raise ApiError(
                400, "`prompt` must be a string or a non-empty list of strings", "prompt"
            )
        return _words_of(prompt), prompt

    def _random_length(self, cap: int, from_request: bool) -> int:
        """How many words a `random` reply has, at most `cap`.

        With `max_tokens` a fixed share of replies uses all of it and the rest are spread
        evenly below; without it, lengths cluster around a chat-like mean (as llm-d does).
        """
        rng = self._rng
        if cap <= 1:
            return cap
        if from_request:
            return cap if rng.random() < _FULL_LENGTH_SHARE else rng.randint(1, cap - 1)
        if cap <= _RANDOM_LEN_MEAN:
            return rng.randint(1, cap)
        length = round(rng.gauss(_RANDOM_LEN_MEAN, _RANDOM_LEN_STDDEV))
        return min(cap, max(1, length))

    def _random_words(self, count: int) -> list[str]:
        words: list[str] = []
        while len(words) < count:
            words.extend(self._rng.choice(self._sentences))
        del words[count:]
        return words

    async def _send_stream(self, reply: _Reply, receive: Receive, send: Send) -> None:
        """SSE in OpenAI's order: role, one chunk per word, finish, optional usage, [DONE]."""
        chat = reply.chat
        rid = f"chatcmpl-{uuid.uuid4().hex}" if chat else f"cmpl-{uuid.uuid4().hex}"
        head = {
            "id": rid,
            "object": "chat.completion.chunk" if chat else "text_completion",
            "created": int(time.time()),
            "model": reply.model,
        }
        if reply.include_usage:
            head["usage"] = None  # as OpenAI: null on every chunk but the usage one

        def event(choice: dict[str, Any]) -> dict[str, Any]:
            return {
                "type": "http.response.body",
                "body": b"data: " + _encode({**head, "choices": [choice]}) + b"\n\n",
                "more_body": True,
            }

        def delta(content: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
            if not chat:
                return {
                    "index": 0,
                    "text": content or "",
                    "logprobs": None,
                    "finish_reason": finish,
                }
            d: dict[str, str] = {"role": "assistant"} if role else {}
            if content is not None:
                d["content"] = content
            return {"index": 0, "delta": d, "logprobs": None, "finish_reason": finish}

        # Stop early (no more sleeping) once the client has gone.
        gone = asyncio.ensure_future(receive())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            if chat:
                await send(event(delta("", None, role=True)))
            if self._ttft > 0:
                await asyncio.sleep(self._ttft)
            for i, word in enumerate(reply.words):
                if i:
                    if self._itl > 0:
                        await asyncio.sleep(self._itl)
                    word = " " + word
                if gone.done():
                    return
                await send(event(delta(word, None)))
            await send(event(delta(None, reply.finish_reason)))
            if reply.include_usage:
                usage = {**head, "choices": [], "usage": reply.usage()}
                await send(
                    {
                        "type": "http.response.body",
                        "body": b"data: " + _encode(usage) + b"\n\n",
                        "more_body": True,
                    }
                )
            await send({"type": "http.response.body", "body": _DONE, "more_body": False})
        finally:
            gone.cancel()


async def _respond(
    send: Send, status: int, body: bytes, extra: list[tuple[bytes, bytes]] | None = None
) -> None:
    headers = [*_JSON_HEADERS, (b"content-length", str(len(body)).encode())]
    if extra:
        headers.extend(extra)
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


async def _read_body(receive: Receive) -> bytes:
    message = await receive()
    if message["type"] == "http.disconnect":
        raise _Disconnected
    body: bytes = message.get("body", b"")
    if not message.get("more_body"):
        if len(body) > MAX_BODY_BYTES:
            raise _too_large()
        return body
    chunks = [body]
    size = len(body)
    while message.get("more_body"):
        message = await receive()
        if message["type"] == "http.disconnect":
            raise _Disconnected
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > MAX_BODY_BYTES:
            raise _too_large()
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large() -> ApiError:
    return ApiError(413, f"Request body is larger than {MAX_BODY_BYTES // (1024 * 1024)} MiB")


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
