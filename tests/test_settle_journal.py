"""A settle is never lost: a stream that ends while Redis is unreachable ends properly for its
client, and its settle is kept (in memory and in the journal file) and applied once Redis
answers again — also by the next process when this one stopped meanwhile."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from gateway import state as S
from gateway.metering.journal import SettleCall, SettleJournal, read_entries
from policies import keyspace as rk
from tests.conftest import ADMIN_TOKEN, Gateway, gateway_config, start_gateway
from tests.fake_upstream import FakeUpstream
from tests.faults import TcpProxy
from tests.helpers import Api, eventually

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi there"}]}
COST = 5 * 150 + 6 * 600  # 5 prompt tokens, 6 completion tokens


@pytest.fixture
async def redis_proxy(redis_url: str) -> AsyncIterator[TcpProxy]:
    proxy = TcpProxy.to_url(redis_url)
    await proxy.start()
    yield proxy
    await proxy.stop()


async def _gateway(
    fake: FakeUpstream, database_url: str, redis_url: str, data_dir: str = ""
) -> tuple[Gateway, aiohttp.web.AppRunner]:
    return await start_gateway(gateway_config(fake.base_url), database_url, redis_url, data_dir)


async def _records(db: asyncpg.Connection, team_id: str) -> list[asyncpg.Record]:
    return await db.fetch(
        "SELECT request_id, status, charged FROM usage_records WHERE team_id = $1", team_id
    )


async def _stream_cut_midway(
    http: aiohttp.ClientSession, gw: Gateway, secret: str, proxy: TcpProxy, fake: FakeUpstream
) -> bytes:
    """A stream whose Redis goes away after its first event; the whole body the client got."""
    fake.next(chunk_delay_s=0.1)
    async with http.post(
        gw.v1 + "/chat/completions",
        json={**BODY, "stream": True},
        headers={"Authorization": f"Bearer {secret}"},
    ) as r:
        assert r.status == 200
        first = await r.content.readuntil(b"\n\n")
        await proxy.cut()
        return first + await r.read()  # a second response head in the body would fail here


async def test_stream_ending_while_redis_is_unreachable_ends_properly_and_is_billed_later(
    fake: FakeUpstream,
    database_url: str,
    redis_url: str,
    redis_proxy: TcpProxy,
    http: aiohttp.ClientSession,
    db: asyncpg.Connection,
    redis: Redis,
) -> None:
    gw, runner = await _gateway(fake, database_url, redis_proxy.url_for(redis_url))
    try:
        api = Api(http, gw.base, ADMIN_TOKEN)
        _, team, secret = await api.funded_team_key("1.00")
        body = await _stream_cut_midway(http, gw, secret, redis_proxy, fake)
        assert body.endswith(b"data: [DONE]\n\n")
        assert b"HTTP/1.1" not in body and b"gateway_unavailable" not in body
        metering = gw.app[S.METERING]
        assert len(metering.journal) == 1
        assert await _records(db, team["id"]) == []
        # A request meanwhile: 503, never forwarded unmetered.
        async with http.post(
            gw.v1 + "/chat/completions", json=BODY, headers={"Authorization": f"Bearer {secret}"}
        ) as r:
            assert r.status == 503
            assert (await r.json())["error"]["code"] == "gateway_unavailable"

        await redis_proxy.restore()
        rows = await eventually(lambda: _records(db, team["id"]), lambda rows: len(rows) == 1)
        assert (rows[0]["status"], rows[0]["charged"]) == (200, COST)
        assert len(metering.journal) == 0
        account = rk.AccountKeys(rk.team_account(team["id"]))
        assert await redis.hmget(account.state, ["credits", "holds"]) == [
            str(1_000_000_000 - COST),
            "0",
        ]
        assert await redis.zcard(account.hold_expiry) == 0
    finally:
        await redis_proxy.restore()
        await runner.cleanup()


async def test_kept_settle_survives_a_restart_and_is_applied_once(
    tmp_path: Path,
    fake: FakeUpstream,
    database_url: str,
    redis_url: str,
    redis_proxy: TcpProxy,
    http: aiohttp.ClientSession,
    db: asyncpg.Connection,
    redis: Redis,
) -> None:
    data_dir = str(tmp_path / "data")
    via_proxy = redis_proxy.url_for(redis_url)
    gw, runner = await _gateway(fake, database_url, via_proxy, data_dir)
    try:
        api = Api(http, gw.base, ADMIN_TOKEN)
        _, team, secret = await api.funded_team_key("1.00")
        body = await _stream_cut_midway(http, gw, secret, redis_proxy, fake)
        assert body.endswith(b"data: [DONE]\n\n")
    finally:
        await runner.cleanup()  # stops while Redis is still away: the settle stays in the file
    files = list((tmp_path / "data" / "journal").glob("settles-*.jsonl"))
    assert len(files) == 1
    kept = read_entries(files[0].read_bytes())
    assert len(kept) == 1
    assert await _records(db, team["id"]) == []

    await redis_proxy.restore()
    gw, runner = await _gateway(fake, database_url, via_proxy, data_dir)
    try:
        rows = await eventually(lambda: _records(db, team["id"]), lambda rows: len(rows) == 1)
        assert (rows[0]["status"], rows[0]["charged"]) == (200, COST)
        metering = gw.app[S.METERING]
        await eventually(lambda: _async(len(metering.journal)), lambda n: n == 0)
        assert read_entries(files[0].read_bytes()) == {}
        # The same settle once more (a journal replayed twice): nothing changes.
        (call,) = kept.values()
        metering.journal.keep(call)
        assert await metering.replay() == 1
        account = rk.AccountKeys(rk.team_account(team["id"]))
        assert await redis.hget(account.state, "credits") == str(1_000_000_000 - COST)
        assert len(await _records(db, team["id"])) == 1
        # Once its record is in PostgreSQL the settle's marker lives RID_AFTER_LEDGER_S, not a
        # day (ack.lua); let it expire for real and replay again: the ledger check drops it.
        marker = account.settled_marker(call.request_id)
        assert 0 < await redis.ttl(marker) <= rk.RID_AFTER_LEDGER_S
        await redis.pexpire(marker, 1)
        await eventually(lambda: redis.exists(marker), lambda n: n == 0)
        metering.journal.keep(call)
        assert await metering.replay() == 1
        assert await redis.hget(account.state, "credits") == str(1_000_000_000 - COST)
        assert len(await _records(db, team["id"])) == 1
        assert not await redis.exists(marker)  # not set again by a settle that did not run
    finally:
        await runner.cleanup()


async def _async(value: int) -> int:
    return value


def test_journal_file_keeps_entries_adopts_orphans_and_skips_a_torn_line(tmp_path: Path) -> None:
    def call(n: int) -> SettleCall:
        return SettleCall("t_x", f"req_{n}", ["k1", "k2"], [f"req_{n}", 5, "scope"], 1.0)

    first = SettleJournal(tmp_path, "w0")
    first.open()
    for n in range(3):
        assert first.keep(call(n))
    first.done("req_1")
    first.close()
    with (tmp_path / "settles-w0.jsonl").open("ab") as f:
        f.write(b'+{"a": "t_x", "r": "req_torn", "k": [')  # a crash mid-write
    orphan = SettleJournal(tmp_path, "w7")
    orphan.open()
    orphan.keep(call(9))
    orphan.close()

    again = SettleJournal(tmp_path, "w0")
    again.open()
    assert sorted(again.entries) == ["req_0", "req_2", "req_9"]
    assert again.entries["req_0"] == call(0)
    assert not (tmp_path / "settles-w7.jsonl").exists()
    # A second process cannot take a file held by a live one: it gets its own.
    other = SettleJournal(tmp_path, "w0")
    other.open()
    assert other.path != again.path and other.entries == {}
    for rid in list(again.entries):
        again.done(rid)
    assert (tmp_path / "settles-w0.jsonl").read_bytes() == b""
    other.close()
    again.close()


def test_a_full_journal_refuses_and_says_so(tmp_path: Path) -> None:
    journal = SettleJournal(tmp_path, "w0", max_entries=2)
    journal.open()
    calls = [SettleCall("t_x", f"req_{n}", [], [], 1.0) for n in range(3)]
    assert [journal.keep(c) for c in calls] == [True, True, False]
    assert journal.dropped == 1
    journal.close()


def test_a_kept_settle_with_a_response_note_reads_back_as_sent(tmp_path: Path) -> None:
    """settle.lua's arguments after the usage record: a stored response's note and its lifetime
    (not the field/value pairs of a record kept before issue 14)."""
    args: list[str | int] = ["req_1", 5, "scope", "key", "model", 1, 2, 0, 3, 4, '["req_1"']
    args += ["12|fake/gpt-4o-mini", rk.RESPONSE_NOTE_TTL_S]
    call = SettleCall("t_x", "req_1", [f"k{n}" for n in range(12)], args, 1.0)
    journal = SettleJournal(tmp_path, "w0")
    journal.open()
    assert journal.keep(call)
    journal.close()
    again = SettleJournal(tmp_path, "w0")
    again.open()
    assert again.entries == {"req_1": call}
    again.close()
