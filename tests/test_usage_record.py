"""The usage record's two forms in a stream (policies/usage_record.py): the 23 field/value pairs
settle.lua appended before issue 14 and the one ``r`` field it appends now. Every reader takes
both, and gives the same row, the same money and the same settle marker to expire; a stream that
holds both drains into PostgreSQL whole."""

from __future__ import annotations

import secrets
from typing import Any

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from bench.drain import _record, fill
from gateway.metering.journal import RECORD_AT, SettleCall, read_entries
from gateway.metering.recent import record_of
from gateway.metering.scripts import Scripts
from gateway.metering.usage_rows import COLUMNS, ack_args, decoded, record_row
from gateway.metering.usage_writer import UsageWriter
from policies import keyspace as rk
from policies.ledger import entry_of
from policies.usage_record import (
    FIELDS,
    RECORD,
    fields_of,
    opened_of,
    pairs_dict,
    stream_entry,
)
from tests.writer_support import run_records

ACCOUNT = "t_bench_forms"


def old_entry(fields: dict[str, Any]) -> dict[str, str]:
    """The entry settle.lua appended before issue 14: every value a string."""
    return {name: str(value) for name, value in fields.items()}


def routed(n: int) -> dict[str, Any]:
    return {**_record(n, ACCOUNT, "forms"), "served_model": "cheap-west", "attempts": "2"}


@pytest.mark.parametrize(
    "fields", [_record(1, ACCOUNT, "forms"), routed(2)], ids=["plain", "routed"]
)
def test_both_forms_of_a_record_give_the_same_row_money_and_marker(fields: dict[str, Any]) -> None:
    old, new = old_entry(fields), stream_entry(fields)
    assert list(new) == [RECORD]
    assert record_row(old) == record_row(new)
    assert record_row(new) == record_row(fields_of(new))
    assert entry_of(ACCOUNT, old) == entry_of(ACCOUNT, new) is not None
    stream = rk.AccountKeys(ACCOUNT).usage_stream
    both = decoded([(stream, "1-0", old), (stream, "2-0", new)])
    assert ack_args(both)[stream][3] == f"{fields['request_id']} {fields['request_id']}"
    row = dict(zip(COLUMNS, record_row(new), strict=True))
    assert (row["from_credits"], row["charged"], row["prompt_tokens"]) == (19800, 19800, 12)


def test_an_r_that_is_not_a_record_is_refused_by_every_reader() -> None:
    for payload in ("not json", "[1, 2]", '{"request_id": "x"}'):
        with pytest.raises(ValueError):
            fields_of({RECORD: payload})
        with pytest.raises(ValueError):
            record_row({RECORD: payload})
        assert entry_of(ACCOUNT, {RECORD: payload}) is None
    kept = decoded([("s", "1-0", {RECORD: "not json"})])
    assert kept == [("s", "1-0", {RECORD: "not json"})]  # as it was: for usage_rejects


@pytest.mark.parametrize("period", ["", "2026-13", "2026-1", "11-2026", " 2026-11", 202611])
def test_a_record_without_a_period_is_refused_by_every_reader(period: str | int) -> None:
    fields = {**_record(1, ACCOUNT, "forms"), "period": period}
    for entry in (old_entry(fields), stream_entry(fields)):
        with pytest.raises(ValueError, match="not a period"):
            record_row(entry)
        with pytest.raises(ValueError, match="not a period"):
            record_row(fields_of(entry))
        assert entry_of(ACCOUNT, entry) is None
    assert entry_of(ACCOUNT, old_entry({**fields, "period": "2026-11"})) is not None


def test_a_settle_journaled_before_issue_14_is_replayed_with_the_new_record() -> None:
    head: list[str | int] = ["req_j", 900, "usr_1", "key_1", "gpt-4o-mini", 1, 2, 0, 0, 40]
    pairs: list[str | int] = []
    for name, value in routed(3).items():
        if name not in ("from_allowance", "from_credits"):
            pairs += [name, int(value) if value.isdigit() else value]
    line = orjson.dumps({"a": ACCOUNT, "r": "req_j", "k": ["k"], "v": [*head, *pairs]})
    (call,) = read_entries(b"+" + line + b"\n").values()
    assert call.args[:RECORD_AT] == head and len(call.args) == RECORD_AT + 1
    assert call.args[RECORD_AT] == opened_of(pairs_dict(pairs))
    old = {**pairs_dict(pairs), "from_allowance": 0, "from_credits": 900}
    entry = dict([record_of(call, 0, 900)])  # what settle.lua appends for it
    assert record_row(entry) == record_row(old_entry(old))


