"""Tests of the fake Anthropic upstream, driven by the official ``anthropic`` SDK."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import anthropic
import pytest
from anthropic.types import MessageParam

from tests.fake_anthropic import FakeAnthropic
from tests.fake_upstream import DEFAULT_PIECES

KEY = "sk-ant-fake-0123456789"
# 4 words + 3 for the message, 2 words of system = 9 input tokens under the fake's rule
MSG: list[MessageParam] = [{"role": "user", "content": "say hello to me"}]
WEATHER = {"name": "weather", "input": {"city": "Oslo"}}


@pytest.fixture
async def upstream() -> AsyncIterator[FakeAnthropic]:
    fake = FakeAnthropic(api_key=KEY)
    await fake.start()
    yield fake
    await fake.stop()


@pytest.fixture
async def client(upstream: FakeAnthropic) -> AsyncIterator[anthropic.AsyncAnthropic]:
    sdk = anthropic.AsyncAnthropic(
        base_url=upstream.root_url, api_key=KEY, max_retries=0, timeout=10
    )
    yield sdk
    await sdk.close()


async def test_plain_message(upstream: FakeAnthropic, client: anthropic.AsyncAnthropic) -> None:
    upstream.next(cache_read_tokens=100, cache_creation_tokens=20)
    msg = await client.messages.create(
        model="claude-x",
        max_tokens=100,
        system="be terse",
        messages=MSG,
        extra_body={"unknown_field": 1},
    )
    assert msg.id.startswith("msg_") and msg.type == "message" and msg.role == "assistant"
    assert msg.model == "claude-x"
    assert [b.type for b in msg.content] == ["text"]
    assert msg.content[0].text == "".join(DEFAULT_PIECES)  # type: ignore[union-attr]
    assert msg.stop_reason == "end_turn" and msg.stop_sequence is None
    assert msg.usage.input_tokens == 9
    assert msg.usage.cache_read_input_tokens == 100
    assert msg.usage.cache_creation_input_tokens == 20
    assert msg.usage.output_tokens == len(DEFAULT_PIECES)
    rec = upstream.last
    assert (rec.method, rec.path) == ("POST", "/v1/messages")
    assert rec.headers.get("x-api-key", rec.headers.get("authorization")) in (KEY, f"Bearer {KEY}")
    assert rec.headers["anthropic-version"]
    assert rec.body["unknown_field"] == 1


async def test_stream_events(upstream: FakeAnthropic, client: anthropic.AsyncAnthropic) -> None:
    upstream.next(content_pieces=["a", "b"], tool_calls=[WEATHER], cache_read_tokens=7)
    stream = await client.messages.create(model="c", max_tokens=50, messages=MSG, stream=True)
    events = [e async for e in stream]
    assert [e.type for e in events] == [
        "message_start",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "content_block_start",
        "content_block_delta",
        "content_block_delta",
        "content_block_stop",
        "message_delta",
        "message_stop",
    ]  # the SDK hides ping
    start = events[0]
    assert start.type == "message_start"
    assert start.message.usage.input_tokens == 7 and start.message.usage.output_tokens == 1
    delta = events[-2]
    assert delta.type == "message_delta"
    assert delta.delta.stop_reason == "tool_use"
    assert delta.usage.output_tokens == 3  # cumulative: 2 pieces + 1 tool call
    assert delta.usage.input_tokens == 7 and delta.usage.cache_read_input_tokens == 7


async def test_stream_helper_accumulates(
    client: anthropic.AsyncAnthropic, upstream: FakeAnthropic
) -> None:
    upstream.next(tool_calls=[WEATHER], cache_creation_tokens=5, thinking_tokens=4)
    async with client.messages.stream(model="c", max_tokens=50, messages=MSG) as stream:
        text = [t async for t in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(text) == "".join(DEFAULT_PIECES)
    assert final.content[1].type == "tool_use"
    assert final.content[1].input == {"city": "Oslo"}  # type: ignore[union-attr]
    assert final.content[1].name == "weather"  # type: ignore[union-attr]
    assert final.stop_reason == "tool_use"
    assert final.usage.output_tokens == len(DEFAULT_PIECES) + 1 + 4
    assert final.usage.cache_creation_input_tokens == 5
    assert final.usage.output_tokens_details is not None
    assert final.usage.output_tokens_details.thinking_tokens == 4


async def test_wire_format_has_event_lines_and_ping(upstream: FakeAnthropic) -> None:
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    body = {"model": "c", "max_tokens": 5, "messages": MSG, "stream": True}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{upstream.base_url}/messages", json=body, headers=headers) as r,
    ):
        assert r.status == 200 and r.headers["Content-Type"].startswith("text/event-stream")
        text = await r.text()
    events = text.split("\n\n")
    assert events[-1] == ""
    assert events[0].startswith("event: message_start\ndata: {")
    assert events[2] == 'event: ping\ndata: {"type":"ping"}'
    assert events[-2] == 'event: message_stop\ndata: {"type":"message_stop"}'
    assert "[DONE]" not in text


async def test_max_tokens_and_stop_sequences(client: anthropic.AsyncAnthropic) -> None:
    cut = await client.messages.create(model="c", max_tokens=2, messages=MSG)
    assert cut.stop_reason == "max_tokens" and cut.usage.output_tokens == 2
    stopped = await client.messages.create(
        model="c", max_tokens=50, messages=MSG, stop_sequences=[" fake"]
    )
    assert stopped.stop_reason == "stop_sequence" and stopped.stop_sequence == " fake"
    assert stopped.content[0].text == "Hello from the"  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("status", "exc_type", "err_type"),
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (401, anthropic.AuthenticationError, "authentication_error"),
        (403, anthropic.PermissionDeniedError, "permission_error"),
        (404, anthropic.NotFoundError, "not_found_error"),
        (413, anthropic.RequestTooLargeError, "request_too_large"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
    ],
)
async def test_error_statuses(
    upstream: FakeAnthropic,
    client: anthropic.AsyncAnthropic,
    status: int,
    exc_type: type[anthropic.APIStatusError],
    err_type: str,
) -> None:
    upstream.next(status=status)
    with pytest.raises(exc_type) as exc:
        await client.messages.create(model="c", max_tokens=5, messages=MSG)
    assert exc.value.status_code == status
    assert isinstance(exc.value.body, dict)
    assert exc.value.body["type"] == "error"
    assert exc.value.body["error"]["type"] == err_type
    assert exc.value.request_id is not None


async def test_auth_and_version(upstream: FakeAnthropic) -> None:
    async with anthropic.AsyncAnthropic(
        base_url=upstream.root_url, api_key="wrong", max_retries=0
    ) as bad:
        with pytest.raises(anthropic.AuthenticationError, match="invalid x-api-key"):
            await bad.messages.create(model="c", max_tokens=5, messages=MSG)
    async with aiohttp.ClientSession() as session:
        url = f"{upstream.base_url}/messages"
        body = {"model": "c", "max_tokens": 5, "messages": MSG}
        async with session.post(url, json=body) as r:
            assert r.status == 401
            assert (await r.json())["error"]["message"] == "x-api-key header is required"
        async with session.post(url, json=body, headers={"x-api-key": KEY}) as r:
            assert r.status == 400
            assert (await r.json())["error"]["message"] == "anthropic-version: header is required"


async def test_bad_requests(client: anthropic.AsyncAnthropic) -> None:
    with pytest.raises(anthropic.BadRequestError, match="max_tokens: Field required"):
        await client.post("/v1/messages", body={"model": "c", "messages": MSG}, cast_to=object)
    with pytest.raises(anthropic.BadRequestError, match="role"):
        await client.messages.create(
            model="c",
            max_tokens=5,
            messages=[{"role": "system", "content": "x"}],  # type: ignore[list-item]
        )
    with pytest.raises(anthropic.NotFoundError):
        await client.get("/v1/nope", cast_to=object)


async def test_count_tokens(client: anthropic.AsyncAnthropic) -> None:
    counted = await client.messages.count_tokens(model="c", system="be terse", messages=MSG)
    assert counted.input_tokens == 9


async def test_stream_error_event(
    upstream: FakeAnthropic, client: anthropic.AsyncAnthropic
) -> None:
    upstream.next(stream_error="overloaded_error")
    stream = await client.messages.create(model="c", max_tokens=50, messages=MSG, stream=True)
    seen = []
    with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
        async for event in stream:
            seen.append(event.type)
    assert seen == ["message_start", "content_block_start", "content_block_delta"]


async def test_mid_stream_drop_hang_and_malformed(
    upstream: FakeAnthropic, client: anthropic.AsyncAnthropic
) -> None:
    upstream.next(drop_after=3)
    stream = await client.messages.create(model="c", max_tokens=50, messages=MSG, stream=True)
    with pytest.raises(Exception, match="peer closed connection"):  # the SDK's httpx error
        async for _ in stream:
            pass
    upstream.next(hang=True)
    with pytest.raises(anthropic.APITimeoutError):
        await client.messages.create(model="c", max_tokens=5, messages=MSG, timeout=0.3)
    await upstream.wait_until(lambda: upstream.cancelled == 1)
    upstream.next(malformed=True)
    async with aiohttp.ClientSession() as session:
        headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
        body = {"model": "c", "max_tokens": 5, "messages": MSG}
        async with session.post(f"{upstream.base_url}/messages", json=body, headers=headers) as r:
            assert r.status == 200
            with pytest.raises(ValueError):
                await r.json()


async def test_omit_usage_and_marker(upstream: FakeAnthropic) -> None:
    headers = {"x-api-key": KEY, "anthropic-version": "2023-06-01"}
    marker = 'hi [[fake:{"omit_usage": true, "content_pieces": ["ok"]}]]'
    body = {"model": "c", "max_tokens": 5, "messages": [{"role": "user", "content": marker}]}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{upstream.base_url}/messages", json=body, headers=headers) as r,
    ):
        reply = await r.json()
    assert "usage" not in reply and reply["content"][0]["text"] == "ok"
