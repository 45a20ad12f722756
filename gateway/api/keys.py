"""API keys: create (the secret is shown in that response only), list, revoke.

A key is stored as its SHA-256 and a display prefix. Creating or revoking a key also changes the
live key set of the account it bills, under the account's lock, so a revoked key is refused by
every gateway process on its next request (a revocation reaches Redis after its commit:
gateway.metering.changes).
"""

from __future__ import annotations

from typing import Any

from aiohttp import web

from gateway import state as S
from gateway.api.common import (
    AuditEntry,
    User,
    audit,
    current_user,
    json_response,
    now_utc,
    read_body,
    text_field,
)
from gateway.credentials import hash_secret, new_api_key, new_id
from gateway.errors import Forbidden, InvalidRequest, NotFound
from gateway.metering.accounts import lock_account
from gateway.metering.changes import AccountChanges
from policies import key_format as apikeys
from policies import keyspace as rk
from policies.permissions import Action, allowed

routes = web.RouteTableDef()

_PUBLIC = "k.id, k.name, k.prefix, k.team_id, k.user_id, k.created_at, k.last_used_at"


def key_json(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "prefix": row["prefix"],
        "team_id": row["team_id"],
        "user_id": row["user_id"],
        "created_at": row["created_at"],
        "last_used_at": row["last_used_at"],
    }


async def _membership(request: web.Request, team_id: str, user: User) -> Any:
    if not isinstance(team_id, str) or len(team_id) > 64:
        raise InvalidRequest("'team' must be a team id", param="team")
    row = await request.app[S.DB].fetchrow(
        "SELECT m.role, m.billing_mode FROM memberships m JOIN teams t ON t.id = m.team_id"
        " WHERE m.team_id = $1 AND m.user_id = $2 AND m.removed_at IS NULL AND t.deleted_at IS NULL",
        team_id,
        user.id,
    )
    if row is None:
        raise NotFound("no such team", code="team_not_found")
    return row


def billing_account(user_id: str, team_id: str | None, billing_mode: str | None) -> str:
    if team_id is None or billing_mode == "personal":
        return rk.user_account(user_id)
    return rk.team_account(team_id)


@routes.post("/api/keys")
async def create_key(request: web.Request) -> web.Response:
    user = await current_user(request)
    body = await read_body(request)
    name = text_field(body, "name")
    team_id = body.get("team") or body.get("team_id")
    mode = None
    if team_id is not None:
        member = await _membership(request, team_id, user)
        if not allowed(member["role"], Action.MANAGE_OWN_KEYS):
            raise Forbidden("your role may not create keys")
        mode = member["billing_mode"]
    secret = new_api_key()
    key_id = new_id("key")
    account = billing_account(user.id, team_id, mode)
    app = request.app
    async with app[S.DB].acquire() as conn, conn.transaction():
        await lock_account(conn, account)
        row = await conn.fetchrow(
            "INSERT INTO api_keys (id, hash, prefix, name, user_id, team_id) VALUES ($1, $2, $3, $4, $5, $6)"
            " RETURNING *",
            key_id,
            hash_secret(secret),
            apikeys.display_prefix(secret),
            name,
            user.id,
            team_id,
        )
        entry = AuditEntry(
            team_id=team_id,
            actor_id=user.id,
            action="key.create",
            target_type="key",
            target_id=key_id,
            after={"name": name, "prefix": row["prefix"]},
        )
        await audit(conn, request, entry)
        await app[S.ACCOUNTS].add_keys(account, {key_id: user.id})
    return json_response({**key_json(row), "secret": secret}, status=201)


@routes.get("/api/keys")
async def list_keys(request: web.Request) -> web.Response:
    user = await current_user(request)
    team_id = request.query.get("team")
    db = request.app[S.DB]
    if team_id is None:
        rows = await db.fetch(
            f"SELECT {_PUBLIC} FROM api_keys k WHERE k.user_id = $1 AND k.team_id IS NULL AND k.revoked_at IS NULL"
            " ORDER BY k.created_at",
            user.id,
        )
    else:
        member = await _membership(request, team_id, user)
        everyone = allowed(member["role"], Action.MANAGE_ALL_KEYS)
        rows = await db.fetch(
            f"SELECT {_PUBLIC}, u.email AS user_email FROM api_keys k JOIN users u ON u.id = k.user_id"
            " WHERE k.team_id = $1 AND k.revoked_at IS NULL AND ($2 OR k.user_id = $3) ORDER BY k.created_at",
            team_id,
            everyone,
            user.id,
        )
    return json_response(
        {
            "data": [
                {**key_json(r), **({"user_email": r["user_email"]} if "user_email" in r else {})}
                for r in rows
            ]
        }
    )


async def revoke_keys(
    request: web.Request,
    conn: Any,
    rows: list[Any],
    actor_id: str | None,
    changes: AccountChanges,
    reason: str = "key.revoke",
) -> None:
    """Revoke these keys (rows with id, user_id, team_id) in PostgreSQL, inside the caller's
    transaction; ``changes.apply`` after its commit takes them out of every account's key set."""
    for row in rows:
        await conn.execute(
            "UPDATE api_keys SET revoked_at = $3, revoked_by = $2 WHERE id = $1 AND revoked_at IS NULL",
            row["id"],
            actor_id,
            now_utc(request),
        )
        entry = AuditEntry(
            team_id=row["team_id"],
            actor_id=actor_id,
            action=reason,
            target_type="key",
            target_id=row["id"],
            before={"name": row["name"], "user_id": row["user_id"]},
        )
        await audit(conn, request, entry)
        changes.keys.add(row["id"])


@routes.delete("/api/keys/{key}")
async def delete_key(request: web.Request) -> web.Response:
    user = await current_user(request)
    key_id = request.match_info["key"]
    db = request.app[S.DB]
    row = await db.fetchrow("SELECT * FROM api_keys WHERE id = $1 AND revoked_at IS NULL", key_id)
    if row is None:
        raise NotFound("no such key", code="key_not_found")
    if row["user_id"] != user.id:
        role = None
        if row["team_id"] is not None:
            role = await db.fetchval(
                "SELECT role FROM memberships WHERE team_id = $1 AND user_id = $2 AND removed_at IS NULL",
                row["team_id"],
                user.id,
            )
        if role is None:
            raise NotFound("no such key", code="key_not_found")
        if not allowed(role, Action.MANAGE_ALL_KEYS):
            raise Forbidden("only owners and admins revoke other members' keys")
    changes = AccountChanges()
    async with db.acquire() as conn, conn.transaction():
        await revoke_keys(request, conn, [row], user.id, changes)
    await changes.apply(request.app[S.ACCOUNTS])
    return json_response({"id": key_id, "revoked": True})
