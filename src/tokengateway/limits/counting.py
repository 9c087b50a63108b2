"""Which tokens a token limit counts: Kuadrant's `total_tokens`, or tokengateway's weights.

The `counting` extension on a TokenRateLimitPolicy limit (docs/counting.md):

    counting: total                          # the default: usage.total_tokens, as Kuadrant
    counting: prompt                         # prompt tokens (cached ones included)
    counting: completion                     # completion tokens
    counting: {prompt: 1, completion: 4, cachedPrompt: 0}   # a weighted sum
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from tokengateway.wire.tokens import Usage

__all__ = ["TOTAL", "Counting", "parse_counting"]


@dataclass(frozen=True, slots=True)
class Counting:
    prompt: float = 1.0
    completion: float = 1.0
    cached_prompt: float = 1.0
    total: bool = True  # count usage.total_tokens as reported, ignoring the weights

    def cost(self, usage: Usage) -> int:
        if self.total:
            return usage.total_tokens
        cached = min(usage.cached_prompt_tokens, usage.prompt_tokens)
        weighted = (
            (usage.prompt_tokens - cached) * self.prompt
            + cached * self.cached_prompt
            + usage.completion_tokens * self.completion
        )
        return math.ceil(weighted - 1e-9)


TOTAL = Counting()


def parse_counting(value: Any) -> Counting:
    """The manifest's `counting` value (validated by the resources layer) to a Counting."""
    if value is None or value == "total":
        return TOTAL
    if value == "prompt":
        value = {"prompt": 1}
    elif value == "completion":
        value = {"completion": 1}
    if not isinstance(value, dict):
        raise ValueError(f"counting {value!r}: use total, prompt, completion or weights")
    prompt = float(value.get("prompt", 0) or 0)
    cached = value.get("cachedPrompt")
    return Counting(
        prompt=prompt,
        completion=float(value.get("completion", 0) or 0),
        cached_prompt=prompt if cached is None else float(cached),
        total=False,
    )
