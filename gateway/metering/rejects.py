"""Usage records an older writer refused because it could not read them, taken back.

A usage writer from before the one-field record (:mod:`policies.usage_record`) reads a new
entry's lone ``r`` field as a record without values: it refuses it and keeps it whole in
``usage_rejects`` (acknowledged, never lost). In a rolling upgrade that is the fate of every
record a new replica settles and an old replica's writer happens to read. A writer of this
version takes such rejects back (:meth:`TakeBack.run`, about once a minute): each reject whose
fields are a record in the new form is inserted as any record is (idempotent on the request id:
a record already in is not counted twice, its rollup neither) and then deleted from
``usage_rejects``. One that fails again (malformed in the new form too: this writer's own
refusals) stays where it is and is not tried again by this process.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from functools import partial
from typing import Any

import asyncpg
import orjson

from gateway.metering.usage_rows import record_row
from policies.usage_record import RECORD, fields_of

log = logging.getLogger("modelbridge.usage")

EVERY_S = 60.0
_CANDIDATES = (
    f"SELECT id, fields FROM usage_rejects WHERE fields ? '{RECORD}'"
    " AND NOT id = ANY($1::bigint[]) ORDER BY id LIMIT $2"
)
_DELETE = "DELETE FROM usage_rejects WHERE id = ANY($1::bigint[])"
Insert = Callable[[list[tuple[Any, ...]]], Awaitable[None]]


async def _delete(ids: list[int], conn: asyncpg.Connection) -> None:
    await conn.execute(_DELETE, ids)


class TakeBack:
    def __init__(self, db: asyncpg.Pool, insert: Insert, refused: tuple[type[Exception], ...]):
        self.db = db
        self.insert = insert  # the writer's insert of a batch of rows (with their rollup)
        self.refused = refused  # what a malformed record raises from it
        self.batch = 500
        self.left: set[int] = set()  # rejects that failed again: not tried again here
        self.next_at = 0.0  # monotonic time of the next pass

    async def due(self, timeout_s: float) -> None:
        """A pass when one is due; a failure (a store away, or frozen: each statement gives up
        after ``timeout_s``) is logged and tried next time."""
        if time.monotonic() < self.next_at:
            return
        self.next_at = time.monotonic() + EVERY_S
        try:
            taken = await self.run(timeout_s)
        except Exception as exc:
            log.warning("usage writer: taking back usage_rejects failed: %r", exc)
            return
        if taken:
            log.warning("usage writer: took back %d records an older writer refused", taken)

    async def run(self, timeout_s: float = 15.0) -> int:
        """One pass over the rejects in the new form: how many were taken back."""
        taken = 0
        while True:
            found = await self._query(
                timeout_s, lambda c: c.fetch(_CANDIDATES, sorted(self.left), self.batch)
            )
            if not found:
                return taken
            rows: dict[int, tuple[Any, ...]] = {}
            for reject in found:
                try:
                    rows[reject["id"]] = record_row(dict(fields_of(orjson.loads(reject["fields"]))))
                except (ValueError, TypeError, orjson.JSONDecodeError):
                    self.left.add(reject["id"])
            try:
                if rows:
                    await self.insert(list(rows.values()))
                done = list(rows)
            except self.refused:  # one malformed row: the rest one by one
                done = []
                for reject_id, row in rows.items():
                    try:
                        await self.insert([row])
                    except self.refused:
                        self.left.add(reject_id)
                        continue
                    done.append(reject_id)
            if done:
                await self._query(timeout_s, partial(_delete, done))
            taken += len(done)

    async def _query(
        self, timeout_s: float, statement: Callable[[asyncpg.Connection], Awaitable[Any]]
    ) -> Any:
        """One statement on a connection of the pool, given up after ``timeout_s`` (the
        connection then dropped: a frozen PostgreSQL leaves it in an unknown state)."""
        conn = await self.db.acquire(timeout=timeout_s)
        try:
            async with asyncio.timeout(timeout_s):
                return await statement(conn)
        except BaseException:
            conn.terminate()
            raise
        finally:
            await self.db.release(conn)
