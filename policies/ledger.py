"""What an account's Redis counters must say, from the PostgreSQL ledger plus what is in flight.

The money of a billing account lives in three places at once: the PostgreSQL ledger (credit and
allowance rows, ``usage_records``), the account's Redis usage stream (records settled in Redis
that the usage writer has not written yet), and Redis's live counters, which every settle moves
in the same atomic step that appends its record to the stream. So, at any instant at which no
settle runs,

    Redis counters  =  ledger  +  the stream's records the ledger does not have yet

(records de-duplicated by request id). The rebuild of an account
(:mod:`gateway.metering.accounts`) installs the right-hand side; the reconcile
(:mod:`policies.reconcile`) compares both sides. This module is the arithmetic of it, pure.

Counters, per account (``credits``) and per period (the period hash of policies/keyspace.py):
``spend``, ``aspent`` (drawn from the allowance), ``req``, and per member scope, key and model
``ms:<scope>``, ``mr:<scope>`` (requests), ``ks:<key>``, ``mo:<model>``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from policies.periods import is_period
from policies.usage_record import fields_of

PERIOD_TOTALS = ("spend", "aspent", "req")
GROUP_PREFIXES = ("ms:", "mr:", "ks:", "mo:")


@dataclass(frozen=True, slots=True)
class UsageEntry:
    """The money of one usage record (a stream entry or a ledger row)."""

    request_id: str
    period: str
    scope: str
    key_id: str
    model: str
    charged: int
    from_allowance: int
    from_credits: int


def scope_of(account: str, user_id: str, team_id: str) -> str:
    """The member scope a record counts under (policies/keyspace.py): the user in a team
    account; in a user account the team of a team key billed personally, else the user."""
    if account.startswith("t_"):
        return user_id
    return team_id or user_id


def entry_of(account: str, entry: Mapping[str, str]) -> UsageEntry | None:
    """A usage stream entry's money (either form: policies/usage_record.py), or None for one
    that is not a usage record of ``account`` (a malformed entry, a request id or period
    (``YYYY-MM``) empty or missing among them: the writer keeps those in ``usage_rejects``)."""
    try:
        fields = fields_of(entry)
        request_id = str(fields["request_id"])
        period = fields["period"]
        if fields.get("account", account) != account or not request_id or not is_period(period):
            return None
        return UsageEntry(
            request_id=request_id,
            period=str(period),
            scope=scope_of(account, str(fields.get("user_id", "")), str(fields.get("team_id", ""))),
            key_id=str(fields.get("key_id", "")),
            model=str(fields.get("model", "")),
            charged=int(fields.get("charged") or 0),
            from_allowance=int(fields.get("from_allowance") or 0),
            from_credits=int(fields.get("from_credits") or 0),
        )
    except (KeyError, ValueError):
        return None


@dataclass
class Totals:
    """An account's counters: ``credits`` and the counters of each period."""

    credits: int = 0
    periods: dict[str, dict[str, int]] = field(default_factory=dict)

    def period(self, period: str) -> dict[str, int]:
        return self.periods.setdefault(period, {})


def add(totals: Totals, entries: Iterable[UsageEntry]) -> Totals:
    """``totals`` plus the records ``entries`` (each counted once, by request id)."""
    seen: set[str] = set()
    for e in entries:
        if e.request_id in seen:
            continue
        seen.add(e.request_id)
        totals.credits -= e.from_credits
        counters = totals.period(e.period)
        for name, amount in (
            ("spend", e.charged),
            ("aspent", e.from_allowance),
            ("req", 1),
            ("ms:" + e.scope, e.charged),
            ("mr:" + e.scope, 1),
            ("ks:" + e.key_id, e.charged),
            ("mo:" + e.model, e.charged),
        ):
            counters[name] = counters.get(name, 0) + amount
    return totals


def pending(entries: Iterable[UsageEntry], in_ledger: set[str]) -> list[UsageEntry]:
    """The stream's records the ledger does not have yet."""
    return [e for e in entries if e.request_id not in in_ledger]


def money_fields(counters: Mapping[str, str | int]) -> dict[str, int]:
    """The counters of a period hash that the ledger determines (``alw``, alert flags and the
    ``mx:`` and ``kx:`` baselines of a billing-mode switch are not sums of this account's
    records)."""
    return {
        name: int(value)
        for name, value in counters.items()
        if name in PERIOD_TOTALS or name.startswith(GROUP_PREFIXES)
    }
