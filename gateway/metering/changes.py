"""Redis follows PostgreSQL after commit, through an outbox: what a management transaction
changed, re-read from the record and written to the accounts' live state once it committed.

A Redis write inside a PostgreSQL transaction cannot be rolled back with it: a failure after the
write (a constraint checked at commit, a lost connection) leaves Redis saying what PostgreSQL
does not. So a transaction only notes *what* it changed (:class:`AccountChanges`: members of a
team, API keys, team policies, credits, subscriptions, billing-mode switches) and records that
note in ``account_outbox`` in the same transaction. After the commit, :meth:`Outbox.deliver`
locks the row, takes the accounts' advisory locks, reads the committed rows, writes the Redis
fields they imply (as the rebuild, ``Accounts.load``, does for a whole account) and deletes the
row, in one short transaction. If Redis cannot be written (unreachable, or the process dies
between the commit and the write) the row stays, and :meth:`Outbox.sweep` applies it later: at
start and, once it has been pending for a whole sweep period, every :data:`SWEEP_EVERY_S`
seconds, in one process at a time.

Applying twice, late, or after another change of the same rows writes the same thing: the writes
are derived from the record, not replayed deltas, and the locks order them with every other
writer and loader. The two amounts that are deltas in Redis are made idempotent by the record:

* credits: the state hash keeps ``crid``, the id of the last credit ledger row it counts (set by
  the rebuild); applying adds the rows past it and moves it, in one MULTI. Credit rows of one
  account are inserted under its lock, so their ids grow in commit order.
* a subscription's allowance: ``sub_alw`` from the teams row, and the period's ``alw`` set to the
  period's allowance ledger rows (the subscription change pins them), as the rebuild computes.

A billing-mode switch also carries the member's (and their keys') spend of the period over to
the other account (``mx:``/``kx:``, gateway/teams/billing.py), read from the live counters when
applied: re-applied, it reads the same (nothing bills the old account any more).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
import orjson
from redis import exceptions as redis_errors

from gateway.errors import StoreUnavailable
from gateway.metering.accounts import KEY_CONTROLS, Accounts, key_value, lock_account
from policies import keyspace as rk
from policies.periods import period_of

log = logging.getLogger("modelbridge.changes")

#: seconds between two sweeps of the outbox (read at each wait: tests shorten it)
SWEEP_EVERY_S = 5.0
SWEEP_BATCH = 100
#: the session advisory lock that lets one process sweep at a time (two-key form: its own space)
_SWEEP_LOCK = (15, 1)
#: what an apply raises when a store cannot be reached: logged, and the row waits for the sweep
STORE_ERRORS = (
    redis_errors.RedisError,
    OSError,
    StoreUnavailable,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
)

_MEMBER = """
SELECT m.monthly_limit, m.limit_set, m.enforcement, m.billing_mode, m.rpm, m.tpm,
       t.default_member_limit, t.default_enforcement, t.model_restrictions,
       t.deleted_at IS NOT NULL AS team_deleted
FROM memberships m JOIN teams t ON t.id = m.team_id
WHERE m.team_id = $1 AND m.user_id = $2 AND m.removed_at IS NULL
"""
_KEYS = f"""
SELECT k.id, k.user_id, k.team_id, k.revoked_at IS NOT NULL AS revoked, m.billing_mode,
       {KEY_CONTROLS}, coalesce(t.deleted_at IS NOT NULL, false) AS team_deleted
FROM api_keys k
LEFT JOIN memberships m
  ON m.team_id = k.team_id AND m.user_id = k.user_id AND m.removed_at IS NULL
LEFT JOIN teams t ON t.id = k.team_id
WHERE k.id = ANY($1::text[])
"""
_MEMBER_KEYS = """
SELECT k.id FROM api_keys k JOIN unnest($1::text[], $2::text[]) AS s(team_id, user_id)
  ON k.team_id = s.team_id AND k.user_id = s.user_id
