"""When a request is refused (contract section 4), end to end: team spending limit, member
limits hard and soft, model restrictions, holds (worst case, settled to actual, expiring).

The tests on the real clock alternate their requests over the gateway processes
(``tests/replicas.py``: two under ``--redis-cluster``); those that fix ``gateway.clock`` use the
session gateway alone."""

from __future__ import annotations

import asyncio
import dataclasses

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from gateway import state as S
from gateway.metering.meter import HoldAsk
from policies import keyspace as rk
from policies.periods import period_of
from tests.billing_support import add_member, exact, models, patch_member, patch_team, usd
from tests.conftest import Gateway, gateway_config, start_gateway
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api, chat, eventually, ts
from tests.replicas import Replicas

pytestmark = pytest.mark.cluster


async def test_team_spending_limit_refuses_every_team_key_until_raised_or_next_period(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession, fake: FakeUpstream, redis: Redis
) -> None:
    gateway.clock.fixed = ts("2031-03-31T23:00:00")
    req = exact(gateway, fake)
    owner, team, secret = await api.funded_team_key("1.00")
    tid = team["id"]
    member = await add_member(api, owner, tid)
    other = (await api.key(member, tid))["secret"]
    await patch_team(api, owner, tid, spending_limit_usd=usd(3 * req.cost))
    for key in (secret, other, secret):
        assert (await chat(http, gateway, key, req.body)).status == 200
    for key in (secret, other):
        reply = await chat(http, gateway, key, req.body)
        assert (reply.status, reply.code) == (429, "team_spending_limit_reached")
        assert reply.headers["Retry-After"] == "3600"
        assert reply.body["error"]["type"] == "rate_limit_error"
    period = await redis.hgetall(rk.AccountKeys(rk.team_account(tid)).period("2031-03"))
    assert (period["spend"], period["req"]) == (str(3 * req.cost), "3")
    # Raising the limit admits exactly one more.
    await patch_team(api, owner, tid, spending_limit_usd=usd(4 * req.cost))
    assert (await chat(http, gateway, other, req.body)).status == 200
    assert (await chat(http, gateway, other, req.body)).status == 429
    # The period turns: spend starts from zero, the same limit admits four again.
    gateway.clock.fixed = ts("2031-04-01T00:00:00")
    for _ in range(4):
        assert (await chat(http, gateway, secret, req.body)).status == 200
    reply = await chat(http, gateway, secret, req.body)
    assert (reply.status, reply.headers["Retry-After"]) == (429, str(30 * 86400))
    overview = await api.overview(owner, tid)
    assert overview["spend_this_period_usd"] == usd(4 * req.cost)
    assert overview["credits_usd"] == usd(1_000_000_000 - 8 * req.cost)


async def test_hard_member_limit_default_and_override(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession, fake: FakeUpstream
) -> None:
    gateway.clock.fixed = ts("2031-05-20T00:00:00")
    req = exact(gateway, fake)
    owner, team, owner_key = await api.funded_team_key("1.00")
    tid = team["id"]
    member = await add_member(api, owner, tid)
    key = (await api.key(member, tid))["secret"]
    await patch_team(api, owner, tid, default_member_limit_usd=usd(2 * req.cost))
    assert [(await chat(http, gateway, key, req.body)).status for _ in range(2)] == [200, 200]
    reply = await chat(http, gateway, key, req.body)
    assert (reply.status, reply.code) == (429, "member_limit_reached")
    assert reply.headers["Retry-After"] == str(12 * 86400)
    # The owner has a counter of their own.
    assert (await chat(http, gateway, owner_key, req.body)).status == 200
    # A per-member override replaces the team default.
    await patch_member(api, owner, tid, member.user["id"], monthly_limit_usd=usd(3 * req.cost))
    assert (await chat(http, gateway, key, req.body)).status == 200
    assert (await chat(http, gateway, key, req.body)).code == "member_limit_reached"
    # Back to the team default (null), now raised.
    await patch_member(api, owner, tid, member.user["id"], monthly_limit_usd=None)
    await patch_team(api, owner, tid, default_member_limit_usd=usd(4 * req.cost))
    assert (await chat(http, gateway, key, req.body)).status == 200
    assert (await chat(http, gateway, key, req.body)).code == "member_limit_reached"


