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
from policies.translate.usage import TokenUsage

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


def prompt_texts(body: Mapping[str, Any]) -> list[str]:
    """The texts of ``instructions`` and ``input`` that the model reads."""
    texts: list[str] = []
    if isinstance(body.get("instructions"), str):
        texts.append(body["instructions"])
    items = body.get("input")
    if isinstance(items, str):
        texts.append(items)
    elif isinstance(items, list):
        for item in items:
            if isinstance(item, Mapping):
                texts.extend(_item_texts(item))
    return texts


def _item_texts(item: Mapping[str, Any]) -> list[str]:
    content = item.get("content")
    if isinstance(content, str):
        return [content]
    out: list[str] = []
    if isinstance(content, list):
        for part in content:
            if isinstance(part, Mapping) and isinstance(part.get("text"), str):
                out.append(part["text"])
    for key in ("arguments", "output", "input"):  # function calls, their outputs, custom tools
        if isinstance(item.get(key), str):
            out.append(item[key])
    return out


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
