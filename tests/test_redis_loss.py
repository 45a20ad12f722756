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
