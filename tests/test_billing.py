"""How a team is funded: subscriptions and seats, allowance before credits, invoices, the billing
view, team settings, and the operator's discount — exact to the nano-dollar."""

from __future__ import annotations

from typing import Any

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from policies import keyspace as rk
from policies.periods import period_of
from tests.billing_support import (
    INPUT,
    OUTPUT,
    add_member,
    billing,
    exact,
    patch_team,
    subscribe,
    usd,
)
from tests.conftest import Gateway
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api, chat, eventually, forget_account, ts

USD = 1_000_000_000


async def usage_row(db: asyncpg.Connection, request_id: str) -> asyncpg.Record:
    return await eventually(
        lambda: db.fetchrow("SELECT * FROM usage_records WHERE request_id = $1", request_id),
        lambda r: r is not None,
    )


def lines(view: dict[str, Any]) -> list[tuple[str, str, str, int, str]]:
    return sorted(
        (i["period"], i["kind"], i["plan"], i["seats"], i["amount_usd"]) for i in view["invoices"]
    )


async def test_subscription_gives_allowance_drawn_before_credits(
    gateway: Gateway,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    db: asyncpg.Connection,
) -> None:
    owner = await api.signup()
    team = await api.team(owner)
    tid = team["id"]
    await api.credit_team(tid, "1.00")
    view = await subscribe(api, owner, tid, "starter", 1)
    period = period_of(gateway.clock.now())
    assert (view["plan"], view["seats"], view["seat_price_usd"]) == ("starter", 1, "10.000000000")
    assert view["allowance_usd"] == view["allowance_left_usd"] == "2.000000000"
    assert (view["credits_usd"], view["balance_usd"]) == ("1.000000000", "3.000000000")
    assert lines(view) == [(period, "subscription", "starter", 1, "10.000000000")]
    assert [(c["kind"], c["amount_usd"]) for c in view["credit_history"]] == [
        ("allowance", "2.000000000"),
        ("credit", "1.000000000"),
    ]
    key = await api.key(owner, tid)
    # One request costing more than the allowance: the allowance is drawn first, then credits.
    req = exact(gateway, fake)
    completion = 3_400_000
    body = {**req.body, "max_tokens": completion}
    fake.next(completion_tokens=completion)
    reply = await chat(http, gateway, key["secret"], body)
    assert reply.status == 200, reply.body
    cost = req.prompt_tokens * INPUT + completion * OUTPUT
    assert reply.headers["x-modelbridge-cost-usd"] == usd(cost)
    row = await usage_row(db, reply.headers["x-request-id"])
    assert (row["charged"], row["from_allowance"], row["from_credits"]) == (
        cost,
        2 * USD,
        cost - 2 * USD,
    )
    view = await billing(api, owner, tid)
    assert (view["allowance_used_usd"], view["allowance_left_usd"]) == (
        "2.000000000",
        "0.000000000",
    )
    assert view["credits_usd"] == view["balance_usd"] == usd(3 * USD - cost)
    assert view["spend_this_period_usd"] == usd(cost)
    overview = await api.overview(owner, tid)
    assert overview["balance_usd"] == usd(3 * USD - cost)


