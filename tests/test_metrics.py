"""``/metrics``: the contract's metric names and labels, per-team labels only when asked."""

from __future__ import annotations

import asyncio
import dataclasses
import secrets
import threading
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from gateway import state as S
from gateway.config import MetricsConfig
from gateway.infra import metrics as metrics_module
from gateway.infra.metrics import REJECTION_REASONS, Metrics
from gateway.infra.stores import Stores, StoreURLs
from tests.conftest import ADMIN_TOKEN, Gateway, _with_database, gateway_config, start_gateway
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api, eventually, metric
from tests.processes import GatewayProcess, write_config

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi there"}]}


async def scrape(http: aiohttp.ClientSession, base: str) -> str:
    async with http.get(base + "/metrics") as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"].startswith("text/plain")
        return await resp.text()


async def test_contract_metrics_move(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession
) -> None:
    owner = await api.signup()
    team = await api.team(owner)
    key = (await api.key(owner, team["id"]))["secret"]
    before = await scrape(http, gateway.base)
    headers = {"Authorization": f"Bearer {key}"}
    async with http.post(gateway.v1 + "/chat/completions", json=BODY, headers=headers) as resp:
        assert resp.status == 429  # no balance yet
    await api.credit_team(team["id"], "1.00")
    async with http.post(gateway.v1 + "/chat/completions", json=BODY, headers=headers) as resp:
        assert resp.status == 200
    async with http.post(
        gateway.v1 + "/chat/completions", json={**BODY, "model": "x" * 50}, headers=headers
    ) as resp:
        assert resp.status == 404
    route = "/v1/chat/completions"

    def durations(text: str) -> float:
        labels = {"endpoint": route, "model": "gpt-4o-mini"}
        return metric(text, "modelbridge_request_duration_seconds_count", **labels)

    # a request is counted once its settle is confirmed, which can be just after its answer
    after = await eventually(
        lambda: scrape(http, gateway.base), lambda text: durations(text) - durations(before) == 2
    )

    def delta(name: str, **labels: str) -> float:
        return metric(after, name, **labels) - metric(before, name, **labels)

    assert (
        delta("modelbridge_requests_total", endpoint=route, model="gpt-4o-mini", status="200") == 1
    )
    assert (
        delta("modelbridge_requests_total", endpoint=route, model="gpt-4o-mini", status="429") == 1
    )
    assert delta("modelbridge_requests_total", endpoint=route, model="other", status="404") == 1
    assert delta("modelbridge_limit_rejections_total", reason="insufficient_quota") == 1
    assert delta("modelbridge_limit_rejections_total", reason="model_not_found") == 1
    assert delta("modelbridge_tokens_total", model="gpt-4o-mini", kind="prompt") == 5
    assert delta("modelbridge_tokens_total", model="gpt-4o-mini", kind="completion") == 6
    assert round(delta("modelbridge_spend_usd_total", model="gpt-4o-mini") * 1e9) == 4350
    assert delta("modelbridge_upstream_ttfb_seconds_count", model="gpt-4o-mini") == 1
    assert delta("modelbridge_gateway_overhead_seconds_count", endpoint=route) == 3
    assert (
        delta("modelbridge_request_duration_seconds_count", endpoint=route, model="gpt-4o-mini")
        == 2
    )
    for name in ("modelbridge_inflight_requests", "modelbridge_usage_events_pending"):
        assert f"# TYPE {name} gauge" in after
    assert 'team="' not in after


async def test_team_labels_only_when_configured(
    fake: FakeUpstream, database_url: str, redis_url: str, http: aiohttp.ClientSession
) -> None:
    config = dataclasses.replace(
        gateway_config(fake.base_url), metrics=MetricsConfig(team_labels=True)
    )
    gw, runner = await start_gateway(config, database_url, redis_url)
    try:
        api = Api(http, gw.base, ADMIN_TOKEN)
        _, team, secret = await api.funded_team_key()
        async with http.post(
            gw.v1 + "/chat/completions", json=BODY, headers={"Authorization": f"Bearer {secret}"}
        ) as r:
            assert r.status == 200
        text = await scrape(http, gw.base)
        assert metric(text, "modelbridge_requests_total", team=team["id"], status="200") == 1
        assert metric(text, "modelbridge_spend_usd_total", team=team["id"]) > 0
    finally:
        await runner.cleanup()


