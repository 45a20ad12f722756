"""Pure policies as tables: money, prices, periods, key format."""

from __future__ import annotations

import pytest

from policies import key_format as apikeys
from policies.holds import discounted_hold, split_debit
from policies.money import MoneyError, format_usd, parse_usd, price_per_token
from policies.periods import next_period, period_bounds, period_of, seconds_to_period_end
from policies.pricing import (
    Prices,
    apply_discount,
    charge,
    list_cost,
    requested_output_cap,
    worst_case_list_cost,
)
from tests.helpers import ts


@pytest.mark.parametrize(
    ("value", "nanos"),
    [
        ("12.5", 12_500_000_000),
        ("0.000000001", 1),
        (10, 10_000_000_000),
        (0.1, 100_000_000),
        ("1e-9", 1),
        (" 3 ", 3_000_000_000),
        ("0", 0),
        (1000000.00, 1_000_000_000_000_000),
    ],
)
def test_parse_usd(value: object, nanos: int) -> None:
    assert parse_usd(value) == nanos


@pytest.mark.parametrize(
    "value", ["0.0000000001", "abc", "", None, True, "NaN", "inf", [], {}, "-1"]
)
def test_parse_usd_refuses(value: object) -> None:
    with pytest.raises(MoneyError):
        parse_usd(value)


def test_parse_usd_negative_when_allowed() -> None:
    assert parse_usd("-2.5", allow_negative=True) == -2_500_000_000


@pytest.mark.parametrize(
    ("nanos", "text"),
    [
        (12_500_000_000, "12.500000000"),
        (1, "0.000000001"),
        (0, "0.000000000"),
        (-4_350, "-0.000004350"),
    ],
)
def test_format_usd(nanos: int, text: str) -> None:
    assert format_usd(nanos) == text
    assert parse_usd(text, allow_negative=True) == nanos


@pytest.mark.parametrize(
    ("per_mtok", "per_token"),
    [(0.15, 150), ("0.60", 600), (2.5, 2500), (0, 0), ("0.001", 1), (60, 60_000)],
)
def test_price_per_token(per_mtok: object, per_token: int) -> None:
    assert price_per_token(per_mtok) == per_token


@pytest.mark.parametrize("per_mtok", ["0.0001", "0.1505", "-1"])
def test_price_per_token_refuses_fractions(per_mtok: str) -> None:
    with pytest.raises(MoneyError):
        price_per_token(per_mtok)


MINI = Prices(input=150, output=600, cached_input=75)


@pytest.mark.parametrize(
    ("prompt", "completion", "cached", "cost"),
    [
        (5, 6, 0, 4_350),
        (1000, 0, 0, 150_000),
        (1000, 10, 400, 600 * 150 + 400 * 75 + 6_000),
        (10, 0, 50, 10 * 75),  # cached never exceeds the prompt
        (0, 0, 0, 0),
    ],
)
def test_list_cost(prompt: int, completion: int, cached: int, cost: int) -> None:
    assert list_cost(MINI, prompt, completion, cached) == cost


def test_cached_tokens_without_cached_price_pay_full_input() -> None:
    assert list_cost(Prices(input=150, output=600), 100, 0, 40) == 15_000


@pytest.mark.parametrize(
    ("amount", "bps", "charged"),
    [
        (4_350, 0, 4_350),
        (4_350, 1000, 3_915),
        (4_351, 1000, 3_915),
        (9_999, 1, 9_998),
        (1, 5000, 0),
        (10_000, 10_000, 0),
        (123_456_789, 2_500, 92_592_591),
        (5, -3, 5),
        (5, 20_000, 0),
    ],
)
def test_discount_rounds_down(amount: int, bps: int, charged: int) -> None:
    assert apply_discount(amount, bps) == charged
    assert discounted_hold(amount, bps) == charged
    result = charge(amount, bps)
    assert result.list_cost - result.discount == result.charged


@pytest.mark.parametrize("amount", [0, 1, 9_999, 10_000, 10_001, 2**52, 123_456_789_012])
@pytest.mark.parametrize("bps", [0, 1, 333, 5_000, 9_999])
def test_discounted_hold_matches_exact_formula(amount: int, bps: int) -> None:
    assert discounted_hold(amount, bps) == amount * (10_000 - bps) // 10_000


@pytest.mark.parametrize(
    ("body", "cap"),
    [
        ({}, 1000),
        ({"max_tokens": 50}, 50),
        ({"max_completion_tokens": 20, "max_tokens": 50}, 20),
        ({"max_tokens": 10, "n": 3}, 30),
        ({"max_tokens": True}, 1000),
        ({"max_tokens": -1}, 1000),
        ({"n": 2}, 2000),
    ],
)
def test_requested_output_cap(body: dict[str, object], cap: int) -> None:
    assert requested_output_cap(body, 1000) == cap


def test_worst_case() -> None:
    assert worst_case_list_cost(MINI, 10, 100) == 10 * 150 + 100 * 600


@pytest.mark.parametrize(
    ("charged", "allowance", "spent", "from_allowance", "from_credits"),
    [
        (100, 1000, 0, 100, 0),
        (100, 1000, 950, 50, 50),
        (100, 1000, 1000, 0, 100),
        (100, 0, 0, 0, 100),
        (100, 1000, 1200, 0, 100),
        (0, 10, 0, 0, 0),
    ],
)
def test_split_debit(
    charged: int, allowance: int, spent: int, from_allowance: int, from_credits: int
) -> None:
    debit = split_debit(charged, allowance, spent)
    assert (debit.from_allowance, debit.from_credits) == (from_allowance, from_credits)


@pytest.mark.parametrize(
    ("when", "period", "left"),
    [
        ("2026-11-23T10:00:00", "2026-11", 7 * 86400 + 14 * 3600),
        ("2026-12-31T23:59:50", "2026-12", 10),
        ("2026-12-31T23:59:59.5", "2026-12", 1),
        ("2027-01-01T00:00:00", "2027-01", 31 * 86400),
        ("2028-02-28T00:00:00", "2028-02", 2 * 86400),  # leap year
        ("2027-02-28T00:00:00", "2027-02", 86400),
    ],
)
def test_periods(when: str, period: str, left: int) -> None:
    now = ts(when)
    assert period_of(now) == period
    assert seconds_to_period_end(now) == left
    start, end = period_bounds(period)
    assert start <= now < end


def test_next_period_turns_the_year() -> None:
    assert next_period("2026-12") == "2027-01"
    assert next_period("2026-11") == "2026-12"


def test_api_key_format() -> None:
    body = "A" * apikeys.BODY_LEN
    key = apikeys.format_key(body)
    assert key.startswith("mb_") and len(key) == apikeys.KEY_LEN
    assert apikeys.well_formed(key)
    assert not apikeys.well_formed(key[:-1] + ("x" if key[-1] != "x" else "y"))
    assert not apikeys.well_formed("mb_" + "A" * apikeys.BODY_LEN + "!!!!!!")
    assert not apikeys.well_formed("sk-" + key[3:])
    assert apikeys.display_prefix(key) == key[:11]
