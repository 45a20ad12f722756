"""200 simultaneous requests against a balance that covers only some of them, sent half to each
gateway process under ``--redis-cluster`` (``tests/replicas.py``)."""

from __future__ import annotations

import asyncio

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from policies import keyspace as rk
from policies.periods import period_of
from tests.conftest import Gateway
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api, eventually
from tests.replicas import Endpoint, Replicas

pytestmark = pytest.mark.cluster

COST = 5 * 150 + 6 * 600  # what the fake reports for one "hi there" request, max_tokens 6
BODY = {
    "model": "gpt-4o-mini",
    "messages": [{"role": "user", "content": "hi there"}],
    "max_tokens": 6,
}


async def test_balance_never_goes_below_zero_and_everything_agrees(
    gateway: Gateway,
    replicas: Replicas,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    db: asyncpg.Connection,
    redis: Redis,
) -> None:
    credits = 37 * COST + 1234  # enough for 37 requests at the actual cost, fewer at the hold's
    owner, team, secret = await api.funded_team_key(f"{credits / 1e9:.9f}")
    fake.set_default(delay_s=0.05)
    headers = {"Authorization": f"Bearer {secret}"}

    async def one(to: Endpoint) -> tuple[int, str | None]:
        async with http.post(to.v1 + "/chat/completions", json=BODY, headers=headers) as resp:
            body = await resp.json()
            return resp.status, None if resp.status == 200 else body["error"]["code"]

    results = await asyncio.gather(*(one(to) for to in replicas.spread(200)))
    ok = sum(1 for status, _ in results if status == 200)
    refused = [(status, code) for status, code in results if status != 200]
    assert set(refused) <= {(429, "insufficient_quota")}
    assert 0 < ok <= 37
    account = rk.AccountKeys(rk.team_account(team["id"]))
    state = await redis.hgetall(account.state)
    assert int(state["credits"]) == credits - ok * COST >= 0
    assert state["holds"] == "0"
    period = await redis.hgetall(account.period(period_of(gateway.clock.now())))
    assert (int(period["spend"]), int(period["req"])) == (ok * COST, ok)
    assert int(period[f"ms:{owner.user['id']}"]) == ok * COST

    async def pg_totals() -> asyncpg.Record:
        return await db.fetchrow(
            "SELECT count(*) AS n, coalesce(sum(charged), 0) AS spend, coalesce(sum(from_credits), 0) AS cr"
            " FROM usage_records WHERE team_id = $1",
            team["id"],
        )

    totals = await eventually(pg_totals, lambda r: r["n"] == ok)
    assert (totals["spend"], totals["cr"]) == (ok * COST, ok * COST)
    overview = await api.overview(owner, team["id"])
    assert overview["spend_this_period_usd"] == f"{ok * COST / 1e9:.9f}"
    assert overview["balance_usd"] == f"{(credits - ok * COST) / 1e9:.9f}"
