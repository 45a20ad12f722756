"""Personal billing: personal keys bill the user's balance; a member's ``billing_mode: personal``
makes their team keys bill it too, while the team's model restrictions and member limits still
apply (mirrored into the user's account slot) and the member's spend carries across the switch."""

from __future__ import annotations

from collections.abc import AsyncIterator

import aiohttp
import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from policies import keyspace as rk
from policies.periods import period_of
from tests.billing_support import Receiver, add_member, exact, models, patch_member, patch_team, usd
from tests.conftest import Gateway
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api, Session, chat, eventually

USD = 1_000_000_000


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = await Receiver().start()
    yield rec
    await rec.stop()


async def personal_balance(api: Api, session: Session) -> str:
    _, me = await api.call("GET", "/api/me", session=session, expect=200)
    return str(me["balance_usd"])


async def usage_rows(db: asyncpg.Connection, user_id: str, n: int) -> list[asyncpg.Record]:
    return await eventually(
        lambda: db.fetch(
            "SELECT * FROM usage_records WHERE user_id = $1 ORDER BY created_at, request_id",
            user_id,
        ),
        lambda rows: len(rows) == n,
    )


async def forget(redis: Redis, account: str) -> None:
    keys = [k async for k in redis.scan_iter(match=f"{{acct:{account}}}:*")]
    if keys:
        await redis.delete(*keys)


async def test_personal_keys_bill_the_personal_balance(
    gateway: Gateway,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    db: asyncpg.Connection,
) -> None:
    req = exact(gateway, fake)
    user = await api.signup()
    key = (await api.key(user))["secret"]
    reply = await chat(http, gateway, key, req.body)
    assert (reply.status, reply.code) == (429, "insufficient_quota")
    await api.credit_user(user.user["id"], usd(2 * req.cost))
    for _ in range(2):
        assert (await chat(http, gateway, key, req.body)).status == 200
    assert (await chat(http, gateway, key, req.body)).code == "insufficient_quota"
    assert await personal_balance(api, user) == usd(0)
    rows = await usage_rows(db, user.user["id"], 2)
    assert {(r["account"], r["team_id"], r["charged"], r["from_credits"]) for r in rows} == {
        (rk.user_account(user.user["id"]), None, req.cost, req.cost)
    }


