"""Usage-report benchmark: a year of usage for one team, timed for every ``group_by``.

    python -m bench.usage_bench [--rows 1000000] [--other-rows N] [--repeat 5] [--explain]

Creates a scratch database (on ``MODELBRIDGE_BENCH_DATABASE_URL`` when set, else on embedded
stores started in a temporary directory), applies the migrations, fills ``--rows`` records for
one team spread evenly over the last 365 days (50 members, 200 keys, 4 models, 3 tag sets) plus
``--other-rows`` records of 1000 other teams interleaved in time, and times the SQL the endpoint
runs (:func:`gateway.api.usage.build_query`) for a one-year range (best and median of
``--repeat`` runs) and for this month so far (best). The scratch database is dropped at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from gateway.api.usage import build_query
from gateway.infra.db import migrate_dsn
from gateway.infra.stores import Stores
from policies import reports
from policies.reports import GroupBy

TEAM = "team_bench000000000000000"
ACCOUNT = f"t_{TEAM}"
MEMBERS, KEYS = 50, 200

_FILL = """
INSERT INTO usage_records (request_id, account, team_id, user_id, key_id, model, endpoint, period,
    prompt_tokens, completion_tokens, list_cost, discount, charged, from_allowance, from_credits,
    usage_source, tags, status, created_at)
SELECT 'req_' || $1 || '_' || g, $2, $3, 'usr_b' || (g % $4), 'key_b' || (g % $5),
    (ARRAY['gpt-4o-mini', 'gpt-4o', 'text-embedding-3-small', 'o1'])[1 + g % 4],
    '/v1/chat/completions', to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM'),
    100 + g % 900, g % 500, (100 + g % 900) * 150 + (g % 500) * 600,
    ((100 + g % 900) * 150 + (g % 500) * 600) / 10,
    ((100 + g % 900) * 150 + (g % 500) * 600) - ((100 + g % 900) * 150 + (g % 500) * 600) / 10,
    0, 0, 'upstream',
    CASE g % 3 WHEN 0 THEN ARRAY['project=search', 'env=prod'] WHEN 1 THEN ARRAY['project=chat']
        ELSE '{}'::text[] END,
    200, ts
FROM (SELECT g, $6::timestamptz + ((g - 1) * $7::float8) * interval '1 second' AS ts
      FROM generate_series($8::bigint, $9::bigint) AS g) AS s
"""
_FILL_OTHERS = """
INSERT INTO usage_records (request_id, account, team_id, user_id, key_id, model, endpoint, period,
    prompt_tokens, completion_tokens, list_cost, discount, charged, from_allowance, from_credits,
    usage_source, tags, status, created_at)
SELECT 'oreq_' || g, 't_team_o' || (g % 1000), 'team_o' || (g % 1000), 'usr_o' || (g % 5000),
    'key_o' || (g % 5000), 'gpt-4o', '/v1/chat/completions',
    to_char(ts AT TIME ZONE 'UTC', 'YYYY-MM'), 10, 10, 7500, 0, 7500, 0, 0, 'upstream', '{}', 200,
    ts
FROM (SELECT g, $1::timestamptz + (g * $2::float8) * interval '1 second' AS ts
      FROM generate_series(1, $3::bigint) AS g) AS s