WHERE k.revoked_at IS NULL
"""
_PERSONAL = """
SELECT team_id, user_id FROM memberships
WHERE team_id = ANY($1::text[]) AND removed_at IS NULL AND billing_mode = 'personal'
"""


def _key_accounts(user_id: str, team_id: str | None) -> list[str]:
    """Every account whose key set may hold a key: a team key bills the team or, billed
    personally, its user; a personal key bills its user."""
    if team_id is None:
        return [rk.user_account(user_id)]
    return [rk.team_account(team_id), rk.user_account(user_id)]


def _pairs(values: Iterable[Iterable[str]]) -> set[tuple[str, str]]:
    return {(a, b) for a, b in values}


@dataclass
class AccountChanges:
    """Rows a transaction changed whose live state Redis keeps:

    * ``members``: ``(team id, user id)`` of memberships (the member's limit, enforcement and
      rate limits in the team account; the team policies mirrored into the user's account when
      they bill personally);
    * ``keys``: API key ids (whether, and where, the key may bill, with its controls);
    * ``teams``: team ids (the team's cfg and blocked models, its personally billing members'
      mirrors; a deleted team's account bills nothing);
    * ``credits``: accounts whose credit ledger rows changed;
    * ``subscriptions``: ``(team id, period)`` of a subscription change;
    * ``switches``: ``(team id, user id)`` of a billing-mode switch (keys moved, spend carried).
    """

    members: set[tuple[str, str]] = field(default_factory=set)
    keys: set[str] = field(default_factory=set)
    teams: set[str] = field(default_factory=set)
    credits: set[str] = field(default_factory=set)
    subscriptions: set[tuple[str, str]] = field(default_factory=set)
    switches: set[tuple[str, str]] = field(default_factory=set)
    outbox_id: int | None = field(default=None, compare=False)

    def __bool__(self) -> bool:
        return bool(
            self.members
            or self.keys
            or self.teams
            or self.credits
            or self.subscriptions
            or self.switches
        )

    def as_json(self) -> str:
        return orjson.dumps(
            {
                "members": sorted(self.members),
                "keys": sorted(self.keys),
                "teams": sorted(self.teams),
                "credits": sorted(self.credits),
                "subscriptions": sorted(self.subscriptions),
                "switches": sorted(self.switches),
            }
        ).decode()

    @classmethod
    def from_json(cls, raw: str | bytes) -> AccountChanges:
        note = orjson.loads(raw)
        return cls(
            members=_pairs(note.get("members", ())),
            keys=set(note.get("keys", ())),
            teams=set(note.get("teams", ())),
            credits=set(note.get("credits", ())),
            subscriptions=_pairs(note.get("subscriptions", ())),
            switches=_pairs(note.get("switches", ())),
        )

    async def record(self, conn: asyncpg.Connection, now: float) -> None:
        """Note the changes in the outbox, inside the transaction that made them (its last
        statement); nothing when there are none."""
        if self:
            self.outbox_id = await conn.fetchval(
                "INSERT INTO account_outbox (changes, created_at) VALUES ($1::jsonb, $2)"
                " RETURNING id",
                self.as_json(),
                datetime.fromtimestamp(now, UTC),
            )


async def apply_changes(
    accounts: Accounts, conn: asyncpg.Connection, changes: AccountChanges, now: float
) -> None:
    """Write to Redis what the committed record says of everything ``changes`` names, inside
    ``conn``'s transaction (which takes the accounts' locks, in the one lock order)."""
    members = set(changes.members) | set(changes.switches)
    key_ids = set(changes.keys)
    if changes.switches:
        teams, users = zip(*sorted(changes.switches), strict=True)
        key_ids |= {r["id"] for r in await conn.fetch(_MEMBER_KEYS, list(teams), list(users))}
    if changes.teams:
        members |= {
            (r["team_id"], r["user_id"]) for r in await conn.fetch(_PERSONAL, sorted(changes.teams))
        }
    keys = await conn.fetch(_KEYS, sorted(key_ids)) if key_ids else []
    locked = {a for t, u in members for a in (rk.team_account(t), rk.user_account(u))}
    locked |= {a for k in keys for a in _key_accounts(k["user_id"], k["team_id"])}
    locked |= {rk.team_account(t) for t in changes.teams}
    locked |= {rk.team_account(t) for t, _ in changes.subscriptions}
    locked |= set(changes.credits)
    for account in sorted(locked):  # t_ before u_: the lock order everywhere
        await lock_account(conn, account)
    # A switch reads both accounts' live counters below: both must be in Redis.
    for account in sorted({a for t, u in changes.switches for a in _pair(t, u)}):
        await accounts.load_with(conn, account, now)
        await accounts.ensure_stream(account)
    for team_id in sorted(changes.teams):
        await _team(accounts, conn, team_id)
    for team_id, user_id in sorted(members):
        await _member(accounts, conn, team_id, user_id)
    for key in keys:
        await _key(accounts, key)
    for account in sorted(changes.credits):
        await _credits(accounts, conn, account, now)
    for team_id, period in sorted(changes.subscriptions):
        await _subscription(accounts, conn, team_id, period)
    for team_id, user_id in sorted(changes.switches):
        await _carry_over(accounts, conn, team_id, user_id, now)


def _pair(team_id: str, user_id: str) -> tuple[str, str]:
    return rk.team_account(team_id), rk.user_account(user_id)


async def _team(accounts: Accounts, conn: asyncpg.Connection, team_id: str) -> None:
    account = rk.team_account(team_id)
    team = await conn.fetchrow("SELECT * FROM teams WHERE id = $1", team_id)
    if team is None or team["deleted_at"] is not None:
        await accounts.set_cfg(account, {"deleted": "1"})
        await accounts.unload(account)
        return
    cfg = Accounts.team_cfg(team)
    stale = [f for f in Accounts.TEAM_RATE_FIELDS if f not in cfg]
    await accounts.set_cfg(account, cfg, delete=stale)
    await accounts.set_blocked(account, team["model_restrictions"])


async def _member(accounts: Accounts, conn: asyncpg.Connection, team_id: str, user_id: str) -> None:
    row = await conn.fetchrow(_MEMBER, team_id, user_id)
    team_acct, user_acct = _pair(team_id, user_id)
    if row is None or row["team_deleted"]:
        await accounts.set_member_cfg(team_acct, user_id, {})
        await accounts.set_blocked(user_acct, [], scope=team_id)
        await accounts.set_member_cfg(user_acct, team_id, {})
        return
    await accounts.set_member_cfg(team_acct, user_id, accounts.member_cfg(user_id, row))
    if row["billing_mode"] == "personal":
        await accounts.set_blocked(user_acct, row["model_restrictions"], scope=team_id)
        await accounts.set_member_cfg(user_acct, team_id, accounts.mirror_cfg(team_id, row, row))
    else:
        await accounts.set_blocked(user_acct, [], scope=team_id)
        await accounts.set_member_cfg(user_acct, team_id, {})


async def _key(accounts: Accounts, key: asyncpg.Record) -> None:
    team_id, user_id = key["team_id"], key["user_id"]
    billing: str | None = None  # the account the key bills now, None when it bills nothing
    scope = user_id
    if key["revoked"]:
        pass
    elif team_id is None:
        billing = rk.user_account(user_id)
    elif key["billing_mode"] is not None and not key["team_deleted"]:
        personal = key["billing_mode"] == "personal"
        billing = rk.user_account(user_id) if personal else rk.team_account(team_id)
        scope = team_id if personal else user_id
    for account in _key_accounts(user_id, team_id):
        if account == billing:
            await accounts.add_keys(account, {key["id"]: key_value(scope, key)})
        else:
            await accounts.remove_keys(account, [key["id"]])


async def _credits(accounts: Accounts, conn: asyncpg.Connection, account: str, now: float) -> None:
    """Add the credit rows the live state does not count yet (past its ``crid``)."""
    loaded, counted = await accounts.credit_mark(account)
    if not loaded:
        return  # the next load counts every row
    if counted is None:  # loaded before credits had a mark: rebuild the account
        await accounts.load_with(conn, account, now, force=True)
        await accounts.ensure_stream(account)
        return
    rows = await conn.fetch(
        "SELECT id, amount FROM ledger WHERE account = $1 AND kind = 'credit' AND id > $2"
        " ORDER BY id",
        account,
        counted,
    )
    if rows:
        await accounts.add_credits(account, sum(int(r["amount"]) for r in rows), rows[-1]["id"])


async def _subscription(
    accounts: Accounts, conn: asyncpg.Connection, team_id: str, period: str
) -> None:
    """The team's subscription allowance from its row, and ``period``'s allowance from the
    period's allowance ledger rows when it has some (else it stays as fixed)."""
    account = rk.team_account(team_id)
    loaded, _ = await accounts.credit_mark(account)
    if not loaded:
        return
    team = await conn.fetchrow("SELECT plan, seats FROM teams WHERE id = $1", team_id)
    sub_alw = 0 if team is None else accounts.subscription_allowance(team["plan"], team["seats"])
    granted = await conn.fetchrow(
        "SELECT count(*) AS n, coalesce(sum(amount), 0) AS s FROM ledger"
        " WHERE account = $1 AND kind = 'allowance' AND period = $2",
        account,
        period,
    )
    await accounts.set_subscription(
        account, period, sub_alw, int(granted["s"]) if granted["n"] else None
    )


