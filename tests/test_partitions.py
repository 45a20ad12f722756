"""usage_records partitioned by month (migrations/014_partitions.sql, gateway/infra/partitions.py):
the migration carries every row, index and statistic over; the writer makes a month's partition
on demand and still writes a record delivered twice once, on both sides of a month boundary."""

from __future__ import annotations

import contextlib
import secrets
from collections.abc import AsyncIterator
from datetime import UTC, date, datetime
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from redis.asyncio import Redis
from redis.exceptions import ResponseError

from bench.drain import _record
from gateway.infra.db import create_pool, migrate_dsn
from gateway.metering.usage_writer import UsageWriter
from policies import keyspace as rk
from policies import partitions
from tests.helpers import ts
from tests.writer_support import OwnRedis


@pytest.mark.parametrize(
    ("now", "months"),
    [
        ("2026-11-28T05:00:00", ["2026-11", "2026-12", "2027-01", "2027-02"]),
        ("2026-12-31T23:59:59", ["2026-12", "2027-01", "2027-02", "2027-03"]),
        ("2027-01-01T00:00:00", ["2027-01", "2027-02", "2027-03", "2027-04"]),
    ],
)
def test_months_ahead(now: str, months: list[str]) -> None:
    assert partitions.months_ahead(ts(now)) == months


@pytest.mark.parametrize(
    ("at", "month"),
    [
        (datetime(2033, 5, 31, 23, 59, 59, 999000, tzinfo=UTC), "2033-05"),
        (datetime(2033, 6, 1, tzinfo=UTC), "2033-06"),
        (datetime.fromisoformat("2033-06-01T01:00:00+02:00"), "2033-05"),  # UTC decides
    ],
)
def test_month_of(at: datetime, month: str) -> None:
    assert partitions.month_of(at) == month
    assert partitions.first_day(month) == date(int(month[:4]), int(month[5:]), 1)


@pytest.fixture
async def scratch_db(database_url: str) -> AsyncIterator[str]:
    """A database of this test's own (migrated by the test as far as it needs)."""
    name = f"mbpart_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    yield urlunsplit(urlsplit(database_url)._replace(path="/" + name))
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


_INSERT_OLD = """
INSERT INTO usage_records (request_id, account, team_id, user_id, key_id, model, endpoint, period,
  prompt_tokens, completion_tokens, list_cost, discount, charged, from_allowance, from_credits,
  usage_source, tags, status, created_at)
SELECT 'req_' || n, 't_t' || (n % 3), 't' || (n % 3), 'usr_' || (n % 5), 'key_' || (n % 7),
  'gpt-4o-mini', '/v1/chat/completions', to_char(at AT TIME ZONE 'UTC', 'YYYY-MM'), 10, 20,
  1000 + n, 0, 1000 + n, 0, 1000 + n, 'upstream', '{a=1}', 200, at
FROM (SELECT n, timestamptz '2019-01-15 00:00:00+00' + (n * interval '9 days') AS at
      FROM generate_series(1, 300) AS n) s
"""
_DIGEST = (
    "SELECT count(*), sum(charged)::text, md5(string_agg(request_id || created_at::text || "
    "account || period || charged::text, ',' ORDER BY request_id)) FROM usage_records"
)


async def test_the_migration_partitions_every_row_index_and_statistic(scratch_db: str) -> None:
    await migrate_dsn(scratch_db, until=13)
    conn = await asyncpg.connect(scratch_db)
    try:
        await conn.execute(_INSERT_OLD)  # 300 records over 7 years and a half, 2019-01 on
        before = tuple(await conn.fetchrow(_DIGEST))
        indexes = {r[0] for r in await conn.fetch(_INDEXES)}
        assert {"usage_team_time", "usage_account_time"} <= indexes
        await migrate_dsn(scratch_db)

        kind = "SELECT relkind::text FROM pg_class WHERE relname = 'usage_records'"
        assert await conn.fetchval(kind) == "p"  # partitioned
        assert tuple(await conn.fetchrow(_DIGEST)) == before == (300, before[1], before[2])
        months = await conn.fetch(
            "SELECT c.relname, pg_get_expr(c.relpartbound, c.oid) AS bound FROM pg_inherits i"
            " JOIN pg_class c ON c.oid = i.inhrelid"
            " WHERE i.inhparent = 'usage_records'::regclass ORDER BY 1"
        )
        names = [m["relname"] for m in months]
        assert names[0] == "usage_records_2019_01"
        assert "usage_records_2026_07" in names  # the last old row's month (2026-07-29)
        # this month and the next ones are there (the runner made them ahead), no DEFAULT
        for month in partitions.months_ahead(datetime.now(UTC).timestamp()):
            assert f"usage_records_{month.replace('-', '_')}" in names
        assert not [m for m in months if m["bound"] == "DEFAULT"]
        assert months[0]["bound"] == (
            "FOR VALUES FROM ('2019-01-01 00:00:00+00') TO ('2019-02-01 00:00:00+00')"
        )
        # every row in its month's partition
        assert not await conn.fetchval(
            "SELECT count(*) FROM usage_records WHERE tableoid::regclass::text <>"
            " 'usage_records_' || to_char(created_at AT TIME ZONE 'UTC', 'YYYY_MM')"
        )
        assert {r[0] for r in await conn.fetch(_INDEXES)} == indexes
        assert (
            await conn.fetchval(
                "SELECT pg_get_constraintdef(oid) FROM pg_constraint"
                " WHERE conrelid = 'usage_records'::regclass AND contype = 'p'"
            )
            == "PRIMARY KEY (request_id, created_at)"
        )
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM pg_statistic_ext WHERE stxname = 'usage_records_day'"
                " AND stxrelid = 'usage_records'::regclass"
            )
            == 1
        )
        assert await conn.fetchval("SELECT to_regclass('usage_records_unpartitioned')") is None
        # a report's query is pruned to the partitions of its range
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN SELECT count(*) FROM usage_records WHERE account = 't_t1'"
                " AND created_at >= '2020-03-01 00:00+00' AND created_at < '2020-04-01 00:00+00'"
            )
        )
        assert "usage_records_2020_03" in plan and "usage_records_2020_04" not in plan
    finally:
        await conn.close()


