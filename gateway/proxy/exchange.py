"""How one client surface is served by one upstream protocol: the upstream route and body, the
reading of a plain answer, and the relay of a stream.

=================  ==========  ============================================================
client surface     upstream    exchange
=================  ==========  ============================================================
chat / completion  openai      :class:`Passthrough` (the client's bytes, the provider's answer)
/ embedding
chat               anthropic   :class:`ChatOnMessages` (translated both ways, streams included)
messages           anthropic   :class:`MessagesPassthrough` (unknown fields, headers, errors kept)
messages           openai      :class:`MessagesOnChat` (translated both ways)
responses          openai      :class:`ResponsesPassthrough`
anything else                  400 ``unsupported_endpoint``
=================  ==========  ============================================================

The translation itself is pure code in :mod:`policies.translate`; here it meets the proxy's
:class:`~gateway.proxy.handlers.Call`. A provider's answer that is not what its protocol promises
raises :class:`UpstreamFailed` (502 ``upstream_error``: the hold is released, nothing charged).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import orjson

from gateway import state as S
from gateway.errors import InvalidRequest, UpstreamFailed
from gateway.proxy.streaming import BROKEN_MESSAGE, CHAT_BROKEN, SSERelay
from gateway.upstream.provider import ANTHROPIC, OPENAI
from policies.translate import TranslationError, replies, requests, responses_api
from policies.translate import usage as usage_mod
from policies.translate.sse import DONE, DONE_EVENT, SseDecoder, SseEvent, data_event, typed_event
from policies.translate.streams import ChatToMessagesStream, MessagesToChatStream, MessageUsage
from policies.translate.usage import TokenUsage

if TYPE_CHECKING:
    from gateway.proxy.handlers import Call
    from gateway.proxy.tokens import TokenCounter

MESSAGES_BROKEN = typed_event(
    {"type": "error", "error": {"type": "api_error", "message": BROKEN_MESSAGE}}
)


@dataclass(frozen=True, slots=True)
class Answer:
    """A plain answer as the client gets it, and what it costs (``None``: estimate)."""

    body: bytes
    tokens: TokenUsage | None
    texts: list[str] = field(default_factory=list)


def malformed(what: str) -> UpstreamFailed:
    return UpstreamFailed(f"upstream error: malformed answer ({what})", status=502)


def _json_object(raw: bytes) -> dict[str, Any]:
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise malformed("not JSON") from exc
    if not isinstance(value, dict):
        raise malformed("not a JSON object")
    return value


def _renamed(call: Call) -> bytes:
    """The client's body, with the upstream's model name if it differs."""
    if call.model.upstream_model == call.model.name:
        return call.raw
    return orjson.dumps({**call.body, "model": call.model.upstream_model})


class Exchange:
    route = "/chat/completions"
    native = False  # OpenAI on both sides: the proxy's own (fast) code, not these methods
    forwards_headers = False  # the client's anthropic-* headers go upstream

    def prepare(self, call: Call) -> None:
        """Check (and translate) the client's body before the hold: raises 400s."""

    def body(self, call: Call, stream: bool) -> bytes:
        raise NotImplementedError

    def answer(self, call: Call, raw: bytes) -> Answer:
        raise NotImplementedError

    def relay(self, call: Call) -> SSERelay:
        raise NotImplementedError


class Passthrough(Exchange):
    """OpenAI's protocol on both sides: the existing hot path (see ``handlers``)."""

    native = True

    def __init__(self, route: str) -> None:
        self.route = route


class _Translated(Exchange):
    """The upstream body is the client's translated to the upstream's protocol, before the hold
    (what cannot be translated is the client's 400)."""

    def translate(self, call: Call) -> dict[str, Any]:
        raise NotImplementedError

    def prepare(self, call: Call) -> None:
        try:
            body = self.translate(call)
        except TranslationError as exc:
            raise InvalidRequest(exc.message, param=exc.param) from exc
        body["model"] = call.model.upstream_model
        call.translated = body

    def body(self, call: Call, stream: bool) -> bytes:
        assert call.translated is not None
        return orjson.dumps(call.translated)


class ChatOnMessages(_Translated):
    route = "/messages"

    def translate(self, call: Call) -> dict[str, Any]:
        return requests.chat_to_messages(call.body, call.model.max_output_tokens)

    def answer(self, call: Call, raw: bytes) -> Answer:
        reply = _json_object(raw)
        try:
            chat = replies.message_to_chat(reply, call.model.name, int(call.now))
        except replies.MalformedReply as exc:
            raise malformed(str(exc)) from exc
        return Answer(orjson.dumps(chat), usage_mod.from_anthropic(reply.get("usage")))

    def relay(self, call: Call) -> SSERelay:
        options = call.body.get("stream_options")
        wants = isinstance(options, dict) and bool(options.get("include_usage"))
        translator = MessagesToChatStream(call.model.name, int(call.now), wants)
        return ChatFromMessagesRelay(translator)


