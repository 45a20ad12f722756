"""Redis restarted under streams, with and without persistence: every stream is billed once and
the rebuilt account counts the records still in its Redis stream (policies/ledger.py), so money
comes out exact to the nano-dollar."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from gateway import state as S
from gateway.metering.reconcile import Reconciler
from gateway.metering.usage_writer import UsageWriter
from policies import keyspace as rk
from policies.periods import period_of
from tests.conftest import ADMIN_TOKEN, Gateway, gateway_config, start_gateway
from tests.fake_upstream import FakeUpstream
from tests.faults import RedisServer
from tests.helpers import Api, eventually

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi there"}]}
COST = 5 * 150 + 6 * 600
STREAMS = 4


@pytest.fixture(params=[False, True], ids=["no-persistence", "aof"])
async def private_redis(
    request: pytest.FixtureRequest, tmp_path: Path
) -> AsyncIterator[RedisServer]:
    server = RedisServer(tmp_path / "redis", persistent=request.param)
    server.start()
    yield server
    server.stop()


async def _stream(
    http: aiohttp.ClientSession, gw: Gateway, secret: str, started: asyncio.Event, count: list[int]
) -> bytes:
    async with http.post(
        gw.v1 + "/chat/completions",
        json={**BODY, "stream": True},
        headers={"Authorization": f"Bearer {secret}"},
    ) as r:
        assert r.status == 200
        first = await r.content.readuntil(b"\n\n")
        count[0] += 1
        if count[0] == STREAMS:
            started.set()
        return first + await r.read()


@pytest.mark.slow
async def test_redis_restart_under_streams_bills_each_stream_once_and_rebuilds_exactly(
    private_redis: RedisServer,
    fake: FakeUpstream,
    database_url: str,
    http: aiohttp.ClientSession,
    db: asyncpg.Connection,
) -> None:
    gw, runner = await start_gateway(gateway_config(fake.base_url), database_url, private_redis.url)
    redis = Redis.from_url(private_redis.url, decode_responses=True)
    try:
        api = Api(http, gw.base, ADMIN_TOKEN)
        owner, team, secret = await api.funded_team_key("1.00")
        fake.set_default(chunk_delay_s=0.25)
        started, count = asyncio.Event(), [0]
        streams = [
            asyncio.create_task(_stream(http, gw, secret, started, count)) for _ in range(STREAMS)
        ]
        await asyncio.wait_for(started.wait(), 10)
        private_redis.restart()  # every stream is mid-way
        bodies = await asyncio.gather(*streams)
        assert all(b.endswith(b"data: [DONE]\n\n") for b in bodies)
        fake.set_default()

        # The next request rebuilds the account (when Redis lost it) while the streams' records
        # may still sit in its new usage stream.
        # (a 503 gateway_unavailable until this process's script connection is back: a client
        # retries it; it is never charged, as the record count below shows)
        async def plain() -> int:
            async with http.post(
                gw.v1 + "/chat/completions",
                json=BODY,
                headers={"Authorization": f"Bearer {secret}"},
            ) as r:
                return r.status

        assert await eventually(plain, lambda status: status != 503, interval=0.1) == 200
        n = STREAMS + 1
        rows = await eventually(
            lambda: db.fetch(
                "SELECT request_id, charged, status FROM usage_records WHERE team_id = $1",
                team["id"],
            ),
            lambda rows: len(rows) >= n,
        )
        assert len(rows) == n and {r["status"] for r in rows} == {200}
        assert sum(r["charged"] for r in rows) == n * COST
        account = rk.AccountKeys(rk.team_account(team["id"]))
        await eventually(lambda: redis.xlen(account.usage_stream), lambda x: x == 0)
        assert await redis.hmget(account.state, ["credits", "holds"]) == [
            str(1_000_000_000 - n * COST),
            "0",
        ]
        period = await redis.hgetall(account.period(period_of(gw.clock.now())))
        assert (period["spend"], period["req"]) == (str(n * COST), str(n))
        assert period["ms:" + owner.user["id"]] == str(n * COST)
        overview = await api.overview(owner, team["id"])
        assert overview["credits_usd"] == f"{(1_000_000_000 - n * COST) / 1e9:.9f}"
    finally:
        fake.set_default()
        await redis.aclose()
        await runner.cleanup()


DRAINED = 3  # settled and moved to PostgreSQL before the loss: charged once, not twice
IN_FLIGHT = 4  # settled into Redis's usage stream only: lost with Redis, unless sent again


@pytest.mark.slow
async def test_settles_not_yet_in_postgresql_are_billed_once_after_redis_lost_its_data(
    private_redis: RedisServer,
    fake: FakeUpstream,
    database_url: str,
    http: aiohttp.ClientSession,
    db: asyncpg.Connection,
) -> None:
    """Each process keeps its recent settles and sends them again when Redis's run id changes
    (gateway/metering/recent.py): records settled just before the loss and not yet drained end
    up exactly once in the ledger, and the rebuilt account counts each once (no persistence:
    they were gone; AOF: they survived, and sending them again changes nothing)."""
    config = gateway_config(fake.base_url)
    gw, runner = await start_gateway(config, database_url, private_redis.url, usage_writer=False)
    redis = Redis.from_url(private_redis.url, decode_responses=True)
    writer = UsageWriter(redis, gw.app[S.DB], "test-writer")
    try:
        api = Api(http, gw.base, ADMIN_TOKEN)
        owner, team, secret = await api.funded_team_key("1.00")

        async def plain() -> tuple[int, str]:
            async with http.post(
                gw.v1 + "/chat/completions",
                json=BODY,
                headers={"Authorization": f"Bearer {secret}"},
            ) as r:
                return r.status, r.headers.get("x-request-id", "")

        async def billed() -> list[asyncpg.Record]:
            await writer.drain()
            return await db.fetch(
                "SELECT request_id, charged, status FROM usage_records WHERE team_id = $1",
                team["id"],
            )

        served = [await plain() for _ in range(DRAINED)]
        assert len(await billed()) == DRAINED
        served += [await plain() for _ in range(IN_FLIGHT)]
        assert {status for status, _ in served} == {200}
        account = rk.AccountKeys(rk.team_account(team["id"]))
        assert await redis.xlen(account.usage_stream) == IN_FLIGHT  # not in PostgreSQL yet

        private_redis.restart()
        await redis.aclose()
        redis = Redis.from_url(private_redis.url, decode_responses=True)
        writer = UsageWriter(redis, gw.app[S.DB], "test-writer")
        # (a 503 gateway_unavailable until the script connection is back: never charged)
        served.append(await eventually(plain, lambda answer: answer[0] != 503, interval=0.1))
        n = DRAINED + IN_FLIGHT + 1
        await eventually(billed, lambda rows: len(rows) >= n)
        served.append(await plain())  # loads the account if the re-sent settles unloaded it
        assert {status for status, _ in served} == {200}
        rows = await eventually(billed, lambda rows: len(rows) >= n + 1)
        n += 1
        assert sorted(r["request_id"] for r in rows) == sorted(rid for _, rid in served)
        assert sum(r["charged"] for r in rows) == n * COST
        assert await redis.xlen(account.usage_stream) == 0
        assert await redis.hmget(account.state, ["loaded", "credits", "holds"]) == [
            "1",
            str(1_000_000_000 - n * COST),
            "0",
        ]
        period = await redis.hgetall(account.period(period_of(gw.clock.now())))
        assert (period["spend"], period["req"]) == (str(n * COST), str(n))
        assert period["ms:" + owner.user["id"]] == str(n * COST)
        reconciler = Reconciler(gw.app[S.DB], redis, gw.app[S.ACCOUNTS])
        _, differences = await reconciler.check([account.account], gw.clock.now())
        assert differences == []
    finally:
        await redis.aclose()
        await runner.cleanup()