async def test_seats_raise_now_lower_next_period_and_renew(
    gateway: Gateway,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    redis: Redis,
    db: asyncpg.Connection,
) -> None:
    gateway.clock.fixed = ts("2031-06-15T12:00:00")
    owner, team, secret = await api.funded_team_key("0.50")
    tid = team["id"]
    view = await subscribe(api, owner, tid, "pro", 2)
    assert view["allowance_usd"] == "10.000000000"
    assert view["period_ends_at"] == "2031-07-01T00:00:00+00:00"
    req = exact(gateway, fake)
    assert (await chat(http, gateway, secret, req.body)).status == 200  # fixes June's allowance
    view = await subscribe(api, owner, tid, "pro", 5)  # +3 seats: +15.00 at once
    assert (view["allowance_usd"], view["allowance_left_usd"]) == (
        "25.000000000",
        usd(25 * USD - req.cost),
    )
    view = await subscribe(api, owner, tid, "pro", 1)  # lowering: next period
    assert view["allowance_usd"] == "25.000000000"
    assert view["next_period_allowance_usd"] == "5.000000000"
    view = await subscribe(api, owner, tid, "pro", 3)  # back up, within what June paid for
    assert view["allowance_usd"] == "25.000000000"
    assert lines(view) == [
        ("2031-06", "change", "pro", 3, "60.000000000"),
        ("2031-06", "subscription", "pro", 2, "40.000000000"),
    ]
    allowance_rows = await db.fetch(
        "SELECT amount FROM ledger WHERE account = $1 AND kind = 'allowance' AND period = '2031-06'"
        " ORDER BY id",
        rk.team_account(tid),
    )
    assert [r["amount"] for r in allowance_rows] == [10 * USD, 15 * USD]
    # Redis lost the account: June is rebuilt from the ledger, not from the 3-seat subscription.
    await eventually(
        lambda: db.fetchval("SELECT count(*) FROM usage_records WHERE team_id = $1", tid),
        lambda n: n == 1,
    )
    await forget_account(redis, rk.team_account(tid))
    assert (await billing(api, owner, tid))["allowance_left_usd"] == usd(25 * USD - req.cost)
    # July: the 3-seat subscription's allowance and its renewal line.
    gateway.clock.fixed = ts("2031-07-01T00:00:00")
    view = await billing(api, owner, tid)
    assert (view["period"], view["allowance_usd"], view["allowance_left_usd"]) == (
        "2031-07",
        "15.000000000",
        "15.000000000",
    )
    assert ("2031-07", "renewal", "pro", 3, "60.000000000") in lines(view)
    assert (await chat(http, gateway, secret, req.body)).status == 200
    view = await billing(api, owner, tid)
    assert view["allowance_left_usd"] == usd(15 * USD - req.cost)
    assert view["credits_usd"] == "0.500000000"
    assert len([i for i in view["invoices"] if i["period"] == "2031-07"]) == 1
    audit = await db.fetch(
        "SELECT before, after FROM audit_log WHERE team_id = $1 AND action = 'subscription.change'"
        " ORDER BY id",
        tid,
    )
    assert len(audit) == 4


async def test_plan_change_and_cancel(gateway: Gateway, api: Api) -> None:
    gateway.clock.fixed = ts("2031-08-10T00:00:00")
    owner = await api.signup()
    tid = (await api.team(owner))["id"]
    await subscribe(api, owner, tid, "starter", 5)  # 10.00 allowance, 50.00
    view = await subscribe(api, owner, tid, "pro", 5)  # 25.00 allowance, 100.00
    assert view["allowance_usd"] == "25.000000000"
    assert lines(view)[0] == ("2031-08", "change", "pro", 5, "50.000000000")
    view = await subscribe(api, owner, tid, None, 0)
    assert (view["plan"], view["seats"], view["allowance_usd"]) == (None, 0, "25.000000000")
    assert view["next_period_allowance_usd"] == "0.000000000"
    gateway.clock.fixed = ts("2031-09-01T00:00:00")
    view = await billing(api, owner, tid)
    assert (view["allowance_usd"], view["balance_usd"]) == ("0.000000000", "0.000000000")
    assert not [i for i in view["invoices"] if i["period"] == "2031-09"]


