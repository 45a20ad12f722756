"""Team members: the list, changes to one member (role, monthly limit override, enforcement,
billing mode), removal and leaving; and the pieces of membership the invitation, join-request
and lifecycle modules share (``lock_team``, ``add_member``, field checks).

Every membership change runs in one transaction that first takes the team account's advisory
lock and the team row (``lock_team``), re-reads the roles involved under that lock and asks
:mod:`policies.permissions`; then it writes PostgreSQL and the audit log, and notes what it
changed of the accounts' live state, written to Redis after the commit (``changing``,
gateway.metering.changes).
"""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import asyncpg
from aiohttp import web

from gateway import state as S
from gateway.api.common import (
    MAX_RPM,
    MAX_TPM,
    AuditEntry,
    audit,
    changing,
    count_field,
    json_response,
    money_field,
    now_utc,
    read_body,
    usd,
)
from gateway.api.keys import revoke_keys
from gateway.api.teams import team_access
from gateway.errors import Conflict, Forbidden, InvalidRequest, NotFound
from gateway.metering.accounts import lock_account
from gateway.metering.changes import AccountChanges
from gateway.teams import billing
from policies import keyspace as rk
from policies.limits import ENFORCEMENTS, effective_enforcement, effective_member_limit
from policies.periods import period_of
from policies.permissions import (
    ASSIGNABLE_ROLES,
    OWNER,
    Action,
    may_manage_member,
    may_remove,
    may_set_billing_mode,
    may_set_role,
)

log = logging.getLogger("modelbridge.members")

routes = web.RouteTableDef()

UNLIMITED = "unlimited"  # monthly_limit_usd: an explicit "no limit" override
_ID = re.compile(r"[a-z]{2,4}_[0-9a-f]{20}")
_PATCH_FIELDS = ("role", "monthly_limit_usd", "enforcement", "billing_mode", "rpm", "tpm")

_MEMBERS = (
    "SELECT m.*, u.email, u.name FROM memberships m JOIN users u ON u.id = m.user_id"
    " WHERE m.team_id = $1 AND m.removed_at IS NULL"
)


# --- shared pieces ------------------------------------------------------------------------------
def check_fields(body: dict[str, Any], known: Iterable[str]) -> None:
    """Refuse fields this endpoint does not take (a typo must not pass silently)."""
    names = set(known)
    for name in body:
        if name not in names:
            raise InvalidRequest(f"unknown field '{name[:64]}'", param=name[:64])


def id_field(body: dict[str, Any], name: str) -> str:
    value = body.get(name)
    if not isinstance(value, str) or not _ID.fullmatch(value):
        raise InvalidRequest(f"'{name}' must be an id", param=name)
    return value


def choice_field(body: dict[str, Any], name: str, choices: Iterable[str]) -> str:
    options = tuple(choices)
    value = body.get(name)
    if not isinstance(value, str) or value not in options:
        raise InvalidRequest(f"'{name}' must be one of: {', '.join(options)}", param=name)
    return value


def path_id(request: web.Request, name: str, code: str) -> str:
    value = request.match_info[name]
    if not _ID.fullmatch(value):
        raise NotFound(f"no such {code.removesuffix('_not_found').replace('_', ' ')}", code=code)
    return value


async def lock_team(conn: asyncpg.Connection, team_id: str) -> asyncpg.Record:
    """Serialise changes of one team: its account's advisory lock, then its row, which it
    returns (404 for a deleted team). The one team lock of the management API. ``FOR NO KEY
    UPDATE``: the id never changes, so rows that reference the team (keys, memberships, usage)
    are still inserted meanwhile."""
    await lock_account(conn, rk.team_account(team_id))
    row = await conn.fetchrow(
        "SELECT * FROM teams WHERE id = $1 AND deleted_at IS NULL FOR NO KEY UPDATE", team_id
    )
    if row is None:
        raise NotFound("no such team", code="team_not_found")
    return row


