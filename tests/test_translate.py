"""Tables and round trips for the pure protocol translation in ``policies.translate``."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from policies.pricing import Prices, list_cost, worst_case_list_cost
from policies.translate import TranslationError, errors, replies, responses_api
from policies.translate import usage as usage_mod
from policies.translate.requests import chat_to_messages, message_prompt, messages_to_chat
from policies.translate.sse import SseDecoder, SseEvent, data_event, typed_event
from policies.translate.streams import ChatToMessagesStream, MessagesToChatStream, MessageUsage
from policies.translate.usage import PromptParts, TokenUsage

WEATHER_SCHEMA = {"type": "object", "properties": {"city": {"type": "string"}}}
CHAT_TOOL = {
    "type": "function",
    "function": {"name": "weather", "description": "Weather now", "parameters": WEATHER_SCHEMA},
}
ANTHROPIC_TOOL = {"name": "weather", "description": "Weather now", "input_schema": WEATHER_SCHEMA}


# --- requests: Chat Completions -> Messages ----------------------------------------------------

CHAT_TO_MESSAGES: list[tuple[str, dict[str, Any], dict[str, Any]]] = [
    (
        "system prompt, text, sampling, stop string, user",
        {
            "model": "m",
            "messages": [
                {"role": "system", "content": "be terse"},
                {"role": "developer", "content": "and kind"},
                {"role": "user", "content": "hi"},
            ],
            "temperature": 0.5,
            "top_p": 0.9,
            "stop": "END",
            "user": "u-1",
            "max_tokens": 50,
            "frequency_penalty": 1,
        },
        {
            "model": "m",
            "system": "be terse\n\nand kind",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "hi"}]}],
            "max_tokens": 50,
            "temperature": 0.5,
            "top_p": 0.9,
            "stop_sequences": ["END"],
            "metadata": {"user_id": "u-1"},
        },
    ),
    (
        "images: data URL and http URL; max_completion_tokens wins; stream",
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this"},
                        {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}},
                        {"type": "image_url", "image_url": {"url": "https://x.test/a.jpg"}},
                    ],
                }
            ],
            "max_completion_tokens": 7,
            "max_tokens": 99,
            "stream": True,
            "stream_options": {"include_usage": True},
            "stop": ["a", "b"],
        },
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": "what is this"},
                        {
                            "type": "image",
                            "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"},
                        },
                        {"type": "image", "source": {"type": "url", "url": "https://x.test/a.jpg"}},
                    ],
                }
            ],
            "max_tokens": 7,
            "stop_sequences": ["a", "b"],
            "stream": True,
        },
    ),
    (
        "tools, required choice without parallel calls, tool calls and merged tool results",
        {
            "model": "m",
            "messages": [
                {"role": "user", "content": "weather in Paris and Rome?"},
                {
                    "role": "assistant",
                    "content": "Checking.",
                    "tool_calls": [
                        {
                            "id": "call_1",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city": "Paris"}'},
                        },
                        {
                            "id": "call_2",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Rome"}'},
                        },
                    ],
                },
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
                {"role": "tool", "tool_call_id": "call_2", "content": "rain"},
                {"role": "user", "content": "thanks"},
            ],
            "tools": [CHAT_TOOL],
            "tool_choice": "required",
            "parallel_tool_calls": False,
        },
        {
            "model": "m",
            "messages": [
                {
                    "role": "user",
                    "content": [{"type": "text", "text": "weather in Paris and Rome?"}],
                },
                {
                    "role": "assistant",
                    "content": [
                        {"type": "text", "text": "Checking."},
                        {
                            "type": "tool_use",
                            "id": "call_1",
                            "name": "weather",
                            "input": {"city": "Paris"},
                        },
                        {
                            "type": "tool_use",
                            "id": "call_2",
                            "name": "weather",
                            "input": {"city": "Rome"},
                        },
                    ],
                },
                {
                    "role": "user",
                    "content": [
                        {"type": "tool_result", "tool_use_id": "call_1", "content": "sunny"},
                        {"type": "tool_result", "tool_use_id": "call_2", "content": "rain"},
                        {"type": "text", "text": "thanks"},
                    ],
                },
            ],
            "max_tokens": 1000,
            "tools": [ANTHROPIC_TOOL],
            "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        },
    ),
    (
        "named tool choice; a tool choice without tools is dropped",
        {
            "model": "m",
            "messages": [{"role": "user", "content": "x"}],
            "tools": [CHAT_TOOL],
            "tool_choice": {"type": "function", "function": {"name": "weather"}},
        },
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
            "max_tokens": 1000,
            "tools": [ANTHROPIC_TOOL],
            "tool_choice": {"type": "tool", "name": "weather"},
        },
    ),
    (
        "tool_choice none; no tools means no tool_choice",
        {"model": "m", "messages": [{"role": "user", "content": "x"}], "tool_choice": "none"},
        {
            "model": "m",
            "messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}],
            "max_tokens": 1000,
        },
    ),
]


@pytest.mark.parametrize(("name", "chat", "expected"), CHAT_TO_MESSAGES, ids=lambda v: "")
def test_chat_to_messages(name: str, chat: dict[str, Any], expected: dict[str, Any]) -> None:
    assert chat_to_messages(chat, default_max_tokens=1000) == expected, name


@pytest.mark.parametrize(
    ("body", "param"),
    [
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": "x"}], "n": 2}, "n"),
        ({"messages": [{"role": "wizard", "content": "x"}]}, "messages"),
        ({"messages": [{"role": "user", "content": [{"type": "input_audio"}]}]}, "messages"),
        ({"messages": [{"role": "tool", "content": "x"}]}, "messages"),
        (
            {
                "messages": [
                    {
                        "role": "assistant",
                        "tool_calls": [{"id": "c", "function": {"name": "f", "arguments": "{x"}}],
                    }
                ]
            },
            "messages",
        ),
        ({"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "web"}]}, "tools"),
        ({"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}, "max_tokens"),
    ],
)
def test_chat_to_messages_refuses(body: dict[str, Any], param: str) -> None:
    with pytest.raises(TranslationError) as exc:
        chat_to_messages({"model": "m", **body}, default_max_tokens=10)
    assert exc.value.param == param


# --- requests: Messages -> Chat Completions ----------------------------------------------------


def test_messages_to_chat() -> None:
    body = {
        "model": "claude",
        "max_tokens": 300,
        "system": [{"type": "text", "text": "be terse", "cache_control": {"type": "ephemeral"}}],
        "messages": [
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {
                        "type": "image",
                        "source": {"type": "base64", "media_type": "image/jpeg", "data": "QQ"},
                    },
                ],
            },
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "hmm", "signature": "s"},
                    {"type": "text", "text": "Let me check."},
                    {
                        "type": "tool_use",
                        "id": "toolu_1",
                        "name": "weather",
                        "input": {"city": "Oslo"},
                    },
                ],
            },
            {
                "role": "user",
                "content": [
                    {
                        "type": "tool_result",
                        "tool_use_id": "toolu_1",
                        "content": [{"type": "text", "text": "-3C"}],
                    },
                    {"type": "text", "text": "and?"},
                ],
            },
        ],
        "tools": [ANTHROPIC_TOOL],
        "tool_choice": {"type": "any", "disable_parallel_tool_use": True},
        "stop_sequences": ["STOP"],
        "temperature": 0.2,
        "top_k": 5,
        "stream": True,
        "metadata": {"user_id": "u-9"},
    }
    assert messages_to_chat(body) == {
        "model": "claude",
        "messages": [
            {"role": "system", "content": "be terse"},
            {
                "role": "user",
                "content": [
                    {"type": "text", "text": "look"},
                    {"type": "image_url", "image_url": {"url": "data:image/jpeg;base64,QQ"}},
                ],
            },
            {
                "role": "assistant",
                "content": "Let me check.",
                "tool_calls": [
                    {
                        "id": "toolu_1",
                        "type": "function",
                        "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
                    }
                ],
            },
            {"role": "tool", "tool_call_id": "toolu_1", "content": "-3C"},
            {"role": "user", "content": "and?"},
        ],
        "max_completion_tokens": 300,
        "temperature": 0.2,
        "stop": ["STOP"],
        "stream": True,
        "stream_options": {"include_usage": True},
        "user": "u-9",
        "tools": [CHAT_TOOL],
        "tool_choice": "required",
        "parallel_tool_calls": False,
    }


@pytest.mark.parametrize(
    ("choice", "expected"),
    [
        ({"type": "auto"}, "auto"),
        ({"type": "none"}, "none"),
        (
            {"type": "tool", "name": "weather"},
            {"type": "function", "function": {"name": "weather"}},
        ),
    ],
)
def test_messages_tool_choice(choice: dict[str, Any], expected: Any) -> None:
    body = {
        "model": "c",
        "max_tokens": 1,
        "messages": [],
        "tools": [ANTHROPIC_TOOL],
        "tool_choice": choice,
    }
    assert messages_to_chat(body)["tool_choice"] == expected


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"role": "user", "content": "x"}]},  # no max_tokens
        {"max_tokens": 5},  # no messages
        {"max_tokens": 5, "messages": [{"role": "system", "content": "x"}]},
        {
            "max_tokens": 5,
            "messages": [],
            "tools": [{"type": "web_search_20250305", "name": "web_search"}],
        },
        {"max_tokens": 5, "messages": [{"role": "user", "content": [{"type": "document"}]}]},
        {"max_tokens": 5, "messages": [], "tool_choice": {"type": "sometimes"}},
    ],
)
def test_messages_to_chat_refuses(body: dict[str, Any]) -> None:
    with pytest.raises(TranslationError):
        messages_to_chat({"model": "c", **body})


# --- request round trips -----------------------------------------------------------------------

_text = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=12)
_call = st.builds(
    lambda i, name, city: {
        "id": f"call_{i}",
        "type": "function",
        "function": {"name": name, "arguments": orjson.dumps({"city": city}).decode()},
    },
    st.integers(0, 10**6),
    st.sampled_from(["weather", "time"]),
    _text,
)


@st.composite
def _conversations(draw: st.DrawFn) -> list[dict[str, Any]]:
    """Chat conversations in the canonical form both protocols share."""
    messages: list[dict[str, Any]] = []
    if draw(st.booleans()):
        messages.append({"role": "system", "content": draw(_text)})
    for _ in range(draw(st.integers(1, 4))):
        messages.append({"role": "user", "content": draw(_text)})
        calls = draw(st.lists(_call, max_size=2, unique_by=lambda c: c["id"]))
        reply: dict[str, Any] = {"role": "assistant", "content": draw(st.none() | _text)}
        if calls:
            reply["tool_calls"] = calls
        elif reply["content"] is None:
            reply["content"] = "ok"
        messages.append(reply)
        for call in calls:
            messages.append({"role": "tool", "tool_call_id": call["id"], "content": draw(_text)})
    return messages


@settings(max_examples=150, deadline=None)
@given(_conversations(), st.integers(1, 4096), st.lists(_text, max_size=2))
def test_chat_round_trip(messages: list[dict[str, Any]], max_tokens: int, stop: list[str]) -> None:
    chat: dict[str, Any] = {"model": "m", "messages": messages, "max_completion_tokens": max_tokens}
    if stop:
        chat["stop"] = stop
    back = messages_to_chat(chat_to_messages(chat, default_max_tokens=1))
    expected = [dict(m) for m in messages]
    for m in expected:  # tool call arguments come back in orjson's compact form
        for call in m.get("tool_calls", []):
            call["function"]["arguments"] = orjson.dumps(
                orjson.loads(call["function"]["arguments"])
            ).decode()
    # a user turn that followed tool results comes back after them, as its own message
    assert back == {"model": "m", "messages": expected, "max_completion_tokens": max_tokens} | (
        {"stop": stop} if stop else {}
    )


@settings(max_examples=100, deadline=None)
@given(_conversations())
def test_messages_round_trip(messages: list[dict[str, Any]]) -> None:
    anthropic = chat_to_messages({"model": "c", "messages": messages}, default_max_tokens=64)
    again = chat_to_messages(messages_to_chat(anthropic), default_max_tokens=1)
    assert again == anthropic


# --- usage -------------------------------------------------------------------------------------

ANTHROPIC_USAGE = {
    "input_tokens": 20,
    "cache_read_input_tokens": 1000,
    "cache_creation_input_tokens": 300,
    "output_tokens": 50,
    "output_tokens_details": {"thinking_tokens": 12},
}


def test_usage_readers() -> None:
    assert usage_mod.from_anthropic(ANTHROPIC_USAGE) == TokenUsage(1320, 50, 1000, 300, 12)
    assert usage_mod.from_anthropic({"output_tokens": 7}) == TokenUsage(0, 7)
    assert usage_mod.from_anthropic({}) is None
    chat = {
        "prompt_tokens": 100,
        "completion_tokens": 40,
        "prompt_tokens_details": {"cached_tokens": 64},
        "completion_tokens_details": {"reasoning_tokens": 30},
    }
    assert usage_mod.from_chat(chat) == TokenUsage(100, 40, 64, 0, 30)
    assert usage_mod.from_chat({"prompt_tokens": 3}) == TokenUsage(3, 0)
    assert usage_mod.from_chat(None) is None
    assert usage_mod.from_chat({"prompt_tokens": -1}) is None
    responses = {
        "input_tokens": 36,
        "input_tokens_details": {"cached_tokens": 8},
        "output_tokens": 87,
        "output_tokens_details": {"reasoning_tokens": 64},
        "total_tokens": 123,
    }
    assert usage_mod.from_responses(responses) == TokenUsage(36, 87, 8, 0, 64)
    assert usage_mod.to_responses(TokenUsage(36, 87, 8, 0, 64)) == responses


def test_usage_writers_keep_cache_and_reasoning() -> None:
    tokens = TokenUsage(1320, 50, 1000, 300, 12)
    assert usage_mod.to_anthropic(tokens) == ANTHROPIC_USAGE
    assert usage_mod.to_chat(tokens) == {
        "prompt_tokens": 1320,
        "completion_tokens": 50,
        "total_tokens": 1370,
        "prompt_tokens_details": {"cached_tokens": 1000},
        "completion_tokens_details": {"reasoning_tokens": 12},
        "cache_read_input_tokens": 1000,
        "cache_creation_input_tokens": 300,
    }


_counts = st.integers(0, 10**7)


@given(_counts, _counts, _counts, _counts, _counts)
def test_usage_round_trips(
    uncached: int, reads: int, writes: int, output: int, thinking: int
) -> None:
    tokens = TokenUsage(uncached + reads + writes, output + thinking, reads, writes, thinking)
    assert usage_mod.from_anthropic(usage_mod.to_anthropic(tokens)) == tokens
    assert usage_mod.from_chat(usage_mod.to_chat(tokens)) == tokens
    plain = TokenUsage(uncached + reads, output + thinking, reads, 0, thinking)
    assert usage_mod.from_responses(usage_mod.to_responses(plain)) == plain


# --- pricing of cache reads and writes ---------------------------------------------------------

CLAUDE = Prices(input=3000, output=15000, cached_input=300, cache_write=3750)


@pytest.mark.parametrize(
    ("prices", "prompt", "completion", "reads", "writes", "cost"),
    [
        (CLAUDE, 1320, 50, 1000, 300, 20 * 3000 + 1000 * 300 + 300 * 3750 + 50 * 15000),
        (CLAUDE, 10, 0, 0, 0, 30_000),
        (CLAUDE, 100, 0, 0, 500, 100 * 3750),  # writes never exceed the prompt
        (CLAUDE, 100, 0, 80, 50, 50 * 3750 + 50 * 300),  # nor reads + writes
        (Prices(input=3000, output=15000), 1300, 0, 1000, 300, 1300 * 3000),  # defaults: input
        (
            Prices(input=3000, output=15000, cached_input=300),
            1300,
            0,
            1000,
            300,
            1000 * 300 + 300 * 3000,
        ),
    ],
)
def test_cache_prices(
    prices: Prices, prompt: int, completion: int, reads: int, writes: int, cost: int
) -> None:
    assert list_cost(prices, prompt, completion, reads, writes) == cost


def test_hold_assumes_the_dearest_input_price() -> None:
    assert worst_case_list_cost(CLAUDE, 10, 100) == 10 * 3750 + 100 * 15000
    assert worst_case_list_cost(Prices(input=3000, output=1, cache_write=100), 10, 0) == 30_000


@given(_counts, _counts, _counts, _counts)
def test_hold_covers_any_split_of_the_prompt(
    prompt: int, reads: int, writes: int, out: int
) -> None:
    assert list_cost(CLAUDE, prompt, out, reads, writes) <= worst_case_list_cost(
        CLAUDE, prompt, out
    )


# --- replies -----------------------------------------------------------------------------------


def test_chat_reply_to_message() -> None:
    reply = {
        "id": "chatcmpl-abc",
        "object": "chat.completion",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Let me look.",
                    "tool_calls": [
                        {
                            "id": "call_9",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
                        }
                    ],
                },
                "finish_reason": "tool_calls",
            }
        ],
        "usage": {
            "prompt_tokens": 100,
            "completion_tokens": 40,
            "prompt_tokens_details": {"cached_tokens": 64},
            "completion_tokens_details": {"reasoning_tokens": 30},
        },
    }
    assert replies.chat_to_message(reply, "claude-x") == {
        "id": "msg_abc",
        "type": "message",
        "role": "assistant",
        "model": "claude-x",
        "content": [
            {"type": "text", "text": "Let me look."},
            {"type": "tool_use", "id": "call_9", "name": "weather", "input": {"city": "Oslo"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": {
            "input_tokens": 36,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 64,
            "output_tokens": 40,
            "output_tokens_details": {"thinking_tokens": 30},
        },
    }


def test_message_reply_to_chat() -> None:
    message = {
        "id": "msg_01",
        "type": "message",
        "role": "assistant",
        "model": "claude-sonnet-4-5",
        "content": [
            {"type": "thinking", "thinking": "ok", "signature": "sig"},
            {"type": "text", "text": "Checking"},
            {"type": "tool_use", "id": "toolu_1", "name": "weather", "input": {"city": "Oslo"}},
        ],
        "stop_reason": "tool_use",
        "stop_sequence": None,
        "usage": ANTHROPIC_USAGE,
    }
    assert replies.message_to_chat(message, "claude", created=1700) == {
        "id": "chatcmpl-01",
        "object": "chat.completion",
        "created": 1700,
        "model": "claude",
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": "Checking",
                    "refusal": None,
                    "tool_calls": [
                        {
                            "id": "toolu_1",
                            "type": "function",
                            "function": {"name": "weather", "arguments": '{"city":"Oslo"}'},
                        }
                    ],
                    "reasoning_content": "ok",
                },
                "logprobs": None,
                "finish_reason": "tool_calls",
            }
        ],
        "usage": usage_mod.to_chat(TokenUsage(1320, 50, 1000, 300, 12)),
    }


@pytest.mark.parametrize(
    ("finish", "stop"),
    [
        ("stop", "end_turn"),
        ("length", "max_tokens"),
        ("tool_calls", "tool_use"),
        ("content_filter", "refusal"),
    ],
)
def test_stop_reasons_both_ways(finish: str, stop: str) -> None:
    assert replies.stop_reason(finish) == stop
    assert replies.finish_reason(stop) == finish


@pytest.mark.parametrize(
    ("stop", "finish"),
    [
        ("stop_sequence", "stop"),
        ("pause_turn", "stop"),
        ("model_context_window_exceeded", "length"),
        (None, "stop"),
    ],
)
def test_more_stop_reasons(stop: str | None, finish: str) -> None:
    assert replies.finish_reason(stop) == finish


@pytest.mark.parametrize(
    "reply",
    [
        None,
        [],
        {},
        {"choices": []},
        {"choices": [{"index": 0}]},
        {"choices": [{"message": {"tool_calls": [1]}}]},
    ],
)
def test_malformed_chat_reply(reply: Any) -> None:
    with pytest.raises(replies.MalformedReply):
        replies.chat_to_message(reply, "m")


@pytest.mark.parametrize(
    "reply", [None, {"type": "error"}, {"type": "message"}, {"type": "message", "content": []}]
)
def test_malformed_message_reply(reply: Any) -> None:
    with pytest.raises(replies.MalformedReply):
        replies.message_to_chat(reply, "m", 0)


def test_unparsable_tool_arguments_stay_visible() -> None:
    assert replies.tool_arguments('{"a": 1') == {"_raw_arguments": '{"a": 1'}
    assert replies.tool_arguments("") == {}
    assert replies.tool_arguments("[1]") == {"value": [1]}


# --- streams -----------------------------------------------------------------------------------


def _chunk(
    delta: dict[str, Any] | None = None, finish: str | None = None, **extra: Any
) -> dict[str, Any]:
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    return {
        "id": "chatcmpl-s1",
        "object": "chat.completion.chunk",
        "model": "gpt",
        "choices": choices,
        **extra,
    }


CHAT_STREAM = [
    _chunk({"role": "assistant", "content": ""}),
    _chunk({"content": "Hel"}),
    _chunk({"content": "lo"}),
    _chunk(
        {
            "tool_calls": [
                {
                    "index": 0,
                    "id": "call_a",
                    "type": "function",
                    "function": {"name": "weather", "arguments": ""},
                }
            ]
        }
    ),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
    _chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}),
    _chunk(
        {
            "tool_calls": [
                {
                    "index": 1,
                    "id": "call_b",
                    "type": "function",
                    "function": {"name": "time", "arguments": "{}"},
                }
            ]
        }
    ),
    _chunk({}, "tool_calls"),
    _chunk(
        None,
        usage={
            "prompt_tokens": 90,
            "completion_tokens": 25,
            "prompt_tokens_details": {"cached_tokens": 64},
            "completion_tokens_details": {"reasoning_tokens": 5},
        },
    ),
]
ANTHROPIC_EVENTS = [
    {
        "type": "message_start",
        "message": {
            "id": "msg_s1",
            "type": "message",
            "role": "assistant",
            "model": "claude",
            "content": [],
            "stop_reason": None,
            "stop_sequence": None,
            "usage": {
                "input_tokens": 12,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 0,
            },
        },
    },
    {"type": "ping"},
    {"type": "content_block_start", "index": 0, "content_block": {"type": "text", "text": ""}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "Hel"}},
    {"type": "content_block_delta", "index": 0, "delta": {"type": "text_delta", "text": "lo"}},
    {"type": "content_block_stop", "index": 0},
    {
        "type": "content_block_start",
        "index": 1,
        "content_block": {"type": "tool_use", "id": "call_a", "name": "weather", "input": {}},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": '{"city":'},
    },
    {
        "type": "content_block_delta",
        "index": 1,
        "delta": {"type": "input_json_delta", "partial_json": '"Oslo"}'},
    },
    {"type": "content_block_stop", "index": 1},
    {
        "type": "content_block_start",
        "index": 2,
        "content_block": {"type": "tool_use", "id": "call_b", "name": "time", "input": {}},
    },
    {
        "type": "content_block_delta",
        "index": 2,
        "delta": {"type": "input_json_delta", "partial_json": "{}"},
    },
    {"type": "content_block_stop", "index": 2},
    {
        "type": "message_delta",
        "delta": {"stop_reason": "tool_use", "stop_sequence": None},
        "usage": {
            "input_tokens": 26,
            "cache_creation_input_tokens": 0,
            "cache_read_input_tokens": 64,
            "output_tokens": 25,
            "output_tokens_details": {"thinking_tokens": 5},
        },
    },
    {"type": "message_stop"},
]


def test_chat_stream_to_anthropic_events() -> None:
    translator = ChatToMessagesStream("claude", input_tokens=12)
    events = [e for chunk in CHAT_STREAM for e in translator.feed(chunk)]
    assert not translator.complete
    events += translator.finish()
    assert events == [
        e if e["type"] != "message_start" else _with_id(e, "msg_s1") for e in ANTHROPIC_EVENTS
    ]
    assert translator.complete
    assert translator.usage == TokenUsage(90, 25, 64, 0, 5)
    assert "".join(translator.text) == 'Hello{"city":"Oslo"}{}'


def _with_id(event: dict[str, Any], msg_id: str) -> dict[str, Any]:
    return {**event, "message": {**event["message"], "id": msg_id}}


def test_chat_stream_without_usage_ends_with_the_estimate() -> None:
    translator = ChatToMessagesStream("claude", input_tokens=7)
    for chunk in [_chunk({"role": "assistant"}), _chunk({"content": "x"}), _chunk({}, "length")]:
        translator.feed(chunk)
    closing = translator.finish()
    assert closing == [
        {
            "type": "message_delta",
            "delta": {"stop_reason": "max_tokens", "stop_sequence": None},
            "usage": {
                "input_tokens": 7,
                "cache_creation_input_tokens": 0,
                "cache_read_input_tokens": 0,
                "output_tokens": 0,
            },
        },
        {"type": "message_stop"},
    ]


def test_empty_chat_stream_still_makes_a_whole_message() -> None:
    events = ChatToMessagesStream("c").finish()
    assert [e["type"] for e in events] == ["message_start", "ping", "message_delta", "message_stop"]


def test_azure_filter_chunk_is_ignored() -> None:
    translator = ChatToMessagesStream("c")
    first = translator.feed(
        {"id": "", "choices": [], "prompt_filter_results": [{"prompt_index": 0}]}
    )
    assert [e["type"] for e in first] == ["message_start", "ping"]


def test_anthropic_events_to_chat_chunks() -> None:
    translator = MessagesToChatStream("claude", created=5, include_usage=True)
    chunks = [c for e in ANTHROPIC_EVENTS for c in translator.feed(e)]
    head = {"id": "chatcmpl-s1", "object": "chat.completion.chunk", "created": 5, "model": "claude"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> dict[str, Any]:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return head | {"choices": [choice], "usage": None}

    tool_a = {
        "index": 0,
        "id": "call_a",
        "type": "function",
        "function": {"name": "weather", "arguments": ""},
    }
    tool_b = {
        "index": 1,
        "id": "call_b",
        "type": "function",
        "function": {"name": "time", "arguments": ""},
    }
    assert chunks == [
        chunk({"role": "assistant", "content": ""}),
        chunk({"content": "Hel"}),
        chunk({"content": "lo"}),
        chunk({"tool_calls": [tool_a]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '{"city":'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo"}'}}]}),
        chunk({"tool_calls": [tool_b]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": "{}"}}]}),
        chunk({}, "tool_calls"),
        head | {"choices": [], "usage": usage_mod.to_chat(TokenUsage(90, 25, 64, 0, 5))},
    ]
    assert translator.complete and translator.usage == TokenUsage(90, 25, 64, 0, 5)


def test_anthropic_stream_without_usage_chunk_and_error() -> None:
    translator = MessagesToChatStream("c", created=0, include_usage=False)
    chunks = [c for e in ANTHROPIC_EVENTS[:5] for c in translator.feed(e)]
    assert all("usage" not in c for c in chunks)
    assert (
        translator.feed(
            {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}}
        )
        == []
    )
    assert translator.error == {"type": "overloaded_error", "message": "Overloaded"}
    assert not translator.complete
    assert translator.usage == TokenUsage(12, 0)  # message_start's, for the estimate


def test_message_usage_is_cumulative() -> None:
    tracker = MessageUsage()
    tracker.feed(
        {
            "type": "message_start",
            "message": {
                "usage": {"input_tokens": 10, "cache_read_input_tokens": 5, "output_tokens": 1}
            },
        }
    )
    tracker.feed({"type": "message_delta", "usage": {"output_tokens": 4}})
    tracker.feed(
        {
            "type": "message_delta",
            "usage": {"output_tokens": 9, "cache_creation_input_tokens": 2, "input_tokens": None},
        }
    )
    assert tracker.tokens == TokenUsage(17, 9, 5, 2)


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.one_of(_text.map(lambda t: ("text", t)), _call.map(lambda c: ("tool", c))), max_size=6
    ),
    _counts,
    _counts,
)
def test_stream_round_trip(parts: list[tuple[str, Any]], prompt: int, completion: int) -> None:
    """OpenAI chunks -> Anthropic events -> OpenAI chunks keeps the text, the calls and usage."""
    chunks = [_chunk({"role": "assistant", "content": ""})]
    tool_index = 0
    for kind, value in parts:
        if kind == "text":
            chunks.append(_chunk({"content": value}))
        else:
            fn = value["function"]
            chunks.append(
                _chunk(
                    {
                        "tool_calls": [
                            {
                                "index": tool_index,
                                "id": value["id"],
                                "function": {"name": fn["name"], "arguments": ""},
                            }
                        ]
                    }
                )
            )
            chunks.append(
                _chunk(
                    {
                        "tool_calls": [
                            {"index": tool_index, "function": {"arguments": fn["arguments"]}}
                        ]
                    }
                )
            )
            tool_index += 1
    chunks.append(_chunk({}, "tool_calls" if tool_index else "stop"))
    chunks.append(_chunk(None, usage={"prompt_tokens": prompt, "completion_tokens": completion}))
    forward = ChatToMessagesStream("m")
    events = [e for c in chunks for e in forward.feed(c)] + forward.finish()
    back = MessagesToChatStream("m", created=0, include_usage=True)
    out = [c for e in events for c in back.feed(e)]
    assert _merged(out) == _merged(chunks)
    assert back.usage == TokenUsage(prompt, completion)


def _merged(
    chunks: list[dict[str, Any]],
) -> tuple[str, dict[int, tuple[str, str, str]], str | None]:
    text, calls, finish = "", {}, None
    for c in chunks:
        for choice in c["choices"]:
            delta = choice["delta"]
            text += delta.get("content") or ""
            for call in delta.get("tool_calls", []):
                name, args, cid = calls.get(call["index"], ("", "", ""))
                fn = call.get("function", {})
                calls[call["index"]] = (
                    name + fn.get("name", ""),
                    args + fn.get("arguments", ""),
                    cid + call.get("id", ""),
                )
            finish = choice["finish_reason"] or finish
    return text, calls, finish


# --- Responses API -----------------------------------------------------------------------------


def test_responses_prompt_texts_and_cap() -> None:
    body = {
        "instructions": "be brief",
        "input": [
            {"role": "user", "content": "hello there"},
            {
                "type": "message",
                "role": "user",
                "content": [
                    {"type": "input_text", "text": "and more"},
                    {"type": "input_image", "image_url": "x"},
                ],
            },
            {"type": "function_call", "call_id": "c", "name": "f", "arguments": '{"a":1}'},
            {"type": "function_call_output", "call_id": "c", "output": "42"},
            {
                "type": "function_call_output",
                "call_id": "d",
                "output": [
                    {"type": "input_text", "text": "a chart:"},
                    {"type": "input_image", "image_url": "data:image/png;base64,AA"},
                ],
            },
        ],
        "max_output_tokens": 99,
    }
    parts = responses_api.prompt(body)
    assert parts.texts == ["be brief", "hello there", "and more", '{"a":1}', "42", "a chart:"]
    assert parts.images == 2
    assert responses_api.prompt({"input": "hi"}) == PromptParts(["hi"], 0)
    assert responses_api.output_cap(body, 4096) == 99
    assert responses_api.output_cap({}, 4096) == 4096


def test_message_prompt_counts_image_blocks_in_tool_results_too() -> None:
    image = {"type": "image", "source": {"type": "url", "url": "https://x/y.png"}}
    body = {
        "system": [{"type": "text", "text": "be brief"}],
        "messages": [
            {"role": "user", "content": [image, {"type": "text", "text": "what is it?"}]},
            {
                "role": "assistant",
                "content": [{"type": "tool_use", "id": "t", "name": "look", "input": {"a": 1}}],
            },
            {
                "role": "user",
                "content": [{"type": "tool_result", "tool_use_id": "t", "content": [image]}],
            },
        ],
    }
    assert message_prompt(body) == PromptParts(["be brief", "what is it?", '{"a":1}'], 2)
    assert message_prompt({"messages": [{"role": "user", "content": "hi"}]}) == PromptParts(["hi"])
    text_doc = {"type": "document", "source": {"type": "text", "data": "the whole report"}}
    blocks = [{"type": "text", "text": "page one"}, image]
    content_doc = {"type": "document", "source": {"type": "content", "content": blocks}}
    body = {"messages": [{"role": "user", "content": [text_doc, content_doc]}]}
    assert message_prompt(body) == PromptParts(["the whole report", "page one"], 1)


@pytest.mark.parametrize(
    "terminal", ["response.completed", "response.incomplete", "response.failed"]
)
def test_responses_terminal_events_bill(terminal: str) -> None:
    usage = {
        "input_tokens": 36,
        "input_tokens_details": {"cached_tokens": 8},
        "output_tokens": 87,
        "output_tokens_details": {"reasoning_tokens": 64},
    }
    watch = responses_api.ResponsesWatch()
    watch.feed({"type": "response.created", "response": {"usage": None}})
    watch.feed({"type": "response.output_text.delta", "delta": "Hi"})
    watch.feed({"type": "response.function_call_arguments.delta", "delta": "{}"})
    assert not watch.complete and watch.text == ["Hi", "{}"]
    watch.feed({"type": terminal, "response": {"status": "x", "usage": usage}})
    assert watch.complete and watch.terminal == terminal
    assert watch.usage == TokenUsage(36, 87, 8, 0, 64)
    assert (
        responses_api.usage_of_event({"type": "response.in_progress", "response": {"usage": usage}})
        is None
    )


# --- errors ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind"),
    [
        (400, "invalid_request_error"),
        (401, "authentication_error"),
        (403, "permission_error"),
        (404, "not_found_error"),
        (413, "request_too_large"),
        (429, "rate_limit_error"),
        (500, "api_error"),
        (502, "api_error"),
        (503, "api_error"),
        (504, "api_error"),
        (529, "overloaded_error"),
        (422, "invalid_request_error"),
    ],
)
def test_anthropic_error_types(status: int, kind: str) -> None:
    assert errors.anthropic_error(status, "m") == {
        "type": "error",
        "error": {"type": kind, "message": "m"},
    }


def test_error_re_envelope() -> None:
    openai_body = {
        "error": {
            "message": "Rate limit reached",
            "type": "requests",
            "code": "rate_limit_exceeded",
        }
    }
    assert errors.to_anthropic(429, openai_body) == errors.anthropic_error(
        429, "Rate limit reached"
    )
    anthropic_body = {
        "type": "error",
        "error": {"type": "overloaded_error", "message": "Overloaded"},
    }
    assert errors.to_openai(529, anthropic_body) == {
        "error": {
            "message": "Overloaded",
            "type": "server_error",
            "param": None,
            "code": "upstream_error",
        }
    }
    assert errors.to_anthropic(502, "<html>") == errors.anthropic_error(502, "<html>")
    assert errors.to_anthropic(502, None)["error"]["message"] == "upstream error (status 502)"


# --- SSE framing -------------------------------------------------------------------------------


def test_sse_encoders() -> None:
    assert typed_event({"type": "ping"}) == b'event: ping\ndata: {"type":"ping"}\n\n'
    assert data_event({"a": 1}) == b'data: {"a":1}\n\n'


@given(st.lists(st.integers(0, 400), max_size=8))
def test_sse_decoder_any_split(cuts: list[int]) -> None:
    wire = (
        b': comment\n\nevent: message_start\ndata: {"a":1}\n\n'
        b'data: {"b":2}\r\n\r\nevent: ping\ndata: {}\n\n'
        b"data: line1\ndata: line2\n\ndata: [DONE]\n\n"
    )
    decoder = SseDecoder()
    events: list[SseEvent] = []
    last = 0
    for cut in sorted(c % (len(wire) + 1) for c in cuts):
        events += decoder.feed(wire[last:cut])
        last = cut
    events += decoder.feed(wire[last:])
    assert events == [
        SseEvent("message_start", b'{"a":1}'),
        SseEvent(None, b'{"b":2}'),
        SseEvent("ping", b"{}"),
        SseEvent(None, b"line1\nline2"),
        SseEvent(None, b"[DONE]"),
    ]
    assert decoder.pending == b""
