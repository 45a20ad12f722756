"""``POST /v1/messages`` and ``/v1/messages/count_tokens`` through the official ``anthropic`` SDK,
on an Anthropic upstream (pass-through) and an OpenAI one (translated), and Chat Completions on
an Anthropic upstream through the ``openai`` SDK: exact nano-dollars, one usage record each."""

from __future__ import annotations

import dataclasses
from typing import Any

import aiohttp
import anthropic
import asyncpg
import openai
import orjson
import pytest

from tests.conftest import (
    ADMIN_TOKEN,
    ANTHROPIC_KEY,
    Providers,
    providers_config,
    start_gateway,
)
from tests.helpers import Api, eventually
from tests.rawhttp import counts

MSG: Any = [{"role": "user", "content": "hi there"}]  # 3 + 2 = 5 input tokens in the fakes
WEATHER_TOOL: Any = {
    "name": "weather",
    "description": "Weather now",
    "input_schema": {"type": "object", "properties": {"city": {"type": "string"}}},
}
TEXT = "Hello from the fake upstream."


def claude(providers: Providers, key: str) -> anthropic.AsyncAnthropic:
    return anthropic.AsyncAnthropic(
        base_url=providers.gateway.base, api_key=key, max_retries=0, timeout=10
    )


def oai(providers: Providers, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=providers.gateway.v1, api_key=key, max_retries=0, timeout=10)


async def usage_row(db: asyncpg.Connection, request_id: str) -> asyncpg.Record:
    async def probe() -> asyncpg.Record | None:
        return await db.fetchrow("SELECT * FROM usage_records WHERE request_id = $1", request_id)

    row = await eventually(probe, lambda r: r is not None)
    assert row is not None
    return row


async def records(db: asyncpg.Connection, team_id: str) -> int:
    return int(await db.fetchval("SELECT count(*) FROM usage_records WHERE team_id = $1", team_id))


# --- Messages on an Anthropic upstream ---------------------------------------------------------


async def test_messages_plain_with_cache_prices(
    providers: Providers, api: Api, db: asyncpg.Connection
) -> None:
    owner, team, secret = await api.funded_team_key("1.00")
    providers.anthropic.next(cache_read_tokens=100, cache_creation_tokens=20)
    served, handed = counts(providers.gateway)
    raw = await claude(providers, secret).messages.with_raw_response.create(
        model="claude",
        max_tokens=50,
        messages=MSG,
        extra_body={"metadata": {"user_id": "u1"}},
        extra_headers={"anthropic-beta": "prompt-caching-2024-07-31"},
    )
    message = await raw.parse()
    assert counts(providers.gateway) == (served + 1, handed)  # served by the lean front
    assert message.content[0].text == TEXT  # type: ignore[union-attr]
    assert message.usage.input_tokens == 5
    assert message.usage.cache_read_input_tokens == 100
    assert message.usage.cache_creation_input_tokens == 20
    cost = 5 * 3000 + 100 * 300 + 20 * 3750 + 6 * 15000
    assert raw.headers["x-modelbridge-cost-usd"] == f"0.{cost:09d}"
    row = await usage_row(db, raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["cached_tokens"], row["completion_tokens"]) == (125, 100, 6)
    assert (row["charged"], row["endpoint"], row["model"]) == (cost, "/v1/messages", "claude")
    overview = await api.overview(owner, team["id"])
    assert overview["spend_this_period_usd"] == f"0.{cost:09d}"
    sent = providers.anthropic.last
    assert sent.path == "/v1/messages" and sent.body["model"] == "claude-sonnet-4-5"
    assert sent.body["metadata"] == {"user_id": "u1"}  # unknown to us, passed through
    assert sent.headers["x-api-key"] == ANTHROPIC_KEY and secret not in str(sent.headers)
    assert sent.headers["anthropic-beta"] == "prompt-caching-2024-07-31"
    assert sent.headers["anthropic-version"] == raw.http_request.headers["anthropic-version"]