async def _carry_over(
    accounts: Accounts, conn: asyncpg.Connection, team_id: str, user_id: str, now: float
) -> None:
    """The member's spend of this period (and each of their team keys') billed to the other
    account, so their monthly limits count both (``mx:``, ``kx:``)."""
    team_acct, user_acct = _pair(team_id, user_id)
    period = period_of(now)
    (in_team,) = await accounts.period_fields(team_acct, period, ["ms:" + user_id])
    (in_user,) = await accounts.period_fields(user_acct, period, ["ms:" + team_id])
    await accounts.set_period_fields(user_acct, period, {"mx:" + team_id: in_team})
    await accounts.set_period_fields(team_acct, period, {"mx:" + user_id: in_user})
    rows = await conn.fetch(
        "SELECT id FROM api_keys WHERE team_id = $1 AND user_id = $2 AND revoked_at IS NULL"
        " ORDER BY id",
        team_id,
        user_id,
    )
    key_ids = [r["id"] for r in rows]
    if key_ids:
        kx = ["ks:" + k for k in key_ids]
        in_team_keys = await accounts.period_fields(team_acct, period, kx)
        in_user_keys = await accounts.period_fields(user_acct, period, kx)
        await accounts.set_period_fields(
            user_acct, period, {"kx:" + k: v for k, v in zip(key_ids, in_team_keys, strict=True)}
        )
        await accounts.set_period_fields(
            team_acct, period, {"kx:" + k: v for k, v in zip(key_ids, in_user_keys, strict=True)}
        )