async def test_settle_lua_appends_what_the_gateway_resends(redis: Redis) -> None:
    """The entry settle.lua appends is, byte for byte, the one recent.py would send again."""
    ak = rk.AccountKeys(f"t_forms{secrets.token_hex(4)}")
    await redis.hset(ak.state, mapping={"loaded": "1", "credits": "1000000", "holds": "0"})
    await redis.hset(ak.period("2026-11"), "alw", "300")
    args: list[str | int] = ["req_s", 900, "usr_1", "key_1", "gpt-4o-mini", 3600, 60, 0, 0, 40]
    call = SettleCall(ak.account, "req_s", [], [*args, opened_of(routed(4))])
    keys = [ak.state, ak.period("2026-11"), ak.hold_expiry, ak.hold_values]
    keys += [ak.settled_marker("req_s"), ak.usage_stream, ak.cfg, ak.alerts]
    keys += ak.rate_keys("key_1", "usr_1")
    reply = await Scripts(redis).settle(keys=keys, args=call.args)
    assert reply[:3] == [1, 300, 600]
    ((_, appended),) = await redis.xrange(ak.usage_stream)
    assert appended == dict([record_of(call, 300, 600)])
    fields = fields_of(appended)
    assert (fields["from_allowance"], fields["from_credits"]) == (300, 600)
    assert list(fields) == list(FIELDS)


@pytest.mark.parametrize("ttl_before", [-1, 7200], ids=["none", "set by the hold"])
async def test_settle_lua_sets_the_period_hash_lifetime_only_when_it_has_none(
    redis: Redis, ttl_before: int
) -> None:
    """The hold gives the period hash its lifetime on the period's first request; the settle
    sets it only on a hash that has none (EXPIRE NX: no write, so no copy in the append-only
    file or to a replica, on every other settle)."""
    ak = rk.AccountKeys(f"t_forms{secrets.token_hex(4)}")
    period = ak.period("2026-11")
    await redis.hset(ak.state, mapping={"loaded": "1", "credits": "1000000", "holds": "0"})
    await redis.hset(period, "alw", "300")
    if ttl_before > 0:
        await redis.expire(period, ttl_before)
    args: list[str | int] = ["req_t", 900, "usr_1", "key_1", "gpt-4o-mini", 3600, 60, 0, 0, 40]
    keys = [ak.state, period, ak.hold_expiry, ak.hold_values]
    keys += [ak.settled_marker("req_t"), ak.usage_stream, ak.cfg, ak.alerts]
    keys += ak.rate_keys("key_1", "usr_1")
    assert (await Scripts(redis).settle(keys=keys, args=[*args, opened_of(routed(5))]))[0] == 1
    assert await redis.hget(period, "spend") == "900"
    kept = 7200 if ttl_before > 0 else 3600  # the hold's, else the settle's ARGV[6]
    assert kept - 100 < await redis.ttl(period) <= kept