_INDEXES = (
    "SELECT indexrelid::regclass::text FROM pg_index"
    " WHERE indrelid = 'usage_records'::regclass AND NOT indisprimary"
)


def _at_ms(at: datetime) -> str:
    return str(int(at.timestamp() * 1000))


async def _add(redis: Redis, fields: dict[str, str]) -> None:
    stream = rk.AccountKeys(fields["account"]).usage_stream
    await redis.sadd(rk.usage_registry(fields["account"]), stream)
    with contextlib.suppress(ResponseError):  # BUSYGROUP: made before
        await redis.xgroup_create(stream, rk.USAGE_GROUP, id="0", mkstream=True)
    await redis.xadd(stream, fields)  # type: ignore[arg-type]


async def test_a_record_delivered_twice_across_a_month_boundary_is_one_row(
    database_url: str, own_redis: OwnRedis, db: asyncpg.Connection
) -> None:
    run = secrets.token_hex(3)
    account = f"t_part{run}"
    # The last millisecond of May 2033 and the first of June: months nobody made ahead.
    last = _record(1, account, run) | {
        "created_at": _at_ms(datetime(2033, 5, 31, 23, 59, 59, 999000, tzinfo=UTC))
    }
    first = _record(2, account, run) | {"created_at": _at_ms(datetime(2033, 6, 1, tzinfo=UTC))}
    pool = await create_pool(database_url, min_size=1, max_size=2)
    writer = UsageWriter(own_redis.client, pool, "test-part")
    try:
        for fields in (last, first):
            await _add(own_redis.client, fields)
        assert await writer.drain() == 2
        # Delivered again (a crash between the commit and the acknowledgement, or a replay: the
        # record carries the created_at of its admission, so it is the same row again).
        for fields in (last, first):
            await _add(own_redis.client, fields)
        assert await writer.drain() == 2
        rows = await db.fetch(
            "SELECT request_id, tableoid::regclass::text AS part FROM usage_records"
            " WHERE account = $1 ORDER BY request_id",
            account,
        )
        assert [(r["request_id"], r["part"]) for r in rows] == [
            (f"req_{run}_1", "usage_records_2033_05"),
            (f"req_{run}_2", "usage_records_2033_06"),
        ]
        daily = await db.fetch(
            "SELECT day, requests, charged FROM usage_daily WHERE account = $1 ORDER BY day",
            account,
        )
        assert [tuple(d) for d in daily] == [
            (date(2033, 5, 31), 1, 19_800),
            (date(2033, 6, 1), 1, 19_800),
        ]
        assert not await db.fetchval(
            "SELECT count(*) FROM usage_rejects WHERE fields->>'account' = $1", account
        )
    finally:
        await pool.close()


async def test_a_partition_dropped_after_it_was_seen_is_made_again_by_the_insert(
    database_url: str, own_redis: OwnRedis, db: asyncpg.Connection
) -> None:
    run = secrets.token_hex(3)
    account = f"t_part{run}"
    pool = await create_pool(database_url, min_size=1, max_size=2)
    writer = UsageWriter(own_redis.client, pool, "test-part")
    writer._next_ahead = float("inf")  # the hourly check (which checks again) is not due
    try:
        async with pool.acquire() as conn:
            await writer.partitions.ensure(conn, ["2034-07"])
        await db.execute("DROP TABLE usage_records_2034_07")  # empty: dropped by hand
        fields = _record(1, account, run) | {"created_at": _at_ms(datetime(2034, 7, 4, tzinfo=UTC))}
        await _add(own_redis.client, fields)
        assert await writer.drain() == 1
        assert (
            await db.fetchval(
                "SELECT tableoid::regclass::text FROM usage_records WHERE account = $1", account
            )
            == "usage_records_2034_07"
        )
    finally:
        await pool.close()
