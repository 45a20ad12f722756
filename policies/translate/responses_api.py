"""What the OpenAI Responses API needs to be billed.

* the hold: the texts of ``instructions`` and ``input`` (counted with tiktoken by the gateway) and
  the output cap (``max_output_tokens``, else the model's ``max_output_tokens``);
* the charge: ``usage`` of the terminal event that ends a stream (``response.completed``,
  ``response.incomplete`` or ``response.failed``), or of the plain ``response`` object;
  ``input_tokens`` include ``input_tokens_details.cached_tokens``, ``output_tokens`` include
  ``output_tokens_details.reasoning_tokens``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policies.translate import usage as usage_mod
from policies.translate.usage import PromptParts, TokenUsage

TERMINAL_EVENTS = frozenset({"response.completed", "response.incomplete", "response.failed"})
_TEXT_DELTAS = frozenset(
    {
        "response.output_text.delta",
        "response.refusal.delta",
        "response.function_call_arguments.delta",
        "response.reasoning_text.delta",
        "response.reasoning_summary_text.delta",
    }
)


def prompt(body: Mapping[str, Any]) -> PromptParts:
    """The texts of ``instructions`` and ``input`` that the model reads, and its
    ``input_image`` parts."""
    parts = PromptParts([])
    if isinstance(body.get("instructions"), str):
        parts.texts.append(body["instructions"])
    items = body.get("input")
    if isinstance(items, str):
        parts.texts.append(items)
    elif isinstance(items, list):
        for item in items:
            if isinstance(item, Mapping):
                _item(item, parts)
    return parts


def _item(item: Mapping[str, Any], parts: PromptParts) -> None:
    content = item.get("content")
    if isinstance(content, str):
        parts.texts.append(content)
        return
    _content(content, parts)
    for key in ("arguments", "output", "input"):  # function calls, their outputs, custom tools
        value = item.get(key)
        if isinstance(value, str):
            parts.texts.append(value)
        elif key == "output":
            _content(value, parts)  # a function call's output as input parts


def _content(content: Any, parts: PromptParts) -> None:
    for part in content if isinstance(content, list) else ():
        if isinstance(part, Mapping):
            if isinstance(part.get("text"), str):
                parts.texts.append(part["text"])
            elif part.get("type") == "input_image":
                parts.images += 1


def output_cap(body: Mapping[str, Any], model_max_output: int) -> int:
    value = body.get("max_output_tokens")
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return value
    return model_max_output


def usage_of_response(response: Any) -> TokenUsage | None:
    """The usage of a ``response`` object (a plain answer, or a terminal event's)."""
    return (
        usage_mod.from_responses(response.get("usage")) if isinstance(response, Mapping) else None
    )


def usage_of_event(event: Mapping[str, Any]) -> TokenUsage | None:
    """The usage a stream event bills: only terminal events carry it."""
    if event.get("type") not in TERMINAL_EVENTS:
        return None
    return usage_of_response(event.get("response"))


class ResponsesWatch:
    """Follows a relayed Responses stream: the text it streamed, and how it ended."""

    def __init__(self) -> None:
        self.text: list[str] = []
        self.usage: TokenUsage | None = None
        self.terminal: str | None = None  # the terminal event's type, once seen

    @property
    def complete(self) -> bool:
        return self.terminal is not None

    def feed(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        if kind in _TEXT_DELTAS:
            delta = event.get("delta")
            if isinstance(delta, str):
                self.text.append(delta)
        elif kind in TERMINAL_EVENTS:
            self.terminal = str(kind)
            self.usage = usage_of_event(event)
