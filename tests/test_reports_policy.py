"""policies.reports: date ranges, grouping choices, row shapes and CSV formatting, as tables."""

from __future__ import annotations

from datetime import UTC, date, datetime

import pytest

from policies import reports
from policies.reports import DayRange, GroupBy, ReportError, Row

NOW = datetime(2026, 11, 23, 15, 30, tzinfo=UTC).timestamp()


@pytest.mark.parametrize(
    ("from_value", "to_value", "first", "last"),
    [
        (None, None, "2026-11-01", "2026-11-23"),  # this period so far
        (None, "2026-02-14", "2026-02-01", "2026-02-14"),  # the month of 'to'
        ("2026-11-20", None, "2026-11-20", "2026-11-23"),  # 'to' is today
        ("2026-03-05", "2026-03-05", "2026-03-05", "2026-03-05"),  # one day
        ("2025-01-01", "2026-02-04", "2025-01-01", "2026-02-04"),  # 400 days, the most
        ("2024-02-29", "2024-02-29", "2024-02-29", "2024-02-29"),  # leap day
        ("1970-01-01", "1970-01-01", "1970-01-01", "1970-01-01"),
        ("9999-12-30", "9999-12-30", "9999-12-30", "9999-12-30"),
        ("2030-01-01", "2030-01-31", "2030-01-01", "2030-01-31"),  # the future is just empty
    ],
)
def test_parse_range(from_value: str | None, to_value: str | None, first: str, last: str) -> None:
    rng = reports.parse_range(from_value, to_value, NOW)
    assert (rng.first.isoformat(), rng.last.isoformat()) == (first, last)


@pytest.mark.parametrize(
    ("from_value", "to_value", "param"),
    [
        ("2026-1-01", "2026-01-31", "from"),
        ("20260101", "2026-01-31", "from"),
        ("2026-W01", "2026-01-31", "from"),
        ("2026-01-01T00:00", "2026-01-31", "from"),
        ("٢٠٢٦-٠١-٠١", "2026-01-31", "from"),  # non-ASCII digits
        ("2026-02-29", "2026-03-31", "from"),  # not a leap year
        ("2026-00-10", "2026-03-31", "from"),
        ("1969-12-31", "1970-01-31", "from"),
        ("", "2026-01-31", "from"),
        ("2026-01-01", "", "to"),
        ("2026-01-01", "2026-01-32", "to"),
        ("2026-01-01", " 2026-01-31", "to"),
        ("9999-12-01", "9999-12-31", "to"),  # the day after must exist
        ("2026-02-01", "2026-01-31", "from"),  # from after to
        ("2026-11-24", None, "from"),  # after today, the default 'to'
        ("2025-01-01", "2026-02-05", "from"),  # 401 days
        ("2020-01-01", None, "from"),
    ],
)
def test_parse_range_errors(from_value: str | None, to_value: str | None, param: str) -> None:
    with pytest.raises(ReportError) as err:
        reports.parse_range(from_value, to_value, NOW)
    assert err.value.param == param


def test_day_range_bounds_are_utc_midnights_and_the_end_is_exclusive() -> None:
    rng = DayRange(date(2026, 12, 31), date(2026, 12, 31))
    assert rng.start == datetime(2026, 12, 31, tzinfo=UTC)
    assert rng.end == datetime(2027, 1, 1, tzinfo=UTC)
    assert rng.days == 1
    assert DayRange(date(2024, 1, 1), date(2024, 12, 31)).days == 366


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        (None, GroupBy.MODEL),
        ("member", GroupBy.MEMBER),
        ("key", GroupBy.KEY),
        ("model", GroupBy.MODEL),
        ("day", GroupBy.DAY),
        ("tag", GroupBy.TAG),
    ],
)
def test_parse_group_by(value: str | None, expected: GroupBy) -> None:
    assert reports.parse_group_by(value) is expected


@pytest.mark.parametrize("value", ["", "Model", "team", "user", "tags", " model"])
def test_parse_group_by_errors(value: str) -> None:
    with pytest.raises(ReportError) as err:
        reports.parse_group_by(value)
    assert err.value.param == "group_by"


@pytest.mark.parametrize(
    ("value", "expected"),
    [(None, reports.Format.JSON), ("json", reports.Format.JSON), ("csv", reports.Format.CSV)],
)
def test_parse_format(value: str | None, expected: reports.Format) -> None:
    assert reports.parse_format(value) is expected


