"""Tests of the fake OpenAI upstream, driven by the official ``openai`` SDK."""

from __future__ import annotations

import asyncio
import base64
import struct
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from tests.fake_upstream import DEFAULT_PIECES, FakeUpstream

KEY = "sk-upstream-0123456789"
# 4 words + 3 per message = 7 prompt tokens under the fake's rule
MSG: list[ChatCompletionMessageParam] = [{"role": "user", "content": "say hello to me"}]


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream(api_key=KEY)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def client(upstream: FakeUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=upstream.base_url, api_key=KEY, max_retries=0, timeout=10)
    yield sdk
    await sdk.close()


async def test_chat_non_stream(upstream: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MSG, extra_body={"unknown_field": {"x": 1}}
    )
    assert resp.id.startswith("chatcmpl-")
    assert resp.object == "chat.completion"
    assert resp.model == "gpt-4o-mini"
    assert resp.created > 0
    choice = resp.choices[0]
    assert choice.message.role == "assistant"
    assert choice.message.content == "".join(DEFAULT_PIECES)
    assert choice.finish_reason == "stop"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == 7
    assert resp.usage.completion_tokens == len(DEFAULT_PIECES)
    assert resp.usage.total_tokens == 7 + len(DEFAULT_PIECES)
    assert resp.usage.prompt_tokens_details is not None
    assert resp.usage.prompt_tokens_details.cached_tokens == 0
    assert resp.usage.completion_tokens_details is not None
    rec = upstream.last
    assert (rec.method, rec.path) == ("POST", "/v1/chat/completions")
    assert rec.headers["authorization"] == f"Bearer {KEY}"
    assert rec.body["unknown_field"] == {"x": 1}
    assert rec.body["messages"] == MSG


async def test_prompt_token_rule(client: openai.AsyncOpenAI) -> None:
    messages: list[ChatCompletionMessageParam] = [
        {"role": "system", "content": "you are  terse"},  # 3 words
        {"role": "user", "content": [{"type": "text", "text": "one two"}]},  # 2 words
        {"role": "assistant", "content": None},  # 0 words
        {"role": "user", "content": ""},
    ]
    resp = await client.chat.completions.create(model="m", messages=messages)
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == 3 + 2 + 4 * 3


async def test_max_tokens_truncates(client: openai.AsyncOpenAI) -> None:
    resp = await client.chat.completions.create(model="m", messages=MSG, max_completion_tokens=2)
    assert resp.choices[0].finish_reason == "length"
    assert resp.choices[0].message.content == "".join(DEFAULT_PIECES[:2])
    assert resp.usage is not None and resp.usage.completion_tokens == 2
    legacy = await client.chat.completions.create(model="m", messages=MSG, max_tokens=3)
    assert legacy.choices[0].finish_reason == "length"
    assert legacy.usage is not None and legacy.usage.completion_tokens == 3


async def test_stream_with_include_usage(
    upstream: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    upstream.next(content_pieces=["a", "b", "c"], cached_tokens=2)
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MSG, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert len(chunks) == 1 + 3 + 1 + 1
    assert all(c.object == "chat.completion.chunk" and c.model == "gpt-4o" for c in chunks)
    assert len({c.id for c in chunks}) == 1 and chunks[0].id.startswith("chatcmpl-")
    first, *content, final, usage_chunk = chunks
    assert first.choices[0].delta.role == "assistant"
    assert first.choices[0].delta.content == ""
    assert [c.choices[0].delta.content for c in content] == ["a", "b", "c"]
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].delta.content is None
    for c in chunks[:-1]:  # OpenAI sends an explicit "usage": null on every earlier chunk
        assert "usage" in c.model_fields_set and c.usage is None
    assert usage_chunk.choices == []
    assert usage_chunk.usage is not None
    assert usage_chunk.usage.prompt_tokens == 7
    assert usage_chunk.usage.completion_tokens == 3
    assert usage_chunk.usage.prompt_tokens_details is not None
    assert usage_chunk.usage.prompt_tokens_details.cached_tokens == 2