async def membership(conn: asyncpg.Connection, team_id: str, user_id: str) -> asyncpg.Record | None:
    return await conn.fetchrow(
        "SELECT * FROM memberships WHERE team_id = $1 AND user_id = $2 AND removed_at IS NULL"
        " FOR UPDATE",
        team_id,
        user_id,
    )


async def add_member(
    conn: asyncpg.Connection,
    request: web.Request,
    team_id: str,
    user_id: str,
    role: str,
    *,
    actor_id: str,
    via: str,
) -> asyncpg.Record:
    """Make ``user_id`` a member (call under ``lock_team``); 409 if they are one already."""
    if await membership(conn, team_id, user_id) is not None:
        raise Conflict("already a member of this team", code="already_member")
    row = await conn.fetchrow(
        "INSERT INTO memberships (team_id, user_id, role) VALUES ($1, $2, $3) RETURNING *",
        team_id,
        user_id,
        role,
    )
    await conn.execute(
        "UPDATE join_requests SET status = 'cancelled', decided_at = $4, decided_by = $3"
        " WHERE team_id = $1 AND user_id = $2 AND status = 'pending'",
        team_id,
        user_id,
        actor_id,
        now_utc(request),
    )
    entry = AuditEntry(
        team_id=team_id,
        actor_id=actor_id,
        action="member.add",
        target_type="user",
        target_id=user_id,
        after={"role": role, "via": via},
    )
    await audit(conn, request, entry)
    return row


# --- the member list ------------------------------------------------------------------------------
async def member_spend(app: web.Application, team_id: str, user_ids: list[str]) -> dict[str, int]:
    """This period's spend per member: the team account's live ``ms:<user>`` counters (loading
    the account first if needed), plus what members billed personally spent with this team's
    keys (from the usage records, so it trails the live counters by the writer's batch)."""
    if not user_ids:
        return {}
    now = app[S.CLOCK].now()
    period = period_of(now)
    account = rk.team_account(team_id)
    ak = rk.AccountKeys(account)
    values: list[str | None] = []
    for _ in range(2):
        pipe = app[S.REDIS].pipeline(transaction=False)
        pipe.hget(ak.state, "loaded")
        pipe.hmget(ak.period(period), ["ms:" + u for u in user_ids])
        loaded, values = await pipe.execute()
        if loaded == "1":
            break
        await app[S.ACCOUNTS].load(account, now)
    spend = {u: int(v or 0) for u, v in zip(user_ids, values, strict=True)}
    rows = await app[S.DB].fetch(
        "SELECT user_id, sum(charged) AS s FROM usage_records"
        " WHERE team_id = $1 AND period = $2 AND account <> $3 GROUP BY user_id",
        team_id,
        period,
        account,
    )
    for r in rows:
        if r["user_id"] in spend:
            spend[r["user_id"]] += int(r["s"])
    return spend


def member_json(row: Any, team: Any, spend: int) -> dict[str, Any]:
    limit = effective_member_limit(
        row["monthly_limit"], row["limit_set"], team["default_member_limit"]
    )
    return {
        "id": row["user_id"],
        "user_id": row["user_id"],
        "email": row["email"],
        "name": row["name"],
        "role": row["role"],
        "monthly_limit_usd": usd(limit),
        "limit_source": "member" if row["limit_set"] else "team",
        "enforcement": effective_enforcement(row["enforcement"], team["default_enforcement"]),
        "enforcement_source": "member" if row["enforcement"] else "team",
        "billing_mode": row["billing_mode"],
        "rpm": row["rpm"],
        "tpm": row["tpm"],
        "spend_this_period_usd": usd(spend),
        "joined_at": row["joined_at"],
    }


async def members_json(
    request: web.Request, team: Any, only_user: str | None = None
) -> list[dict[str, Any]]:
    db = request.app[S.DB]
    if only_user is None:
        rows = await db.fetch(_MEMBERS + " ORDER BY m.joined_at, m.id", team["id"])
    else:
        rows = await db.fetch(_MEMBERS + " AND m.user_id = $2", team["id"], only_user)
    spend = await member_spend(request.app, team["id"], [r["user_id"] for r in rows])
    return [member_json(r, team, spend[r["user_id"]]) for r in rows]


