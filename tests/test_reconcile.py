"""``GET /admin/reconcile`` and ``modelbridge reconcile [--repair]`` (contract section 11), on a
database and a Redis of their own: clean after real traffic; each kind of drift found to the
nano-dollar (Redis credits, a period counter, the daily rollup); ``--repair`` puts it right."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from gateway.infra.db import migrate_dsn
from gateway.infra.stores import StoreURLs
from policies import keyspace as rk
from policies.periods import period_of
from tests.conftest import ADMIN_TOKEN, Gateway, _with_database, gateway_config, start_gateway
from tests.fake_upstream import FakeUpstream
from tests.faults import RedisServer
from tests.helpers import Api, eventually
from tests.processes import REPO

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi there"}]}
COST = 5 * 150 + 6 * 600


@dataclass
class Isolated:
    gateway: Gateway
    database_url: str
    redis_url: str
    db: asyncpg.Connection
    redis: Redis


@pytest.fixture
async def isolated(
    tmp_path: Path, fake: FakeUpstream, store_urls: StoreURLs
) -> AsyncIterator[Isolated]:
    name = f"mbtest_rec_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(store_urls.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    database_url = _with_database(store_urls.database_url, name)
    await migrate_dsn(database_url)
    server = RedisServer(tmp_path / "redis")
    server.start()
    gw, runner = await start_gateway(gateway_config(fake.base_url), database_url, server.url)
    db = await asyncpg.connect(database_url)
    redis = Redis.from_url(server.url, decode_responses=True)
    try:
        yield Isolated(gw, database_url, server.url, db, redis)
    finally:
        await redis.aclose()
        await db.close()
        await runner.cleanup()
        server.stop()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


async def _reconcile(
    http: aiohttp.ClientSession, gw: Gateway, token: str = ADMIN_TOKEN
) -> tuple[int, dict]:  # type: ignore[type-arg]
    async with http.get(
        gw.base + "/admin/reconcile", headers={"Authorization": f"Bearer {token}"}
    ) as r:
        return r.status, await r.json()


def _cli(iso: Isolated, *args: str) -> tuple[int, dict[str, Any]]:
    env = {
        **os.environ,
        "MODELBRIDGE_DATABASE_URL": iso.database_url,
        "MODELBRIDGE_REDIS_URL": iso.redis_url,
        "MODELBRIDGE_LOG_LEVEL": "WARNING",
    }
    done = subprocess.run(
        [sys.executable, "-m", "gateway", "reconcile", *args],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    return done.returncode, json.loads(done.stdout)


@pytest.mark.slow
async def test_reconcile_finds_each_drift_and_repair_puts_it_right(
    isolated: Isolated, http: aiohttp.ClientSession, fake: FakeUpstream
) -> None:
    gw, db, redis = isolated.gateway, isolated.db, isolated.redis
    api = Api(http, gw.base, ADMIN_TOKEN)
    owner, team, secret = await api.funded_team_key("1.00")
    headers = {"Authorization": f"Bearer {secret}"}
    for stream in (False, True, False):
        async with http.post(
            gw.v1 + "/chat/completions", json={**BODY, "stream": stream}, headers=headers
        ) as r:
            assert r.status == 200
            await r.read()
    await eventually(
        lambda: db.fetchval("SELECT count(*) FROM usage_records WHERE team_id = $1", team["id"]),
        lambda n: n == 3,
    )
    users = await db.fetchval("SELECT count(*) FROM users")
    status, body = await _reconcile(http, gw)
    assert (status, body) == (200, {"ok": True, "accounts_checked": users + 1, "differences": []})
    assert (await _reconcile(http, gw, "wrong"))[0] == 401
    code, out = await asyncio.to_thread(_cli, isolated)
    assert (code, out["ok"]) == (0, True)

    # Drift, one of each kind.
    account = rk.team_account(team["id"])
    ak = rk.AccountKeys(account)
    period = period_of(gw.clock.now())
    await redis.hincrby(ak.state, "credits", -5)
    await redis.hincrby(ak.period(period), "spend", 7)
    await db.execute("UPDATE usage_daily SET charged = charged + 1 WHERE account = $1", account)
    status, body = await _reconcile(http, gw)
    credits = 1_000_000_000 - 3 * COST
    assert status == 200
    assert body == {
        "ok": False,
        "accounts_checked": users + 1,
        "differences": [
            {
                "account": account,
                "field": "credits",
                "redis": f"0.{credits - 5:09d}",
                "ledger": f"0.{credits:09d}",
            },
            {
                "account": account,
                "field": f"{period}:spend",
                "redis": f"0.{3 * COST + 7:09d}",
                "ledger": f"0.{3 * COST:09d}",
            },
            {
                "account": account,
                "field": f"{period}:usage_daily.charged",
                "redis": f"0.{3 * COST + 1:09d}",
                "ledger": f"0.{3 * COST:09d}",
            },
        ],
    }
    code, out = await asyncio.to_thread(_cli, isolated)
    assert (code, out["ok"], len(out["differences"])) == (1, False, 3)

    code, out = await asyncio.to_thread(_cli, isolated, "--repair")
    assert (code, out["repaired"], out["after_repair"]["ok"]) == (0, [account], True)
    status, body = await _reconcile(http, gw)
    assert (status, body["ok"]) == (200, True)
    assert await redis.hget(ak.state, "credits") == str(credits)
    # The rebuilt account goes on serving and billing.
    async with http.post(gw.v1 + "/chat/completions", json=BODY, headers=headers) as r:
        assert r.status == 200
    overview = await api.overview(owner, team["id"])
    assert overview["credits_usd"] == f"0.{credits - COST:09d}"
