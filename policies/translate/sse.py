"""Server-sent events: an incremental decoder and the encoders of each protocol's framing.

OpenAI Chat Completions frames events as ``data: {json}\\n\\n`` and ends with ``data: [DONE]``;
Anthropic Messages and the Responses API put the event type on an ``event:`` line before the
``data:`` line, and send no ``[DONE]``.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson

DONE = b"[DONE]"


@dataclass(frozen=True, slots=True)
class SseEvent:
    event: str | None  # the ``event:`` line, if any
    data: bytes  # the ``data:`` lines joined by newlines (b"" when none)

    def json(self) -> Any:
        """The data parsed as JSON (raises ``orjson.JSONDecodeError``)."""
        return orjson.loads(self.data)


class SseDecoder:
    """Feed bytes as they arrive; get back every event completed by them."""

    def __init__(self) -> None:
        self._buffer = b""

    def feed(self, chunk: bytes) -> list[SseEvent]:
        buf = (self._buffer + chunk).replace(b"\r\n", b"\n")
        events: list[SseEvent] = []
        start = 0
        while (end := buf.find(b"\n\n", start)) >= 0:
            event = _parse(buf[start:end])
            start = end + 2
            if event is not None:
                events.append(event)
        self._buffer = buf[start:]
        return events

    @property
    def pending(self) -> bytes:
        """Bytes of an event not completed yet."""
        return self._buffer


def _parse(block: bytes) -> SseEvent | None:
    name: str | None = None
    data: list[bytes] = []
    for line in block.split(b"\n"):
        if not line or line.startswith(b":"):
            continue
        field, _, value = line.partition(b":")
        value = value.removeprefix(b" ")
        if field == b"event":
            name = value.decode("utf-8", "replace")
        elif field == b"data":
            data.append(value)
    if name is None and not data:
        return None
    return SseEvent(name, b"\n".join(data))


def typed_event(payload: dict[str, Any]) -> bytes:
    """An Anthropic / Responses API event: ``event: <type>`` then its data."""
    return (
        b"event: " + str(payload["type"]).encode() + b"\ndata: " + orjson.dumps(payload) + b"\n\n"
    )


def data_event(payload: dict[str, Any]) -> bytes:
    """A Chat Completions event: ``data: {json}``."""
    return b"data: " + orjson.dumps(payload) + b"\n\n"


DONE_EVENT = b"data: [DONE]\n\n"
