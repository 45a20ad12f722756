"""The usage writer after PostgreSQL failed: what it had read is written as soon as PostgreSQL
answers again (not left claimed until the 30 s idle claim), once, rollup included; a frozen
PostgreSQL fails a batch after the write timeout instead of hanging the writer; a writer that was
killed picks up what it had read at once when it comes back under its name."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest
from redis.asyncio import Redis

from bench.drain import fill
from gateway.infra.db import create_pool
from gateway.metering.usage_writer import UsageWriter
from tests.faults import TcpProxy
from tests.helpers import eventually
from tests.writer_support import OwnRedis, run_records

RECORDS = 300


@pytest.fixture
async def pg_proxy(database_url: str) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy.to_url(database_url)
    await proxy.start()
    yield proxy
    await proxy.stop()


async def _written(db: asyncpg.Connection, run: str) -> tuple[int, int]:
    """(records, requests in the rollup) of this run's accounts."""
    records = await run_records(db, run)
    rollup = await db.fetchval(
        "SELECT coalesce(sum(requests), 0) FROM usage_daily WHERE account LIKE $1",
        f"t_bench{run}%",
    )
    return records, int(rollup)


async def _writer(pool: asyncpg.Pool, redis_url: str, consumer: str) -> UsageWriter:
    writer = UsageWriter(Redis.from_url(redis_url, decode_responses=True), pool, consumer)
    writer.write_timeout_s = 2.0
    return writer


@pytest.mark.parametrize("fault", ["stopped", "frozen"])
async def test_backlog_is_written_within_seconds_of_postgresql_coming_back(
    fault: str,
    pg_proxy: TcpProxy,
    database_url: str,
    own_redis: OwnRedis,
    db: asyncpg.Connection,
) -> None:
    redis_url, redis = own_redis
    pool = await create_pool(pg_proxy.url_for(database_url), min_size=1, max_size=2)
    writer = await _writer(pool, redis_url, f"test-{secrets.token_hex(3)}")
    task = asyncio.create_task(writer.run())
    run = secrets.token_hex(3)
    try:
        if fault == "stopped":
            await pg_proxy.cut()
        else:
            pg_proxy.freeze()
        await fill(redis, RECORDS, 3, run)
        # The writer reads them and fails to write them (a frozen one after its write timeout).
        await eventually(lambda: _async(writer._failing_since), lambda t: t is not None, 10)
        assert await _written(db, run) == (0, 0)
        await pg_proxy.restore()
        back = time.monotonic()
        await eventually(lambda: _written(db, run), lambda n: n == (RECORDS, RECORDS), 10)
        assert time.monotonic() - back < 5.0
        await eventually(lambda: writer.pending(), lambda n: n == 0)
    finally:
        await pg_proxy.restore()
        writer.stop()
        await asyncio.wait_for(task, 20)
        await writer.redis.aclose()
        await pool.close()


async def _async(value: object) -> object:
    return value


async def test_a_writer_back_under_its_name_writes_what_it_had_read_at_once(
    database_url: str, own_redis: OwnRedis, db: asyncpg.Connection
) -> None:
    redis_url, redis = own_redis
    pool = await create_pool(database_url, min_size=1, max_size=2)
    consumer, run = f"test-{secrets.token_hex(3)}", secrets.token_hex(3)
    try:
        await fill(redis, RECORDS, 3, run)
        killed = await _writer(pool, redis_url, consumer)
        read = await killed._read(await killed.streams())  # read, then "killed" before writing
        assert len(read) == RECORDS
        await killed.redis.aclose()
        again = await _writer(pool, redis_url, consumer)
        again.claim_idle_ms = 3_600_000  # no idle claim could explain it
        assert await again.drain() == RECORDS
        assert await _written(db, run) == (RECORDS, RECORDS)
        assert await again.pending() == 0
        await again.redis.aclose()
    finally:
        await pool.close()
