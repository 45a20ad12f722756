"""The operator API (``/admin``, ``Authorization: Bearer <MODELBRIDGE_ADMIN_TOKEN>``): credits,
discounts, the list of teams, the reconcile (contract section 11)."""

from __future__ import annotations

import asyncpg
from aiohttp import web
from redis.exceptions import RedisError

from gateway import state as S
from gateway.api.common import (
    AuditEntry,
    audit,
    changing,
    json_response,
    money_field,
    read_body,
    text_field,
    usd,
)
from gateway.api.members import lock_team
from gateway.credentials import check_admin
from gateway.errors import InvalidRequest, NotFound, StoreUnavailable
from gateway.metering.accounts import lock_account
from gateway.metering.reconcile import Reconciler, reconcile
from policies import keyspace as rk

routes = web.RouteTableDef()


async def _credit(request: web.Request, account: str, team_id: str | None) -> web.Response:
    body = await read_body(request)
    amount = money_field(body, "amount_usd", allow_negative=True)
    assert amount is not None
    if amount == 0:
        raise InvalidRequest("'amount_usd' must not be zero", param="amount_usd")
    note = text_field(body, "note", max_len=500, required=False) or ""
    async with changing(request) as (conn, changes):
        # the account's lock orders its credit rows (changes.py counts them past a mark)
        await lock_account(conn, account)
        credit = await conn.fetchrow(
            "INSERT INTO ledger (account, kind, amount, note, actor)"
            " VALUES ($1, 'credit', $2, $3, 'operator')"
            " RETURNING id, created_at",
            account,
            amount,
            note,
        )
        entry = AuditEntry(
            team_id=team_id,
            actor_id="operator",
            action="credits.add",
            target_type="account",
            target_id=account,
            after={"amount_usd": usd(amount), "note": note},
        )
        await audit(conn, request, entry)
        changes.credits.add(account)
    return json_response(
        {
            "id": credit["id"],
            "account": account,
            "amount_usd": usd(amount),
            "note": note,
            "created_at": credit["created_at"],
        },
        status=201,
    )


async def _exists(request: web.Request, table: str, param: str) -> str:
    check_admin(request, request.app[S.RUNTIME].admin_token)
    row_id = request.match_info[param]
    if not await request.app[S.DB].fetchval(f"SELECT 1 FROM {table} WHERE id = $1", row_id):
        raise NotFound(f"no such {param}", code=f"{param}_not_found")
    return row_id


@routes.post("/admin/teams/{team}/credits")
async def team_credits(request: web.Request) -> web.Response:
    team_id = await _exists(request, "teams", "team")
    return await _credit(request, rk.team_account(team_id), team_id)


@routes.post("/admin/users/{user}/credits")
async def user_credits(request: web.Request) -> web.Response:
    user_id = await _exists(request, "users", "user")
    return await _credit(request, rk.user_account(user_id), None)


@routes.put("/admin/teams/{team}/discount")
async def team_discount(request: web.Request) -> web.Response:
    check_admin(request, request.app[S.RUNTIME].admin_token)
    team_id = request.match_info["team"]
    body = await read_body(request)
    bps = body.get("discount_bps")
    if not isinstance(bps, int) or isinstance(bps, bool) or not 0 <= bps <= 10_000:
        raise InvalidRequest(
            "'discount_bps' must be an integer from 0 to 10000", param="discount_bps"
        )
    async with changing(request) as (conn, changes):
        before = (await lock_team(conn, team_id))["discount_bps"]
        await conn.execute("UPDATE teams SET discount_bps = $2 WHERE id = $1", team_id, bps)
        entry = AuditEntry(
            team_id=team_id,
            actor_id="operator",
            action="team.discount",
            target_type="team",
            target_id=team_id,
            before={"discount_bps": before},
            after={"discount_bps": bps},
        )
        await audit(conn, request, entry)
        changes.teams.add(team_id)
    return json_response({"team_id": team_id, "discount_bps": bps})


@routes.get("/admin/teams")
async def list_teams(request: web.Request) -> web.Response:
    check_admin(request, request.app[S.RUNTIME].admin_token)
    rows = await request.app[S.DB].fetch(
        "SELECT t.id, t.name, t.owner_id, t.plan, t.seats, t.discount_bps, t.created_at,"
        " t.deleted_at, (SELECT count(*) FROM memberships m"
        " WHERE m.team_id = t.id AND m.removed_at IS NULL) AS member_count"
        " FROM teams t ORDER BY t.created_at"
    )
    return json_response({"data": [dict(r) for r in rows]})


@routes.get("/admin/reconcile")
async def reconcile_accounts(request: web.Request) -> web.Response:
    """Contract section 11: every account (or each ``?account=t_...`` named) compared, Redis
    against the ledger against the daily rollup; 200 whether or not they agree."""
    check_admin(request, request.app[S.RUNTIME].admin_token)
    app = request.app
    named = request.query.getall("account", [])
    reconciler = Reconciler(app[S.DB], app[S.REDIS], app[S.ACCOUNTS])
    try:
        result = await reconcile(reconciler, app[S.CLOCK].now(), accounts=named or None)
    except (RedisError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise StoreUnavailable("a store is unreachable: nothing compared") from exc
    return json_response(result)