async def test_billing_is_for_owners_and_admins_and_changes_for_owners(
    gateway: Gateway, api: Api
) -> None:
    owner = await api.signup()
    tid = (await api.team(owner))["id"]
    admin = await add_member(api, owner, tid, "admin")
    member = await add_member(api, owner, tid)
    outsider = await api.signup()
    path = f"/api/teams/{tid}"
    assert (await api.call("GET", path + "/billing", session=admin))[0] == 200
    assert (await api.call("GET", path + "/billing", session=member))[0] == 403
    assert (await api.call("GET", path + "/billing", session=outsider))[0] == 404
    sub = {"plan": "pro", "seats": 1}
    for who, status in ((member, 403), (admin, 403), (outsider, 404), (owner, 200)):
        got, body = await api.call("PUT", path + "/subscription", session=who, json=sub)
        assert got == status, body
    await patch_team(api, admin, tid, 403, spending_limit_usd="5")
    await patch_team(api, admin, tid, 403, name="x", spending_limit_usd="5")
    await patch_team(api, member, tid, 403, name="x")
    await patch_team(api, member, tid, 403, model_restrictions=["gpt-4o"])
    await patch_team(api, outsider, tid, 404, name="x")
    body = await patch_team(
        api,
        admin,
        tid,
        name="Renamed",
        default_member_limit_usd="2.5",
        default_enforcement="soft",
        model_restrictions=["gpt-4o"],
    )
    assert (body["name"], body["default_member_limit_usd"], body["default_enforcement"]) == (
        "Renamed",
        "2.500000000",
        "soft",
    )
    assert body["your_role"] == "admin" and body["model_restrictions"] == ["gpt-4o"]
    body = await patch_team(api, owner, tid, spending_limit_usd=7)
    assert body["spending_limit_usd"] == "7.000000000"


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"plan": "gold", "seats": 1}, "plan"),
        ({"plan": 5, "seats": 1}, "plan"),
        ({"seats": 1}, "plan"),
        ({"plan": "pro"}, "seats"),
        ({"plan": "pro", "seats": 0}, "seats"),
        ({"plan": "pro", "seats": -1}, "seats"),
        ({"plan": "pro", "seats": "3"}, "seats"),
        ({"plan": "pro", "seats": 1.5}, "seats"),
        ({"plan": "pro", "seats": True}, "seats"),
        ({"plan": "pro", "seats": 100_001}, "seats"),
        ({"plan": None, "seats": 2}, "seats"),
    ],
)
async def test_subscription_validation(
    gateway: Gateway, api: Api, payload: dict[str, Any], param: str
) -> None:
    owner = await api.signup()
    tid = (await api.team(owner))["id"]
    status, body = await api.call(
        "PUT", f"/api/teams/{tid}/subscription", session=owner, json=payload
    )
    assert (status, body["error"]["param"]) == (400, param), body
    assert body["error"]["type"] == "invalid_request_error"


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"spending_limit_usd": "abc"}, "spending_limit_usd"),
        ({"spending_limit_usd": "-1"}, "spending_limit_usd"),
        ({"spending_limit_usd": "0.0000000001"}, "spending_limit_usd"),
        ({"spending_limit_usd": [1]}, "spending_limit_usd"),
        ({"default_member_limit_usd": True}, "default_member_limit_usd"),
        ({"default_enforcement": "medium"}, "default_enforcement"),
        ({"default_enforcement": None}, "default_enforcement"),
        ({"model_restrictions": "gpt-4o"}, "model_restrictions"),
        ({"model_restrictions": [1]}, "model_restrictions"),
        ({"model_restrictions": [""]}, "model_restrictions"),
        ({"model_restrictions": ["x" * 101]}, "model_restrictions"),
        ({"model_restrictions": [" gpt-4o"]}, "model_restrictions"),
        ({"model_restrictions": ["gpt\n4o"]}, "model_restrictions"),
        ({"model_restrictions": ["m"] * 501}, "model_restrictions"),
        ({"name": ""}, "name"),
        ({"name": None}, "name"),
        ({"name": "x" * 101}, "name"),
        ({"discount_bps": 10}, "discount_bps"),
        ({"plan": "pro"}, "plan"),
    ],
)
async def test_team_settings_validation(
    gateway: Gateway, api: Api, payload: dict[str, Any], param: str
) -> None:
    owner = await api.signup()
    tid = (await api.team(owner))["id"]
    status, body = await api.call("PATCH", f"/api/teams/{tid}", session=owner, json=payload)
    assert (status, body["error"]["param"]) == (400, param), body