@routes.get("/api/teams/{team}/members")
async def list_members(request: web.Request) -> web.Response:
    access = await team_access(request, Action.VIEW_TEAM)
    return json_response({"data": await members_json(request, access.team)})


# --- changing one member --------------------------------------------------------------------------
@dataclass
class MemberChange:
    """A validated PATCH body; ``fields`` lists what it changes."""

    fields: list[str] = field(default_factory=list)
    role: str | None = None
    limit: int | None = None
    limit_set: bool = False
    enforcement: str | None = None
    billing_mode: str | None = None
    rpm: int | None = None
    tpm: int | None = None

    @property
    def touches_policy(self) -> bool:
        return bool({"monthly_limit_usd", "enforcement", "rpm", "tpm"} & set(self.fields))


def parse_change(body: dict[str, Any]) -> MemberChange:
    check_fields(body, _PATCH_FIELDS)
    change = MemberChange(fields=[f for f in _PATCH_FIELDS if f in body])
    if not change.fields:
        raise InvalidRequest(f"give at least one of: {', '.join(_PATCH_FIELDS)}")
    if "role" in body:
        change.role = choice_field(body, "role", ASSIGNABLE_ROLES)
    if "monthly_limit_usd" in body:
        raw = body["monthly_limit_usd"]
        if isinstance(raw, str) and raw.strip().lower() == UNLIMITED:
            change.limit, change.limit_set = None, True
        else:
            change.limit = money_field(body, "monthly_limit_usd", nullable=True)
            change.limit_set = change.limit is not None
    if "enforcement" in body and body["enforcement"] is not None:
        change.enforcement = choice_field(body, "enforcement", ENFORCEMENTS)
    if "billing_mode" in body:
        change.billing_mode = choice_field(body, "billing_mode", billing.BILLING_MODES)
    change.rpm = count_field(body, "rpm", maximum=MAX_RPM)
    change.tpm = count_field(body, "tpm", maximum=MAX_TPM)
    return change


def check_change(change: MemberChange, actor: str, target: str, *, self_change: bool) -> None:
    """403 unless the actor's role may make every part of the change (policies.permissions)."""
    if change.role is not None and not may_set_role(actor, target, change.role):
        if target == OWNER:
            raise Forbidden("the owner's role changes only by transferring ownership")
        raise Forbidden(f"your role ({actor}) may not change roles")
    if change.touches_policy and not may_manage_member(actor, target):
        raise Forbidden(f"your role ({actor}) may not change this member's limits")
    if change.billing_mode is not None and not may_set_billing_mode(self_change=self_change):
        raise Forbidden("only the member themselves chooses their billing mode")


def _snapshot(row: Any) -> dict[str, Any]:
    return {
        "role": row["role"],
        "monthly_limit_usd": usd(row["monthly_limit"]) if row["limit_set"] else None,
        "limit_set": row["limit_set"],
        "enforcement": row["enforcement"],
        "billing_mode": row["billing_mode"],
        "rpm": row["rpm"],
        "tpm": row["tpm"],
    }


