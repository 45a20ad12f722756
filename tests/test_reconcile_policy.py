"""policies.reconcile: what differs between Redis, the ledger and the rollup, by table."""

from __future__ import annotations

from typing import Any

import pytest

from policies.ledger import Totals
from policies.reconcile import LedgerView, RedisView, compare, held, report

P = "2026-11"
COUNTERS = {"spend": 700, "aspent": 200, "req": 2, "ms:u": 700, "mr:u": 2, "ks:k": 700, "mo:m": 700}


def agreeing() -> tuple[RedisView, LedgerView]:
    redis = RedisView(
        loaded=True,
        state={"loaded": "1", "credits": "9500", "holds": "30", "mh:u": "30", "sub_alw": "0"},
        hold_values={"req_a": "30|u"},
        periods={
            P: {
                **{k: str(v) for k, v in COUNTERS.items()},
                "alw": "200",
                "mx:u": "5",
                "al:team:80:1000": "1",
            }
        },
    )
    ledger = LedgerView(
        totals=Totals(credits=9500, periods={P: dict(COUNTERS)}),
        allowances={P: 200},
        records={P: (2, 700)},
        rollup={P: (2, 700)},
    )
    return redis, ledger


def fields(redis: RedisView, ledger: LedgerView) -> list[tuple[str, Any, Any]]:
    return [(d.field, d.redis, d.ledger) for d in compare("t_T", redis, ledger)]


def test_agreeing_account_has_no_difference() -> None:
    assert fields(*agreeing()) == []


CASES = [
    ("credits", lambda r, g: r.state.__setitem__("credits", "9499"), [("credits", 9499, 9500)]),
    ("spend", lambda r, g: r.periods[P].__setitem__("spend", "701"), [(f"{P}:spend", 701, 700)]),
    (
        "member counter missing in Redis",
        lambda r, g: r.periods[P].pop("ms:u"),
        [(f"{P}:ms:u", 0, 700)],
    ),
    (
        "key counter only in Redis",
        lambda r, g: r.periods[P].__setitem__("ks:x", "3"),
        [(f"{P}:ks:x", 3, 0)],
    ),
    (
        "pinned allowance",
        lambda r, g: r.periods[P].__setitem__("alw", "100"),
        [(f"{P}:alw", 100, 200)],
    ),
    ("unpinned allowance is not the ledger's", lambda r, g: g.allowances.clear(), []),
    (
        "holds against the hold hash",
        lambda r, g: r.state.__setitem__("holds", "0"),
        [("holds", 0, 30)],
    ),
    (
        "a hold of another scope",
        lambda r, g: r.hold_values.__setitem__("req_b", "5|v|h|9|k"),
        [("holds", 30, 35), ("kh:k", 0, 5), ("mh:v", 0, 5)],
    ),
    (
        "rollup",
        lambda r, g: g.rollup.__setitem__(P, (2, 699)),
        [(f"{P}:usage_daily.charged", 699, 700)],
    ),
    (
        "rollup misses a period",
        lambda r, g: g.rollup.clear(),
        [(f"{P}:usage_daily.requests", 0, 2), (f"{P}:usage_daily.charged", 0, 700)],
    ),
    (
        "alert flags and mx baselines are not money",
        lambda r, g: r.periods[P].update({"mx:u": "99", "al:u:100:5": "1"}),
        [],
    ),
    (
        "an account not loaded: only the rollup",
        lambda r, g: (setattr(r, "loaded", False), r.state.__setitem__("credits", "1")),
        [],
    ),
]


@pytest.mark.parametrize(("name", "change", "expected"), CASES, ids=[c[0] for c in CASES])
def test_differences(name: str, change: Any, expected: list[tuple[str, int, int]]) -> None:
    redis, ledger = agreeing()
    redis.state, redis.hold_values = dict(redis.state), dict(redis.hold_values)
    redis.periods = {P: dict(redis.periods[P])}
    ledger.allowances, ledger.rollup = dict(ledger.allowances), dict(ledger.rollup)
    change(redis, ledger)
    assert fields(redis, ledger) == expected


def test_held_sums_every_hold_format() -> None:
    assert held({"a": "10|u", "b": "5|u|h|7|k", "c": "1|v|kmt|3|k2"}) == {
        "holds": 16,
        "mh:u": 15,
        "mh:v": 1,
        "kh:k": 5,
    }


def test_report_shows_money_in_usd_and_counts_as_integers() -> None:
    redis, ledger = agreeing()
    redis.state = {**redis.state, "credits": "-5"}
    redis.periods = {P: {**redis.periods[P], "req": "3", "mr:u": "3"}}
    out = report(4, compare("t_T", redis, ledger))
    assert out == {
        "ok": False,
        "accounts_checked": 4,
        "differences": [
            {
                "account": "t_T",
                "field": "credits",
                "redis": "-0.000000005",
                "ledger": "0.000009500",
            },
            {"account": "t_T", "field": f"{P}:mr:u", "redis": 3, "ledger": 2},
            {"account": "t_T", "field": f"{P}:req", "redis": 3, "ledger": 2},
        ],
    }
    assert report(0, []) == {"ok": True, "accounts_checked": 0, "differences": []}
