"""Request bodies: OpenAI Chat Completions <-> Anthropic Messages.

:func:`chat_to_messages` turns a Chat Completions body into a Messages body (for a model on an
``anthropic`` upstream); :func:`messages_to_chat` the other way (for the Anthropic SDK calling a
model on an ``openai``/``azure`` upstream). Both keep ``model`` as given (the caller sets the
upstream's model name) and raise :class:`TranslationError` for what the target cannot express.

Mapped: system prompt (``system``/``developer`` messages <-> ``system``), text, images (data URLs
<-> base64 sources, other URLs <-> url sources), tool definitions, ``tool_choice``
(``auto``/``required``/``none``/named <-> ``auto``/``any``/``none``/``tool``, and
``parallel_tool_calls: false`` <-> ``disable_parallel_tool_use``), assistant tool calls <->
``tool_use`` blocks, ``tool`` messages <-> ``tool_result`` blocks, ``stop`` <-> ``stop_sequences``,
``max_completion_tokens``/``max_tokens`` <-> ``max_tokens``, ``temperature``, ``top_p``,
``stream``, ``user`` <-> ``metadata.user_id``. Fields with no counterpart are dropped.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import orjson

from policies.translate import TranslationError
from policies.translate.usage import PromptParts

_DATA_URL = re.compile(r"^data:(?P<type>[\w.+-]+/[\w.+-]+);base64,(?P<data>.*)$", re.DOTALL)
_SYSTEM_ROLES = ("system", "developer")


# --- Chat Completions -> Messages --------------------------------------------------------------


def chat_to_messages(body: Mapping[str, Any], default_max_tokens: int) -> dict[str, Any]:
    """A Messages request body equivalent to the Chat Completions ``body``."""
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise TranslationError("'messages' must be a non-empty array.", "messages")
    n = body.get("n")
    if isinstance(n, int) and not isinstance(n, bool) and n > 1:
        raise TranslationError("'n' greater than 1 is not supported by this model.", "n")
    system, turns = _turns(messages)
    out: dict[str, Any] = {"model": body.get("model"), "messages": turns}
    if system:
        plain = all(set(b) == {"type", "text"} for b in system)
        out["system"] = "\n\n".join(b["text"] for b in system) if plain else system
    out["max_tokens"] = _max_tokens(body, default_max_tokens)
    _copy_sampling(body, out)
    stop = body.get("stop")
    if isinstance(stop, str):
        out["stop_sequences"] = [stop]
    elif isinstance(stop, list) and stop:
        out["stop_sequences"] = [s for s in stop if isinstance(s, str)]
    if body.get("stream"):
        out["stream"] = True
    if isinstance(body.get("user"), str):
        out["metadata"] = {"user_id": body["user"]}
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        out["tools"] = [_anthropic_tool(t, i) for i, t in enumerate(tools)]
    choice = _anthropic_tool_choice(body.get("tool_choice"), body.get("parallel_tool_calls"))
    if choice is not None and "tools" in out:  # Anthropic refuses a tool_choice without tools
        out["tool_choice"] = choice
    return out


def _turns(messages: list[Any]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The system blocks, and the alternating user/assistant turns of Chat ``messages``."""
    system: list[dict[str, Any]] = []
    turns: list[dict[str, Any]] = []
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TranslationError(f"messages[{index}] must be an object.", "messages")
        role = message.get("role")
        if role in _SYSTEM_ROLES:
            system.extend(_text_blocks(message.get("content"), f"messages[{index}].content"))
        elif role == "user":
            _append(turns, "user", _user_blocks(message.get("content"), index))
        elif role == "assistant":
            _append(turns, "assistant", _assistant_blocks(message, index))
        elif role in ("tool", "function"):
            _append(turns, "user", [_tool_result(message, index)])
        else:
            raise TranslationError(f"messages[{index}].role {role!r} is not supported.", "messages")
    return system, turns


def _max_tokens(body: Mapping[str, Any], default: int) -> int:
    for key in ("max_completion_tokens", "max_tokens"):
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            if value < 1:
                raise TranslationError(f"'{key}' must be at least 1.", key)
            return value
    return default


def _copy_sampling(src: Mapping[str, Any], dst: dict[str, Any]) -> None:
    for key in ("temperature", "top_p"):
        value = src.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            dst[key] = value


def _append(turns: list[dict[str, Any]], role: str, blocks: list[dict[str, Any]]) -> None:
    """Add a turn, merging it into the previous one of the same role (Messages alternate)."""
    if turns and turns[-1]["role"] == role:
        turns[-1]["content"].extend(blocks)
    else:
        turns.append({"role": role, "content": blocks})


