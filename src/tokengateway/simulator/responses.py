"""`POST /v1/responses`, OpenAI's Responses API, non-streaming and streaming.

Its usage shape differs from chat's (`input_tokens` / `output_tokens` with detail objects),
and a stream carries it only in the terminal event's `response.usage`, so the gateway needs a
faithful source of both. The event sequence and fields follow the official SDK's types
(openai-python `types/responses/*_event.py`): every event has `type` and a `sequence_number`
counting from 0, and the stream ends with `response.completed` — or `response.incomplete`
(status "incomplete", `incomplete_details.reason` "max_output_tokens") when the reply was cut
at `max_output_tokens`, as OpenAI does. There is no `data: [DONE]`.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from tokengateway.simulator.generation import Model, spaced
from tokengateway.simulator.streaming import CONTENT, HEAD, TAIL, Exchange, Frame, sse_event
from tokengateway.simulator.wire import ApiError, encode, optional_bool, positive_int, words_of

__all__ = ["handle_responses"]

# Content part types whose `text` counts as input: user text and replayed assistant text.
_TEXT_PARTS = frozenset({"input_text", "output_text"})


@dataclass(slots=True)
class _Reply:
    """A planned response: request echoes, the reply's words and the (reported) counts."""

    rid: str
    item_id: str
    created_at: int
    model: str
    instructions: str | None
    max_output_tokens: int | None
    words: list[str]
    incomplete: bool
    input_tokens: int
    output_tokens: int
    drop_usage: bool

    @property
    def status(self) -> str:
        return "incomplete" if self.incomplete else "completed"

    def usage(self) -> dict[str, Any]:
        return {
            "input_tokens": self.input_tokens,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": self.output_tokens,
            "output_tokens_details": {"reasoning_tokens": 0},
            "total_tokens": self.input_tokens + self.output_tokens,
        }

    def part(self, text: str) -> dict[str, Any]:
        return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}

    def item(self, status: str, content: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": self.item_id,
            "type": "message",
            "status": status,
            "role": "assistant",
            "content": content,
        }

    def response(self, status: str, output: list[dict[str, Any]], final: bool) -> dict[str, Any]:
        """The response object; before the end (`final` false) its usage is null."""
        incomplete = {"reason": "max_output_tokens"} if final and self.incomplete else None
        body: dict[str, Any] = {
            "id": self.rid,
            "object": "response",
            "created_at": self.created_at,
            "status": status,
            "error": None,
            "incomplete_details": incomplete,
            "instructions": self.instructions,
            "max_output_tokens": self.max_output_tokens,
            "model": self.model,
            "output": output,
            "parallel_tool_calls": True,
            "previous_response_id": None,
            "temperature": 1.0,
            "text": {"format": {"type": "text"}},
            "tool_choice": "auto",
            "tools": [],
            "top_p": 1.0,
            "truncation": "disabled",
        }
        if not self.drop_usage:
            body["usage"] = self.usage() if final else None
        body["metadata"] = {}
        return body

    def final(self) -> dict[str, Any]:
        text = " ".join(self.words)
        return self.response(self.status, [self.item(self.status, [self.part(text)])], True)


async def handle_responses(model: Model, ex: Exchange, req: dict[str, Any]) -> None:
    """Answer a Responses API request, streaming or not."""
    name = model.check_name(req.get("model"))
    stream = optional_bool(req, "stream")
    max_output = positive_int(req, "max_output_tokens")
    instructions = req.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise ApiError(400, "`instructions` must be a string", "instructions")
    prompt_tokens, echo_text = _input(req.get("input"))
    if instructions:
        prompt_tokens += words_of(instructions)
    model.check_context(prompt_tokens, max_output, "input", "max_output_tokens")
    words, cut = model.reply(echo_text, prompt_tokens, max_output)
    reported_in, reported_out = ex.faults.counts(prompt_tokens, len(words))
    reply = _Reply(
        rid=f"resp_{uuid.uuid4().hex}",
        item_id=f"msg_{uuid.uuid4().hex}",
        created_at=int(time.time()),
        model=name,
        instructions=instructions,
        max_output_tokens=max_output,
        words=words,
        incomplete=cut,
        input_tokens=reported_in,
        output_tokens=reported_out,
        drop_usage=ex.faults.drop_usage,
    )
    if stream:
        await ex.stream(_frames(reply))
    else:
        await ex.answer(200, encode(reply.final()), len(words))


def _input(raw: Any) -> tuple[int, str]:
    """Input tokens of `input` (a string or a list of message items) and the echo text."""
    if isinstance(raw, str):
        return words_of(raw), raw
    if not isinstance(raw, list) or not raw:
        raise ApiError(
            400, "`input` is required: a string or a non-empty list of input items", "input"
        )
    tokens = 0
    last_user: str | None = None
    text = ""
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise ApiError(400, f"`input[{i}]` must be an object", "input")
        if item.get("type", "message") != "message":
            continue  # tool calls and their outputs carry no text the simulator counts
        text = _item_text(item.get("content"), i)
        tokens += words_of(text)
        if item.get("role") == "user":
            last_user = text
    return tokens, text if last_user is None else last_user


def _item_text(content: Any, i: int) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise ApiError(
            400, f"`input[{i}].content` must be a string or a list of content parts", "input"
        )
    texts = []
    for part in content:
        if not isinstance(part, dict):
            raise ApiError(400, f"`input[{i}].content` parts must be objects", "input")
        if part.get("type") in _TEXT_PARTS:
            text = part.get("text")
            if not isinstance(text, str):
                raise ApiError(400, f"`input[{i}].content` text part needs a `text`", "input")
            texts.append(text)
    return " ".join(texts)


def _frames(reply: _Reply) -> Iterator[Frame]:
    """The Responses API event sequence, one `output_text.delta` per word."""
    seq = 0

    def event(kind: int, name: str, fields: dict[str, Any]) -> Frame:
        nonlocal seq
        frame = kind, sse_event(name, {"type": name, "sequence_number": seq, **fields})
        seq += 1
        return frame

    where = {"item_id": reply.item_id, "output_index": 0, "content_index": 0}
    yield event(HEAD, "response.created", {"response": reply.response("in_progress", [], False)})
    yield event(
        HEAD, "response.in_progress", {"response": reply.response("in_progress", [], False)}
    )
    yield event(
        HEAD,
        "response.output_item.added",
        {"output_index": 0, "item": reply.item("in_progress", [])},
    )
    yield event(HEAD, "response.content_part.added", {**where, "part": reply.part("")})
    for delta in spaced(reply.words):
        yield event(
            CONTENT, "response.output_text.delta", {**where, "delta": delta, "logprobs": []}
        )
    text = " ".join(reply.words)
    yield event(TAIL, "response.output_text.done", {**where, "text": text, "logprobs": []})
    yield event(TAIL, "response.content_part.done", {**where, "part": reply.part(text)})
    yield event(
        TAIL,
        "response.output_item.done",
        {"output_index": 0, "item": reply.item(reply.status, [reply.part(text)])},
    )
    yield event(TAIL, f"response.{reply.status}", {"response": reply.final()})
