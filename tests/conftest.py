"""Fixtures: real PostgreSQL and Redis, the fake OpenAI upstream, and the gateway itself.

Stores: ``MODELBRIDGE_TEST_DATABASE_URL`` / ``MODELBRIDGE_TEST_REDIS_URL`` when set (a fresh
database is created on that server for the session and dropped after; the Redis database is
flushed at the start), else the same embedded servers ``make run`` uses, started once per session
in a temporary directory. The only fake is the LLM provider (``tests/fake_upstream.py``).

Redis Cluster: with ``--redis-cluster`` (or ``MODELBRIDGE_TEST_CLUSTER=1``; ``make test-cluster``)
the session's Redis is a real cluster of 3 masters + 3 replicas on loopback
(``tests/redis_cluster.py``) and the ``redis`` fixture a ``RedisCluster`` client. Tests marked
``cluster`` are the ones that suite runs (the core proxy, limits under concurrency, revocation,
rebuild, the usage writer, failover); ``cluster_only`` ones are skipped on a single node. There,
``replicas`` adds a second gateway, a ``modelbridge serve`` process, that those tests send half
their requests to (``tests/replicas.py``).
"""

from __future__ import annotations

import os
import secrets
import socket
import tempfile
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit, urlunsplit

import aiohttp
import asyncpg
import pytest
from aiohttp import web
from hypothesis import settings
from redis.asyncio import Redis, RedisCluster

from gateway.config import Config, parse_config
from gateway.infra.stores import Stores, StoreURLs
from gateway.state import Clock, Runtime
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api
from tests.redis_cluster import LocalCluster

if TYPE_CHECKING:
    from tests.replicas import Replicas
    from tests.writer_support import OwnRedis

# No time limit per generated example: the suite runs on a shared 2-core machine beside stores
# and gateways, where a pure example can wait 200 ms for the CPU (speed is make bench's to say).
settings.register_profile("modelbridge", deadline=None)
settings.load_profile("modelbridge")

ADMIN_TOKEN = "test-admin-token"
UPSTREAM_KEY = "sk-upstream-test"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path="/" + name))


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--redis-cluster",
        action="store_true",
        help="run on a Redis Cluster of 3 masters + 3 replicas (MODELBRIDGE_TEST_CLUSTER=1)",
    )


def cluster_mode(config: pytest.Config) -> bool:
    return bool(config.getoption("--redis-cluster")) or (
        os.environ.get("MODELBRIDGE_TEST_CLUSTER", "") not in ("", "0")
    )


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if cluster_mode(config):
        return
    skip = pytest.mark.skip(reason="needs --redis-cluster (make test-cluster)")
    for item in items:
        if "cluster_only" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def redis_cluster(request: pytest.FixtureRequest) -> Iterator[LocalCluster | None]:
    """The session's Redis Cluster in cluster mode, else None."""
    if not cluster_mode(request.config):
        yield None
        return
    with (
        tempfile.TemporaryDirectory(prefix="mb-test-cluster-") as tmp,
        LocalCluster(Path(tmp)) as cluster,
    ):
        yield cluster


@pytest.fixture(scope="session")
def store_urls(redis_cluster: LocalCluster | None) -> Iterator[StoreURLs]:
    db_url = os.environ.get("MODELBRIDGE_TEST_DATABASE_URL")
    redis_url = os.environ.get("MODELBRIDGE_TEST_REDIS_URL")
    if redis_cluster is not None:
        redis_url = redis_cluster.url
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
async def redis_url(store_urls: StoreURLs, redis_cluster: LocalCluster | None) -> str:
    if redis_cluster is not None:
        redis_cluster.flush()
        return store_urls.redis_url
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