async def test_soft_member_limit_warns_on_every_request_past_it(
    gateway: Gateway, replicas: Replicas, api: Api, http: aiohttp.ClientSession, fake: FakeUpstream
) -> None:
    req = exact(gateway, fake)
    owner, team, _ = await api.funded_team_key("1.00")
    tid = team["id"]
    member = await add_member(api, owner, tid)
    key = (await api.key(member, tid))["secret"]
    await patch_team(
        api, owner, tid, default_member_limit_usd=usd(2 * req.cost), default_enforcement="soft"
    )
    warnings = []
    for to in replicas.spread(4):
        reply = await chat(http, to, key, req.body)
        assert reply.status == 200
        warnings.append(reply.headers.get("x-modelbridge-limit-warning"))
    assert warnings == [None, None, "member_limit_exceeded", "member_limit_exceeded"]
    # Streams carry the header too.
    async with http.post(
        replicas.other.v1 + "/chat/completions",
        json={**req.body, "stream": True},
        headers={"Authorization": f"Bearer {key}"},
    ) as resp:
        assert resp.headers["x-modelbridge-limit-warning"] == "member_limit_exceeded"
        await resp.read()
    # Enforcement per member overrides the team default.
    await patch_member(api, owner, tid, member.user["id"], enforcement="hard")
    assert (await chat(http, replicas.other, key, req.body)).code == "member_limit_reached"


