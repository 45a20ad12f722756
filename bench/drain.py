"""Usage writer drain benchmark: how fast a backlog of usage records reaches PostgreSQL.

    python -m bench.drain [--records 50000] [--accounts 50] [--batch N] [--repeat 3]

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
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil
from redis.asyncio import Redis

from gateway.infra.db import create_pool, migrate_dsn
from gateway.infra.stores import Stores
from gateway.metering.usage_writer import UsageWriter
from policies import keyspace as rk


def _record(n: int, account: str, run: str) -> dict[str, str]:
    return {
        "request_id": f"req_{run}_{n}", "account": account, "team_id": account[2:],
        "user_id": f"usr_{n % 7}", "key_id": f"key_{n % 13}", "model": "gpt-4o-mini",
        "endpoint": "/v1/chat/completions", "period": "2026-11", "prompt_tokens": "12",
        "completion_tokens": "30", "cached_tokens": "0", "list_cost": "19800", "discount": "0",
        "charged": "19800", "usage_source": "upstream", "encoding": "o200k_base",
        "tags": "project=a,env=b" if n % 2 else "", "status": "200",
        "created_at": str(1_795_000_000_000 + n), "from_allowance": "0", "from_credits": "19800",
    }  # fmt: skip


async def fill(redis: Redis, records: int, accounts: int, run: str) -> None:
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
        pipe.xadd(rk.AccountKeys(name).usage_stream, _record(n, name, run))  # type: ignore[arg-type]
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


def _store_processes(data_dir: Path, redis_port: int) -> list[psutil.Process]:
    """The embedded PostgreSQL's processes (its postmaster and children) and Redis."""
    found = []
    with contextlib.suppress(OSError, ValueError, psutil.Error):
        pid = int((data_dir / "pg" / "postmaster.pid").read_text().split()[0])
        main = psutil.Process(pid)
        found += [main, *main.children(recursive=True)]
    for proc in psutil.process_iter(["cmdline"]):
        if f"127.0.0.1:{redis_port}" in " ".join(proc.info["cmdline"] or []):
            found.append(proc)
    return found


async def one_run(
    db_url: str, redis_url: str, records: int, accounts: int, batch: int | None, data_dir: Path
) -> tuple[float, float, float]:
    """(records/s, writer CPU s, store CPU s)."""
    redis = Redis.from_url(redis_url, decode_responses=True)
    pool = await create_pool(db_url, min_size=1, max_size=2)
    run = secrets.token_hex(3)
    try:
        await fill(redis, records, accounts, run)
        writer = UsageWriter(redis, pool, "bench")
        if batch:
            writer.batch = batch
        stores = _store_processes(data_dir, int(redis_url.rsplit(":", 1)[1].split("/")[0]))
        me = [psutil.Process()]
        cpu_me, cpu_stores = _cpu(me), _cpu(stores)
        started = time.perf_counter()
        moved = await writer.drain()
        took = time.perf_counter() - started
        cpu_me, cpu_stores = _cpu(me) - cpu_me, _cpu(stores) - cpu_stores
        count = await pool.fetchval(
            "SELECT count(*) FROM usage_records WHERE request_id LIKE $1", f"req_{run}_%"
        )
        assert moved == records == count, (moved, records, count)
        return records / took, cpu_me, cpu_stores
    finally:
        await redis.aclose()
        await pool.close()


def _scratch(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path="/" + name))


async def main_async(args: argparse.Namespace) -> None:
    db_url = os.environ.get("MODELBRIDGE_BENCH_DATABASE_URL")
    redis_url = os.environ.get("MODELBRIDGE_BENCH_REDIS_URL")
    with tempfile.TemporaryDirectory(prefix="mb-drain-") as tmp:
        stores = Stores(Path(tmp), db_url, redis_url)
        urls = stores.start()
        try:
            name = f"mbdrain_{secrets.token_hex(4)}"
            admin = await asyncpg.connect(urls.database_url)
            await admin.execute(f'CREATE DATABASE "{name}"')
            await admin.close()
            scratch = _scratch(urls.database_url, name)
            await migrate_dsn(scratch)
            rates = []
            for i in range(args.repeat):
                rate, cpu_me, cpu_stores = await one_run(
                    scratch, urls.redis_url, args.records, args.accounts, args.batch, Path(tmp)
                )
                rates.append(rate)
                alone = args.records / (cpu_me + cpu_stores)
                print(
                    f"run {i + 1}: {args.records} records in {args.accounts} streams: "
                    f"{rate:,.0f} records/s; CPU writer {cpu_me:.2f}s + stores {cpu_stores:.2f}s"
                    f" = {alone:,.0f} records per CPU-second",
                    flush=True,
                )
            print(f"best: {max(rates):,.0f} records/s")
            admin = await asyncpg.connect(urls.database_url)
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
            await admin.close()
        finally:
            stores.stop()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.drain")
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--accounts", type=int, default=50)
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--repeat", type=int, default=3)
    asyncio.run(main_async(parser.parse_args(sys.argv[1:] if argv is None else argv)))


if __name__ == "__main__":
    main()
