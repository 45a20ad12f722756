"""A hard limit is never passed by concurrent requests: for each of the team spending limit, a
member's hard limit and the balance, a limit worth exactly K requests meets 10 K simultaneous
ones on real Redis (half to each gateway process under ``--redis-cluster``). Exactly K succeed
(each hold equals its actual cost), and afterwards the Redis counters, the PostgreSQL usage
records and the billing endpoint agree to the nano-dollar."""

from __future__ import annotations

import asyncio
from collections import Counter

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from policies import keyspace as rk
from policies.money import parse_usd
from policies.periods import period_of
from tests.billing_support import add_member, billing, exact, patch_team, usd
from tests.conftest import Gateway
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api, chat, eventually
from tests.replicas import Replicas

pytestmark = pytest.mark.cluster

K = 12
USD = 1_000_000_000


@pytest.mark.parametrize(
    "limit", ["team_spending_limit_reached", "member_limit_reached", "insufficient_quota"]
)
async def test_k_of_ten_k_simultaneous_requests(
    gateway: Gateway,
    replicas: Replicas,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    redis: Redis,
    db: asyncpg.Connection,
    limit: str,
) -> None:
    req = exact(gateway, fake)
    worth = K * req.cost
    credits = worth if limit == "insufficient_quota" else USD
    owner, team, _ = await api.funded_team_key(usd(credits))
    tid = team["id"]
    member = await add_member(api, owner, tid)
    secret = (await api.key(member, tid))["secret"]
    if limit == "team_spending_limit_reached":
        await patch_team(api, owner, tid, spending_limit_usd=usd(worth))
    elif limit == "member_limit_reached":
        await patch_team(api, owner, tid, default_member_limit_usd=usd(worth))
    fake.set_default(prompt_tokens=req.prompt_tokens, delay_s=0.05)

    targets = replicas.spread(10 * K)
    replies = await asyncio.gather(*(chat(http, to, secret, req.body) for to in targets))
    outcomes = Counter((r.status, r.code) for r in replies)
    assert outcomes == {(200, None): K, (429, limit): 9 * K}
    charged = [parse_usd(r.headers["x-modelbridge-cost-usd"]) for r in replies if r.status == 200]
    assert charged == [req.cost] * K

    ak = rk.AccountKeys(rk.team_account(tid))
    period = period_of(gateway.clock.now())
    state = await redis.hmget(ak.state, ["credits", "holds", "mh:" + member.user["id"]])
    assert state == [str(credits - worth), "0", "0"]
    counters = await redis.hmget(
        ak.period(period), ["spend", "req", "ms:" + member.user["id"], "mr:" + member.user["id"]]
    )
    assert counters == [str(worth), str(K), str(worth), str(K)]
    assert await redis.hlen(ak.hold_values) == 0

    totals = await eventually(
        lambda: db.fetchrow(
            "SELECT count(*) AS n, coalesce(sum(charged), 0) AS charged,"
            " coalesce(sum(from_credits), 0) AS from_credits FROM usage_records WHERE team_id = $1",
            tid,
        ),
        lambda r: r["n"] >= K,
    )
    assert (totals["n"], totals["charged"], totals["from_credits"]) == (K, worth, worth)
    view = await billing(api, owner, tid)
    assert (view["spend_this_period_usd"], view["requests_this_period"]) == (usd(worth), K)
    assert view["credits_usd"] == view["balance_usd"] == usd(credits - worth)
    assert view["holds_usd"] == usd(0)
