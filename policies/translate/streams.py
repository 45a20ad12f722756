"""Streams, translated event by event by stateful (but pure) translator objects.

* :class:`ChatToMessagesStream` is fed an OpenAI upstream's ``chat.completion.chunk`` objects
  and returns the Anthropic events a Messages client expects: ``message_start``, ``ping``,
  ``content_block_start`` / ``content_block_delta`` / ``content_block_stop`` per text, thinking
  or tool-use block, then from :meth:`~ChatToMessagesStream.finish` ``message_delta`` (stop
  reason and the *cumulative* usage, cache counts included) and ``message_stop``.
* :class:`MessagesToChatStream` is fed an Anthropic upstream's events and returns
  ``chat.completion.chunk`` objects: a role chunk, content / tool-call deltas, a last chunk with
  ``finish_reason`` and, when the client asked for it, the usage chunk (``choices: []``).
* :class:`MessageUsage` follows the usage of an Anthropic stream (``message_start`` then the
  cumulative ``message_delta``), for a stream relayed untranslated.

Each translator also keeps the text it saw (``text``) so that the gateway can estimate the usage
of a stream cut short, and says whether the stream reached its proper end (``complete``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from policies.translate import replies
from policies.translate import usage as usage_mod
from policies.translate.usage import TokenUsage


class ChatToMessagesStream:
    """OpenAI chunks in, Anthropic stream events out."""

    def __init__(self, model: str, input_tokens: int = 0) -> None:
        self.model = model
        self.input_tokens = input_tokens  # shown in message_start until the real count arrives
        self.usage: TokenUsage | None = None
        self.finish_reason: str | None = None
        self.text: list[str] = []
        self.complete = False
        self._started = False
        self._block = -1  # index of the open block, -1 when none
        self._kind: str | None = None  # its type
        self._tools: dict[int, int] = {}  # OpenAI tool_calls index -> block index

    def feed(self, chunk: Mapping[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        if not self._started:
            out += self._start(chunk)
        tokens = usage_mod.from_chat(chunk.get("usage"))
        if tokens is not None:
            self.usage = tokens
        choices = chunk.get("choices")
        for choice in choices if isinstance(choices, list) else []:
            if not isinstance(choice, Mapping) or choice.get("index", 0) != 0:
                continue
            delta = choice.get("delta")
            if isinstance(delta, Mapping):
                out += self._delta(delta)
            if isinstance(choice.get("finish_reason"), str):
                self.finish_reason = choice["finish_reason"]
                out += self._close()
        return out

    def finish(self) -> list[dict[str, Any]]:
        """The closing events, once the upstream's stream ended properly (``[DONE]``)."""
        out = [] if self._started else self._start({})
        out += self._close()
        tokens = self.usage or TokenUsage(self.input_tokens, 0)
        delta = {"stop_reason": replies.stop_reason(self.finish_reason), "stop_sequence": None}
        out.append(
            {"type": "message_delta", "delta": delta, "usage": usage_mod.to_anthropic(tokens)}
        )
        out.append({"type": "message_stop"})
        self.complete = True
        return out

    def _start(self, chunk: Mapping[str, Any]) -> list[dict[str, Any]]:
        self._started = True
        usage = usage_mod.to_anthropic(TokenUsage(self.input_tokens, 0))
        message: dict[str, Any] = {
            "id": replies.message_id(chunk.get("id")),
            "type": "message",
            "role": "assistant",
            "model": self.model,
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": usage,
        }
        return [{"type": "message_start", "message": message}, {"type": "ping"}]

    def _open(self, block: dict[str, Any]) -> list[dict[str, Any]]:
        out = self._close()
        self._block += 1
        self._kind = block["type"]
        out.append({"type": "content_block_start", "index": self._block, "content_block": block})
        return out

    def _close(self) -> list[dict[str, Any]]:
        if self._kind is None:
            return []
        self._kind = None
        return [{"type": "content_block_stop", "index": self._block}]

    def _block_delta(self, delta: dict[str, Any]) -> dict[str, Any]:
        return {"type": "content_block_delta", "index": self._block, "delta": delta}

    def _delta(self, delta: Mapping[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        reasoning = delta.get("reasoning_content")
        if isinstance(reasoning, str) and reasoning:
            if self._kind != "thinking":
                out += self._open({"type": "thinking", "thinking": "", "signature": ""})
            out.append(self._block_delta({"type": "thinking_delta", "thinking": reasoning}))
            self.text.append(reasoning)
        content = delta.get("content")
        if isinstance(content, str) and content:
            if self._kind != "text":
                out += self._open({"type": "text", "text": ""})
            out.append(self._block_delta({"type": "text_delta", "text": content}))
            self.text.append(content)
        calls = delta.get("tool_calls")
        for call in calls if isinstance(calls, list) else []:
            if isinstance(call, Mapping):
                out += self._tool_delta(call)
        return out

    def _tool_delta(self, call: Mapping[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        index = call.get("index", 0)
        fn = call.get("function")
        fn = fn if isinstance(fn, Mapping) else {}
        if index not in self._tools:
            block: dict[str, Any] = {
                "type": "tool_use",
                "id": str(call.get("id") or f"call_{index}"),
            }
            block |= {"name": str(fn.get("name") or ""), "input": {}}
            out += self._open(block)
            self._tools[index] = self._block
        args = fn.get("arguments")
        if isinstance(args, str) and args:
            delta = {"type": "input_json_delta", "partial_json": args}
            event = {"type": "content_block_delta", "index": self._tools[index], "delta": delta}
            out.append(event)
            self.text.append(args)
        return out


class MessageUsage:
    """The usage of an Anthropic stream: ``message_start``'s, updated by each ``message_delta``
    (whose counts are cumulative: a count present there replaces the earlier one)."""

    def __init__(self) -> None:
        self.raw: dict[str, Any] = {}

    def feed(self, event: Mapping[str, Any]) -> None:
        kind = event.get("type")
        if kind == "message_start":
            message = event.get("message")
            usage = message.get("usage") if isinstance(message, Mapping) else None
        elif kind == "message_delta":
            usage = event.get("usage")
        else:
            return
        if isinstance(usage, Mapping):
            self.raw |= {k: v for k, v in usage.items() if v is not None}

    @property
    def tokens(self) -> TokenUsage | None:
        return usage_mod.from_anthropic(self.raw) if self.raw else None


class MessagesToChatStream:
    """Anthropic stream events in, OpenAI ``chat.completion.chunk`` objects out."""

    def __init__(self, model: str, created: int, include_usage: bool) -> None:
        self.model = model
        self.created = created
        self.include_usage = include_usage
        self.stop_reason: str | None = None
        self.text: list[str] = []
        self.complete = False
        self.error: Mapping[str, Any] | None = None  # an ``error`` event's ``error`` object
        self._usage = MessageUsage()
        self._id = "chatcmpl-gateway"
        self._tools: dict[int, int] = {}  # Anthropic block index -> OpenAI tool_calls index

    @property
    def usage(self) -> TokenUsage | None:
        return self._usage.tokens

    def feed(self, event: Mapping[str, Any]) -> list[dict[str, Any]]:
        kind = event.get("type")
        self._usage.feed(event)
        if kind == "message_start":
            message = event.get("message")
            if isinstance(message, Mapping):
                self._id = replies.chat_id(message.get("id"))
            return [self._chunk({"role": "assistant", "content": ""})]
        if kind == "content_block_start":
            return self._block_start(event)
        if kind == "content_block_delta":
            return self._block_delta(event)
        if kind == "message_delta":
            delta = event.get("delta")
            if isinstance(delta, Mapping) and isinstance(delta.get("stop_reason"), str):
                self.stop_reason = delta["stop_reason"]
            return []
        if kind == "message_stop":
            self.complete = True
            out = [self._chunk({}, replies.finish_reason(self.stop_reason))]
            tokens = self.usage
            if self.include_usage and tokens is not None:
                out.append(self._head([]) | {"usage": usage_mod.to_chat(tokens)})
            return out
        if kind == "error":
            error = event.get("error")
            self.error = error if isinstance(error, Mapping) else {"message": "upstream error"}
        return []

    def _head(self, choices: list[dict[str, Any]]) -> dict[str, Any]:
        head = {"id": self._id, "object": "chat.completion.chunk", "created": self.created}
        head |= {"model": self.model, "choices": choices}
        return head

    def _chunk(self, delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        chunk = self._head([choice])
        return chunk | {"usage": None} if self.include_usage else chunk

    def _block_start(self, event: Mapping[str, Any]) -> list[dict[str, Any]]:
        block = event.get("content_block")
        if not isinstance(block, Mapping):
            return []
        if block.get("type") == "tool_use":
            index = len(self._tools)
            self._tools[int(event.get("index", 0))] = index
            fn = {"name": str(block.get("name", "")), "arguments": ""}
            call = {"index": index, "id": str(block.get("id", "")), "type": "function"}
            return [self._chunk({"tool_calls": [call | {"function": fn}]})]
        if block.get("type") == "text" and block.get("text"):
            self.text.append(str(block["text"]))
            return [self._chunk({"content": str(block["text"])})]
        return []

    def _block_delta(self, event: Mapping[str, Any]) -> list[dict[str, Any]]:
        delta = event.get("delta")
        if not isinstance(delta, Mapping):
            return []
        kind = delta.get("type")
        if kind == "text_delta" and isinstance(delta.get("text"), str):
            self.text.append(delta["text"])
            return [self._chunk({"content": delta["text"]})]
        if kind == "input_json_delta" and delta.get("partial_json"):
            index = self._tools.get(int(event.get("index", 0)), 0)
            self.text.append(str(delta["partial_json"]))
            call = {"index": index, "function": {"arguments": str(delta["partial_json"])}}
            return [self._chunk({"tool_calls": [call]})]
        if kind == "thinking_delta" and isinstance(delta.get("thinking"), str):
            self.text.append(delta["thinking"])
            return [self._chunk({"reasoning_content": delta["thinking"]})]
        return []
