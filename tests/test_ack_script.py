"""ack.lua deletes exactly the entries it acknowledges: by a trim below the first entry its group
still needs (pending, or not delivered yet), and one by one above it; the entries of another
consumer that are still pending, and those not delivered yet, stay."""

from __future__ import annotations

from typing import Any

from gateway.metering.scripts import lua_source
from policies import keyspace as rk
from tests.writer_support import OwnRedis

GROUP = rk.USAGE_GROUP
STREAM = rk.AccountKeys("t_acktest").usage_stream


async def _ack(own_redis: OwnRedis, ids: list[str]) -> int:
    script: Any = own_redis.client.register_script(lua_source("ack"))
    args = [GROUP, " ".join(ids), rk.AccountKeys("t_acktest").settled_marker_prefix, "", 120]
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
