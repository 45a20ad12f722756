"""``gateway.proxy.streaming.SSERelay``: the reads that hold no usage object and no ``[DONE]`` go
on without a JSON parse, and what the relay gives, keeps and reads is what a parse of every event
(the relay before it took that shortcut, restated here) gives, however the stream is cut."""

from __future__ import annotations

import random
from typing import Any

import orjson
import pytest

from gateway.proxy import streaming
from gateway.proxy.streaming import SSERelay


def event(payload: dict[str, Any] | str) -> bytes:
    data = payload.encode() if isinstance(payload, str) else orjson.dumps(payload)
    return b"data: " + data + b"\n\n"


def chunk(content: str | None = None, usage: dict[str, int] | None = None, **extra: Any) -> bytes:
    choices = [] if content is None else [{"index": 0, "delta": {"content": content}}]
    return event({"object": "chat.completion.chunk", "choices": choices, "usage": usage, **extra})


USAGE = {"prompt_tokens": 9, "completion_tokens": 4, "total_tokens": 13}
PIECES = ["Hello", ' "usage"', " [DONE] is", " text", ""]
STREAMS = {
    "asked usage": [*(chunk(p) for p in PIECES), chunk(None, USAGE), event("[DONE]")],
    "no usage": [*(chunk(p) for p in PIECES), event("[DONE]")],
    "usage in the last content chunk": [chunk("a"), chunk("b", USAGE), event("[DONE]")],
    "spaced json and comments": [
        b": keep-alive\n\n",
        b'data: {"choices": [{"delta": {"content": "x"}}], "usage": null}\n\n',
        b'data: {"choices": [], "usage": {"prompt_tokens": 1, "completion_tokens": 1}}\n\n',
        b"event: done\ndata: [DONE]\n\n",
    ],
    "tool calls and legacy text": [
        event({"choices": [{"delta": {"tool_calls": [{"function": {"arguments": '{"a"'}}]}}]}),
        event({"choices": [{"text": "legacy"}]}),
        b"data: not json\n\n",
        event("[DONE]"),
    ],
    "cut before [DONE]": [chunk("one"), chunk(" two"), b'data: {"choi'],
    "usage twice, [DONE] in the text": [
        chunk("[DONE]"),
        chunk(None, USAGE),
        chunk("x", USAGE),
        chunk(None, {"prompt_tokens": 2, "completion_tokens": 3}),
        event("[DONE]"),
        chunk("after"),
    ],
    "blank lines between events": [
        chunk("a"),
        b"\n",
        chunk("b"),
        b"\n\n",
        chunk(None, USAGE),
        b"\n",
        event("[DONE]"),
    ],
    "a usage key split over two events": [chunk("a"), b'data: {"usage"\n\n', b": {}}\n\n"],
    "spaced nulls, keys back to back": [
        b'data: {"choices": [{"delta": {"content": "a"}}], "usage": null}\n\n',
        b'data: {"choices": [{"delta": {"content": "b"}}], "x": "usage"usage":null}\n\n',
        b'data: {"choices": [], "usage"usage": {"prompt_tokens": 1}}\n\n',
        b'data: {"choices": [], "usage" :\t{"prompt_tokens": 2, "completion_tokens": 1}}\n\n',
        event("[DONE]"),
    ],
}


class Reference:
    """The relay as it was: every event split out and parsed."""

    def __init__(self, strip: bool) -> None:
        self.strip, self.buffer = strip, b""
        self.usage: dict[str, Any] | None = None
        self.text: list[str] = []
        self.done = False

    def feed(self, data: bytes) -> bytes:
        buf, out, start = self.buffer + data, [], 0
        while (end := buf.find(b"\n\n", start)) >= 0:
            ev, start = buf[start : end + 2], end + 2
            if self.keep(ev):
                out.append(ev)
        self.buffer = buf[start:]
        return b"".join(out)

    def keep(self, ev: bytes) -> bool:
        data = next((ln[5:].strip() for ln in ev.split(b"\n") if ln.startswith(b"data:")), None)
        if data is None:
            return True
        if data == b"[DONE]":
            self.done = True
            return True
        try:
            payload = orjson.loads(data)
        except orjson.JSONDecodeError:
            return True
        if isinstance(payload.get("usage"), dict):
            self.usage = payload["usage"]
            if self.strip and not payload.get("choices"):
                return False
        streaming._collect_text(payload, self.text)
        return True


