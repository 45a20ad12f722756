"""What wakes an idle usage writer on a Redis Cluster: Redis's key tracking (the invalidation
messages of client-side caching) used as a doorbell, one connection per master.

On one Redis the idle writer blocks in one ``XREADGROUP`` naming every stream. A cluster refuses
that (a blocking read names the streams of one slot), and a doorbell key written by the settle
would have to live in the account's slot, which no single read could watch either. Instead the
writer keeps one RESP3 connection per master with ``CLIENT TRACKING ON`` and reads each key it
watches there once (``EXISTS``): from then on the first write to that key (a settle's ``XADD``, an
acknowledgement, a registry's ``SADD`` of a new stream, the key migrated away) makes that master
push ``invalidate <key>`` on the connection. Nothing changes on the settle's path: Redis looks
the written key up in its tracking table, as it does for any tracked key.

A key is *armed* from the reply of its ``EXISTS`` until its invalidation (one per reading), the
loss of its connection, or an invalidation of everything (``FLUSHALL``, the server's tracking
table full). So a write to an armed key is never missed, and a write before it was armed is seen
by any read made after :meth:`StreamWatch.arm` returned: the writer arms, steps, and only waits
when arming found nothing new to arm (see ``UsageWriter._wait_on_cluster``).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import hiredis

from gateway.metering.scriptclient import Endpoint, ScriptClient, _Protocol

Address = tuple[str, int]


class TrackingRefused(ConnectionError):
    """A master refused RESP3 or key tracking (older than Redis 6, or an ACL without them)."""


def _packed(*args: Any) -> bytes:
    return hiredis.pack_command(args)


class _TrackingProtocol(_Protocol):
    """A :class:`ScriptClient` connection whose push messages (RESP3 ``>``) go to ``on_push``
    instead of a waiting call, and whose loss is told to ``on_lost``."""

    def __init__(
        self,
        timeout_s: float,
        on_push: Callable[[_TrackingProtocol, Any], None],
        on_lost: Callable[[_TrackingProtocol], None],
    ) -> None:
        super().__init__(timeout_s)
        self.on_push = on_push
        self.on_lost = on_lost

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            if isinstance(reply, hiredis.PushNotification):
                self.on_push(self, reply)
                continue
            waiter = self.waiters.popleft()
            self.sent_at.popleft()
            if not waiter.done():
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        super().connection_lost(exc)
        self.on_lost(self)


class _TrackingClient(ScriptClient):
    """One master's tracking connection: opened (``AUTH``, then ``HELLO 3`` and ``CLIENT
    TRACKING ON``) on first use and again after it was lost."""

    def __init__(self, endpoint: Endpoint, watch: StreamWatch, timeout_s: float) -> None:
        super().__init__(endpoint, timeout_s=timeout_s)
        self.address: Address = (endpoint.host, endpoint.port)
        self.watch = watch

    def _new_protocol(self) -> _Protocol:
        return _TrackingProtocol(self.timeout_s, self.watch._pushed, self.watch._lost)

    async def _open(self) -> _Protocol:
        protocol = await super()._open()
        setup: list[tuple[Any, ...]] = [("HELLO", 3), ("CLIENT", "TRACKING", "ON")]
        for command in setup:
            reply = await protocol.send(hiredis.pack_command(command))
            if isinstance(reply, hiredis.ReplyError):
                protocol.close()
                said = f"Redis {self.endpoint.where} refused {' '.join(map(str, command))}: {reply}"
                if str(reply).startswith(("NOPERM", "ERR")):  # not LOADING, BUSY and the like
                    raise TrackingRefused(said)
                raise ConnectionError(said)
        self.watch._opened(protocol, self.address)
        return protocol


class StreamWatch:
    """Keys watched on their masters; :attr:`rung` is set when one of them was written (or
    may have been: a connection lost, everything invalidated)."""

    def __init__(
        self, username: str | None, password: str | None, *, timeout_s: float = 5.0
    ) -> None:
        self.username = username
        self.password = password
        self.timeout_s = timeout_s
        self.rung = asyncio.Event()
        self._clients: dict[Address, _TrackingClient] = {}
        self._armed: dict[str, Address] = {}  # key -> the master it is tracked on
        self._where: dict[int, Address] = {}  # id of a live connection -> its master

    @property
    def armed(self) -> dict[str, Address]:
        return dict(self._armed)

    def _client(self, address: Address) -> _TrackingClient:
        client = self._clients.get(address)
        if client is None:
            endpoint = Endpoint(address[0], address[1], 0, self.username, self.password)
            client = self._clients[address] = _TrackingClient(endpoint, self, self.timeout_s)
        return client

    async def arm(self, owners: dict[str, Address]) -> int:
        """Track each key (``owners``: key -> its master now) that is not armed on that master
        yet, all masters at once; how many were armed now. Raises what a master's connection
        raised, or :class:`ConnectionError` for a key its master refused (``MOVED``: the slot
        map is stale); the keys that were armed stay armed."""
        for gone in set(self._armed) - set(owners):  # a stream no longer listed
            del self._armed[gone]
        todo: dict[Address, list[str]] = {}
        for key, address in owners.items():
            if self._armed.get(key) != address:
                todo.setdefault(address, []).append(key)
        for stale in set(self._clients) - set(owners.values()):  # no key there any more
            await self._clients.pop(stale).close()
        if not todo:
            return 0
        results = await asyncio.gather(
            *(self._arm_on(address, keys) for address, keys in todo.items()),
            return_exceptions=True,
        )
        for result in results:
            if isinstance(result, BaseException):
                raise result
        return sum(len(keys) for keys in todo.values())

    async def _arm_on(self, address: Address, keys: list[str]) -> None:
        client = self._client(address)
        protocol = await client._connection()
        replies = await asyncio.gather(*(protocol.send(_packed("EXISTS", key)) for key in keys))
        refused = []
        for key, reply in zip(keys, replies, strict=True):
            if isinstance(reply, hiredis.ReplyError):
                refused.append(f"{key}: {reply}")
            elif not protocol.closed:  # tracked from the moment this reply was made
                self._armed[key] = address
        if refused:
            raise ConnectionError(f"Redis {address[0]}:{address[1]} refused " + "; ".join(refused))

    def _opened(self, protocol: _Protocol, address: Address) -> None:
        self._where[id(protocol)] = address

    def _pushed(self, protocol: _Protocol, push: Any) -> None:
        if len(push) < 2 or push[0] != "invalidate":
            return
        address = self._where.get(id(protocol))
        keys: Iterable[str] | None = push[1]
        if keys is None:  # everything on that master (FLUSHALL, its tracking table full)
            keys = [k for k, a in self._armed.items() if a == address]
        for key in keys:
            if self._armed.get(key) == address:
                del self._armed[key]
        self.rung.set()

    def _lost(self, protocol: _Protocol) -> None:
        address = self._where.pop(id(protocol), None)
        if address is None:
            return
        for key in [k for k, a in self._armed.items() if a == address]:
            del self._armed[key]
        self.rung.set()

    async def close(self) -> None:
        for client in self._clients.values():
            with contextlib.suppress(Exception):
                await client.close()
        self._clients.clear()
        self._armed.clear()
