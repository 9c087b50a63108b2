"""`POST /v1/messages`, Anthropic's Messages API, non-streaming and streaming.

The gateway counts Anthropic usage too, and Anthropic reports it differently from OpenAI:
`input_tokens` / `output_tokens` plus cache counters, and in a stream split between
`message_start` (input tokens and a provisional output count) and `message_delta` (the
cumulative totals, the ones to charge). Shapes follow the official SDK's types
(anthropic-sdk-python `types/usage.py`, `types/message_delta_usage.py`) and Anthropic's
streaming docs; errors on this endpoint use Anthropic's envelope (see `wire.error_body`).
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tokengateway.simulator.faults import Faults
from tokengateway.simulator.generation import Model, spaced
from tokengateway.simulator.streaming import CONTENT, HEAD, TAIL, Exchange, Frame, sse_event
from tokengateway.simulator.wire import ApiError, encode, words_of

__all__ = ["handle_messages"]


@dataclass(slots=True)
class _Reply:
    """A planned message: its id, words, stop reason and (reported) counts."""

    mid: str
    model: str
    words: list[str]
    stop_reason: str
    input_tokens: int
    output_tokens: int
    drop_usage: bool

    def usage(self, output_tokens: int) -> dict[str, int]:
        return {
            "input_tokens": self.input_tokens,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 0,
            "output_tokens": output_tokens,
        }

    def message(self, content: list[dict[str, Any]], stop_reason: str | None) -> dict[str, Any]:
        body: dict[str, Any] = {
            "id": self.mid,
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": content,
            "stop_reason": stop_reason,
            "stop_sequence": None,
        }
        if not self.drop_usage:
            # Before the end (stop_reason None) Anthropic reports a provisional output count.
            done = stop_reason is not None
            body["usage"] = self.usage(self.output_tokens if done else min(1, self.output_tokens))
        return body


def _required(req: dict[str, Any], name: str) -> Any:
    value = req.get(name)
    if value is None:
        raise ApiError(400, f"{name}: Field required", name)
    return value


def _blocks_text(content: Any, where: str) -> str:
    """Text of a string or of the `text` blocks of a list (other blocks count nothing)."""
    if isinstance(content, str):
        return content
    if not isinstance(content, list):
        raise ApiError(400, f"{where}: Input should be a valid string or list of content blocks")
    texts = []
    for j, block in enumerate(content):
        if not isinstance(block, dict):
            raise ApiError(400, f"{where}.{j}: Input should be an object")
        if block.get("type") == "text":
            text = block.get("text")
            if not isinstance(text, str):
                raise ApiError(400, f"{where}.{j}.text: Field required")
            texts.append(text)
    return " ".join(texts)


def _plan(model: Model, req: dict[str, Any], faults: Faults) -> tuple[_Reply, bool]:
    """Validate a request (Anthropic's messages: `field: problem`) and decide the reply."""
    name = _required(req, "model")
    if not isinstance(name, str):
        raise ApiError(400, "model: Input should be a valid string", "model")
    if name not in model.names:
        raise ApiError(404, f"model: {name}", "model")
    max_tokens = _required(req, "max_tokens")
    if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
        raise ApiError(
            400, "max_tokens: Input should be an integer greater than or equal to 1", "max_tokens"
        )
    stream = req.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "stream: Input should be a valid boolean", "stream")
    messages = _required(req, "messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "messages: Input should be a non-empty list of messages", "messages")

    tokens = 0
    system = req.get("system")
    if system is not None:
        tokens += words_of(_blocks_text(system, "system"))
    last_user: str | None = None
    text = ""
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise ApiError(400, f"messages.{i}: Input should be an object", "messages")
        role = message.get("role")
        if role not in ("user", "assistant"):
            raise ApiError(400, f"messages.{i}.role: Input should be 'user' or 'assistant'")
        content = message.get("content")
        if content is None:
            raise ApiError(400, f"messages.{i}.content: Field required", "messages")
        text = _blocks_text(content, f"messages.{i}.content")
        tokens += words_of(text)
        if role == "user":
            last_user = text

    limit = model.max_model_len
    if tokens + max_tokens > limit:
        raise ApiError(
            400,
            f"input length and `max_tokens` exceed context limit: {tokens} + {max_tokens} > "
            f"{limit}, decrease input length or `max_tokens` and try again",
            "max_tokens",
        )
    words, cut = model.reply(text if last_user is None else last_user, tokens, max_tokens)
    reported_in, reported_out = faults.counts(tokens, len(words))
    reply = _Reply(
        mid=f"msg_{uuid.uuid4().hex[:24]}",
        model=name,
        words=words,
        stop_reason="max_tokens" if cut else "end_turn",
        input_tokens=reported_in,
        output_tokens=reported_out,
        drop_usage=faults.drop_usage,
    )
    return reply, stream


async def handle_messages(model: Model, ex: Exchange, req: dict[str, Any]) -> None:
    """Answer an Anthropic Messages request, streaming or not."""
    reply, stream = _plan(model, req, ex.faults)
    if stream:
        await ex.stream(_frames(reply))
        return
    content = [{"type": "text", "text": " ".join(reply.words)}]
    await ex.answer(200, encode(reply.message(content, reply.stop_reason)), len(reply.words))


def _frames(reply: _Reply) -> Iterator[Frame]:
    """Anthropic's event flow: message_start, content_block_start, ping, one text_delta per
    word, content_block_stop, message_delta (stop reason, cumulative usage), message_stop."""
    yield (
        HEAD,
        sse_event("message_start", {"type": "message_start", "message": reply.message([], None)}),
    )
    yield (
        HEAD,
        sse_event(
            "content_block_start",
            {
                "type": "content_block_start",
                "index": 0,
                "content_block": {"type": "text", "text": ""},
            },
        ),
    )
    yield HEAD, sse_event("ping", {"type": "ping"})
    for word in spaced(reply.words):
        yield (
            CONTENT,
            sse_event(
                "content_block_delta",
                {
                    "type": "content_block_delta",
                    "index": 0,
                    "delta": {"type": "text_delta", "text": word},
                },
            ),
        )
    yield TAIL, sse_event("content_block_stop", {"type": "content_block_stop", "index": 0})
    delta: dict[str, Any] = {
        "type": "message_delta",
        "delta": {"stop_reason": reply.stop_reason, "stop_sequence": None},
    }
    if not reply.drop_usage:
        delta["usage"] = reply.usage(reply.output_tokens)
    yield TAIL, sse_event("message_delta", delta)
    yield TAIL, sse_event("message_stop", {"type": "message_stop"})
