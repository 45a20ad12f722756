"""Upstream kinds (openai | azure | anthropic) through the gateway, with the official SDKs as
clients: paths, key headers, prices to the nano-dollar, error-code headers."""

from __future__ import annotations

from typing import Any

import aiohttp
import asyncpg
import openai
import pytest

from gateway.config import UPSTREAM_KINDS, ConfigError, parse_config
from gateway.upstream.kinds import KINDS
from tests.conftest import AZURE_KEY, Providers
from tests.helpers import Api, eventually

MSG: Any = [{"role": "user", "content": "hi there"}]  # 3 + 2 = 5 prompt tokens in the fakes


def oai(providers: Providers, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=providers.gateway.v1, api_key=key, max_retries=0, timeout=10)


async def usage_row(db: asyncpg.Connection, request_id: str) -> asyncpg.Record:
    async def probe() -> asyncpg.Record | None:
        return await db.fetchrow("SELECT * FROM usage_records WHERE request_id = $1", request_id)

    row = await eventually(probe, lambda r: r is not None)
    assert row is not None
    return row


async def test_azure_chat_plain(providers: Providers, api: Api, db: asyncpg.Connection) -> None:
    _, _, secret = await api.funded_team_key("1.00")
    providers.azure.next(cached_tokens=2)
    raw = await oai(providers, secret).chat.completions.with_raw_response.create(
        model="azure-4o", messages=MSG
    )
    reply = raw.parse()
    assert reply.choices[0].message.content == "Hello from the fake upstream."
    cost = 3 * 2500 + 2 * 1250 + 6 * 10000
    assert raw.headers["x-modelbridge-cost-usd"] == f"0.{cost:09d}"
    row = await usage_row(db, raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (5, 6, 2)
    assert (row["charged"], row["model"]) == (cost, "azure-4o")
    sent = providers.azure.last
    assert sent.path == "/openai/deployments/gpt4o-prod/chat/completions"
    assert sent.query == {"api-version": "2024-10-21"}
    assert sent.headers["api-key"] == AZURE_KEY and "authorization" not in sent.headers
    assert secret not in str(sent.headers)


async def test_azure_chat_stream(providers: Providers, api: Api, db: asyncpg.Connection) -> None:
    _, _, secret = await api.funded_team_key("1.00")
    raw = await oai(providers, secret).chat.completions.with_raw_response.create(
        model="azure-4o", messages=MSG, stream=True
    )
    chunks = [c async for c in raw.parse()]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from the fake upstream."
    row = await usage_row(db, raw.headers["x-request-id"])
    assert row["charged"] == 5 * 2500 + 6 * 10000 and row["usage_source"] == "upstream"


async def test_azure_errors_carry_the_code_header(providers: Providers, api: Api) -> None:
    _, _, secret = await api.funded_team_key("1.00")
    providers.azure.next(status=429)
    with pytest.raises(openai.RateLimitError) as exc:
        await oai(providers, secret).chat.completions.create(model="azure-4o", messages=MSG)
    assert exc.value.code == "upstream_error"
    assert exc.value.response.headers["x-modelbridge-error-code"] == "upstream_error"
    with pytest.raises(openai.AuthenticationError) as auth:
        await oai(providers, "mb_nope").chat.completions.create(model="azure-4o", messages=MSG)
    assert auth.value.response.headers["x-modelbridge-error-code"] == "invalid_api_key"


async def test_error_code_header_on_the_aiohttp_path(
    providers: Providers, http: aiohttp.ClientSession
) -> None:
    async with http.get(providers.gateway.v1 + "/nowhere") as r:
        assert r.status == 404 and r.headers["x-modelbridge-error-code"] == "not_found"
    expect = {"Expect": "100-continue"}  # served by aiohttp, not the lean front
    url = providers.gateway.v1 + "/chat/completions"
    async with http.post(url, data=b"{", headers=expect) as r:
        assert r.status == 401 and r.headers["x-modelbridge-error-code"] == "invalid_api_key"


@pytest.mark.parametrize(
    ("upstream", "message"),
    [
        ({"kind": "bedrock"}, "kind: 'bedrock' is not one of anthropic, azure, openai"),
        ({"kind": "azure"}, "api_version is required for azure"),
        ({"api_version": "2024-10-21"}, "api_version: only for azure"),
    ],
)
def test_config_kinds(upstream: dict[str, Any], message: str) -> None:
    raw = {"upstreams": {"u": {"base_url": "http://x/v1", **upstream}}, "models": {}}
    with pytest.raises(ConfigError, match=message):
        parse_config(raw, {})


def test_config_cache_write_price_and_kinds() -> None:
    raw = {
        "upstreams": {"a": {"kind": "anthropic", "base_url": "http://x/v1"}},
        "models": {"c": {"upstream": "a", "input_per_mtok": 3, "cache_write_per_mtok": 3.75}},
    }
    config = parse_config(raw, {})
    assert config.models["c"].prices.cache_write == 3750
    assert config.upstreams["a"].kind == "anthropic"
    assert set(KINDS) == set(UPSTREAM_KINDS)  # a kind is a module + a line in each


def test_a_request_carries_the_clients_forwarded_headers_in_place_of_the_fixed_ones() -> None:
    from gateway.upstream.http1 import Origin

    fixed = {"anthropic-version": "2023-06-01", "x-api-key": "k"}
    origin = Origin("http://h:1/v1", fixed, connect_timeout=1, read_timeout=1)
    plain = origin.encode("/messages", b"{}")
    assert b"anthropic-version: 2023-06-01\r\n" in plain
    extra = {"Anthropic-Version": "2026-10-21", "anthropic-beta": "b1"}
    wire = origin.encode("/messages", b"{}", extra)
    head, _, body = wire.partition(b"\r\n\r\n")
    assert body == b"{}" and head.startswith(b"POST /v1/messages HTTP/1.1\r\n")
    lines = head.split(b"\r\n")
    assert b"anthropic-version: 2023-06-01" not in lines
    assert b"Anthropic-Version: 2026-10-21" in lines and b"anthropic-beta: b1" in lines
    assert b"x-api-key: k" in lines and b"Content-Length: 2" in lines
    assert origin.encode("/messages", b"{}") == plain  # the fixed head is untouched


def test_provider_paths_and_headers() -> None:
    from gateway.config import UpstreamConfig
    from gateway.upstream.kinds import provider_for

    azure = provider_for(UpstreamConfig("az", "http://r/openai", kind="azure", api_version="v 1"))
    assert (
        azure.path("/chat/completions", "dep/1")
        == "/deployments/dep%2F1/chat/completions?api-version=v%201"
    )
    assert azure.path("/responses", "dep") == "/responses?api-version=v%201"
    anthropic = provider_for(UpstreamConfig("a", "http://r/v1", kind="anthropic"))
    assert anthropic.path("/messages", "m") == "/messages"
    assert anthropic.headers()["anthropic-version"] == "2023-06-01"
    assert anthropic.forward({"anthropic-beta": "x", "authorization": "Bearer mb_secret"}) == {
        "anthropic-beta": "x"
    }
    assert provider_for(UpstreamConfig("o", "http://r/v1")).forward({"anthropic-beta": "x"}) == {}


async def test_a_chat_stream_ended_without_done_is_not_a_clean_end(
    providers: Providers, api: Api, db: asyncpg.Connection
) -> None:
    _, team, secret = await api.funded_team_key("1.00")
    providers.openai.next(no_done=True, omit_usage=True)
    stream = await oai(providers, secret).chat.completions.create(
        model="gpt-4o-mini", messages=MSG, stream=True
    )
    seen = []
    with pytest.raises(openai.APIError, match="mid-stream"):
        async for chunk in stream:
            seen.append(chunk)
    assert (
        "".join(c.choices[0].delta.content or "" for c in seen) == "Hello from the fake upstream."
    )
    row = await eventually(
        lambda: db.fetchrow("SELECT * FROM usage_records WHERE team_id = $1", team["id"]),
        lambda r: r is not None,
    )
    assert row["usage_source"] == "estimated"
