"""The hot path's script connection on a real Redis Cluster: routing by slot, MOVED and ASK,
WAIT for a replica; and what a cluster that cannot serve, or refuses us, does to the gateway."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import redis as sync_redis

from gateway.metering.clusterclient import ClusterScriptClient, parse_slots, redirect
from gateway.metering.scriptclient import Endpoint, ReplicaTimeout, ScriptError
from policies.slots import key_slot
from tests.conftest import gateway_config, start_gateway
from tests.processes import REPO, write_config
from tests.redis_cluster import HOST, LocalCluster

INCR = "return redis.call('INCRBY', KEYS[1], ARGV[1])"


def test_redirect_and_slot_map_parsing() -> None:
    assert redirect("MOVED 3999 127.0.0.1:6381") == ("MOVED", 3999, ("127.0.0.1", 6381))
    assert redirect("ASK 1 ::1:7000") == ("ASK", 1, ("::1", 7000))
    assert redirect("ERR something") is None
    owners, nodes = parse_slots(
        [[0, 9, ["", 7000, "a"], ["10.0.0.2", 7003, "b"]], [10, 16383, ["h", 7001, "c"]]],
        ("h0", 7000),
    )
    assert owners[0] == owners[9] == ("h0", 7000)
    assert owners[10] == owners[16383] == ("h", 7001)
    assert nodes == {("h0", 7000), ("10.0.0.2", 7003), ("h", 7001)}


def _client(cluster: LocalCluster, **kwargs: int) -> ClusterScriptClient:
    endpoint = Endpoint.from_url(cluster.url)
    assert endpoint is not None
    return ClusterScriptClient(endpoint, **kwargs)


def _keys_on_every_master(cluster: LocalCluster, per_master: int = 3) -> dict[int, list[str]]:
    found: dict[int, list[str]] = {port: [] for port in cluster.master_ports()}
    i = 0
    while any(len(keys) < per_master for keys in found.values()):
        key = f"{{acct:t_test{i}}}:n"
        owner = cluster.slot_owner(key_slot(key))
        if len(found[owner]) < per_master:
            found[owner].append(key)
        i += 1
    return found


@pytest.mark.cluster_only
@pytest.mark.cluster
async def test_scripts_go_to_the_master_of_their_slot(redis_cluster: LocalCluster) -> None:
    client = _client(redis_cluster)
    try:
        by_master = _keys_on_every_master(redis_cluster)
        keys = [k for keys in by_master.values() for k in keys]
        replies = await asyncio.gather(*(client.call("EVAL", INCR, 1, k, 5) for k in keys))
        assert replies == [5] * len(keys)
        for port, owned in by_master.items():  # each key was written on its own master
            with sync_redis.Redis(host=HOST, port=port) as node:
                for key in owned:
                    assert node.execute_command("GET", key) == b"5"
                    assert client.owner(key_slot(key)) == (HOST, port)
        # call_now is the open connection of the slot's master
        sent = client.call_now("EVAL", INCR, 1, keys[0], 1)
        assert sent is not None
        assert await client.reply(sent) == 6
    finally:
        await client.close()


@pytest.mark.cluster_only
@pytest.mark.cluster
async def test_a_stale_slot_map_is_corrected_by_moved(redis_cluster: LocalCluster) -> None:
    client = _client(redis_cluster)
    try:
        key = "{acct:t_moved}:n"
        await client.call("EVAL", INCR, 1, key, 1)
        slot = key_slot(key)
        right = client.owner(slot)
        wrong = next(a for a in {client.owner(s) for s in range(0, 16384, 512)} if a != right)
        client._owner[slot] = wrong  # as if the slot had moved since the map was read
        refreshes = client.refreshes
        assert await client.call("EVAL", INCR, 1, key, 1) == 2
        assert client.owner(slot) == right
        await asyncio.sleep(0.2)
        assert client.refreshes > refreshes  # a MOVED asks for the whole map again
        client._owner[slot] = wrong  # the lean path: the reply says MOVED, the map is fixed
        sent = client.call_now("EVAL", INCR, 1, key, 1)
        assert sent is not None
        with pytest.raises(ScriptError, match=r"^MOVED"):
            await client.reply(sent)
        assert client.owner(slot) == right
    finally:
        await client.close()


def _alone_in_its_slot(redis_cluster: LocalCluster, prefix: str) -> str:
    """A key whose slot holds no other key yet: a migration of that slot can then end (Redis
    refuses to give away a slot whose node still holds keys of it, and the session's other
    tests leave accounts on this cluster, any of which may share a slot with a fixed name)."""
    for i in range(1000):
        key = f"{{acct:{prefix}{i}}}:n"
        slot = key_slot(key)
        with sync_redis.Redis(host=HOST, port=redis_cluster.slot_owner(slot)) as node:
            if node.execute_command("CLUSTER COUNTKEYSINSLOT", slot) == 0:
                return key
    raise AssertionError("no empty slot among 1,000 names")


@pytest.mark.cluster_only
@pytest.mark.cluster
@pytest.mark.parametrize("wait_replicas", [0, 1])
async def test_a_slot_being_migrated_is_followed_with_ask(
    redis_cluster: LocalCluster, wait_replicas: int
) -> None:
    client = _client(redis_cluster, wait_replicas=wait_replicas)
    key = _alone_in_its_slot(redis_cluster, f"t_asked{wait_replicas}_")
    slot = key_slot(key)
    source = redis_cluster.slot_owner(slot)
    target = next(p for p in redis_cluster.master_ports() if p != source)
    with (
        sync_redis.Redis(host=HOST, port=source, decode_responses=True) as src,
        sync_redis.Redis(host=HOST, port=target, decode_responses=True) as dst,
    ):
        src_id, dst_id = src.execute_command("CLUSTER MYID"), dst.execute_command("CLUSTER MYID")
        try:
            assert await client.call("EVAL", INCR, 1, key, 1) == 1
            dst.execute_command("CLUSTER SETSLOT", slot, "IMPORTING", src_id)
            src.execute_command("CLUSTER SETSLOT", slot, "MIGRATING", dst_id)
            src.execute_command("MIGRATE", HOST, target, key, 0, 5000)
            assert await client.call("EVAL", INCR, 1, key, 1) == 2  # ASK: on the target now
            assert client.owner(slot) == (HOST, source)  # an ASK does not change the map
        finally:
            for node in (dst, src):  # the slot ends on the target, as a finished migration
                node.execute_command("CLUSTER SETSLOT", slot, "NODE", dst_id)
            await client.close()
    redis_cluster.wait_ok()
    moved = _client(redis_cluster)
    try:
        assert await moved.call("EVAL", INCR, 1, key, 1) == 3
        assert moved.owner(slot) == (HOST, target)
    finally:
        await moved.close()


@pytest.mark.cluster_only
@pytest.mark.cluster
async def test_wait_replicas_confirms_writes_and_refuses_unconfirmed_ones(
    redis_cluster: LocalCluster,
) -> None:
    client = _client(redis_cluster, wait_replicas=1, wait_timeout_ms=200)
    key = "{acct:t_waited}:n"
    master = redis_cluster.slot_owner(key_slot(key))
    replica = redis_cluster.replica_of(master)
    try:
        replies = await asyncio.gather(*(client.call("EVAL", INCR, 1, key, 1) for _ in range(50)))
        assert sorted(replies) == list(range(1, 51))
        with sync_redis.Redis(host=HOST, port=replica) as rep:
            rep.execute_command("READONLY")
            assert rep.execute_command("GET", key) == b"50"  # confirmed means on the replica
        os.kill(redis_cluster.nodes[replica].proc.pid, signal.SIGSTOP)
        try:
            with pytest.raises(ReplicaTimeout, match="0 of 1 Redis replicas"):
                await client.call("EVAL", INCR, 1, key, 1)
        finally:
            os.kill(redis_cluster.nodes[replica].proc.pid, signal.SIGCONT)
        assert await client.call("EVAL", INCR, 1, key, 1) == 52
    finally:
        await client.close()


@pytest.fixture
async def empty_cluster(tmp_path: Path) -> AsyncIterator[LocalCluster]:
    cluster = LocalCluster(tmp_path / "empty", masters=1, replicas=0, assign=False)
    await asyncio.to_thread(cluster.start)
    yield cluster
    cluster.stop()


@pytest.mark.cluster
async def test_readyz_names_a_cluster_with_unassigned_slots(
    empty_cluster: LocalCluster, database_url: str, http: aiohttp.ClientSession
) -> None:
    gw, runner = await start_gateway(
        gateway_config("http://127.0.0.1:9"), database_url, empty_cluster.url
    )
    try:
        async with http.get(gw.base + "/readyz") as resp:
            assert resp.status == 503
            body = await resp.json()
        port = min(empty_cluster.nodes)
        assert body["down"] == [
            f"redis: cluster at {HOST}:{port} cannot serve every slot (cluster_state:fail, "
            "0 of 16384 slots assigned, 0 failing)"
        ]
    finally:
        await runner.cleanup()


@pytest.mark.cluster
async def test_a_node_that_refuses_our_password_stops_serve_with_one_line(
    tmp_path: Path, database_url: str
) -> None:
    cluster = LocalCluster(tmp_path / "auth", masters=1, replicas=0, password="right")
    await asyncio.to_thread(cluster.start)
    try:
        port = min(cluster.nodes)
        env = {
            **os.environ,
            "MODELBRIDGE_DATABASE_URL": database_url,
            "MODELBRIDGE_REDIS_URL": f"redis://:wrong@{HOST}:{port}/0",
            "MODELBRIDGE_DATA_DIR": str(tmp_path / "data"),
        }
        config = write_config(tmp_path, "http://127.0.0.1:9")
        done = await asyncio.to_thread(
            subprocess.run,
            [sys.executable, "-m", "gateway", "serve", "--config", str(config), "--port", "0"],
            env=env,
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 2
        lines = done.stderr.strip().splitlines()
        assert lines[-1].startswith(f"modelbridge: Redis at {HOST}:{port} refused our credentials")
        assert "Traceback" not in done.stderr
    finally:
        cluster.stop()