async def test_messages_stream_with_tool_use(
    providers: Providers, api: Api, db: asyncpg.Connection
) -> None:
    _, _, secret = await api.funded_team_key("1.00")
    providers.anthropic.next(tool_calls=[{"name": "weather", "input": {"city": "Oslo"}}])
    client = claude(providers, secret)
    served, handed = counts(providers.gateway)
    async with client.messages.stream(
        model="claude", max_tokens=50, messages=MSG, tools=[WEATHER_TOOL]
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]
    assert text == TEXT and final.stop_reason == "tool_use"
    assert final.content[1].input == {"city": "Oslo"}  # type: ignore[union-attr]
    assert final.usage.output_tokens == 7
    assert counts(providers.gateway) == (served + 1, handed)  # the lean front's
    row = await usage_row(db, request_id)
    assert row["charged"] == 5 * 3000 + 7 * 15000 and row["usage_source"] == "upstream"


@pytest.mark.parametrize(
    ("status", "exc_type", "err_type"),
    [
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
        (400, anthropic.BadRequestError, "invalid_request_error"),
    ],
)
async def test_messages_upstream_errors_come_back_unmodified(
    providers: Providers,
    api: Api,
    db: asyncpg.Connection,
    status: int,
    exc_type: type[anthropic.APIStatusError],
    err_type: str,
) -> None:
    owner, team, secret = await api.funded_team_key("1.00")
    providers.anthropic.next(status=status)
    with pytest.raises(exc_type) as exc:
        await claude(providers, secret).messages.create(model="claude", max_tokens=5, messages=MSG)
    assert exc.value.status_code == status
    assert isinstance(exc.value.body, dict) and exc.value.body["error"]["type"] == err_type
    assert exc.value.body["request_id"].startswith("req_")  # the provider's own body
    assert exc.value.response.headers["x-modelbridge-error-code"] == "upstream_error"
    assert (await api.overview(owner, team["id"]))["credits_usd"] == "1.000000000"
    assert await records(db, team["id"]) == 0


async def test_messages_gateway_errors_in_anthropic_envelope(
    providers: Providers, api: Api, lean: aiohttp.ClientSession
) -> None:
    served = counts(providers.gateway)[0]
    with pytest.raises(anthropic.AuthenticationError) as auth:
        await claude(providers, "mb_wrong").messages.create(
            model="claude", max_tokens=5, messages=MSG
        )
    assert auth.value.body == {
        "type": "error",
        "error": {"type": "authentication_error", "message": "Incorrect API key provided."},
    }
    assert auth.value.response.headers["x-modelbridge-error-code"] == "invalid_api_key"
    _, _, secret = await api.funded_team_key("1.00")
    with pytest.raises(anthropic.NotFoundError) as missing:
        await claude(providers, secret).messages.create(model="nope", max_tokens=5, messages=MSG)
    assert missing.value.response.headers["x-modelbridge-error-code"] == "model_not_found"
    with pytest.raises(anthropic.BadRequestError, match="max_tokens"):
        await claude(providers, secret).post(
            "/v1/messages", body={"model": "claude", "messages": MSG}, cast_to=object
        )
    poor = await api.signup()
    poor_team = await api.team(poor)
    broke = (await api.key(poor, poor_team["id"]))["secret"]
    with pytest.raises(anthropic.RateLimitError) as quota:
        await claude(providers, broke).messages.create(model="claude", max_tokens=5, messages=MSG)
    assert quota.value.body["error"]["type"] == "rate_limit_error"  # type: ignore[index]
    assert quota.value.response.headers["x-modelbridge-error-code"] == "insufficient_quota"
    headers = {"x-api-key": secret, "anthropic-version": "2023-06-01"}  # the key as x-api-key
    body = {"model": "claude", "max_tokens": 5, "messages": MSG}
    # on a connection of its own: one of ``api``'s (the management API's) is aiohttp's
    async with lean.post(providers.gateway.v1 + "/messages", json=body, headers=headers) as r:
        assert r.status == 200 and (await r.json())["type"] == "message"
    assert counts(providers.gateway)[0] == served + 5  # every one by the lean front


