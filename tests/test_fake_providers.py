"""Tests of the fake Azure OpenAI server and the fake's Responses API, driven by the ``openai``
SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from tests.fake_azure import FakeAzure
from tests.fake_upstream import DEFAULT_PIECES, FakeUpstream

KEY = "azure-key-0123456789"
OPENAI_KEY = "sk-upstream-0123456789"
MSG: Any = [{"role": "user", "content": "say hello to me"}]  # the SDK's message params
WEATHER = {"name": "weather", "arguments": {"city": "Oslo"}}


@pytest.fixture
async def azure() -> AsyncIterator[FakeAzure]:
    fake = FakeAzure(api_key=KEY)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def azure_client(azure: FakeAzure) -> AsyncIterator[openai.AsyncAzureOpenAI]:
    sdk = openai.AsyncAzureOpenAI(
        azure_endpoint=azure.endpoint,
        api_key=KEY,
        api_version="2024-10-21",
        max_retries=0,
        timeout=10,
    )
    yield sdk
    await sdk.close()


@pytest.fixture
async def upstream() -> AsyncIterator[FakeUpstream]:
    fake = FakeUpstream(api_key=OPENAI_KEY)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def client(upstream: FakeUpstream) -> AsyncIterator[openai.AsyncOpenAI]:
    sdk = openai.AsyncOpenAI(base_url=upstream.base_url, api_key=OPENAI_KEY, max_retries=0)
    yield sdk
    await sdk.close()


# --- Azure -------------------------------------------------------------------------------------


async def test_azure_chat(azure: FakeAzure, azure_client: openai.AsyncAzureOpenAI) -> None:
    azure.next(cached_tokens=3)
    resp = await azure_client.chat.completions.create(model="gpt4o-prod", messages=MSG)
    assert resp.model == "gpt-4o-2024-08-06"
    assert resp.choices[0].message.content == "".join(DEFAULT_PIECES)
    assert resp.usage is not None and resp.usage.prompt_tokens == 7
    assert resp.usage.prompt_tokens_details is not None
    assert resp.usage.prompt_tokens_details.cached_tokens == 3
    extra = resp.model_extra or {}
    assert extra["prompt_filter_results"][0]["prompt_index"] == 0
    rec = azure.last
    assert rec.path == "/openai/deployments/gpt4o-prod/chat/completions"
    assert rec.query == {"api-version": "2024-10-21"}
    assert rec.headers["api-key"] == KEY and "authorization" not in rec.headers


async def test_azure_stream_starts_with_filter_chunk(
    azure_client: openai.AsyncAzureOpenAI,
) -> None:
    stream = await azure_client.chat.completions.create(
        model="mini",
        messages=MSG,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = [c async for c in stream]
    assert chunks[0].choices == [] and chunks[0].id == ""
    assert chunks[1].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == "".join(
        DEFAULT_PIECES
    )


async def test_azure_tool_calls(azure: FakeAzure, azure_client: openai.AsyncAzureOpenAI) -> None:
    azure.next(tool_calls=[WEATHER], content_pieces=[])
    resp = await azure_client.chat.completions.create(model="mini", messages=MSG)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.function.name == "weather"  # type: ignore[union-attr]
    assert call.function.arguments == '{"city":"Oslo"}'  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("status", "exc_type", "code"),
    [
        (400, openai.BadRequestError, "content_filter"),
        (401, openai.AuthenticationError, "401"),
        (404, openai.NotFoundError, "DeploymentNotFound"),
        (429, openai.RateLimitError, "429"),
        (500, openai.InternalServerError, "InternalServerError"),
        (503, openai.InternalServerError, "InternalServerError"),
    ],
)
async def test_azure_errors(
    azure: FakeAzure,
    azure_client: openai.AsyncAzureOpenAI,
    status: int,
    exc_type: type[openai.APIStatusError],
    code: str,
) -> None:
    azure.next(status=status)
    with pytest.raises(exc_type) as exc:
        await azure_client.chat.completions.create(model="mini", messages=MSG)
    assert exc.value.status_code == status and exc.value.code == code
    if status == 429:
        assert exc.value.response.headers["retry-after"] == "1"


async def test_azure_refusals(azure: FakeAzure, azure_client: openai.AsyncAzureOpenAI) -> None:
    with pytest.raises(openai.NotFoundError) as exc:
        await azure_client.chat.completions.create(model="nope", messages=MSG)
    assert exc.value.code == "DeploymentNotFound"
    url = f"{azure.base_url}/deployments/mini/chat/completions"
    body = {"messages": MSG}
    async with aiohttp.ClientSession() as session:
        async with session.post(url, json=body, headers={"api-key": KEY}) as r:
            assert r.status == 404
            assert await r.json() == {"error": {"code": "404", "message": "Resource not found"}}
        params = {"api-version": "2024-10-21"}
        async with session.post(url, json=body, params=params, headers={"api-key": "x"}) as r:
            assert r.status == 401 and (await r.json())["error"]["code"] == "401"
        async with session.post(url, json={}, params=params, headers={"api-key": KEY}) as r:
            assert r.status == 400 and (await r.json())["error"]["code"] == "BadRequest"


async def test_azure_responses_and_embeddings(azure_client: openai.AsyncAzureOpenAI) -> None:
    resp = await azure_client.responses.create(model="mini", input="hello there")
    assert resp.model == "gpt-4o-mini" and resp.output_text == "".join(DEFAULT_PIECES)
    emb = await azure_client.embeddings.create(model="mini", input="x", encoding_format="float")
    assert emb.usage.prompt_tokens == 1


async def test_azure_hang_and_drop(azure: FakeAzure, azure_client: openai.AsyncAzureOpenAI) -> None:
    azure.next(hang=True)
    with pytest.raises(openai.APITimeoutError):
        await azure_client.chat.completions.create(model="mini", messages=MSG, timeout=0.3)
    await azure.wait_until(lambda: azure.cancelled == 1)
    azure.next(drop_after=2)
    stream = await azure_client.chat.completions.create(model="mini", messages=MSG, stream=True)
    with pytest.raises(openai.APIConnectionError):
        async for _ in stream:
            pass


# --- Responses API on the OpenAI fake ----------------------------------------------------------


async def test_responses_plain(upstream: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    upstream.next(cached_tokens=2, reasoning_tokens=4)
    resp = await client.responses.create(
        model="gpt-4o", instructions="be terse", input=[{"role": "user", "content": "hi there"}]
    )
    assert resp.id.startswith("resp_") and resp.object == "response"
    assert resp.status == "completed" and resp.output_text == "".join(DEFAULT_PIECES)
    assert resp.usage is not None
    assert resp.usage.input_tokens == 2 + 3 + 2  # instructions + 3 per item + words
    assert resp.usage.input_tokens_details.cached_tokens == 2
    assert resp.usage.output_tokens == len(DEFAULT_PIECES) + 4
    assert resp.usage.output_tokens_details.reasoning_tokens == 4
    assert resp.usage.total_tokens == 7 + len(DEFAULT_PIECES) + 4
    assert upstream.last.path == "/v1/responses"


async def test_responses_stream(upstream: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    upstream.next(content_pieces=["a", "b"], tool_calls=[WEATHER])
    stream = await client.responses.create(model="gpt-4o", input="hello", stream=True)
    events = [e async for e in stream]
    assert [e.type for e in events] == [
        "response.created",
        "response.in_progress",
        "response.output_item.added",
        "response.content_part.added",
        "response.output_text.delta",
        "response.output_text.delta",
        "response.output_text.done",
        "response.content_part.done",
        "response.output_item.done",
        "response.output_item.added",
        "response.function_call_arguments.delta",
        "response.function_call_arguments.done",
        "response.output_item.done",
        "response.completed",
    ]
    assert [e.sequence_number for e in events] == list(range(len(events)))
    final = events[-1]
    assert final.type == "response.completed"
    assert final.response.usage is not None and final.response.usage.output_tokens == 3
    assert final.response.output[1].type == "function_call"


async def test_responses_stream_wire_format(upstream: FakeUpstream) -> None:
    headers = {"Authorization": f"Bearer {OPENAI_KEY}"}
    body = {"model": "m", "input": "x", "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{upstream.base_url}/responses", json=body, headers=headers) as r,
    ):
        text = await r.text()
    events = text.split("\n\n")
    assert events[0].startswith("event: response.created\ndata: {")
    assert events[-2].startswith("event: response.completed\ndata: {") and events[-1] == ""
    assert "[DONE]" not in text


async def test_responses_incomplete_and_failed(
    upstream: FakeUpstream, client: openai.AsyncOpenAI
) -> None:
    cut = await client.responses.create(model="m", input="x", max_output_tokens=2)
    assert cut.status == "incomplete" and cut.incomplete_details is not None
    assert cut.incomplete_details.reason == "max_output_tokens"
    assert cut.usage is not None and cut.usage.output_tokens == 2
    upstream.next(fail_response=True)
    stream = await client.responses.create(model="m", input="x", stream=True)
    events = [e async for e in stream]
    assert events[-1].type == "response.failed"
    assert events[-1].response.error is not None and events[-1].response.usage is not None


async def test_responses_failures(upstream: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    upstream.next(status=429)
    with pytest.raises(openai.RateLimitError):
        await client.responses.create(model="m", input="x")
    upstream.next(omit_usage=True)
    assert (await client.responses.create(model="m", input="x")).usage is None
    upstream.next(drop_after=3)
    stream = await client.responses.create(model="m", input="x", stream=True)
    with pytest.raises(openai.APIConnectionError):
        async for _ in stream:
            pass
    upstream.next(malformed=True)
    with pytest.raises(ValueError):  # the SDK fails to parse the cut JSON
        await client.responses.create(model="m", input="x")
    with pytest.raises(openai.BadRequestError, match="input"):
        await client.post("/responses", body={"model": "m"}, cast_to=object)


async def test_chat_tool_calls_stream(upstream: FakeUpstream, client: openai.AsyncOpenAI) -> None:
    upstream.next(tool_calls=[WEATHER, {"name": "time", "arguments": "{}"}], content_pieces=["k"])
    stream = await client.chat.completions.create(model="m", messages=MSG, stream=True)
    chunks = [c async for c in stream]
    calls: dict[int, str] = {}
    for chunk in chunks:
        for call in chunk.choices[0].delta.tool_calls or []:
            arguments = call.function.arguments or ""  # type: ignore[union-attr]
            calls[call.index] = calls.get(call.index, "") + arguments
    assert calls == {0: '{"city":"Oslo"}', 1: "{}"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