async def test_billing_mode_personal_keeps_team_policies(
    gateway: Gateway,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    redis: Redis,
    db: asyncpg.Connection,
) -> None:
    req = exact(gateway, fake)
    owner, team, _ = await api.funded_team_key("1.00")
    tid = team["id"]
    member = await add_member(api, owner, tid)
    uid = member.user["id"]
    await api.credit_user(uid, "0.50")
    key = (await api.key(member, tid))["secret"]
    await patch_team(
        api, owner, tid, default_member_limit_usd=usd(3 * req.cost), model_restrictions=["gpt-4o"]
    )
    assert (await chat(http, gateway, key, req.body)).status == 200  # billed to the team
    body = await patch_member(api, member, tid, uid, billing_mode="personal")
    assert body["billing_mode"] == "personal"
    # Now the team key bills the member: the team's balance no longer moves.
    for _ in range(2):
        assert (await chat(http, gateway, key, req.body)).status == 200
    assert await personal_balance(api, member) == usd(USD // 2 - 2 * req.cost)
    overview = await api.overview(owner, tid)
    assert overview["credits_usd"] == usd(USD - req.cost)
    assert overview["spend_this_period_usd"] == usd(req.cost)
    # The team's policies still apply: the member limit counts the team-billed request too.
    reply = await chat(http, gateway, key, req.body)
    assert (reply.status, reply.code) == (429, "member_limit_reached")
    reply = await chat(http, gateway, key, {**req.body, "model": "gpt-4o"})
    assert (reply.status, reply.code) == (403, "model_not_allowed")
    assert "gpt-4o" not in await models(http, gateway, key)
    # Team settings changed later reach the member's account too.
    await patch_team(
        api, owner, tid, default_member_limit_usd=usd(4 * req.cost), model_restrictions=[]
    )
    assert (await chat(http, gateway, key, {**req.body, "model": "gpt-4o-mini"})).status == 200
    assert "gpt-4o" in await models(http, gateway, key)
    assert (await chat(http, gateway, key, req.body)).code == "member_limit_reached"
    rows = await usage_rows(db, uid, 4)
    assert [r["account"] for r in rows] == [rk.team_account(tid)] + [rk.user_account(uid)] * 3
    assert {r["team_id"] for r in rows} == {tid}
    # The member list shows all of it (the team's counter plus the personally billed records).
    _, listed = await api.call("GET", f"/api/teams/{tid}/members", session=owner, expect=200)
    (mine,) = [m for m in listed["data"] if m["user_id"] == uid]
    assert mine["spend_this_period_usd"] == usd(4 * req.cost)

    # Back to team billing: the team pays again, and the limit still counts everything.
    await patch_member(api, member, tid, uid, billing_mode="team")
    await patch_team(api, owner, tid, default_member_limit_usd=usd(5 * req.cost))
    assert (await chat(http, gateway, key, req.body)).status == 200
    assert (await chat(http, gateway, key, req.body)).code == "member_limit_reached"
    assert (await api.overview(owner, tid))["spend_this_period_usd"] == usd(2 * req.cost)
    assert await personal_balance(api, member) == usd(USD // 2 - 3 * req.cost)
    period = period_of(gateway.clock.now())
    team_period = await redis.hmget(
        rk.AccountKeys(rk.team_account(tid)).period(period), ["ms:" + uid, "mx:" + uid]
    )
    assert team_period == [str(2 * req.cost), str(3 * req.cost)]


async def test_personal_mode_state_is_rebuilt_from_postgresql(
    gateway: Gateway,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    redis: Redis,
    db: asyncpg.Connection,
) -> None:
    req = exact(gateway, fake)
    owner, team, owner_key = await api.funded_team_key("1.00")
    tid = team["id"]
    member = await add_member(api, owner, tid)
    uid = member.user["id"]
    await api.credit_user(uid, "0.50")
    team_key = await api.key(member, tid)
    own_key = await api.key(member)
    await patch_team(
        api,
        owner,
        tid,
        default_member_limit_usd=usd(10 * req.cost),
        default_enforcement="soft",
        model_restrictions=["gpt-4o", "text-embedding-3-small"],
    )
    assert (await chat(http, gateway, team_key["secret"], req.body)).status == 200
    await patch_member(api, member, tid, uid, billing_mode="personal")
    for secret in (team_key["secret"], team_key["secret"], own_key["secret"]):
        assert (await chat(http, gateway, secret, req.body)).status == 200
    await usage_rows(db, uid, 4)
    period = period_of(gateway.clock.now())
    account = rk.user_account(uid)
    ak = rk.AccountKeys(account)

    async def snapshot() -> tuple[object, ...]:
        state = await redis.hmget(ak.state, ["credits", "holds", "sub_alw"])
        counters = await redis.hgetall(ak.period(period))
        counters = {k: v for k, v in counters.items() if not k.startswith("al:")}
        return (
            state,
            counters,
            await redis.hgetall(ak.cfg),
            await redis.hgetall(ak.keys),
            await redis.smembers(ak.blocked(tid)),
            await redis.smembers(ak.blocked("")),
        )

    before = await snapshot()
    state, counters, cfg, keys, blocked, own_blocked = before
    assert state == [str(USD // 2 - 3 * req.cost), "0", "0"]
    assert counters["ms:" + tid] == str(2 * req.cost) and counters["ms:" + uid] == str(req.cost)
    assert counters["mx:" + tid] == str(req.cost)
    assert cfg == {"ml:" + tid: str(10 * req.cost), "me:" + tid: "soft"}
    assert keys == {team_key["id"]: tid, own_key["id"]: uid}
    assert (blocked, own_blocked) == ({"gpt-4o", "text-embedding-3-small"}, set())
    await forget(redis, account)
    await forget(redis, rk.team_account(tid))
    assert (await chat(http, gateway, owner_key, req.body)).status == 200
    reply = await chat(http, gateway, team_key["secret"], {**req.body, "model": "gpt-4o"})
    assert reply.code == "model_not_allowed"  # rebuilt by this request
    assert await snapshot() == before


async def test_member_override_is_mirrored_and_alerts_reach_the_team(
    gateway: Gateway,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    receiver: Receiver,
) -> None:
    req = exact(gateway, fake)
    owner, team, _ = await api.funded_team_key("1.00")
    tid = team["id"]
    await api.call(
        "POST",
        f"/api/teams/{tid}/webhooks",
        session=owner,
        json={"url": receiver.url},
        expect=201,
    )
    member = await add_member(api, owner, tid)
    uid = member.user["id"]
    await api.credit_user(uid, "0.50")
    key = (await api.key(member, tid))["secret"]
    await patch_member(api, member, tid, uid, billing_mode="personal")
    await patch_member(api, owner, tid, uid, monthly_limit_usd=usd(req.cost), enforcement="soft")
    warnings = [
        (await chat(http, gateway, key, req.body)).headers.get("x-modelbridge-limit-warning")
        for _ in range(2)
    ]
    assert warnings == [None, "member_limit_exceeded"]
    await receiver.wait_for(3)
    got = sorted(
        (e["team_id"], e["data"]["user_id"], e["data"]["threshold"])
        for e in (orjson.loads(d.raw) for d in receiver.deliveries)
    )
    assert got == [(tid, uid, "100"), (tid, uid, "80"), (tid, uid, "exceeded")]
