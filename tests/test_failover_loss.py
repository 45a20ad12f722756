"""A Redis Cluster failover that loses the last writes: settles the master acknowledged but had
not replicated (its replica was paused), and whose records the usage writer had not moved yet,
are sent again by the gateway once the slot's run id changed (gateway/metering/recent.py), and
end up exactly once in the ledger, with the rebuilt accounts exact to the nano-dollar.

The replica is paused (SIGSTOP) and its link dropped by the master while the master takes the
settles, then the master is killed and the replica resumed and promoted (``cluster-replica-validity-factor 0``): what an
asynchronous replica a little behind does in a real failover, made certain."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
import signal
from collections.abc import Iterator

import aiohttp
import asyncpg
import pytest
from redis import exceptions as redis_errors
from redis.asyncio import Redis

from gateway import state as S
from gateway.metering.reconcile import Reconciler
from gateway.metering.usage_writer import UsageWriter
from policies import keyspace as rk
from policies.periods import period_of
from tests.conftest import ADMIN_TOKEN, gateway_config, start_gateway
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api, eventually
from tests.redis_cluster import LocalCluster

pytestmark = [
    pytest.mark.cluster,
    pytest.mark.cluster_only,
    pytest.mark.slow,
    pytest.mark.timeout(300),
]

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi there"}]}
COST = 5 * 150 + 6 * 600
TEAMS = 2
LOST = 3  # requests per team settled while the replica is paused


@pytest.fixture
def revive(redis_cluster: LocalCluster) -> Iterator[list[int]]:
    """Nodes to start again after the test (they rejoin as replicas)."""
    killed: list[int] = []
    yield killed
    for port in killed:
        if redis_cluster.nodes[port].proc.poll() is not None:
            redis_cluster.restart(port)
    redis_cluster.wait_ok()


def _drop_replicas(cluster: LocalCluster, port: int) -> None:
    with cluster._client(port) as c:
        c.execute_command("CLIENT", "KILL", "TYPE", "replica")


async def test_settles_lost_in_a_failover_are_billed_once(
    redis_cluster: LocalCluster,
    fake: FakeUpstream,
    database_url: str,
    redis_url: str,
    http: aiohttp.ClientSession,
    db: asyncpg.Connection,
    redis: Redis,
    revive: list[int],
) -> None:
    config = gateway_config(fake.base_url)
    gw, runner = await start_gateway(config, database_url, redis_url, usage_writer=False)
    writer = UsageWriter(redis, gw.app[S.DB], "test-writer")
    try:
        api = Api(http, gw.base, ADMIN_TOKEN)
        seed = int(redis_url.rsplit(":", 1)[1].split("/")[0])
        victim = next(p for p in redis_cluster.master_ports() if p != seed)
        teams: list[tuple[str, str]] = []  # (team id, secret), on the victim's slots
        while len(teams) < TEAMS:
            _, team, secret = await api.funded_team_key("1.00")
            slot = rk.account_slot(rk.team_account(team["id"]))
            if await asyncio.to_thread(redis_cluster.slot_owner, slot) == victim:
                teams.append((team["id"], secret))

        async def plain(secret: str) -> tuple[int, str]:
            async with http.post(
                gw.v1 + "/chat/completions",
                json=BODY,
                headers={"Authorization": f"Bearer {secret}"},
            ) as r:
                return r.status, r.headers.get("x-request-id", "")

        async def billed() -> list[asyncpg.Record]:
            errors = (redis_errors.RedisError, redis_errors.RedisClusterException, OSError)
            with contextlib.suppress(*errors):  # the client learns the new master; next time
                await writer.drain()
            return await db.fetch(
                "SELECT team_id, request_id, charged FROM usage_records"
                " WHERE team_id = ANY($1::text[])",
                [t for t, _ in teams],
            )

        served = [await plain(secret) for _, secret in teams]
        assert len(await eventually(billed, lambda rows: len(rows) == TEAMS)) == TEAMS
        replica = redis_cluster.nodes[await asyncio.to_thread(redis_cluster.replica_of, victim)]
        revive.append(victim)
        os.kill(replica.proc.pid, signal.SIGSTOP)
        try:
            # what the replica was sent so far waits in its socket; what follows does not
            await asyncio.to_thread(_drop_replicas, redis_cluster, victim)
            served += [await plain(secret) for _, secret in teams for _ in range(LOST)]
            await asyncio.to_thread(redis_cluster.kill, victim)
        finally:
            os.kill(replica.proc.pid, signal.SIGCONT)
        assert {status for status, _ in served} == {200}
        await asyncio.to_thread(redis_cluster.wait_ok)

        # Served again by the promoted replica (503 gateway_unavailable meanwhile: not charged).
        for _, secret in teams:
            again = functools.partial(plain, secret)
            served.append(await eventually(again, lambda a: a[0] != 503, 30, 0.1))
        n = len(served)
        await eventually(billed, lambda rows: len(rows) >= n, timeout=30)
        for _, secret in teams:  # loads the accounts the settles sent again unloaded
            served.append(await plain(secret))
        assert {status for status, _ in served} == {200}
        rows = await eventually(billed, lambda rows: len(rows) >= len(served), timeout=30)
        assert sorted(r["request_id"] for r in rows) == sorted(rid for _, rid in served)
        reconciler = Reconciler(gw.app[S.DB], redis, gw.app[S.ACCOUNTS])
        for team_id, _ in teams:
            n = sum(1 for r in rows if r["team_id"] == team_id)
            assert n == 3 + LOST  # before, lost, after the failover, and the one that loads
            assert sum(r["charged"] for r in rows if r["team_id"] == team_id) == n * COST
            ak = rk.AccountKeys(rk.team_account(team_id))
            assert await redis.hmget(ak.state, ["loaded", "credits", "holds"]) == [
                "1",
                str(1_000_000_000 - n * COST),
                "0",
            ]
            period = await redis.hgetall(ak.period(period_of(gw.clock.now())))
            assert (period["spend"], period["req"]) == (str(n * COST), str(n))
            _, differences = await reconciler.check([ak.account], gw.clock.now())
            assert differences == []
    finally:
        await runner.cleanup()
