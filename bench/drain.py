"""Usage writer drain benchmark: how fast a backlog of usage records reaches PostgreSQL.

    python -m bench.drain [--records 50000] [--accounts 50] [--batch N[,N...]] [--repeat 3]
                          [--layouts partitioned,unpartitioned] [--prefill ROWS]
                          [--methods writer,copy,statement]

``make bench`` runs it as its ``writer`` test (bench/run.py). ``--layouts``: usage_records as
the migrations make it (partitioned by month, migrations/014_partitions.sql) and as it was before
(one table, migrations up to 013), each in a database of its own, the repetitions interleaved
(partitioned, unpartitioned, partitioned, ...) so both see the same machine. ``--prefill``
first puts that many older records in the table, spread over the year before the drained ones
(the sustained case: inserts into a table that already holds a year). ``--batch`` and
``--methods`` (``copy``: every batch by COPY into a temporary table and one INSERT ... SELECT;
``statement``: every batch as one prepared INSERT from unnest() of arrays; ``writer``: as the
writer chooses by batch size) add variants, every combination interleaved with the layouts.

Starts embedded stores in a temporary directory (or uses ``MODELBRIDGE_BENCH_DATABASE_URL`` /
``MODELBRIDGE_BENCH_REDIS_URL``: a scratch database is created there and dropped), fills the
usage streams of ``--accounts`` accounts with ``--records`` records in all, as settles would, and
times :meth:`UsageWriter.drain` until every record is in ``usage_records`` (and its rollup).
Prints records/s per repetition and the best, and the CPU time the drain took in this process
(the writer), in PostgreSQL and in Redis: on a machine shared with other work the wall-clock
rate understates the writer; records / (sum of the CPU times) is what one writer drains when it
has the CPUs to itself (its steps are sequential: read, insert, acknowledge).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import secrets
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil
from redis.asyncio import Redis

from gateway.infra.db import create_pool, migrate_dsn
from gateway.infra.stores import Stores
from gateway.metering.usage_writer import UsageWriter
from policies import keyspace as rk
from policies.usage_record import stream_entry

_FIRST_MS = 1_795_000_000_000  # 2026-11-18: the drained records' created_at (+ n ms)


def _record(n: int, account: str, run: str) -> dict[str, str]:
    return {
        "request_id": f"req_{run}_{n}",
        "account": account,
        "team_id": account[2:],
        "user_id": f"usr_{n % 7}",
        "key_id": f"key_{n % 13}",
        "model": "gpt-4o-mini",
        "endpoint": "/v1/chat/completions",
        "period": "2026-11",
        "prompt_tokens": "12",
        "completion_tokens": "30",
        "cached_tokens": "0",
        "list_cost": "19800",
        "discount": "0",
        "charged": "19800",
        "usage_source": "upstream",
        "encoding": "o200k_base",
        "tags": "project=a,env=b" if n % 2 else "",
        "status": "200",
        "created_at": str(_FIRST_MS + n),
        "from_allowance": "0",
        "from_credits": "19800",
    }


async def fill(redis: Redis, records: int, accounts: int, run: str, mixed: bool = False) -> None:
    """``records`` records over ``accounts`` streams, as settle.lua appends them (``mixed``: the
    odd ones as it did before issue 14, field/value pairs: policies/usage_record.py)."""
    names = [f"t_bench{run}{i:04d}" for i in range(accounts)]
    for name in names:
        stream = rk.AccountKeys(name).usage_stream
        await redis.sadd(rk.usage_registry(name), stream)
        try:
            await redis.xgroup_create(stream, rk.USAGE_GROUP, id="0", mkstream=True)
        except Exception as exc:
            if "BUSYGROUP" not in str(exc):
                raise
    pipe = redis.pipeline(transaction=False)
    for n in range(records):
        name = names[n % accounts]
        stream = rk.AccountKeys(name).usage_stream
        fields = _record(n, name, run)
        pipe.xadd(stream, fields if mixed and n % 2 else stream_entry(fields))  # type: ignore[arg-type]
        if len(pipe) >= 5000:
            await pipe.execute()
    await pipe.execute()


def _cpu(procs: list[psutil.Process]) -> float:
    total = 0.0
    for proc in procs:
        try:
            t = proc.cpu_times()
        except psutil.Error:
            continue
        total += t.user + t.system
    return total


def _store_processes(data_dir: Path) -> tuple[list[psutil.Process], list[psutil.Process]]:
    """The embedded PostgreSQL's processes (its postmaster and children), and Redis."""
    pg, redis = [], []
    with contextlib.suppress(OSError, ValueError, psutil.Error):
        pid = int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])
        main = psutil.Process(pid)
        pg += [main, *main.children(recursive=True)]
    with contextlib.suppress(OSError, ValueError, psutil.Error):
        redis.append(psutil.Process(int((data_dir / "redis" / "redis.pid").read_text().split()[0])))
    return pg, redis


METHODS = {"writer": None, "copy": 1, "statement": 10**9}  # UsageWriter.copy_from


