"""Relaying a server-sent-event stream from the provider to the client, event by event.

Each upstream read is cut after its last complete SSE event; the complete events are written to
the client at once (never buffered whole). On the way the relay notes the ``usage`` the provider
reports and what it streamed (to estimate usage with tiktoken when the client goes away or the
provider reports none), and drops the usage-only chunk that the gateway asked for when the client
did not (``stream_options.include_usage``).

Without a JSON parse per event: a read whose events hold no ``"usage"`` object and no ``[DONE]``
(one regex search and one ``find``, in C) goes on as it is, and is kept raw; in a read that
holds one, only the events holding one are cut out and parsed, the runs between them go on as
they are. The text streamed is read from the raw events only when it is needed
(:meth:`StreamOutcome.streamed_text`: the client left, the provider reported no usage or failed),
or once they pass ``RAW_KEPT`` bytes (a long stream keeps its text, not its events).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from policies.translate.usage import TokenUsage

_DONE = b"[DONE]"
RAW_KEPT = 256 * 1024  # raw events kept before their text is read
_USAGE_OBJECT = re.compile(rb'"usage"\s*:\s*\{')  # not "usage":null, as every chunk has
BROKEN_MESSAGE = "The upstream connection failed mid-stream."
_BROKEN_ERROR = {"message": BROKEN_MESSAGE, "type": "upstream_error", "code": "upstream_error"}
CHAT_BROKEN = b"data: " + orjson.dumps({"error": {**_BROKEN_ERROR, "param": None}}) + b"\n\n"


@dataclass
class StreamOutcome:
    usage: dict[str, Any] | None = None
    text: list[str] = field(default_factory=list)
    done: bool = False  # the provider sent [DONE]
    client_gone: bool = False
    upstream_failed: bool = False
    events: int = 0  # a translating relay's count
    tokens: TokenUsage | None = None  # a translating relay's reading of the usage
    broken: bytes = CHAT_BROKEN  # what the client gets when the provider fails mid-stream
    raw: list[bytes] = field(default_factory=list)  # events relayed, their text not read yet
    raw_bytes: int = 0

    def streamed_text(self) -> list[str]:
        """The text streamed so far (content, tool-call arguments, completion text)."""
        raw, self.raw, self.raw_bytes = self.raw, [], 0
        for block in raw:
            for event in block.split(b"\n\n"):
                data = _data_of(event)
                if not data or data == _DONE:
                    continue
                try:
                    payload = orjson.loads(data)
                except orjson.JSONDecodeError:
                    continue
                if isinstance(payload, dict):
                    _collect_text(payload, self.text)
        return self.text


def _collect_text(payload: dict[str, Any], text: list[str]) -> None:
    for choice in payload.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        delta = choice.get("delta")
        if isinstance(delta, dict):
            content = delta.get("content")
            if isinstance(content, str) and content:
                text.append(content)
            for call in delta.get("tool_calls") or ():
                fn = call.get("function") if isinstance(call, dict) else None
                if isinstance(fn, dict) and isinstance(fn.get("arguments"), str):
                    text.append(fn["arguments"])
        elif isinstance(choice.get("text"), str):
            text.append(choice["text"])


class SSERelay:
    def __init__(self, strip_usage_chunk: bool) -> None:
        self.strip_usage_chunk = strip_usage_chunk
        self.outcome = StreamOutcome()
        self._buffer = b""

    def feed(self, chunk: bytes) -> bytes:
        """Take upstream bytes; return the complete events to send to the client now."""
        buf = self._buffer + chunk if self._buffer else chunk
        if buf[-2:] == b"\n\n":  # the read ends an event, as providers flush them
            whole, self._buffer = buf, b""
        else:
            end = buf.rfind(b"\n\n")
            if end < 0:
                self._buffer = buf
                return b""
            whole, self._buffer = buf[: end + 2], buf[end + 2 :]
        # find, not ``in``: ``bytes in bytes`` tries the operand as an int first, and formats the
        # TypeError it clears (~2k instructions a read)
        if whole.find(_DONE) < 0 and _USAGE_OBJECT.search(whole) is None:
            outcome = self.outcome
            outcome.raw.append(whole)  # nothing to read in it now
            outcome.raw_bytes += len(whole)
            if outcome.raw_bytes > RAW_KEPT:
                outcome.streamed_text()
            return whole
        if whole.find(b"\n\n\n") >= 0:  # blank lines: the events cut one by one
            return self._split(whole)
        return self._sift(whole)

    def _sift(self, whole: bytes) -> bytes:
        """The events of ``whole`` (a read holding a ``usage`` object or ``[DONE]``), less a
        stripped usage chunk: only the events holding one are looked at (:meth:`_keep`); the
        runs of events between them go on as they are, and are kept raw in one piece. What
        :meth:`_split` gives when no three newlines come in a row (each ``\\n\\n`` then ends an
        event, wherever it is looked for from)."""
        marks = [match.start() for match in _USAGE_OBJECT.finditer(whole)]
        at = whole.find(_DONE)
        while at >= 0:
            marks.append(at)
            at = whole.find(_DONE, at + len(_DONE))
        marks.sort()
        raw = self.outcome.raw
        out: list[bytes] = []
        done = 0  # whole[:done] is dealt with (an event's end)
        for mark in marks:
            if mark < done:  # in the event just looked at
                continue
            start = whole.rfind(b"\n\n", done, mark)
            start = done if start < 0 else start + 2
            end = whole.find(b"\n\n", mark) + 2
            if start > done:
                run = whole[done:start]
                raw.append(run)
                out.append(run)
            event = whole[start:end]
            if self._keep(event):
                out.append(event)
            done = end
        if done < len(whole):
            run = whole[done:]
            raw.append(run)
            out.append(run)
        return b"".join(out)

    def _split(self, whole: bytes) -> bytes:
        out: list[bytes] = []
        start = 0
        while start < len(whole):
            end = whole.find(b"\n\n", start)
            # a read cut after three newlines ends in a lone one (a blank line, kept as it is)
            end = len(whole) if end < 0 else end + 2
            event = whole[start:end]
            start = end
            if self._keep(event):
                out.append(event)
        return b"".join(out)

    def flush(self) -> bytes:
        """The stream ended cleanly; without ``[DONE]`` the provider cut it: that is a failure
        (the client gets an error event, never a clean end)."""
        if not self.outcome.done:
            self.outcome.upstream_failed = True
        rest, self._buffer = self._buffer, b""
        return rest

    def _keep(self, event: bytes) -> bool:
        data = _data_of(event)
        if data is None:
            return True
        if data == _DONE:
            self.outcome.done = True
            return True
        if _USAGE_OBJECT.search(data) is None:
            self.outcome.raw.append(event)
            return True
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True
        if not isinstance(payload, dict):
            return True
        usage = payload.get("usage")
        if isinstance(usage, dict):
            self.outcome.usage = usage
            if self.strip_usage_chunk and not payload.get("choices"):
                return False
        self.outcome.raw.append(event)  # its text in order with the others', when needed
        return True


def _data_of(event: bytes) -> bytes | None:
    """The ``data:`` payload of one event (single-line data, as OpenAI sends)."""
    if event.startswith(b"data: ") and event.find(b"\n") >= len(event) - 2:
        return event[6:].strip()  # the usual one-line event
    for line in event.split(b"\n"):
        line = line.rstrip(b"\r")
        if line.startswith(b"data:"):
            return line[5:].strip()
    return None


async def _chunks(upstream: aiohttp.ClientResponse, first: bytes) -> AsyncIterator[bytes]:
    if first:
        yield first
    async for chunk in upstream.content.iter_any():
        yield chunk


async def relay(
    upstream: aiohttp.ClientResponse,
    client: web.StreamResponse,
    relay: SSERelay,
    max_bytes: int,
    first: bytes = b"",
) -> StreamOutcome:
    """Copy the stream (``first``: its bytes read already) until it ends, the client leaves or
    the provider fails (a stream past ``max_bytes``, the upstream's ``max_response_bytes``, is a
    failure)."""
    outcome = relay.outcome
    size = 0
    try:
        async for chunk in _chunks(upstream, first):
            room, size = max_bytes - size, size + len(chunk)
            over = size > max_bytes  # relay what is within the bound, then fail
            data = relay.feed(chunk[:room] if over else chunk)
            if data and not await _write(client, data, outcome):
                break
            if over:
                outcome.upstream_failed = True
                break
        else:
            rest = relay.flush()
            if rest:
                await _write(client, rest, outcome)
    except (aiohttp.ClientError, TimeoutError):
        outcome.upstream_failed = True
    if outcome.client_gone or outcome.upstream_failed:
        upstream.close()
    return outcome


async def error_body(response: aiohttp.ClientResponse, max_bytes: int) -> bytes:
    """A provider's error body, or nothing past ``max_bytes`` (then its status alone tells)."""
    body = bytearray()
    with contextlib.suppress(Exception):
        async for chunk in response.content.iter_any():
            body += chunk
            if len(body) > max_bytes:
                return b""
    return bytes(body)


async def _write(client: web.StreamResponse, data: bytes, outcome: StreamOutcome) -> bool:
    try:
        await client.write(data)
    except (ConnectionError, RuntimeError):
        outcome.client_gone = True
        return False
    return True
