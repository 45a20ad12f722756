"""Watching which Redis process serves each account: the ``run_id`` of ``INFO server``.

A Redis whose run id changed is another process than the one that took our last settles: it
restarted (with or without its data) or, on a cluster, a replica was promoted in its master's
place (without the writes it had not received yet). :meth:`Incarnations.look` asks, and says
which slots changed hands since it last asked (policies/incarnations.py);
:class:`gateway.metering.meter.Metering` then sends the settles of those slots again
(gateway/metering/recent.py).

On a single node every account is in "slot" 0; on a cluster each master is asked for its run id
and stands for the slots ``CLUSTER SLOTS`` gives it.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from redis import exceptions as redis_errors
from redis.asyncio import Redis, RedisCluster

from policies import incarnations
from policies import keyspace as rk
from policies.slots import SLOTS

log = logging.getLogger("modelbridge.metering")


class Incarnations:
    def __init__(self, redis: Redis, *, cluster: bool, timeout_s: float = 2.0) -> None:
        self.redis = redis
        self.cluster = cluster
        self.timeout_s = timeout_s
        self.view: incarnations.View = []
        self.enabled = True  # False when Redis refuses INFO (then nothing is watched)

    def slot_of(self, account: str) -> int:
        return rk.account_slot(account) if self.cluster else 0

    async def look(self) -> set[int] | None:
        """Ask every master for its run id; the slots whose run id changed since the last look
        (empty when none did, or on the first look); None when Redis could not be asked."""
        if not self.enabled:
            return set()
        try:
            async with asyncio.timeout(self.timeout_s):
                seen = await (self._cluster_view() if self.cluster else self._single_view())
        except redis_errors.ResponseError as exc:
            if "NOPERM" not in str(exc) and "unknown command" not in str(exc).lower():
                return None
            log.warning("Redis refuses INFO (%s): run ids not watched (see recent.py)", exc)
            self.enabled = False
            return set()
        except (redis_errors.RedisError, redis_errors.RedisClusterException, OSError):
            return None  # (TimeoutError is an OSError)
        except (KeyError, IndexError, TypeError, ValueError) as exc:  # an answer we cannot read
            log.warning("cannot read Redis's run ids (%r): not watched", exc)
            self.enabled = False
            return set()
        self.view, moved = incarnations.changed(self.view, seen)
        return moved

    async def _single_view(self) -> incarnations.View:
        info: Any = await self.redis.info("server")
        return [str(info["run_id"])]

    async def _cluster_view(self) -> incarnations.View:
        cluster: Any = self.redis
        assert isinstance(cluster, RedisCluster)
        slots: Any = await cluster.cluster_slots()
        ranges: list[tuple[int, int, str | None]] = []
        asked: dict[tuple[str, int], str | None] = {}
        for (start, end), served in slots.items():
            host, port = served["primary"]
            address = (str(host), int(port))
            if address not in asked:
                asked[address] = await self._run_id(cluster, address)
            ranges.append((int(start), int(end), asked[address]))
        return incarnations.view_of(ranges, SLOTS)

    @staticmethod
    async def _run_id(cluster: RedisCluster, address: tuple[str, int]) -> str | None:
        node = cluster.get_node(host=address[0], port=address[1])
        if node is None:  # a node the client has not met yet (promoted meanwhile): next time
            await cluster.nodes_manager.initialize()
            return None
        try:
            info: Any = await cluster.info("server", target_nodes=node)
        except (redis_errors.ConnectionError, redis_errors.TimeoutError, OSError):
            return None
        return str(info["run_id"])
