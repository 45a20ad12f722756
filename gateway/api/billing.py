"""How a team is funded and limited: its settings (``PATCH /api/teams/{team}``), billing view,
subscription, and alert webhooks.

Roles (policies/permissions.py, through ``team_access``): each PATCH field needs its own action —
name, default member limit, enforcement, model restrictions and the rate limits (``rpm_limit``,
``tpm_limit``) are policies (owner, admin), the spending limit is billing (owner). Billing is
viewed by owners and admins, changed by the owner.
Webhooks are managed by owners and admins.

Every change writes PostgreSQL and the audit log in one transaction that holds the team's account
lock, then brings the account's Redis state along (gateway.teams.billing for what crosses accounts).
"""

from __future__ import annotations

import unicodedata
from datetime import UTC, datetime
from typing import Any

import orjson
from aiohttp import web
from yarl import URL

from gateway import state as S
from gateway.api.common import (
    MAX_RPM,
    MAX_TPM,
    AuditEntry,
    audit,
    changing,
    count_field,
    id_param,
    json_response,
    money_field,
    now_utc,
    read_body,
    text_field,
    usd,
)
from gateway.api.members import lock_team
from gateway.api.teams import TeamAccess, account_money, overview, team_access
from gateway.credentials import new_id
from gateway.errors import Conflict, InvalidRequest, NotFound
from gateway.teams.alerts import WebhookGuard, new_secret, shown_status
from gateway.teams.billing import change_subscription, renew
from policies import keyspace as rk
from policies.limits import ENFORCEMENTS
from policies.periods import period_bounds, period_of
from policies.permissions import Action
from policies.subscriptions import MAX_SEATS

routes = web.RouteTableDef()

#: PATCH field -> (teams column, the action it needs)
SETTINGS: dict[str, tuple[str, Action]] = {
    "name": ("name", Action.MANAGE_POLICIES),
    "default_member_limit_usd": ("default_member_limit", Action.MANAGE_POLICIES),
    "default_enforcement": ("default_enforcement", Action.MANAGE_POLICIES),
    "model_restrictions": ("model_restrictions", Action.MANAGE_POLICIES),
    "spending_limit_usd": ("spending_limit", Action.MANAGE_BILLING),
    "rpm_limit": ("rpm_limit", Action.MANAGE_POLICIES),
    "tpm_limit": ("tpm_limit", Action.MANAGE_POLICIES),
}
MAX_MODEL_NAME = 100
MAX_RESTRICTIONS = 500
MAX_WEBHOOKS = 10
MAX_URL = 2048
HISTORY_ROWS = 200


# --- settings -----------------------------------------------------------------------------------
def model_names(body: dict[str, Any], name: str = "model_restrictions") -> list[str]:
    """A list of model names to block. Names need not be configured yet: a team may pre-block a
    model the operator adds later. ``null`` clears the list. Order kept, duplicates dropped."""
    value = body.get(name)
    if value is None:
        return []
    if not isinstance(value, list):
        raise InvalidRequest(f"'{name}' must be an array of model names", param=name)
    if len(value) > MAX_RESTRICTIONS:
        raise InvalidRequest(f"'{name}' takes at most {MAX_RESTRICTIONS} names", param=name)
    names: list[str] = []
    for item in value:
        if not isinstance(item, str) or not item.strip() or len(item) > MAX_MODEL_NAME:
            raise InvalidRequest(
                f"each of '{name}' must be a model name of 1 to {MAX_MODEL_NAME} characters",
                param=name,
            )
        if item != item.strip() or any(unicodedata.category(ch)[0] == "C" for ch in item):
            raise InvalidRequest(
                f"model names in '{name}' have no control characters or outer spaces", param=name
            )
        names.append(item)
    return list(dict.fromkeys(names))


def parse_settings(body: dict[str, Any]) -> dict[str, Any]:
    """Validated PATCH body -> {teams column: new value}."""
    columns: dict[str, Any] = {}
    for field in body:
        if field not in SETTINGS:
            raise InvalidRequest(f"'{field}' cannot be changed here", param=field)
    if "name" in body:
        columns["name"] = text_field(body, "name")
    for field in ("spending_limit_usd", "default_member_limit_usd"):
        if field in body:
            columns[SETTINGS[field][0]] = money_field(body, field, nullable=True)
    if "default_enforcement" in body:
        value = body["default_enforcement"]
        if value not in ENFORCEMENTS:
            raise InvalidRequest(
                "'default_enforcement' must be 'hard' or 'soft'", param="default_enforcement"
            )
        columns["default_enforcement"] = value
    if "model_restrictions" in body:
        columns["model_restrictions"] = model_names(body)
    if "rpm_limit" in body:
        columns["rpm_limit"] = count_field(body, "rpm_limit", maximum=MAX_RPM)
    if "tpm_limit" in body:
        columns["tpm_limit"] = count_field(body, "tpm_limit", maximum=MAX_TPM)
    return columns


