"""The Lua scripts take the same decisions as the pure functions, on real Redis.

Each row of the tables in ``test_limits_table`` is written into a fresh account's keys directly,
then ``hold.lua`` / ``settle.lua`` run through ``gateway.metering.scripts.Scripts`` and their answer is
compared with ``policies.limits.decide``, ``policies.holds.split_debit``,
``policies.pricing.apply_discount`` and ``policies.alerts.crossings``.
"""

from __future__ import annotations

import secrets
from typing import Any

import pytest
from redis.asyncio import Redis

from gateway.metering.scripts import Scripts, lua_source
from policies import alerts, guessing
from policies import keyspace as rk
from policies.holds import split_debit
from policies.limits import SOFT, decide
from policies.pricing import apply_discount
from tests.test_limits_table import CROSSINGS, DECISIONS, DISCOUNTS, SPLITS, Row

PERIOD = "2026-11"
NOW = 1_795_000_000
SCOPE = "usr_0123456789abcdef0123"
KEY = "key_parity"
MODEL = "gpt-4o-mini"
RICH = 2**62


def fresh() -> rk.AccountKeys:
    return rk.AccountKeys(f"t_parity{secrets.token_hex(8)}")


def hold_keys(ak: rk.AccountKeys) -> list[str]:
    return [
        ak.state, ak.period(PERIOD), ak.cfg, ak.keys, ak.blocked(""), ak.hold_expiry,
        ak.hold_values, ak.alerts,
    ]  # fmt: skip


def settle_keys(ak: rk.AccountKeys, request_id: str) -> list[str]:
    return [
        ak.state, ak.period(PERIOD), ak.hold_expiry, ak.hold_values,
        ak.settled_marker(request_id), ak.usage_stream, ak.cfg, ak.alerts,
    ]  # fmt: skip


def _set(mapping: dict[str, Any], name: str, value: object) -> None:
    if value is not None:
        mapping[name] = str(value)


async def install(redis: Redis, ak: rk.AccountKeys, row: Row) -> None:
    state = {"loaded": "1", "credits": str(row.credits), "holds": str(row.holds)}
    state["mh:" + SCOPE] = str(row.mh)
    state["sub_alw"] = str(row.alw)
    period = {"alw": str(row.alw), "aspent": str(row.aspent), "spend": str(row.spend)}
    period["ms:" + SCOPE] = str(row.ms)
    period["mx:" + SCOPE] = str(row.mx)
    cfg: dict[str, Any] = {"disc": str(row.disc)}
    _set(cfg, "limit", row.limit)
    _set(cfg, "dml", row.dml)
    _set(cfg, "den", row.den)
    if row.ml_set:
        cfg["ml:" + SCOPE] = "-1" if row.ml is None else str(row.ml)
    _set(cfg, "me:" + SCOPE, row.me)
    pipe = redis.pipeline(transaction=False)
    pipe.hset(ak.state, mapping=state)
    pipe.hset(ak.period(PERIOD), mapping=period)
    pipe.hset(ak.cfg, mapping=cfg)
    if row.key_active:
        pipe.hset(ak.keys, KEY, SCOPE)
    if row.blocked:
        pipe.sadd(ak.blocked(""), MODEL)
    await pipe.execute()


async def run_hold(scripts: Scripts, ak: rk.AccountKeys, worst: int) -> Any:
    args = [NOW, "req_parity", KEY, SCOPE, MODEL, worst, 60, 3600]
    return await scripts.hold(keys=hold_keys(ak), args=args)


@pytest.mark.parametrize("row", DECISIONS, ids=lambda r: r.name)
async def test_hold_decides_like_policies(redis: Redis, row: Row) -> None:
    scripts = Scripts(redis)
    ak = fresh()
    await install(redis, ak, row)
    status, amount, disc, warn, _ = await run_hold(scripts, ak, row.worst)
    expected = decide(row.state(), row.hold)
    assert status == (expected.refusal or "ok")
    assert bool(warn) == expected.warn_member_limit
    if expected.admitted:
        assert (amount, disc) == (row.hold, row.disc)
        state = await redis.hmget(ak.state, ["holds", "mh:" + SCOPE])
        assert state == [str(row.holds + row.hold), str(row.mh + row.hold)]
    else:
        assert await redis.hget(ak.state, "holds") == str(row.holds)


