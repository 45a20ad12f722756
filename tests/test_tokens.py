"""Offline token counting: exact counts, the chat formula, bounds and the no-network guarantee."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.proxy import tokens
from gateway.proxy.tokens import TokenCounter

ROOT = Path(__file__).resolve().parent.parent
ENCODINGS = ("cl100k_base", "o200k_base")


@pytest.fixture(scope="module")
def counter() -> TokenCounter:
    tc = TokenCounter()
    tc.preload(ENCODINGS)
    return tc


def test_both_real_encodings_load(counter: TokenCounter) -> None:
    cl100k, cl_name = counter.encoding_for("cl100k_base")
    o200k, o_name = counter.encoding_for("o200k_base")
    assert (cl_name, o_name) == ("cl100k_base", "o200k_base")
    assert (cl100k.n_vocab, o200k.n_vocab) == (100277, 200019)
    # Token ids published in tiktoken's README and OpenAI's cookbook.
    assert cl100k.encode_ordinary("hello world") == [15339, 1917]
    assert o200k.encode_ordinary("hello world") == [24912, 2375]
    assert counter.encoding_for("o200k_base")[0] is o200k  # cached


def test_specs_match_tiktoken_openai_public(monkeypatch: pytest.MonkeyPatch) -> None:
    """Hash, pat_str and special tokens are tiktoken's own (its downloader stubbed out)."""
    from tiktoken_ext import openai_public

    hashes: list[str] = []

    def fake_load(url: str, expected_hash: str) -> dict[bytes, int]:
        hashes.append(expected_hash)
        return {b"a": 0}

    monkeypatch.setattr(openai_public, "load_tiktoken_bpe", fake_load)
    for name in ENCODINGS:
        theirs = getattr(openai_public, name)()
        ours = tokens._SPECS[name]
        assert (ours.pat_str, ours.special_tokens) == (theirs["pat_str"], theirs["special_tokens"])
        assert ours.sha256 == hashes[-1]


@pytest.mark.parametrize(
    ("text", "cl100k", "o200k"),
    [
        ("", 0, 0),
        ("hello world", 2, 2),
        ("tiktoken is great!", 6, 6),
        ("What's the weather in Paris?", 7, 6),
        ("Hello, 世界! 🌍 iPhone naïve café", 14, 11),
        ("<|endoftext|>", 7, 7),
        ("<|endoftext|><|fim_prefix|><|endofprompt|>", 19, 18),
    ],
)
def test_count_text_exact(counter: TokenCounter, text: str, cl100k: int, o200k: int) -> None:
    assert counter.count_text(text, "cl100k_base") == cl100k
    assert counter.count_text(text, "o200k_base") == o200k


USER_HELLO: dict[str, Any] = {"role": "user", "content": "hello world"}
WEATHER_TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "Current weather",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
TOOL_CALL = {
    "id": "call_1",
    "type": "function",
    "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'},
}


@pytest.mark.parametrize(
    ("body", "cl100k", "o200k"),
    [
        # 3 reply priming only
        ({"messages": []}, 3, 3),
        # 3/message + "user" 1 + "hello world" 2 + 3 priming
        ({"messages": [USER_HELLO]}, 9, 9),
        # 3 + "user" 1 + "bob" 1 + name 1 + "hi" 1 + 3
        ({"messages": [{"role": "user", "name": "bob", "content": "hi"}]}, 10, 10),
        # 3 + "user" 1 + "Describe this." 3 + "And this one:" 4 + 3, + 2 images at 5,000
        # (policies.images.DEFAULT, what the hold counts an image at unless told the model's)
        (
            {
                "messages": [
                    {
                        "role": "user",
                        "content": [
                            {"type": "text", "text": "Describe this."},
                            {"type": "image_url", "image_url": {"url": "data:image/png;base64,AA"}},
                            {"type": "text", "text": "And this one:"},
                            {"type": "image_url", "image_url": {"url": "https://x/y.png"}},
                        ],
                    }
                ]
            },
            10_014,
            10_014,
        ),
        # user: 3 + 1 + 7|6; assistant: 3 + 1 + null content 0 + tool_calls JSON 29;
        # tool: 3 + 1 + "call_1" 3 + "18C and sunny" 4; + 3
        (
            {
                "messages": [
                    {"role": "user", "content": "What's the weather in Paris?"},
                    {"role": "assistant", "content": None, "tool_calls": [TOOL_CALL]},
                    {"role": "tool", "tool_call_id": "call_1", "content": "18C and sunny"},
                ]
            },
            58,
            57,
        ),
        # 9 + tools as JSON text 39; a string tool_choice adds nothing
        ({"messages": [USER_HELLO], "tools": WEATHER_TOOLS, "tool_choice": "auto"}, 48, 48),
        # 9 + '{"type":"json_object"}' 6
        ({"messages": [USER_HELLO], "response_format": {"type": "json_object"}}, 15, 15),
    ],
)
def test_chat_formula(counter: TokenCounter, body: dict[str, Any], cl100k: int, o200k: int) -> None:
    assert counter.count_chat_prompt(body, "cl100k_base") == cl100k
    assert counter.count_chat_prompt(body, "o200k_base") == o200k