@pytest.mark.parametrize("copy_from", [1, 10**9], ids=["copy", "statement"])
async def test_a_stream_holding_both_forms_drains_into_postgresql(
    copy_from: int, own_stores: tuple[Redis, asyncpg.Pool], db: asyncpg.Connection
) -> None:
    redis, pool = own_stores
    run = secrets.token_hex(3)
    await fill(redis, 40, 2, run, mixed=True)  # odd records in the old form, even in the new
    account = f"t_bench{run}0000"
    stream = rk.AccountKeys(account).usage_stream
    too_big = {**_record(100, account, run), "prompt_tokens": 2**40}  # beyond integer
    await redis.xadd(stream, stream_entry(too_big))  # type: ignore[arg-type]
    await redis.xadd(stream, {RECORD: "not a record"})
    no_period = {**_record(101, account, run), "period": ""}  # in either form
    await redis.xadd(stream, stream_entry(no_period))  # type: ignore[arg-type]
    await redis.xadd(stream, old_entry({**no_period, "request_id": f"req_{run}_102"}))
    markers = [
        rk.AccountKeys(f"t_bench{run}{n % 2:04d}").settled_marker(f"req_{run}_{n}")
        for n in range(40)
    ]
    for marker in markers:
        await redis.set(marker, "1", ex=rk.RID_TTL_S)
    writer = UsageWriter(redis, pool, "test-forms")
    writer.copy_from = copy_from
    while await writer.step():
        pass
    assert await run_records(db, run) == 40
    assert await writer.pending() == 0
    rows = await db.fetch(
        f"SELECT {', '.join(COLUMNS)} FROM usage_records WHERE request_id LIKE $1",
        f"req_{run}_%",
    )
    by_id = {r["request_id"]: r for r in rows}
    for n in range(40):
        fields = _record(n, f"t_bench{run}{n % 2:04d}", run)
        expected = record_row(old_entry(fields))
        assert tuple(by_id[fields["request_id"]]) == expected, n
    daily = await db.fetchrow(
        "SELECT sum(requests) AS n, sum(charged) AS charged FROM usage_daily WHERE account LIKE $1",
        f"t_bench{run}%",
    )
    assert (daily["n"], daily["charged"]) == (40, 40 * 19800)
    for marker in markers:  # ack.lua got every record's request id, whichever its form
        assert 0 < await redis.ttl(marker) <= rk.RID_AFTER_LEDGER_S, marker
    refused = await db.fetch(
        "SELECT fields, error FROM usage_rejects WHERE stream = $1 ORDER BY entry_id", stream
    )
    assert [orjson.loads(r["fields"]).get("request_id") for r in refused] == [
        f"req_{run}_100",
        None,
        f"req_{run}_101",
        f"req_{run}_102",
    ]
    assert orjson.loads(refused[1]["fields"]) == {RECORD: "not a record"}
    assert orjson.loads(refused[2]["fields"]) == fields_of(stream_entry(no_period))  # whole
    assert [r["error"] for r in refused[2:]] == ["not a period (YYYY-MM): ''"] * 2


async def test_a_record_an_older_writer_refused_is_taken_back_once(
    own_stores: tuple[Redis, asyncpg.Pool], db: asyncpg.Connection
) -> None:
    """Mid rolling upgrade, a writer of before issue 14 reads a new entry's lone ``r`` as a record
    without values, refuses it and keeps it whole in usage_rejects. A writer of this version
    inserts it (once, with its rollup) and removes the reject; one that is malformed in the new
    form too stays, and is not tried again."""
    redis, pool = own_stores
    run = secrets.token_hex(3)
    account = f"t_bench{run}0000"
    stream = rk.AccountKeys(account).usage_stream
    fields = _record(0, account, run)
    refused = "INSERT INTO usage_rejects (stream, entry_id, fields, error) VALUES ($1, $2, $3, $4)"
    old_error = "invalid literal for int() with base 10: ''"  # the old record_row's, kept whole
    for entry_id, entry in (("1-0", stream_entry(fields)), ("2-0", {RECORD: "not a record"})):
        await db.execute(refused, stream, entry_id, orjson.dumps(entry).decode(), old_error)

    async def state() -> tuple[int, Any, list[str]]:
        daily = await db.fetchval(
            "SELECT sum(charged) FROM usage_daily WHERE account = $1", account
        )
        left = await db.fetch(
            "SELECT entry_id FROM usage_rejects WHERE stream = $1 ORDER BY entry_id", stream
        )
        return await run_records(db, run), daily, [r["entry_id"] for r in left]

    writer = UsageWriter(redis, pool, "test-take-back")
    await writer.step()
    assert await state() == (1, 19800, ["2-0"])
    row = await db.fetchrow(
        f"SELECT {', '.join(COLUMNS)} FROM usage_records WHERE request_id = $1",
        fields["request_id"],
    )
    assert tuple(row) == record_row(old_entry(fields))
    # Taken back but not yet deleted (a crash in between): the next pass counts nothing twice.
    await db.execute(refused, stream, "1-0", orjson.dumps(stream_entry(fields)).decode(), "x")
    writer.take_back.next_at = 0.0
    await writer.step()
    assert await state() == (1, 19800, ["2-0"])
    malformed = await db.fetchval("SELECT id FROM usage_rejects WHERE stream = $1", stream)
    assert malformed in writer.take_back.left  # tried once, then left alone
