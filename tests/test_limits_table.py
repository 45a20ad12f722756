"""Every decision of sections 2 to 4 as a table through its pure function in ``policies``.

The tables are in ``tests/limit_tables.py``; the same tables run through the Lua scripts on real
Redis in ``test_lua_parity.py``.
"""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime

import pytest

from policies import alerts, subscriptions
from policies.holds import discounted_hold, split_debit
from policies.limits import (
    HARD,
    NO_CONTROLS,
    SOFT,
    KeyControls,
    decide,
    effective_enforcement,
    effective_member_limit,
    key_entry,
    parse_key_entry,
)
from policies.periods import period_of, seconds_to_period_end
from policies.pricing import apply_discount, charge
from policies.ratelimits import format_reset
from tests.limit_tables import (
    ALL_DECISIONS,
    BINDING,
    CROSSINGS,
    DISCOUNTS,
    K_LOG,
    NOW,
    PAIRS,
    RICH,
    SPLITS,
    Row,
)


@pytest.mark.parametrize("row", ALL_DECISIONS, ids=lambda r: r.name)
def test_decide(row: Row) -> None:
    decision = decide(row.state(), row.hold, row.tokens)
    assert (decision.refusal, decision.warn_member_limit) == (row.expect, row.warn)
    assert decision.retry_after == row.retry


def test_every_pair_of_limits_is_in_the_table() -> None:
    assert len(PAIRS) == len(BINDING) * (len(BINDING) - 1) // 2 == 78
    # and each binding limit alone refuses with its own code
    for name, delta, code in BINDING:
        row = replace(Row(name, credits=RICH), **delta)  # type: ignore[arg-type]
        assert decide(row.state(), row.hold, row.tokens).refusal == code


def test_rate_headers_name_the_tightest_limit() -> None:
    # key: 3 - 3 = 0 requests left; member: 10 - 3 = 7; team tokens: 1000 - 160 = 840
    row = Row("headers", credits=RICH, krpm=3, mrpm=10, ttpm=1000)
    rate = decide(row.state(), row.hold, row.tokens).rate
    assert rate is not None and rate.requests is not None and rate.tokens is not None
    assert (rate.requests.limit, rate.requests.remaining, rate.requests.reset_ms) == (3, 0, 30_000)
    assert (rate.tokens.limit, rate.tokens.remaining, rate.tokens.reset_ms) == (1000, 840, 10_000)
    # a tie in what is left goes to the smaller limit
    row = Row("tie", credits=RICH, krpm=13, mrpm=3, klog=K_LOG * 5)
    rate = decide(row.state(), row.hold, row.tokens).rate
    assert rate is not None and rate.requests is not None
    assert (rate.requests.limit, rate.requests.remaining) == (3, 0)
    # no rate limit: no figures
    assert decide(Row("none", credits=RICH).state(), 1000, 100).rate is None


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0ms"),
        (17, "17ms"),
        (999, "999ms"),
        (1000, "1s"),
        (1500, "1.5s"),
        (59_999, "59.999s"),
        (60_000, "1m0s"),
        (61_250, "1m1.25s"),
    ],
)
def test_reset_durations_as_openai_writes_them(ms: int, text: str) -> None:
    assert format_reset(ms) == text


@pytest.mark.parametrize(
    "controls",
    [
        NO_CONTROLS,
        KeyControls(expires_at=NOW),
        KeyControls(models=()),
        KeyControls(models=("a", "b-c")),
        KeyControls(1, ("x",), 2, 3, 4),
        KeyControls(monthly_limit=0, rpm=0, tpm=0),
    ],
)
def test_key_entries_round_trip(controls: KeyControls) -> None:
    entry = key_entry("usr_1", controls)
    assert parse_key_entry(entry) == ("usr_1", controls)
    assert (entry == "usr_1") == (controls == NO_CONTROLS)


@pytest.mark.parametrize(
    ("override", "override_set", "default", "limit"),
    [
        (None, False, None, None),
        (None, False, 7, 7),
        (None, True, 7, None),
        (3, True, 7, 3),
        (0, True, None, 0),
    ],
)
def test_which_member_limit_applies(
    override: int | None, override_set: bool, default: int | None, limit: int | None
) -> None:
    assert effective_member_limit(override, override_set, default) == limit


@pytest.mark.parametrize(
    ("override", "default", "enforcement"),
    [
        (None, None, HARD),
        (None, SOFT, SOFT),
        (HARD, SOFT, HARD),
        (SOFT, HARD, SOFT),
        ("", SOFT, SOFT),
    ],
)
def test_which_enforcement_applies(
    override: str | None, default: str | None, enforcement: str
) -> None:
    assert effective_enforcement(override, default) == enforcement


@pytest.mark.parametrize(("charged", "alw", "aspent", "from_alw", "from_credits"), SPLITS)
def test_allowance_first_then_credits(
    charged: int, alw: int, aspent: int, from_alw: int, from_credits: int
) -> None:
    debit = split_debit(charged, alw, aspent)
    assert (debit.from_allowance, debit.from_credits) == (from_alw, from_credits)