async def test_hard_limits_count_holds_soft_limits_count_settled_spend(
    gateway: Gateway, replicas: Replicas, api: Api, http: aiohttp.ClientSession, fake: FakeUpstream
) -> None:
    req = exact(gateway, fake)
    owner, team, _ = await api.funded_team_key("1.00")
    tid = team["id"]
    member = await add_member(api, owner, tid)
    key = (await api.key(member, tid))["secret"]
    await patch_team(api, owner, tid, default_member_limit_usd=usd(req.cost * 3 // 2))

    async def with_one_in_flight() -> tuple[int, str | None, str | None]:
        """One request held upstream on the first process, the next one on the other."""
        fake.next(delay_s=1.0)
        seen = len(fake.requests)
        slow = asyncio.create_task(chat(http, replicas.first, key, req.body))
        await fake.wait_until(lambda: len(fake.requests) > seen)
        second = await chat(http, replicas.other, key, req.body)
        assert (await slow).status == 200
        return second.status, second.code, second.headers.get("x-modelbridge-limit-warning")

    # hard: settled 0 + held C + C > 1.5 C
    assert await with_one_in_flight() == (429, "member_limit_reached", None)
    # soft, fresh member: settled 0 + C <= 1.5 C, the other request's hold does not count
    other = await add_member(api, owner, tid)
    key = (await api.key(other, tid))["secret"]
    await patch_team(api, owner, tid, default_enforcement="soft")
    assert await with_one_in_flight() == (200, None, None)


async def test_hold_is_worst_case_and_settles_to_actual(
    gateway: Gateway,
    replicas: Replicas,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    redis: Redis,
) -> None:
    req = exact(gateway, fake)
    body = {**req.body, "max_tokens": 1000}  # held: 1000 output tokens; used: 6
    worst = req.prompt_tokens * 150 + 1000 * 600
    _, team, secret = await api.funded_team_key(usd(worst - 1))
    assert (await chat(http, replicas.other, secret, body)).code == "insufficient_quota"
    await api.credit_team(team["id"], usd(1))  # through the first process
    reply = await chat(http, replicas.other, secret, body)
    assert reply.headers["x-modelbridge-cost-usd"] == usd(req.cost)
    ak = rk.AccountKeys(rk.team_account(team["id"]))
    state = await redis.hmget(ak.state, ["credits", "holds"])
    assert state == [str(worst - req.cost), "0"]
    # n choices multiply the output cap: 200 x 6 tokens is more than is left.
    reply = await chat(http, replicas.other, secret, {**req.body, "n": 200})
    assert reply.code == "insufficient_quota"


async def test_expired_holds_free_their_funds(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession, fake: FakeUpstream, redis: Redis
) -> None:
    start = ts("2031-02-10T08:00:00")
    gateway.clock.fixed = start
    req = exact(gateway, fake)
    owner, team, secret = await api.funded_team_key(usd(req.cost))
    account = rk.team_account(team["id"])
    key_id = (await api.call("GET", f"/api/keys?team={team['id']}", session=owner))[1]["data"][0][
        "id"
    ]
    metering = gateway.app[S.METERING]
    # A gateway that crashed after placing this hold never settles or releases it.
    held = await metering.hold(
        HoldAsk(
            account=account,
            period=period_of(start),
            now=start,
            request_id="req_crashed",
            key_id=key_id,
            scope=owner.user["id"],
            model="gpt-4o-mini",
            worst_list_cost=req.cost,
        )
    )
    assert (held.status, held.amount) == ("ok", req.cost)
    assert (await chat(http, gateway, secret, req.body)).code == "insufficient_quota"
    gateway.clock.fixed = start + metering.hold_ttl_s - 1
    assert (await chat(http, gateway, secret, req.body)).code == "insufficient_quota"
    gateway.clock.fixed = start + metering.hold_ttl_s + 1
    assert (await chat(http, gateway, secret, req.body)).status == 200
    ak = rk.AccountKeys(account)
    assert await redis.hmget(ak.state, ["credits", "holds"]) == ["0", "0"]
    assert await redis.hget(ak.hold_values, "req_crashed") is None


async def test_model_restrictions(
    gateway: Gateway,
    replicas: Replicas,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    database_url: str,
    redis_url: str,
) -> None:
    owner, team, secret = await api.funded_team_key()
    tid = team["id"]
    member = await add_member(api, owner, tid)
    key = (await api.key(member, tid))["secret"]
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "hi"}]}
    await patch_team(api, owner, tid, model_restrictions=["gpt-4o", "gpt-5-preview"])
    for k, to in ((secret, replicas.other), (key, replicas.first), (key, replicas.other)):
        reply = await chat(http, to, k, body)
        assert (reply.status, reply.code) == (403, "model_not_allowed")
        assert await models(http, to, k) == ["gpt-4o-mini", "text-embedding-3-small"]
        assert (await chat(http, to, k, {**body, "model": "gpt-4o-mini"})).status == 200
    async with http.get(
        replicas.other.v1 + "/models/gpt-4o", headers={"Authorization": f"Bearer {key}"}
    ) as resp:
        assert resp.status == 404
    # Models the operator adds later are available, unless the team pre-blocked them.
    config = gateway_config(fake.base_url)
    base = config.models["gpt-4o-mini"]
    extra = {
        **config.models,
        "gpt-4.1-mini": dataclasses.replace(base, name="gpt-4.1-mini"),
        "gpt-5-preview": dataclasses.replace(base, name="gpt-5-preview"),
    }
    later, runner = await start_gateway(
        dataclasses.replace(config, models=extra), database_url, redis_url
    )
    try:
        assert await models(http, later, key) == [
            "gpt-4o-mini",
            "text-embedding-3-small",
            "gpt-4.1-mini",
        ]
        assert (await chat(http, later, key, {**body, "model": "gpt-4.1-mini"})).status == 200
        reply = await chat(http, later, key, {**body, "model": "gpt-5-preview"})
        assert reply.code == "model_not_allowed"
    finally:
        await runner.cleanup()
    await patch_team(api, owner, tid, model_restrictions=[])
    assert (await chat(http, replicas.other, key, body)).status == 200
    assert "gpt-4o" in await models(http, replicas.other, key)


async def test_refused_requests_charge_nothing(
    gateway: Gateway,
    replicas: Replicas,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    db: asyncpg.Connection,
) -> None:
    req = exact(gateway, fake)
    owner, team, secret = await api.funded_team_key("1.00")
    await patch_team(api, owner, team["id"], spending_limit_usd=usd(req.cost))
    statuses = [(await chat(http, to, secret, req.body)).status for to in replicas.spread(3)]
    assert statuses == [200, 429, 429]
    await eventually(
        lambda: db.fetchval("SELECT count(*) FROM usage_records WHERE team_id = $1", team["id"]),
        lambda n: n == 1,
    )
    assert (
        await db.fetchval("SELECT sum(charged) FROM usage_records WHERE team_id = $1", team["id"])
        == req.cost
    )