@pytest.mark.parametrize("value", ["", "CSV", "xml", "xlsx"])
def test_parse_format_errors(value: str) -> None:
    with pytest.raises(ReportError) as err:
        reports.parse_format(value)
    assert err.value.param == "format"


@pytest.mark.parametrize(
    ("group_by", "columns"),
    [
        (GroupBy.MEMBER, ("group", "label")),
        (GroupBy.KEY, ("group", "label")),
        (GroupBy.MODEL, ("group",)),
        (GroupBy.DAY, ("group",)),
        (GroupBy.TAG, ("group",)),
    ],
)
def test_columns(group_by: GroupBy, columns: tuple[str, ...]) -> None:
    assert reports.columns(group_by) == (
        *columns,
        "requests",
        "prompt_tokens",
        "completion_tokens",
        "list_cost_usd",
        "discount_usd",
        "charged_usd",
    )


ROW = Row("u_1", "a@example.com", 3, 10, 20, 1_500_000_000, 7, 1_499_999_993)


def test_row_json() -> None:
    money = {
        "list_cost_usd": "1.500000000",
        "discount_usd": "0.000000007",
        "charged_usd": "1.499999993",
    }
    counts = {"requests": 3, "prompt_tokens": 10, "completion_tokens": 20}
    assert reports.row_json(ROW, GroupBy.MEMBER) == {
        "group": "u_1",
        "label": "a@example.com",
        **counts,
        **money,
    }
    assert reports.row_json(ROW, GroupBy.MODEL) == {"group": "u_1", **counts, **money}
    assert list(reports.row_json(ROW, GroupBy.KEY)) == list(reports.columns(GroupBy.KEY))


@pytest.mark.parametrize(
    ("value", "cell"),
    [
        ("gpt-4o", "gpt-4o"),
        ("a,b", '"a,b"'),
        ('say "hi"', '"say ""hi"""'),
        ("two\nlines", '"two\nlines"'),
        ("cr\rhere", '"cr\rhere"'),
        ("", ""),
        ("ünïcode ✓", "ünïcode ✓"),
    ],
)
def test_csv_field(value: str, cell: str) -> None:
    assert reports.csv_field(value) == cell


@pytest.mark.parametrize(
    ("value", "text"),
    [
        (None, ""),
        ("", ""),
        ("project=search", "project=search"),
        ("=SUM(A1)", "'=SUM(A1)"),
        ("+1", "'+1"),
        ("-1", "'-1"),
        ("@cmd", "'@cmd"),
        ("\tx", "'\tx"),
        ("\rx", "'\rx"),
        ("a=b", "a=b"),
    ],
)
def test_csv_text_defuses_formulas(value: str | None, text: str) -> None:
    assert reports.csv_text(value) == text


def test_csv_lines() -> None:
    assert reports.csv_header(GroupBy.DAY) == (
        "group,requests,prompt_tokens,completion_tokens,list_cost_usd,discount_usd,charged_usd\r\n"
    )
    assert reports.csv_row(ROW, GroupBy.MEMBER) == (
        "u_1,a@example.com,3,10,20,1.500000000,0.000000007,1.499999993\r\n"
    )
    tagged = Row("=x,y", None, 1, 0, 0, 0, 0, 0)
    assert reports.csv_row(tagged, GroupBy.TAG) == (
        '"\'=x,y",1,0,0,0.000000000,0.000000000,0.000000000\r\n'
    )
    untagged = Row(None, None, 2, 1, 1, 5, 0, 5)
    assert reports.csv_row(untagged, GroupBy.KEY) == (
        ",,2,1,1,0.000000005,0.000000000,0.000000005\r\n"
    )


@pytest.mark.parametrize(
    ("subject", "name"),
    [
        ("team_0123", "usage-team_0123-2026-03-01-2026-03-31-tag.csv"),
        ("me", "usage-me-2026-03-01-2026-03-31-tag.csv"),
        ('a"b/c', "usage-a_b_c-2026-03-01-2026-03-31-tag.csv"),
    ],
)
def test_csv_filename(subject: str, name: str) -> None:
    rng = DayRange(date(2026, 3, 1), date(2026, 3, 31))
    assert reports.csv_filename(subject, rng, GroupBy.TAG) == name
