"""Expired holds are cleared without the account's next request: a crashed worker's hold leaves
the balance shown to users within the sweep interval after it expires."""

from __future__ import annotations

import time

from redis.asyncio import Redis

from gateway import state as S
from gateway.metering.meter import HoldAsk
from policies import keyspace as rk
from policies.periods import period_of
from tests.conftest import Gateway
from tests.helpers import Api, eventually


async def test_an_expired_hold_is_cleared_with_no_request(
    gateway: Gateway, api: Api, redis: Redis
) -> None:
    owner, team, _ = await api.funded_team_key("1.00")
    key = await api.key(owner, team["id"])
    account = rk.team_account(team["id"])
    metering = gateway.app[S.METERING]
    # A hold placed by a worker that then died: placed long enough ago that it has expired.
    placed = time.time() - metering.hold_ttl_s - 1
    hold = await metering.hold(
        HoldAsk(
            account=account,
            period=period_of(placed),
            now=placed,
            request_id="req_crashed",
            key_id=key["id"],
            scope=owner.user["id"],
            model="gpt-4o-mini",
            worst_list_cost=250_000_000,
        )
    )
    assert hold.status == "ok"
    ak = rk.AccountKeys(account)
    assert await redis.hget(ak.state, "holds") == "250000000"
    # Nobody calls for this account again; the sweeper (every metering.sweep_every_s) clears it.
    interval = gateway.config.metering.sweep_every_s
    await eventually(lambda: redis.hget(ak.state, "holds"), lambda h: h == "0", interval + 5)
    assert await redis.zcard(ak.hold_expiry) == 0
    assert await redis.hlen(ak.hold_values) == 0
    overview = await api.overview(owner, team["id"])
    assert overview["credits_usd"] == "1.000000000"


async def test_a_live_hold_is_left_alone(gateway: Gateway, api: Api, redis: Redis) -> None:
    from gateway.metering.sweeper import HoldSweeper

    owner, team, _ = await api.funded_team_key("1.00")
    key = await api.key(owner, team["id"])
    account = rk.team_account(team["id"])
    now = time.time()
    metering = gateway.app[S.METERING]
    hold = await metering.hold(
        HoldAsk(
            account=account,
            period=period_of(now),
            now=now,
            request_id="req_live",
            key_id=key["id"],
            scope=owner.user["id"],
            model="gpt-4o-mini",
            worst_list_cost=1000,
        )
    )
    assert hold.status == "ok"
    await HoldSweeper(redis, 1.0).sweep()
    ak = rk.AccountKeys(account)
    assert await redis.hget(ak.state, "holds") == "1000"
    await metering.release(
        account=account, request_id="req_live", key_id=key["id"], scope=owner.user["id"]
    )
