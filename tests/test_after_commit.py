"""Redis follows PostgreSQL after commit: a management transaction that fails after the point
where it would change the accounts' live state leaves Redis as it was, consistent with the
record; the same change, committed, reaches Redis."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest
from aiohttp import web
from redis.asyncio import Redis

from gateway import state as S
from gateway.infra.stores import StoreURLs
from gateway.metering import changes
from policies import keyspace as rk
from policies.periods import period_of
from tests.conftest import ADMIN_TOKEN, Gateway, _with_database, gateway_config, start_gateway
from tests.fake_upstream import FakeUpstream
from tests.faults import TcpProxy
from tests.helpers import Api, Session, eventually
from tests.people import CHAT, client, team_with_roles


@asynccontextmanager
async def refused_at_commit(
    db: asyncpg.Connection, table: str, when: str, event: str = "UPDATE"
) -> AsyncIterator[None]:
    """A deferred constraint trigger that fails the commit of any transaction that ``event``s
    (UPDATE, INSERT) a row of ``table`` matching ``when`` (after every statement of it ran: the
    Redis write points too)."""
    name = "mbtest_refuse_" + secrets.token_hex(4)
    await db.execute(
        f"CREATE FUNCTION {name}() RETURNS trigger LANGUAGE plpgsql AS"
        " $$ BEGIN RAISE EXCEPTION 'refused at commit by the test'; END $$"
    )
    await db.execute(
        f"CREATE CONSTRAINT TRIGGER {name} AFTER {event} ON {table}"
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


# --- every management change: nothing reaches Redis before its commit ---------------------------
@dataclass(frozen=True)
class Change:
    """A management call, and the trigger that refuses its commit: ``table``, ``event`` and a
    ``when`` condition with ``{tid}`` and ``{uid}`` (the team and its member) filled in."""

    method: str
    path: str
    body: dict[str, Any]
    by: str  # "owner", "member" or "operator"
    table: str
    event: str
    when: str


CHANGES = {
    "member policy": Change(
        "PATCH",
        "/api/teams/{tid}/members/{uid}",
        {"monthly_limit_usd": "0.25", "enforcement": "soft", "rpm": 7},
        "owner",
        "memberships",
        "UPDATE",
        "NEW.user_id = '{uid}'",
    ),
    "billing mode": Change(
        "PATCH",
        "/api/teams/{tid}/members/{uid}",
        {"billing_mode": "personal"},
        "member",
        "memberships",
        "UPDATE",
        "NEW.user_id = '{uid}'",
    ),
    "team settings": Change(
        "PATCH",
        "/api/teams/{tid}",
        {"model_restrictions": ["gpt-4o"], "rpm_limit": 9, "default_member_limit_usd": "0.5"},
        "owner",
        "teams",
        "UPDATE",
        "NEW.id = '{tid}'",
    ),
    "subscription": Change(
        "PUT",
        "/api/teams/{tid}/subscription",
        {"plan": "starter", "seats": 2},
        "owner",
        "teams",
        "UPDATE",
        "NEW.id = '{tid}'",
    ),
    "discount": Change(
        "PUT",
        "/admin/teams/{tid}/discount",
        {"discount_bps": 1500},
        "operator",
        "teams",
        "UPDATE",
        "NEW.id = '{tid}'",
    ),
    "credits": Change(
        "POST",
        "/admin/teams/{tid}/credits",
        {"amount_usd": "0.5", "note": "top-up"},
        "operator",
        "ledger",
        "INSERT",
        "NEW.account = 't_{tid}'",
    ),
    "key creation": Change(
        "POST",
        "/api/keys",
        {"name": "late", "team": "{tid}", "rpm": 3},
        "member",
        "api_keys",
        "INSERT",
        "NEW.user_id = '{uid}'",
    ),
}


async def accounts_state(redis: Redis, team_id: str, user_id: str, period: str) -> dict[str, Any]:
    """What the live state of the team and its member holds: money, policies and keys."""
    team, user = rk.AccountKeys(rk.team_account(team_id)), rk.AccountKeys(rk.user_account(user_id))
    return {
        **await live_state(redis, team_id, user_id),
        "team state": await redis.hmget(team.state, ["credits", "sub_alw"]),
        "team period": await redis.hgetall(team.period(period)),
        "team blocked": await redis.smembers(team.blocked("")),
        "user state": await redis.hmget(user.state, ["credits", "sub_alw"]),
        "user period": await redis.hgetall(user.period(period)),
    }


def _fill(value: Any, tid: str, uid: str) -> Any:
    if isinstance(value, str):
        return value.replace("{tid}", tid).replace("{uid}", uid)
    if isinstance(value, dict):
        return {k: _fill(v, tid, uid) for k, v in value.items()}
    return value


@pytest.mark.parametrize("name", sorted(CHANGES))
async def test_a_change_rolled_back_at_commit_never_reaches_redis(
    gateway: Gateway, api: Api, db: asyncpg.Connection, redis: Redis, name: str
) -> None:
    change = CHANGES[name]
    team, people = await team_with_roles(api)
    tid, member = team["id"], people["member"]
    uid = member.user["id"]
    await api.credit_team(tid, "1.00")
    await api.call("GET", "/api/me", session=member, expect=200)
    await api.credit_user(uid, "1.00")
    await api.key(member, tid)
    period = period_of(gateway.clock.now())
    before = await accounts_state(redis, tid, uid, period)
    session = None if change.by == "operator" else people[change.by]
    path, body = _fill(change.path, tid, uid), _fill(change.body, tid, uid)

    when = _fill(change.when, tid, uid)
    async with refused_at_commit(db, change.table, when, change.event):
        await api.call(
            change.method, path, session=session, admin=session is None, json=body, expect=500
        )
    assert await accounts_state(redis, tid, uid, period) == before

    status, _ = await api.call(
        change.method, path, session=session, admin=session is None, json=body
    )
    assert status in (200, 201)
    after = await accounts_state(redis, tid, uid, period)
    assert after != before
    # What the committed change wrote is what a rebuild from the record writes.
    accounts = gateway.app[S.ACCOUNTS]
    for account in (rk.team_account(tid), rk.user_account(uid)):
        await accounts.load(account, gateway.clock.now(), force=True)
    assert await accounts_state(redis, tid, uid, period) == after


# --- a change committed while Redis cannot be written reaches it later, through the outbox -------
@dataclass
class Cut:
    """A gateway on a database of its own whose Redis (the session's) sits behind a relay that
    can be cut, so a change commits and its Redis write fails."""

    gateway: Gateway
    runner: web.AppRunner
    relay: TcpProxy
    db: asyncpg.Connection
    database_url: str
    redis_url: str

    async def restart(self, fake_url: str) -> None:
        await self.runner.cleanup()
        self.gateway, self.runner = await start_gateway(
            gateway_config(fake_url), self.database_url, self.relay.url_for(self.redis_url)
        )


@pytest.fixture
async def cut_gateway(
    store_urls: StoreURLs,
    redis_url: str,
    fake: FakeUpstream,
    redis_cluster: object,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Cut]:
    if redis_cluster is not None:
        pytest.skip("the relay stands in front of one Redis node")
    monkeypatch.setattr(changes, "SWEEP_EVERY_S", 0.2)
    name = f"mbtest_outbox_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(store_urls.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    database_url = _with_database(store_urls.database_url, name)
    relay = TcpProxy.to_url(redis_url)
    await relay.start()
    gw, runner = await start_gateway(
        gateway_config(fake.base_url), database_url, relay.url_for(redis_url)
    )
    db = await asyncpg.connect(database_url)
    cut = Cut(gw, runner, relay, db, database_url, redis_url)
    try:
        yield cut
    finally:
        await db.close()
        await cut.runner.cleanup()
        await relay.stop()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _pending(db: asyncpg.Connection) -> int:
    return int(await db.fetchval("SELECT count(*) FROM account_outbox"))


async def _changes_while_cut(cut: Cut, http: aiohttp.ClientSession) -> tuple[str, str, str]:
    """A funded team, then, with Redis cut: credits, a discount, a key with an rpm limit and the
    owner's monthly limit, each committed. Returns the team id, owner id and new key id."""
    api = Api(http, cut.gateway.base, ADMIN_TOKEN)
    owner, team, _ = await api.funded_team_key("1.00")
    tid = team["id"]
    await api.overview(owner, tid)  # the account is loaded
    await cut.relay.cut()
    await api.credit_team(tid, "0.50")
    await api.call(
        "PUT", f"/admin/teams/{tid}/discount", admin=True, json={"discount_bps": 1500}, expect=200
    )
    _, key = await api.call(
        "POST", "/api/keys", session=owner, json={"name": "late", "team": tid, "rpm": 3}, expect=201
    )
    # A member's limit: committed too, but its answer reads Redis: 503, not a 500.
    status, body = await api.call(
        "PATCH",
        f"/api/teams/{tid}/members/{owner.user['id']}",
        session=owner,
        json={"monthly_limit_usd": "0.25"},
    )
    assert (status, body["error"]["code"]) == (503, "gateway_unavailable")
    assert await _pending(cut.db) == 4  # committed, not in Redis yet
    return tid, owner.user["id"], key["id"]


async def _assert_applied(redis: Redis, tid: str, uid: str, key_id: str) -> None:
    team = rk.AccountKeys(rk.team_account(tid))
    assert await redis.hmget(team.state, ["loaded", "credits"]) == ["1", "1500000000"]
    cfg = await redis.hgetall(team.cfg)
    assert (cfg["disc"], cfg["ml:" + uid]) == ("1500", "250000000")
    assert (await redis.hgetall(team.keys))[key_id] == f"{uid}|||3||"


async def test_a_change_committed_while_redis_is_cut_is_applied_when_it_is_back(
    cut_gateway: Cut, http: aiohttp.ClientSession, redis: Redis
) -> None:
    tid, uid, key_id = await _changes_while_cut(cut_gateway, http)
    team = rk.AccountKeys(rk.team_account(tid))
    assert await redis.hget(team.state, "credits") == "1000000000"
    assert key_id not in await redis.hgetall(team.keys)

    await cut_gateway.relay.restore()  # the periodic sweep applies what was left
    await eventually(lambda: _pending(cut_gateway.db), lambda n: n == 0)
    await _assert_applied(redis, tid, uid, key_id)


async def test_changes_left_in_the_outbox_are_applied_at_start(
    cut_gateway: Cut, http: aiohttp.ClientSession, redis: Redis, fake: FakeUpstream
) -> None:
    changes.SWEEP_EVERY_S = 600.0  # (monkeypatched) only a sweep at start can apply them now
    tid, uid, key_id = await _changes_while_cut(cut_gateway, http)
    await cut_gateway.relay.restore()
    assert await _pending(cut_gateway.db) == 4
    await cut_gateway.restart(fake.base_url)
    await eventually(lambda: _pending(cut_gateway.db), lambda n: n == 0)
    await _assert_applied(redis, tid, uid, key_id)


async def test_applying_a_change_again_writes_the_same(
    gateway: Gateway, api: Api, redis: Redis
) -> None:
    """A sweep may apply a note whose Redis writes were done but whose deletion was not
    committed: the writes are derived from the record, credits counted past a mark."""
    owner, team, _ = await api.funded_team_key("1.00")
    tid, uid = team["id"], owner.user["id"]
    subscription = {"plan": "starter", "seats": 1}
    path = f"/api/teams/{tid}/subscription"
    await api.call("PUT", path, session=owner, json=subscription, expect=200)
    await api.credit_team(tid, "0.25")
    now = gateway.clock.now()
    period = period_of(now)
    account = rk.team_account(tid)
    note = changes.AccountChanges(
        members={(tid, uid)}, teams={tid}, credits={account}, subscriptions={(tid, period)}
    )
    before = await accounts_state(redis, tid, uid, period)
    assert before["team state"] == ["1250000000", "2000000000"]
    assert before["team period"]["alw"] == "2000000000"
    accounts = gateway.app[S.ACCOUNTS]

    async def apply() -> None:
        async with accounts.db.acquire() as conn, conn.transaction():
            await changes.apply_changes(accounts, conn, note, now)

    await apply()
    await apply()
    assert await accounts_state(redis, tid, uid, period) == before
    # An account loaded before credits had a mark is rebuilt by the apply.
    state = rk.AccountKeys(account).state
    crid = await redis.hget(state, "crid")
    await redis.hdel(state, "crid")
    await redis.hincrby(state, "credits", 7)  # drift the rebuild puts right
    await apply()
    assert await redis.hget(state, "crid") == crid
    assert await accounts_state(redis, tid, uid, period) == before


async def test_concurrent_credits_are_each_counted_once(
    gateway: Gateway, api: Api, db: asyncpg.Connection, redis: Redis
) -> None:
    """Applies run concurrently with other commits: each counts the credit rows past the mark,
    so every top-up is counted once, whichever apply sees it."""
    owner, team, _ = await api.funded_team_key("1.00")
    tid = team["id"]
    await api.overview(owner, tid)  # loaded
    await asyncio.gather(*(api.credit_team(tid, f"0.0{n}") for n in range(1, 10)))
    state = rk.AccountKeys(rk.team_account(tid)).state
    assert await redis.hget(state, "credits") == str(1_000_000_000 + 450_000_000)
    last = await db.fetchval(
        "SELECT max(id) FROM ledger WHERE account = $1 AND kind = 'credit'", "t_" + tid
    )
    assert await redis.hget(state, "crid") == str(last)
    pending = "SELECT count(*) FROM account_outbox WHERE strpos(changes::text, $1) > 0"
    assert await db.fetchval(pending, tid) == 0


async def test_a_periodic_sweep_leaves_a_fresh_note_to_its_handler(
    gateway: Gateway, api: Api, db: asyncpg.Connection, redis: Redis
) -> None:
    """A note just committed is its handler's to deliver; a sweep takes it once it was pending
    at the previous sweep too (the handler died, or Redis failed it)."""
    owner, team, _ = await api.funded_team_key("1.00")
    tid = team["id"]
    await api.overview(owner, tid)  # loaded
    account = rk.team_account(tid)
    outbox = changes.Outbox(gateway.app[S.ACCOUNTS], gateway.clock.now)
    await outbox.sweep()  # the first sweep, as at start
    note = changes.AccountChanges(credits={account})
    async with db.transaction():  # a credit committed as the operator API does, not delivered
        await db.execute("SELECT pg_advisory_xact_lock(hashtext($1))", account)
        await db.execute(
            "INSERT INTO ledger (account, kind, amount, note, actor)"
            " VALUES ($1, 'credit', 500000000, 'by hand', 'operator')",
            account,
        )
        await note.record(db, gateway.clock.now())
    state = rk.AccountKeys(account).state
    assert await outbox.sweep() == 0
    assert await redis.hget(state, "credits") == "1000000000"
    await outbox.sweep()  # (or the gateway's own sweep, if it came first)
    assert await redis.hget(state, "credits") == "1500000000"
    assert (
        await db.fetchval("SELECT count(*) FROM account_outbox WHERE id = $1", note.outbox_id) == 0
    )
