"""`POST /v1/chat/completions` and `POST /v1/completions`, as llm-d and OpenAI answer them.

Streams follow OpenAI's `stream_options.include_usage` contract exactly, because that is where
the gateway reads a streamed request's tokens: with it, every chunk carries `"usage": null`
and one extra chunk with `"choices": []` and the usage comes just before `data: [DONE]`;
without it, no chunk has a `usage` key at all.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tokengateway.simulator.generation import Model, spaced
from tokengateway.simulator.streaming import CONTENT, DONE, HEAD, TAIL, Exchange, Frame, sse_data
from tokengateway.simulator.wire import ApiError, encode, optional_bool, positive_int, words_of

__all__ = ["content_text", "handle_completion"]


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


def content_text(content: Any, where: str, param: str = "messages") -> str:
    """The text of a chat message's `content`: a string, or the `text` parts of a list."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict):
                raise ApiError(400, f"{where} parts must be objects", param)
            if part.get("type") == "text":
                text = part.get("text")
                if not isinstance(text, str):
                    raise ApiError(400, f"{where} text part needs a string `text`", param)
                texts.append(text)
        return " ".join(texts)
    raise ApiError(400, f"{where} must be a string or a list of content parts", param)


async def handle_completion(model: Model, ex: Exchange, req: dict[str, Any], chat: bool) -> None:
    """Answer a chat or text completion request, streaming or not."""
    reply = _plan(model, req, chat)
    if reply.stream:
        await ex.stream(_frames(reply, ex))
        return
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
    }
    if not ex.faults.drop_usage:
        body["usage"] = _usage(reply, ex)
    await ex.answer(200, encode(body), len(reply.words))


def _usage(reply: _Reply, ex: Exchange) -> dict[str, int]:
    prompt, completion = ex.faults.counts(reply.prompt_tokens, len(reply.words))
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
    }


def _frames(reply: _Reply, ex: Exchange) -> Iterator[Frame]:
    """SSE in OpenAI's order: role (chat), one chunk per word, finish, optional usage, [DONE]."""
    chat = reply.chat
    include_usage = reply.include_usage and not ex.faults.drop_usage
    head = {
        "id": f"chatcmpl-{uuid.uuid4().hex}" if chat else f"cmpl-{uuid.uuid4().hex}",
        "object": "chat.completion.chunk" if chat else "text_completion",
        "created": int(time.time()),
        "model": reply.model,
    }

    def chunk(choice: dict[str, Any]) -> bytes:
        body: dict[str, Any] = {**head, "choices": [choice]}
        if include_usage:
            body["usage"] = None  # as OpenAI: null on every chunk but the usage one
        return sse_data(body)

    def choice(content: str | None, finish: str | None, role: bool = False) -> dict[str, Any]:
        if not chat:
            return {"index": 0, "text": content or "", "logprobs": None, "finish_reason": finish}
        delta: dict[str, str] = {"role": "assistant"} if role else {}
        if content is not None:
            delta["content"] = content
        return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}

    if chat:
        yield HEAD, chunk(choice("", None, role=True))
    for word in spaced(reply.words):
        yield CONTENT, chunk(choice(word, None))
    yield TAIL, chunk(choice(None, reply.finish_reason))
    if include_usage:
        yield TAIL, sse_data({**head, "choices": [], "usage": _usage(reply, ex)})
    yield TAIL, DONE


def _plan(model: Model, req: dict[str, Any], chat: bool) -> _Reply:
    """Validate a completion request (in llm-d's order) and decide the reply's words."""
    name = model.check_name(req.get("model"))
    stream = optional_bool(req, "stream")
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
    max_tokens = positive_int(req, "max_tokens")
    max_name = "max_tokens"
    if chat:
        max_completion = positive_int(req, "max_completion_tokens")
        if max_completion is not None:
            max_tokens, max_name = max_completion, "max_completion_tokens"
        prompt_tokens, echo_text = _chat_prompt(req)
        prompt_name = "messages"
    else:
        prompt_tokens, echo_text = _text_prompt(req)
        prompt_name = "prompt"

    model.check_context(prompt_tokens, max_tokens, prompt_name, max_name)
    words, cut = model.reply(echo_text, prompt_tokens, max_tokens)
    return _Reply(
        chat=chat,
        model=name,
        words=words,
        finish_reason="length" if cut else "stop",
        prompt_tokens=prompt_tokens,
        stream=stream,
        include_usage=include_usage,
    )


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
        text = content_text(message.get("content"), f"`messages[{i}].content`")
        tokens += words_of(text)
        if message.get("role") == "user":
            last_user = text
    # llm-d echoes the last user message, or the last message when no user spoke.
    return tokens, text if last_user is None else last_user


def _text_prompt(req: dict[str, Any]) -> tuple[int, str]:
    prompt = req.get("prompt")
    if prompt is None:
        raise ApiError(400, "`prompt` is required", "prompt")
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompt = " ".join(prompt)
    if not isinstance(prompt, str):
        raise ApiError(400, "`prompt` must be a string or a non-empty list of strings", "prompt")
    return words_of(prompt), prompt
