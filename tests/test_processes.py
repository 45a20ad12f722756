"""Several gateway processes on one Redis and PostgreSQL: revocation everywhere at the next
request, metrics merged over ``--workers 2``, and graceful shutdown that lets streams finish."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from tests.conftest import ADMIN_TOKEN
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api, eventually, metric
from tests.processes import GatewayProcess, write_config
from tests.replicas import Endpoint, Replicas

pytestmark = pytest.mark.cluster

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi there"}]}


Pair = tuple[Endpoint, Endpoint]


@pytest.fixture
async def two_gateways(
    replicas: Replicas,
    tmp_path: Path,
    fake: FakeUpstream,
    database_url: str,
    redis_url: str,
    http: aiohttp.ClientSession,
) -> AsyncIterator[Pair]:
    """Two gateway processes on one Redis and PostgreSQL: on a Redis Cluster the session's pair,
    already running (``tests/replicas.py``: the in-process gateway and a ``serve`` process), else
    two ``serve`` processes of the test's own."""
    if len(replicas) == 2:
        yield replicas.first, replicas.other
        return
    config = write_config(tmp_path, fake.base_url)
    procs = [
        GatewayProcess(config, database_url, redis_url, log=tmp_path / f"gw{i}.log")
        for i in range(2)
    ]
    try:
        for proc in procs:
            await proc.ready(http)
        yield procs[0], procs[1]
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            await proc.wait()


async def chat(http: aiohttp.ClientSession, v1: str, secret: str) -> int:
    async with http.post(
        v1 + "/chat/completions", json=BODY, headers={"Authorization": f"Bearer {secret}"}
    ) as r:
        await r.read()
        return r.status


@pytest.mark.slow
async def test_key_revoked_on_one_process_fails_on_the_other_at_once(
    two_gateways: Pair, http: aiohttp.ClientSession
) -> None:
    a, b = two_gateways
    api_a = Api(http, a.base, ADMIN_TOKEN)
    owner, team, _ = await api_a.funded_team_key()
    key = await api_a.key(owner, team["id"])
    for _ in range(3):  # both processes have the key cached now
        assert await chat(http, a.v1, key["secret"]) == 200
        assert await chat(http, b.v1, key["secret"]) == 200
    await api_a.call("DELETE", f"/api/keys/{key['id']}", session=owner, expect=200)
    assert await chat(http, b.v1, key["secret"]) == 401
    assert await chat(http, a.v1, key["secret"]) == 401


@pytest.mark.slow
async def test_metrics_are_merged_over_two_workers(
    tmp_path: Path,
    fake: FakeUpstream,
    database_url: str,
    redis_url: str,
    http: aiohttp.ClientSession,
) -> None:
    gw = GatewayProcess(
        write_config(tmp_path, fake.base_url),
        database_url,
        redis_url,
        workers=2,
        log=tmp_path / "w2.log",
    )
    try:
        await gw.ready(http)
        api = Api(http, gw.base, ADMIN_TOKEN)
        _, _, secret = await api.funded_team_key()
        pids = set()
        for _ in range(40):  # a new connection each time, so both workers get requests
            async with aiohttp.ClientSession() as fresh:
                assert await chat(fresh, gw.v1, secret) == 200
                async with fresh.get(gw.base + "/readyz") as r:
                    pids.add((await r.json())["worker"])
        for _ in range(6):
            async with aiohttp.ClientSession() as fresh, fresh.get(gw.base + "/metrics") as r:
                text = await r.text()
            labels = {"endpoint": "/v1/chat/completions", "model": "gpt-4o-mini", "status": "200"}
            assert metric(text, "modelbridge_requests_total", **labels) == 40
            assert metric(text, "modelbridge_tokens_total", kind="completion") == 40 * 6
            assert metric(text, "modelbridge_inflight_requests") == 0
        assert len(pids) == 2, f"requests reached {pids}"
        assert re.search(
            r"modelbridge_gateway_overhead_seconds_count\{endpoint=\"/v1/chat/completions\"\} 40",
            text,
        )
    finally:
        await gw.stop()


