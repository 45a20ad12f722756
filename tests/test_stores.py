"""The embedded default stores: real PostgreSQL and Redis in a temp dir, no mocks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlsplit

import asyncpg
import psutil
import pytest
import redis.asyncio as aioredis

from gateway.infra.stores import StoreError, Stores, StoreURLs

ROOT = Path(__file__).resolve().parent.parent

# Starts the stores, prints their URLs and dies without stopping them, as a crash would.
CRASHING_RUN = (
    "import os, sys\n"
    "from pathlib import Path\n"
    "from gateway.infra.stores import Stores\n"
    "urls = Stores(Path(sys.argv[1])).start()\n"
    "print(urls.database_url, urls.redis_url, urls.database_tcp_url, urls.redis_tcp_url,"
    " flush=True)\n"
    "os._exit(0)\n"
)


def _port(url: str) -> int:
    port = urlsplit(url).port
    assert port is not None
    return port


def _port_free(url: str) -> bool:
    """Nothing listens on the URL's port and a server could bind it again."""
    with socket.socket() as sock:
        if sock.connect_ex(("127.0.0.1", _port(url))) == 0:
            return False
    with socket.socket() as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", _port(url)))
    return True


async def _write(urls: StoreURLs, value: str) -> None:
    conn = await asyncpg.connect(urls.database_url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS kv (k text PRIMARY KEY, v text NOT NULL)")
        await conn.execute(
            "INSERT INTO kv VALUES ('k', $1) ON CONFLICT (k) DO UPDATE SET v = $1", value
        )
    finally:
        await conn.close()
    client = aioredis.from_url(urls.redis_url)
    try:
        await client.set("k", value)
    finally:
        await client.aclose()


async def _read(urls: StoreURLs) -> tuple[object, object]:
    conn = await asyncpg.connect(urls.database_url)
    try:
        from_pg = await conn.fetchval("SELECT v FROM kv WHERE k = 'k'")
    finally:
        await conn.close()
    client = aioredis.from_url(urls.redis_url)
    try:
        from_redis = await client.get("k")
    finally:
        await client.aclose()
    return from_pg, from_redis


async def test_data_survives_a_restart_and_the_ports_are_freed(tmp_path: Path) -> None:
    stores = Stores(tmp_path)
    urls = stores.start()
    port = _port(urls.database_tcp_url)
    pg_socket, redis_socket = (
        tmp_path / "pg" / f".s.PGSQL.{port}",
        tmp_path / "redis" / "redis.sock",
    )
    assert urls == StoreURLs(
        f"postgresql://modelbridge@/modelbridge?host={tmp_path / 'pg'}&port={port}",
        f"unix://{redis_socket}?db=0",
        f"postgresql://modelbridge@127.0.0.1:{port}/modelbridge",
        f"redis://127.0.0.1:{_port(urls.redis_tcp_url)}/0",
    )
    assert pg_socket.is_socket() and redis_socket.is_socket()
    assert oct(redis_socket.stat().st_mode & 0o777) == "0o700"
    with pytest.raises(StoreError, match="in use by another process"):
        Stores(tmp_path).start()
    await _write(urls, "one")
    tcp = StoreURLs(urls.database_tcp_url, urls.redis_tcp_url)
    assert await _read(tcp) == ("one", b"one")  # one server each, on both paths

    stores.stop()
    stores.stop()
    assert _port_free(urls.database_tcp_url)
    assert _port_free(urls.redis_tcp_url)
    assert not pg_socket.exists() and not redis_socket.exists()
    assert not (tmp_path / "pg" / "postmaster.pid").exists()

    # a stale postmaster.pid naming a live process that is not our server (pid reuse)
    (tmp_path / "pg" / "postmaster.pid").write_text(f"{os.getpid()}\n{tmp_path / 'pg'}\n")
    with Stores(tmp_path) as again:
        assert await _read(again) == ("one", b"one")
    assert _port_free(again.database_tcp_url)
    assert _port_free(again.redis_tcp_url)


async def test_servers_left_by_a_crashed_run_are_stopped_and_data_kept(tmp_path: Path) -> None:
    crashed = subprocess.run(
        [sys.executable, "-c", CRASHING_RUN, str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    orphans = StoreURLs(*crashed.stdout.split())
    await _write(orphans, "two")  # both servers outlived the process that started them

    with Stores(tmp_path) as urls:
        assert _port_free(orphans.database_tcp_url)
        assert _port_free(orphans.redis_tcp_url)
        assert await _read(urls) == ("two", b"two")


async def test_given_urls_are_passed_through_and_nothing_is_started(tmp_path: Path) -> None:
    given = StoreURLs("postgresql://app:secret@db.example:5432/gw", "rediss://cache.example:6380/2")
    children = psutil.Process().children(recursive=True)
    with Stores(tmp_path / "both", given.database_url, given.redis_url) as urls:
        assert urls == given
        assert psutil.Process().children(recursive=True) == children
    assert not (tmp_path / "both").exists()

    # a data dir whose socket path would not fit in sun_path: Redis on loopback TCP only
    deep = tmp_path / ("d" * (107 - len(f"{tmp_path}/redis/redis.sock")))
    with Stores(deep, database_url=given.database_url) as urls:
        assert urls.database_url == given.database_url
        assert urls.redis_url == urls.redis_tcp_url
        assert urls.redis_url == f"redis://127.0.0.1:{_port(urls.redis_url)}/0"
        client = aioredis.from_url(urls.redis_url)
        try:
            assert await client.ping()
        finally:
            await client.aclose()
    assert not (deep / "pg").exists()
    assert not (deep / "redis" / "redis.sock").exists()
    assert _port_free(urls.redis_url)
