"""Which months of ``usage_records`` must have a partition (months are billing periods,
``YYYY-MM``, UTC; policies/periods.py). Pure: the time is an argument."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, date, datetime

from policies.periods import next_period, period_of

AHEAD = 3  # months made ahead of the current one, at start and every hour
ENSURE_EVERY_S = 3600.0


def months_ahead(now: float, ahead: int = AHEAD) -> list[str]:
    """The current month and the ``ahead`` next ones."""
    months = [period_of(now)]
    for _ in range(ahead):
        months.append(next_period(months[-1]))
    return months


def month_of(created_at: datetime) -> str:
    """The month (partition) a record belongs to: its created_at's, in UTC."""
    at = created_at.astimezone(UTC)
    return f"{at.year:04d}-{at.month:02d}"


def months_of(created: Iterable[datetime]) -> set[str]:
    return {month_of(at) for at in created}


def first_day(month: str) -> date:
    """``"2026-11"`` -> 2026-11-01 (what ``usage_records_add_month`` takes)."""
    year, number = (int(part) for part in month.split("-"))
    return date(year, number, 1)