def test_chat_images_count_at_the_models_image_tokens(counter: TokenCounter) -> None:
    image = {"type": "image_url", "image_url": {"url": "https://x/y.png", "detail": "low"}}
    body = {"messages": [{"role": "user", "content": [image, {"type": "text", "text": "hi"}]}]}
    # 3 + "user" 1 + "hi" 1 + 3 = 8, and the image at what the model says one can cost
    assert counter.count_chat_prompt(body, "o200k_base", image_tokens=1_445) == 8 + 1_445
    assert counter.count_chat_prompt(body, "o200k_base", image_tokens=0) == 8


def test_chat_matches_openai_cookbook_api_counts(counter: TokenCounter) -> None:
    """The cookbook's example, whose counts OpenAI's API confirmed: gpt-4 129, gpt-4o 124."""
    user, assistant = "example_user", "example_assistant"
    messages = [
        {
            "role": "system",
            "content": "You are a helpful, pattern-following assistant that translates "
            "corporate jargon into plain English.",
        },
        {
            "role": "system",
            "name": user,
            "content": "New synergies will help drive top-line growth.",
        },
        {
            "role": "system",
            "name": assistant,
            "content": "Things working well together will increase revenue.",
        },
        {
            "role": "system",
            "name": user,
            "content": "Let's circle back when we have more bandwidth to touch base on "
            "opportunities for increased leverage.",
        },
        {
            "role": "system",
            "name": assistant,
            "content": "Let's talk later when we're less busy about how to do better.",
        },
        {
            "role": "user",
            "content": "This late pivot means we don't have time to boil the ocean for the "
            "client deliverable.",
        },
    ]
    assert counter.count_chat_prompt({"messages": messages}, "cl100k_base") == 129
    assert counter.count_chat_prompt({"messages": messages}, "o200k_base") == 124


def test_special_token_text_never_raises(counter: TokenCounter) -> None:
    special = "<|endoftext|> <|fim_prefix|><|fim_middle|><|fim_suffix|><|endofprompt|>"
    body = {"messages": [{"role": "user", "content": special}], "prompt": special, "input": special}
    for enc in ENCODINGS:
        assert counter.count_chat_prompt(body, enc) > 7
        assert counter.count_completion_prompt(body, enc) > 7
        assert counter.count_embedding_input(body, enc) > 7


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("hello world", 2),
        (["hello world", "tiktoken is great!"], 8),
        ([15339, 1917, 0], 3),
        ([[15339, 1917], [1], []], 3),
        ([], 0),
        (None, 0),
    ],
)
def test_completion_and_embedding_inputs(counter: TokenCounter, value: Any, expected: int) -> None:
    for enc in ENCODINGS:
        assert counter.count_completion_prompt({"prompt": value}, enc) == expected
        assert counter.count_embedding_input({"input": value}, enc) == expected


def test_completion_suffix_counts(counter: TokenCounter) -> None:
    body = {"prompt": "hello world", "suffix": "tiktoken is great!"}
    assert counter.count_completion_prompt(body, "o200k_base") == 8


def test_large_input_uses_byte_bound() -> None:
    small = TokenCounter(exact_chars=20)
    text = "hello world " * 10  # 120 chars, 20 tokens exactly
    assert small.count_text(text, "cl100k_base") == 120
    assert small.count_text("héllo wörld " * 10, "cl100k_base") == 140  # UTF-8 bytes
    # The budget is per request: "user", "hello world", "user" (19 chars) are encoded
    # exactly, then the long text no longer fits and is bounded by its bytes.
    body = {
        "messages": [{"role": "user", "content": "hello world"}, {"role": "user", "content": text}]
    }
    assert small.count_chat_prompt(body, "cl100k_base") == 3 + 1 + 2 + 3 + 1 + 120 + 3


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=200))
def test_byte_bound_never_under_estimates(counter: TokenCounter, text: str) -> None:
    for enc in ENCODINGS:
        assert tokens._byte_bound(text) >= counter.count_text(text, enc)


