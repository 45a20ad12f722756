"""A team's life: ownership transfer, (soft) deletion, and reading its audit log.

Deleting a team keeps every row: the team gets ``deleted_at``, all its keys are revoked (in
PostgreSQL and in the live key sets, so every gateway process refuses them at their next
request), open invitations, the invite link and pending join requests end, and the account's live
state is marked deleted and unloaded, so that nothing bills it again. Usage records and the audit
trail stay; ``GET /admin/teams`` still lists the team, with ``deleted_at``.
"""

from __future__ import annotations

from typing import Any

import orjson
from aiohttp import web

from gateway import state as S
from gateway.api.common import AuditEntry, audit, changing, json_response, now_utc, read_body
from gateway.api.keys import revoke_keys
from gateway.api.members import check_fields, id_field, lock_team, membership
from gateway.api.teams import team_access
from gateway.errors import Forbidden, InvalidRequest
from policies.permissions import ADMIN, OWNER, Action, may_transfer

routes = web.RouteTableDef()

AUDIT_PAGE_DEFAULT = 50
AUDIT_PAGE_MAX = 200


@routes.post("/api/teams/{team}/transfer")
async def transfer(request: web.Request) -> web.Response:
    access = await team_access(request, Action.TRANSFER_OWNERSHIP)
    body = await read_body(request)
    check_fields(body, ("user_id",))
    target_id = id_field(body, "user_id")
    if target_id == access.user.id:
        raise InvalidRequest("you own this team already", param="user_id")
    async with request.app[S.DB].acquire() as conn, conn.transaction():
        await lock_team(conn, access.team_id)
        actor = await membership(conn, access.team_id, access.user.id)
        target = await membership(conn, access.team_id, target_id)
        if target is None:
            raise InvalidRequest(
                "'user_id' must be a member of the team", param="user_id", code="member_not_found"
            )
        if actor is None or not may_transfer(actor["role"], target["role"], self_target=False):
            raise Forbidden("only the owner transfers ownership")
        # The old owner steps down first: one owner per team at any instant (unique index).
        await conn.execute("UPDATE memberships SET role = $2 WHERE id = $1", actor["id"], ADMIN)
        await conn.execute("UPDATE memberships SET role = $2 WHERE id = $1", target["id"], OWNER)
        await conn.execute(
            "UPDATE teams SET owner_id = $2 WHERE id = $1", access.team_id, target_id
        )
        entry = AuditEntry(
            team_id=access.team_id,
            actor_id=access.user.id,
            action="team.transfer",
            target_type="user",
            target_id=target_id,
            before={"owner_id": access.user.id, "new_owner_role": target["role"]},
            after={"owner_id": target_id, "previous_owner_role": ADMIN},
        )
        await audit(conn, request, entry)
    return json_response(
        {"team_id": access.team_id, "owner_id": target_id, "previous_owner_id": access.user.id}
    )


@routes.delete("/api/teams/{team}")
async def delete_team(request: web.Request) -> web.Response:
    access = await team_access(request, Action.DELETE_TEAM)
    team_id = access.team_id
    actor = access.user.id
    async with changing(request) as (conn, changes):
        changes.teams.add(team_id)
        await lock_team(conn, team_id)
        now = now_utc(request)
        deleted_at = await conn.fetchval(
            "UPDATE teams SET deleted_at = $2 WHERE id = $1 RETURNING deleted_at", team_id, now
        )
        keys = await conn.fetch(
            "SELECT id, user_id, team_id, name FROM api_keys"
            " WHERE team_id = $1 AND revoked_at IS NULL",
            team_id,
        )
        await revoke_keys(request, conn, list(keys), actor, changes, "key.revoke.team_deleted")
        # (changes.teams also clears the mirrors of the members who billed personally)
        invitations = await conn.execute(
            "UPDATE invitations SET revoked_at = $3, revoked_by = $2"
            " WHERE team_id = $1 AND accepted_at IS NULL AND revoked_at IS NULL",
            team_id,
            actor,
            now,
        )
        await conn.execute(
            "UPDATE invite_links SET disabled_at = $3, disabled_by = $2"
            " WHERE team_id = $1 AND disabled_at IS NULL",
            team_id,
            actor,
            now,
        )
        await conn.execute(
            "UPDATE join_requests SET status = 'cancelled', decided_at = $3, decided_by = $2"
            " WHERE team_id = $1 AND status = 'pending'",
            team_id,
            actor,
            now,
        )
        entry = AuditEntry(
            team_id=team_id,
            actor_id=actor,
            action="team.delete",
            target_type="team",
            target_id=team_id,
            before={"name": access.team["name"]},
            after={
                "deleted_at": deleted_at,
                "keys_revoked": len(keys),
                "invitations_revoked": int(invitations.split()[-1]),
            },
        )
        await audit(conn, request, entry)
    return json_response({"id": team_id, "deleted_at": deleted_at, "keys_revoked": len(keys)})


def _query_int(
    request: web.Request, name: str, default: int | None, low: int, high: int
) -> int | None:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isascii() or not raw.isdigit() or len(raw) > 18 or not low <= int(raw) <= high:
        raise InvalidRequest(f"'{name}' must be an integer from {low} to {high}", param=name)
    return int(raw)


def _json(value: Any) -> Any:
    return orjson.loads(value) if isinstance(value, str | bytes) else value


def audit_json(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "actor": {"id": row["actor_id"], "email": row["actor_email"], "name": row["actor_name"]},
        "action": row["action"],
        "target": {"type": row["target_type"], "id": row["target_id"]},
        "before": _json(row["before"]),
        "after": _json(row["after"]),
        "created_at": row["created_at"],
        "request_id": row["request_id"],
    }


@routes.get("/api/teams/{team}/audit")
async def team_audit(request: web.Request) -> web.Response:
    """Newest first; ``?limit=`` (1-200, default 50) and ``?before_id=`` page backwards."""
    access = await team_access(request, Action.VIEW_AUDIT)
    limit = _query_int(request, "limit", AUDIT_PAGE_DEFAULT, 1, AUDIT_PAGE_MAX)
    before_id = _query_int(request, "before_id", None, 1, 2**62)
    assert limit is not None
    rows = await request.app[S.DB].fetch(
        "SELECT a.*, u.email AS actor_email, u.name AS actor_name FROM audit_log a"
        " LEFT JOIN users u ON u.id = a.actor_id"
        " WHERE a.team_id = $1 AND ($2::bigint IS NULL OR a.id < $2) ORDER BY a.id DESC LIMIT $3",
        access.team_id,
        before_id,
        limit + 1,
    )
    page = [audit_json(r) for r in rows[:limit]]
    more = len(rows) > limit
    return json_response(
        {"data": page, "has_more": more, "next_before_id": page[-1]["id"] if more else None}
    )
