"""The usage writer over many streams: one read takes at most ``batch`` records whatever the
number of streams (XREADGROUP's COUNT is per stream), and acknowledging hundreds of streams does
not need hundreds of Redis connections at once."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis

from bench.drain import fill
from gateway.infra.db import create_pool, migrate_dsn
from gateway.metering.usage_writer import UsageWriter
from tests.faults import RedisServer


@pytest.fixture
async def own_redis(tmp_path: Path, database_url: str) -> AsyncIterator[str]:
    """A Redis of this test's own: no gateway's writer takes its streams."""
    await migrate_dsn(database_url)
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server.url
    server.stop()


async def _records(db: asyncpg.Connection, run: str) -> int:
    return int(
        await db.fetchval(
            "SELECT count(*) FROM usage_records WHERE request_id LIKE $1", f"req_{run}_%"
        )
    )


async def test_one_read_takes_at_most_a_batch_whatever_the_number_of_streams(
    database_url: str, own_redis: str, db: asyncpg.Connection
) -> None:
    redis = Redis.from_url(own_redis, decode_responses=True)
    pool = await create_pool(database_url, min_size=1, max_size=2)
    run = secrets.token_hex(3)
    try:
        await fill(redis, 2000, 20, run)  # 100 records in each of 20 streams
        writer = UsageWriter(redis, pool, "test-batch", batch=200)
        steps = []
        while moved := await writer.step():
            steps.append(moved)
            assert len(steps) <= 20, steps
        # Not 2000 at once (COUNT 200 for each of the 20 streams named): 200 a step, 10 steps.
        assert steps == [200] * 10
        assert await _records(db, run) == 2000
        assert await writer.pending() == 0
    finally:
        await redis.aclose()
        await pool.close()


async def test_acknowledging_600_streams_fits_the_connection_pool(
    database_url: str, own_redis: str, db: asyncpg.Connection
) -> None:
    # The gateway's Redis client has a pool of 512 connections (gateway/infra/redisconn.py).
    redis = Redis.from_url(own_redis, decode_responses=True, max_connections=512)
    pool = await create_pool(database_url, min_size=1, max_size=2)
    run = secrets.token_hex(3)
    try:
        await fill(redis, 600, 600, run)  # one record in each of 600 streams
        writer = UsageWriter(redis, pool, "test-ack")
        assert await writer.step() == 600
        assert await _records(db, run) == 600
        assert await writer.pending() == 0
    finally:
        await redis.aclose()
        await pool.close()
