"""Billing writes behind the management API: subscriptions and their invoice lines, the team
policies mirrored into personally billing members' accounts, and the billing mode switch.

Every function here changes an account's Redis state and runs inside the caller's PostgreSQL
transaction, after the caller locked the team's account (``lock_account(conn, "t_<team>")``);
user accounts are locked here, always after the team's (one lock order: team, then users).

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
from gateway.errors import InvalidRequest, NotFound
from gateway.metering.accounts import KEY_CONTROLS, Accounts, key_value, lock_account
from policies import keyspace as rk
from policies import subscriptions as subs
from policies.periods import period_of

log = logging.getLogger("modelbridge.billing")

BILLING_MODES = ("team", "personal")
RENEWAL_SWEEP_S = 600.0


# --- billing mode ---------------------------------------------------------------------------------
async def apply_billing_mode(
    accounts: Accounts,
    conn: asyncpg.Connection,
    team_id: str,
    user_id: str,
    mode: str,
    *,
    now: float,
    previous: str | None = None,
) -> None:
    """Make ``user_id``'s team keys in ``team_id`` bill ``mode`` ("team" or "personal").

    Call inside the transaction that changes the membership (the team's account locked first),
    as its last step: it records ``memberships.billing_mode`` (idempotent if the caller did),
    moves the member's active team keys between ``t_<team>`` and ``u_<user>`` (cached auth
    entries are dropped on every process), installs or removes the mirrored team policies, and
    carries the member's spend of this period over so their monthly limit still counts it.
    Idempotent: it makes the Redis state match ``mode``, whatever it was (``previous`` is
    informational)."""
    if mode not in BILLING_MODES:
        raise InvalidRequest("'billing_mode' must be 'team' or 'personal'", param="billing_mode")
    team_acct, user_acct = rk.team_account(team_id), rk.user_account(user_id)
    await lock_account(conn, team_acct)
    await lock_account(conn, user_acct)
    team = await conn.fetchrow("SELECT * FROM teams WHERE id = $1", team_id)
    member = await conn.fetchrow(
        "UPDATE memberships SET billing_mode = $3 WHERE team_id = $1 AND user_id = $2"
        " AND removed_at IS NULL RETURNING *",
        team_id,
        user_id,
        mode,
    )
    if team is None or member is None:
        raise NotFound("no such member", code="member_not_found")
    # Live counters are read below: make sure both accounts are in Redis (on this connection,
    # which holds their locks).
    for account in (team_acct, user_acct):
        await accounts.load_with(conn, account, now)
        await accounts.ensure_stream(account)
    keys = await conn.fetch(
        f"SELECT k.id, {KEY_CONTROLS} FROM api_keys k"
        " WHERE k.team_id = $1 AND k.user_id = $2 AND k.revoked_at IS NULL",
        team_id,
        user_id,
    )
    key_ids = [r["id"] for r in keys]
    if mode == "personal":
        await accounts.remove_keys(team_acct, key_ids)
        await accounts.add_keys(user_acct, {r["id"]: key_value(team_id, r) for r in keys})
        await accounts.set_blocked(user_acct, team["model_restrictions"], scope=team_id)
        await accounts.set_member_cfg(
            user_acct, team_id, accounts.mirror_cfg(team_id, member, team)
        )
    else:
        await accounts.remove_keys(user_acct, key_ids)
        await accounts.add_keys(team_acct, {r["id"]: key_value(user_id, r) for r in keys})
        await accounts.set_blocked(user_acct, [], scope=team_id)
        await accounts.set_member_cfg(user_acct, team_id, {})
    period = period_of(now)
    (in_team,) = await accounts.period_fields(team_acct, period, ["ms:" + user_id])
    (in_user,) = await accounts.period_fields(user_acct, period, ["ms:" + team_id])
    await accounts.set_period_fields(user_acct, period, {"mx:" + team_id: in_team})
    await accounts.set_period_fields(team_acct, period, {"mx:" + user_id: in_user})
    # A key's monthly limit counts its spend in both accounts too (kx, as mx for the member).
    kx = ["ks:" + k for k in key_ids]
    if kx:
        in_team_keys = await accounts.period_fields(team_acct, period, kx)
        in_user_keys = await accounts.period_fields(user_acct, period, kx)
        await accounts.set_period_fields(
            user_acct, period, {"kx:" + k: v for k, v in zip(key_ids, in_team_keys, strict=True)}
        )
        await accounts.set_period_fields(
            team_acct, period, {"kx:" + k: v for k, v in zip(key_ids, in_user_keys, strict=True)}
        )
    log.info("billing mode of %s in %s: %s (was %s)", user_id, team_id, mode, previous)


async def sync_member_policy(
    accounts: Accounts, conn: asyncpg.Connection, team_id: str, user_id: str
) -> None:
    """Refresh the mirrored limit and enforcement of one member if they bill personally (call
    after changing their override, inside the transaction, the team's account locked)."""
    team = await conn.fetchrow("SELECT * FROM teams WHERE id = $1", team_id)
    member = await conn.fetchrow(
        "SELECT * FROM memberships WHERE team_id = $1 AND user_id = $2 AND removed_at IS NULL",
        team_id,
        user_id,
    )
    if team is None or member is None or member["billing_mode"] != "personal":
        return
    account = rk.user_account(user_id)
    await lock_account(conn, account)
    await accounts.set_member_cfg(account, team_id, accounts.mirror_cfg(team_id, member, team))


async def sync_team_policies(accounts: Accounts, conn: asyncpg.Connection, team: Any) -> int:
    """Mirror the team's (new) blocked models and default limit into the account of every member
    who bills personally. ``team`` is the teams row as changed. Returns how many."""
    members = await conn.fetch(
        "SELECT * FROM memberships WHERE team_id = $1 AND removed_at IS NULL"
        " AND billing_mode = 'personal' ORDER BY user_id",
        team["id"],
    )
    for member in members:
        account = rk.user_account(member["user_id"])
        await lock_account(conn, account)
        await accounts.set_blocked(account, team["model_restrictions"], scope=team["id"])
        await accounts.set_member_cfg(
            account, team["id"], accounts.mirror_cfg(team["id"], member, team)
        )
    return len(members)


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


async def change_subscription(
    accounts: Accounts,
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
    next period."""
    account = rk.team_account(team["id"])
    period = period_of(now)
    await renew(conn, config, period, team_id=team["id"])
    old_allowance = accounts.subscription_allowance(team["plan"], team["seats"])
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
    await accounts.set_subscription(account, period, new_allowance, base, change.allowance_delta)
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
