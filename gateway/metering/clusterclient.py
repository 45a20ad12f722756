"""The hot path's script connection on a Redis Cluster: one lean pipelined connection
(:class:`ScriptClient`) per master, each script sent to the master of its account's slot.

Every script names keys of one billing account only, so its slot is the CRC16 of the account's
hash tag (:func:`policies.slots.key_slot` of its first key). The slot map comes from
``CLUSTER SLOTS`` (asked of any node that answers, the configured one first) and is asked again
when it proves stale:

* ``MOVED <slot> <host:port>``: the slot lives elsewhere now; the call is sent there and the
  whole map is refreshed (a failover or a resharding moves many slots at once);
* ``ASK <slot> <host:port>``: the slot is being migrated and this key is already on the target;
  the call is sent there once, after ``ASKING``, and the map stays;
* a lost or refused connection to a master (it died): the waiting calls fail at once (503
  ``gateway_unavailable``, never an unmetered answer) and the map is refreshed — at most every
  ``refresh_every_s`` while it keeps failing — until the cluster has promoted a replica; the next
  call for those slots then goes to the new master, with no restart;
* ``CLUSTERDOWN`` / ``TRYAGAIN``: the cluster cannot serve the slot right now: 503, refresh.

Calls for one account go over one connection in the order they were sent (the settle written
before a client is answered runs before that client's next hold), as with a single node; only a
slot moving between the two breaks that order, which a resharding or failover may do anyway.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from typing import Any

import hiredis

from gateway.metering.scriptclient import Endpoint, ScriptClient, ScriptError
from policies.slots import SLOTS, key_slot

log = logging.getLogger("modelbridge.redis")

Address = tuple[str, int]
MAX_REDIRECTS = 5
SLOT_CACHE_MAX = 100_000
_KEYED = {"EVALSHA", "EVAL", "EVALSHA_RO", "EVAL_RO", "FCALL", "FCALL_RO"}


def routing_key(args: tuple[Any, ...]) -> Any:
    """The first key of a script call (``EVALSHA sha numkeys key ...``), else None."""
    if len(args) > 3 and str(args[0]).upper() in _KEYED and int(args[2]) > 0:
        return args[3]
    return None


def redirect(message: str) -> tuple[str, int, Address] | None:
    """``MOVED 3999 127.0.0.1:6381`` -> ("MOVED", 3999, ("127.0.0.1", 6381)); else None."""
    parts = message.split()
    if len(parts) != 3 or parts[0] not in ("MOVED", "ASK"):
        return None
    host, _, port = parts[2].rpartition(":")
    return parts[0], int(parts[1]), (host, int(port))


def parse_slots(reply: list[Any], asked: Address) -> tuple[list[Address | None], set[Address]]:
    """A ``CLUSTER SLOTS`` reply -> (owner of each slot, every node named)."""
    owners: list[Address | None] = [None] * SLOTS
    nodes: set[Address] = set()
    for entry in reply:
        start, end = int(entry[0]), int(entry[1])
        master: Address | None = None
        for i, node in enumerate(entry[2:]):
            host = str(node[0]) or asked[0]  # an empty host: the node we asked
            address = (host, int(node[1]))
            nodes.add(address)
            if i == 0:
                master = address
        owners[start : end + 1] = [master] * (end - start + 1)
    return owners, nodes


class ClusterScriptClient:
    """Same calls as :class:`ScriptClient` (``call``, ``call_now``, ``reply``, ``close``)."""

    def __init__(
        self,
        seed: Endpoint,
        *,
        timeout_s: float = 5.0,
        refresh_every_s: float = 0.05,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
    ) -> None:
        self.seed = seed
        self.timeout_s = timeout_s
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self.refresh_every_s = refresh_every_s
        self.refreshes = 0
        self._owner: list[Address | None] = [None] * SLOTS
        self._known: list[Address] = [(seed.host, seed.port)]
        self._nodes: dict[Address, ScriptClient] = {}
        self._probes: dict[Address, ScriptClient] = {}
        self._slots: dict[Any, int] = {}
        self._refreshing: asyncio.Task[None] | None = None
        self._refreshed_at = -1e9

    # --- the slot map ------------------------------------------------------------------------
    def slot(self, key: Any) -> int:
        slot = self._slots.get(key)
        if slot is None:
            if len(self._slots) >= SLOT_CACHE_MAX:
                self._slots.clear()
            slot = self._slots[key] = key_slot(key)
        return slot

    def owner(self, slot: int) -> Address | None:
        return self._owner[slot]

    def node(self, address: Address) -> ScriptClient:
        client = self._nodes.get(address)
        if client is None:
            seed = self.seed
            endpoint = Endpoint(address[0], address[1], 0, seed.username, seed.password)
            client = self._nodes[address] = ScriptClient(
                endpoint,
                timeout_s=self.timeout_s,
                wait_replicas=self.wait_replicas,
                wait_timeout_ms=self.wait_timeout_ms,
            )
        return client

    def _probe(self, address: Address) -> ScriptClient:
        """A connection to ask ``address`` for the slot map: the script connection, unless that
        one waits for replicas (WAIT is refused by a replica, which may well be asked)."""
        if self.wait_replicas == 0:
            return self.node(address)
        client = self._probes.get(address)
        if client is None:
            seed = self.seed
            endpoint = Endpoint(address[0], address[1], 0, seed.username, seed.password)
            client = self._probes[address] = ScriptClient(endpoint, timeout_s=self.timeout_s)
        return client

    async def refresh(self) -> None:
        """Ask the cluster for its slot map (one ask at a time; callers share it)."""
        task = self._refreshing
        if task is None or task.done():
            task = self._refreshing = asyncio.ensure_future(self._refresh())
        await asyncio.shield(task)

    def stale(self) -> None:
        """The map proved wrong: refresh it in the background (now, or once the interval since
        the last refresh has passed)."""
        if self._refreshing is None or self._refreshing.done():
            self._refreshing = asyncio.ensure_future(self._refresh())
            self._refreshing.add_done_callback(_quiet)

    async def _refresh(self) -> None:
        wait = self._refreshed_at + self.refresh_every_s - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)
        self._refreshed_at = time.monotonic()
        self.refreshes += 1
        errors: list[str] = []
        for address in list(self._known):
            try:
                reply = await self._probe(address).call("CLUSTER", "SLOTS")
            except (OSError, ScriptError) as exc:
                errors.append(f"{address[0]}:{address[1]}: {exc}")
                continue
            owners, nodes = parse_slots(reply, address)
            self._owner = owners
            seed = (self.seed.host, self.seed.port)
            self._known = [address, *sorted((nodes | {seed}) - {address})]  # who answered first
            for pool in (self._nodes, self._probes):
                for gone in set(pool) - nodes - {seed}:
                    await pool.pop(gone).close()
            return
        raise ConnectionError("no Redis Cluster node answered: " + "; ".join(errors))

    # --- calls -------------------------------------------------------------------------------
    async def call(self, *args: Any) -> Any:
        key = routing_key(args)
        if key is None:
            return await self._everywhere(args)
        slot = self.slot(key)
        asking: Address | None = None
        for _ in range(MAX_REDIRECTS):
            address = asking or self._owner[slot]
            if address is None:
                await self.refresh()
                address = self._owner[slot]
                if address is None:
                    raise ConnectionError(f"slot {slot} is served by no Redis Cluster master")
            try:
                if asking is not None:
                    asking = None
                    return await self.node(address).call_asking(*args)
                return await self.node(address).call(*args)
            except ScriptError as exc:
                moved = redirect(str(exc))
                if moved is None:
                    if str(exc).startswith(("CLUSTERDOWN", "TRYAGAIN")):
                        self.stale()
                    raise
                kind, moved_slot, target = moved
                if kind == "ASK":
                    asking = target
                else:
                    self._owner[moved_slot] = target
                    self.stale()
            except OSError:
                self.stale()  # the master is gone: find who serves its slots now
                raise
        raise ConnectionError(f"slot {slot}: more than {MAX_REDIRECTS} redirections")

    async def _everywhere(self, args: tuple[Any, ...]) -> Any:
        """A call naming no key (``SCRIPT LOAD``, ``PING``): to every master, first reply."""
        masters = {a for a in self._owner if a is not None}
        if not masters:
            await self.refresh()
            masters = {a for a in self._owner if a is not None}
            if not masters:
                raise ConnectionError("no Redis Cluster master serves any slot")
        replies = await asyncio.gather(*(self.node(a).call(*args) for a in sorted(masters)))
        return replies[0]

    def call_now(self, *args: Any) -> asyncio.Future[Any] | None:
        """Send a script call now to its slot's master when that connection is open, else None
        (then :meth:`call` it: that opens connections and learns the slot map)."""
        key = routing_key(args)
        if key is None:
            return None
        address = self._owner[self.slot(key)]
        if address is None:
            return None
        node = self._nodes.get(address)
        return None if node is None else node.call_now(*args)

    async def reply(self, waiter: asyncio.Future[Any]) -> Any:
        try:
            reply = await waiter
        except OSError:
            self.stale()
            raise
        if isinstance(reply, hiredis.ReplyError):
            moved = redirect(str(reply))
            if moved is not None and moved[0] == "MOVED":
                self._owner[moved[1]] = moved[2]
                self.stale()
            elif str(reply).startswith(("CLUSTERDOWN", "TRYAGAIN")):
                self.stale()
            raise ScriptError(str(reply))
        return reply

    async def close(self) -> None:
        if self._refreshing is not None:
            self._refreshing.cancel()
            with contextlib.suppress(BaseException):
                await self._refreshing
        for client in [*self._nodes.values(), *self._probes.values()]:
            await client.close()
        self._nodes.clear()
        self._probes.clear()


def _quiet(task: asyncio.Task[None]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.warning("Redis Cluster slot map refresh failed: %s", task.exception())
