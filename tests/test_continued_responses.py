"""A Responses API request that continues a stored response (``previous_response_id``): the
provider bills the whole earlier conversation again as input, so the hold counts it (from the
note ``settle.lua`` kept of that response: its input + output tokens and its deployment), and a
hard limit is not passed by it. Routing to the deployment that stored it: ``test_routing.py``."""

from __future__ import annotations

from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from gateway import state as S
from gateway.metering.reconcile import Reconciler
from gateway.proxy.exchange import count_texts
from policies import keyspace as rk
from tests.conftest import ADMIN_TOKEN, Gateway, gateway_config, start_gateway
from tests.fake_upstream import FakeUpstream
from tests.faults import TcpProxy
from tests.helpers import Api, Session, eventually

MAX_OUT = 6
PRICE_IN, PRICE_OUT = 150, 600  # gpt-4o-mini, nano-USD per token


async def respond(
    http: aiohttp.ClientSession, gateway: Gateway, secret: str, body: dict[str, Any]
) -> tuple[int, dict[str, Any], dict[str, str]]:
    """POST /v1/responses; (status, the response object or error, headers). A stream's object is
    its terminal event's."""
    payload = {"model": "gpt-4o-mini", "max_output_tokens": MAX_OUT, **body}
    headers = {"Authorization": f"Bearer {secret}"}
    async with http.post(gateway.v1 + "/responses", json=payload, headers=headers) as resp:
        raw = await resp.read()
        if resp.status != 200 or not payload.get("stream"):
            return resp.status, orjson.loads(raw), dict(resp.headers)
    for event in raw.split(b"\n\n"):
        for line in event.split(b"\n"):
            if line.startswith(b"data: "):
                data = orjson.loads(line[6:])
                if data["type"] == "response.completed":
                    return resp.status, data["response"], dict(resp.headers)
    raise AssertionError(f"no response.completed in {raw!r}")


async def limit_key(api: Api, owner: Session, key_id: str, nanos: int) -> None:
    fields = {"monthly_limit_usd": f"{nanos / 1e9:.9f}"}
    await api.call("PATCH", f"/api/keys/{key_id}", session=owner, json=fields, expect=200)


@pytest.mark.parametrize("streamed", [False, True])
async def test_the_hold_counts_the_conversation_a_request_continues(
    gateway: Gateway,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    redis: Redis,
    streamed: bool,
) -> None:
    owner = await api.signup()
    team = await api.team(owner)
    await api.credit_team(team["id"], "10.00")
    key = await api.key(owner, team["id"])
    first = {"input": "Tell me a long story about a lighthouse keeper and the sea."}
    status, response, headers = await respond(
        http, gateway, key["secret"], first | {"stream": streamed}
    )
    assert status == 200, response
    spent = round(float(headers["x-modelbridge-cost-usd"]) * 1e9) if not streamed else None
    history = fake.stored[response["id"]]  # what the provider bills a continuation again
    usage = response["usage"]
    assert history == usage["input_tokens"] + usage["output_tokens"]
    noted = rk.AccountKeys(f"t_{team['id']}").response(response["id"])
    assert await redis.get(noted) == f"{history}|fake/gpt-4o-mini"
    assert rk.RESPONSE_NOTE_TTL_S - 60 < await redis.ttl(noted) <= rk.RESPONSE_NOTE_TTL_S

    if spent is None:  # a stream's cost: from its usage record's price
        spent = usage["input_tokens"] * PRICE_IN + usage["output_tokens"] * PRICE_OUT
    second: dict[str, Any] = {"previous_response_id": response["id"], "input": "And then?"}
    seen = count_texts(gateway.app[S.TOKENS], "responses", "o200k_base", second, 0)
    worst = (seen + history) * PRICE_IN + MAX_OUT * PRICE_OUT
    before = len(fake.requests)
    await limit_key(api, owner, key["id"], spent + worst - 1)
    status, error, headers = await respond(http, gateway, key["secret"], second)
    assert (status, headers["x-modelbridge-error-code"]) == (429, "key_limit_reached"), error
    assert len(fake.requests) == before  # refused before the provider
    await limit_key(api, owner, key["id"], spent + worst)
    status, response, _ = await respond(http, gateway, key["secret"], second | {"stream": streamed})
    assert status == 200, response
    # The provider billed the conversation again ("And then?": 2 words, its fake's tokens).
    assert response["usage"]["input_tokens"] == history + 2


