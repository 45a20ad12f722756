"""Redis follows PostgreSQL after commit: a management transaction that fails after the point
where it would change the accounts' live state leaves Redis as it was, consistent with the
record; the same change, committed, reaches Redis."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import openai
import pytest
from redis.asyncio import Redis

from policies import keyspace as rk
from tests.conftest import Gateway
from tests.helpers import Api, Session
from tests.people import CHAT, client, team_with_roles


@asynccontextmanager
async def refused_at_commit(db: asyncpg.Connection, table: str, when: str) -> AsyncIterator[None]:
    """A deferred constraint trigger that fails the commit of any transaction updating a row of
    ``table`` matching ``when`` (after every statement of it ran: the Redis write points too)."""
    name = "mbtest_refuse_" + secrets.token_hex(4)
    await db.execute(
        f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'refused at commit by the test'; END $$"
    )
    await db.execute(
        f"CREATE CONSTRAINT TRIGGER {name} AFTER UPDATE ON {table}"
        f" DEFERRABLE INITIALLY DEFERRED FOR EACH ROW WHEN ({when}) EXECUTE FUNCTION {name}()"
    )
    try:
        yield
    finally:
        await db.execute(f"DROP TRIGGER {name} ON {table}")
        await db.execute(f"DROP FUNCTION {name}()")


async def live_state(redis: Redis, team_id: str, user_id: str) -> dict[str, Any]:
    team, user = rk.AccountKeys(rk.team_account(team_id)), rk.AccountKeys(rk.user_account(user_id))
    return {
        "team keys": await redis.hgetall(team.keys),
        "team cfg": await redis.hgetall(team.cfg),
        "user keys": await redis.hgetall(user.keys),
        "user cfg": await redis.hgetall(user.cfg),
        "user blocked": await redis.smembers(user.blocked(team_id)),
    }


async def chat_works(gateway: Gateway, secret: str) -> bool:
    try:
        await client(gateway, secret).chat.completions.create(**CHAT)  # type: ignore[call-overload]
    except openai.AuthenticationError:
        return False
    return True


async def remove(api: Api, owner: Session, team_id: str, user_id: str, expect: int) -> None:
    await api.call(
        "DELETE", f"/api/teams/{team_id}/members/{user_id}", session=owner, expect=expect
    )


@pytest.mark.parametrize("billing_mode", ["team", "personal"])
async def test_a_member_removal_rolled_back_at_commit_leaves_redis_as_it_was(
    gateway: Gateway, api: Api, db: asyncpg.Connection, redis: Redis, billing_mode: str
) -> None:
    team, people = await team_with_roles(api)
    tid, owner, member = team["id"], people["owner"], people["member"]
    uid = member.user["id"]
    await api.credit_team(tid, "1.00")
    await api.call("GET", "/api/me", session=member, expect=200)  # load the user's account
    await api.credit_user(uid, "1.00")
    key = await api.key(member, tid)
    members = f"/api/teams/{tid}/members/{uid}"
    await api.call(
        "PATCH",
        f"/api/teams/{tid}",
        session=owner,
        expect=200,
        json={"model_restrictions": ["gpt-4o"]},
    )
    await api.call(
        "PATCH",
        members,
        session=owner,
        expect=200,
        json={"monthly_limit_usd": "0.5", "enforcement": "soft"},
    )
    if billing_mode == "personal":
        await api.call(
            "PATCH", members, session=member, json={"billing_mode": "personal"}, expect=200
        )
    before = await live_state(redis, tid, uid)
    assert before["team cfg"]["ml:" + uid] == "500000000"
    billed = before["user keys"] if billing_mode == "personal" else before["team keys"]
    assert key["id"] in billed
    assert await chat_works(gateway, key["secret"])

    when = f"NEW.user_id = '{uid}' AND NEW.removed_at IS NOT NULL"
    async with refused_at_commit(db, "memberships", when):
        await remove(api, owner, tid, uid, expect=500)
    assert await live_state(redis, tid, uid) == before
    row = await db.fetchrow(
        "SELECT removed_at FROM memberships WHERE team_id = $1 AND user_id = $2", tid, uid
    )
    assert row["removed_at"] is None
    assert await db.fetchval("SELECT revoked_at FROM api_keys WHERE id = $1", key["id"]) is None
    assert await chat_works(gateway, key["secret"])  # the record says active, and so does Redis

    await remove(api, owner, tid, uid, expect=200)
    after = await live_state(redis, tid, uid)
    assert key["id"] not in after["team keys"] and key["id"] not in after["user keys"]
    assert "ml:" + uid not in after["team cfg"] and "me:" + uid not in after["team cfg"]
    assert "ml:" + tid not in after["user cfg"] and after["user blocked"] == set()
    assert not await chat_works(gateway, key["secret"])


async def test_a_key_revocation_rolled_back_at_commit_leaves_redis_as_it_was(
    gateway: Gateway, api: Api, db: asyncpg.Connection, redis: Redis
) -> None:
    owner, team, secret = await api.funded_team_key("1.00")
    tid = team["id"]
    (key_id,) = await redis.hkeys(rk.AccountKeys(rk.team_account(tid)).keys)
    before = await live_state(redis, tid, owner.user["id"])
    async with refused_at_commit(db, "api_keys", f"NEW.id = '{key_id}'"):
        await api.call("DELETE", f"/api/keys/{key_id}", session=owner, expect=500)
    assert await live_state(redis, tid, owner.user["id"]) == before
    assert await chat_works(gateway, secret)
    await api.call("DELETE", f"/api/keys/{key_id}", session=owner, expect=200)
    assert not await chat_works(gateway, secret)