class MessagesPassthrough(Exchange):
    route = "/messages"
    forwards_headers = True

    def body(self, call: Call, stream: bool) -> bytes:
        return _renamed(call)

    def answer(self, call: Call, raw: bytes) -> Answer:
        reply = _json_object(raw)
        tokens = usage_mod.from_anthropic(reply.get("usage"))
        if reply.get("type") != "message" or tokens is None:
            raise malformed("not a message with usage")
        return Answer(raw, tokens)

    def relay(self, call: Call) -> SSERelay:
        return MessagesRelay()


class MessagesOnChat(_Translated):
    def translate(self, call: Call) -> dict[str, Any]:
        return requests.messages_to_chat(call.body)

    def answer(self, call: Call, raw: bytes) -> Answer:
        reply = _json_object(raw)
        tokens = usage_mod.from_chat(reply.get("usage"))
        try:
            message = replies.chat_to_message(reply, call.model.name, tokens)
        except replies.MalformedReply as exc:
            raise malformed(str(exc)) from exc
        texts = [b.get("text", "") for b in message["content"] if b.get("type") == "text"]
        return Answer(orjson.dumps(message), tokens, texts)

    def relay(self, call: Call) -> SSERelay:
        return MessagesFromChatRelay(ChatToMessagesStream(call.model.name, call.prompt_tokens))


class ResponsesPassthrough(Exchange):
    route = "/responses"

    def body(self, call: Call, stream: bool) -> bytes:
        return _renamed(call)

    def answer(self, call: Call, raw: bytes) -> Answer:
        reply = _json_object(raw)
        if reply.get("object") != "response":
            raise malformed("not a response object")
        texts: list[str] = []
        for item in reply.get("output") or []:
            for part in item.get("content") or [] if isinstance(item, dict) else []:
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    texts.append(part["text"])
        tokens = responses_api.usage_of_response(reply)
        remember(call, reply, tokens)
        return Answer(raw, tokens, texts)

    def relay(self, call: Call) -> SSERelay:
        return ResponsesRelay(call)


def remember(call: Call, response: Any, tokens: TokenUsage | None) -> None:
    """A stored response's note, kept by its settle: what a request continuing it is held for,
    and where it goes (:func:`gateway.proxy.handlers.continue_response`)."""
    if responses_api.stored(call.body) and call.route is not None:
        call.note = responses_api.note_of(response, tokens, call.route.target.served_by)


PASSTHROUGH = {
    "chat": Passthrough("/chat/completions"),
    "completion": Passthrough("/completions"),
    "embedding": Passthrough("/embeddings"),
}
EXCHANGES: dict[tuple[str, str], Exchange] = {
    **{(kind, OPENAI): exchange for kind, exchange in PASSTHROUGH.items()},
    ("chat", ANTHROPIC): ChatOnMessages(),
    ("messages", ANTHROPIC): MessagesPassthrough(),
    ("messages", OPENAI): MessagesOnChat(),
    ("responses", OPENAI): ResponsesPassthrough(),
}


def exchange_for(surface: str, protocol: str) -> Exchange:
    exchange = EXCHANGES.get((surface, protocol))
    if exchange is None:
        raise InvalidRequest(
            "This endpoint is not available for this model's provider.",
            code="unsupported_endpoint",
            param="model",
        )
    return exchange


def forwarded_headers(call: Call) -> dict[str, str]:
    """The client's headers that travel upstream (Anthropic's ``anthropic-version``/``-beta``)."""
    if not call.exchange.forwards_headers:
        return {}
    headers = call.request.headers if call.request is not None else call.client_headers
    if not headers:
        return {}
    return call.app[S.UPSTREAMS].providers[call.model.upstream].forward(headers)


def count_texts(
    tokens: TokenCounter, surface: str, encoding: str, body: dict[str, Any], image_tokens: int
) -> int:
    """The hold's prompt count for a Messages or Responses body: its texts, plus 3 per message,
    plus ``image_tokens`` per image part."""
    if surface == "messages":
        parts = requests.message_prompt(body)
        items = body.get("messages")
    else:
        parts = responses_api.prompt(body)
        items = body.get("input")
    overhead = 3 * (len(items) + 1) if isinstance(items, list) else 3
    texts = tokens.count_text("\n".join(parts.texts), encoding)
    return texts + overhead + parts.images * image_tokens