async def test_a_response_not_stored_leaves_no_note_and_its_continuation_is_not_charged(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession, redis: Redis
) -> None:
    owner, team, secret = await api.funded_team_key("1.00")
    status, response, _ = await respond(http, gateway, secret, {"input": "hi", "store": False})
    assert status == 200
    assert await redis.get(rk.AccountKeys(f"t_{team['id']}").response(response["id"])) is None
    before = (await api.overview(owner, team["id"]))["credits_usd"]
    # No note: held as the body shows. The provider did not store it either: its 400 comes back.
    status, error, _ = await respond(
        http, gateway, secret, {"previous_response_id": response["id"], "input": "and?"}
    )
    assert (status, error["error"]["code"]) == (400, "upstream_error")
    assert error["error"]["message"] == (
        f"upstream error: Previous response with id '{response['id']}' not found."
    )
    assert (await api.overview(owner, team["id"]))["credits_usd"] == before


async def test_no_note_is_kept_when_notes_are_turned_off(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession, redis: Redis
) -> None:
    metering = gateway.app[S.METERING]
    _, team, secret = await api.funded_team_key("1.00")
    metering.response_notes_s = 0  # metering.response_notes_s: 0
    try:
        status, response, _ = await respond(http, gateway, secret, {"input": "hi"})
    finally:
        metering.response_notes_s = rk.RESPONSE_NOTE_TTL_S
    assert status == 200
    assert await redis.get(rk.AccountKeys(f"t_{team['id']}").response(response["id"])) is None


async def test_a_note_kept_while_redis_is_away_is_written_with_its_settle(
    fake: FakeUpstream,
    database_url: str,
    redis_url: str,
    http: aiohttp.ClientSession,
    redis: Redis,
) -> None:
    """Redis cut mid-stream: the settle, note included, waits in the journal and lands once
    Redis is back (the money to the nano-dollar). Redis away when a continuation comes: 503
    before anything is held or asked of the provider."""
    proxy = TcpProxy.to_url(redis_url)
    await proxy.start()
    gw, runner = await start_gateway(
        gateway_config(fake.base_url), database_url, proxy.url_for(redis_url)
    )
    try:
        api = Api(http, gw.base, ADMIN_TOKEN)
        _, team, secret = await api.funded_team_key("1.00")
        fake.next(chunk_delay_s=0.1)
        body = {"model": "gpt-4o-mini", "input": "hi there", "stream": True}
        headers = {"Authorization": f"Bearer {secret}"}
        async with http.post(gw.v1 + "/responses", json=body, headers=headers) as r:
            assert r.status == 200
            await r.content.readuntil(b"\n\n")  # response.created
            await proxy.cut()
            raw = await r.read()
        completed = next(e for e in raw.split(b"\n\n") if b"event: response.completed" in e)
        response = orjson.loads(completed.split(b"data: ", 1)[1])["response"]
        usage = response["usage"]
        charged = usage["input_tokens"] * PRICE_IN + usage["output_tokens"] * PRICE_OUT
        account = rk.AccountKeys(rk.team_account(team["id"]))
        noted = account.response(response["id"])
        assert await redis.get(noted) is None  # Redis never got the settle
        await proxy.restore()
        history = usage["input_tokens"] + usage["output_tokens"]
        await eventually(lambda: redis.get(noted), lambda n: n == f"{history}|fake/gpt-4o-mini")
        assert await redis.hget(account.state, "credits") == str(1_000_000_000 - charged)

        await proxy.cut()
        before = len(fake.requests)
        second = {"model": "gpt-4o-mini", "previous_response_id": response["id"], "input": "and?"}
        async with http.post(gw.v1 + "/responses", json=second, headers=headers) as r:
            assert (r.status, r.headers["x-modelbridge-error-code"]) == (503, "gateway_unavailable")
        assert len(fake.requests) == before
        await proxy.restore()
        assert await redis.hget(account.state, "credits") == str(1_000_000_000 - charged)
        assert await redis.hget(account.state, "holds") == "0"
        reconciler = Reconciler(gw.app[S.DB], gw.app[S.REDIS], gw.app[S.ACCOUNTS])
        _, differences = await eventually(
            lambda: reconciler.check([account.account], gw.app[S.CLOCK].now()),
            lambda result: not result[1],  # once the writer has the record
        )
        assert differences == []
    finally:
        await runner.cleanup()
        await proxy.stop()
