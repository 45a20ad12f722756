"""One token usage shape, read from and written to each protocol's ``usage`` object.

:class:`TokenUsage` follows the ledger's convention: ``prompt_tokens`` counts every input token,
cache reads (``cached_tokens``) and cache writes (``cache_write_tokens``) included;
``completion_tokens`` counts every output token, reasoning (``reasoning_tokens``) included.

  * Chat Completions: ``prompt_tokens`` (cached included, ``prompt_tokens_details.cached_tokens``),
    ``completion_tokens`` (reasoning included, ``completion_tokens_details.reasoning_tokens``);
    cache writes travel as ``cache_creation_input_tokens`` (the key LiteLLM and others use).
  * Anthropic Messages: ``input_tokens`` is the *uncached* part; ``cache_read_input_tokens`` and
    ``cache_creation_input_tokens`` come beside it; ``output_tokens`` includes thinking
    (``output_tokens_details.thinking_tokens``).
  * Responses API: ``input_tokens`` (cached included, ``input_tokens_details.cached_tokens``),
    ``output_tokens`` (reasoning included, ``output_tokens_details.reasoning_tokens``).

A reader returns ``None`` when the object is missing or holds no usable counts, so that the
gateway can fall back to its own estimate rather than bill zero.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any


@dataclass(slots=True)
class PromptParts:
    """What a request puts before the model, for the hold's count: its texts (tiktoken counts
    them) and its image parts (counted at the model's ``image_tokens`` each)."""

    texts: list[str]
    images: int = 0


@dataclass(frozen=True, slots=True)
class TokenUsage:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    reasoning_tokens: int = 0

    @property
    def uncached_input(self) -> int:
        """Anthropic's ``input_tokens``: the prompt less cache reads and writes."""
        return max(0, self.prompt_tokens - self.cached_tokens - self.cache_write_tokens)


def _count(value: Any) -> int | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return None


def _detail(obj: Mapping[str, Any], section: str, key: str) -> int:
    details = obj.get(section)
    if details is None:  # the common case, without the ABC check below
        return 0
    return (_count(details.get(key)) or 0) if isinstance(details, Mapping) else 0


def from_chat(usage: Any) -> TokenUsage | None:
    """Read a Chat Completions (or legacy completions / embeddings) ``usage`` object."""
    if not isinstance(usage, dict) and not isinstance(usage, Mapping):  # dict: no ABC check
        return None
    prompt = _count(usage.get("prompt_tokens"))
    if prompt is None:
        return None
    completion = _count(usage.get("completion_tokens")) or 0
    cached = _detail(usage, "prompt_tokens_details", "cached_tokens")
    writes = _count(usage.get("cache_creation_input_tokens")) or 0
    reasoning = _detail(usage, "completion_tokens_details", "reasoning_tokens")
    return TokenUsage(prompt, completion, cached, writes, reasoning)


def from_anthropic(usage: Any) -> TokenUsage | None:
    """Read an Anthropic ``usage`` (a Message's, or the cumulative one of ``message_delta``)."""
    if not isinstance(usage, Mapping):
        return None
    uncached = _count(usage.get("input_tokens"))
    output = _count(usage.get("output_tokens"))
    if uncached is None and output is None:
        return None
    reads = _count(usage.get("cache_read_input_tokens")) or 0
    writes = _count(usage.get("cache_creation_input_tokens")) or 0
    thinking = _detail(usage, "output_tokens_details", "thinking_tokens")
    return TokenUsage((uncached or 0) + reads + writes, output or 0, reads, writes, thinking)


def from_responses(usage: Any) -> TokenUsage | None:
    """Read a Responses API ``usage`` object."""
    if not isinstance(usage, Mapping):
        return None
    prompt = _count(usage.get("input_tokens"))
    if prompt is None:
        return None
    completion = _count(usage.get("output_tokens")) or 0
    cached = _detail(usage, "input_tokens_details", "cached_tokens")
    reasoning = _detail(usage, "output_tokens_details", "reasoning_tokens")
    return TokenUsage(prompt, completion, cached, 0, reasoning)


def to_chat(usage: TokenUsage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
        "completion_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
    }
    if usage.cache_write_tokens or usage.cached_tokens:
        out["cache_read_input_tokens"] = usage.cached_tokens
        out["cache_creation_input_tokens"] = usage.cache_write_tokens
    return out


def to_anthropic(usage: TokenUsage) -> dict[str, Any]:
    out: dict[str, Any] = {
        "input_tokens": usage.uncached_input,
        "cache_creation_input_tokens": usage.cache_write_tokens,
        "cache_read_input_tokens": usage.cached_tokens,
        "output_tokens": usage.completion_tokens,
    }
    if usage.reasoning_tokens:
        out["output_tokens_details"] = {"thinking_tokens": usage.reasoning_tokens}
    return out


def to_responses(usage: TokenUsage) -> dict[str, Any]:
    return {
        "input_tokens": usage.prompt_tokens,
        "input_tokens_details": {"cached_tokens": usage.cached_tokens},
        "output_tokens": usage.completion_tokens,
        "output_tokens_details": {"reasoning_tokens": usage.reasoning_tokens},
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
    }
