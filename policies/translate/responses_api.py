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
from dataclasses import dataclass
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


_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-")
MAX_ID_LENGTH = 200


def response_id(value: Any) -> str | None:
    """``value`` if it can be a response id the gateway keeps a note of (a Redis key part):
    a non-empty string of letters, digits, ``_`` and ``-``, at most 200 long."""
    if isinstance(value, str) and 0 < len(value) <= MAX_ID_LENGTH and _ID_CHARS.issuperset(value):
        return value
    return None


def continued(body: Mapping[str, Any]) -> str | None:
    """The stored response a request continues (``previous_response_id``): the provider bills
    that conversation again as input, which the request's own body does not show."""
    return response_id(body.get("previous_response_id"))


def stored(body: Mapping[str, Any]) -> bool:
    """Whether the provider keeps the response for later requests to continue (``store``,
    true unless the request says false)."""
    return body.get("store") is not False


@dataclass(frozen=True, slots=True)
class Note:
    """What the gateway remembers of a stored response: the input a request continuing it is
    billed for (the response's whole input and output), and the deployment that stored it."""

    response_id: str
    tokens: int
    served_by: str  # "<upstream>/<upstream_model>"

    def encode(self) -> str:
        return f"{self.tokens}|{self.served_by}"

    @classmethod
    def decode(cls, response_id: str, raw: str | bytes | None) -> Note | None:
        if raw is None:
            return None
        text = raw.decode() if isinstance(raw, bytes) else raw
        tokens, _, served_by = text.partition("|")
        if not tokens.isdigit() or not served_by:
            return None  # not a note this version wrote: as if there were none
        return cls(response_id, int(tokens), served_by)


def note_of(response: Any, usage: TokenUsage | None, served_by: str) -> Note | None:
    """The note to keep of a relayed ``response`` object (a plain answer, or a stream's
    terminal event's): None without an id or usage."""
    if not isinstance(response, Mapping) or usage is None:
        return None
    rid = response_id(response.get("id"))
    if rid is None:
        return None
    return Note(rid, usage.prompt_tokens + usage.completion_tokens, served_by)


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
        self.response: Any = None  # the terminal event's response object

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
            self.response = event.get("response")