@pytest.mark.parametrize(("amount", "bps", "charged"), DISCOUNTS)
async def test_hold_discount_like_pricing(
    redis: Redis, amount: int, bps: int, charged: int
) -> None:
    ak = fresh()
    await install(redis, ak, Row("discount", credits=RICH, disc=bps))
    status, held, *_ = await run_hold(Scripts(redis), ak, amount)
    assert (status, held) == ("ok", apply_discount(amount, bps))
    assert await redis.hget(ak.hold_values, "req_parity") == f"{held}|{SCOPE}"


async def _settle(
    redis: Redis, ak: rk.AccountKeys, charged: int, *, warned: bool = False, hold: int = 0
) -> Any:
    request_id = "req_" + secrets.token_hex(6)
    if hold:
        await redis.hset(ak.hold_values, request_id, f"{hold}|{SCOPE}")
        await redis.hincrby(ak.state, "holds", hold)
        await redis.hincrby(ak.state, "mh:" + SCOPE, hold)
    args = [request_id, charged, SCOPE, KEY, MODEL, 3600, 60, int(warned), NOW, "request_id", request_id]  # fmt: skip
    return await Scripts(redis).settle(keys=settle_keys(ak, request_id), args=args)


@pytest.mark.parametrize(("charged", "alw", "aspent", "from_alw", "from_credits"), SPLITS)
async def test_settle_splits_like_policies(
    redis: Redis, charged: int, alw: int, aspent: int, from_alw: int, from_credits: int
) -> None:
    ak = fresh()
    await install(redis, ak, Row("split", credits=10**15, alw=alw, aspent=aspent))
    reply = await _settle(redis, ak, charged, hold=charged + 7)
    debit = split_debit(charged, alw, aspent)
    assert (reply[1], reply[2]) == (debit.from_allowance, debit.from_credits)
    assert (reply[1], reply[2]) == (from_alw, from_credits)
    state = await redis.hmget(ak.state, ["credits", "holds", "mh:" + SCOPE])
    assert state == [str(10**15 - from_credits), "0", "0"]
    period = await redis.hmget(ak.period(PERIOD), ["aspent", "spend", "ms:" + SCOPE])
    assert period == [str(aspent + from_alw), str(charged), str(charged)]


async def _thresholds(redis: Redis, ak: rk.AccountKeys) -> list[tuple[str, str]]:
    return [(f["kind"], f["threshold"]) for _, f in await redis.xrange(ak.alerts)]