def gateway_settings(upstream_url: str, **server: Any) -> dict[str, Any]:
    """The test gateway's configuration as a config file holds it (``gateway_config`` parsed)."""
    return {
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


def gateway_config(upstream_url: str, **server: Any) -> Config:
    os.environ["MB_TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
    return parse_config(gateway_settings(upstream_url, **server), {})


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
    config: Config,
    database_url: str,
    redis_url: str,
    data_dir: str = "",
    *,
    usage_writer: bool = True,
) -> tuple[Gateway, web.AppRunner]:
    """A gateway in this process; ``usage_writer=False``: without its usage writer (the test
    moves the records to PostgreSQL itself, or not)."""
    from gateway.app import build_app
    from gateway.proxy.front import FrontSite

    clock = Clock()
    runtime = Runtime(database_url, redis_url, ADMIN_TOKEN, data_dir=data_dir)
    app = build_app(config, runtime, clock, usage_writer=usage_writer)
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


@pytest.fixture(scope="session")
async def replicas(
    request: pytest.FixtureRequest,
    gateway: Gateway,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    database_url: str,
    redis_url: str,
) -> AsyncIterator[Replicas]:
    """The gateway processes a test spreads its requests over (``tests/replicas.py``): the session
    gateway, plus under ``--redis-cluster`` a ``modelbridge serve`` process on the same stores."""
    from tests.replicas import start_replicas

    second = cluster_mode(request.config) or os.environ.get("MODELBRIDGE_TEST_REPLICAS") == "2"
    urls = {"upstream_url": fake.base_url, "database_url": database_url, "redis_url": redis_url}
    async with start_replicas(gateway, http, second=second, **urls) as replicas:
        yield replicas


@pytest.fixture(autouse=True)
def _fresh_fake_and_clock(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "fake" in request.fixturenames:
        request.getfixturevalue("fake").reset()
    if "gateway" in request.fixturenames:
        clock = request.getfixturevalue("gateway").clock
        clock.fixed, clock.offset = None, 0.0


# Every test of these modules moves money through the session gateway; each ends with a clean
# reconcile (contract section 11) of the accounts it created: Redis, the ledger (plus the records
# still in flight) and the daily rollup agree to the nano-dollar.
RECONCILED_MODULES = {
    "test_proxy",
    "test_proxy_errors",
    "test_billing",
    "test_limits",
    "test_personal_billing",
    "test_concurrency",
    "test_concurrency_limits",
    "test_team_isolation",
    "test_periods",
    "test_key_controls",
    "test_members",
    "test_usage_reports",
    "test_alerts",
    "test_sweeper",
    "test_routing",
    "test_continued_responses",
    "test_images",
}
_ACCOUNTS = "SELECT 't_' || id FROM teams UNION ALL SELECT 'u_' || id FROM users"


@pytest.fixture(autouse=True)
async def _reconciled(request: pytest.FixtureRequest) -> AsyncIterator[None]:
    module = request.module.__name__.rsplit(".", 1)[-1]
    if module not in RECONCILED_MODULES or "gateway" not in request.fixturenames:
        yield
        return
    from gateway import state as S
    from gateway.metering.reconcile import Reconciler

    app = request.getfixturevalue("gateway").app
    before = {r[0] for r in await app[S.DB].fetch(_ACCOUNTS)}
    yield
    if request.node.get_closest_marker("unreconciled"):
        return
    created = sorted({r[0] for r in await app[S.DB].fetch(_ACCOUNTS)} - before)
    reconciler = Reconciler(app[S.DB], app[S.REDIS], app[S.ACCOUNTS])
    _, differences = await reconciler.check(created, app[S.CLOCK].now())
    assert not differences, [d.as_json() for d in differences]


@pytest.fixture(scope="session")
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def lean() -> AsyncIterator[aiohttp.ClientSession]:
    """A client whose every request opens a connection of its own, so that the lean front serves
    it (a connection that asked for anything else, the management API say, is aiohttp's)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
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
async def redis(redis_url: str, redis_cluster: LocalCluster | None) -> AsyncIterator[Redis]:
    """A client of the session's Redis: a ``RedisCluster`` in cluster mode."""
    if redis_cluster is not None:
        client: Redis = RedisCluster.from_url(redis_url, decode_responses=True)  # type: ignore[assignment]
    else:
        client = Redis.from_url(redis_url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def own_redis(tmp_path: Path, database_url: str) -> AsyncIterator[OwnRedis]:
    """A Redis of this test's own: no gateway's writer takes its streams (the writer's tests)."""
    from tests.writer_support import own_redis_server  # it needs tests.faults, which needs us

    async with own_redis_server(tmp_path, database_url) as own:
        yield own


@pytest.fixture
async def own_stores(
    database_url: str, own_redis: OwnRedis
) -> AsyncIterator[tuple[Redis, asyncpg.Pool]]:
    """A client of this test's own Redis (a pool of 512 connections, as the gateway's:
    gateway/infra/redisconn.py) and a small PostgreSQL pool (the writer's tests)."""
    from gateway.infra.db import create_pool

    redis = Redis.from_url(own_redis.url, decode_responses=True, max_connections=512)
    pool = await create_pool(database_url, min_size=1, max_size=2)
    try:
        yield redis, pool
    finally:
        await redis.aclose()
        await pool.close()


# --- several kinds of provider: OpenAI, Azure OpenAI and Anthropic fakes behind one gateway -----

ANTHROPIC_KEY = "sk-ant-upstream-test"
AZURE_KEY = "azure-upstream-test"


@dataclass
class Providers:
    gateway: Gateway
    openai: FakeUpstream
    azure: Any  # tests.fake_azure.FakeAzure
    anthropic: Any  # tests.fake_anthropic.FakeAnthropic

    def reset(self) -> None:
        for fake in (self.openai, self.azure, self.anthropic):
            fake.reset()


def providers_config(openai_url: str, azure_url: str, anthropic_url: str) -> Config:
    """Models on each kind of upstream. Prices (nano-USD per token): ``gpt-4o-mini`` 150 / 600
    (cached 75), ``azure-4o`` 2500 / 10000 (cached 1250), ``claude`` 3000 / 15000 (cache reads
    300, writes 3750), ``claude-plain`` 1000 / 5000 (no cache prices: both at input)."""
    raw = {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_timeout_s": 5},
        "upstreams": {
            "oai": {"base_url": openai_url, "api_key_env": "MB_TEST_UPSTREAM_KEY", "timeout_s": 3},
            "az": {
                "kind": "azure",
                "base_url": azure_url,
                "api_key_env": "MB_TEST_AZURE_KEY",
                "api_version": "2024-10-21",
                "timeout_s": 3,
            },
            "ant": {
                "kind": "anthropic",
                "base_url": anthropic_url,
                "api_key_env": "MB_TEST_ANTHROPIC_KEY",
                "timeout_s": 3,
            },
        },
        "models": {
            "gpt-4o-mini": {
                "upstream": "oai",
                "input_per_mtok": 0.15,
                "output_per_mtok": 0.60,
                "cached_input_per_mtok": 0.075,
                "max_output_tokens": 1000,
            },
            "azure-4o": {
                "upstream": "az",
                "upstream_model": "gpt4o-prod",
                "input_per_mtok": 2.50,
                "output_per_mtok": 10.00,
                "cached_input_per_mtok": 1.25,
                "max_output_tokens": 1000,
            },
            "claude": {
                "upstream": "ant",
                "upstream_model": "claude-sonnet-4-5",
                "input_per_mtok": 3.00,
                "output_per_mtok": 15.00,
                "cached_input_per_mtok": 0.30,
                "cache_write_per_mtok": 3.75,
                "max_output_tokens": 1000,
            },
            "claude-plain": {
                "upstream": "ant",
                "input_per_mtok": 1.00,
                "output_per_mtok": 5.00,
                "max_output_tokens": 1000,
            },
        },
    }
    os.environ["MB_TEST_UPSTREAM_KEY"] = UPSTREAM_KEY
    os.environ["MB_TEST_AZURE_KEY"] = AZURE_KEY
    os.environ["MB_TEST_ANTHROPIC_KEY"] = ANTHROPIC_KEY
    return parse_config(raw, {})


@pytest.fixture(scope="session")
async def providers(database_url: str, redis_url: str) -> AsyncIterator[Providers]:
    from tests.fake_anthropic import FakeAnthropic
    from tests.fake_azure import FakeAzure

    openai_fake = FakeUpstream(api_key=UPSTREAM_KEY)
    azure_fake = FakeAzure(api_key=AZURE_KEY)
    anthropic_fake = FakeAnthropic(api_key=ANTHROPIC_KEY)
    urls = [await f.start() for f in (openai_fake, azure_fake, anthropic_fake)]
    gw, runner = await start_gateway(providers_config(*urls), database_url, redis_url)
    yield Providers(gw, openai_fake, azure_fake, anthropic_fake)
    await runner.cleanup()
    for f in (openai_fake, azure_fake, anthropic_fake):
        await f.stop()


@pytest.fixture(autouse=True)
def _fresh_providers(request: pytest.FixtureRequest) -> Iterator[None]:
    yield
    if "providers" in request.fixturenames:
        request.getfixturevalue("providers").reset()