def _text_blocks(content: Any, where: str) -> list[dict[str, Any]]:
    if isinstance(content, str):
        return [{"type": "text", "text": content}] if content else []
    if content is None:
        return []
    if not isinstance(content, list):
        raise TranslationError(f"{where} must be a string or an array.", "messages")
    blocks = []
    for part in content:
        if not isinstance(part, Mapping) or part.get("type") != "text":
            raise TranslationError(f"{where} may only hold text parts here.", "messages")
        blocks.append({"type": "text", "text": str(part.get("text", ""))})
    return blocks


def _user_blocks(content: Any, index: int) -> list[dict[str, Any]]:
    where = f"messages[{index}].content"
    if isinstance(content, str):
        return [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise TranslationError(f"{where} must be a string or an array.", "messages")
    blocks: list[dict[str, Any]] = []
    for part in content:
        kind = part.get("type") if isinstance(part, Mapping) else None
        if kind == "text":
            blocks.append({"type": "text", "text": str(part.get("text", ""))})
        elif kind == "image_url":
            image = part.get("image_url")
            url = image.get("url") if isinstance(image, Mapping) else image
            if not isinstance(url, str):
                raise TranslationError(f"{where}: image_url.url must be a string.", "messages")
            blocks.append({"type": "image", "source": image_source(url)})
        else:
            raise TranslationError(f"{where}: part type {kind!r} is not supported.", "messages")
    return blocks


def image_source(url: str) -> dict[str, Any]:
    """An Anthropic image ``source`` for a Chat Completions image URL (data URL or http)."""
    match = _DATA_URL.match(url)
    if match:
        return {"type": "base64", "media_type": match["type"], "data": match["data"]}
    return {"type": "url", "url": url}


def _assistant_blocks(message: Mapping[str, Any], index: int) -> list[dict[str, Any]]:
    content = message.get("content")
    if isinstance(content, list):  # text and refusal parts
        texts = [p.get("text") or p.get("refusal") for p in content if isinstance(p, Mapping)]
        content = "".join(t for t in texts if isinstance(t, str))
    blocks: list[dict[str, Any]] = []
    if isinstance(content, str) and content:
        blocks.append({"type": "text", "text": content})
    calls = message.get("tool_calls")
    legacy = message.get("function_call")
    if not calls and isinstance(legacy, Mapping):
        calls = [{"id": f"call_{index}", "function": legacy}]
    for call in calls if isinstance(calls, list) else []:
        fn = call.get("function") if isinstance(call, Mapping) else None
        if not isinstance(fn, Mapping) or not isinstance(fn.get("name"), str):
            raise TranslationError(f"messages[{index}].tool_calls: bad entry.", "messages")
        try:
            args = orjson.loads(fn.get("arguments") or "{}")
        except (orjson.JSONDecodeError, TypeError) as exc:
            msg = f"messages[{index}].tool_calls: arguments are not valid JSON."
            raise TranslationError(msg, "messages") from exc
        if not isinstance(args, dict):
            args = {"value": args}
        tool_id = str(call.get("id") or f"call_{index}_{len(blocks)}")
        blocks.append({"type": "tool_use", "id": tool_id, "name": fn["name"], "input": args})
    if not blocks:  # an empty assistant turn is refused by Anthropic; keep the turn visible
        blocks.append({"type": "text", "text": ""})
    return blocks


def _tool_result(message: Mapping[str, Any], index: int) -> dict[str, Any]:
    tool_id = message.get("tool_call_id") or message.get("name")
    if not isinstance(tool_id, str):
        raise TranslationError(f"messages[{index}].tool_call_id is required.", "messages")
    content = message.get("content")
    result: Any
    if isinstance(content, list):
        result = _text_blocks(content, f"messages[{index}].content")
    else:
        result = "" if content is None else str(content)
    return {"type": "tool_result", "tool_use_id": tool_id, "content": result}


def _anthropic_tool(tool: Any, index: int) -> dict[str, Any]:
    fn = tool.get("function") if isinstance(tool, Mapping) else None
    if not isinstance(tool, Mapping) or tool.get("type") != "function" or not isinstance(fn, dict):
        raise TranslationError(f"tools[{index}] must be a function tool.", "tools")
    if not isinstance(fn.get("name"), str):
        raise TranslationError(f"tools[{index}].function.name is required.", "tools")
    schema = fn.get("parameters")
    out: dict[str, Any] = {"name": fn["name"]}
    if isinstance(fn.get("description"), str):
        out["description"] = fn["description"]
    out["input_schema"] = schema if isinstance(schema, dict) else {"type": "object"}
    return out


def _anthropic_tool_choice(choice: Any, parallel: Any) -> dict[str, Any] | None:
    out: dict[str, Any]
    if choice is None:
        if parallel is not False:
            return None
        out = {"type": "auto"}
    elif choice == "auto":
        out = {"type": "auto"}
    elif choice == "required":
        out = {"type": "any"}
    elif choice == "none":
        return {"type": "none"}
    elif isinstance(choice, Mapping) and isinstance(choice.get("function"), Mapping):
        name = choice["function"].get("name")
        if not isinstance(name, str):
            raise TranslationError("tool_choice.function.name is required.", "tool_choice")
        out = {"type": "tool", "name": name}
    else:
        raise TranslationError("tool_choice is not valid.", "tool_choice")
    if parallel is False:
        out["disable_parallel_tool_use"] = True
    return out


# --- Messages -> Chat Completions --------------------------------------------------------------


def messages_to_chat(body: Mapping[str, Any]) -> dict[str, Any]:
    """A Chat Completions request body equivalent to the Messages ``body``."""
    messages = body.get("messages")
    if not isinstance(messages, list):
        raise TranslationError("messages: Field required")
    max_tokens = body.get("max_tokens")
    if not isinstance(max_tokens, int) or isinstance(max_tokens, bool) or max_tokens < 1:
        raise TranslationError("max_tokens: Field required (an integer of at least 1)")
    out_messages: list[dict[str, Any]] = []
    system = body.get("system")
    if system:
        text = system if isinstance(system, str) else _joined_text(system, "system")
        out_messages.append({"role": "system", "content": text})
    for index, message in enumerate(messages):
        if not isinstance(message, Mapping) or message.get("role") not in ("user", "assistant"):
            raise TranslationError(f"messages.{index}: role must be 'user' or 'assistant'")
        if message["role"] == "user":
            out_messages.extend(_chat_user_messages(message.get("content"), index))
        else:
            out_messages.append(_chat_assistant_message(message.get("content"), index))
    out: dict[str, Any] = {
        "model": body.get("model"),
        "messages": out_messages,
        "max_completion_tokens": max_tokens,
    }
    _copy_sampling(body, out)
    stops = body.get("stop_sequences")
    if isinstance(stops, list) and stops:
        out["stop"] = [s for s in stops if isinstance(s, str)]
    if body.get("stream"):
        out["stream"] = True
        out["stream_options"] = {"include_usage": True}
    metadata = body.get("metadata")
    if isinstance(metadata, Mapping) and isinstance(metadata.get("user_id"), str):
        out["user"] = metadata["user_id"]
    tools = body.get("tools")
    if isinstance(tools, list) and tools:
        out["tools"] = [_openai_tool(t, i) for i, t in enumerate(tools)]
    _openai_tool_choice(body.get("tool_choice"), out)
    return out


def _joined_text(blocks: Any, where: str) -> str:
    if not isinstance(blocks, list):
        raise TranslationError(f"{where}: must be a string or an array of text blocks")
    texts = []
    for block in blocks:
        if not isinstance(block, Mapping) or block.get("type") != "text":
            raise TranslationError(f"{where}: only text blocks are supported here")
        texts.append(str(block.get("text", "")))
    return "\n\n".join(texts)


def _chat_user_messages(content: Any, index: int) -> list[dict[str, Any]]:
    """One Anthropic user turn -> ``tool`` messages (its tool results) then one user message."""
    if isinstance(content, str):
        return [{"role": "user", "content": content}]
    if not isinstance(content, list):
        raise TranslationError(f"messages.{index}.content: must be a string or an array")
    tools: list[dict[str, Any]] = []
    parts: list[dict[str, Any]] = []
    for block in content:
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "text":
            parts.append({"type": "text", "text": str(block.get("text", ""))})
        elif kind == "image":
            parts.append({"type": "image_url", "image_url": {"url": image_url(block, index)}})
        elif kind == "tool_result":
            result = block.get("content")
            text = result if isinstance(result, str) else _result_text(result, index)
            tool_id = str(block.get("tool_use_id", ""))
            tools.append({"role": "tool", "tool_call_id": tool_id, "content": text})
        elif kind in ("document", "search_result"):
            raise TranslationError(f"messages.{index}.content: {kind} blocks are not supported")
        # thinking / redacted_thinking blocks carry nothing an OpenAI model can use
    if not parts:
        return tools
    plain = all(p["type"] == "text" for p in parts)
    user_content: Any = "".join(p["text"] for p in parts) if plain and len(parts) == 1 else parts
    return [*tools, {"role": "user", "content": user_content}]


def _result_text(result: Any, index: int) -> str:
    if result is None:
        return ""
    if not isinstance(result, list):
        raise TranslationError(f"messages.{index}: tool_result content must be text")
    texts = [b.get("text") for b in result if isinstance(b, Mapping) and b.get("type") == "text"]
    return "\n".join(t for t in texts if isinstance(t, str))


def image_url(block: Mapping[str, Any], index: int) -> str:
    """A Chat Completions image URL for an Anthropic image block."""
    source = block.get("source")
    if isinstance(source, Mapping) and source.get("type") == "base64":
        return f"data:{source.get('media_type')};base64,{source.get('data')}"
    if isinstance(source, Mapping) and source.get("type") == "url":
        return str(source.get("url"))
    raise TranslationError(f"messages.{index}.content: unsupported image source")


def _chat_assistant_message(content: Any, index: int) -> dict[str, Any]:
    if isinstance(content, str):
        return {"role": "assistant", "content": content}
    if not isinstance(content, list):
        raise TranslationError(f"messages.{index}.content: must be a string or an array")
    texts: list[str] = []
    calls: list[dict[str, Any]] = []
    for block in content:
        kind = block.get("type") if isinstance(block, Mapping) else None
        if kind == "text":
            texts.append(str(block.get("text", "")))
        elif kind == "tool_use":
            args = orjson.dumps(block.get("input") or {}).decode()
            fn = {"name": str(block.get("name", "")), "arguments": args}
            calls.append({"id": str(block.get("id", "")), "type": "function", "function": fn})
    out: dict[str, Any] = {"role": "assistant", "content": "".join(texts) or None}
    if calls:
        out["tool_calls"] = calls
    return out


def _openai_tool(tool: Any, index: int) -> dict[str, Any]:
    if not isinstance(tool, Mapping) or not isinstance(tool.get("name"), str):
        raise TranslationError(f"tools.{index}.name: Field required")
    if tool.get("type") not in (None, "custom") or "input_schema" not in tool:
        raise TranslationError(f"tools.{index}: tool type {tool.get('type')!r} is not supported")
    fn: dict[str, Any] = {"name": tool["name"]}
    if isinstance(tool.get("description"), str):
        fn["description"] = tool["description"]
    fn["parameters"] = tool.get("input_schema") or {"type": "object"}
    return {"type": "function", "function": fn}


def _openai_tool_choice(choice: Any, out: dict[str, Any]) -> None:
    if not isinstance(choice, Mapping):
        return
    kind = choice.get("type")
    if kind == "auto":
        out["tool_choice"] = "auto"
    elif kind == "any":
        out["tool_choice"] = "required"
    elif kind == "none":
        out["tool_choice"] = "none"
    elif kind == "tool" and isinstance(choice.get("name"), str):
        out["tool_choice"] = {"type": "function", "function": {"name": choice["name"]}}
    else:
        raise TranslationError("tool_choice: unknown type")
    if choice.get("disable_parallel_tool_use") is True and "tools" in out:
        out["parallel_tool_calls"] = False


def message_prompt(body: Mapping[str, Any]) -> PromptParts:
    """What a Messages request puts before the model (for the hold): ``system``, every text
    block, tool results, tool inputs and tool definitions as texts; image blocks (in tool results
    too) counted. Lenient: what it does not know it skips."""
    parts = PromptParts([])
    _loose(body.get("system"), parts)
    for message in body.get("messages") or []:
        if isinstance(message, Mapping):
            _loose(message.get("content"), parts)
    for tool in body.get("tools") or []:
        if isinstance(tool, Mapping):
            parts.texts.append(orjson.dumps(tool).decode())
    return parts


def _loose(content: Any, parts: PromptParts) -> None:
    if isinstance(content, str):
        parts.texts.append(content)
        return
    for block in content if isinstance(content, list) else []:
        if not isinstance(block, Mapping):
            continue
        if isinstance(block.get("text"), str):
            parts.texts.append(block["text"])
        elif block.get("type") == "image":
            parts.images += 1
        elif block.get("type") == "document" and isinstance(block.get("source"), Mapping):
            source = block["source"]  # a plain-text document's text (a PDF's pages: not sized)
            if source.get("type") == "text" and isinstance(source.get("data"), str):
                parts.texts.append(source["data"])
            elif source.get("type") == "content":
                _loose(source.get("content"), parts)
        elif block.get("type") == "tool_use":
            parts.texts.append(orjson.dumps(block.get("input")).decode())
        elif block.get("type") == "tool_result":
            _loose(block.get("content"), parts)
