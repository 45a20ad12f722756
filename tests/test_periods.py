"""Periods are calendar months in UTC, turned by the clock alone: limits reset, allowances renew,
credits carry over, alerts re-arm — tested exactly at the December to January boundary."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from policies import keyspace as rk
from tests.billing_support import Receiver, add_member, billing, exact, patch_team, subscribe, usd
from tests.conftest import Gateway
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api, chat, eventually, ts

USD = 1_000_000_000


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = await Receiver().start()
    yield rec
    await rec.stop()


async def test_limits_reset_at_new_year_with_exact_retry_after(
    gateway: Gateway,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    redis: Redis,
    db: asyncpg.Connection,
) -> None:
    gateway.clock.fixed = ts("2030-12-31T23:59:50")
    req = exact(gateway, fake)
    owner, team, secret = await api.funded_team_key("1.00")
    tid = team["id"]
    member = await add_member(api, owner, tid)
    member_key = (await api.key(member, tid))["secret"]
    await patch_team(
        api,
        owner,
        tid,
        spending_limit_usd=usd(3 * req.cost),
        default_member_limit_usd=usd(req.cost),
    )
    assert (await chat(http, gateway, member_key, req.body)).status == 200
    reply = await chat(http, gateway, member_key, req.body)
    assert (reply.status, reply.code, reply.headers["Retry-After"]) == (
        429,
        "member_limit_reached",
        "10",
    )
    await patch_team(api, owner, tid, default_member_limit_usd=None)
    assert (await chat(http, gateway, secret, req.body)).status == 200
    assert (await chat(http, gateway, member_key, req.body)).status == 200
    gateway.clock.fixed = ts("2030-12-31T23:59:59.250")
    reply = await chat(http, gateway, secret, req.body)
    assert (reply.status, reply.code, reply.headers["Retry-After"]) == (
        429,
        "team_spending_limit_reached",
        "1",
    )
    # Midnight UTC: a new period, counters from zero, no job ran.
    gateway.clock.fixed = ts("2031-01-01T00:00:00")
    assert (await api.overview(owner, tid))["spend_this_period_usd"] == usd(0)
    for key in (secret, secret, member_key):
        assert (await chat(http, gateway, key, req.body)).status == 200
    reply = await chat(http, gateway, member_key, req.body)
    assert (reply.code, reply.headers["Retry-After"]) == (
        "team_spending_limit_reached",
        str(31 * 86400),
    )
    overview = await api.overview(owner, tid)
    assert (overview["period"], overview["spend_this_period_usd"]) == ("2031-01", usd(3 * req.cost))
    assert overview["credits_usd"] == usd(USD - 6 * req.cost)  # credits carry over
    ak = rk.AccountKeys(rk.team_account(tid))
    december = await redis.hgetall(ak.period("2030-12"))
    january = await redis.hgetall(ak.period("2031-01"))
    assert (december["spend"], january["spend"]) == (str(3 * req.cost), str(3 * req.cost))
    assert january["ms:" + member.user["id"]] == str(req.cost)
    rows = await eventually(
        lambda: db.fetch(
            "SELECT period, count(*) AS n FROM usage_records WHERE team_id = $1 GROUP BY period"
            " ORDER BY period",
            tid,
        ),
        lambda r: sum(x["n"] for x in r) == 6,
    )
    assert [(r["period"], r["n"]) for r in rows] == [("2030-12", 3), ("2031-01", 3)]


async def test_allowance_renews_credits_carry_over(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession, fake: FakeUpstream
) -> None:
    gateway.clock.fixed = ts("2032-12-31T23:00:00")
    req = exact(gateway, fake)
    owner, team, secret = await api.funded_team_key("0.25")
    tid = team["id"]
    await subscribe(api, owner, tid, "starter", 1)
    for _ in range(2):
        assert (await chat(http, gateway, secret, req.body)).status == 200
    view = await billing(api, owner, tid)
    assert (view["allowance_left_usd"], view["credits_usd"]) == (
        usd(2 * USD - 2 * req.cost),
        "0.250000000",
    )
    gateway.clock.fixed = ts("2033-01-01T00:00:00")
    view = await billing(api, owner, tid)
    assert (view["period"], view["allowance_usd"], view["allowance_left_usd"]) == (
        "2033-01",
        "2.000000000",
        "2.000000000",
    )
    assert (view["credits_usd"], view["balance_usd"]) == ("0.250000000", "2.250000000")
    assert [(i["period"], i["kind"]) for i in view["invoices"]] == [
        ("2033-01", "renewal"),
        ("2032-12", "subscription"),
    ]


async def test_alerts_rearm_every_period(
    gateway: Gateway,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    receiver: Receiver,
) -> None:
    gateway.clock.fixed = ts("2033-05-31T23:59:00")
    req = exact(gateway, fake)
    owner, team, secret = await api.funded_team_key("1.00")
    tid = team["id"]
    await api.call(
        "POST",
        f"/api/teams/{tid}/webhooks",
        session=owner,
        json={"url": receiver.url},
        expect=201,
    )
    await patch_team(api, owner, tid, spending_limit_usd=usd(req.cost * 10 // 9))
    assert (await chat(http, gateway, secret, req.body)).status == 200
    assert (await chat(http, gateway, secret, req.body)).status == 429
    gateway.clock.fixed = ts("2033-06-01T00:00:01")
    assert (await chat(http, gateway, secret, req.body)).status == 200
    await receiver.wait_for(3)
    got = sorted(
        (e["period"], e["data"]["threshold"], e["data"]["trigger"])
        for e in (orjson.loads(d.raw) for d in receiver.deliveries)
    )
    assert got == [
        ("2033-05", "100", "refusal"),
        ("2033-05", "80", "spend"),
        ("2033-06", "80", "spend"),
    ]


async def test_a_request_admitted_before_midnight_is_recorded_in_its_admission_month(
    gateway: Gateway,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    db: asyncpg.Connection,
) -> None:
    # usage_records is partitioned by created_at and keyed by (request_id, created_at): the
    # record's created_at is the admission's, however late the settle, so any later delivery of
    # the same record is the same row, in the same month's partition.
    admitted = ts("2032-03-31T23:59:59.500")
    gateway.clock.fixed = admitted
    req = exact(gateway, fake)
    _owner, team, secret = await api.funded_team_key("1.00")
    seen = len(fake.requests)
    fake.next(delay_s=1.0)
    call = asyncio.create_task(chat(http, gateway, secret, req.body))
    await eventually(lambda: _value(len(fake.requests)), lambda n: n > seen)
    gateway.clock.fixed = ts("2032-04-01T00:00:00.500")  # the settle comes after midnight
    assert (await call).status == 200
    row = await eventually(
        lambda: db.fetchrow(
            "SELECT created_at, period, tableoid::regclass::text AS part FROM usage_records"
            " WHERE team_id = $1",
            team["id"],
        ),
        lambda r: r is not None,
    )
    assert (row["created_at"].timestamp(), row["period"], row["part"]) == (
        admitted,
        "2032-03",
        "usage_records_2032_03",
    )


async def _value(value: int) -> int:
    return value
