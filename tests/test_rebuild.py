"""Redis lost its state: balances, counters and keys are rebuilt from PostgreSQL, lazily, by
whichever gateway process meets the account first (two under ``--redis-cluster``:
``tests/replicas.py``)."""

from __future__ import annotations

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from gateway.metering.meter import HoldAsk, SettleAsk
from gateway.metering.reconcile import Reconciler
from policies import keyspace as rk
from policies.periods import period_of
from policies.usage_record import opened_of
from tests.conftest import Gateway
from tests.helpers import Api, chat, eventually, forget_account
from tests.replicas import Replicas

pytestmark = pytest.mark.cluster

COST = 5 * 150 + 6 * 600
BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi there"}]}


async def test_lost_account_state_is_rebuilt_from_postgresql(
    gateway: Gateway,
    replicas: Replicas,
    api: Api,
    http: aiohttp.ClientSession,
    db: asyncpg.Connection,
    redis: Redis,
) -> None:
    owner, team, secret = await api.funded_team_key("1.00")
    revoked = await api.key(owner, team["id"], name="old")
    await api.call("DELETE", f"/api/keys/{revoked['id']}", session=owner, expect=200)
    for to in replicas.spread(3):
        assert (await chat(http, to, secret, BODY)).status == 200

    async def records(n: int) -> None:
        await eventually(
            lambda: db.fetchval(
                "SELECT count(*) FROM usage_records WHERE team_id = $1", team["id"]
            ),
            lambda count: count == n,
        )

    await records(3)
    account = rk.AccountKeys(rk.team_account(team["id"]))
    period = period_of(gateway.clock.now())
    before_state = await redis.hmget(account.state, ["credits", "sub_alw"])
    before_period = await redis.hgetall(account.period(period))
    before = await api.overview(owner, team["id"])

    await forget_account(redis, rk.team_account(team["id"]))

    # The overview and the next request rebuild it: same money, same counters, same keys.
    assert await api.overview(owner, team["id"]) == before
    assert await redis.hmget(account.state, ["credits", "sub_alw"]) == before_state
    assert await redis.hgetall(account.period(period)) == before_period
    assert await redis.hgetall(account.keys) == {
        k: owner.user["id"] for k in await redis.hkeys(account.keys)
    }
    assert revoked["id"] not in await redis.hkeys(account.keys)
    assert (await chat(http, replicas.other, secret, BODY)).status == 200
    for to in replicas.spread(2):
        assert (await chat(http, to, revoked["secret"], BODY)).status == 401
    after = await api.overview(owner, team["id"])
    assert after["credits_usd"] == f"{(1_000_000_000 - 4 * COST) / 1e9:.9f}"
    assert after["spend_this_period_usd"] == f"{4 * COST / 1e9:.9f}"
    # ...and the usage of the request after the loss still reaches PostgreSQL.
    await records(4)
    # Lost again: this time a request to the other process is the first to meet the account.
    await forget_account(redis, rk.team_account(team["id"]))
    assert (await chat(http, replicas.other, secret, BODY)).status == 200
    assert (await chat(http, replicas.other, revoked["secret"], BODY)).status == 401
    after = await api.overview(owner, team["id"])
    assert after["credits_usd"] == f"{(1_000_000_000 - 5 * COST) / 1e9:.9f}"
    assert after["spend_this_period_usd"] == f"{5 * COST / 1e9:.9f}"
    await records(5)


async def test_settle_is_idempotent_on_the_request_id(
    gateway: Gateway, api: Api, redis: Redis
) -> None:
    from gateway import state as S

    owner, team, _ = await api.funded_team_key("1.00")
    account = rk.team_account(team["id"])
    metering = gateway.app[S.METERING]
    now = gateway.clock.now()
    period = period_of(now)
    hold = await metering.hold(
        HoldAsk(
            account=account,
            period=period,
            now=now,
            request_id="req_idem",
            key_id="nokey",
            scope=owner.user["id"],
            model="gpt-4o-mini",
            worst_list_cost=5000,
        )
    )
    assert hold.status == "invalid_api_key"  # unknown key ids never hold
    key = await api.key(owner, team["id"])
    hold = await metering.hold(
        HoldAsk(
            account=account,
            period=period,
            now=now,
            request_id="req_idem",
            key_id=key["id"],
            scope=owner.user["id"],
            model="gpt-4o-mini",
            worst_list_cost=5000,
        )
    )
    assert (hold.status, hold.amount) == ("ok", 5000)
    record = opened_of({"request_id": "req_idem", "created_at": int(now * 1000)})
    ask = SettleAsk(
        account=account,
        period=period,
        request_id="req_idem",
        scope=owner.user["id"],
        key_id=key["id"],
        model="gpt-4o-mini",
        charged=4000,
        record=record,
    )
    first = await metering.settle(ask)
    second = await metering.settle(ask)
    assert (first.settled, first.from_credits) == (True, 4000)
    assert (second.settled, second.from_credits) == (False, 0)
    state = await redis.hmget(rk.AccountKeys(account).state, ["credits", "holds"])
    assert state == [str(1_000_000_000 - 4000), "0"]


