"""A minimal pipelined Redis client for the two scripts on every request's path.

redis-py's asyncio client spends more CPU per command than the rest of the request path together
(connection pool, locks, observability hooks, per-call timeouts). The hold and settle scripts need
none of that: this client keeps one connection open, writes each ``EVALSHA`` at once (packed by
hiredis; under load, the commands of one loop iteration in one write), and matches replies to
callers in order, so any number of requests share the connection with no pool, no lock and no
timer per call. One connection also orders every script a process sends: a settle written
before a client is answered runs before that client's next hold. Everything else (management
writes, the usage writer, pub/sub) stays on redis-py.

Errors: a lost or refused connection fails every waiting call with :class:`ConnectionError`, a
silent server with :class:`TimeoutError` (both ``OSError``: :func:`gateway.metering.meter.guarded`
turns them into 503); the connection is re-opened on the next call. An error reply raises
:class:`ScriptError`, except ``NOSCRIPT``, which loads the script and retries once.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections import deque
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass
from typing import Any, Protocol
from urllib.parse import parse_qsl, unquote, urlsplit

import hiredis

UNIX_SCHEMES = ("unix", "redis+unix")  # a Redis URL naming a unix socket


class ScriptError(Exception):
    """Redis answered a script call with an error (a bug in a script or its arguments)."""


@dataclass(frozen=True)
class Endpoint:
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    path: str | None = None  # a unix socket's (then host and port are unused)

    @classmethod
    def from_url(cls, url: str) -> Endpoint | None:
        """A plain ``redis://`` URL or a unix socket's (``unix:///path?db=N``, also spelt
        ``redis+unix://``; ``password=`` in the query or a user part), or None for what this client
        does not speak (TLS)."""
        parts = urlsplit(url)
        username = unquote(parts.username) if parts.username else None
        password = unquote(parts.password) if parts.password else None
        if parts.scheme in UNIX_SCHEMES and parts.path:
            query = dict(parse_qsl(parts.query))
            password = query.get("password", password)
            username = query.get("username", username)
            db = int(query.get("db", 0))
            return cls("", 0, db, username, password, path=unquote(parts.path))
        if parts.scheme != "redis" or not parts.hostname:
            return None
        path = parts.path.lstrip("/")
        return cls(
            host=parts.hostname,
            port=parts.port or 6379,
            db=int(path) if path else 0,
            username=username,
            password=password,
        )

    @property
    def where(self) -> str:
        return self.path if self.path is not None else f"{self.host}:{self.port}"


class _Protocol(asyncio.Protocol):
    """One connection. A command is written at once when no other is in flight; while some are,
    the commands of one loop iteration go out together at its end (one write). One timer
    per connection watches the oldest unanswered command: past ``timeout_s`` the connection is
    dropped and every waiting call fails with :class:`TimeoutError`."""

    def __init__(self, timeout_s: float) -> None:
        self.timeout_s = timeout_s
        self.reader = hiredis.Reader(encoding="utf-8")
        self.waiters: deque[asyncio.Future[Any]] = deque()
        self.sent_at: deque[float] = deque()
        self.transport: asyncio.WriteTransport | None = None
        self.closed = False
        self.pending: list[bytes] = []
        self._burst = False
        self._watch: asyncio.TimerHandle | None = None
        self._loop = asyncio.get_running_loop()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            waiter = self.waiters.popleft()
            self.sent_at.popleft()
            if not waiter.done():
                waiter.set_result(reply)

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self._fail_all(ConnectionError("Redis connection lost"))

    def _fail_all(self, exc: Exception) -> None:
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self.sent_at.clear()
        while self.waiters:
            waiter = self.waiters.popleft()
            if not waiter.done():
                waiter.set_exception(exc)

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        """Write a command: Redis runs it before any command sent later on this connection."""
        loop = self._loop
        waiter = loop.create_future()
        if self.closed:
            waiter.set_exception(ConnectionError("Redis connection closed"))
            return waiter
        idle = not self.waiters
        self.waiters.append(waiter)
        self.sent_at.append(loop.time())
        if self._watch is None:
            self._watch = loop.call_later(self.timeout_s, self._check)
        if self._burst:
            self.pending.append(packed)
        elif idle:  # nothing in flight: no burst to expect, no reason to wait
            self._write(packed)
        else:  # busy: more commands likely follow in this loop iteration; send them together
            self._burst = True
            self.pending.append(packed)
            loop.call_soon(self._end_burst)
        return waiter

    def send_joined(self, commands: list[bytes]) -> list[asyncio.Future[Any]]:
        """Write several commands in one write, nothing between them (``ASKING`` and the call
        it is for)."""
        loop = self._loop
        waiters = [loop.create_future() for _ in commands]
        if self.closed:
            for waiter in waiters:
                waiter.set_exception(ConnectionError("Redis connection closed"))
            return waiters
        self.waiters.extend(waiters)
        self.sent_at.extend(loop.time() for _ in commands)
        if self._watch is None:
            self._watch = loop.call_later(self.timeout_s, self._check)
        if self._burst:
            self.pending.append(b"".join(commands))
        else:
            self._write(b"".join(commands))
        return waiters

    def _end_burst(self) -> None:
        self._burst = False
        pending, self.pending = self.pending, []
        if pending:
            self._write(pending[0] if len(pending) == 1 else b"".join(pending))

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def _check(self) -> None:
        self._watch = None
        if not self.sent_at:
            return
        due = self.sent_at[0] + self.timeout_s
        if self._loop.time() < due:
            self._watch = self._loop.call_at(due, self._check)
            return
        self._fail_all(TimeoutError(f"Redis did not answer in {self.timeout_s:g} s"))
        self.close()  # replies would come out of step: start afresh

    def close(self) -> None:
        """Stop using this connection now; waiting calls fail when it is gone."""
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()


class ReplicaTimeout(ConnectionError):
    """No replica confirmed a write within ``redis.wait_timeout_ms``: it may be lost in a
    failover, so it counts as not done (a hold is refused with 503, a settle is kept and sent
    again: the settle marker makes that safe)."""


class _WaitingProtocol(_Protocol):
    """``redis.wait_replicas``: every write on this connection is followed by ``WAIT n t``, and
    the replies before a WAIT are handed out only when it answers that ``n`` replicas have them
    (one WAIT per write, so a burst of calls shares one)."""

    def __init__(self, timeout_s: float, replicas: int, wait_ms: int) -> None:
        super().__init__(timeout_s)
        self.replicas = replicas
        wait: tuple[Any, ...] = ("WAIT", replicas, wait_ms)
        self.wait_command = hiredis.pack_command(wait)
        self.is_wait: deque[bool] = deque()  # beside `waiters`: True for our WAITs
        self.held: list[tuple[asyncio.Future[Any], Any]] = []

    def send(self, packed: bytes) -> asyncio.Future[Any]:
        if not self.closed:
            self.is_wait.append(False)  # before the write below appends its WAIT
        return super().send(packed)

    def send_joined(self, commands: list[bytes]) -> list[asyncio.Future[Any]]:
        if not self.closed:
            self.is_wait.extend(False for _ in commands)
        return super().send_joined(commands)

    def _write(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.waiters.append(self._loop.create_future())
            self.sent_at.append(self._loop.time())
            self.is_wait.append(True)
            self.transport.write(data + self.wait_command)

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        while (reply := self.reader.gets()) is not False:
            waiter = self.waiters.popleft()
            self.sent_at.popleft()
            if self.is_wait.popleft():
                self._confirmed(reply)
            elif isinstance(reply, hiredis.ReplyError):
                if not waiter.done():  # refused: nothing was written, nothing to wait for
                    waiter.set_result(reply)
            else:
                self.held.append((waiter, reply))

    def _confirmed(self, acks: Any) -> None:
        held, self.held = self.held, []
        ok = isinstance(acks, int) and acks >= self.replicas
        for waiter, reply in held:
            if waiter.done():
                continue
            if ok:
                waiter.set_result(reply)
            else:
                waiter.set_exception(
                    ReplicaTimeout(f"{acks} of {self.replicas} Redis replicas confirmed a write")
                )

    def _fail_all(self, exc: Exception) -> None:
        held, self.held = self.held, []
        self.is_wait.clear()
        for waiter, _ in held:
            if not waiter.done():
                waiter.set_exception(exc)
        super()._fail_all(exc)


class ScriptClient:
    def __init__(
        self,
        endpoint: Endpoint,
        *,
        timeout_s: float = 5.0,
        wait_replicas: int = 0,
        wait_timeout_ms: int = 100,
    ) -> None:
        self.endpoint = endpoint
        self.timeout_s = timeout_s
        self.wait_replicas = wait_replicas
        self.wait_timeout_ms = wait_timeout_ms
        self._protocol: _Protocol | None = None
        self._opening: asyncio.Task[_Protocol] | None = None

    def _new_protocol(self) -> _Protocol:
        if self.wait_replicas > 0:
            return _WaitingProtocol(self.timeout_s, self.wait_replicas, self.wait_timeout_ms)
        return _Protocol(self.timeout_s)

    async def _open(self) -> _Protocol:
        loop = asyncio.get_running_loop()
        ep = self.endpoint
        connecting = (
            loop.create_unix_connection(self._new_protocol, ep.path)
            if ep.path is not None
            else loop.create_connection(self._new_protocol, ep.host, ep.port)
        )
        _, protocol = await asyncio.wait_for(connecting, timeout=self.timeout_s)
        setup: list[tuple[Any, ...]] = []
        if ep.password is not None:
            auth = (ep.username, ep.password) if ep.username else (ep.password,)
            setup.append(("AUTH", *auth))
        if ep.db:
            setup.append(("SELECT", ep.db))
        for command in setup:
            reply = await protocol.send(hiredis.pack_command(command))
            if isinstance(reply, hiredis.ReplyError):
                protocol.close()
                raise ConnectionError(f"Redis refused {command[0]}: {reply}")
        return protocol

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and not protocol.closed:
            return protocol
        opening = self._opening
        if opening is None:  # one opener; concurrent callers wait for it
            opening = self._opening = asyncio.ensure_future(self._open())
        try:
            protocol = await asyncio.shield(opening)
        finally:
            if opening.done():
                self._opening = None
        self._protocol = protocol
        return protocol

    async def call(self, *args: Any) -> Any:
        protocol = await self._connection()
        return self._checked(await protocol.send(hiredis.pack_command(args)))

    async def call_asking(self, *args: Any) -> Any:
        """``ASKING`` and the command in one write (a Redis Cluster slot being migrated)."""
        protocol = await self._connection()
        asking, sent = protocol.send_joined(
            [hiredis.pack_command(("ASKING",)), hiredis.pack_command(args)]
        )
        self._checked(await asking)
        return self._checked(await sent)

    def call_now(self, *args: Any) -> asyncio.Future[Any] | None:
        """Send a command right now on the open connection (None when none is open): the caller
        may then answer its client knowing Redis runs this before any later command."""
        protocol = self._protocol
        if protocol is None or protocol.closed:
            return None
        return protocol.send(hiredis.pack_command(args))

    async def reply(self, waiter: asyncio.Future[Any]) -> Any:
        return self._checked(await waiter)

    @staticmethod
    def _checked(reply: Any) -> Any:
        if isinstance(reply, hiredis.ReplyError):
            raise ScriptError(str(reply))
        return reply

    async def close(self) -> None:
        if self._protocol is not None:
            self._protocol.close()
        self._protocol = None


class ScriptConnection(Protocol):
    """What :class:`FastScript` needs: a :class:`ScriptClient` (one node) or a
    :class:`gateway.metering.clusterclient.ClusterScriptClient` (one per master)."""

    async def call(self, *args: Any) -> Any: ...

    def call_now(self, *args: Any) -> asyncio.Future[Any] | None: ...

    async def reply(self, waiter: asyncio.Future[Any]) -> Any: ...

    async def close(self) -> None: ...


# Answers after which the call is simply made again through ``call`` (which loads the script,
# or, on a cluster, follows the redirection).
_RETRY = ("NOSCRIPT", "MOVED ", "ASK ")


class FastScript:
    """One Lua script called by SHA through a :class:`ScriptConnection`; same call shape as
    redis-py's ``AsyncScript`` (``await script(keys=[...], args=[...])``)."""

    def __init__(self, client: ScriptConnection, source: str) -> None:
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
            if not str(exc).startswith(_RETRY):
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
