"""The fault suite (``make chaos``): ``modelbridge serve --workers 2`` on a PostgreSQL and a Redis of
its own, under traffic, while a worker, the usage writer, Redis, PostgreSQL and the provider fail
one at a time. After each fault the checks of :mod:`tests.chaos` run and make one row of the
table printed at the end (and kept in the README), with the recovery figures.

Runs with ``MODELBRIDGE_CHAOS=1`` (``make chaos``); ``make test`` skips it (it takes minutes).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path

import aiohttp
import pytest
from redis.asyncio import Redis

from tests import chaos
from tests.chaos import Row, Stack, Traffic, check, funded, until
from tests.fake_upstream import FakeUpstream
from tests.faults import PostgresServer, RedisServer

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("MODELBRIDGE_CHAOS"), reason="make chaos"),
]

ROWS: list[Row] = []


@dataclass
class World:
    stack: Stack
    pg: PostgresServer
    redis: RedisServer
    http: aiohttp.ClientSession
    fake: FakeUpstream

    async def traffic(self) -> tuple[str, Traffic]:
        await self.stack.healthy(self.http)
        assert self.stack.gw is not None
        account, secret = await funded(self.http, self.stack.gw.base)
        return account, Traffic(self.http, self.stack.gw.v1, secret)

    async def check(self, fault: str, traffic: Traffic, account: str, note: str = "") -> Row:
        row = await check(fault, traffic, account, self.pg.url, self.redis.url, note)
        ROWS.append(row)
        return row


@pytest.fixture(scope="module")
async def world(fake: FakeUpstream, http: aiohttp.ClientSession) -> AsyncIterator[World]:
    # Not under pytest's basetemp: another pytest run resets its mode to 0700, and PostgreSQL
    # (run as its own user when we are root) must reach its data directory.
    directory = Path(tempfile.mkdtemp(prefix="mb-chaos-"))
    pg = PostgresServer(directory / "pg")
    pg.start()
    redis = RedisServer(directory / "redis", persistent=True)
    redis.start()
    stack = Stack(directory, fake.base_url, pg.url, redis.url)
    await stack.start(http)
    try:
        yield World(stack, pg, redis, http, fake)
    finally:
        await stack.stop()
        redis.stop()
        pg.close()
        shutil.rmtree(directory, ignore_errors=True)
        print("\n\nFault suite\n\n" + chaos.table(ROWS) + "\n")
        (Path(__file__).resolve().parent.parent / "chaos-results.md").write_text(
            chaos.table(ROWS) + "\n"
        )


async def _in_flight(
    world: World,
    traffic: Traffic,
    n: int,
    stream: bool,
    fault: Callable[[], Awaitable[None]],
    after_s: float,
    **behaviour: object,
) -> None:
    """``n`` requests at once (each on its own connection), ``fault`` while they are in flight."""
    sent = [asyncio.create_task(traffic.one(stream, **behaviour)) for _ in range(n)]
    await asyncio.sleep(after_s)
    await fault()
    await asyncio.gather(*sent)


async def _replaced(world: World, before: set[int], kind: str) -> str:
    """Poll (from the kill on) until a process that was not there before serves as ``kind``
    (a worker: listens on the port, two of them again)."""

    async def found() -> bool:
        if kind == "worker":
            now = {p.pid for p in world.stack.workers()}
            return len(now) >= len(before) and bool(now - before)
        writer = world.stack.writer()
        return writer is not None and writer.pid not in before

    took = await until(found, 20, interval=0.01)
    return f"{kind} replaced in {took:.2f}s" if took is not None else f"{kind} NOT replaced"


@pytest.mark.parametrize("stream", [False, True], ids=["mid-plain", "mid-stream"])
async def test_worker_killed(world: World, stream: bool) -> None:
    account, traffic = await world.traffic()
    workers = world.stack.workers()
    victim = workers[0]
    replaced: list[asyncio.Task[str]] = []

    async def kill() -> None:
        victim.send_signal(signal.SIGKILL)
        replaced.append(asyncio.create_task(_replaced(world, {p.pid for p in workers}, "worker")))

    behaviour = {"chunk_delay_s": 0.3} if stream else {"delay_s": 1.0}
    await _in_flight(world, traffic, 8, stream, kill, 0.5, **behaviour)
    note = await replaced[0]
    for _ in range(4):
        await traffic.one(stream)
    row = await world.check(
        f"kill -9 worker {'mid-stream' if stream else 'mid-plain'}", traffic, account, note
    )
    assert row.passed, row
    assert "NOT" not in note, "a dead worker must be replaced (the supervisor's job)"


async def test_writer_killed(world: World) -> None:
    account, traffic = await world.traffic()
    writer = world.stack.writer()
    assert writer is not None
    traffic.start(2)
    await asyncio.sleep(2)
    writer.send_signal(signal.SIGKILL)
    await asyncio.sleep(3)
    await traffic.stop()
    note = await _replaced(world, {writer.pid}, "writer")
    if "NOT" in note:  # records wait in Redis for a writer: start the gateway again
        await world.stack.stop()
        await world.stack.start(world.http)
        note += "; gateway restarted"
    row = await world.check("kill -9 usage writer", traffic, account, note)
    assert row.passed, row
    assert "NOT" not in note, "a dead usage writer must be replaced (the supervisor's job)"


@pytest.mark.parametrize("persistent", [False, True], ids=["no-persistence", "aof"])
async def test_redis_restarted_under_streams(world: World, persistent: bool) -> None:
    account, traffic = await world.traffic()

    async def restart() -> None:
        (world.redis.restart if persistent else world.redis.wipe_restart)()

    await _in_flight(world, traffic, 6, True, restart, 0.8, chunk_delay_s=0.3)
    for stream in (False, True, False):
        await traffic.one(stream)
    fault = f"Redis restarted under streams ({'AOF' if persistent else 'no persistence'})"
    row = await world.check(fault, traffic, account)
    assert row.passed, row


async def test_redis_unreachable_10s(world: World) -> None:
    account, traffic = await world.traffic()
    traffic.start(3)
    await asyncio.sleep(1.5)
    world.redis.stop()
    await asyncio.sleep(10)
    world.redis.start()
    back = time.monotonic()
    probe = Traffic(traffic.http, traffic.v1, traffic.secret)
    while (await probe.one(False)).status != 200 and time.monotonic() - back < 30:
        await asyncio.sleep(0.05)
    first = time.monotonic() - back
    await asyncio.sleep(1.5)
    await traffic.stop()
    traffic.outcomes += probe.outcomes
    traffic.ended_at = max(traffic.ended_at, probe.ended_at)
    row = await world.check(
        "Redis unreachable 10 s", traffic, account, f"first 200 {first:.2f}s after Redis is back"
    )
    assert row.passed, row


@pytest.mark.parametrize("fault", ["stopped", "frozen"])
async def test_postgresql_outage(world: World, fault: str) -> None:
    account, traffic = await world.traffic()
    traffic.start(3)
    await asyncio.sleep(1)
    seconds = 30 if fault == "stopped" else 20
    (world.pg.stop_server if fault == "stopped" else world.pg.freeze)()
    await asyncio.sleep(seconds)
    await traffic.stop()
    redis = Redis.from_url(world.redis.url, decode_responses=True)
    stream = chaos.rk.AccountKeys(account).usage_stream
    backlog = int(await redis.xlen(stream))
    (world.pg.start_server if fault == "stopped" else world.pg.thaw)()
    took = await until(lambda: _empty(redis, stream), 60, interval=0.02)
    await redis.aclose()
    note = (
        f"backlog of {backlog} written {took:.2f}s after PostgreSQL is back"
        if took
        else "backlog NOT written"
    )
    row = await world.check(f"PostgreSQL {fault} {seconds} s", traffic, account, note)
    assert row.passed and took is not None and took < 5, row


async def _empty(redis: Redis, stream: str) -> bool:
    return int(await redis.xlen(stream)) == 0


PROVIDER_FAULTS = {
    "provider 5xx": {"status": 500},
    "provider 429": {"status": 429},
    "provider hangs": {"hang": True},
    "provider resets mid-stream": {"drop_after": 3},
    "provider trickles": {"chunk_delay_s": 0.3, "delay_s": 0.5},
    "provider malformed JSON": {"malformed": True},
    "provider omits usage": {"omit_usage": True},
}


@pytest.mark.parametrize("fault", list(PROVIDER_FAULTS))
async def test_provider_fault(world: World, fault: str) -> None:
    account, traffic = await world.traffic()
    behaviour = PROVIDER_FAULTS[fault]
    sent = [traffic.one(stream, **behaviour) for stream in (False, True) * 3]
    outcomes = await asyncio.gather(*sent)
    statuses = sorted({str(o.status) for o in outcomes})
    row = await world.check(fault, traffic, account, "statuses " + "/".join(statuses))
    assert row.passed, row
