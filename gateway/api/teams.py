"""Teams: create, list, and the overview every member sees (``GET /api/teams/{team}``).

``team_access`` is the one gate for every ``/api/teams/{team}/...`` handler: a caller who is not
a member gets 404 (existence is not leaked), a member without the right gets 403.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from aiohttp import web

from gateway import state as S
from gateway.api.common import (
    AuditEntry,
    User,
    audit,
    current_user,
    id_param,
    json_response,
    read_body,
    text_field,
    usd,
)
from gateway.credentials import new_id
from gateway.errors import Forbidden, NotFound
from policies import keyspace as rk
from policies.limits import allowance_left
from policies.periods import period_of
from policies.permissions import Action, allowed

routes = web.RouteTableDef()


@dataclass(frozen=True, slots=True)
class TeamAccess:
    user: User
    team: Any  # the teams row
    role: str

    @property
    def team_id(self) -> str:
        return str(self.team["id"])


async def team_access(request: web.Request, action: Action, param: str = "team") -> TeamAccess:
    user = await current_user(request)
    team_id = id_param(request, param)
    row = await request.app[S.DB].fetchrow(
        "SELECT t.*, m.role FROM teams t JOIN memberships m ON m.team_id = t.id"
        " WHERE t.id = $1 AND m.user_id = $2 AND m.removed_at IS NULL AND t.deleted_at IS NULL",
        team_id,
        user.id,
    )
    if row is None:
        raise NotFound("no such team", code="team_not_found")
    if not allowed(row["role"], action):
        raise Forbidden(f"your role ({row['role']}) may not {action.value.replace('_', ' ')}")
    return TeamAccess(user, row, row["role"])


async def account_money(app: web.Application, account: str) -> dict[str, int]:
    """Live money of an account from Redis (loading it first if needed)."""
    now = app[S.CLOCK].now()
    period = period_of(now)
    ak = rk.AccountKeys(account)
    redis = app[S.REDIS]
    for _ in range(2):
        pipe = redis.pipeline(transaction=False)
        pipe.hmget(ak.state, ["loaded", "credits", "holds", "sub_alw"])
        pipe.hmget(ak.period(period), ["alw", "aspent", "spend", "req"])
        (loaded, credits, holds, sub_alw), (alw, aspent, spend, req) = await pipe.execute()
        if loaded == "1":
            break
        await app[S.ACCOUNTS].load(account, now)
    allowance = int(alw if alw is not None else sub_alw or 0)
    left = allowance_left(allowance, int(aspent or 0))
    return {
        "credits": int(credits or 0),
        "holds": int(holds or 0),
        "allowance": allowance,
        "allowance_left": left,
        "spend": int(spend or 0),
        "requests": int(req or 0),
        "balance": left + int(credits or 0),
    }


async def overview(request: web.Request, access: TeamAccess) -> dict[str, Any]:
    team = access.team
    money = await account_money(request.app, rk.team_account(access.team_id))
    db = request.app[S.DB]
    members = await db.fetchval(
        "SELECT count(*) FROM memberships WHERE team_id = $1 AND removed_at IS NULL", access.team_id
    )
    pending = await db.fetchval(
        "SELECT count(*) FROM join_requests WHERE team_id = $1 AND status = 'pending'",
        access.team_id,
    )
    return {
        "id": access.team_id,
        "name": team["name"],
        "created_at": team["created_at"],
        "balance_usd": usd(money["balance"]),
        "allowance_usd": usd(money["allowance"]),
        "allowance_left_usd": usd(money["allowance_left"]),
        "credits_usd": usd(money["credits"]),
        "spend_this_period_usd": usd(money["spend"]),
        "period": period_of(request.app[S.CLOCK].now()),
        "member_count": members,
        "pending_join_requests": pending,
        "spending_limit_usd": usd(team["spending_limit"]),
        "default_member_limit_usd": usd(team["default_member_limit"]),
        "default_enforcement": team["default_enforcement"],
        "model_restrictions": list(team["model_restrictions"]),
        "discount_bps": team["discount_bps"],
        "rpm_limit": team["rpm_limit"],
        "tpm_limit": team["tpm_limit"],
        "plan": team["plan"],
        "seats": team["seats"],
        "your_role": access.role,
    }


async def user_teams(app: web.Application, user_id: str) -> list[dict[str, Any]]:
    """The teams a user belongs to, with their role and billing mode, oldest first."""
    rows = await app[S.DB].fetch(
        "SELECT t.id, t.name, m.role, m.billing_mode, t.created_at FROM memberships m"
        " JOIN teams t ON t.id = m.team_id"
        " WHERE m.user_id = $1 AND m.removed_at IS NULL AND t.deleted_at IS NULL"
        " ORDER BY t.created_at",
        user_id,
    )
    return [dict(r) for r in rows]


@routes.get("/api/teams")
async def list_teams(request: web.Request) -> web.Response:
    user = await current_user(request)
    return json_response({"data": await user_teams(request.app, user.id)})


@routes.post("/api/teams")
async def create_team(request: web.Request) -> web.Response:
    user = await current_user(request)
    body = await read_body(request)
    name = text_field(body, "name")
    team_id = new_id("team")
    async with request.app[S.DB].acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "INSERT INTO teams (id, name, owner_id) VALUES ($1, $2, $3) RETURNING *",
            team_id,
            name,
            user.id,
        )
        await conn.execute(
            "INSERT INTO memberships (team_id, user_id, role) VALUES ($1, $2, 'owner')",
            team_id,
            user.id,
        )
        entry = AuditEntry(
            team_id=team_id,
            actor_id=user.id,
            action="team.create",
            target_type="team",
            target_id=team_id,
            after={"name": name},
        )
        await audit(conn, request, entry)
    access = TeamAccess(user, {**dict(row), "role": "owner"}, "owner")
    return json_response(await overview(request, access), status=201)


@routes.get("/api/teams/{team}")
async def get_team(request: web.Request) -> web.Response:
    access = await team_access(request, Action.VIEW_TEAM)
    return json_response(await overview(request, access))
