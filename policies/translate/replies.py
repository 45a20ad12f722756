"""Non-streamed answers: Chat Completions ``chat.completion`` <-> Anthropic ``message``.

Content: assistant text <-> ``text`` blocks, ``tool_calls`` <-> ``tool_use`` blocks (arguments
JSON text <-> ``input`` object), ``reasoning_content`` <-> ``thinking`` blocks; stop reasons by
the tables below; usage through :mod:`policies.translate.usage` (cache reads, cache writes and
reasoning/thinking tokens kept). A reply that is not the shape its protocol promises raises
:class:`MalformedReply` (the gateway answers 502 ``upstream_error`` and charges nothing).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import orjson

from policies.translate import usage as usage_mod

# Chat Completions finish_reason -> Anthropic stop_reason
STOP_REASON: dict[str, str] = {
    "stop": "end_turn",
    "length": "max_tokens",
    "tool_calls": "tool_use",
    "function_call": "tool_use",
    "content_filter": "refusal",
}
# Anthropic stop_reason -> Chat Completions finish_reason
FINISH_REASON: dict[str, str] = {
    "end_turn": "stop",
    "stop_sequence": "stop",
    "pause_turn": "stop",
    "max_tokens": "length",
    "model_context_window_exceeded": "length",
    "tool_use": "tool_calls",
    "refusal": "content_filter",
}


class MalformedReply(ValueError):
    """The upstream's answer is not what its protocol promises."""


def stop_reason(finish_reason: Any) -> str:
    return (
        STOP_REASON.get(finish_reason, "end_turn") if isinstance(finish_reason, str) else "end_turn"
    )


def finish_reason(stop: Any) -> str:
    return FINISH_REASON.get(stop, "stop") if isinstance(stop, str) else "stop"


def message_id(chat_id: Any) -> str:
    """An Anthropic-looking message id for an OpenAI completion id (and keep it traceable)."""
    text = str(chat_id or "")
    return "msg_" + text.removeprefix("chatcmpl-") if text else "msg_gateway"


def chat_id(msg_id: Any) -> str:
    text = str(msg_id or "")
    return "chatcmpl-" + text.removeprefix("msg_") if text else "chatcmpl-gateway"


def tool_arguments(text: Any) -> dict[str, Any]:
    """An OpenAI tool call's ``arguments`` (JSON text) as an Anthropic ``input`` object."""
    if not isinstance(text, str) or not text.strip():
        return {}
    try:
        value = orjson.loads(text)
    except orjson.JSONDecodeError:
        return {"_raw_arguments": text}  # a model's broken JSON stays visible, not lost
    return value if isinstance(value, dict) else {"value": value}


def chat_to_message(
    reply: Any, model: str, tokens: usage_mod.TokenUsage | None = None
) -> dict[str, Any]:
    """An Anthropic ``message`` equivalent to the Chat Completions ``reply``; ``tokens`` (the
    gateway's estimate) stands in for a reply without usage."""
    if not isinstance(reply, Mapping):
        raise MalformedReply("the reply is not a JSON object")
    choices = reply.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], Mapping):
        raise MalformedReply("the reply has no choices")
    message = choices[0].get("message")
    if not isinstance(message, Mapping):
        raise MalformedReply("the reply's choice has no message")
    content: list[dict[str, Any]] = []
    reasoning = message.get("reasoning_content")
    if isinstance(reasoning, str) and reasoning:
        content.append({"type": "thinking", "thinking": reasoning, "signature": ""})
    text = message.get("content")
    if isinstance(text, str) and text:
        content.append({"type": "text", "text": text})
    refusal = message.get("refusal")
    if isinstance(refusal, str) and refusal and not text:
        content.append({"type": "text", "text": refusal})
    for call in message.get("tool_calls") or []:
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping):
            raise MalformedReply("a tool call has no function")
        block = {"type": "tool_use", "id": str(call.get("id") or ""), "name": str(fn.get("name"))}
        content.append(block | {"input": tool_arguments(fn.get("arguments"))})
    tokens = usage_mod.from_chat(reply.get("usage")) or tokens or usage_mod.TokenUsage(0, 0)
    return {
        "id": message_id(reply.get("id")),
        "type": "message",
        "role": "assistant",
        "model": model,
        "content": content,
        "stop_reason": stop_reason(choices[0].get("finish_reason")),
        "stop_sequence": None,
        "usage": usage_mod.to_anthropic(tokens),
    }


def message_to_chat(reply: Any, model: str, created: int) -> dict[str, Any]:
    """A Chat Completions ``chat.completion`` equivalent to the Anthropic ``message`` reply."""
    if not isinstance(reply, Mapping) or reply.get("type") != "message":
        raise MalformedReply("the reply is not a message")
    blocks = reply.get("content")
    if not isinstance(blocks, list):
        raise MalformedReply("the message has no content array")
    texts: list[str] = []
    thinking: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in blocks:
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "thinking":
            thinking.append(str(block.get("thinking", "")))
        elif kind == "tool_use":
            args = orjson.dumps(block.get("input") or {}).decode()
            fn = {"name": str(block.get("name", "")), "arguments": args}
            calls.append({"id": str(block.get("id", "")), "type": "function", "function": fn})
    message: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    message["refusal"] = None
    if calls:
        message["tool_calls"] = calls
    if thinking:
        message["reasoning_content"] = "".join(thinking)
    tokens = usage_mod.from_anthropic(reply.get("usage"))
    if tokens is None:
        raise MalformedReply("the message has no usage")
    choice = {"index": 0, "message": message, "logprobs": None}
    choice["finish_reason"] = finish_reason(reply.get("stop_reason"))
    return {
        "id": chat_id(reply.get("id")),
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": usage_mod.to_chat(tokens),
    }