async def test_a_rebuild_keeps_the_holds_in_flight(
    gateway: Gateway, api: Api, redis: Redis
) -> None:
    """A loaded account rebuilt (an operator's repair, settles sent again after a Redis loss)
    keeps its holds in flight, summed again from the hold hash: nothing is admitted past a limit
    meanwhile, and the request's settle then releases its hold as usual."""
    from gateway import state as S

    owner, team, _ = await api.funded_team_key("1.00")
    key = await api.key(owner, team["id"])
    account = rk.team_account(team["id"])
    ak = rk.AccountKeys(account)
    metering = gateway.app[S.METERING]
    now = gateway.clock.now()
    ask = HoldAsk(
        account=account,
        period=period_of(now),
        now=now,
        request_id="req_kept_hold",
        key_id=key["id"],
        scope=owner.user["id"],
        model="gpt-4o-mini",
        worst_list_cost=5000,
    )
    hold = await metering.hold(ask)
    assert (hold.status, hold.amount) == ("ok", 5000)
    scope = "mh:" + owner.user["id"]
    assert await redis.hmget(ak.state, ["holds", scope]) == ["5000", "5000"]

    assert await gateway.app[S.ACCOUNTS].load(account, now, force=True)
    assert await redis.hmget(ak.state, ["loaded", "holds", scope]) == ["1", "5000", "5000"]
    assert await redis.zcard(ak.hold_expiry) == 1
    await metering.release(
        account=account, request_id="req_kept_hold", key_id=key["id"], scope=owner.user["id"]
    )
    assert await redis.hmget(ak.state, ["holds", scope]) == ["0", "0"]


async def test_malformed_usage_record_is_kept_not_dropped_and_blocks_nothing(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession, db: asyncpg.Connection, redis: Redis
) -> None:
    _, team, secret = await api.funded_team_key("1.00")
    stream = rk.AccountKeys(rk.team_account(team["id"])).usage_stream
    await redis.xadd(stream, {"request_id": "req_malformed", "prompt_tokens": "many"})
    assert (await chat(http, gateway, secret, BODY)).status == 200
    await eventually(
        lambda: db.fetchval("SELECT count(*) FROM usage_records WHERE team_id = $1", team["id"]),
        lambda n: n == 1,
    )
    reject = await eventually(
        lambda: db.fetchrow(
            "SELECT * FROM usage_rejects WHERE fields->>'request_id' = 'req_malformed'"
        ),
        lambda r: r is not None,
    )
    assert reject["stream"] == stream
    assert await redis.xlen(stream) == 0


async def test_a_settle_sent_again_counts_once_though_the_ledger_has_it(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession, db: asyncpg.Connection, redis: Redis
) -> None:
    """``resettle.lua`` on a settle whose marker Redis lost but whose record the writer had
    moved already (gateway/metering/recent.py): the record is in the stream again, the account
    unloaded, and the rebuild counts the request once; the writer does not insert it twice."""
    from gateway import state as S

    _, team, secret = await api.funded_team_key("1.00")
    first = await chat(http, gateway, secret, BODY)
    assert first.status == 200
    rid = first.headers["x-request-id"]
    count = "SELECT count(*) FROM usage_records WHERE team_id = $1"
    await eventually(lambda: db.fetchval(count, team["id"]), lambda n: n == 1)
    metering = gateway.app[S.METERING]
    sent = next(e for e in metering.recent.entries if e.request_id == rid)
    account = rk.team_account(team["id"])
    ak = rk.AccountKeys(account)
    await redis.delete(ak.settled_marker(rid))  # as a Redis that lost it
    assert await metering.resend(account, [(rid, sent.record)]) == 1
    assert await metering.resend(account, [(rid, sent.record)]) == 0  # marker back
    assert await redis.hget(ak.state, "loaded") == "0"

    assert (await chat(http, gateway, secret, BODY)).status == 200  # rebuilds the account
    await eventually(lambda: redis.xlen(ak.usage_stream), lambda n: n == 0)
    assert await db.fetchval(count, team["id"]) == 2
    assert await redis.hmget(ak.state, ["loaded", "credits", "holds"]) == [
        "1",
        str(1_000_000_000 - 2 * COST),
        "0",
    ]
    period = await redis.hgetall(ak.period(period_of(gateway.clock.now())))
    assert (period["spend"], period["req"]) == (str(2 * COST), "2")
    reconciler = Reconciler(gateway.app[S.DB], redis, gateway.app[S.ACCOUNTS])
    assert (await reconciler.check([account], gateway.clock.now()))[1] == []
