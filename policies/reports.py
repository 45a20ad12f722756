"""Usage reports: the pure rules behind ``GET /api/teams/{team}/usage`` and ``/api/me/usage``.

* **Range**: ``from`` and ``to`` are inclusive UTC days (``YYYY-MM-DD``). A record belongs to the
  range when ``from 00:00:00 <= created_at < (to + 1 day) 00:00:00`` UTC. ``to`` defaults to
  today, ``from`` to the first day of ``to``'s month (with neither: the current period so far).
  ``from`` after ``to`` and ranges longer than :data:`MAX_RANGE_DAYS` days are refused, both
  naming ``from``.
* **Groups**: ``member`` (user id, label = email), ``key`` (key id, label = ``name (prefix)``),
  ``model``, ``day`` (``YYYY-MM-DD``; days without requests are omitted), ``tag`` (each tag of a
  request counts that request once; requests without tags form the group ``None``). Only
  ``member`` and ``key`` rows carry the extra ``label`` column.
* **Total**: one more row, group :data:`TOTAL`, counting every request once (also for ``tag``).
* **CSV**: the JSON row's columns in the same order, a header line, CRLF line ends (RFC 4180),
  the total row last. Text cells that a spreadsheet would run as a formula get a leading ``'``.

Money is integer nano-dollars, shown with :func:`policies.money.format_usd`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, date, datetime, time, timedelta
from enum import StrEnum

from policies.money import format_usd

MAX_RANGE_DAYS = 400
MIN_DAY = date(1970, 1, 1)
MAX_DAY = date(9999, 12, 30)  # the day after must still be a date
TOTAL = "total"
_DAY = re.compile(r"[0-9]{4}-[0-9]{2}-[0-9]{2}")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")
_CSV_SPECIAL = (",", '"', "\r", "\n")


class ReportError(ValueError):
    """Bad report parameters; ``param`` names the query parameter."""

    def __init__(self, param: str, message: str) -> None:
        super().__init__(message)
        self.param = param
        self.message = message


class GroupBy(StrEnum):
    MEMBER = "member"
    KEY = "key"
    MODEL = "model"
    DAY = "day"
    TAG = "tag"


class Format(StrEnum):
    JSON = "json"
    CSV = "csv"


DEFAULT_GROUP_BY = GroupBy.MODEL
DEFAULT_FORMAT = Format.JSON
LABELLED = frozenset((GroupBy.MEMBER, GroupBy.KEY))


@dataclass(frozen=True, slots=True)
class DayRange:
    """Inclusive UTC days ``first`` .. ``last``."""

    first: date
    last: date

    @property
    def start(self) -> datetime:
        """The first instant in the range."""
        return datetime.combine(self.first, time(), UTC)

    @property
    def end(self) -> datetime:
        """The first instant after the range (exclusive)."""
        return datetime.combine(self.last + timedelta(days=1), time(), UTC)

    @property
    def days(self) -> int:
        return (self.last - self.first).days + 1


def today(now: float) -> date:
    return datetime.fromtimestamp(now, UTC).date()


def parse_day(value: str, param: str) -> date:
    if not _DAY.fullmatch(value):
        raise ReportError(param, f"'{param}' must be a date YYYY-MM-DD")
    try:
        day = date.fromisoformat(value)
    except ValueError as exc:
        raise ReportError(param, f"'{param}' is not a valid date: {value}") from exc
    if not MIN_DAY <= day <= MAX_DAY:
        raise ReportError(param, f"'{param}' must be between {MIN_DAY} and {MAX_DAY}")
    return day


def parse_range(from_value: str | None, to_value: str | None, now: float) -> DayRange:
    """The report's days from the query values (``None`` = absent) at unix time ``now``."""
    last = today(now) if to_value is None else parse_day(to_value, "to")
    first = last.replace(day=1) if from_value is None else parse_day(from_value, "from")
    if first > last:
        raise ReportError("from", f"'from' ({first}) must not be after 'to' ({last})")
    rng = DayRange(first, last)
    if rng.days > MAX_RANGE_DAYS:
        raise ReportError(
            "from", f"the range covers {rng.days} days; at most {MAX_RANGE_DAYS} are allowed"
        )
    return rng


def parse_group_by(value: str | None) -> GroupBy:
    if value is None:
        return DEFAULT_GROUP_BY
    try:
        return GroupBy(value)
    except ValueError:
        choices = "|".join(g.value for g in GroupBy)
        raise ReportError("group_by", f"'group_by' must be one of {choices}") from None


def parse_format(value: str | None) -> Format:
    if value is None:
        return DEFAULT_FORMAT
    try:
        return Format(value)
    except ValueError:
        raise ReportError("format", "'format' must be json or csv") from None


# --- rows -------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Row:
    """One report row; money in nano-dollars. ``group`` is :data:`TOTAL` on the total row."""

    group: str | None
    label: str | None
    requests: int
    prompt_tokens: int
    completion_tokens: int
    list_cost: int
    discount: int
    charged: int


def columns(group_by: GroupBy) -> tuple[str, ...]:
    label = ("label",) if group_by in LABELLED else ()
    return (
        "group",
        *label,
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "list_cost_usd",
        "discount_usd",
        "charged_usd",
    )


def row_json(row: Row, group_by: GroupBy) -> dict[str, object]:
    body: dict[str, object] = {"group": row.group}
    if group_by in LABELLED:
        body["label"] = row.label
    body.update(
        requests=row.requests,
        prompt_tokens=row.prompt_tokens,
        completion_tokens=row.completion_tokens,
        list_cost_usd=format_usd(row.list_cost),
        discount_usd=format_usd(row.discount),
        charged_usd=format_usd(row.charged),
    )
    return body


# --- CSV --------------------------------------------------------------------------------------
def csv_text(value: str | None) -> str:
    """A user-controlled text cell: empty for ``None``; a leading ``'`` where a spreadsheet would
    otherwise read a formula (``=``, ``+``, ``-``, ``@``, tab, CR)."""
    if not value:
        return ""
    return "'" + value if value.startswith(_FORMULA_START) else value


def csv_field(value: str) -> str:
    if any(ch in value for ch in _CSV_SPECIAL):
        return '"' + value.replace('"', '""') + '"'
    return value


def csv_line(values: list[str] | tuple[str, ...]) -> str:
    return ",".join(csv_field(v) for v in values) + "\r\n"


def csv_header(group_by: GroupBy) -> str:
    return csv_line(columns(group_by))


def csv_row(row: Row, group_by: GroupBy) -> str:
    label = (csv_text(row.label),) if group_by in LABELLED else ()
    return csv_line(
        (
            csv_text(row.group),
            *label,
            str(row.requests),
            str(row.prompt_tokens),
            str(row.completion_tokens),
            format_usd(row.list_cost),
            format_usd(row.discount),
            format_usd(row.charged),
        )
    )


def csv_filename(subject: str, rng: DayRange, group_by: GroupBy) -> str:
    """``usage-<subject>-<from>-<to>-<group_by>.csv``; ``subject`` is an id or ``me``."""
    safe = re.sub(r"[^A-Za-z0-9_]", "_", subject)
    return f"usage-{safe}-{rng.first}-{rng.last}-{group_by.value}.csv"