class Outbox:
    """Applies recorded account changes to Redis: right after their commit (:meth:`deliver`) and,
    for rows left behind, in the background (:meth:`run`)."""

    def __init__(self, accounts: Accounts, now: Callable[[], float]) -> None:
        self.accounts = accounts
        self.db = accounts.db
        self.now = now
        # rows pending at the previous sweep; None before the first (at start: every row is due)
        self._seen: set[int] | None = None

    async def deliver(self, changes: AccountChanges) -> bool:
        """Call after the commit of the transaction that recorded ``changes``. True when Redis
        has them (applied here, or by a sweep that held the row meanwhile); False when a store
        failed: logged, the row waits for the sweep, the committed change stands."""
        if changes.outbox_id is None:
            return True
        try:
            await self._apply(changes.outbox_id, wait=True)
        except STORE_ERRORS as exc:
            log.warning(
                "account changes %d kept in the outbox for the sweep: %s",
                changes.outbox_id,
                type(exc).__name__,
            )
            return False
        return True

    async def _apply(self, row_id: int, *, wait: bool) -> bool:
        """Apply and delete one row; False when it is gone (or, not waiting, held elsewhere).
        Waiting for a row a sweep holds means Redis has it once the lock is ours or it is gone."""
        lock = "FOR UPDATE" if wait else "FOR UPDATE SKIP LOCKED"
        async with self.db.acquire() as conn, conn.transaction():
            raw = await conn.fetchval(
                f"SELECT changes FROM account_outbox WHERE id = $1 {lock}", row_id
            )
            if raw is None:
                return False
            await apply_changes(self.accounts, conn, AccountChanges.from_json(raw), self.now())
            await conn.execute("DELETE FROM account_outbox WHERE id = $1", row_id)
        return True

    async def sweep(self) -> int:
        """Apply the rows left behind, oldest first, unless another process is sweeping; stops
        at the first store error (the rest would fail alike). Returns how many it applied.

        A row is left behind when it was there at the previous sweep too (the first sweep, at
        start, takes every row): a row just committed is its handler's to deliver, and taking
        it would only make the handler wait for us."""
        applied = 0
        async with self.db.acquire() as guard:
            if not await guard.fetchval("SELECT pg_try_advisory_lock($1, $2)", *_SWEEP_LOCK):
                return 0
            try:
                rows = await guard.fetch(
                    "SELECT id FROM account_outbox ORDER BY id LIMIT $1", SWEEP_BATCH
                )
                pending = [r["id"] for r in rows]
                due = [i for i in pending if self._seen is None or i in self._seen]
                self._seen = set(pending)
                for row_id in due:
                    try:
                        applied += await self._apply(row_id, wait=False)
                    except STORE_ERRORS as exc:
                        log.warning("account outbox row %d not applied: %s", row_id, exc)
                        break
                    except Exception:
                        log.exception("account outbox row %d cannot be applied", row_id)
            finally:
                await guard.execute("SELECT pg_advisory_unlock($1, $2)", *_SWEEP_LOCK)
        if applied:
            log.info("account outbox: applied %d change(s) left behind", applied)
        return applied

    async def run(self, stop: asyncio.Event) -> None:
        """Sweep at start, then every :data:`SWEEP_EVERY_S` seconds until ``stop``."""
        while not stop.is_set():
            try:
                await self.sweep()
            except STORE_ERRORS as exc:
                log.warning("account outbox sweep: %s", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), SWEEP_EVERY_S)
