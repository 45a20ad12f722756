"""The monthly partitions of ``usage_records`` (migrations/014_partitions.sql): made ahead, and
on demand.

``usage_records`` is partitioned by range of ``created_at``, one partition a month (UTC),
``usage_records_YYYY_MM``, made by the SQL function ``usage_records_add_month`` (a table of its
own then ATTACH PARTITION, which does not block reads and inserts of the others; an advisory lock
serialises concurrent callers). Partitions are made:

* at start, by the migration runner (gateway/infra/db.py): this month and ``AHEAD`` more;
* by every usage writer, every hour (``ENSURE_EVERY_S``), the same months: a gateway that runs
  for months never reaches a month without its partition;
* on demand, before an insert, for any month of the batch this process has not seen yet (a
  record of an old month replayed late, a clock moved by hand): ``ensure`` is cheap once known,
  and an insert that still finds no partition (one dropped meanwhile) makes it and retries once.

There is no DEFAULT partition, on purpose. A row with no month of its own would land there
silently; making that month's partition later means PostgreSQL scans the default partition under
lock to prove no row belongs to the new month, and fails when one does, so the rows would have to
be moved out first (delete and re-insert, in a transaction locking the default partition, while
the writer waits) — and meanwhile they sit in an unbounded partition that pruning cannot skip and
retention cannot drop by month. Without it, a missing month is a loud error ("no partition of
relation ... found for row") at the one place that inserts, which makes the month and retries
the same batch: its entries stay pending in Redis until the commit, so nothing is lost or
doubled (``ON CONFLICT DO NOTHING`` on ``(request_id, created_at)``).
"""

from __future__ import annotations

from collections.abc import Iterable

import asyncpg

from policies import partitions

LOCK_TIMEOUT = "5s"  # an ATTACH waiting longer on a long report gives up; tried again later


def is_missing_partition(exc: BaseException) -> bool:
    """The insert found no partition for a row's created_at."""
    return isinstance(exc, asyncpg.CheckViolationError) and "no partition" in str(exc)


class Partitions:
    """The months this process knows have a partition, and making the missing ones."""

    def __init__(self) -> None:
        self.known: set[str] = set()

    async def ensure(self, conn: asyncpg.Connection, months: Iterable[str]) -> list[str]:
        """Make the partitions of ``months`` not known yet; the months made now."""
        missing = sorted(set(months) - self.known)
        if not missing:
            return []
        made = []
        async with conn.transaction():
            await conn.execute(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'")
            for month in missing:
                first = partitions.first_day(month)
                if await conn.fetchval("SELECT usage_records_add_month($1::date)", first):
                    made.append(month)
        self.known.update(missing)
        return made

    def forget(self) -> None:
        """Check every month again next time (a partition may have been dropped)."""
        self.known.clear()


async def ensure_ahead(conn: asyncpg.Connection, now: float) -> list[str]:
    """This month's partition and ``AHEAD`` more (at start)."""
    return await Partitions().ensure(conn, partitions.months_ahead(now))
