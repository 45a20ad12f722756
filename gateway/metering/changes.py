"""Redis follows PostgreSQL after commit: what a management transaction changed, re-read from
the record and written to the accounts' live state once the transaction has committed.

A Redis write inside a PostgreSQL transaction cannot be rolled back with it: a failure after the
write (a constraint checked at commit, a lost connection) leaves Redis saying what PostgreSQL
does not. So a transaction only notes *what* it changed (:class:`AccountChanges`: members of a
team, API keys); after the commit, :meth:`AccountChanges.apply` takes the accounts' advisory
locks in a short transaction of its own, reads the committed rows, and writes the Redis fields
they imply, as the rebuild (``Accounts.load``) does for a whole account. Applying twice, late,
or after another change of the same rows writes the same thing: the writes are derived from the
record, not replayed deltas, and the locks order them with every other writer and loader.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import asyncpg

from gateway.metering.accounts import KEY_CONTROLS, Accounts, key_value, lock_account
from policies import keyspace as rk

_MEMBER = """
SELECT m.monthly_limit, m.limit_set, m.enforcement, m.billing_mode, m.rpm, m.tpm,
       t.default_member_limit, t.default_enforcement, t.model_restrictions,
       t.deleted_at IS NOT NULL AS team_deleted
FROM memberships m JOIN teams t ON t.id = m.team_id
WHERE m.team_id = $1 AND m.user_id = $2 AND m.removed_at IS NULL
"""
_KEYS = f"""
SELECT k.id, k.user_id, k.team_id, k.revoked_at IS NOT NULL AS revoked, m.billing_mode, {KEY_CONTROLS},
       coalesce(t.deleted_at IS NOT NULL, false) AS team_deleted
FROM api_keys k
LEFT JOIN memberships m ON m.team_id = k.team_id AND m.user_id = k.user_id AND m.removed_at IS NULL
LEFT JOIN teams t ON t.id = k.team_id
WHERE k.id = ANY($1::text[])
"""


def _key_accounts(user_id: str, team_id: str | None) -> list[str]:
    """Every account whose key set may hold a key: a team key bills the team or, billed
    personally, its user; a personal key bills its user."""
    if team_id is None:
        return [rk.user_account(user_id)]
    return [rk.team_account(team_id), rk.user_account(user_id)]


@dataclass
class AccountChanges:
    """Rows a transaction changed whose live state Redis keeps: ``(team id, user id)`` of
    memberships (the member's limit and enforcement in the team account, and the team policies
    mirrored into the user's account when they bill personally), API key ids (whether, and
    where, the key may bill) and team ids (a deleted team's account bills nothing)."""

    members: set[tuple[str, str]] = field(default_factory=set)
    keys: set[str] = field(default_factory=set)
    teams: set[str] = field(default_factory=set)

    def __bool__(self) -> bool:
        return bool(self.members or self.keys or self.teams)

    async def apply(self, accounts: Accounts) -> None:
        """Call after the transaction that made the changes committed."""
        if not self:
            return
        async with accounts.db.acquire() as conn, conn.transaction():
            keys = await conn.fetch(_KEYS, sorted(self.keys)) if self.keys else []
            locked = {
                account
                for team_id, user_id in self.members
                for account in (rk.team_account(team_id), rk.user_account(user_id))
            }
            locked |= {a for k in keys for a in _key_accounts(k["user_id"], k["team_id"])}
            locked |= {rk.team_account(team_id) for team_id in self.teams}
            for account in sorted(locked):  # t_ before u_: the lock order everywhere
                await lock_account(conn, account)
            for team_id, user_id in sorted(self.members):
                await _member(accounts, conn, team_id, user_id)
            for key in keys:
                await _key(accounts, key)
            for team_id in sorted(self.teams):
                deleted = await conn.fetchval(
                    "SELECT deleted_at IS NOT NULL FROM teams WHERE id = $1", team_id
                )
                if deleted:
                    await accounts.set_cfg(rk.team_account(team_id), {"deleted": "1"})
                    await accounts.unload(rk.team_account(team_id))


async def _member(accounts: Accounts, conn: asyncpg.Connection, team_id: str, user_id: str) -> None:
    row = await conn.fetchrow(_MEMBER, team_id, user_id)
    team_acct, user_acct = rk.team_account(team_id), rk.user_account(user_id)
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
