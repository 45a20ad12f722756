"""The usage writer over many streams: one read takes at most ``batch`` records whatever the
number of streams (XREADGROUP's COUNT is per stream), and acknowledging hundreds of streams does
not need hundreds of Redis connections at once."""

from __future__ import annotations

import secrets

import asyncpg
import pytest
from redis.asyncio import Redis

from bench.drain import _record, fill
from gateway.metering.usage_writer import UsageWriter
from policies import keyspace as rk
from tests.writer_support import run_records


async def test_one_read_takes_at_most_a_batch_whatever_the_number_of_streams(
    own_stores: tuple[Redis, asyncpg.Pool], db: asyncpg.Connection
) -> None:
    redis, pool = own_stores
    run = secrets.token_hex(3)
    await fill(redis, 2000, 20, run)  # 100 records in each of 20 streams
    writer = UsageWriter(redis, pool, "test-batch", batch=200)
    steps = []
    while moved := await writer.step():
        steps.append(moved)
        assert len(steps) <= 20, steps
    # Not 2000 at once (COUNT 200 for each of the 20 streams named): 200 a step, 10 steps.
    assert steps == [200] * 10
    assert await run_records(db, run) == 2000
    assert await writer.pending() == 0


async def test_acknowledging_600_streams_fits_the_connection_pool(
    own_stores: tuple[Redis, asyncpg.Pool], db: asyncpg.Connection
) -> None:
    # The gateway's Redis client has a pool of 512 connections (gateway/infra/redisconn.py).
    redis, pool = own_stores
    run = secrets.token_hex(3)
    await fill(redis, 600, 600, run)  # one record in each of 600 streams
    writer = UsageWriter(redis, pool, "test-ack")
    assert await writer.step() == 600
    assert await run_records(db, run) == 600
    assert await writer.pending() == 0


@pytest.mark.parametrize("copy_from", [1, 10**9], ids=["copy", "statement"])
async def test_records_postgresql_refuses_are_kept_whole_by_either_insert(
    copy_from: int, own_stores: tuple[Redis, asyncpg.Pool], db: asyncpg.Connection
) -> None:
    redis, pool = own_stores
    run = secrets.token_hex(3)
    await fill(redis, 6, 1, run)  # and three records PostgreSQL refuses:
    account = f"t_bench{run}0000"
    stream = rk.AccountKeys(account).usage_stream
    too_big = {**_record(100, account, run), "prompt_tokens": str(2**40)}  # beyond integer
    unknown = {**_record(101, account, run), "usage_source": "guessed"}  # the CHECK refuses
    huge = {**_record(102, account, run), "list_cost": str(2**70)}  # beyond bigint
    for fields in (too_big, unknown, huge):
        await redis.xadd(stream, fields)  # type: ignore[arg-type]
    writer = UsageWriter(redis, pool, "test-refused")
    writer.copy_from = copy_from
    assert await writer.step() == 9
    assert await run_records(db, run) == 6
    refused = await db.fetch(
        "SELECT fields->>'request_id' AS id FROM usage_rejects WHERE stream = $1 ORDER BY 1",
        stream,
    )
    assert [r["id"] for r in refused] == [f"req_{run}_{n}" for n in (100, 101, 102)]
    assert await writer.pending() == 0


async def test_a_stream_gone_from_redis_is_not_made_again_from_the_list_kept(
    own_stores: tuple[Redis, asyncpg.Pool], db: asyncpg.Connection
) -> None:
    # The stream list is asked for once a second, not on every step; a stream that disappeared
    # meanwhile (a Redis that lost its state) must not come back with an empty group.
    redis, pool = own_stores
    run = secrets.token_hex(3)
    await fill(redis, 2, 2, run)
    writer = UsageWriter(redis, pool, "test-gone")
    writer.list_every_s = 3600.0
    assert await writer.step() == 2
    gone = rk.AccountKeys(f"t_bench{run}0001").usage_stream
    await redis.srem(rk.usage_registry(f"t_bench{run}0001"), gone)
    await redis.delete(gone)
    assert await writer.step() == 0  # read from the list kept: NOGROUP, the list asked again
    assert await redis.exists(gone) == 0
    assert await writer.step() == 0
    assert gone not in writer._streams
    assert await redis.exists(gone) == 0


async def test_a_settle_marker_lives_only_a_short_while_once_its_record_is_in_postgresql(
    own_stores: tuple[Redis, asyncpg.Pool], db: asyncpg.Connection
) -> None:
    """settle.lua's marker (a day) guards against a settle sent twice; once the writer has the
    record in PostgreSQL, every replay is dropped by its ledger check, so ack.lua leaves the
    marker RID_AFTER_LEDGER_S, never more; a marker whose record is not written keeps its day."""
    redis, pool = own_stores
    run = secrets.token_hex(3)
    await fill(redis, 6, 2, run)  # req_<run>_0..5 over two accounts
    accounts = [f"t_bench{run}{i:04d}" for i in range(2)]
    markers = [rk.AccountKeys(accounts[n % 2]).settled_marker(f"req_{run}_{n}") for n in range(6)]
    unwritten = rk.AccountKeys(accounts[0]).settled_marker(f"req_{run}_none")
    short = rk.AccountKeys(accounts[1]).settled_marker(f"req_{run}_5")
    for marker in [*markers, unwritten]:
        await redis.set(marker, "1", ex=rk.RID_TTL_S)
    await redis.expire(short, 30)  # shorter already: never lengthened
    writer = UsageWriter(redis, pool, "test-markers", batch=100)
    while await writer.step():
        pass
    assert await run_records(db, run) == 6
    for marker in markers[:5]:
        assert 0 < await redis.ttl(marker) <= rk.RID_AFTER_LEDGER_S, marker
    assert 0 < await redis.ttl(short) <= 30
    assert await redis.ttl(unwritten) > rk.RID_TTL_S - 60
