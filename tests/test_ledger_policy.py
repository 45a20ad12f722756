"""policies.ledger: the ledger plus the stream's pending records, by table."""

from __future__ import annotations

import pytest

from policies import ledger
from policies.ledger import Totals, UsageEntry
from policies.usage_record import stream_entry


def entry(
    rid: str,
    charged: int,
    *,
    alw: int = 0,
    period: str = "2026-11",
    scope: str = "u1",
    key: str = "k1",
    model: str = "m",
) -> UsageEntry:
    return UsageEntry(rid, period, scope, key, model, charged, alw, charged - alw)


@pytest.mark.parametrize(
    ("account", "user_id", "team_id", "scope"),
    [
        ("t_T", "U", "T", "U"),  # a team account: the member
        ("u_U", "U", "", "U"),  # a personal key
        ("u_U", "U", "T", "T"),  # a team key billed personally: the team
    ],
)
def test_scope_of(account: str, user_id: str, team_id: str, scope: str) -> None:
    assert ledger.scope_of(account, user_id, team_id) == scope


FIELDS = {
    "request_id": "r1",
    "account": "t_T",
    "team_id": "T",
    "user_id": "U",
    "key_id": "k",
    "model": "m",
    "period": "2026-11",
    "charged": "700",
    "from_allowance": "200",
    "from_credits": "500",
    "prompt_tokens": "5",
}


@pytest.mark.parametrize(
    ("fields", "expected"),
    [
        (FIELDS, UsageEntry("r1", "2026-11", "U", "k", "m", 700, 200, 500)),
        ({**FIELDS, "account": "t_other"}, None),  # not this account's
        ({**FIELDS, "charged": "many"}, None),  # malformed: the writer rejects it too
        ({k: v for k, v in FIELDS.items() if k != "period"}, None),
        ({**FIELDS, "request_id": ""}, None),
        # the record as one field (policies/usage_record.py): the same money
        (stream_entry(FIELDS), UsageEntry("r1", "2026-11", "U", "k", "m", 700, 200, 500)),
        (stream_entry({**FIELDS, "account": "t_other"}), None),
        ({"r": "[1, 2"}, None),
        # a period is required (its counters are keyed by it), in either form: the writer
        # refuses such a record too
        ({**FIELDS, "period": ""}, None),
        (stream_entry({**FIELDS, "period": ""}), None),
        (stream_entry({**FIELDS, "period": "2026-13"}), None),
        ({**FIELDS, "period": "2026-1"}, None),
    ],
)
def test_entry_of(fields: dict[str, str], expected: UsageEntry | None) -> None:
    assert ledger.entry_of("t_T", fields) == expected


def test_add_counts_each_request_once_in_its_period() -> None:
    base = Totals(credits=10_000, periods={"2026-11": {"spend": 100, "aspent": 0, "req": 1}})
    entries = [
        entry("a", 300, alw=100),
        entry("a", 300, alw=100),  # the same record twice: once
        entry("b", 50, scope="u2", key="k2", model="n"),
        entry("c", 40, period="2026-10"),  # last month's: credits and its own period
    ]
    got = ledger.add(base, entries)
    assert got.credits == 10_000 - 200 - 50 - 40
    assert got.periods["2026-11"] == {
        "spend": 450,
        "aspent": 100,
        "req": 3,
        "ms:u1": 300,
        "mr:u1": 1,
        "ks:k1": 300,
        "mo:m": 300,
        "ms:u2": 50,
        "mr:u2": 1,
        "ks:k2": 50,
        "mo:n": 50,
    }
    assert got.periods["2026-10"]["spend"] == 40


def test_pending_leaves_out_what_the_ledger_has() -> None:
    entries = [entry("a", 1), entry("b", 2), entry("c", 3)]
    assert [e.request_id for e in ledger.pending(entries, {"b"})] == ["a", "c"]


def test_money_fields_keep_only_what_the_ledger_determines() -> None:
    counters = {
        "spend": "5",
        "req": "1",
        "ms:u": "5",
        "mr:u": "1",
        "ks:k": "5",
        "mo:m": "5",
        "aspent": "0",
        "alw": "100",
        "mx:u": "7",
        "al:team:80:100": "1",
    }
    assert ledger.money_fields(counters) == {
        "spend": 5,
        "req": 1,
        "ms:u": 5,
        "mr:u": 1,
        "ks:k": 5,
        "mo:m": 5,
        "aspent": 0,
    }