@pytest.mark.slow
async def test_shutdown_lets_a_stream_finish_and_bills_it(
    tmp_path: Path, fake: FakeUpstream, database_url: str, redis_url: str, http: aiohttp.ClientSession,
    db: asyncpg.Connection,
) -> None:  # fmt: skip
    gw = GatewayProcess(
        write_config(tmp_path, fake.base_url), database_url, redis_url, log=tmp_path / "gs.log"
    )
    await gw.ready(http)
    api = Api(http, gw.base, ADMIN_TOKEN)
    _, team, secret = await api.funded_team_key()
    fake.next(chunk_delay_s=0.2)
    body = {**BODY, "stream": True}
    async with http.post(
        gw.v1 + "/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"}
    ) as r:
        first = await r.content.readuntil(b"\n\n")
        assert first.startswith(b"data: ")
        gw.terminate()  # SIGTERM while the stream is in flight
        rest = await r.read()
    assert rest.endswith(b"data: [DONE]\n\n")
    assert await gw.wait() == 0
    row = await eventually(
        lambda: db.fetchrow("SELECT * FROM usage_records WHERE team_id = $1", team["id"]),
        lambda r: r is not None,
    )
    assert (row["usage_source"], row["completion_tokens"], row["status"]) == ("upstream", 6, 200)
    await asyncio.sleep(0)


@pytest.mark.slow
async def test_member_removed_on_one_process_is_refused_on_the_other(
    two_gateways: Pair, http: aiohttp.ClientSession
) -> None:
    from tests.people import add_member

    a, b = two_gateways
    api_a = Api(http, a.base, ADMIN_TOKEN)
    owner, team, _ = await api_a.funded_team_key()
    member = await add_member(api_a, owner, team["id"])
    key = await api_a.key(member, team["id"])
    assert await chat(http, b.v1, key["secret"]) == 200
    await api_a.call(
        "DELETE", f"/api/teams/{team['id']}/members/{member.user['id']}", session=owner, expect=200
    )
    assert await chat(http, b.v1, key["secret"]) == 401
    status, _ = await Api(http, b.base, ADMIN_TOKEN).call(
        "GET", f"/api/teams/{team['id']}", session=member
    )
    assert status == 404


@pytest.mark.slow
async def test_hard_team_limit_holds_across_two_processes(
    two_gateways: Pair, http: aiohttp.ClientSession, fake: FakeUpstream,
    db: asyncpg.Connection,
) -> None:  # fmt: skip
    from gateway.proxy.tokens import TokenCounter
    from policies.money import format_usd

    a, b = two_gateways
    api = Api(http, a.base, ADMIN_TOKEN)
    owner, team, secret = await api.funded_team_key("10.00")
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hi"}],
        "max_tokens": 6,
    }
    prompt = TokenCounter().count_chat_prompt(body, "o200k_base")
    fake.set_default(prompt_tokens=prompt, delay_s=0.02)  # actual cost == hold
    cost = prompt * 150 + 6 * 600
    k = 12
    await api.call(
        "PATCH", f"/api/teams/{team['id']}", session=owner, json={"spending_limit_usd": format_usd(k * cost)},
        expect=200,
    )  # fmt: skip

    async def one(v1: str) -> tuple[int, str | None]:
        async with http.post(
            v1 + "/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"}
        ) as r:
            payload = await r.json()
            return r.status, None if r.status == 200 else payload["error"]["code"]

    results = await asyncio.gather(*(one(a.v1 if i % 2 else b.v1) for i in range(10 * k)))
    ok = sum(1 for status, _ in results if status == 200)
    assert ok == k
    assert {r for r in results if r[0] != 200} == {(429, "team_spending_limit_reached")}
    total = await eventually(
        lambda: db.fetchval(
            "SELECT coalesce(sum(charged), 0) FROM usage_records WHERE team_id = $1", team["id"]
        ),
        lambda n: n == k * cost,
    )
    _, billing = await api.call(
        "GET", f"/api/teams/{team['id']}/billing", session=owner, expect=200
    )
    assert billing["spend_this_period_usd"] == format_usd(total)
