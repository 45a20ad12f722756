"""The usage writer: moves usage records from the accounts' Redis streams into PostgreSQL.

Settling appends each record to its account's stream in the same atomic step that debits the
balance, so a record exists as soon as the money moved. Every gateway process runs one writer,
all in one consumer group: a batch is inserted idempotently (``ON CONFLICT DO NOTHING`` on the
table's one unique key, ``(request_id, created_at)``: created_at is fixed at admission, so a
record delivered again has the same), and only after the commit are its entries acknowledged and
deleted, so a crash between the two re-delivers the batch and inserts nothing twice. The table is
partitioned by month; the writer makes the months ahead every hour and a batch's missing month
before inserting it (gateway/infra/partitions.py). Entries a dead consumer left
pending are claimed after ``claim_idle_ms``. ``pending()`` (the streams' length) feeds the
``modelbridge_usage_events_pending`` gauge.

The streams are listed in the registry shards of policies/keyspace.py (and found by a scan of
every master now and then, for a shard lost with its master). On a Redis Cluster each read names
the streams of one slot, the reads, claims and acknowledgements of one step go out as one
pipeline per master (redis-py's cluster pipeline), so every master's streams are drained.

Idle, the writer waits instead of stepping every ``block_ms``: on one Redis in one blocking
``XREADGROUP`` over its streams and the doorbell stream (rung when a stream is registered); on a
cluster, where a blocking read names one slot's streams only, for an invalidation message of
Redis's key tracking on one connection per master (gateway/metering/streamwatch.py): the first
write to a stream, or to a registry shard, wakes it.

A step moves at most ``batch`` records: XREADGROUP's COUNT applies to each stream it names, so the
budget is shared among the streams (policies/drain.py: each stream at least one, the backlog
water-filled), and so are claims; acknowledgements go ``drain.ACK_AT_ONCE`` streams at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

import asyncpg
import orjson
from redis import exceptions as redis_errors
from redis.asyncio import Redis, RedisCluster
from redis.asyncio.connection import SSLConnection

from gateway.config import MeteringConfig
from gateway.infra.partitions import Partitions, is_missing_partition
from gateway.metering.rejects import TakeBack
from gateway.metering.streamwatch import StreamWatch, TrackingRefused
from gateway.metering.usage_rows import (
    BATCH_TABLE,
    COLUMNS,
    INSERT_BATCH,
    INSERT_ROWS,
    LAST_USED,
    Entry,
    Fields,
    ack_args,
    arrays,
    decoded,
    last_used,
    record_row,
)
from policies import drain, partitions
from policies import keyspace as rk
from policies.slots import key_slot

log = logging.getLogger("modelbridge.usage")
# What a malformed record raises: asyncpg's encoding of a number beyond its column (COPY's binary
# rows: OverflowError), PostgreSQL refusing a value, or its conversion from the stream's text.
_REFUSED = (asyncpg.DataError, asyncpg.IntegrityConstraintViolationError, ValueError, OverflowError)


class UsageWriter:
    def __init__(
        self,
        redis: Redis,
        db: asyncpg.Pool,
        consumer: str,
        *,
        batch: int = 2000,
        block_ms: int = 200,
        claim_idle_ms: int = 30_000,
        on_pending: Callable[[int], None] | None = None,
    ) -> None:
        from gateway.metering.scripts import lua_source

        self.redis = redis
        self.cluster = isinstance(redis, RedisCluster)
        self.db = db
        self.consumer = consumer
        self.batch = batch
        self.copy_from = 500  # a batch of this many rows or more goes in by COPY (bench.drain)
        self.block_ms = block_ms
        self.claim_idle_ms = claim_idle_ms
        self.on_pending = on_pending
        self._stopping = asyncio.Event()
        self.written = 0
        self.rejected = 0
        self.claim_every_s = 5.0
        self._last_claim = 0.0
        self.scan_every_s = 30.0
        self._last_scan = 0.0
        self.write_timeout_s = 15.0
        self.retry_s = 0.5
        self._ack_script = redis.register_script(lua_source("ack"))
        # Entries read but not written (PostgreSQL failed): written first, as soon as it answers,
        # not left pending until the idle claim. At start, what this consumer read before.
        self._unwritten: list[tuple[str, str, dict[str, str]]] = []
        self._own_checked = False
        self._failing_since: float | None = None
        self.partitions = Partitions()
        self.take_back = TakeBack(db, self._insert, _REFUSED)  # an older writer's refusals
        self._next_ahead = 0.0  # monotonic time of the next making of partitions ahead
        self._lengths: dict[str, int] = {}  # each stream's length at the end of the last step
        # Idle (a step moved nothing): one XREADGROUP BLOCK over the streams known and the
        # doorbell (a stream registered) instead of a step every block_ms; what it reads is
        # written by the next step, at once. On a cluster (one slot per read): the streams and
        # registry shards tracked on their masters, a write to one wakes the wait.
        self.wait_ms = 2000
        self.watch: StreamWatch | None = None  # on a cluster, made by the first wait
        self._untrackable = False  # a master refused key tracking: the cluster writer polls
        self.waiting = False  # in that wait now
        self._streams: list[str] = []  # the streams of the last step
        self._woken: list[tuple[str, str, dict[str, str]]] = []  # read by the wait
        self._bell_ready = False
        # On one Redis the stream list is asked for every ``list_every_s`` (or at once after the
        # doorbell rang, or a read found a stream without its group), not on every step.
        self.list_every_s = 1.0
        self._listed_at = -1.0e9
        self._listed_now = False  # the last streams() asked the registry (not its copy)
        self._turn = 0  # which window of streams a read names when there are more than its budget

    @classmethod
    def configured(
        cls,
        redis: Redis,
        db: asyncpg.Pool,
        consumer: str,
        settings: MeteringConfig,
        on_pending: Callable[[int], None] | None = None,
    ) -> UsageWriter:
        claim_idle_ms = int(settings.claim_idle_s * 1000)
        batch = settings.writer_batch
        return cls(
            redis, db, consumer, batch=batch, claim_idle_ms=claim_idle_ms, on_pending=on_pending
        )

    def stop(self) -> None:
        self._stopping.set()

    async def run(self) -> None:
        """Loop until ``stop()``; a final drain runs before returning. A store that fails is
        retried every ``retry_s``, logged once when it starts failing and once when it is back."""
        while not self._stopping.is_set():
            try:
                moved = await self.step()
            except Exception as exc:
                if self._failing_since is None:
                    self._failing_since = time.monotonic()
                    log.warning("usage writer: %s; retrying every %gs", _brief(exc), self.retry_s)
                await self._idle(self.retry_s)
                continue
            if self._failing_since is not None:
                took = time.monotonic() - self._failing_since
                log.info("usage writer: writing again after %.1fs (%d records)", took, moved)
                self._failing_since = None
            if moved >= self.batch:  # a backlog: the next batch at once
                continue
            if moved or not await self._wait_for_records():
                await self._idle()  # records coming in: let them gather, one batch a tick
        with contextlib.suppress(Exception):
            await self.drain()
        if self.watch is not None:
            await self.watch.close()

    async def _idle(self, seconds: float | None = None) -> None:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds or self.block_ms / 1000)

    async def drain(self) -> int:
        total = 0
        self._listed_at = -1.0e9  # every stream registered until now
        while (moved := await self.step()) > 0:
            total += moved
        return total

    async def streams(self) -> list[str]:
        now = time.monotonic()
        if now - self._last_scan >= self.scan_every_s:
            self._last_scan = now
            self._listed_at = -1.0e9
            await self.discover()
        kept = not self.cluster and self._streams and now - self._listed_at < self.list_every_s
        self._listed_now = not kept
        if kept:
            return self._streams
        self._listed_at = now
        pipe = self.redis.pipeline(transaction=False)
        for registry in rk.usage_registries():
            pipe.smembers(registry)
        return sorted({str(s) for members in await pipe.execute() for s in members})

    async def discover(self) -> None:
        """Register usage streams missing from the registry (a stream written after Redis lost
        its registry shard, before its account was loaded again). On a cluster the scan visits
        every master."""
        found: dict[str, list[str]] = {}
        async for key in self.redis.scan_iter(match="{acct:*}:usage", count=1000):
            found.setdefault(rk.usage_registry(rk.account_of_stream(key)), []).append(key)
        if found:
            pipe = self.redis.pipeline(transaction=False)
            for registry, streams in found.items():
                pipe.sadd(registry, *streams)
            await pipe.execute()

    async def step(self) -> int:
        """One read (or claim) and one write of at most ``batch`` records; how many moved."""
        if self._failing_since is None:  # PostgreSQL answers: an older writer's refusals
            await self.take_back.due(self.write_timeout_s)
        streams = await self.streams()
        if not streams:
            self._report(0)
            return 0
        self._turn += 1
        self._streams = streams
        if time.monotonic() >= self._next_ahead:
            await self._partitions_ahead()
        if not self._unwritten and not self._own_checked:
            self._woken = []  # read again with the rest of this consumer's pending entries
            self._unwritten = await self._own_pending(streams)
            self._own_checked = not self._unwritten
        if not self._unwritten:
            self._unwritten = [*self._woken, *await self._read(streams)]
            self._woken = []
            now = time.monotonic()
            if now - self._last_claim >= self.claim_every_s:
                self._last_claim = now
                self._unwritten += await self._claim(streams)
        entries = decoded(self._unwritten[: self.batch])  # either form (policies/usage_record.py)
        measured = None
        if entries:
            measured = await self._write(entries)
            del self._unwritten[: len(entries)]
        self._report(await self.pending(streams) if measured is None else measured)
        return len(entries)

    async def _partitions_ahead(self) -> None:
        """Every hour, this month's partition of usage_records and the next ones (checked again:
        one may have been dropped). A failure is logged and tried again in a minute: the insert
        makes a missing month itself."""
        self._next_ahead = time.monotonic() + 60.0
        try:
            conn = await self.db.acquire(timeout=self.write_timeout_s)
        except Exception as exc:
            log.warning("usage writer: making partitions ahead failed: %s", _brief(exc))
            return
        try:
            async with asyncio.timeout(self.write_timeout_s):
                self.partitions.forget()
                made = await self.partitions.ensure(conn, partitions.months_ahead(time.time()))
        except Exception as exc:
            conn.terminate()  # in an unknown state (a frozen PostgreSQL)
            log.warning("usage writer: making partitions ahead failed: %s", _brief(exc))
            return
        finally:
            await self.db.release(conn)
        if made:
            log.info("usage writer: made usage_records partitions for %s", ", ".join(made))
        self._next_ahead = time.monotonic() + partitions.ENSURE_EVERY_S

    async def _wait_for_records(self) -> bool:
        """Idle: wait up to ``wait_ms`` for a record in a stream of the last step (or a stream
        registered), keeping what the read took for the next step. False when it cannot wait
        (no streams yet, Redis failing): the caller polls."""
        if not self._streams or self._stopping.is_set():
            return False
        if self.cluster:
            return await self._wait_on_cluster()
        try:
            if not self._bell_ready:
                await self._doorbell()
            names = [rk.USAGE_DOORBELL, *self._streams]
            reading = asyncio.ensure_future(
                self.redis.xreadgroup(
                    rk.USAGE_GROUP,
                    self.consumer,
                    dict.fromkeys(names, ">"),
                    count=1,
                    block=self._wait_limit_ms(),
                )
            )
            stopping = asyncio.ensure_future(self._stopping.wait())
            cut = True
            try:
                await asyncio.wait({reading, stopping}, return_when=asyncio.FIRST_COMPLETED)
                cut = not reading.done()
            finally:
                stopping.cancel()
                if cut:  # stopping: what the read took is read again (the final drain)
                    reading.cancel()
                    self._own_checked = False
            if cut:
                with contextlib.suppress(BaseException):
                    await reading
                return True
            rung: list[str] = []
            reply: Any = reading.result()
            for stream, items in reply or ():
                if stream == rk.USAGE_DOORBELL:
                    rung.extend(eid for eid, _ in items)
                    self._listed_at = -1.0e9  # a stream registered: the list asked for again
                else:
                    self._woken.extend((stream, eid, fields) for eid, fields in items if fields)
            if rung:
                await self.redis.xack(rk.USAGE_DOORBELL, rk.USAGE_GROUP, *rung)
        except redis_errors.RedisError as exc:
            if "NOGROUP" in str(exc):  # the doorbell's group made again (a stream's: by _read)
                self._bell_ready = False
            return False
        return True

    async def _wait_on_cluster(self) -> bool:
        """Idle on a cluster: the registry shards and the streams of the last step tracked on
        their masters (gateway/metering/streamwatch.py), then a wait of up to ``wait_ms`` for a
        write to any of them. When some were armed only now, no wait: the next step reads what
        was written before (after that, a write rings). False when the keys cannot be tracked
        (a master down or refusing, a stale slot map, TLS): the caller polls."""
        watch = self.watch
        if self._untrackable:
            return False
        if watch is None:
            kwargs = self.redis.get_connection_kwargs()
            kind = kwargs.get("connection_class")
            if kind is None or issubclass(kind, SSLConnection):
                self._untrackable = True  # the tracking connection speaks plain TCP only
                return False
            watch = self.watch = StreamWatch(kwargs.get("username"), kwargs.get("password"))
        watch.rung.clear()
        try:
            owners: dict[str, tuple[str, int]] = {}
            for key in [*rk.usage_registries(), *self._streams]:
                node = self.redis.get_node_from_key(key)  # type: ignore[attr-defined]
                owners[key] = (node.host, node.port)
            if await watch.arm(owners):
                return True
        except TrackingRefused as exc:
            log.warning("usage writer: %s; polling every %d ms", exc, self.block_ms)
            self._untrackable = True
            return False
        except Exception as exc:
            log.debug("usage writer: cannot track the streams (%s); polling", _brief(exc))
            return False
        rung = asyncio.ensure_future(watch.rung.wait())
        stopping = asyncio.ensure_future(self._stopping.wait())
        self.waiting = True
        try:
            await asyncio.wait(
                {rung, stopping}, timeout=self.wait_ms / 1000, return_when=asyncio.FIRST_COMPLETED
            )
        finally:
            self.waiting = False
            rung.cancel()
            stopping.cancel()
        return True

    def _wait_limit_ms(self) -> int:
        """``wait_ms``, but a second short of the client's socket timeout (redis-py's default:
        5 s), which would fail the read."""
        timeout = self.redis.connection_pool.connection_kwargs.get("socket_timeout", 5.0)
        if timeout is None:
            return self.wait_ms
        return max(1, min(self.wait_ms, int(timeout * 1000) - 1000))

    async def _doorbell(self) -> None:
        """The doorbell's consumer group, and what this consumer read of it before (it was
        killed) acknowledged."""
        with contextlib.suppress(redis_errors.ResponseError):  # BUSYGROUP
            await self.redis.xgroup_create(rk.USAGE_DOORBELL, rk.USAGE_GROUP, id="$", mkstream=True)
        reply: Any = await self.redis.xreadgroup(
            rk.USAGE_GROUP, self.consumer, {rk.USAGE_DOORBELL: "0"}, count=1000
        )
        rung = [eid for _, items in reply or () for eid, _ in items]
        if rung:
            await self.redis.xack(rk.USAGE_DOORBELL, rk.USAGE_GROUP, *rung)
        self._bell_ready = True

    def _counts(self, streams: list[str], measured: bool = True) -> list[int]:
        """Each stream's share of one read's budget (policies/drain.py)."""
        lengths = [self._lengths.get(s) if measured else None for s in streams]
        return drain.read_counts(lengths, self.batch, self._turn)

    async def _own_pending(self, streams: list[str]) -> list[tuple[str, str, dict[str, str]]]:
        """What this consumer read and did not acknowledge before (it was killed): the same
        consumer name comes back at once, without waiting for the idle claim. At most ``batch``
        at a time; asked again until there is none."""
        pipe = self.redis.pipeline(transaction=False)
        named = [(s, c) for s, c in zip(streams, self._counts(streams, False), strict=True) if c]
        for stream, count in named:
            pipe.xreadgroup(rk.USAGE_GROUP, self.consumer, {stream: "0"}, count=count)
        entries: list[tuple[str, str, dict[str, str]]] = []
        for reply in await pipe.execute(raise_on_error=False):
            if isinstance(reply, Exception):
                continue
            for stream, items in reply or ():
                entries.extend((stream, eid, fields) for eid, fields in items if fields)
        if entries:
            log.info(
                "usage writer %s: writing %d records it read before", self.consumer, len(entries)
            )
        return entries

    def _read_groups(self, streams: list[str]) -> list[tuple[int, list[str]]]:
        """(COUNT, streams) of each XREADGROUP of one read: the streams that share a count, and on
        a cluster a slot (a multi-key command must not cross slots). The counts add up to at most
        ``batch`` (COUNT applies to each stream named, not to the command)."""
        by_group: dict[tuple[int, int], list[str]] = {}
        for stream, count in zip(streams, self._counts(streams), strict=True):
            if count:
                slot = key_slot(stream) if self.cluster else 0
                by_group.setdefault((slot, count), []).append(stream)
        return [(count, group) for (_, count), group in by_group.items()]

    async def _read(self, streams: list[str]) -> list[tuple[str, str, dict[str, str]]]:
        groups = self._read_groups(streams)
        pipe = self.redis.pipeline(transaction=False)  # on a cluster: one per master, at once
        for count, group in groups:
            pipe.xreadgroup(rk.USAGE_GROUP, self.consumer, {s: ">" for s in group}, count=count)
        replies: list[Any] = await pipe.execute(raise_on_error=False)
        entries: list[tuple[str, str, dict[str, str]]] = []
        for (_, group), reply in zip(groups, replies, strict=True):
            if isinstance(reply, Exception):
                if "NOGROUP" not in str(reply):
                    raise reply
                if not self._listed_now:  # a list from steps before: the stream may be gone
                    self._listed_at = -1.0e9  # (a Redis lost), not to be made: asked again
                    continue
                await self._create_groups(group)
                continue
            for stream, items in reply or ():
                entries.extend((stream, eid, fields) for eid, fields in items)
        return entries

    async def _claim(self, streams: list[str]) -> list[tuple[str, str, dict[str, str]]]:
        """Entries another consumer read but did not acknowledge within ``claim_idle_ms`` (it
        died), stream by stream, wherever each stream lives; at most ``batch`` in all."""
        pipe = self.redis.pipeline(transaction=False)
        named = [(s, c) for s, c in zip(streams, self._counts(streams, False), strict=True) if c]
        for stream, count in named:
            pipe.xautoclaim(
                stream, rk.USAGE_GROUP, self.consumer, self.claim_idle_ms, "0-0", count=count
            )
        claimed: list[tuple[str, str, dict[str, str]]] = []
        replies = await pipe.execute(raise_on_error=False)
        for (stream, _), reply in zip(named, replies, strict=True):
            if not isinstance(reply, Exception):
                claimed.extend((stream, eid, fields) for eid, fields in reply[1] if fields)
        return claimed

    async def _create_groups(self, streams: list[str]) -> None:
        for stream in streams:
            with contextlib.suppress(redis_errors.ResponseError):
                await self.redis.xgroup_create(stream, rk.USAGE_GROUP, id="0", mkstream=True)

    async def _write(self, entries: list[Entry]) -> int | None:
        """Insert, then acknowledge; the streams' length after it when measured with the acks."""
        try:
            await self._insert([record_row(fields) for _, _, fields in entries])
        except _REFUSED:
            # One malformed record must not block the others: insert one by one, and keep
            # whatever still fails in usage_rejects, whole.
            for entry in entries:
                await self._write_one(*entry)
        return await self._ack(entries)

    async def _insert(self, rows: list[tuple[Any, ...]]) -> None:
        """Insert a batch of records (and their rollup) in one transaction: the one place the
        writer's SQL meets ``usage_records``. A PostgreSQL that stops answering (frozen) fails
        the batch after ``write_timeout_s``; its connection is dropped, not reused."""
        keys, used_at = last_used(rows)
        months = partitions.months_of(row[-1] for row in rows)
        conn = await self.db.acquire(timeout=self.write_timeout_s)
        try:
            for attempt in (1, 2):
                try:
                    async with asyncio.timeout(self.write_timeout_s):
                        await self.partitions.ensure(conn, months)  # a new month: made first
                        if len(rows) < self.copy_from:
                            await conn.fetchval(INSERT_ROWS, *arrays(rows), keys, used_at)
                            return
                        async with conn.transaction():
                            await conn.execute(BATCH_TABLE)
                            await conn.copy_records_to_table(
                                "usage_batch", records=rows, columns=list(COLUMNS)
                            )
                            await conn.execute(INSERT_BATCH)
                            await conn.execute(LAST_USED, keys, used_at)
                    return
                except asyncpg.CheckViolationError as exc:
                    if attempt == 2 or not is_missing_partition(exc):
                        raise
                    self.partitions.forget()  # dropped since it was seen: made again, once
        except BaseException:
            conn.terminate()  # in an unknown state (cancelled mid-transaction, or silent)
            raise
        finally:
            await self.db.release(conn)

    async def _write_one(self, stream: str, entry_id: str, fields: Fields) -> None:
        try:
            await self._insert([record_row(fields)])
        except _REFUSED as exc:
            log.error("usage record %s of %s rejected: %s", entry_id, stream, exc)
            await self.db.execute(
                "INSERT INTO usage_rejects (stream, entry_id, fields, error)"
                " VALUES ($1, $2, $3::jsonb, $4) ON CONFLICT DO NOTHING",
                stream,
                entry_id,
                orjson.dumps(fields).decode(),
                str(exc)[:1000],
            )
            self.rejected += 1

    async def _ack(self, entries: list[Entry]) -> int | None:
        """One ack script per stream. On one Redis: all in one pipeline (one connection) with
        the XLEN of every stream of the step after them, whose sum is returned (the pending
        gauge, measured in the same round trip). On a cluster: ``drain.ACK_AT_ONCE`` streams at
        a time (each one at once takes a connection of its own, and hundreds of streams
        exhausted the client's pool), and None: the lengths are measured apart."""
        by_stream = ack_args(entries)
        if not self.cluster:
            return await self._ack_measured(by_stream, len(entries))
        for group in drain.groups(list(by_stream.items())):
            await asyncio.gather(*(self._ack_script(keys=[s], args=a) for s, a in group))
        self.written += len(entries)
        return None

    async def _ack_measured(self, by_stream: dict[str, list[str | int]], n: int) -> int | None:
        pipe = self.redis.pipeline(transaction=False)
        for stream, args in by_stream.items():  # EVALSHA: a script in a pipeline costs a check
            pipe.evalsha(self._ack_script.sha, 1, stream, *args)
        streams = self._streams
        for stream in streams:
            pipe.xlen(stream)
        replies = await pipe.execute(raise_on_error=False)
        acks, lengths = replies[: len(by_stream)], replies[len(by_stream) :]
        missing = False
        for (stream, args), reply in zip(by_stream.items(), acks, strict=True):
            if isinstance(reply, redis_errors.NoScriptError):  # Redis restarted: loaded again
                await self._ack_script(keys=[stream], args=args)
                missing = True
            elif isinstance(reply, Exception):
                raise reply
        self.written += n
        if missing or any(isinstance(n, Exception) for n in lengths):
            return None
        self._lengths = dict(zip(streams, (int(n) for n in lengths), strict=True))
        return sum(self._lengths.values())

    async def pending(self, streams: list[str] | None = None) -> int:
        streams = await self.streams() if streams is None else streams
        if not streams:
            return 0
        pipe = self.redis.pipeline(transaction=False)
        for stream in streams:
            pipe.xlen(stream)
        lengths = [int(n) for n in await pipe.execute()]
        self._lengths = dict(zip(streams, lengths, strict=True))
        return sum(lengths)

    def _report(self, pending: int) -> None:
        if self.on_pending is not None:
            self.on_pending(pending)


def _brief(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