async def test_messages_malformed_answer_is_502_and_free(
    providers: Providers, api: Api, db: asyncpg.Connection
) -> None:
    owner, team, secret = await api.funded_team_key("1.00")
    for fake_kw in ({"malformed": True}, {"omit_usage": True}):
        providers.anthropic.next(**fake_kw)
        with pytest.raises(anthropic.InternalServerError) as exc:
            await claude(providers, secret).messages.create(
                model="claude", max_tokens=5, messages=MSG
            )
        assert exc.value.status_code == 502
        assert exc.value.response.headers["x-modelbridge-error-code"] == "upstream_error"
    assert (await api.overview(owner, team["id"]))["credits_usd"] == "1.000000000"
    assert await records(db, team["id"]) == 0


async def test_messages_stream_error_event_bills_what_was_streamed(
    providers: Providers, api: Api, db: asyncpg.Connection
) -> None:
    _, team, secret = await api.funded_team_key("1.00")
    providers.anthropic.next(stream_error="overloaded_error")
    stream = await claude(providers, secret).messages.create(
        model="claude", max_tokens=50, messages=MSG, stream=True
    )
    with pytest.raises(anthropic.APIStatusError, match="Overloaded"):
        async for _ in stream:
            pass
    row = await eventually(
        lambda: db.fetchrow("SELECT * FROM usage_records WHERE team_id = $1", team["id"]),
        lambda r: r is not None,
    )
    assert row["usage_source"] == "estimated" and row["completion_tokens"] == 1  # "Hello"


async def test_count_tokens(providers: Providers, api: Api) -> None:
    _, _, secret = await api.funded_team_key("1.00")
    client = claude(providers, secret)
    counted = await client.messages.count_tokens(model="claude", system="be terse", messages=MSG)
    assert counted.input_tokens == 7  # the upstream's count: 2 + 3 + 2
    assert providers.anthropic.last.body["model"] == "claude-sonnet-4-5"
    local = await client.messages.count_tokens(model="gpt-4o-mini", messages=MSG)
    assert local.input_tokens > 0  # tiktoken's
    with pytest.raises(anthropic.AuthenticationError):
        await claude(providers, "mb_wrong").messages.count_tokens(model="claude", messages=MSG)


COUNT = orjson.dumps({"model": "claude", "messages": MSG})
AUTH = {"type": "authentication_error", "message": "Incorrect API key provided."}
KEY = "the team's key"  # in a case's headers: replaced by a valid key


@pytest.mark.parametrize(
    ("method", "path", "headers", "data", "status", "code", "error"),
    [
        ("POST", "", {}, COUNT, 401, "invalid_api_key", AUTH),
        ("POST", "", {"x-api-key": "mb_wrong"}, COUNT, 401, "invalid_api_key", AUTH),
        ("POST", "", {"Authorization": "Bearer mb_wrong"}, COUNT, 401, "invalid_api_key", AUTH),
        (
            "POST",
            "",
            {"x-api-key": KEY},
            b'{"model": "claude", "messages": [',
            400,
            "invalid_request_error",
            {"type": "invalid_request_error", "message": "The request body is not valid JSON."},
        ),
        (
            "POST",
            "",
            {"x-api-key": KEY},
            b"[1, 2]",
            400,
            "invalid_request_error",
            {"type": "invalid_request_error", "message": "The request body must be a JSON object."},
        ),
        (
            "POST",
            "",
            {"x-api-key": KEY},
            b'{"model": "nope", "messages": []}',
            404,
            "model_not_found",
            {"type": "not_found_error", "message": "The model 'nope' does not exist."},
        ),
        (
            "GET",
            "",
            {"x-api-key": KEY},
            b"",
            405,
            "method_not_allowed",
            {"type": "invalid_request_error", "message": "Method Not Allowed"},
        ),
        (
            "GET",
            "/v1/messages",
            {"x-api-key": KEY},
            b"",
            405,
            "method_not_allowed",
            {"type": "invalid_request_error", "message": "Method Not Allowed"},
        ),
        (
            "POST",
            "/v1/messages/batches",
            {"x-api-key": KEY},
            COUNT,
            404,
            "not_found",
            {"type": "not_found_error", "message": "Unknown route POST /v1/messages/batches"},
        ),
    ],
    ids=[
        "missing-key",
        "wrong-key",
        "wrong-bearer",
        "malformed-json",
        "not-an-object",
        "unknown-model",
        "get-count-tokens",
        "get-messages",
        "unknown-messages-route",
    ],
)
async def test_count_tokens_and_every_messages_path_answer_in_anthropics_envelope(
    providers: Providers,
    api: Api,
    http: aiohttp.ClientSession,
    method: str,
    path: str,
    headers: dict[str, str],
    data: bytes,
    status: int,
    code: str,
    error: dict[str, str],
) -> None:
    """Errors decided before the handler or outside it (the key, the body, the router) are in
    Anthropic's envelope on every /v1/messages* path, with the gateway's status and code."""
    if KEY in headers.values():
        _, _, secret = await api.funded_team_key("1.00")
        headers = {name: secret if value == KEY else value for name, value in headers.items()}
    url = providers.gateway.base + (path or "/v1/messages/count_tokens")
    sent = {"Content-Type": "application/json", "anthropic-version": "2023-06-01", **headers}
    async with http.request(method, url, data=data, headers=sent) as r:
        answer = (r.status, r.headers["x-modelbridge-error-code"], orjson.loads(await r.read()))
        allow = r.headers.get("Allow")
    assert answer == (status, code, {"type": "error", "error": error})
    assert allow == ("POST" if status == 405 else None)


