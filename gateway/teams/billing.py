"""Billing writes behind the management API: subscriptions and their invoice lines, and the
billing modes.

Every function here runs inside the caller's PostgreSQL transaction, after the caller locked the
team (``lock_team``), and writes PostgreSQL only: the caller notes what changed in its
:class:`~gateway.metering.changes.AccountChanges`, written to Redis after the commit.

Personal billing (``billing_mode: personal``): the member's team keys bill ``u_<user>`` under
member scope ``<team id>``; the team's blocked models and the member's limit and enforcement are
mirrored into that account (``blk:<team>``, cfg ``ml:<team>`` / ``me:<team>``), so the hold
script still reads one slot. Member limits count the member's spend in the team across both
accounts: each account's period hash keeps ``mx:<scope>``, the spend billed to the other account
this period, set at each switch from the live counters and rebuilt from the usage records. The
trade-off: a request still in flight at the switch settles on the account it started on, and is
counted by the other account's ``mx`` only after a rebuild; the team's own counters (spend,
spending limit, balance) never include personally billed spend — that is the point of the mode.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import asyncpg

from gateway.config import Config
from policies import keyspace as rk
from policies import subscriptions as subs
from policies.periods import period_of

log = logging.getLogger("modelbridge.billing")

BILLING_MODES = ("team", "personal")
RENEWAL_SWEEP_S = 600.0


# --- subscriptions ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class SubscriptionResult:
    period: str
    change: subs.Change
    invoice_id: int | None


async def period_allowance_granted(
    conn: asyncpg.Connection, account: str, period: str
) -> int | None:
    """The sum of the period's allowance ledger rows, None when it has none (then the period's
    allowance is the subscription's, fixed on its first request)."""
    row = await conn.fetchrow(
        "SELECT count(*) AS n, coalesce(sum(amount), 0) AS s FROM ledger"
        " WHERE account = $1 AND kind = 'allowance' AND period = $2",
        account,
        period,
    )
    return int(row["s"]) if row["n"] else None


def subscription_allowance(config: Config, plan: str | None, seats: int) -> int:
    """The allowance per period of ``seats`` on ``plan`` (0 without a plan)."""
    spec = config.plans.get(plan or "")
    return 0 if spec is None else subs.seat_allowance(spec.included_usage_per_seat, seats)


async def change_subscription(
    config: Config,
    conn: asyncpg.Connection,
    team: Any,
    plan: str | None,
    seats: int,
    *,
    actor_id: str,
    now: float,
) -> SubscriptionResult:
    """Move the team (its row locked, its account locked) to ``plan`` x ``seats`` (policies/
    subscriptions.py) at ``now``: this period's allowance is pinned in the ledger and raised at
    once by what the change adds; the added price is invoiced; everything else applies from the
    next period. The caller notes ``(team id, result.period)`` in its account changes."""
    account = rk.team_account(team["id"])
    period = period_of(now)
    await renew(conn, config, period, team_id=team["id"])
    old_allowance = subscription_allowance(config, team["plan"], team["seats"])
    granted = await period_allowance_granted(conn, account, period)
    base = old_allowance if granted is None else granted
    invoiced = await conn.fetchval(
        "SELECT coalesce(sum(amount), 0) FROM invoices WHERE team_id = $1 AND period = $2",
        team["id"],
        period,
    )
    spec = config.plans.get(plan or "")
    new_allowance = subs.seat_allowance(spec.included_usage_per_seat, seats) if spec else 0
    new_cost = subs.seat_cost(spec.seat_price, seats) if spec else 0
    change = subs.change(base, int(invoiced), new_allowance, new_cost)
    label = f"{plan} x {seats}" if plan else "no plan"
    if granted is None and base > 0:
        # Pin this period's allowance in the ledger: a rebuild must not take the new subscription's.
        await _allowance_row(conn, account, period, base, f"allowance of {period}", actor_id)
    if change.allowance_delta:
        await _allowance_row(
            conn, account, period, change.allowance_delta, f"raised mid-period: {label}", actor_id
        )
    invoice_id = None
    if change.invoice_amount and plan is not None and spec is not None:
        first = team["plan"] is None or team["seats"] == 0
        invoice_id = await conn.fetchval(
            "INSERT INTO invoices (team_id, period, kind, plan, seats, amount, note, actor)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING id",
            team["id"],
            period,
            "subscription" if first else "change",
            plan,
            subs.line_seats(team["plan"], plan, seats, change.invoice_amount, spec.seat_price),
            change.invoice_amount,
            label,
            actor_id,
        )
    await conn.execute(
        "UPDATE teams SET plan = $2, seats = $3 WHERE id = $1", team["id"], plan, seats
    )
    return SubscriptionResult(period, change, invoice_id)


async def _allowance_row(
    conn: asyncpg.Connection, account: str, period: str, amount: int, note: str, actor: str
) -> None:
    await conn.execute(
        "INSERT INTO ledger (account, kind, period, amount, note, actor)"
        " VALUES ($1, 'allowance', $2, $3, $4, $5)",
        account,
        period,
        amount,
        note,
        actor,
    )


async def renew(
    conn: asyncpg.Connection, config: Config, period: str, team_id: str | None = None
) -> int:
    """Record the renewal line of ``period`` for subscribed teams (one team, or all) that have no
    invoice line for it yet. Idempotent (a unique index keeps one renewal per team and period).
    Returns how many lines it recorded."""
    added = 0
    for name, plan in config.plans.items():
        status = await conn.execute(
            "INSERT INTO invoices (team_id, period, kind, plan, seats, amount, note)"
            " SELECT t.id, $1, 'renewal', t.plan, t.seats, $2::bigint * t.seats, $3"
            " FROM teams t WHERE t.plan = $4 AND t.seats > 0 AND t.deleted_at IS NULL"
            " AND ($5::text IS NULL OR t.id = $5)"
            " AND NOT EXISTS (SELECT 1 FROM invoices i WHERE i.team_id = t.id AND i.period = $1)"
            " ON CONFLICT DO NOTHING",
            period,
            plan.seat_price,
            f"renewal of {period}",
            name,
            team_id,
        )
        added += int(status.split()[-1])
    return added


# --- background work ------------------------------------------------------------------------------
async def renewals(db: asyncpg.Pool, config: Config, now: Callable[[], float]) -> None:
    """Record the renewal lines of the current period now and then (run as a task)."""
    while True:
        try:
            async with db.acquire() as conn:
                await renew(conn, config, period_of(now()))
        except (asyncpg.PostgresError, OSError) as exc:
            log.warning("renewal sweep: %s", exc)
        await asyncio.sleep(RENEWAL_SWEEP_S)
