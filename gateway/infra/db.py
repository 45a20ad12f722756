"""PostgreSQL: the connection pool and the ordered SQL migrations.

Migrations are the files ``migrations/NNN_name.sql``, applied in order at start inside one
transaction each and recorded in ``schema_migrations``. A session advisory lock serialises
concurrent starters (several workers, several replicas). Then the monthly partitions of
``usage_records`` are made ahead (gateway/infra/partitions.py).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import asyncpg

from gateway.infra.partitions import ensure_ahead

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_MIGRATION_LOCK = 0x6D6F64656C  # "model"

log = logging.getLogger("modelbridge.db")


def migration_files() -> list[tuple[int, str, Path]]:
    found = []
    for path in sorted(MIGRATIONS_DIR.glob("*.sql")):
        version, _, name = path.stem.partition("_")
        found.append((int(version), name, path))
    return found


async def migrate(conn: asyncpg.Connection, until: int | None = None) -> list[int]:
    """Apply every migration not applied yet (up to version ``until``, for tests of a migration
    on the schema before it); return the versions applied now."""
    applied_now: list[int] = []
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await conn.execute(
            "CREATE TABLE IF NOT EXISTS schema_migrations ("
            " version integer PRIMARY KEY, name text NOT NULL,"
            " applied_at timestamptz NOT NULL DEFAULT now())"
        )
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
        for version, name, path in migration_files():
            if version in done or (until is not None and version > until):
                continue
            async with conn.transaction():
                await conn.execute(path.read_text())
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name) VALUES ($1, $2)", version, name
                )
            log.info("applied migration %03d_%s", version, name)
            applied_now.append(version)
        made = await ensure_ahead(conn, time.time()) if until is None else []
        if made:
            log.info("made usage_records partitions for %s", ", ".join(made))
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)
    return applied_now


async def migrations_pending(conn: asyncpg.Connection) -> list[int]:
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done = set()
    if exists:
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    return [v for v, _, _ in migration_files() if v not in done]


async def create_pool(
    dsn: str, *, min_size: int = 1, max_size: int = 10, reset: bool = True
) -> asyncpg.Pool:
    """``reset=False``: a connection goes back to the pool as it is (an open transaction still
    rolled back) without asyncpg's reset query (advisory locks, cursors, LISTEN, settings): a
    round trip per release, for a pool whose users leave none of these behind."""
    pool = await asyncpg.create_pool(
        dsn, min_size=min_size, max_size=max_size, reset=None if reset else _keep_session
    )
    assert pool is not None
    return pool


async def _keep_session(conn: asyncpg.Connection) -> None:
    return None


async def migrate_dsn(dsn: str, until: int | None = None) -> list[int]:
    conn = await asyncpg.connect(dsn)
    try:
        return await migrate(conn, until)
    finally:
        await conn.close()