async def test_count_tokens_wrong_key_through_the_sdk(providers: Providers) -> None:
    with pytest.raises(anthropic.AuthenticationError) as caught:
        await claude(providers, "mb_wrong").messages.count_tokens(model="claude", messages=MSG)
    assert caught.value.status_code == 401
    assert caught.value.body == {"type": "error", "error": AUTH}


async def test_count_tokens_store_down_or_a_bug_is_in_anthropics_envelope(
    providers: Providers,
    api: Api,
    http: aiohttp.ClientSession,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """What the error middleware answers for count_tokens (PostgreSQL down for a key lookup: 503
    ``gateway_unavailable``; a bug: 500, its traceback logged) is in Anthropic's envelope too."""
    from gateway import state as S
    from gateway.credentials import new_api_key
    from gateway.proxy import surfaces

    _, _, secret = await api.funded_team_key("1.00")

    async def count(key: str, model: str) -> tuple[int, str, Any]:
        async with http.post(
            providers.gateway.base + "/v1/messages/count_tokens",
            json={"model": model, "messages": MSG},
            headers={"x-api-key": key, "anthropic-version": "2023-06-01"},
        ) as r:
            return r.status, r.headers["x-modelbridge-error-code"], await r.json()

    def broken(*args: object) -> int:
        raise RuntimeError("an injected bug")

    monkeypatch.setattr(surfaces, "count_texts", broken)  # an OpenAI model's count is tiktoken's
    assert await count(secret, "gpt-4o-mini") == (
        500,
        "internal_error",
        {
            "type": "error",
            "error": {"type": "api_error", "message": "The gateway failed to handle the request."},
        },
    )
    bugs = [r for r in caplog.records if r.exc_info and "injected" in str(r.exc_info[1])]
    assert len(bugs) == 1

    async def down(*args: object) -> None:
        raise ConnectionRefusedError("PostgreSQL is down")

    monkeypatch.setattr(providers.gateway.app[S.KEYS], "_fetch", down)
    assert await count(new_api_key(), "claude") == (
        503,
        "gateway_unavailable",
        {
            "type": "error",
            "error": {"type": "api_error", "message": "The gateway's store is unreachable; retry."},
        },
    )


async def test_count_tokens_reads_at_most_max_response_bytes(
    database_url: str, redis_url: str, http: aiohttp.ClientSession
) -> None:
    """The provider's count is read like any answer: past ``max_response_bytes`` a 502, in
    Anthropic's envelope, and an error body past it is not read (its status alone tells)."""
    from tests.fake_anthropic import FakeAnthropic

    fake = FakeAnthropic(api_key=ANTHROPIC_KEY)
    url = await fake.start()
    config = providers_config(url, url, url)
    bounded = dataclasses.replace(config.upstreams["ant"], max_response_bytes=4000)
    config = dataclasses.replace(config, upstreams={**config.upstreams, "ant": bounded})
    gw, runner = await start_gateway(config, database_url, redis_url)
    try:
        _, _, secret = await Api(http, gw.base, ADMIN_TOKEN).funded_team_key("1.00")

        async def count() -> tuple[int, dict[str, Any]]:
            async with http.post(
                gw.base + "/v1/messages/count_tokens",
                json={"model": "claude", "messages": MSG},
                headers={"x-api-key": secret, "anthropic-version": "2023-06-01"},
            ) as r:
                return r.status, await r.json()

        fake.set_default(padding=3000)  # within the bound
        status, body = await count()
        assert (status, body["input_tokens"]) == (200, 5)
        fake.set_default(padding=5000)
        assert await count() == (
            502,
            {
                "type": "error",
                "error": {
                    "type": "api_error",
                    "message": "upstream ant answered more than 4000 bytes (max_response_bytes)",
                },
            },
        )
        fake.set_default(status=400, error_body="x" * 5000)
        status, body = await count()
        assert (status, body["type"]) == (400, "error")
        assert "x" * 100 not in body["error"]["message"]
    finally:
        await runner.cleanup()
        await fake.stop()


# --- Messages on an OpenAI upstream (translated) -----------------------------------------------


async def test_messages_on_openai_upstream(
    providers: Providers, api: Api, db: asyncpg.Connection
) -> None:
    _, _, secret = await api.funded_team_key("1.00")
    providers.openai.next(cached_tokens=2)
    served, handed = counts(providers.gateway)
    raw = await claude(providers, secret).messages.with_raw_response.create(
        model="gpt-4o-mini", max_tokens=50, system="be terse", messages=MSG
    )
    message = await raw.parse()
    assert counts(providers.gateway) == (served + 1, handed)  # served by the lean front
    assert message.content[0].text == TEXT  # type: ignore[union-attr]
    assert message.stop_reason == "end_turn"
    assert message.model == "gpt-4o-mini"
    # OpenAI's 2 + 3 + 2 = 10 prompt tokens (system 2 + 3, user 2 + 3), 2 of them cached
    assert (message.usage.input_tokens, message.usage.cache_read_input_tokens) == (8, 2)
    cost = 8 * 150 + 2 * 75 + 6 * 600
    row = await usage_row(db, raw.headers["x-request-id"])
    assert (row["charged"], row["prompt_tokens"], row["cached_tokens"]) == (cost, 10, 2)
    sent = providers.openai.last
    assert sent.path == "/v1/chat/completions"
    assert sent.body["messages"][0] == {"role": "system", "content": "be terse"}
    assert sent.body["max_completion_tokens"] == 50


async def test_messages_stream_tool_use_on_openai_upstream(
    providers: Providers, api: Api, db: asyncpg.Connection
) -> None:
    _, _, secret = await api.funded_team_key("1.00")
    providers.openai.next(tool_calls=[{"name": "weather", "arguments": {"city": "Oslo"}}])
    async with claude(providers, secret).messages.stream(
        model="gpt-4o-mini", max_tokens=50, messages=MSG, tools=[WEATHER_TOOL]
    ) as stream:
        text = "".join([t async for t in stream.text_stream])
        final = await stream.get_final_message()
        request_id = stream.response.headers["x-request-id"]
    assert text == TEXT and final.stop_reason == "tool_use"
    assert final.content[1].type == "tool_use"
    assert final.content[1].input == {"city": "Oslo"}  # type: ignore[union-attr]
    assert (final.usage.input_tokens, final.usage.output_tokens) == (5, 7)
    row = await usage_row(db, request_id)
    assert row["charged"] == 5 * 150 + 7 * 600
    assert providers.openai.last.body["tools"][0]["function"]["name"] == "weather"


# --- Chat Completions on an Anthropic upstream (translated) ------------------------------------


async def test_chat_on_anthropic_upstream(
    providers: Providers, api: Api, db: asyncpg.Connection
) -> None:
    _, _, secret = await api.funded_team_key("1.00")
    providers.anthropic.next(cache_read_tokens=10, cache_creation_tokens=4)
    raw = await oai(providers, secret).chat.completions.with_raw_response.create(
        model="claude", messages=[{"role": "system", "content": "be terse"}, *MSG], max_tokens=40
    )
    reply = raw.parse()
    assert reply.choices[0].message.content == TEXT
    assert reply.choices[0].finish_reason == "stop" and reply.model == "claude"
    assert reply.usage is not None and reply.usage.prompt_tokens == 5 + 2 + 10 + 4
    assert reply.usage.prompt_tokens_details is not None
    assert reply.usage.prompt_tokens_details.cached_tokens == 10
    cost = 7 * 3000 + 10 * 300 + 4 * 3750 + 6 * 15000
    assert raw.headers["x-modelbridge-cost-usd"] == f"0.{cost:09d}"
    row = await usage_row(db, raw.headers["x-request-id"])
    assert (row["charged"], row["prompt_tokens"], row["cached_tokens"]) == (cost, 21, 10)
    sent = providers.anthropic.last
    assert sent.body["system"] == "be terse" and sent.body["max_tokens"] == 40
    assert sent.headers["anthropic-version"] == "2023-06-01"


async def test_chat_tool_calls_on_anthropic_upstream(providers: Providers, api: Api) -> None:
    _, _, secret = await api.funded_team_key("1.00")
    providers.anthropic.next(tool_calls=[{"name": "weather", "input": {"city": "Oslo"}}])
    tools: Any = [
        {
            "type": "function",
            "function": {"name": "weather", "parameters": WEATHER_TOOL["input_schema"]},
        }
    ]
    reply = await oai(providers, secret).chat.completions.create(
        model="claude", messages=MSG, tools=tools, tool_choice="required"
    )
    choice = reply.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.tool_calls is not None
    call = choice.message.tool_calls[0]
    assert call.function.name == "weather"  # type: ignore[union-attr]
    assert call.function.arguments == '{"city":"Oslo"}'  # type: ignore[union-attr]
    assert providers.anthropic.last.body["tool_choice"] == {"type": "any"}


async def test_chat_stream_on_anthropic_upstream(
    providers: Providers, api: Api, db: asyncpg.Connection
) -> None:
    _, _, secret = await api.funded_team_key("1.00")
    providers.anthropic.next(
        tool_calls=[{"name": "weather", "input": {"city": "Oslo"}}], cache_read_tokens=3
    )
    served, handed = counts(providers.gateway)
    raw = await oai(providers, secret).chat.completions.with_raw_response.create(
        model="claude", messages=MSG, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in raw.parse()]
    assert counts(providers.gateway) == (served + 1, handed)  # translated on the lean front
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == TEXT
    args = "".join(
        t.function.arguments or ""  # type: ignore[union-attr]
        for c in chunks
        if c.choices
        for t in c.choices[0].delta.tool_calls or []
    )
    assert args == '{"city":"Oslo"}'
    assert chunks[-2].choices[0].finish_reason == "tool_calls"
    usage = chunks[-1].usage
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (8, 7)
    row = await usage_row(db, raw.headers["x-request-id"])
    assert row["charged"] == 5 * 3000 + 3 * 300 + 7 * 15000 and row["usage_source"] == "upstream"


async def test_chat_stream_cut_on_anthropic_upstream(
    providers: Providers, api: Api, db: asyncpg.Connection
) -> None:
    _, team, secret = await api.funded_team_key("1.00")
    providers.anthropic.next(drop_after=5)  # message_start, block start, ping, 2 deltas
    stream = await oai(providers, secret).chat.completions.create(
        model="claude", messages=MSG, stream=True
    )
    seen = []
    with pytest.raises(openai.APIError, match="mid-stream"):
        async for chunk in stream:
            seen.append(chunk)
    assert "".join(c.choices[0].delta.content or "" for c in seen) == "Hello from"
    row = await eventually(
        lambda: db.fetchrow("SELECT * FROM usage_records WHERE team_id = $1", team["id"]),
        lambda r: r is not None,
    )
    assert row["usage_source"] == "estimated" and row["completion_tokens"] == 2