@pytest.mark.parametrize(("before", "after", "limit", "soft", "warned", "crossed"), CROSSINGS)
async def test_settle_member_thresholds_like_policies(
    redis: Redis, before: int, after: int, limit: int | None, soft: bool, warned: bool,
    crossed: tuple[str, ...],
) -> None:  # fmt: skip
    ak = fresh()
    # Half the spend billed here, half elsewhere (a billing-mode switch): both count.
    row = Row("member", credits=RICH, ms=before - before // 2, mx=before // 2, dml=limit,
              den=SOFT if soft else "hard")  # fmt: skip
    await install(redis, ak, row)
    reply = await _settle(redis, ak, after - before, warned=warned)
    expected = alerts.crossings(before, after, limit, soft=soft, warned=warned)
    assert reply[3] == len(expected)
    assert await _thresholds(redis, ak) == [("member", t) for t in expected]
    assert expected == crossed
    # Once per period and limit value: the same crossing again queues nothing.
    await redis.hset(ak.period(PERIOD), mapping={"ms:" + SCOPE: str(before - before // 2)})
    again = await _settle(redis, ak, after - before, warned=warned)
    assert again[3] == 0


@pytest.mark.parametrize(("before", "after", "limit", "soft", "warned", "crossed"), CROSSINGS)
async def test_settle_team_thresholds_like_policies(
    redis: Redis, before: int, after: int, limit: int | None, soft: bool, warned: bool,
    crossed: tuple[str, ...],
) -> None:  # fmt: skip
    ak = fresh()
    await install(redis, ak, Row("team", credits=RICH, spend=before, limit=limit))
    await _settle(redis, ak, after - before, warned=warned)
    expected = alerts.crossings(before, after, limit)  # a team limit is never soft
    assert await _thresholds(redis, ak) == [("team", t) for t in expected]


async def test_limit_refusal_queues_one_reached_alert(redis: Redis) -> None:
    ak = fresh()
    row = Row("refused", credits=RICH, limit=1000, spend=600, dml=5000)
    await install(redis, ak, row)
    replies = [await run_hold(Scripts(redis), ak, 500) for _ in range(3)]
    assert [(r[0], r[4]) for r in replies] == [("team_spending_limit_reached", 1)] + [
        ("team_spending_limit_reached", 0)
    ] * 2
    entries = await redis.xrange(ak.alerts)
    assert len(entries) == 1
    fields = entries[0][1]
    assert (fields["kind"], fields["threshold"], fields["trigger"]) == ("team", "100", "refusal")
    assert (fields["limit"], fields["spend"], fields["period"]) == ("1000", "600", PERIOD)


# --- guess.lua and policies.guessing ------------------------------------------------------------
GUESS_RULES = [
    guessing.Rule(guessing.PAIR, free=5, first_wait_s=2, max_wait_s=900, window_s=3600),
    guessing.Rule(guessing.ACCOUNT, free=1, first_wait_s=1, max_wait_s=30, window_s=60),
    guessing.Rule(guessing.CLIENT, free=3, first_wait_s=60, max_wait_s=60, window_s=3600),
]


async def _guess(redis: Redis, mode: str, keys: list[str], rule: guessing.Rule) -> list[int]:
    waits = ",".join(map(str, rule.schedule()))
    args = [mode, rule.free, rule.window_s, rule.on_success, waits]
    return [int(x) for x in await redis.eval(lua_source("guess"), len(keys), *keys, *args)]  # type: ignore[misc]


@pytest.mark.parametrize("rule", GUESS_RULES)
async def test_guess_waits_like_policies(redis: Redis, rule: guessing.Rule) -> None:
    count, wait = keys = list(rk.guess_keys("parity", rule.scope, secrets.token_hex(8)))
    for attempts in range(1, rule.free + 14):
        assert await _guess(redis, "try", keys, rule) == [1, 0]
        assert int(await redis.get(count)) == attempts
        assert 0 < await redis.ttl(count) <= rule.window_s
        expected = rule.wait_after(attempts)
        left = await redis.pttl(wait)
        if expected == 0:
            assert left == -2  # no wait
            continue
        assert (expected - 1) * 1000 < left <= expected * 1000
        refused = await _guess(redis, "try", keys, rule)  # waiting: refused, not counted
        assert refused[0] == 0 and 0 < refused[1] <= left
        assert int(await redis.get(count)) == attempts
        await redis.delete(wait)  # the wait is over


async def test_guess_success_clears_refunds_or_keeps(redis: Redis) -> None:
    rules = [
        guessing.Rule(guessing.PAIR, 2, 1, 8, 60, guessing.CLEAR),
        guessing.Rule(guessing.ACCOUNT, 9, 1, 8, 60, guessing.REFUND),
        guessing.Rule(guessing.CLIENT, 9, 1, 8, 60, guessing.KEEP),
    ]
    tag = secrets.token_hex(8)
    keys = [k for r in rules for k in rk.guess_keys("parity", r.scope, tag)]
    args: list[object] = []
    for r in rules:
        args += [r.free, r.window_s, r.on_success, ",".join(map(str, r.schedule()))]
    lua = lua_source("guess")
    for _ in range(2):
        assert await redis.eval(lua, len(keys), *keys, "try", *args) == [1, 0]  # type: ignore[misc]
    assert await redis.exists(keys[1]) == 1  # the pair waits after its 2nd attempt
    assert await redis.eval(lua, len(keys), *keys, "ok", *args) == [1, 0]  # type: ignore[misc]
    assert [await redis.get(k) for k in keys[::2]] == [None, "1", "2"]
    assert await redis.exists(keys[1]) == 0