async def one_run(
    db_url: str,
    redis_url: str,
    records: int,
    accounts: int,
    batch: int | None,
    data_dir: Path,
    method: str = "writer",
) -> tuple[float, float, float, float]:
    """(records/s, writer CPU s, PostgreSQL CPU s, Redis CPU s)."""
    redis = Redis.from_url(redis_url, decode_responses=True)
    pool = await create_pool(db_url, min_size=1, max_size=2, reset=False)  # as serve_writer's
    run = secrets.token_hex(3)
    try:
        await fill(redis, records, accounts, run)
        writer = UsageWriter(redis, pool, "bench")
        if batch:
            writer.batch = batch
        copy_from = METHODS[method]
        if copy_from is not None:
            writer.copy_from = copy_from
        pg, redis_procs = _store_processes(data_dir)
        me = [psutil.Process()]
        cpu_me, cpu_pg, cpu_redis = _cpu(me), _cpu(pg), _cpu(redis_procs)
        started = time.perf_counter()
        moved = await writer.drain()
        took = time.perf_counter() - started
        cpu_me, cpu_pg = _cpu(me) - cpu_me, _cpu(pg) - cpu_pg
        cpu_redis = _cpu(redis_procs) - cpu_redis
        count = await pool.fetchval(
            "SELECT count(*) FROM usage_records WHERE request_id LIKE $1", f"req_{run}_%"
        )
        assert moved == records == count, (moved, records, count)
        return records / took, cpu_me, cpu_pg, cpu_redis
    finally:
        with contextlib.suppress(Exception):  # the next run's writer reads only its own streams
            names = [f"t_bench{run}{i:04d}" for i in range(accounts)]
            for name in names:
                await redis.srem(rk.usage_registry(name), rk.AccountKeys(name).usage_stream)
            await redis.delete(*(rk.AccountKeys(name).usage_stream for name in names))
        await redis.aclose()
        await pool.close()


def _scratch(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


LAYOUTS = ("partitioned", "unpartitioned")
_PREFILL = """
INSERT INTO usage_records (request_id, account, team_id, user_id, key_id, model, endpoint, period,
    prompt_tokens, completion_tokens, list_cost, discount, charged, from_allowance, from_credits,
    usage_source, tags, status, created_at)
SELECT 'old_' || g, 't_old' || (g % 1000), 'old' || (g % 1000), 'usr_' || (g % 5000),
    'key_' || (g % 5000), 'gpt-4o', '/v1/chat/completions',
    to_char(at AT TIME ZONE 'UTC', 'YYYY-MM'), 10, 10, 7500, 0, 7500, 0, 7500, 'upstream',
    '{}', 200, at
FROM (SELECT g, $1::timestamptz - (g * $2::float8) * interval '1 second' AS at
      FROM generate_series(1, $3::bigint) AS g) AS s
"""


async def prepare(db_url: str, layout: str, prefill: int) -> None:
    """The schema of ``layout`` and ``prefill`` older records (the year before the drained)."""
    if layout == "partitioned":
        await migrate_dsn(db_url)
    else:
        await migrate_dsn(db_url, until=13)
        conn = await asyncpg.connect(db_url)
        try:  # the writer asks for a month's partition before inserting: none to make here
            await conn.execute(
                "CREATE FUNCTION usage_records_add_month(date) RETURNS boolean"
                " LANGUAGE sql AS 'SELECT false'"
            )
        finally:
            await conn.close()
    if not prefill:
        return
    conn = await asyncpg.connect(db_url)
    try:
        newest = datetime.fromtimestamp(_FIRST_MS / 1000, UTC)
        await conn.execute(
            "SELECT usage_records_add_month(m::date) FROM generate_series("
            " date_trunc('month', ($1::timestamptz - interval '1 year') AT TIME ZONE 'UTC'),"
            " date_trunc('month', $1::timestamptz AT TIME ZONE 'UTC'), interval '1 month') AS m",
            newest,
        )
        await conn.execute(_PREFILL, newest, 365 * 86400 / prefill, prefill)
        await conn.execute("ANALYZE usage_records")
    finally:
        await conn.close()


async def measure(
    records: int,
    accounts: int,
    repeat: int,
    layouts: Sequence[str] = LAYOUTS,
    prefill: int = 0,
    batches: Sequence[int | None] = (None,),
    data_dir: Path | None = None,
    log: Callable[..., None] = print,
    methods: Sequence[str] = ("writer",),
) -> dict[str, Any]:
    """Drain ``records`` over ``accounts`` streams ``repeat`` times into each layout (with each
    batch size and method), interleaved. {"table": {variant: {"rates": [...], "per_cpu_s":
    [...]}}, "verify": {"ok", "errors"}}; a variant is its layout, then its batch and method
    when more than one was asked for."""
    variants = {
        _label(layout, batch if len(batches) > 1 else None, method if len(methods) > 1 else ""): (
            layout,
            batch,
            method,
        )
        for layout in layouts
        for batch in batches
        for method in methods
    }
    db_url = os.environ.get("MODELBRIDGE_BENCH_DATABASE_URL")
    redis_url = os.environ.get("MODELBRIDGE_BENCH_REDIS_URL")
    table: dict[str, dict[str, list[float]]] = {
        label: {"rates": [], "per_cpu_s": [], "pg_us": []} for label in variants
    }
    errors: list[str] = []
    with contextlib.ExitStack() as stack:
        tmp = data_dir or Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="mb-drain-")))
        stores = Stores(tmp, db_url, redis_url)
        urls = stores.start()
        stack.callback(stores.stop)
        admin = await asyncpg.connect(urls.database_url)
        names = {layout: f"mbdrain_{layout[:5]}_{secrets.token_hex(3)}" for layout in layouts}
        try:
            for layout, name in names.items():
                await admin.execute(f'CREATE DATABASE "{name}"')
                await prepare(_scratch(urls.database_url, name), layout, prefill)
            for i in range(repeat):
                for label, (layout, batch, method) in variants.items():
                    scratch = _scratch(urls.database_url, names[layout])
                    try:
                        rate, cpu_me, cpu_pg, cpu_redis = await one_run(
                            scratch, urls.redis_url, records, accounts, batch, tmp, method
                        )
                    except AssertionError as exc:
                        errors.append(f"{label}: records missing {exc}")
                        continue
                    per_cpu = records / (cpu_me + cpu_pg + cpu_redis)
                    table[label]["rates"].append(rate)
                    table[label]["per_cpu_s"].append(per_cpu)
                    table[label]["pg_us"].append(cpu_pg * 1e6 / records)
                    log(
                        f"writer run {i + 1} {label}: {records} records in {accounts} streams: "
                        f"{rate:,.0f} records/s; CPU writer {cpu_me:.2f}s + stores "
                        f"{cpu_pg + cpu_redis:.2f}s (PostgreSQL {cpu_pg:.2f}s) = "
                        f"{per_cpu:,.0f} records per CPU-second"
                    )
        finally:
            for name in names.values():
                await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()
    return {
        "records": records,
        "accounts": accounts,
        "prefill": prefill,
        "table": table,
        "verify": {"ok": not errors, "errors": errors},
    }