def settings_json(team: Any, columns: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for field, (column, _) in SETTINGS.items():
        if column in columns:
            value = team[column]
            out[field] = usd(value) if field.endswith("_usd") else value
            if column == "model_restrictions":
                out[field] = list(value)
    return out


@routes.patch("/api/teams/{team}")
async def update_team(request: web.Request) -> web.Response:
    access = await team_access(request, Action.VIEW_TEAM)
    body = await read_body(request)
    for action in sorted({SETTINGS[f][1] for f in body if f in SETTINGS}):
        access = await team_access(request, action)
    columns = parse_settings(body)
    if not columns:
        return json_response(await overview(request, access))
    async with changing(request) as (conn, changes):
        before = await lock_team(conn, access.team_id)
        sets = ", ".join(f"{column} = ${i + 2}" for i, column in enumerate(columns))
        after = await conn.fetchrow(
            f"UPDATE teams SET {sets} WHERE id = $1 RETURNING *", access.team_id, *columns.values()
        )
        changed = [c for c in columns if before[c] != after[c]]
        if changed:
            entry = AuditEntry(
                team_id=access.team_id,
                actor_id=access.user.id,
                action="team.update",
                target_type="team",
                target_id=access.team_id,
                before=settings_json(before, changed),
                after=settings_json(after, changed),
            )
            await audit(conn, request, entry)
        if set(changed) - {"name"}:
            changes.teams.add(access.team_id)
    updated = TeamAccess(access.user, {**dict(after), "role": access.role}, access.role)
    return json_response(await overview(request, updated))


# --- billing ------------------------------------------------------------------------------------
async def billing_json(request: web.Request, team: Any) -> dict[str, Any]:
    app = request.app
    team_id = str(team["id"])
    period = period_of(app[S.CLOCK].now())
    async with app[S.DB].acquire() as conn:
        await renew(conn, app[S.CONFIG], period, team_id=team_id)
        invoices = await conn.fetch(
            "SELECT * FROM invoices WHERE team_id = $1 ORDER BY id DESC LIMIT $2",
            team_id,
            HISTORY_ROWS,
        )
        ledger = await conn.fetch(
            "SELECT * FROM ledger WHERE account = $1 ORDER BY id DESC LIMIT $2",
            rk.team_account(team_id),
            HISTORY_ROWS,
        )
    money = await account_money(app, rk.team_account(team_id))
    spec = app[S.CONFIG].plans.get(team["plan"] or "")
    return {
        "team_id": team_id,
        "period": period,
        "period_ends_at": datetime.fromtimestamp(period_bounds(period)[1], UTC),
        "plan": team["plan"],
        "seats": team["seats"],
        "seat_price_usd": usd(spec.seat_price) if spec else None,
        "included_usage_per_seat_usd": usd(spec.included_usage_per_seat) if spec else None,
        "next_period_allowance_usd": usd(
            app[S.ACCOUNTS].subscription_allowance(team["plan"], team["seats"])
        ),
        "allowance_usd": usd(money["allowance"]),
        "allowance_used_usd": usd(money["allowance"] - money["allowance_left"]),
        "allowance_left_usd": usd(money["allowance_left"]),
        "credits_usd": usd(money["credits"]),
        "balance_usd": usd(money["balance"]),
        "holds_usd": usd(money["holds"]),
        "spend_this_period_usd": usd(money["spend"]),
        "requests_this_period": money["requests"],
        "spending_limit_usd": usd(team["spending_limit"]),
        "discount_bps": team["discount_bps"],
        "invoices": [
            {
                "id": r["id"],
                "period": r["period"],
                "kind": r["kind"],
                "plan": r["plan"],
                "seats": r["seats"],
                "amount_usd": usd(r["amount"]),
                "note": r["note"],
                "created_at": r["created_at"],
            }
            for r in invoices
        ],
        "credit_history": [
            {
                "id": r["id"],
                "kind": r["kind"],
                "period": r["period"],
                "amount_usd": usd(r["amount"]),
                "note": r["note"],
                "actor": r["actor"],
                "created_at": r["created_at"],
            }
            for r in ledger
        ],
    }


@routes.get("/api/teams/{team}/billing")
async def get_billing(request: web.Request) -> web.Response:
    access = await team_access(request, Action.VIEW_BILLING)
    return json_response(await billing_json(request, access.team))


def subscription_fields(request: web.Request, body: dict[str, Any]) -> tuple[str | None, int]:
    plans = request.app[S.CONFIG].plans
    if "plan" not in body:
        raise InvalidRequest("'plan' is required (null cancels the subscription)", param="plan")
    plan = body["plan"]
    if plan is not None and (not isinstance(plan, str) or plan not in plans):
        names = ", ".join(sorted(plans)) or "none configured"
        raise InvalidRequest(f"'plan' must be one of: {names}; or null", param="plan")
    seats = body.get("seats", 0 if plan is None else None)
    if not isinstance(seats, int) or isinstance(seats, bool):
        raise InvalidRequest("'seats' must be an integer", param="seats")
    low = 0 if plan is None else 1
    high = 0 if plan is None else MAX_SEATS
    if not low <= seats <= high:
        raise InvalidRequest(
            f"'seats' must be from {low} to {high}" if plan else "'seats' must be 0 without a plan",
            param="seats",
        )
    return plan, seats


@routes.put("/api/teams/{team}/subscription")
async def put_subscription(request: web.Request) -> web.Response:
    access = await team_access(request, Action.MANAGE_BILLING)
    plan, seats = subscription_fields(request, await read_body(request))
    app = request.app
    async with changing(request) as (conn, changes):
        team = await lock_team(conn, access.team_id)
        result = await change_subscription(
            app[S.CONFIG],
            conn,
            team,
            plan,
            seats,
            actor_id=access.user.id,
            now=app[S.CLOCK].now(),
        )
        changes.subscriptions.add((access.team_id, result.period))
        entry = AuditEntry(
            team_id=access.team_id,
            actor_id=access.user.id,
            action="subscription.change",
            target_type="team",
            target_id=access.team_id,
            before={"plan": team["plan"], "seats": team["seats"]},
            after={
                "plan": plan,
                "seats": seats,
                "period": result.period,
                "allowance_added_usd": usd(result.change.allowance_delta),
                "invoiced_usd": usd(result.change.invoice_amount),
            },
        )
        await audit(conn, request, entry)
        team = await conn.fetchrow("SELECT * FROM teams WHERE id = $1", access.team_id)
    return json_response(await billing_json(request, team))


# --- webhooks -----------------------------------------------------------------------------------
def url_field(body: dict[str, Any], name: str = "url") -> str:
    value = body.get(name)
    if not isinstance(value, str) or not value or len(value) > MAX_URL:
        raise InvalidRequest(f"'{name}' must be a URL of at most {MAX_URL} characters", param=name)
    try:
        url = URL(value)
    except (ValueError, TypeError) as exc:
        raise InvalidRequest(f"'{name}' is not a valid URL", param=name) from exc
    if url.scheme not in ("http", "https") or not url.host or url.fragment:
        raise InvalidRequest(f"'{name}' must be an http(s) URL with a host", param=name)
    return value


async def webhook_url_field(guard: WebhookGuard, body: dict[str, Any], name: str = "url") -> str:
    """A webhook URL whose host resolves to public addresses only (unless the operator allows
    private ones). Refused and unresolvable hosts get one answer: no oracle of the inside."""
    value = url_field(body, name)
    try:
        await guard.check_url(value)
    except (OSError, ValueError) as exc:
        raise InvalidRequest(
            f"'{name}' must resolve to a public address", param=name, code="url_not_allowed"
        ) from exc
    return value


def webhook_json(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "team_id": row["team_id"],
        "url": row["url"],
        "created_by": row["created_by"],
        "created_at": row["created_at"],
    }


@routes.post("/api/teams/{team}/webhooks")
async def create_webhook(request: web.Request) -> web.Response:
    access = await team_access(request, Action.MANAGE_POLICIES)
    url = await webhook_url_field(request.app[S.WEBHOOKS], await read_body(request))
    async with request.app[S.DB].acquire() as conn, conn.transaction():
        await lock_team(conn, access.team_id)
        active = await conn.fetchval(
            "SELECT count(*) FROM webhooks WHERE team_id = $1 AND deleted_at IS NULL",
            access.team_id,
        )
        if active >= MAX_WEBHOOKS:
            raise Conflict(f"a team has at most {MAX_WEBHOOKS} webhooks", code="too_many_webhooks")
        secret = await conn.fetchval(
            "INSERT INTO webhook_secrets (team_id, secret) VALUES ($1, $2)"
            " ON CONFLICT (team_id) DO UPDATE SET team_id = EXCLUDED.team_id RETURNING secret",
            access.team_id,
            new_secret(),
        )
        row = await conn.fetchrow(
            "INSERT INTO webhooks (id, team_id, url, created_by) VALUES ($1, $2, $3, $4)"
            " RETURNING *",
            new_id("wh"),
            access.team_id,
            url,
            access.user.id,
        )
        entry = AuditEntry(
            team_id=access.team_id,
            actor_id=access.user.id,
            action="webhook.create",
            target_type="webhook",
            target_id=row["id"],
            after={"url": url},
        )
        await audit(conn, request, entry)
    return json_response({**webhook_json(row), "signing_secret": secret}, status=201)


@routes.get("/api/teams/{team}/webhooks")
async def list_webhooks(request: web.Request) -> web.Response:
    access = await team_access(request, Action.MANAGE_POLICIES)
    rows = await request.app[S.DB].fetch(
        "SELECT * FROM webhooks WHERE team_id = $1 AND deleted_at IS NULL ORDER BY created_at, id",
        access.team_id,
    )
    return json_response({"data": [webhook_json(r) for r in rows]})


@routes.delete("/api/teams/{team}/webhooks/{webhook}")
async def delete_webhook(request: web.Request) -> web.Response:
    access = await team_access(request, Action.MANAGE_POLICIES)
    webhook_id = id_param(request, "webhook")
    async with request.app[S.DB].acquire() as conn, conn.transaction():
        row = await conn.fetchrow(
            "UPDATE webhooks SET deleted_at = $4, deleted_by = $3"
            " WHERE id = $1 AND team_id = $2 AND deleted_at IS NULL RETURNING *",
            webhook_id,
            access.team_id,
            access.user.id,
            now_utc(request),
        )
        if row is None:
            raise NotFound("no such webhook", code="webhook_not_found")
        entry = AuditEntry(
            team_id=access.team_id,
            actor_id=access.user.id,
            action="webhook.delete",
            target_type="webhook",
            target_id=webhook_id,
            before={"url": row["url"]},
        )
        await audit(conn, request, entry)
    return json_response({"id": webhook_id, "deleted": True})


def delivery_json(d: dict[str, Any]) -> dict[str, Any]:
    """A delivery as admins see it: a short status, never the text of an error."""
    status = shown_status(d["delivered_at"] is not None, d["last_status"], d["last_error"])
    keep = ("webhook_id", "attempts", "delivered_at", "failed_at")
    return {**{k: d[k] for k in keep}, "status": status}


@routes.get("/api/teams/{team}/alerts")
async def list_alerts(request: web.Request) -> web.Response:
    """The team's recent alert events and how their deliveries went."""
    access = await team_access(request, Action.MANAGE_POLICIES)
    rows = await request.app[S.DB].fetch(
        "SELECT e.id, e.type, e.user_id, e.period, e.threshold, e.limit_amount, e.created_at,"
        " coalesce(json_agg(json_build_object('webhook_id', d.webhook_id, 'attempts', d.attempts,"
        " 'delivered_at', d.delivered_at, 'failed_at', d.failed_at, 'last_status', d.last_status,"
        " 'last_error', d.last_error) ORDER BY d.id) FILTER (WHERE d.id IS NOT NULL), '[]')::text"
        " AS deliveries FROM alert_events e LEFT JOIN alert_deliveries d ON d.event_id = e.id"
        " WHERE e.team_id = $1 GROUP BY e.id ORDER BY e.created_at DESC LIMIT $2",
        access.team_id,
        HISTORY_ROWS,
    )
    return json_response(
        {
            "data": [
                {
                    "id": r["id"],
                    "type": r["type"],
                    "user_id": r["user_id"] or None,
                    "period": r["period"],
                    "threshold": r["threshold"],
                    "limit_usd": usd(r["limit_amount"]),
                    "created_at": r["created_at"],
                    "deliveries": [delivery_json(d) for d in orjson.loads(r["deliveries"])],
                }
                for r in rows
            ]
        }
    )
