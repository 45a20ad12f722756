"""A minimal pipelined Redis client for the two scripts on every request's path.

redis-py's asyncio client spends more CPU per command than the rest of the request path together
(connection pool, locks, observability hooks, per-call timeouts). The hold and settle scripts need
none of that: this client keeps a couple of connections open, writes each ``EVALSHA`` at once
(packed by hiredis), and matches replies to callers in order, so any number of requests share a
connection with no pool and no lock. Everything else (management writes, the usage writer,
pub/sub) stays on redis-py.

Errors: a lost or refused connection fails every waiting call with :class:`ConnectionError`, a
silent server with :class:`TimeoutError` (both ``OSError``: :func:`gateway.metering.guarded`
turns them into 503); the connection is re-opened on the next call. An error reply raises
:class:`ScriptError`, except ``NOSCRIPT``, which loads the script and retries once.
"""

from __future__ import annotations

import asyncio
import hashlib
import itertools
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

import hiredis


class ScriptError(Exception):
    """Redis answered a script call with an error (a bug in a script or its arguments)."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None

    @classmethod
    def from_url(cls, url: str) -> Endpoint | None:
        """A plain ``redis://`` URL, or None for what this client does not speak (TLS, unix)."""
        parts = urlsplit(url)
        if parts.scheme != "redis" or not parts.hostname:
            return None
        path = parts.path.lstrip("/")
        return cls(
            host=parts.hostname,
            port=parts.port or 6379,
            db=int(path) if path else 0,
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader(encoding="utf-8")
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.transport: asyncio.WriteTransport | None = None
        self.closed = False
        self.pending: list[bytes] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(ConnectionError("Redis connection lost"))

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Queue a command; commands queued in one loop iteration go out in one write."""
        loop = asyncio.get_running_loop()
        waiter = loop.create_future()
        if not self.pending:
            loop.call_soon(self.flush)
        self.pending.append(packed)
        self.waiters.append(waiter)
        return waiter

    def send_now(self, packed: bytes) -> asyncio.Future[Any]:
        """Write a command at once, after anything queued: Redis will run it before any command
        sent later on this connection."""
        waiter = asyncio.get_running_loop().create_future()
        self.pending.append(packed)
        self.waiters.append(waiter)
        self.flush()
        return waiter

    def flush(self) -> None:
        pending, self.pending = self.pending, []
        if self.transport is not None and not self.closed and pending:
            self.transport.write(pending[0] if len(pending) == 1 else b"".join(pending))

    def close(self) -> None:
        """Stop using this connection now; waiting calls fail when it is gone."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()


class ScriptClient:
    def __init__(self, endpoint: Endpoint, *, connections: int = 2, timeout_s: float = 5.0) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self._slots: list[_Protocol | None] = [None] * connections
        self._opening: list[asyncio.Task[_Protocol] | None] = [None] * connections
        self._next = itertools.cycle(range(connections))

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        ep = self.endpoint
        _, protocol = await asyncio.wait_for(
            loop.create_connection(_Protocol, ep.host, ep.port), timeout=self.timeout_s
        )
        setup: list[tuple[Any, ...]] = []
        if ep.password is not None:
            auth = (ep.username, ep.password) if ep.username else (ep.password,)
            setup.append(("AUTH", *auth))
        if ep.db:
            setup.append(("SELECT", ep.db))
        for command in setup:
            reply = await asyncio.wait_for(
                protocol.send(hiredis.pack_command(command)), timeout=self.timeout_s
            )
            if isinstance(reply, hiredis.ReplyError):
                protocol.close()
                raise ConnectionError(f"Redis refused {command[0]}: {reply}")
        return protocol

    async def _connection(self) -> _Protocol:
        slot = next(self._next)
        protocol = self._slots[slot]
        if protocol is not None and not protocol.closed:
            return protocol
        opening = self._opening[slot]
        if opening is None:  # one opener per slot; concurrent callers wait for it
            opening = asyncio.ensure_future(self._open())
            self._opening[slot] = opening
        try:
            protocol = await asyncio.shield(opening)
        finally:
            if opening.done():
                self._opening[slot] = None
        self._slots[slot] = protocol
        return protocol

    async def call(self, *args: Any) -> Any:
        protocol = await self._connection()
        waiter = protocol.send(hiredis.pack_command(args))
        try:
            reply = await asyncio.wait_for(waiter, timeout=self.timeout_s)
        except TimeoutError:
            protocol.close()  # replies would come out of step: start afresh
            raise
        if isinstance(reply, hiredis.ReplyError):
            raise ScriptError(str(reply))
        return reply

    def call_now(self, *args: Any) -> asyncio.Future[Any] | None:
        """Send a command right now on an open connection (None when none is open): the caller
        may then answer its client knowing Redis runs this before any later command."""
        protocol = self._slots[0]
        if protocol is None or protocol.closed:
            return None
        return protocol.send_now(hiredis.pack_command(args))

    async def reply(self, waiter: asyncio.Future[Any]) -> Any:
        try:
            reply = await asyncio.wait_for(waiter, timeout=self.timeout_s)
        except TimeoutError:
            protocol = self._slots[0]
            if protocol is not None:
                protocol.close()
            raise
        if isinstance(reply, hiredis.ReplyError):
            raise ScriptError(str(reply))
        return reply

    async def close(self) -> None:
        for protocol in self._slots:
            if protocol is not None:
                protocol.close()
        self._slots = [None] * len(self._slots)


class FastScript:
    """One Lua script called by SHA through a :class:`ScriptClient`; same call shape as
    redis-py's ``AsyncScript`` (``await script(keys=[...], args=[...])``)."""

    def __init__(self, client: ScriptClient, source: str) -> None:
        self.client = client
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest()

    def send_now(self, keys: Sequence[Any], args: Sequence[Any]) -> Awaitable[Any] | None:
        """Send the call at once (see :meth:`ScriptClient.call_now`); await the result later.
        None when no connection is open: then call the script normally."""
        waiter = self.client.call_now("EVALSHA", self.sha, len(keys), *keys, *args)
        return None if waiter is None else self._finish(waiter, keys, args)

    async def _finish(
        self, waiter: asyncio.Future[Any], keys: Sequence[Any], args: Sequence[Any]
    ) -> Any:
        try:
            return await self.client.reply(waiter)
        except ScriptError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        return await self(keys, args)

    async def __call__(self, keys: Sequence[Any] = (), args: Sequence[Any] = ()) -> Any:
        try:
            return await self.client.call("EVALSHA", self.sha, len(keys), *keys, *args)
        except ScriptError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        await self.client.call("SCRIPT", "LOAD", self.source)
        return await self.client.call("EVALSHA", self.sha, len(keys), *keys, *args)
