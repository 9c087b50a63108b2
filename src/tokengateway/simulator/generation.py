"""The simulated model: which words a reply has, shared by every text-generating endpoint.

Replies are predictable on purpose: in `echo` mode they repeat the prompt, in `random` mode
they are drawn from a fixed list of sentences (repeatable with `--seed`), and one token is one
whitespace-separated word, so a test can know the usage numbers before it sends a request.
"""

from __future__ import annotations

import random
from typing import Any

from tokengateway.simulator.options import Mode
from tokengateway.simulator.wire import ApiError

__all__ = ["SENTENCES", "Model", "spaced"]

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
# Share of `random` replies that run to `max_tokens` (and so end because of the limit).
_FULL_LENGTH_SHARE = 0.15


class Model:
    """The served model: its names, its context window and the one random source of a
    simulator process, which decides reply words."""

    def __init__(self, names: list[str], mode: Mode, seed: int | None, max_model_len: int) -> None:
        self.names = frozenset(names)
        self.mode = mode
        self.max_model_len = max_model_len
        self._rng = random.Random(seed)
        self._sentences = tuple(tuple(s.split()) for s in SENTENCES)

    def check_name(self, model: Any) -> str:
        """The requested model name, or the 404 llm-d answers for an unknown one."""
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "`model` must be a string", "model")
        if model not in self.names:
            raise ApiError(404, f"The model `{model or ''}` does not exist.")
        return model

    def check_context(
        self, prompt_tokens: int, max_tokens: int | None, prompt_name: str, max_name: str
    ) -> None:
        """400 when prompt plus requested completion overflow `--max-model-len` (OpenAI's
        wording; with no maximum given, one completion token is due)."""
        requested = max_tokens if max_tokens is not None else 1
        limit = self.max_model_len
        if prompt_tokens + requested > limit:
            raise ApiError(
                400,
                f"This model's maximum context length is {limit} tokens. However, you requested "
                f"{prompt_tokens + requested} tokens ({prompt_tokens} in the {prompt_name}, "
                f"{requested} in the completion). Please reduce the length of the "
                f"{prompt_name} or completion.",
                max_name if max_tokens is not None else prompt_name,
            )

    def reply(
        self, echo_text: str, prompt_tokens: int, max_tokens: int | None
    ) -> tuple[list[str], bool]:
        """The reply's words and whether they were cut at `max_tokens` (the "length" finish)."""
        if self.mode == "echo":
            words = echo_text.split()
            cap = max_tokens
        else:
            cap = max_tokens if max_tokens is not None else self.max_model_len - prompt_tokens
            words = self._random_words(self._random_length(cap, max_tokens is not None))
        if cap is not None and len(words) >= cap:
            del words[cap:]
            return words, True
        return words, False

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


def spaced(words: list[str]) -> list[str]:
    """Per-word deltas whose concatenation is the reply text: "a", " b", " c"."""
    return [w if i == 0 else " " + w for i, w in enumerate(words)]
