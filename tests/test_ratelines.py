"""The lean front's ``x-ratelimit-*`` lines (gateway/proxy/ratelines.py) say exactly what
:func:`policies.ratelimits.headers` says, in its order, for any figures a hold replies with."""

from __future__ import annotations

import itertools

from gateway.metering.meter import HoldResult
from gateway.proxy import ratelines
from policies.ratelimits import RateView, Usage, format_reset, headers

LIMITS = (-1, 0, 1, 3, 10**9, 10**15)  # -1: no such limit
RESETS = (-5, 0, 1, 999, 1000, 1001, 1010, 1100, 1234, 9999, 10_000, 59_999, 60_000, 61_250)


def _view(figures: list[int]) -> RateView:
    limit_r, left_r, reset_r, limit_t, left_t, reset_t = figures
    return RateView(
        None if limit_r < 0 else Usage(limit_r, left_r, reset_r),
        None if limit_t < 0 else Usage(limit_t, left_t, reset_t),
    )


def _as_lines(view: RateView) -> str:
    return "\r\n".join(f"{name}: {value}" for name, value in headers(view).items())


def test_lines_are_the_headers_of_the_same_figures() -> None:
    for limit_r, limit_t, reset_r, reset_t in itertools.product(LIMITS, LIMITS, RESETS, RESETS):
        for left in (0, 2, 999_999_749):
            figures = [limit_r, left, reset_r, limit_t, left + 7, reset_t]
            assert ratelines.lines(figures) == _as_lines(_view(figures)), figures


def test_no_limit_no_lines() -> None:
    assert ratelines.lines([-1, 0, 0, -1, 0, 0]) == ""


def test_reset_text_is_format_reset() -> None:
    for ms in range(-3, 125_000):
        assert ratelines.reset_text(ms) == format_reset(ms)


def test_the_lines_of_a_limit_are_kept_for_a_bounded_number_of_limits() -> None:
    for limit in range(ratelines._LIMITS_MAX + 5):
        ratelines.lines([limit, 0, 1000, limit, 0, 1000])
    assert 0 < len(ratelines._REQUESTS) <= ratelines._LIMITS_MAX
    assert 0 < len(ratelines._TOKENS) <= ratelines._LIMITS_MAX
    assert ratelines.lines([5, 4, 1500, -1, 0, 0]) == (
        "x-ratelimit-limit-requests: 5\r\n"
        "x-ratelimit-remaining-requests: 4\r\n"
        "x-ratelimit-reset-requests: 1.5s"
    )


def test_a_hold_result_gives_its_figures_as_a_rate_view() -> None:
    figures = [3, 2, 60_000, -1, 0, 0]
    held = HoldResult("ok", 0, 0, False, stamp_ms=1, figures=figures)
    assert held.rate == RateView(Usage(3, 2, 60_000), None)
    assert HoldResult("ok", 0, 0, False).rate is None