"""
_PEOPLE = """
INSERT INTO users (id, email, name, password_hash)
SELECT 'usr_b' || i, 'member' || i || '@bench.example', 'Member ' || i, '-'
FROM generate_series(0, $1 - 1) AS i;
"""


def _with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


async def fill(conn: asyncpg.Connection, rows: int, other_rows: int, start: datetime) -> None:
    year_s = 365 * 24 * 3600
    await conn.execute(_PEOPLE, MEMBERS)
    await conn.execute(
        "INSERT INTO teams (id, name, owner_id) VALUES ($1, 'Bench', 'usr_b0')", TEAM
    )
    await conn.execute(
        "INSERT INTO api_keys (id, hash, prefix, name, user_id, team_id)"
        " SELECT 'key_b' || i, sha256(('k' || i)::bytea), 'mb_' || lpad(i::text, 8, '0'),"
        " 'key ' || i, 'usr_b' || (i % $1), $2 FROM generate_series(0, $3 - 1) AS i",
        MEMBERS,
        TEAM,
        KEYS,
    )
    # usage_records is partitioned by month (migrations/014_partitions.sql): the year's months.
    await conn.execute(
        "SELECT usage_records_add_month(m::date) FROM generate_series("
        " date_trunc('month', $1::timestamptz AT TIME ZONE 'UTC'),"
        " date_trunc('month', ($1::timestamptz + interval '1 year') AT TIME ZONE 'UTC'),"
        " interval '1 month') AS m",
        start,
    )
    step = 200_000
    for low in range(1, rows + 1, step):
        high = min(rows, low + step - 1)
        await conn.execute(
            _FILL, "b", ACCOUNT, TEAM, MEMBERS, KEYS, start, year_s / rows, low, high
        )
        print(f"  team rows {high:>10,}", end="\r", file=sys.stderr, flush=True)
    if other_rows:
        await conn.execute(_FILL_OTHERS, start, year_s / other_rows, other_rows)
    print(file=sys.stderr)
    # The usage writer keeps usage_daily in step record by record; a bulk fill rolls up at once.
    await conn.execute(
        "INSERT INTO usage_daily SELECT account, (created_at AT TIME ZONE 'UTC')::date, user_id,"
        " key_id, model, tags, count(*), sum(prompt_tokens), sum(completion_tokens),"
        " sum(list_cost), sum(discount), sum(charged) FROM usage_records"
        " GROUP BY 1, 2, 3, 4, 5, 6"
    )
    await conn.execute("VACUUM ANALYZE usage_records")
    await conn.execute("VACUUM ANALYZE usage_daily")


async def _timed(
    conn: asyncpg.Connection, sql: str, args: tuple[object, ...], repeat: int
) -> tuple[list[asyncpg.Record], list[float]]:
    took, records = [], []
    for _ in range(repeat):
        began = time.perf_counter()
        records = await conn.fetch(sql, *args)
        took.append((time.perf_counter() - began) * 1000)
    return records, took


async def time_reports(
    conn: asyncpg.Connection, year: reports.DayRange, repeat: int, explain: bool
) -> list[tuple[str, int, int, float, float, float]]:
    """Per group_by: groups, requests, best and median ms over the year, best ms this month."""
    month = reports.DayRange(year.last.replace(day=1), year.last)
    results = []
    for group_by in GroupBy:
        sql = build_query(group_by)
        args = (ACCOUNT, year.start, year.end)
        if explain:
            plan = await conn.fetch("EXPLAIN (ANALYZE, BUFFERS) " + sql, *args)
            print(f"--- {group_by.value}\n" + "\n".join(r[0] for r in plan), file=sys.stderr)
        records, took = await _timed(conn, sql, args, repeat)
        _, month_took = await _timed(conn, sql, (ACCOUNT, month.start, month.end), repeat)
        groups, requests = len(records) - 1, records[-1]["requests"]
        results.append(
            (group_by.value, groups, requests, min(took), statistics.median(took), min(month_took))
        )
    return results


async def run(server_url: str, rows: int, other_rows: int, repeat: int, explain: bool) -> None:
    name = f"mb_usage_bench_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(server_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    dsn = _with_database(server_url, name)
    try:
        await migrate_dsn(dsn)
        conn = await asyncpg.connect(dsn)
        try:
            now = datetime.now(UTC)
            rng = reports.DayRange(now.date() - timedelta(days=364), now.date())
            began = time.perf_counter()
            await fill(conn, rows, other_rows, rng.start)
            print(
                f"filled {rows:,} team rows + {other_rows:,} others "
                f"in {time.perf_counter() - began:.1f} s",
                file=sys.stderr,
            )
            version = await conn.fetchval("SHOW server_version")
            results = await time_reports(conn, rng, repeat, explain)
        finally:
            await conn.close()
    finally:
        admin = await asyncpg.connect(server_url)
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()
    print(
        f"PostgreSQL {version}; {rows:,} team rows, {other_rows:,} other rows; "
        f"range {rng.first} .. {rng.last}; best and median of {repeat}"
    )
    print(
        f"{'group_by':<10}{'groups':>8}{'requests':>12}{'year best ms':>14}{'year median ms':>16}"
        f"{'month best ms':>15}"
    )
    for group_by, groups, requests, best, median, month in results:
        print(f"{group_by:<10}{groups:>8}{requests:>12,}{best:>14.1f}{median:>16.1f}{month:>15.1f}")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.usage_bench", description=__doc__)
    parser.add_argument("--rows", type=int, default=1_000_000)
    parser.add_argument("--other-rows", type=int, default=None, help="default: --rows / 2")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--explain", action="store_true", help="print each plan to stderr")
    args = parser.parse_args(argv)
    other = args.rows // 2 if args.other_rows is None else args.other_rows
    url = os.environ.get("MODELBRIDGE_BENCH_DATABASE_URL")
    if url:
        asyncio.run(run(url, args.rows, other, args.repeat, args.explain))
        return
    with tempfile.TemporaryDirectory(prefix="mb-usage-bench-") as tmp, Stores(Path(tmp)) as urls:
        asyncio.run(run(urls.database_url, args.rows, other, args.repeat, args.explain))


if __name__ == "__main__":
    main()