@pytest.mark.parametrize("name", sorted(STREAMS))
@pytest.mark.parametrize("strip", [True, False])
def test_the_relay_gives_what_a_parse_of_every_event_gives(name: str, strip: bool) -> None:
    whole = b"".join(STREAMS[name])
    rng = random.Random(name)
    for attempt in range(60):
        cuts = sorted(rng.sample(range(1, len(whole)), min(attempt % 7, len(whole) - 1)))
        if attempt == 0:  # one read per event, as providers flush
            reads = STREAMS[name]
        else:
            reads = [whole[a:b] for a, b in zip([0, *cuts], [*cuts, len(whole)], strict=True)]
        relay, reference = SSERelay(strip), Reference(strip)
        got = b"".join(relay.feed(r) for r in reads)
        assert got == b"".join(reference.feed(r) for r in reads)
        assert relay.flush() == reference.buffer
        outcome = relay.outcome
        assert (outcome.usage, outcome.done) == (reference.usage, reference.done)
        assert outcome.upstream_failed is not reference.done
        assert outcome.streamed_text() == reference.text


def test_a_read_without_usage_or_done_goes_on_unparsed(monkeypatch: pytest.MonkeyPatch) -> None:
    relay = SSERelay(True)
    data = chunk("a") + chunk("b")

    def no_parse(_: bytes) -> Any:
        raise AssertionError("parsed")

    monkeypatch.setattr(streaming.orjson, "loads", no_parse)
    assert relay.feed(data) is data  # the same bytes object: nothing copied
    monkeypatch.undo()
    assert relay.outcome.streamed_text() == ["a", "b"]


def test_only_the_events_holding_usage_or_done_are_parsed(monkeypatch: pytest.MonkeyPatch) -> None:
    relay = SSERelay(True)
    reads = b"".join([chunk(" piece"), chunk(" more"), chunk(None, USAGE), event("[DONE]")])
    parsed: list[bytes] = []
    loads = streaming.orjson.loads

    def counted(data: bytes) -> Any:
        parsed.append(data)
        return loads(data)

    monkeypatch.setattr(streaming.orjson, "loads", counted)
    assert relay.feed(reads) == chunk(" piece") + chunk(" more") + event("[DONE]")
    assert parsed == [
        orjson.dumps({"object": "chat.completion.chunk", "choices": [], "usage": USAGE})
    ]
    assert (relay.outcome.usage, relay.outcome.done) == (USAGE, True)
    monkeypatch.undo()
    assert relay.outcome.streamed_text() == [" piece", " more"]


def test_a_long_stream_keeps_its_text_not_its_events(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(streaming, "RAW_KEPT", 300)
    reads = [chunk(f" piece {i}") for i in range(40)] + [chunk(None, USAGE), event("[DONE]")]
    relay, reference = SSERelay(True), Reference(True)
    for read in reads:
        assert relay.feed(read) == reference.feed(read)
        assert relay.outcome.raw_bytes <= 300 + len(read)
    assert relay.outcome.streamed_text() == reference.text


def test_a_read_ending_in_a_blank_line_is_relayed() -> None:
    """A read cut after three newlines (an empty line after an event): the relay once looped on
    it for ever, blocking the event loop, when the read held a usage object or ``[DONE]``."""
    relay = SSERelay(True)
    assert relay.feed(chunk("a") + event("[DONE]") + b"\n") == chunk("a") + event("[DONE]") + b"\n"
    assert relay.outcome.done
    assert relay.outcome.streamed_text() == ["a"]
