"""``POST /v1/responses`` through the official ``openai`` SDK: billed from the terminal event of
a stream (completed, incomplete or failed) or the plain response; OpenAI and Azure upstreams;
the WebSocket attempt refused at once."""

from __future__ import annotations

from typing import Any

import aiohttp
import asyncpg
import openai
import pytest

from tests.conftest import Providers
from tests.helpers import Api, eventually
from tests.rawhttp import counts

TEXT = "Hello from the fake upstream."


def oai(providers: Providers, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=providers.gateway.v1, api_key=key, max_retries=0, timeout=10)


async def usage_row(db: asyncpg.Connection, request_id: str) -> asyncpg.Record:
    async def probe() -> asyncpg.Record | None:
        return await db.fetchrow("SELECT * FROM usage_records WHERE request_id = $1", request_id)

    row = await eventually(probe, lambda r: r is not None)
    assert row is not None
    return row


async def test_responses_plain(providers: Providers, api: Api, db: asyncpg.Connection) -> None:
    owner, team, secret = await api.funded_team_key("1.00")
    providers.openai.next(cached_tokens=1, reasoning_tokens=3)
    raw = await oai(providers, secret).responses.with_raw_response.create(
        model="gpt-4o-mini", instructions="be terse", input="hello there", max_output_tokens=100
    )
    resp = raw.parse()
    assert resp.output_text == TEXT and resp.status == "completed"
    assert resp.usage is not None and resp.usage.input_tokens == 4
    assert resp.usage.output_tokens_details.reasoning_tokens == 3
    cost = 3 * 150 + 1 * 75 + 9 * 600  # reasoning tokens are output tokens
    assert raw.headers["x-modelbridge-cost-usd"] == f"0.{cost:09d}"
    row = await usage_row(db, raw.headers["x-request-id"])
    assert (row["prompt_tokens"], row["completion_tokens"], row["cached_tokens"]) == (4, 9, 1)
    assert (row["charged"], row["endpoint"]) == (cost, "/v1/responses")
    assert (await api.overview(owner, team["id"]))["spend_this_period_usd"] == f"0.{cost:09d}"
    assert providers.openai.last.path == "/v1/responses"


@pytest.mark.parametrize(
    ("behaviour", "request_kw", "terminal", "completion"),
    [
        ({}, {}, "response.completed", 6),
        ({}, {"max_output_tokens": 2}, "response.incomplete", 2),
        ({"fail_response": True}, {}, "response.failed", 6),
    ],
)
async def test_responses_stream_billed_on_its_terminal_event(
    providers: Providers,
    api: Api,
    db: asyncpg.Connection,
    behaviour: dict[str, Any],
    request_kw: dict[str, Any],
    terminal: str,
    completion: int,
) -> None:
    _, _, secret = await api.funded_team_key("1.00")
    providers.openai.next(**behaviour)
    served, handed = counts(providers.gateway)
    raw = await oai(providers, secret).responses.with_raw_response.create(
        model="gpt-4o-mini", input="hello there", stream=True, **request_kw
    )
    events = [e async for e in raw.parse()]
    assert counts(providers.gateway) == (served + 1, handed)  # the lean front's
    assert events[0].type == "response.created" and events[-1].type == terminal
    assert [e.sequence_number for e in events] == list(range(len(events)))
    row = await usage_row(db, raw.headers["x-request-id"])
    assert row["charged"] == 2 * 150 + completion * 600 and row["usage_source"] == "upstream"


async def test_responses_stream_cut_ends_with_an_error_event(
    providers: Providers, api: Api, db: asyncpg.Connection
) -> None:
    _, team, secret = await api.funded_team_key("1.00")
    providers.openai.next(drop_after=6)  # created, in_progress, item, part, 2 deltas
    stream = await oai(providers, secret).responses.create(
        model="gpt-4o-mini", input="hello there", stream=True
    )
    events = [event async for event in stream]  # an error event, never a clean end
    assert [e.type for e in events[-2:]] == ["response.output_text.delta", "error"]
    assert events[-1].code == "upstream_error"  # type: ignore[union-attr]
    row = await eventually(
        lambda: db.fetchrow("SELECT * FROM usage_records WHERE team_id = $1", team["id"]),
        lambda r: r is not None,
    )
    assert row["usage_source"] == "estimated" and row["completion_tokens"] == 2


async def test_responses_on_azure(providers: Providers, api: Api, db: asyncpg.Connection) -> None:
    _, _, secret = await api.funded_team_key("1.00")
    raw = await oai(providers, secret).responses.with_raw_response.create(
        model="azure-4o", input="hello there"
    )
    assert raw.parse().output_text == TEXT
    sent = providers.azure.last
    assert (sent.path, sent.query) == ("/openai/responses", {"api-version": "2024-10-21"})
    row = await usage_row(db, raw.headers["x-request-id"])
    assert row["charged"] == 2 * 2500 + 6 * 10000


async def test_responses_refusals(
    providers: Providers, api: Api, db: asyncpg.Connection, http: aiohttp.ClientSession
) -> None:
    owner, team, secret = await api.funded_team_key("1.00")
    with pytest.raises(openai.BadRequestError) as exc:
        await oai(providers, secret).responses.create(model="claude", input="hi")
    assert exc.value.code == "unsupported_endpoint"
    assert exc.value.response.headers["x-modelbridge-error-code"] == "unsupported_endpoint"
    providers.openai.next(malformed=True)
    with pytest.raises(openai.InternalServerError) as bad:
        await oai(providers, secret).responses.create(model="gpt-4o-mini", input="hi")
    assert bad.value.status_code == 502 and bad.value.code == "upstream_error"
    assert (await api.overview(owner, team["id"]))["credits_usd"] == "1.000000000"
    count = await db.fetchval("SELECT count(*) FROM usage_records WHERE team_id = $1", team["id"])
    assert count == 0
    ws = {"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13"}
    ws |= {"Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ==", "Authorization": f"Bearer {secret}"}
    async with http.get(providers.gateway.v1 + "/responses", headers=ws) as r:
        assert r.status == 426
        assert r.headers["x-modelbridge-error-code"] == "websocket_not_supported"