async def _apply(
    request: web.Request,
    conn: asyncpg.Connection,
    team: Any,
    target: Any,
    change: MemberChange,
    actor_id: str,
    changes: AccountChanges,
) -> None:
    def pick(field: str, column: str, value: Any) -> Any:
        return value if field in change.fields else target[column]

    new = {
        "role": change.role or target["role"],
        "monthly_limit": pick("monthly_limit_usd", "monthly_limit", change.limit),
        "limit_set": pick("monthly_limit_usd", "limit_set", change.limit_set),
        "enforcement": pick("enforcement", "enforcement", change.enforcement),
        "billing_mode": change.billing_mode or target["billing_mode"],
        "rpm": pick("rpm", "rpm", change.rpm),
        "tpm": pick("tpm", "tpm", change.tpm),
    }
    after = await conn.fetchrow(
        "UPDATE memberships SET role = $2, monthly_limit = $3, limit_set = $4, enforcement = $5,"
        " billing_mode = $6, rpm = $7, tpm = $8 WHERE id = $1 RETURNING *",
        target["id"],
        new["role"],
        new["monthly_limit"],
        new["limit_set"],
        new["enforcement"],
        new["billing_mode"],
        new["rpm"],
        new["tpm"],
    )
    before_s, after_s = _snapshot(target), _snapshot(after)
    if before_s == after_s:
        return
    changed = [k for k in after_s if before_s[k] != after_s[k]]
    entry = AuditEntry(
        team_id=team["id"],
        actor_id=actor_id,
        action="member.update",
        target_type="user",
        target_id=target["user_id"],
        before={k: before_s[k] for k in changed},
        after={k: after_s[k] for k in changed},
    )
    await audit(conn, request, entry)
    member = (team["id"], target["user_id"])
    if change.touches_policy:
        changes.members.add(member)
    if target["billing_mode"] != after["billing_mode"]:
        log.info(
            "billing mode of %s in %s: %s (was %s)",
            member[1],
            member[0],
            after["billing_mode"],
            target["billing_mode"],
        )
        changes.switches.add(member)


@routes.patch("/api/teams/{team}/members/{user}")
async def update_member(request: web.Request) -> web.Response:
    access = await team_access(request, Action.VIEW_TEAM)
    user_id = path_id(request, "user", "member_not_found")
    change = parse_change(await read_body(request))
    async with changing(request) as (conn, changes):
        team = await lock_team(conn, access.team_id)
        actor = await membership(conn, access.team_id, access.user.id)
        target = await membership(conn, access.team_id, user_id)
        if actor is None:
            raise NotFound("no such team", code="team_not_found")
        if target is None:
            raise NotFound("no such member", code="member_not_found")
        check_change(change, actor["role"], target["role"], self_change=user_id == access.user.id)
        await _apply(request, conn, team, target, change, access.user.id, changes)
    members = await members_json(request, team, only_user=user_id)
    return json_response(members[0])


# --- removal and leaving --------------------------------------------------------------------------
@routes.delete("/api/teams/{team}/members/{user}")
async def remove_member(request: web.Request) -> web.Response:
    access = await team_access(request, Action.VIEW_TEAM)
    user_id = path_id(request, "user", "member_not_found")
    leaving = user_id == access.user.id
    async with changing(request) as (conn, changes):
        await lock_team(conn, access.team_id)
        actor = await membership(conn, access.team_id, access.user.id)
        target = await membership(conn, access.team_id, user_id)
        if actor is None:
            raise NotFound("no such team", code="team_not_found")
        if target is None:
            raise NotFound("no such member", code="member_not_found")
        if not may_remove(actor["role"], target["role"], self_removal=leaving):
            if target["role"] == OWNER:
                raise Forbidden(
                    "the owner cannot leave or be removed; transfer ownership first",
                    code="owner_cannot_leave",
                )
            raise Forbidden(f"your role ({actor['role']}) may not remove members")
        removed_at = await conn.fetchval(
            "UPDATE memberships SET removed_at = $2 WHERE id = $1 RETURNING removed_at",
            target["id"],
            now_utc(request),
        )
        keys = await conn.fetch(
            "SELECT id, user_id, team_id, name FROM api_keys"
            " WHERE team_id = $1 AND user_id = $2 AND revoked_at IS NULL",
            access.team_id,
            user_id,
        )
        await revoke_keys(
            request, conn, list(keys), access.user.id, changes, "key.revoke.member_removed"
        )
        entry = AuditEntry(
            team_id=access.team_id,
            actor_id=access.user.id,
            action="member.leave" if leaving else "member.remove",
            target_type="user",
            target_id=user_id,
            before=_snapshot(target),
            after={"keys_revoked": len(keys)},
        )
        await audit(conn, request, entry)
        changes.members.add((access.team_id, user_id))
    return json_response(
        {
            "team_id": access.team_id,
            "user_id": user_id,
            "removed_at": removed_at,
            "keys_revoked": len(keys),
        }
    )
