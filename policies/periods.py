"""Billing periods: calendar months in UTC, named ``YYYY-MM``.

Counters are keyed by period, so a new month starts from zero without any job running.
"""

from __future__ import annotations

import functools
import re
from datetime import UTC, datetime

_PERIOD = re.compile(r"[0-9]{4}-(0[1-9]|1[0-2])")


def period_of(now: float) -> str:
    """Unix time -> ``"2026-11"``."""
    return _period_of_hour(int(now // 3600))


@functools.lru_cache(maxsize=64)
def _period_of_hour(hour: int) -> str:
    # Months start on whole UTC hours, so every second of an hour is in one period.
    dt = datetime.fromtimestamp(hour * 3600, UTC)
    return f"{dt.year:04d}-{dt.month:02d}"


def is_period(value: object) -> bool:
    """Whether ``value`` names a period: ``YYYY-MM``, month 01 to 12 (what a usage record must
    carry: the period counters, in Redis and summed from the ledger, are keyed by it)."""
    return isinstance(value, str) and _PERIOD.fullmatch(value) is not None


def period_bounds(period: str) -> tuple[float, float]:
    """``"2026-11"`` -> (start, end) as unix times; end is the next period's start."""
    year, month = (int(part) for part in period.split("-"))
    start = datetime(year, month, 1, tzinfo=UTC)
    end = (
        datetime(year + 1, 1, 1, tzinfo=UTC)
        if month == 12
        else datetime(year, month + 1, 1, tzinfo=UTC)
    )
    return start.timestamp(), end.timestamp()


def next_period(period: str) -> str:
    _, end = period_bounds(period)
    return period_of(end)


def seconds_to_period_end(now: float) -> int:
    """Whole seconds until the current period ends, rounded up, at least 1 (for Retry-After)."""
    _, end = period_bounds(period_of(now))
    remaining = end - now
    whole = int(remaining)
    if whole < remaining:
        whole += 1
    return max(1, whole)
