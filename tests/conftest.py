"""Fixtures: real PostgreSQL and Redis, the fake OpenAI upstream, and the gateway itself.

Stores: ``MODELBRIDGE_TEST_DATABASE_URL`` / ``MODELBRIDGE_TEST_REDIS_URL`` when set (a fresh
database is created on that server for the session and dropped after; the Redis database is
flushed at the start), else the same embedded servers ``make run`` uses, started once per session
in a temporary directory. The only fake is the LLM provider (``tests/fake_upstream.py``).
"""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from redis.asyncio import Redis

from gateway.config import Config, parse_config
from gateway.infra.stores import Stores, StoreURLs
from gateway.state import Clock, Runtime
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api

ADMIN_TOKEN = "test-admin-token"
UPSTREAM_KEY = "sk-upstream-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


@pytest.fixture(scope="session")
def store_urls() -> Iterator[StoreURLs]:
    db_url = os.environ.get("MODELBRIDGE_TEST_DATABASE_URL")
    redis_url = os.environ.get("MODELBRIDGE_TEST_REDIS_URL")
    with tempfile.TemporaryDirectory(prefix="mb-test-stores-") as tmp:
        stores = Stores(Path(tmp), db_url, redis_url)
        urls = stores.start()
        try:
            yield urls
        finally:
            stores.stop()


@pytest.fixture(scope="session")
async def database_url(store_urls: StoreURLs) -> AsyncIterator[str]:
    name = f"mbtest_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(store_urls.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    yield _with_database(store_urls.database_url, name)
    admin = await asyncpg.connect(store_urls.database_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture(scope="session")
async def redis_url(store_urls: StoreURLs) -> str:
    client = Redis.from_url(store_urls.redis_url)
    await client.flushdb()
    await client.aclose()
    return store_urls.redis_url


@pytest.fixture(scope="session")
async def fake() -> AsyncIterator[FakeUpstream]:
    upstream = FakeUpstream(api_key=UPSTREAM_KEY)
    await upstream.start()
    yield upstream
    await upstream.stop()


def gateway_config(upstream_url: str, **server: Any) -> Config:
    raw = {
        # Every test signs up from 127.0.0.1: no signup limit unless a test sets one.
        "server": {
            "host": "127.0.0.1",
            "port": 0,
            "shutdown_timeout_s": 5,
            "signups_per_hour": 0,
            **server,
        },
        "upstreams": {
            "fake": {
                "base_url": upstream_url,
                "api_key_env": "MB_TEST_UPSTREAM_KEY",
                "timeout_s": 3,
            }
        },
        "models": {
            "gpt-4o-mini": {
                "upstream": "fake",
                "upstream_model": "gpt-4o-mini",
                "input_per_mtok": 0.15,
                "cached_input_per_mtok": 0.075,
                "output_per_mtok": 0.60,
                "max_output_tokens": 1000,
                "encoding": "o200k_base",
            },
            "gpt-4o": {
                "upstream": "fake",
                "upstream_model": "gpt-4o-2024-08-06",
                "input_per_mtok": 2.50,
                "output_per_mtok": 10.00,
                "max_output_tokens": 1000,
                "encoding": "o200k_base",
            },
            "text-embedding-3-small": {
                "upstream": "fake",
                "input_per_mtok": 0.02,
                "output_per_mtok": 0,
                "max_output_tokens": 0,
                "encoding": "cl100k_base",
            },
        },
        "plans": {
            "starter": {"seat_price": 10.00, "included_usage_per_seat": 2.00},
            "pro": {"seat_price": 20.00, "included_usage_per_seat": 5.00},
        },
        "alerts": {"allow_private_urls": True},  # the webhook receivers listen on loopback
    }
    os.environ["MB_TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
    return parse_config(raw, {})


@dataclass
class Gateway:
    app: web.Application
    base: str  # http://127.0.0.1:PORT
    clock: Clock
    config: Config

    @property
    def v1(self) -> str:
        return self.base + "/v1"


async def start_gateway(
    config: Config, database_url: str, redis_url: str, data_dir: str = ""
) -> tuple[Gateway, web.AppRunner]:
    from gateway.app import build_app
    from gateway.proxy.front import FrontSite

    clock = Clock()
    runtime = Runtime(database_url, redis_url, ADMIN_TOKEN, data_dir=data_dir)
    app = build_app(config, runtime, clock)
    runner = web.AppRunner(app, shutdown_timeout=2)
    await runner.setup()
    port = free_port()
    site = FrontSite(runner, "127.0.0.1", port)
    await site.start()
    return Gateway(app, f"http://127.0.0.1:{port}", clock, config), runner


@pytest.fixture(scope="session")
async def gateway(fake: FakeUpstream, database_url: str, redis_url: str) -> AsyncIterator[Gateway]:
    gw, runner = await start_gateway(gateway_config(fake.base_url), database_url, redis_url)
    yield gw
    await runner.cleanup()


@pytest.fixture(autouse=True)
def _fresh_fake_and_clock(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "fake" in request.fixturenames:
        request.getfixturevalue("fake").reset()
    if "gateway" in request.fixturenames:
        clock = request.getfixturevalue("gateway").clock
        clock.fixed, clock.offset = None, 0.0


@pytest.fixture(scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def api(http: aiohttp.ClientSession, gateway: Gateway) -> Api:
    return Api(http, gateway.base, ADMIN_TOKEN)


@pytest.fixture
async def db(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database_url)
    yield conn
    await conn.close()


@pytest.fixture
async def redis(redis_url: str) -> AsyncIterator[Redis]:
    client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()