# --- stream relays -------------------------------------------------------------------------------


class _EventRelay(SSERelay):
    """Upstream SSE bytes in, client bytes out, one whole event at a time (never buffered
    whole); a stream that ends before its protocol's proper end counts as failed (the client
    gets ``broken`` and the request is billed on what was streamed)."""

    broken = CHAT_BROKEN

    def __init__(self) -> None:
        super().__init__(strip_usage_chunk=False)
        self._decoder = SseDecoder()
        self.complete = False
        self.outcome.broken = self.broken

    def feed(self, chunk: bytes) -> bytes:
        out: list[bytes] = []
        for event in self._decoder.feed(chunk):
            self.outcome.events += 1
            if self.outcome.upstream_failed:
                break
            try:
                out.append(self.event(event))
            except (orjson.JSONDecodeError, TypeError, ValueError, AttributeError):
                self.outcome.upstream_failed = True  # a malformed event ends the stream
        return b"".join(out)

    def flush(self) -> bytes:
        if not self.complete:
            self.outcome.upstream_failed = True
        return b""

    def event(self, event: SseEvent) -> bytes:
        raise NotImplementedError


class ChatFromMessagesRelay(_EventRelay):
    def __init__(self, translator: MessagesToChatStream) -> None:
        super().__init__()
        self.translator = translator
        self.outcome.text = translator.text

    def event(self, event: SseEvent) -> bytes:
        payload = event.json()
        chunks = self.translator.feed(payload)
        if self.translator.error is not None:
            self.outcome.upstream_failed = True
        out = b"".join(data_event(c) for c in chunks)
        if self.translator.complete:
            self.complete = True
            self.outcome.done = True
            self.outcome.tokens = self.translator.usage
            out += DONE_EVENT
        return out


class MessagesFromChatRelay(_EventRelay):
    broken = MESSAGES_BROKEN

    def __init__(self, translator: ChatToMessagesStream) -> None:
        super().__init__()
        self.translator = translator
        self.outcome.text = translator.text

    def event(self, event: SseEvent) -> bytes:
        if event.data == DONE:
            events = self.translator.finish()
            self.complete = self.outcome.done = True
            self.outcome.tokens = self.translator.usage
        else:
            payload = event.json()
            if "error" in payload:
                self.outcome.upstream_failed = True
                return b""
            events = self.translator.feed(payload)
        return b"".join(typed_event(e) for e in events)


class _PassthroughRelay(_EventRelay):
    """The provider's own events, each passed on as it came, watched on the way."""

    def __init__(self, watch: Callable[[dict[str, Any]], None]) -> None:
        super().__init__()
        self._watch = watch

    def event(self, event: SseEvent) -> bytes:
        payload = event.json()
        if isinstance(payload, dict):
            self._watch(payload)
        head = b"event: " + event.event.encode() + b"\n" if event.event else b""
        return head + b"data: " + event.data + b"\n\n"


class MessagesRelay(_PassthroughRelay):
    broken = MESSAGES_BROKEN

    def __init__(self) -> None:
        super().__init__(self._see)
        self.usage = MessageUsage()

    def _see(self, payload: dict[str, Any]) -> None:
        self.usage.feed(payload)
        kind = payload.get("type")
        delta = payload.get("delta")
        if kind == "content_block_delta" and isinstance(delta, dict):
            text = delta.get("text") or delta.get("partial_json") or delta.get("thinking")
            if isinstance(text, str):
                self.outcome.text.append(text)
        elif kind == "message_stop":
            self.complete = self.outcome.done = True
            self.outcome.tokens = self.usage.tokens
        elif kind == "error":  # the client has the provider's own error event already
            self.outcome.upstream_failed = True
            self.outcome.broken = b""


class ResponsesRelay(_PassthroughRelay):
    def __init__(self, call: Call) -> None:
        super().__init__(self._see)
        self.call = call
        self.watch = responses_api.ResponsesWatch()
        self.outcome.text = self.watch.text
        self.outcome.broken = self._broken()

    def _see(self, payload: dict[str, Any]) -> None:
        self.watch.feed(payload)
        if self.watch.complete:
            self.complete = self.outcome.done = True
            self.outcome.tokens = self.watch.usage
            remember(self.call, self.watch.response, self.watch.usage)
        elif payload.get("type") == "error":
            self.outcome.upstream_failed = True
            self.outcome.broken = b""

    def _broken(self) -> bytes:
        error = {"type": "error", "code": "upstream_error", "message": BROKEN_MESSAGE}
        return typed_event(error | {"param": None, "sequence_number": -1})
