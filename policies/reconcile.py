"""The reconcile: does an account's money agree everywhere, to the nano-dollar? Pure comparison.

Compared, per billing account (contract section 11):

* Redis against the ledger (PostgreSQL, plus the usage stream's records it does not have yet,
  policies/ledger.py): ``credits`` (the balance of credits; the balance shown is credits plus the
  allowance left, so with ``alw`` and ``aspent`` below it is compared too), and per period whose
  hash Redis has: ``spend``, ``aspent``, ``req`` and every ``ms:``, ``mr:``, ``ks:``, ``mo:``
  counter, and ``alw`` where the ledger pins the period's allowance. Fields are named
  ``<period>:<counter>`` (``2026-11:spend``).
* Redis against itself: ``holds`` (and ``mh:<scope>``) against the holds listed in the account's
  hold hash (a script moves both at once, so they always agree unless something broke).
* The daily rollup against the ledger, per period: ``<period>:usage_daily.requests`` and
  ``<period>:usage_daily.charged``; there ``redis`` holds the rollup's figure.

A difference is ``{"account", "field", "redis", "ledger"}``; money as decimal USD strings
(``"0.000004350"``), counts as integers, a side that has no value as null.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from policies.ledger import Totals, money_fields
from policies.money import format_usd

COUNT_FIELDS = ("req", "usage_daily.requests")


@dataclass(frozen=True, slots=True)
class Difference:
    account: str
    field: str
    redis: int | None
    ledger: int | None

    def as_json(self) -> dict[str, Any]:
        return {
            "account": self.account,
            "field": self.field,
            "redis": _shown(self.field, self.redis),
            "ledger": _shown(self.field, self.ledger),
        }


def is_count(name: str) -> bool:
    counter = name.split(":", 1)[1] if ":" in name and name[0].isdigit() else name
    return counter in COUNT_FIELDS or counter.startswith("mr:")


def _shown(name: str, value: int | None) -> str | int | None:
    if value is None:
        return None
    return value if is_count(name) else format_usd(value)


@dataclass
class RedisView:
    """What Redis holds for one account (read in one atomic step)."""

    loaded: bool
    state: Mapping[str, str] = field(default_factory=dict)
    hold_values: Mapping[str, str] = field(default_factory=dict)
    periods: Mapping[str, Mapping[str, str]] = field(default_factory=dict)  # present hashes only


@dataclass
class LedgerView:
    """What PostgreSQL (and the in-flight stream records) say for one account."""

    totals: Totals  # ledger + pending stream records
    allowances: Mapping[str, int] = field(default_factory=dict)  # allowance rows per period
    records: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # period -> (n, charged)
    rollup: Mapping[str, tuple[int, int]] = field(default_factory=dict)  # from usage_daily


def held(hold_values: Mapping[str, str]) -> dict[str, int]:
    """``holds``, ``mh:<scope>`` and ``kh:<key>`` as the hold hash lists them (``<amount>|<scope>``
    or ``<amount>|<scope>|<flags>|<tokens>|<key>``, flag ``h``: counted in ``kh:<key>``)."""
    sums: dict[str, int] = {"holds": 0}
    for value in hold_values.values():
        parts = value.split("|")
        amount = int(parts[0])
        sums["holds"] += amount
        scope = "mh:" + (parts[1] if len(parts) > 1 else "")
        sums[scope] = sums.get(scope, 0) + amount
        if len(parts) >= 5 and "h" in parts[2]:
            key = "kh:" + parts[4]
            sums[key] = sums.get(key, 0) + amount
    return sums


def compare(account: str, redis: RedisView, ledger: LedgerView) -> list[Difference]:
    found: list[Difference] = []

    def check(name: str, in_redis: int | None, in_ledger: int | None) -> None:
        if (in_redis or 0) != (in_ledger or 0):
            found.append(Difference(account, name, in_redis, in_ledger))

    if redis.loaded:
        check("credits", _int(redis.state.get("credits")), ledger.totals.credits)
        listed = held(redis.hold_values)
        counted = {
            k: int(v) for k, v in redis.state.items() if k == "holds" or k[:3] in ("mh:", "kh:")
        }
        for name in sorted(set(listed) | set(counted)):
            check(name, counted.get(name, 0), listed.get(name, 0))
        for period in sorted(redis.periods):
            in_redis = money_fields(redis.periods[period])
            expected = ledger.totals.periods.get(period, {})
            for name in sorted(set(in_redis) | set(expected)):
                check(f"{period}:{name}", in_redis.get(name, 0), expected.get(name, 0))
            if period in ledger.allowances:
                alw = _int(redis.periods[period].get("alw"))
                check(f"{period}:alw", alw, ledger.allowances[period])
    for period in sorted(set(ledger.records) | set(ledger.rollup)):
        n, charged = ledger.records.get(period, (0, 0))
        rn, rcharged = ledger.rollup.get(period, (0, 0))
        check(f"{period}:usage_daily.requests", rn, n)
        check(f"{period}:usage_daily.charged", rcharged, charged)
    return found


def _int(value: str | None) -> int | None:
    return None if value is None or value == "" else int(value)


def report(accounts_checked: int, differences: list[Difference]) -> dict[str, Any]:
    """The answer of ``GET /admin/reconcile`` and ``modelbridge reconcile``."""
    return {
        "ok": not differences,
        "accounts_checked": accounts_checked,
        "differences": [d.as_json() for d in differences],
    }