async def test_team_settings_reach_redis_and_the_audit_log(
    gateway: Gateway, api: Api, redis: Redis, db: asyncpg.Connection
) -> None:
    owner, team, _ = await api.funded_team_key()
    tid = team["id"]
    ak = rk.AccountKeys(rk.team_account(tid))
    body = await patch_team(
        api,
        owner,
        tid,
        spending_limit_usd="12.5",
        default_member_limit_usd=3,
        default_enforcement="soft",
        model_restrictions=["gpt-4o", "future-model", "gpt-4o"],
    )
    assert body["spending_limit_usd"] == "12.500000000"
    assert body["model_restrictions"] == ["gpt-4o", "future-model"]
    cfg = await redis.hgetall(ak.cfg)
    assert (cfg["limit"], cfg["dml"], cfg["den"]) == (str(12_500_000_000), str(3 * USD), "soft")
    assert await redis.smembers(ak.blocked("")) == {"gpt-4o", "future-model"}
    body = await patch_team(
        api,
        owner,
        tid,
        spending_limit_usd=None,
        default_member_limit_usd=None,
        model_restrictions=None,
    )
    assert body["spending_limit_usd"] is None and body["model_restrictions"] == []
    cfg = await redis.hgetall(ak.cfg)
    assert (cfg["limit"], cfg["dml"]) == ("-1", "-1")
    assert await redis.smembers(ak.blocked("")) == set()
    rows = await db.fetch(
        "SELECT actor_id, before, after FROM audit_log"
        " WHERE team_id = $1 AND action = 'team.update' ORDER BY id",
        tid,
    )
    import orjson

    first, second = (
        (orjson.loads(r["before"]), orjson.loads(r["after"]), r["actor_id"]) for r in rows
    )
    assert first == (
        {
            "spending_limit_usd": None,
            "default_member_limit_usd": None,
            "default_enforcement": "hard",
            "model_restrictions": [],
        },
        {
            "spending_limit_usd": "12.500000000",
            "default_member_limit_usd": "3.000000000",
            "default_enforcement": "soft",
            "model_restrictions": ["gpt-4o", "future-model"],
        },
        owner.user["id"],
    )
    assert second[1] == {
        "spending_limit_usd": None,
        "default_member_limit_usd": None,
        "model_restrictions": [],
    }
    # Nothing changed: no audit row.
    await patch_team(api, owner, tid, default_enforcement="soft")
    assert (
        await db.fetchval(
            "SELECT count(*) FROM audit_log WHERE team_id = $1 AND action = 'team.update'", tid
        )
        == 2
    )


@pytest.mark.parametrize(
    ("bps", "charged"),
    [(0, 4350), (1000, 3915), (3333, 2900), (9999, 0), (10_000, 0)],
)
async def test_discount_floor_rounded_on_every_request(
    gateway: Gateway,
    api: Api,
    http: aiohttp.ClientSession,
    db: asyncpg.Connection,
    bps: int,
    charged: int,
) -> None:
    # "hi there": the fake reports 5 prompt and 6 completion tokens: 4350 nano-USD list.
    owner, team, secret = await api.funded_team_key("1.00")
    await api.call(
        "PUT",
        f"/admin/teams/{team['id']}/discount",
        admin=True,
        json={"discount_bps": bps},
        expect=200,
    )
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi there"}]}
    for _ in range(2):
        reply = await chat(http, gateway, secret, body)
        assert reply.headers["x-modelbridge-cost-usd"] == usd(charged)
        row = await usage_row(db, reply.headers["x-request-id"])
        assert (row["list_cost"], row["discount"], row["charged"]) == (
            4350,
            4350 - charged,
            charged,
        )
    overview = await api.overview(owner, team["id"])
    assert overview["credits_usd"] == usd(USD - 2 * charged)
    assert overview["discount_bps"] == bps


async def test_discount_shrinks_the_hold(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession, fake: FakeUpstream
) -> None:
    req = exact(gateway, fake)
    held = req.cost * 5000 // 10_000
    owner, team, secret = await api.funded_team_key(usd(held))
    reply = await chat(http, gateway, secret, req.body)
    assert (reply.status, reply.code) == (429, "insufficient_quota")
    await api.call(
        "PUT",
        f"/admin/teams/{team['id']}/discount",
        admin=True,
        json={"discount_bps": 5000},
        expect=200,
    )
    reply = await chat(http, gateway, secret, req.body)
    assert reply.status == 200
    assert reply.headers["x-modelbridge-cost-usd"] == usd(held)
    assert (await api.overview(owner, team["id"]))["credits_usd"] == "0.000000000"