def markdown(found: dict[str, Any]) -> str:
    lines = [
        f"{found['records']:,} usage records in {found['accounts']} streams drained into "
        f"PostgreSQL by one writer ({found['prefill']:,} older records in the table first); "
        "median [min – max]. Per CPU-second: records / (writer + PostgreSQL + Redis CPU time), "
        "what one writer drains with the CPUs to itself.",
        "",
        "| usage_records | records/s | records per CPU-second | PostgreSQL CPU µs per record |",
        "|---|---|---|---|",
    ]
    for layout, cells in found["table"].items():
        lines.append(
            f"| {layout} | {_cell(cells['rates'])} | {_cell(cells['per_cpu_s'])} "
            f"| {_cell(cells.get('pg_us', []))} |"
        )
    if not found["verify"]["ok"]:
        lines += ["", "FAILED: " + "; ".join(found["verify"]["errors"])]
    return "\n".join(lines) + "\n"


def _label(layout: str, batch: int | None, method: str) -> str:
    return " ".join([layout] + ([f"batch {batch}"] if batch else []) + ([method] if method else []))


def _cell(values: list[float]) -> str:
    if not values:
        return "–"
    return f"{statistics.median(values):,.0f} [{min(values):,.0f} – {max(values):,.0f}]"


def run(
    data_dir: Path, repeat: int, log: Callable[..., None], records: int = 50_000
) -> dict[str, Any]:
    """``make bench``'s writer test: both layouts, 50 streams, no prefill."""
    data_dir.mkdir(parents=True, exist_ok=True)
    return asyncio.run(measure(records, 50, repeat, data_dir=data_dir, log=log))


async def main_async(args: argparse.Namespace) -> None:
    layouts = [layout for layout in args.layouts.split(",") if layout]
    batches = [int(b) for b in args.batch.split(",")] if args.batch else [None]
    methods = [m for m in args.methods.split(",") if m]
    found = await measure(
        args.records, args.accounts, args.repeat, layouts, args.prefill, batches, methods=methods
    )
    print(markdown(found))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.drain")
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--accounts", type=int, default=50)
    parser.add_argument("--batch", default="", help="records per step, or several: 20,2000")
    parser.add_argument("--methods", default="writer", help="writer, copy, statement")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--layouts", default=",".join(LAYOUTS))
    parser.add_argument("--prefill", type=int, default=0, help="older records in the table first")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    if set(args.layouts.split(",")) - set(LAYOUTS):
        parser.error(f"--layouts: choose from {', '.join(LAYOUTS)}")
    if set(args.methods.split(",")) - set(METHODS):
        parser.error(f"--methods: choose from {', '.join(METHODS)}")
    asyncio.run(main_async(args))


if __name__ == "__main__":
    main()