@pytest.mark.parametrize(("amount", "bps", "charged"), DISCOUNTS)
def test_discount_rounds_down(amount: int, bps: int, charged: int) -> None:
    assert apply_discount(amount, bps) == charged == discounted_hold(amount, bps)
    c = charge(amount, bps)
    assert (c.list_cost, c.discount, c.charged) == (amount, amount - charged, charged)


@pytest.mark.parametrize(("before", "after", "limit", "soft", "warned", "crossed"), CROSSINGS)
def test_threshold_crossings(
    before: int, after: int, limit: int | None, soft: bool, warned: bool, crossed: tuple[str, ...]
) -> None:
    assert alerts.crossings(before, after, limit, soft=soft, warned=warned) == crossed


@pytest.mark.parametrize(
    ("limit", "pct", "amount"),
    [
        (1000, 80, 800),
        (9, 80, 8),
        (1, 80, 1),
        (0, 80, 0),
        (101, 80, 81),
        (12_345, 100, 12_345),
        (2**53 - 1, 80, -(-(2**53 - 1) * 80 // 100)),
    ],
)
def test_threshold_amount_is_the_ceiling(limit: int, pct: int, amount: int) -> None:
    assert alerts.threshold_amount(limit, pct) == amount


def test_retries_back_off_exponentially_and_give_up() -> None:
    delays = [alerts.retry_delay(n, base_s=1.0, cap_s=60.0) for n in range(1, 9)]
    assert delays == [1.0, 2.0, 4.0, 8.0, 16.0, 32.0, 60.0, 60.0]
    assert not alerts.gives_up(alerts.MAX_ATTEMPTS - 1) and alerts.gives_up(alerts.MAX_ATTEMPTS)


def test_every_threshold_has_an_event_type() -> None:
    assert alerts.event_type("team", "80") == "spending_limit.threshold_reached"
    assert alerts.event_type("member", "100") == "member_limit.threshold_reached"
    assert alerts.event_type("member", "exceeded") == "member_limit.soft_exceeded"


# this period's allowance, invoiced, new allowance, new cost -> delta, invoice line, allowance
SUBSCRIPTION_CHANGES = [
    ("first subscription", 0, 0, 15, 60, 15, 60, 15),
    ("raise seats", 15, 60, 25, 100, 10, 40, 25),
    ("lower seats: next period", 25, 100, 10, 40, 0, 0, 25),
    ("raise back to what was paid", 25, 100, 20, 80, 0, 0, 25),
    ("raise past what was paid", 25, 100, 30, 120, 5, 20, 30),
    ("cancel", 25, 100, 0, 0, 0, 0, 25),
    ("upgrade plan", 10, 50, 25, 100, 15, 50, 25),
    ("same", 15, 60, 15, 60, 0, 0, 15),
]


@pytest.mark.parametrize(
    ("name", "alw", "invoiced", "new_alw", "new_cost", "delta", "line", "after"),
    SUBSCRIPTION_CHANGES,
    ids=[c[0] for c in SUBSCRIPTION_CHANGES],
)
def test_subscription_changes(
    name: str,
    alw: int,
    invoiced: int,
    new_alw: int,
    new_cost: int,
    delta: int,
    line: int,
    after: int,
) -> None:
    change = subscriptions.change(alw, invoiced, new_alw, new_cost)
    assert (change.allowance_delta, change.invoice_amount, change.period_allowance) == (
        delta,
        line,
        after,
    )


@pytest.mark.parametrize(
    ("old_plan", "new_plan", "seats", "amount", "price", "line_seats"),
    [
        (None, "pro", 3, 60, 20, 3),
        ("pro", "pro", 5, 40, 20, 2),
        ("pro", "pro", 12, 30, 20, 2),
        ("starter", "pro", 5, 50, 20, 5),
        ("pro", "pro", 2, 0, 0, 2),
    ],
)
def test_invoice_line_seats(
    old_plan: str | None, new_plan: str, seats: int, amount: int, price: int, line_seats: int
) -> None:
    assert subscriptions.line_seats(old_plan, new_plan, seats, amount, price) == line_seats


def _ts(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("when", "period", "retry_after"),
    [
        ("2026-12-31T23:59:50", "2026-12", 10),
        ("2026-12-31T23:59:59.500", "2026-12", 1),
        ("2027-01-01T00:00:00", "2027-01", 31 * 86400),
        ("2028-02-28T00:00:00", "2028-02", 2 * 86400),
        ("2027-02-28T23:00:00", "2027-02", 3600),
        ("2026-11-30T23:59:59.001", "2026-11", 1),
    ],
)
def test_periods_and_retry_after(when: str, period: str, retry_after: int) -> None:
    now = _ts(when)
    assert (period_of(now), seconds_to_period_end(now)) == (period, retry_after)
