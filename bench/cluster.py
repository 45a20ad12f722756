"""The Redis setups ``make bench`` compares: the embedded single node, and a Redis Cluster of
3 masters + 3 replicas on loopback (``tests/redis_cluster.py``, the test suite's own) with the
hot path's scripts over ModelBridge's lean per-master connections, over redis-py's
``RedisCluster``, and with ``redis.wait_replicas: 1``."""

from __future__ import annotations

from pathlib import Path

from bench.stack import RedisSetup
from tests.redis_cluster import LocalCluster

SETUPS = ("single", "cluster", "cluster-redis-py", "cluster-wait")


def start_cluster(directory: Path) -> LocalCluster:
    return LocalCluster(directory / "redis-cluster").start()


def setup(name: str, cluster: LocalCluster | None) -> RedisSetup:
    if name == "single":
        return RedisSetup()
    assert cluster is not None
    pids = tuple(node.proc.pid for node in cluster.nodes.values())
    script_client = "redis-py" if name == "cluster-redis-py" else "lean"
    wait = 1 if name == "cluster-wait" else 0
    return RedisSetup(name, cluster.url, script_client, wait, pids)
