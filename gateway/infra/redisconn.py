"""Connecting to Redis: a single node or a Redis Cluster, told apart by asking.

``MODELBRIDGE_REDIS_URL`` may name any node of a cluster. :func:`open_redis` asks that node
``INFO cluster``: with ``cluster_enabled:1`` the management client is redis-py's ``RedisCluster``
(it discovers the other nodes and routes each command by its key's slot; pipelines are split
per node) and the hot path's script connection is a
:class:`~gateway.metering.clusterclient.ClusterScriptClient` (one lean connection per master);
otherwise a plain ``Redis`` and one :class:`~gateway.metering.scriptclient.ScriptClient`.
``redis.script_client: redis-py`` sends the hot path's scripts through the management client
instead (kept for the benchmark that chose the lean one, see the README).

A unix socket is named ``unix:///path/redis.sock?db=N`` (redis-py's spelling) or
``redis+unix://...`` (the same, as other clients spell it): both connections then use it. A
cluster is reached over TCP only (its nodes announce TCP addresses).

A node that refuses our credentials stops the start with :class:`RedisUnusable`, a one-line
message. A Redis that does not answer at start is taken for a single node (logged): /readyz says
it is down until it answers.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, cast

from redis import exceptions as redis_errors
from redis.asyncio import Redis, RedisCluster

from gateway.metering.clusterclient import ClusterScriptClient
from gateway.metering.scriptclient import Endpoint, ScriptClient, ScriptConnection

log = logging.getLogger("modelbridge.redis")

_CLIENT_OPTIONS: dict[str, Any] = {
    "decode_responses": True,
    "socket_connect_timeout": 2,
    "socket_timeout": 5,
    "health_check_interval": 30,
    "max_connections": 512,
}


class RedisUnusable(RuntimeError):
    """Redis answered but cannot be used as configured (credentials refused)."""


@dataclass
class RedisLink:
    """The gateway's connections to Redis, however many nodes it has."""

    client: Redis  # a RedisCluster on a cluster: same commands for what the gateway uses
    cluster: bool
    url: str  # the configured node

    @property
    def where(self) -> str:
        return where(self.url)

    scripts: ScriptConnection | None  # the hot path's lean connection; None: through `client`

    async def close(self) -> None:
        if self.scripts is not None:
            await self.scripts.close()
        await self.client.aclose()


def where(url: str) -> str:
    endpoint = Endpoint.from_url(url)
    return endpoint.where if endpoint is not None else url.split("@")[-1]


def redis_py_url(url: str) -> str:
    """``url`` as redis-py reads it (it knows ``unix://``, not ``redis+unix://``)."""
    return "unix://" + url.removeprefix("redis+unix://") if url.startswith("redis+unix://") else url


async def is_cluster(url: str) -> bool:
    """Ask the node ``url`` names whether it runs in cluster mode."""
    probe = Redis.from_url(redis_py_url(url), socket_connect_timeout=2, socket_timeout=5)
    try:
        info = await probe.info("cluster")
    except redis_errors.AuthenticationError as exc:
        raise RedisUnusable(f"Redis at {where(url)} refused our credentials: {exc}") from None
    except redis_errors.ResponseError as exc:
        if str(exc).startswith(("NOAUTH", "WRONGPASS", "NOPERM")):
            raise RedisUnusable(f"Redis at {where(url)} refused our credentials: {exc}") from None
        raise
    except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError) as exc:
        log.warning("Redis at %s does not answer (%s): taken for a single node", where(url), exc)
        return False
    finally:
        await probe.aclose()
    return int(info.get("cluster_enabled", 0)) == 1


async def open_redis(
    url: str, *, script_client: str = "lean", wait_replicas: int = 0, wait_timeout_ms: int = 100
) -> RedisLink:
    """The management client and the hot path's script connection; with ``wait_replicas`` every
    write of the script connection is confirmed by that many replicas (``WAIT``)."""
    waits = {"wait_replicas": wait_replicas, "wait_timeout_ms": wait_timeout_ms}
    cluster = await is_cluster(url)
    endpoint = Endpoint.from_url(url)
    lean = script_client == "lean" and endpoint is not None
    if cluster:
        lean = lean and endpoint is not None and endpoint.path is None
        cluster_client = RedisCluster.from_url(url, require_full_coverage=False, **_CLIENT_OPTIONS)
        try:  # learn the nodes now (pub/sub needs them); /readyz tells why when it cannot
            await cluster_client.initialize()
        except (redis_errors.RedisError, redis_errors.RedisClusterException, IndexError) as exc:
            log.warning("Redis Cluster at %s: cannot read its slot map yet: %r", where(url), exc)
        client = cast(Redis, cluster_client)
        scripts: ScriptConnection | None = (
            ClusterScriptClient(endpoint, **waits) if lean and endpoint is not None else None
        )
        log.info("Redis Cluster at %s", where(url))
    else:
        client = Redis.from_url(redis_py_url(url), **_CLIENT_OPTIONS)
        scripts = ScriptClient(endpoint, **waits) if lean and endpoint is not None else None
    return RedisLink(client, cluster, url, scripts)


async def cluster_problem(link: RedisLink) -> str | None:
    """Why a cluster cannot serve every account (unassigned or failed slots), else None. Asks
    any node the cluster client knows, else (it could not learn the cluster: no slot at all is
    assigned) the configured node itself."""
    try:
        info = await link.client.execute_command(
            "CLUSTER INFO",
            target_nodes=RedisCluster.RANDOM,
        )
    except (redis_errors.RedisError, redis_errors.RedisClusterException, IndexError, OSError):
        async with Redis.from_url(
            redis_py_url(link.url), socket_connect_timeout=2, socket_timeout=2
        ) as seed:
            info = await seed.execute_command("CLUSTER INFO")
    if isinstance(info, bytes):
        info = info.decode()
    if isinstance(info, str):
        info = dict(line.split(":", 1) for line in info.split() if ":" in line)
    state = str(info.get("cluster_state", "?"))
    assigned = int(info.get("cluster_slots_assigned", 0))
    failing = int(info.get("cluster_slots_fail", 0))
    if state == "ok" and assigned == 16384 and failing == 0:
        return None
    return (
        f"redis: cluster at {link.where} cannot serve every slot (cluster_state:{state}, "
        f"{assigned} of 16384 slots assigned, {failing} failing)"
    )