def test_lone_surrogates_do_not_raise(counter: TokenCounter) -> None:
    assert counter.count_text("a\ud800b", "o200k_base") == 3
    assert TokenCounter(exact_chars=0).count_text("a\ud800b", "cl100k_base") == 5


def test_repeated_strings_are_counted_once_and_the_memo_is_bounded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    tc = TokenCounter()
    system = "You are a concise assistant that answers questions about software architecture."
    body = {"messages": [{"role": "system", "content": system}, {"role": "user", "content": "hi"}]}
    first = tc.count_chat_prompt(body, "o200k_base")
    memo = tc._memos["o200k_base"]
    calls: list[str] = []
    real = memo.encode
    memo.encode = lambda text: calls.append(text) or real(text)  # type: ignore[method-assign]
    assert tc.count_chat_prompt(body, "o200k_base") == first
    assert calls == []  # every string came from the memo
    for name in ("cl100k_base", "o200k_base"):  # one memo per encoding
        exact = len(tc.encoding_for(name)[0].encode_ordinary(system))
        assert tc.count_text(system, name) == exact
    assert calls == []
    long_text = "word " * (tokens.MEMO_MAX_TEXT // 5 + 1)
    tc.count_text(long_text, "o200k_base")
    assert long_text not in memo.counts  # too long to keep
    monkeypatch.setattr(tokens, "MEMO_MAX_ENTRIES", 3)
    for text in ("a b", "c d", "e f", "g h"):
        tc.count_text(text, "o200k_base")
    assert len(memo.counts) <= 3 and "g h" in memo.counts


def test_unknown_encoding_is_refused(counter: TokenCounter) -> None:
    with pytest.raises(ValueError, match="unknown encoding"):
        counter.encoding_for("p50k_base")


def test_o200k_falls_back_to_cl100k_when_not_installed(monkeypatch: pytest.MonkeyPatch) -> None:
    real = tokens._candidates
    monkeypatch.setattr(tokens, "_candidates", lambda name: [] if "o200k" in name else real(name))
    tc = TokenCounter()
    enc, used = tc.encoding_for("o200k_base")
    assert used == "cl100k_base"
    assert enc is tc.encoding_for("cl100k_base")[0]
    assert tc.count_text("Hello, 世界! 🌍 iPhone naïve café", "o200k_base") == 14


def test_file_with_wrong_hash_is_rejected(tmp_path: Path) -> None:
    bogus = tmp_path / "o200k_base.tiktoken"
    bogus.write_bytes(b"aGVsbG8= 0\n")
    assert tokens._read_verified(bogus, tokens._SPECS["o200k_base"].sha256) is None


CHILD = r"""
import socket

attempts = []

def refuse(*args, **kwargs):
    attempts.append(args)
    raise OSError("network access attempted")

socket.socket.connect = refuse
socket.socket.connect_ex = refuse
socket.create_connection = refuse
socket.getaddrinfo = refuse

from gateway.proxy.tokens import TokenCounter

tc = TokenCounter()
tc.preload(["cl100k_base", "o200k_base"])
names = [tc.encoding_for(n)[1] for n in ("cl100k_base", "o200k_base")]
counts = [tc.count_text("hello world", n) for n in ("cl100k_base", "o200k_base")]
print(*names, *counts, len(attempts))

import tiktoken  # control: tiktoken's own loader does try the network, and is refused
try:
    tiktoken.get_encoding("r50k_base")
except Exception:
    pass
print(len(attempts) > 0)
"""


def test_loading_never_touches_the_network(tmp_path: Path) -> None:
    cache = tmp_path / "tiktoken-cache"
    cache.mkdir()
    env = {**os.environ, "TIKTOKEN_CACHE_DIR": str(cache), "DATA_GYM_CACHE_DIR": str(cache)}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", CHILD], env=env, cwd=tmp_path, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["cl100k_base", "o200k_base", "2", "2", "0", "True"]
    assert list(cache.iterdir()) == []
