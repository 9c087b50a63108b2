"""`POST /v1/embeddings`, with OpenAI's request and response shapes.

The vectors are meaningless but deterministic (a hash of the input), short by default and
unit-length like OpenAI's; what matters to the gateway is the `usage` block, which has only
`prompt_tokens` and `total_tokens` here. The official Python SDK asks for
`encoding_format: "base64"` unless told otherwise (little-endian float32), so both formats
are served.
"""

from __future__ import annotations

import base64
import hashlib
import math
import struct
import sys
from array import array
from typing import Any

from tokengateway.simulator.generation import Model
from tokengateway.simulator.streaming import Exchange
from tokengateway.simulator.wire import ApiError, encode, positive_int, words_of

__all__ = ["DEFAULT_DIMENSIONS", "MAX_DIMENSIONS", "embed", "handle_embeddings"]

DEFAULT_DIMENSIONS = 8
MAX_DIMENSIONS = 4096


def embed(item: str | list[int], dimensions: int) -> array[float]:
    """A unit vector of float32 derived from the input alone: same input, same vector."""
    seed = encode(item)
    raw = hashlib.shake_256(seed).digest(4 * dimensions)
    ints = struct.unpack(f"<{dimensions}I", raw)
    values = [i / 2**31 - 1.0 for i in ints]
    norm = math.sqrt(sum(v * v for v in values)) or 1.0
    return array("f", [v / norm for v in values])


def _inputs(raw: Any) -> list[tuple[str | list[int], int]]:
    """Each input with its token count: a string counts its words, a token-id list its ids."""
    one_token_list = isinstance(raw, list) and raw and all(_is_token(t) for t in raw)
    if isinstance(raw, str) or one_token_list:
        raw = [raw]
    if not isinstance(raw, list) or not raw:
        raise ApiError(
            400,
            "`input` must be a string, a list of strings, a list of token ids or a list of "
            "token-id lists",
            "input",
        )
    items: list[tuple[str | list[int], int]] = []
    for i, item in enumerate(raw):
        if isinstance(item, str) and item:
            items.append((item, words_of(item)))
        elif isinstance(item, list) and item and all(_is_token(t) for t in item):
            items.append((item, len(item)))
        else:
            raise ApiError(
                400, f"`input[{i}]` must be a non-empty string or list of token ids", "input"
            )
    return items


def _is_token(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


async def handle_embeddings(model: Model, ex: Exchange, req: dict[str, Any]) -> None:
    """Answer an embeddings request; answered at once (no generation latency)."""
    name = model.check_name(req.get("model"))
    items = _inputs(req.get("input"))
    dimensions = positive_int(req, "dimensions") or DEFAULT_DIMENSIONS
    if dimensions > MAX_DIMENSIONS:
        raise ApiError(400, f"`dimensions` must be at most {MAX_DIMENSIONS}", "dimensions")
    fmt = req.get("encoding_format", "float")
    if fmt not in ("float", "base64"):
        raise ApiError(400, "`encoding_format` must be 'float' or 'base64'", "encoding_format")
    limit = model.max_model_len
    for i, (_, tokens) in enumerate(items):
        if tokens > limit:
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens, however you "
                f"requested {tokens} tokens in `input[{i}]`. Please reduce your input.",
                "input",
            )

    data = []
    for i, (item, _) in enumerate(items):
        vector = embed(item, dimensions)
        if fmt == "base64":
            if sys.byteorder != "little":
                vector.byteswap()
            value: Any = base64.b64encode(vector.tobytes()).decode()
        else:
            value = vector.tolist()
        data.append({"object": "embedding", "index": i, "embedding": value})
    body: dict[str, Any] = {"object": "list", "data": data, "model": name}
    if not ex.faults.drop_usage:
        prompt, _ = ex.faults.counts(sum(tokens for _, tokens in items), 0)
        body["usage"] = {"prompt_tokens": prompt, "total_tokens": prompt}
    await ex.answer(200, encode(body))
