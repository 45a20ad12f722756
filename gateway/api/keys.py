"""API keys: create (the secret is shown in that response only), list, change, revoke.

A key is stored as its SHA-256 and a display prefix, with its controls (contract section 10):
``expires_at``, ``models``, ``monthly_limit_usd`` (hard), ``rpm`` and ``tpm``. Creating a key
adds it, with its controls, to the live key set of the account it bills, and changing or revoking
one rewrites that entry, after the commit (gateway.metering.changes), so the next request on every
gateway process sees it: the hold script reads a key's controls with the same ``HGET`` that
checks it (policies/limits.py:key_entry). The key's creator and the team's owners and admins may
change it.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from gateway import state as S
from gateway.api.common import (
    MAX_RPM,
    MAX_TPM,
    AuditEntry,
    User,
    audit,
    changing,
    count_field,
    current_user,
    json_response,
    money_field,
    now_utc,
    read_body,
    text_field,
    usd,
)
from gateway.credentials import hash_secret, new_api_key, new_id
from gateway.errors import Forbidden, InvalidRequest, NotFound
from gateway.metering.accounts import lock_account
from gateway.metering.changes import AccountChanges
from policies import key_format as apikeys
from policies import keyspace as rk
from policies.limits import MODEL_SEP
from policies.periods import period_of
from policies.permissions import Action, allowed
from policies.ratelimits import WINDOW_MS

routes = web.RouteTableDef()

_PUBLIC = (
    "k.id, k.name, k.prefix, k.team_id, k.user_id, k.created_at, k.last_used_at, k.expires_at,"
    " k.models, k.monthly_limit, k.rpm, k.tpm"
)
#: the fields of contract section 10, and the api_keys column each is stored in
CONTROLS = {
    "expires_at": "expires_at",
    "models": "models",
    "monthly_limit_usd": "monthly_limit",
    "rpm": "rpm",
    "tpm": "tpm",
}
_CREATE_FIELDS = ("name", "team", "team_id", *CONTROLS)
_PATCH_FIELDS = ("name", *CONTROLS)
MAX_KEY_MODELS = 200


def key_json(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "name": row["name"],
        "prefix": row["prefix"],
        "team_id": row["team_id"],
        "user_id": row["user_id"],
        "created_at": row["created_at"],
        "last_used_at": row["last_used_at"],
        **controls_json(row),
    }


def controls_json(row: Any) -> dict[str, Any]:
    models = row["models"]
    return {
        "expires_at": row["expires_at"],
        "models": None if models is None else list(models),
        "monthly_limit_usd": usd(row["monthly_limit"]),
        "rpm": row["rpm"],
        "tpm": row["tpm"],
    }


# --- validation ---------------------------------------------------------------------------------
def _check_fields(body: dict[str, Any], known: tuple[str, ...]) -> None:
    for name in body:
        if name not in known:
            raise InvalidRequest(f"unknown field '{name[:64]}'", param=name[:64])


def expiry_field(body: dict[str, Any], now: float, *, future: bool) -> datetime | None:
    """ISO 8601 (UTC when no offset is given), kept to the whole second (rounded down: a key
    never lives past the time given). ``future``: refuse a time that is not after ``now``."""
    value = body.get("expires_at")
    if value is None:
        return None
    when = None
    if isinstance(value, str) and len(value) <= 64:
        try:
            when = datetime.fromisoformat(value.strip())
        except ValueError:
            when = None
    if when is None:
        raise InvalidRequest(
            "'expires_at' must be an ISO 8601 time, e.g. 2026-12-31T23:59:59Z", param="expires_at"
        )
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    when = when.astimezone(UTC).replace(microsecond=0)
    if future and when.timestamp() <= now:
        raise InvalidRequest("'expires_at' must be in the future", param="expires_at")
    return when


def models_field(body: dict[str, Any], configured: Any) -> list[str] | None:
    """A list of configured model names (order kept, duplicates dropped); ``null``: every model
    the team allows."""
    value = body.get("models")
    if value is None:
        return None
    if not isinstance(value, list) or len(value) > MAX_KEY_MODELS:
        raise InvalidRequest(
            f"'models' must be an array of at most {MAX_KEY_MODELS} model names, or null",
            param="models",
        )
    names: list[str] = []
    for item in value:
        if not isinstance(item, str) or item not in configured or MODEL_SEP in item or "|" in item:
            shown = item[:100] if isinstance(item, str) else repr(item)[:100]
            raise InvalidRequest(f"'models': unknown model {shown!r}", param="models")
        names.append(item)
    return list(dict.fromkeys(names))


def parse_controls(request: web.Request, body: dict[str, Any], *, creating: bool) -> dict[str, Any]:
    """The controls in ``body``, validated: {api_keys column: value} for each field given."""
    app = request.app
    columns: dict[str, Any] = {}
    if "expires_at" in body:
        columns["expires_at"] = expiry_field(body, app[S.CLOCK].now(), future=creating)
    if "models" in body:
        columns["models"] = models_field(body, app[S.CONFIG].models)
    if "monthly_limit_usd" in body:
        columns["monthly_limit"] = money_field(body, "monthly_limit_usd", nullable=True)
    if "rpm" in body:
        columns["rpm"] = count_field(body, "rpm", maximum=MAX_RPM)
    if "tpm" in body:
        columns["tpm"] = count_field(body, "tpm", maximum=MAX_TPM)
    return columns


def _audited(row: Any, columns: list[str]) -> dict[str, Any]:
    view = {"name": row["name"], **controls_json(row)}
    fields = {column: field for field, column in CONTROLS.items()} | {"name": "name"}
    return {fields[c]: view[fields[c]] for c in columns}


# --- the key's account and permissions ----------------------------------------------------------
async def _membership(request: web.Request, team_id: str, user: User) -> Any:
    if not isinstance(team_id, str) or len(team_id) > 64:
        raise InvalidRequest("'team' must be a team id", param="team")
    row = await request.app[S.DB].fetchrow(
        "SELECT m.role, m.billing_mode FROM memberships m JOIN teams t ON t.id = m.team_id"
        " WHERE m.team_id = $1 AND m.user_id = $2 AND m.removed_at IS NULL"
        " AND t.deleted_at IS NULL",
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


async def _key_for(request: web.Request, user: User, key_id: str, *, action: str) -> Any:
    """The active key ``key_id`` if ``user`` may manage it: its creator, or an owner or admin of
    its team. 404 when the caller may not even see it."""
    db = request.app[S.DB]
    row = await db.fetchrow("SELECT * FROM api_keys WHERE id = $1 AND revoked_at IS NULL", key_id)
    if row is None:
        raise NotFound("no such key", code="key_not_found")
    if row["user_id"] != user.id:
        role = None
        if row["team_id"] is not None:
            role = await db.fetchval(
                "SELECT role FROM memberships"
                " WHERE team_id = $1 AND user_id = $2 AND removed_at IS NULL",
                row["team_id"],
                user.id,
            )
        if role is None:
            raise NotFound("no such key", code="key_not_found")
        if not allowed(role, Action.MANAGE_ALL_KEYS):
            raise Forbidden(f"only the key's creator and the team's owners and admins {action} it")
    return row


@routes.post("/api/keys")
async def create_key(request: web.Request) -> web.Response:
    user = await current_user(request)
    body = await read_body(request)
    _check_fields(body, _CREATE_FIELDS)
    name = text_field(body, "name")
    controls = parse_controls(request, body, creating=True)
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
    async with changing(request) as (conn, changes):
        await lock_account(conn, account)
        row = await conn.fetchrow(
            "INSERT INTO api_keys (id, hash, prefix, name, user_id, team_id, expires_at, models,"
            " monthly_limit, rpm, tpm) VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
            " RETURNING *",
            key_id,
            hash_secret(secret),
            apikeys.display_prefix(secret),
            name,
            user.id,
            team_id,
            controls.get("expires_at"),
            controls.get("models"),
            controls.get("monthly_limit"),
            controls.get("rpm"),
            controls.get("tpm"),
        )
        after = {"name": name, "prefix": row["prefix"], **_audited(row, list(controls))}
        entry = AuditEntry(
            team_id=team_id,
            actor_id=user.id,
            action="key.create",
            target_type="key",
            target_id=key_id,
            after=after,
        )
        await audit(conn, request, entry)
        changes.keys.add(key_id)
    return json_response({**key_json(row), "secret": secret}, status=201)


@routes.patch("/api/keys/{key}")
async def update_key(request: web.Request) -> web.Response:
    user = await current_user(request)
    key_id = request.match_info["key"]
    body = await read_body(request)
    _check_fields(body, _PATCH_FIELDS)
    columns = parse_controls(request, body, creating=False)
    if "name" in body:
        columns["name"] = text_field(body, "name")
    await _key_for(request, user, key_id, action="change")
    async with changing(request) as (conn, changes):
        before = await conn.fetchrow(
            "SELECT * FROM api_keys WHERE id = $1 AND revoked_at IS NULL FOR UPDATE", key_id
        )
        if before is None:
            raise NotFound("no such key", code="key_not_found")
        after = before
        if columns:
            sets = ", ".join(f"{column} = ${i + 2}" for i, column in enumerate(columns))
            after = await conn.fetchrow(
                f"UPDATE api_keys SET {sets} WHERE id = $1 RETURNING *", key_id, *columns.values()
            )
        changed = [c for c in columns if before[c] != after[c]]
        if changed:
            entry = AuditEntry(
                team_id=after["team_id"],
                actor_id=user.id,
                action="key.update",
                target_type="key",
                target_id=key_id,
                before=_audited(before, changed),
                after=_audited(after, changed),
            )
            await audit(conn, request, entry)
            changes.keys.add(key_id)
    listed = await _listing(request, [after])
    return json_response(listed[0])


@routes.get("/api/keys")
async def list_keys(request: web.Request) -> web.Response:
    user = await current_user(request)
    team_id = request.query.get("team")
    db = request.app[S.DB]
    if team_id is None:
        rows = await db.fetch(
            f"SELECT {_PUBLIC}, NULL AS billing_mode FROM api_keys k"
            " WHERE k.user_id = $1 AND k.team_id IS NULL AND k.revoked_at IS NULL"
            " ORDER BY k.created_at",
            user.id,
        )
    else:
        member = await _membership(request, team_id, user)
        everyone = allowed(member["role"], Action.MANAGE_ALL_KEYS)
        rows = await db.fetch(
            f"SELECT {_PUBLIC}, u.email AS user_email, m.billing_mode FROM api_keys k"
            " JOIN users u ON u.id = k.user_id"
            " LEFT JOIN memberships m"
            " ON m.team_id = k.team_id AND m.user_id = k.user_id AND m.removed_at IS NULL"
            " WHERE k.team_id = $1 AND k.revoked_at IS NULL AND ($2 OR k.user_id = $3)"
            " ORDER BY k.created_at",
            team_id,
            everyone,
            user.id,
        )
    return json_response({"data": await _listing(request, rows)})


async def _listing(request: web.Request, rows: list[Any]) -> list[dict[str, Any]]:
    """Keys as listed: their fields, this period's spend (the live counters of the account each
    bills, plus what it billed to the other account before a billing-mode switch), its requests
    refused this period by error code and, for a key with a rate limit, what its log holds of
    the last 60 s."""
    app = request.app
    now = app[S.CLOCK].now()
    period = period_of(now)
    placed: list[tuple[str, Any]] = []
    for row in rows:
        mode = row.get("billing_mode")
        if row["team_id"] is not None and mode is None:
            mode = await app[S.DB].fetchval(
                "SELECT billing_mode FROM memberships WHERE team_id = $1 AND user_id = $2"
                " AND removed_at IS NULL",
                row["team_id"],
                row["user_id"],
            )
        placed.append((billing_account(row["user_id"], row["team_id"], mode), row))
    accounts = sorted({account for account, _ in placed})
    for account in accounts:
        await _loaded(app, account, now)
    pipe = app[S.REDIS].pipeline(transaction=False)
    for account, row in placed:
        ak = rk.AccountKeys(account)
        pipe.hmget(ak.period(period), ["ks:" + row["id"], "kx:" + row["id"]])
        pipe.hget(ak.state, "rlast")
        pipe.zrange(ak.key_rate_log(row["id"]), 0, -1, withscores=True)
        pipe.hgetall(ak.refusals(period))
    replies = await pipe.execute()
    out = []
    for i, (_, row) in enumerate(placed):
        (ks, kx), last, logged, refused = replies[4 * i : 4 * i + 4]
        item = key_json(row)
        if "user_email" in row:
            item["user_email"] = row["user_email"]
        item["spend_this_period_usd"] = usd(int(ks or 0) + int(kx or 0))
        mine = {
            f.split("|", 1)[1]: int(n) for f, n in refused.items() if f.startswith(row["id"] + "|")
        }
        item["refused_this_period"] = dict(sorted(mine.items()))
        item["rate_usage"] = None
        if row["rpm"] is not None or row["tpm"] is not None:
            # the account's clock never goes back (policies/ratelimits.py): count from its stamp
            cutoff = max(int(now * 1000), int(last or 0)) - WINDOW_MS
            live = [m for m, at in logged if at > cutoff]
            item["rate_usage"] = {
                "requests": len(live),
                "tokens": sum(int(m.rsplit("|", 1)[1]) for m in live),
                "window_s": WINDOW_MS // 1000,
            }
        out.append(item)
    return out


async def _loaded(app: web.Application, account: str, now: float) -> None:
    if await app[S.REDIS].hget(rk.AccountKeys(account).state, "loaded") != "1":
        await app[S.ACCOUNTS].load(account, now)


async def revoke_keys(
    request: web.Request,
    conn: Any,
    rows: list[Any],
    actor_id: str | None,
    changes: AccountChanges,
    reason: str = "key.revoke",
) -> None:
    """Revoke these keys (rows with id, user_id, team_id) in PostgreSQL, inside the caller's
    transaction (``changing``); after its commit they leave every account's key set."""
    for row in rows:
        await conn.execute(
            "UPDATE api_keys SET revoked_at = $3, revoked_by = $2"
            " WHERE id = $1 AND revoked_at IS NULL",
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
    row = await _key_for(request, user, key_id, action="revoke")
    async with changing(request) as (conn, changes):
        await revoke_keys(request, conn, [row], user.id, changes)
    return json_response({"id": key_id, "revoked": True})