async def test_stream_without_usage(client: openai.AsyncOpenAI) -> None:
    stream = await client.chat.completions.create(model="m", messages=MSG, stream=True)
    chunks = [chunk async for chunk in stream]
    assert len(chunks) == 1 + len(DEFAULT_PIECES) + 1
    assert all(c.choices for c in chunks)
    assert all("usage" not in c.model_fields_set for c in chunks)
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_omit_usage_even_when_asked(
    upstream: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    upstream.next(omit_usage=True)
    stream = await client.chat.completions.create(
        model="m", messages=MSG, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    assert all(c.choices for c in chunks)
    assert all("usage" not in c.model_fields_set for c in chunks)
    upstream.next(omit_usage=True)
    resp = await client.chat.completions.create(model="m", messages=MSG)
    assert resp.usage is None


async def test_sse_wire_format(upstream: FakeUpstream) -> None:
    url = f"{upstream.base_url}/chat/completions"
    body = {
        "model": "m",
        "messages": MSG,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    headers = {"Authorization": f"Bearer {KEY}"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(url, json=body, headers=headers) as r,
    ):
        assert r.status == 200
        assert r.headers["Content-Type"].startswith("text/event-stream")
        text = await r.text()
    events = text.split("\n\n")
    assert events[-1] == "" and events[-2] == "data: [DONE]"
    assert all(e.startswith("data: {") for e in events[:-2])
    assert '"choices":[],"usage":{' in events[-3]


async def test_chunks_are_flushed_one_by_one(
    upstream: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    upstream.next(content_pieces=["a", "b", "c"], chunk_delay_s=0.1)
    stream = await client.chat.completions.create(model="m", messages=MSG, stream=True)
    arrivals = [time.monotonic() async for _ in stream]
    assert len(arrivals) == 5
    assert arrivals[-1] - arrivals[0] >= 0.35  # 4 gaps of 0.1 s: not delivered in one burst
    assert arrivals[1] - arrivals[0] >= 0.05


async def test_queue_then_default(upstream: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    upstream.next(prompt_tokens=100, completion_tokens=42, cached_tokens=30, content_pieces=["x"])
    upstream.next(content_pieces=["p", "q"], finish_reason="content_filter")
    one = await client.chat.completions.create(model="m", messages=MSG)
    two = await client.chat.completions.create(model="m", messages=MSG)
    three = await client.chat.completions.create(model="m", messages=MSG)
    assert one.choices[0].message.content == "x"
    assert one.usage is not None and one.usage.prompt_tokens_details is not None
    assert (one.usage.prompt_tokens, one.usage.completion_tokens) == (100, 42)
    assert one.usage.total_tokens == 142
    assert one.usage.prompt_tokens_details.cached_tokens == 30
    assert two.choices[0].message.content == "pq"
    assert two.choices[0].finish_reason == "content_filter"
    assert two.usage is not None and two.usage.completion_tokens == 2
    assert three.choices[0].message.content == "".join(DEFAULT_PIECES)
    upstream.set_default(content_pieces=["d"])
    four = await client.chat.completions.create(model="m", messages=MSG)
    assert four.choices[0].message.content == "d"
    upstream.reset()
    assert upstream.requests == [] and upstream.default.content_pieces == DEFAULT_PIECES


async def test_marker_in_user_message(client: openai.AsyncOpenAI) -> None:
    content = 'hi there [[fake:{"content_pieces": ["ok"], "reasoning_tokens": 5}]]'
    resp = await client.chat.completions.create(
        model="m", messages=[{"role": "user", "content": content}]
    )
    assert resp.choices[0].message.content == "ok"
    assert resp.usage is not None
    assert resp.usage.prompt_tokens == 2 + 3  # the marker is not counted
    assert resp.usage.completion_tokens == 1 + 5
    assert resp.usage.completion_tokens_details is not None
    assert resp.usage.completion_tokens_details.reasoning_tokens == 5
    with pytest.raises(openai.InternalServerError):
        await client.chat.completions.create(
            model="m", messages=[{"role": "user", "content": 'x [[fake:{"status": 500}]]'}]
        )


async def test_behaviour_header(client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.RateLimitError) as exc:
        await client.chat.completions.create(
            model="m",
            messages=MSG,
            extra_headers={"x-fake-behaviour": '{"status": 429, "headers": {"retry-after": "7"}}'},
        )
    assert exc.value.response.headers["retry-after"] == "7"
    with pytest.raises(openai.BadRequestError, match="stauts"):
        await client.chat.completions.create(
            model="m", messages=MSG, extra_headers={"x-fake-behaviour": '{"stauts": 500}'}
        )


@pytest.mark.parametrize(
    ("status", "exc_type", "err_type"),
    [
        (400, openai.BadRequestError, "invalid_request_error"),
        (401, openai.AuthenticationError, "invalid_request_error"),
        (404, openai.NotFoundError, "invalid_request_error"),
        (429, openai.RateLimitError, "requests"),
        (500, openai.InternalServerError, "server_error"),
        (503, openai.InternalServerError, "server_error"),
    ],
)
async def test_error_statuses(
    upstream: FakeUpstream,
    client: openai.AsyncOpenAI,
    status: int,
    exc_type: type[openai.APIStatusError],
    err_type: str,
) -> None:
    upstream.next(status=status)
    with pytest.raises(exc_type) as exc:
        await client.chat.completions.create(model="m", messages=MSG, stream=True)
    assert exc.value.status_code == status
    assert isinstance(exc.value.body, dict)
    assert set(exc.value.body) == {"message", "type", "param", "code"}
    assert exc.value.body["type"] == err_type


async def test_custom_error_body(upstream: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    upstream.next(status=400, error_body={"error": {"message": "boom", "type": "t", "code": "c"}})
    with pytest.raises(openai.BadRequestError, match="boom") as exc:
        await client.chat.completions.create(model="m", messages=MSG)
    assert exc.value.code == "c"
    upstream.next(status=502, error_body="<html>bad gateway</html>")
    with pytest.raises(openai.InternalServerError) as exc2:
        await client.chat.completions.create(model="m", messages=MSG)
    assert exc2.value.status_code == 502


async def test_auth_required(upstream: FakeUpstream) -> None:
    upstream.next(content_pieces=["queued"])
    async with openai.AsyncOpenAI(
        base_url=upstream.base_url, api_key="sk-wrong-key", max_retries=0
    ) as c:
        with pytest.raises(openai.AuthenticationError) as exc:
            await c.chat.completions.create(model="m", messages=MSG)
    assert exc.value.code == "invalid_api_key"
    assert "sk-wrong-key" not in exc.value.message
    assert upstream.last.headers["authorization"] == "Bearer sk-wrong-key"
    async with openai.AsyncOpenAI(base_url=upstream.base_url, api_key=KEY, max_retries=0) as c:
        resp = await c.chat.completions.create(model="m", messages=MSG)
    assert resp.choices[0].message.content == "queued"  # the 401 did not consume the queue


async def test_bad_requests(upstream: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as exc:
        await client.chat.completions.create(
            model="m", messages=MSG, stream_options={"include_usage": True}
        )
    assert exc.value.param == "stream_options"
    with pytest.raises(openai.BadRequestError) as exc:
        await client.post("/chat/completions", body={"model": "m"}, cast_to=object)
    assert exc.value.param == "messages"
    with pytest.raises(openai.NotFoundError, match="Invalid URL"):
        await client.get("/nope", cast_to=object)
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        url = f"{upstream.base_url}/chat/completions"
        async with session.post(url, data=b"{not json", headers=headers) as r:
            assert r.status == 400
            assert (await r.json())["error"]["type"] == "invalid_request_error"


async def test_legacy_completions(upstream: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    resp = await client.completions.create(model="gpt-3.5-turbo-instruct", prompt="one two three")
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
    assert resp.choices[0].text == "".join(DEFAULT_PIECES)
    assert resp.choices[0].finish_reason == "stop"
    assert resp.usage is not None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (3, len(DEFAULT_PIECES))
    tokens = await client.completions.create(model="m", prompt=[[1, 2, 3, 4], [5]], max_tokens=1)
    assert tokens.usage is not None
    assert (tokens.usage.prompt_tokens, tokens.usage.completion_tokens) == (5, 1)
    assert tokens.choices[0].finish_reason == "length"

    upstream.next(content_pieces=["x", "y"])
    stream = await client.completions.create(
        model="m", prompt=["a b", "c"], stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert [c.choices[0].text for c in chunks[:-1]] == ["x", "y", ""]
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].choices == []
    assert chunks[-1].usage is not None
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, 2)
    plain = await client.completions.create(model="m", prompt="a", stream=True)
    assert all(c.choices and "usage" not in c.model_fields_set for c in [c async for c in plain])


async def test_embeddings(upstream: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    floats = await client.embeddings.create(
        model="text-embedding-3-small", input=["hello world", "x"], encoding_format="float"
    )
    assert floats.object == "list" and floats.model == "text-embedding-3-small"
    assert [d.index for d in floats.data] == [0, 1]
    assert all(len(d.embedding) == upstream.embedding_dim for d in floats.data)
    assert floats.data[0].embedding != floats.data[1].embedding
    assert (floats.usage.prompt_tokens, floats.usage.total_tokens) == (3, 3)

    raw = await client.embeddings.create(model="e", input="hello world", encoding_format="base64")
    encoded = raw.data[0].embedding
    assert isinstance(encoded, str)
    decoded = list(struct.unpack(f"<{upstream.embedding_dim}f", base64.b64decode(encoded)))
    assert decoded == floats.data[0].embedding

    default = await client.embeddings.create(model="e", input="hello world")  # SDK asks base64
    assert upstream.last.body["encoding_format"] == "base64"
    assert default.data[0].embedding == floats.data[0].embedding

    tokens = await client.embeddings.create(
        model="e", input=[[1, 2, 3], [4, 5]], dimensions=3, encoding_format="float"
    )
    assert [len(d.embedding) for d in tokens.data] == [3, 3]
    assert tokens.usage.prompt_tokens == 5


async def test_models(client: openai.AsyncOpenAI) -> None:
    page = await client.models.list()
    ids = [m.id async for m in page]
    assert "gpt-4o" in ids
    model = await client.models.retrieve("gpt-4o")
    assert model.id == "gpt-4o" and model.object == "model"
    with pytest.raises(openai.NotFoundError) as exc:
        await client.models.retrieve("no-such-model")
    assert exc.value.code == "model_not_found"


async def test_delay(upstream: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    upstream.next(delay_s=0.2)
    started = time.monotonic()
    await client.chat.completions.create(model="m", messages=MSG)
    assert time.monotonic() - started >= 0.2


async def test_hang_until_client_timeout_is_cancelled(
    upstream: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    upstream.next(hang=True)
    with pytest.raises(openai.APITimeoutError):
        await client.chat.completions.create(model="m", messages=MSG, timeout=0.3)
    await upstream.wait_until(lambda: upstream.cancelled == 1, timeout=5)


async def test_client_closing_stream_is_cancelled(
    upstream: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    upstream.next(chunk_delay_s=0.05, content_pieces=["w"] * 200)
    stream = await client.chat.completions.create(model="m", messages=MSG, stream=True)
    async for _chunk in stream:
        break
    await stream.close()
    await upstream.wait_until(lambda: upstream.cancelled == 1, timeout=5)


async def test_mid_stream_drop(upstream: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    upstream.next(drop_after=3)
    stream = await client.chat.completions.create(model="m", messages=MSG, stream=True)
    received = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            received.append(chunk)
    assert len(received) == 3
    assert received[0].choices[0].delta.role == "assistant"
    upstream.next(drop_after=0)
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="m", messages=MSG)
    assert upstream.cancelled == 0


async def test_standalone_process() -> None:
    root = Path(__file__).resolve().parent.parent
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.fake_upstream",
        "--port",
        "0",
        "--no-record",
        cwd=root,
        stdout=asyncio.subprocess.PIPE,
    )
    try:
        assert proc.stdout is not None
        line = (await asyncio.wait_for(proc.stdout.readline(), timeout=20)).decode()
        base_url = line.rsplit(" ", 1)[-1].strip()
        assert base_url.endswith("/v1")
        async with openai.AsyncOpenAI(base_url=base_url, api_key="any", max_retries=0) as c:
            resp = await c.chat.completions.create(model="m", messages=MSG)
        assert resp.choices[0].message.content == "".join(DEFAULT_PIECES)
    finally:
        proc.terminate()
        assert await asyncio.wait_for(proc.wait(), timeout=10) == 0
