"""The usage writer when idle: instead of a step every ``block_ms`` it waits in one blocking
XREADGROUP on the streams it knows and the doorbell (rung when a stream is registered), so a
record arriving then is written at once; what that read took is this consumer's, read again
when it comes back after a kill -9 or when it was stopping."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import AsyncIterator
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from bench.drain import _record, fill
from gateway.config import Config
from gateway.infra.db import create_pool
from gateway.metering.accounts import Accounts
from gateway.metering.usage_writer import UsageWriter
from policies import keyspace as rk
from tests.helpers import eventually
from tests.writer_support import OwnRedis, run_records

HOUR_MS = 3_600_000  # no poll, claim or wait timeout could explain what a test sees


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    pool = await create_pool(database_url, min_size=1, max_size=2, reset=False)
    yield pool
    await pool.close()


def _writer(redis_url: str, pool: asyncpg.Pool, consumer: str) -> UsageWriter:
    redis = Redis.from_url(redis_url, decode_responses=True, socket_timeout=None)
    writer = UsageWriter(redis, pool, consumer)
    writer.wait_ms = writer.claim_idle_ms = HOUR_MS  # block_ms: the one step after a write
    return writer


async def _blocked(redis: Redis) -> int:
    """Clients blocked in a command (the writer's wait)."""
    clients: list[dict[str, Any]] = await redis.client_list()
    return sum("b" in c["flags"] for c in clients)


async def _add(redis: Redis, run: str, account: str, n: int) -> None:
    stream = rk.AccountKeys(account).usage_stream
    await redis.xadd(stream, _record(n, account, run))  # type: ignore[arg-type]


async def test_an_idle_writer_writes_a_record_as_soon_as_it_arrives_and_a_new_stream_rings(
    own_redis: OwnRedis, pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    redis_url, redis = own_redis
    run = secrets.token_hex(3)
    await fill(redis, 0, 1, run)  # one registered stream, empty
    writer = _writer(redis_url, pool, "test-wait")
    task = asyncio.create_task(writer.run())
    try:
        await eventually(lambda: _blocked(redis), lambda n: n == 1)  # waiting, for an hour
        await _add(redis, run, f"t_bench{run}0000", 1)
        await eventually(lambda: run_records(db, run), lambda n: n == 1)
        # A stream the wait does not name (registered after it began): the doorbell wakes it.
        await eventually(lambda: _blocked(redis), lambda n: n == 1)
        fresh = f"t_bench{run}fresh"
        stream = rk.AccountKeys(fresh).usage_stream
        await redis.xgroup_create(stream, rk.USAGE_GROUP, id="0", mkstream=True)
        await _add(redis, run, fresh, 2)
        await Accounts(Config(), pool, redis, None).ensure_stream(fresh)  # type: ignore[arg-type]
        await eventually(lambda: run_records(db, run), lambda n: n == 2)
        assert await redis.xlen(stream) == 0
        assert await redis.xpending(rk.USAGE_DOORBELL, rk.USAGE_GROUP) == {
            "pending": 0,
            "min": None,
            "max": None,
            "consumers": [],
        }
    finally:
        writer.stop()  # ends the wait at once (the drain then finds nothing)
        await asyncio.wait_for(task, 10)
        await writer.redis.aclose()


async def test_what_the_wait_read_is_written_once_after_a_kill_or_a_stop(
    own_redis: OwnRedis, pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    redis_url, redis = own_redis
    run = secrets.token_hex(3)
    await fill(redis, 3, 3, run)  # one record in each of three streams
    killed = _writer(redis_url, pool, "test-killed")
    killed._streams = await killed.streams()
    assert await killed._wait_for_records()  # read, then "killed" before writing
    assert len(killed._woken) == 3
    await killed.redis.aclose()
    again = _writer(redis_url, pool, "test-killed")
    assert await again.drain() == 3
    assert await run_records(db, run) == 3
    assert await again.pending() == 0
    await again.redis.aclose()

    # Stopped while waiting: what the cancelled read may have taken is read again by the drain.
    stopping = _writer(redis_url, pool, "test-stopping")
    task = asyncio.create_task(stopping.run())
    await eventually(lambda: _blocked(redis), lambda n: n == 1)
    stopping.stop()
    await asyncio.wait_for(task, 10)
    await _add(redis, run, f"t_bench{run}0000", 4)
    assert await stopping.drain() == 1
    assert await run_records(db, run) == 4
    await stopping.redis.aclose()
