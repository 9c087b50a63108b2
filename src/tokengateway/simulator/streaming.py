"""Sending answers with the simulator's latency and the request's faults applied.

Every endpoint hands over either one JSON body (`Exchange.answer`) or a sequence of SSE frames
(`Exchange.stream`); the timing (`--time-to-first-token`, `--inter-token-latency`) and the
faults (`cut-after`, `stall-after`) are applied here, once, so all four streaming APIs behave
alike and a test can rely on the same knobs whatever wire format it exercises.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from tokengateway.simulator.faults import Faults
from tokengateway.simulator.wire import JSON_HEADERS, ConnectionCut, Receive, Send, encode

__all__ = [
    "CONTENT",
    "DONE",
    "HEAD",
    "TAIL",
    "Exchange",
    "Frame",
    "Timing",
    "sse_data",
    "sse_event",
]

#: Frame kinds. HEAD frames open a stream (role chunk, message_start, response.created, ...)
#: and go out at once; CONTENT frames carry one word each and are paced by the latency flags
#: and counted by `cut-after` / `stall-after`; TAIL frames close the stream (finish reason,
#: usage, [DONE], message_stop, response.completed, ...).
HEAD, CONTENT, TAIL = 0, 1, 2
Frame = tuple[int, bytes]

DONE = b"data: [DONE]\n\n"
_SSE_HEADERS = [(b"content-type", b"text/event-stream"), (b"cache-control", b"no-cache")]


def sse_data(obj: Any) -> bytes:
    """An SSE event with only a `data:` line (OpenAI chat and completions streams)."""
    return b"data: " + encode(obj) + b"\n\n"


def sse_event(name: str, obj: Any) -> bytes:
    """An SSE event with `event:` and `data:` lines (Responses API and Anthropic streams)."""
    return b"event: " + name.encode() + b"\ndata: " + encode(obj) + b"\n\n"


@dataclass(frozen=True, slots=True)
class Timing:
    """The latency flags, in seconds."""

    ttft_s: float = 0.0
    itl_s: float = 0.0

    def generation_s(self, words: int) -> float:
        """How long generating `words` takes: what a non-streaming answer waits."""
        return self.ttft_s + self.itl_s * max(words - 1, 0)


@dataclass(slots=True)
class Exchange:
    """One request being answered: the ASGI channels plus the faults it asked for."""

    send: Send
    receive: Receive
    faults: Faults
    timing: Timing

    async def answer(self, status: int, body: bytes, words: int | None = None) -> None:
        """A non-streaming answer, sent after the time generating `words` takes (none when
        nothing was generated, e.g. embeddings or a faulty answer) plus any stall.

        Under `cut-after=N` only the first N bytes of the body follow the headers (never the
        whole body, so the read is always short of the Content-Length), then the connection
        is dropped.
        """
        delay = self.timing.generation_s(words) if words is not None else 0.0
        delay += self.faults.stall_s
        if delay > 0:
            await asyncio.sleep(delay)
        headers = [*JSON_HEADERS, (b"content-length", str(len(body)).encode())]
        await self.send({"type": "http.response.start", "status": status, "headers": headers})
        cut = self.faults.cut_after
        if cut is None:
            await self.send({"type": "http.response.body", "body": body})
            return
        part = body[: min(cut, max(len(body) - 1, 0))]
        await self.send({"type": "http.response.body", "body": part, "more_body": True})
        raise ConnectionCut

    async def stream(self, frames: Iterable[Frame]) -> None:
        """An SSE response: HEAD frames at once, the time to first token before the first
        CONTENT frame, the inter-token latency between the others, then the TAIL frames.

        `stall-after=N:MS` sleeps and `cut-after=N` drops the connection once N content frames
        are out; when the answer has fewer words they strike after the last one, so a test
        that asks for a cut always sees one. Stops early (no more sleeping) if the client goes.
        """
        faults, timing, send = self.faults, self.timing, self.send
        stall_at, cut_at = faults.stall_after, faults.cut_after
        gone = asyncio.ensure_future(self.receive())
        try:
            await send({"type": "http.response.start", "status": 200, "headers": _SSE_HEADERS})
            sent = 0
            for kind, data in frames:
                if kind != HEAD:
                    if stall_at is not None and (kind == TAIL or sent >= stall_at):
                        stall_at = None
                        await asyncio.sleep(faults.stall_s)
                    if cut_at is not None and (kind == TAIL or sent >= cut_at):
                        raise ConnectionCut
                if kind == CONTENT:
                    delay = timing.itl_s if sent else timing.ttft_s
                    if delay > 0:
                        await asyncio.sleep(delay)
                    if gone.done():
                        return
                    sent += 1
                await send({"type": "http.response.body", "body": data, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            gone.cancel()