async def test_store_up_follows_each_store(
    tmp_path: Path, fake: FakeUpstream, store_urls: StoreURLs, http: aiohttp.ClientSession
) -> None:
    """A gateway on a Redis and a database of its own: ``modelbridge_store_up`` is 1 for both,
    then 0 for Redis once it is stopped (and ``/readyz`` names it), then 0 for PostgreSQL once
    the database refuses connections."""
    name = f"mbtest_up_{secrets.token_hex(4)}"
    admin = await asyncpg.connect(store_urls.database_url)
    await admin.execute(f'CREATE DATABASE "{name}"')
    stores = Stores(tmp_path, _with_database(store_urls.database_url, name), None)
    urls = stores.start()  # a Redis of its own
    gw, runner = await start_gateway(
        gateway_config(fake.base_url), urls.database_url, urls.redis_url
    )
    try:
        text = await scrape(http, gw.base)
        assert metric(text, "modelbridge_store_up", store="redis") == 1
        assert metric(text, "modelbridge_store_up", store="postgresql") == 1

        stores.stop()
        text = await scrape(http, gw.base)
        assert metric(text, "modelbridge_store_up", store="redis") == 0
        assert metric(text, "modelbridge_store_up", store="postgresql") == 1
        async with http.get(gw.base + "/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["down"] == ["redis: ConnectionError"]

        await admin.execute(f'ALTER DATABASE "{name}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
        text = await scrape(http, gw.base)
        assert metric(text, "modelbridge_store_up", store="redis") == 0
        assert metric(text, "modelbridge_store_up", store="postgresql") == 0
    finally:
        await runner.cleanup()
        stores.stop()
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        await admin.close()


FAMILIES = {
    "modelbridge_requests_total": "counter",
    "modelbridge_tokens_total": "counter",
    "modelbridge_spend_usd_total": "counter",
    "modelbridge_limit_rejections_total": "counter",
    "modelbridge_request_duration_seconds": "histogram",
    "modelbridge_upstream_ttfb_seconds": "histogram",
    "modelbridge_gateway_overhead_seconds": "histogram",
    "modelbridge_inflight_requests": "gauge",
    "modelbridge_usage_events_pending": "gauge",
}


@pytest.mark.slow
async def test_every_family_is_there_from_the_start_over_two_workers(
    tmp_path: Path,
    fake: FakeUpstream,
    database_url: str,
    redis_url: str,
    http: aiohttp.ClientSession,
) -> None:
    """A fresh ``serve --workers 2``, before any request: every contract family, its known
    label values at 0 (each refusal reason, each model and token kind)."""
    gw = GatewayProcess(
        write_config(tmp_path, fake.base_url),
        database_url,
        redis_url,
        workers=2,
        log=tmp_path / "gw.log",
    )
    try:
        await gw.ready(http, timeout=120)  # two workers and a writer start at once
        text = await scrape(http, gw.base)
    finally:
        await gw.stop()
    for name, kind in FAMILIES.items():
        assert f"# TYPE {name} {kind}" in text, name
        sample = name + ("_count" if kind == "histogram" else "")
        assert any(line.startswith(sample) for line in text.splitlines()), name
    for reason in REJECTION_REASONS:
        assert f'modelbridge_limit_rejections_total{{reason="{reason}"}} 0.0' in text, reason
    for kind in ("prompt", "completion"):
        assert f'modelbridge_tokens_total{{kind="{kind}",model="gpt-4o-mini"}} 0.0' in text
    assert 'modelbridge_spend_usd_total{model="gpt-4o-mini"} 0.0' in text
    assert "modelbridge_inflight_requests 0.0" in text


async def test_folded_updates_land_at_the_end_of_the_loop_step_as_direct_ones_would() -> None:
    folded, direct = Metrics(), Metrics()
    amounts = (0.0, 0.0001, 0.0003, 0.001, 0.1, 7.0)  # on bounds, between them, past the last

    def figures(m: Metrics) -> list[float]:
        hist, spend = m.child(m.overhead, "/v1/x"), m.child(m.spend, "m")
        buckets = [b.get() for b in hist._buckets]
        return [hist._sum.get(), *buckets, spend._value.get(), m.inflight._value.get()]

    for amount in amounts:
        direct.child(direct.overhead, "/v1/x").observe(amount)
        direct.child(direct.spend, "m").inc(amount)
        folded.observe(folded.child(folded.overhead, "/v1/x"), amount)
        folded.add(folded.child(folded.spend, "m"), amount)
    direct.inflight.inc()
    folded.add(folded.inflight)
    folded.add(folded.inflight)
    folded.add(folded.inflight, -1)
    assert set(figures(folded)) == {0.0}  # nothing written within the step
    await asyncio.sleep(0)
    assert figures(folded) == figures(direct)
    folded.add(folded.inflight)
    folded.render()  # /metrics writes what is pending first
    assert folded.inflight._value.get() == 2


async def test_a_scrape_merges_the_files_off_the_event_loop(
    gateway: Gateway, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The merge reads and parses every process's files: hundreds of milliseconds once per-team
    # labels and past workers pile up (seen stalling a test's loop for 0.72 s), which on the loop
    # would hold every request in flight. It runs in a thread; what is pending is written first.
    merged_on: list[int] = []
    merge = metrics_module._merged

    def recording() -> bytes:
        merged_on.append(threading.get_ident())
        return merge()

    monkeypatch.setattr(metrics_module, "_merged", recording)
    found = gateway.app[S.METRICS]
    found.add(found.child(found.fallbacks, "pending-model", "other"))
    text = await scrape(http, gateway.base)
    assert merged_on and threading.get_ident() not in merged_on
    labels = {"model": "pending-model", "to": "other"}
    assert metric(text, "modelbridge_fallbacks_total", **labels) == 1.0
