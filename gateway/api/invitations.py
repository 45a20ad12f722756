"""Joining a team: invitations by email, the public invite link, and join requests.

Invitation and link tokens are :func:`gateway.credentials.new_token` (256 bits), stored only as
SHA-256.
An invitation is single use, expires (``expires_in_s``: 1 s to 30 days, default
``invitations.expires_in_s``) and can be revoked; it travels only in the mail (recorded in the
outbox, see :mod:`gateway.teams.mailer`). Accepting needs a logged-in user whose email matches the
invitation's, case-insensitively. A team has at most one enabled invite link; creating a new one
disables the old. Anyone logged in who holds the link can ask to join; owners and admins approve
or deny. Token guessing is rate limited per account and per client address, as logins are.
"""

from __future__ import annotations

import re
import unicodedata
from datetime import datetime, timedelta
from typing import Any

import asyncpg
from aiohttp import web

from gateway import state as S
from gateway.api import guessing
from gateway.api.common import (
    AuditEntry,
    User,
    audit,
    current_user,
    email_field,
    json_response,
    now_utc,
    read_body,
    token_hash,
)
from gateway.api.members import (
    add_member,
    check_fields,
    choice_field,
    lock_team,
    membership,
    path_id,
)
from gateway.api.teams import team_access
from gateway.credentials import new_id, new_token
from gateway.errors import Conflict, Forbidden, Gone, InvalidRequest, NotFound
from gateway.teams.mailer import Mail, Mailer
from policies.permissions import ASSIGNABLE_ROLES, MEMBER, Action

routes = web.RouteTableDef()

MAX_EXPIRES_S = 30 * 24 * 3600
_TOKEN = re.compile(r"[A-Za-z0-9_-]{16,128}")
_EMAIL_FORBIDDEN = set('<>()[],;:\\"')
JOIN_STATUSES = ("pending", "approved", "denied", "cancelled")


def token_param(request: web.Request) -> str | None:
    token = request.match_info["token"]
    return token if _TOKEN.fullmatch(token) else None


# --- invitations ----------------------------------------------------------------------------------
def invite_email(body: dict[str, Any]) -> str:
    email = email_field(body)
    if any(ch in _EMAIL_FORBIDDEN or unicodedata.category(ch)[0] in "CZ" for ch in email):
        raise InvalidRequest("'email' must be a plain email address", param="email")
    return email


def expires_field(body: dict[str, Any], default: int) -> int:
    value = body.get("expires_in_s")
    if value is None:
        return default
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_EXPIRES_S:
        raise InvalidRequest(
            f"'expires_in_s' must be an integer from 1 to {MAX_EXPIRES_S}", param="expires_in_s"
        )
    return value


def invitation_status(row: Any, now: datetime) -> str:
    if row["accepted_at"] is not None:
        return "accepted"
    if row["revoked_at"] is not None:
        return "revoked"
    return "expired" if row["expires_at"] <= now else "pending"


_INVITATIONS = (
    "SELECT i.*, u.email AS inviter_email, u.name AS inviter_name,"
    " (SELECT o.status FROM outbox o WHERE o.kind = 'invitation' AND o.ref_id = i.id"
    "  ORDER BY o.id DESC LIMIT 1) AS email_status"
    " FROM invitations i JOIN users u ON u.id = i.invited_by"
)

_BY_TOKEN = (
    "SELECT i.*, u.email AS inviter_email, u.name AS inviter_name, t.name AS team_name,"
    " t.deleted_at AS team_deleted_at FROM invitations i JOIN users u ON u.id = i.invited_by"
    " JOIN teams t ON t.id = i.team_id WHERE i.token_hash = $1"
)


def invitation_json(row: Any, now: datetime) -> dict[str, Any]:
    return {
        "id": row["id"],
        "team_id": row["team_id"],
        "email": row["email"],
        "role": row["role"],
        "status": invitation_status(row, now),
        "invited_by": {
            "id": row["invited_by"],
            "email": row["inviter_email"],
            "name": row["inviter_name"],
        },
        "created_at": row["created_at"],
        "expires_at": row["expires_at"],
        "accepted_at": row["accepted_at"],
        "revoked_at": row["revoked_at"],
        "email_status": row["email_status"],
    }


def invitation_mail(request: web.Request, row: Any, team: Any, inviter: User, token: str) -> Mail:
    url = f"{request.app[S.CONFIG].public_url}/invite/{token}"
    expires = row["expires_at"].strftime("%Y-%m-%d %H:%M UTC")
    body = (
        f'{inviter.name} ({inviter.email}) invited you to join the team "{team["name"]}" on'
        f" ModelBridge as {row['role']}.\n\n"
        f"Accept the invitation:\n{url}\n\n"
        f"Sign in or sign up with {row['email']} to accept. The link works once and expires on"
        f" {expires}.\nIf you did not expect this invitation, you can ignore this mail.\n"
    )
    subject = f"{inviter.name} invited you to {team['name']} on ModelBridge"
    return Mail(row["email"], subject, body, "invitation", row["id"], (token,))


@routes.post("/api/teams/{team}/invitations")
async def create_invitation(request: web.Request) -> web.Response:
    access = await team_access(request, Action.MANAGE_MEMBERS)
    body = await read_body(request)
    check_fields(body, ("email", "role", "expires_in_s"))
    email = invite_email(body)
    role = choice_field(body, "role", ASSIGNABLE_ROLES)
    expires_in = expires_field(body, request.app[S.CONFIG].invitations.expires_in_s)
    now = now_utc(request)
    token = new_token()
    app = request.app
    mailer = Mailer(app[S.CONFIG].smtp, app[S.DB], app[S.CLOCK].now)
    async with app[S.DB].acquire() as conn, conn.transaction():
        team = await lock_team(conn, access.team_id)
        if await conn.fetchval(
            "SELECT 1 FROM memberships m JOIN users u ON u.id = m.user_id WHERE m.team_id = $1"
            " AND m.removed_at IS NULL AND lower(u.email) = lower($2)",
            access.team_id,
            email,
        ):
            raise Conflict("this person is a member already", code="already_member", param="email")
        superseded = await conn.fetch(
            "UPDATE invitations SET revoked_at = $3, revoked_by = $4 WHERE team_id = $1"
            " AND lower(email) = lower($2) AND accepted_at IS NULL AND revoked_at IS NULL"
            " RETURNING id",
            access.team_id,
            email,
            now,
            access.user.id,
        )
        invitation_id = new_id("inv")
        row = await conn.fetchrow(
            "INSERT INTO invitations"
            " (id, team_id, email, role, token_hash, invited_by, created_at, expires_at)"
            " VALUES ($1, $2, $3, $4, $5, $6, $7, $8) RETURNING *",
            invitation_id,
            access.team_id,
            email,
            role,
            token_hash(token),
            access.user.id,
            now,
            now + timedelta(seconds=expires_in),
        )
        entry = AuditEntry(
            team_id=access.team_id,
            actor_id=access.user.id,
            action="invitation.create",
            target_type="invitation",
            target_id=invitation_id,
            after={
                "email": email,
                "role": role,
                "expires_at": row["expires_at"],
                "superseded": [r["id"] for r in superseded],
            },
        )
        await audit(conn, request, entry)
        queued = await mailer.record(conn, invitation_mail(request, row, team, access.user, token))
    email_status = await mailer.deliver(queued)
    inviter = {"inviter_email": access.user.email, "inviter_name": access.user.name}
    return json_response(
        invitation_json({**dict(row), **inviter, "email_status": email_status}, now), status=201
    )


@routes.get("/api/teams/{team}/invitations")
async def list_invitations(request: web.Request) -> web.Response:
    """Pending invitations; ``?status=all`` lists every one, newest first."""
    access = await team_access(request, Action.MANAGE_MEMBERS)
    wanted = request.query.get("status", "pending")
    if wanted not in ("pending", "all"):
        raise InvalidRequest("'status' must be pending or all", param="status")
    now = now_utc(request)
    rows = await request.app[S.DB].fetch(
        _INVITATIONS + " WHERE i.team_id = $1 AND ($2 OR (i.accepted_at IS NULL"
        " AND i.revoked_at IS NULL AND i.expires_at > $3)) ORDER BY i.created_at DESC, i.id",
        access.team_id,
        wanted == "all",
        now,
    )
    return json_response({"data": [invitation_json(r, now) for r in rows]})


@routes.delete("/api/teams/{team}/invitations/{invitation}")
async def revoke_invitation(request: web.Request) -> web.Response:
    access = await team_access(request, Action.MANAGE_MEMBERS)
    invitation_id = path_id(request, "invitation", "invitation_not_found")
    now = now_utc(request)
    async with request.app[S.DB].acquire() as conn, conn.transaction():
        await lock_team(conn, access.team_id)
        row = await conn.fetchrow(
            "SELECT * FROM invitations WHERE id = $1 AND team_id = $2 FOR UPDATE",
            invitation_id,
            access.team_id,
        )
        if row is None:
            raise NotFound("no such invitation", code="invitation_not_found")
        if row["accepted_at"] is not None or row["revoked_at"] is not None:
            raise Conflict(
                f"this invitation is {invitation_status(row, now)}", code="invitation_not_pending"
            )
        await conn.execute(
            "UPDATE invitations SET revoked_at = $2, revoked_by = $3 WHERE id = $1",
            invitation_id,
            now,
            access.user.id,
        )
        entry = AuditEntry(
            team_id=access.team_id,
            actor_id=access.user.id,
            action="invitation.revoke",
            target_type="invitation",
            target_id=invitation_id,
            before={"email": row["email"], "role": row["role"]},
        )
        await audit(conn, request, entry)
    full = await request.app[S.DB].fetchrow(_INVITATIONS + " WHERE i.id = $1", invitation_id)
    return json_response(invitation_json(full, now))


async def _invitation_by_token(request: web.Request, token: str | None) -> asyncpg.Record:
    row = None
    if token is not None:
        row = await request.app[S.DB].fetchrow(_BY_TOKEN, token_hash(token))
    if row is None:
        raise NotFound("no such invitation", code="invitation_not_found")
    if row["team_deleted_at"] is not None or invitation_status(row, now_utc(request)) != "pending":
        raise Gone("this invitation was used, revoked or has expired", code="invitation_not_valid")
    return row


@routes.get("/api/invitations/{token}")
async def view_invitation(request: web.Request) -> web.Response:
    """What the accept page shows; no login needed (the token is the credential)."""
    async with guessing.guarded(request, "invite", None, NotFound):
        row = await _invitation_by_token(request, token_param(request))
    return json_response(
        {
            "id": row["id"],
            "team": {"id": row["team_id"], "name": row["team_name"]},
            "role": row["role"],
            "email": row["email"],
            "invited_by": {"name": row["inviter_name"], "email": row["inviter_email"]},
            "expires_at": row["expires_at"],
            "status": "pending",
        }
    )


async def _accept(request: web.Request, user: User, token: str | None) -> dict[str, Any]:
    found = await _invitation_by_token(request, token)
    if found["email"].lower() != user.email.lower():
        raise Forbidden(
            "this invitation was sent to another email address",
            code="invitation_email_mismatch",
        )
    now = now_utc(request)
    async with request.app[S.DB].acquire() as conn, conn.transaction():
        team = await lock_team(conn, found["team_id"])
        row = await conn.fetchrow("SELECT * FROM invitations WHERE id = $1 FOR UPDATE", found["id"])
        if invitation_status(row, now) != "pending":
            raise Gone(
                "this invitation was used, revoked or has expired", code="invitation_not_valid"
            )
        member = await add_member(
            conn, request, team["id"], user.id, row["role"], actor_id=user.id, via="invitation"
        )
        await conn.execute(
            "UPDATE invitations SET accepted_at = $2, accepted_by = $3 WHERE id = $1",
            row["id"],
            now,
            user.id,
        )
        entry = AuditEntry(
            team_id=team["id"],
            actor_id=user.id,
            action="invitation.accept",
            target_type="invitation",
            target_id=row["id"],
            after={"user_id": user.id, "role": row["role"]},
        )
        await audit(conn, request, entry)
    return {
        "team": {"id": team["id"], "name": team["name"]},
        "user_id": user.id,
        "role": member["role"],
        "joined_at": member["joined_at"],
    }


@routes.post("/api/invitations/{token}/accept")
async def accept_invitation(request: web.Request) -> web.Response:
    user = await current_user(request)
    async with guessing.guarded(request, "invite", user.id, NotFound, Forbidden):
        result = await _accept(request, user, token_param(request))
    return json_response(result)


# --- the public invite link -----------------------------------------------------------------------
@routes.post("/api/teams/{team}/invite-link")
async def create_invite_link(request: web.Request) -> web.Response:
    """A new link each time; the previous one stops working."""
    access = await team_access(request, Action.MANAGE_MEMBERS)
    token = new_token()
    link_id = new_id("lnk")
    async with request.app[S.DB].acquire() as conn, conn.transaction():
        await lock_team(conn, access.team_id)
        old = await conn.fetch(
            "UPDATE invite_links SET disabled_at = $3, disabled_by = $2"
            " WHERE team_id = $1 AND disabled_at IS NULL RETURNING id",
            access.team_id,
            access.user.id,
            now_utc(request),
        )
        row = await conn.fetchrow(
            "INSERT INTO invite_links (id, team_id, token_hash, created_by) VALUES ($1, $2, $3, $4)"
            " RETURNING *",
            link_id,
            access.team_id,
            token_hash(token),
            access.user.id,
        )
        entry = AuditEntry(
            team_id=access.team_id,
            actor_id=access.user.id,
            action="invite_link.create",
            target_type="invite_link",
            target_id=link_id,
            after={"replaced": [r["id"] for r in old]},
        )
        await audit(conn, request, entry)
    url = f"{request.app[S.CONFIG].public_url}/join/{token}"
    return json_response(
        {"id": link_id, "url": url, "token": token, "created_at": row["created_at"]}, status=201
    )


@routes.get("/api/teams/{team}/invite-link")
async def get_invite_link(request: web.Request) -> web.Response:
    """Whether a link is enabled (its token is never shown again: create a new one)."""
    access = await team_access(request, Action.MANAGE_MEMBERS)
    row = await request.app[S.DB].fetchrow(
        "SELECT id, created_at, created_by FROM invite_links"
        " WHERE team_id = $1 AND disabled_at IS NULL",
        access.team_id,
    )
    return json_response({"enabled": row is not None, **(dict(row) if row else {})})


@routes.delete("/api/teams/{team}/invite-link")
async def delete_invite_link(request: web.Request) -> web.Response:
    access = await team_access(request, Action.MANAGE_MEMBERS)
    async with request.app[S.DB].acquire() as conn, conn.transaction():
        await lock_team(conn, access.team_id)
        old = await conn.fetch(
            "UPDATE invite_links SET disabled_at = $3, disabled_by = $2"
            " WHERE team_id = $1 AND disabled_at IS NULL RETURNING id",
            access.team_id,
            access.user.id,
            now_utc(request),
        )
        if old:
            entry = AuditEntry(
                team_id=access.team_id,
                actor_id=access.user.id,
                action="invite_link.disable",
                target_type="invite_link",
                target_id=old[0]["id"],
            )
            await audit(conn, request, entry)
    return json_response({"enabled": False})


# --- join requests --------------------------------------------------------------------------------
_JOIN_REQUESTS = (
    "SELECT r.*, u.email, u.name, t.name AS team_name FROM join_requests r"
    " JOIN users u ON u.id = r.user_id JOIN teams t ON t.id = r.team_id"
)


def join_request_json(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "team_id": row["team_id"],
        "team_name": row["team_name"],
        "user_id": row["user_id"],
        "email": row["email"],
        "name": row["name"],
        "status": row["status"],
        "created_at": row["created_at"],
        "decided_at": row["decided_at"],
        "decided_by": row["decided_by"],
    }


async def _join(request: web.Request, user: User, token: str | None) -> tuple[str, bool]:
    db = request.app[S.DB]
    link = None
    if token is not None:
        link = await db.fetchrow(
            "SELECT l.*, t.deleted_at AS team_deleted_at FROM invite_links l"
            " JOIN teams t ON t.id = l.team_id WHERE l.token_hash = $1",
            token_hash(token),
        )
    if link is None:
        raise NotFound("no such invite link", code="invite_link_not_found")
    gone = Gone("this invite link was disabled", code="invite_link_not_valid")
    if link["disabled_at"] is not None or link["team_deleted_at"] is not None:
        raise gone
    async with db.acquire() as conn, conn.transaction():
        await lock_team(conn, link["team_id"])
        if await conn.fetchval(
            "SELECT disabled_at IS NOT NULL FROM invite_links WHERE id = $1", link["id"]
        ):
            raise gone
        if await membership(conn, link["team_id"], user.id) is not None:
            raise Conflict("you are a member of this team already", code="already_member")
        pending = await conn.fetchval(
            "SELECT id FROM join_requests"
            " WHERE team_id = $1 AND user_id = $2 AND status = 'pending'",
            link["team_id"],
            user.id,
        )
        if pending is not None:
            return pending, False
        request_id = new_id("jrq")
        await conn.execute(
            "INSERT INTO join_requests (id, team_id, user_id, link_id) VALUES ($1, $2, $3, $4)",
            request_id,
            link["team_id"],
            user.id,
            link["id"],
        )
        entry = AuditEntry(
            team_id=link["team_id"],
            actor_id=user.id,
            action="join_request.create",
            target_type="join_request",
            target_id=request_id,
        )
        await audit(conn, request, entry)
    return request_id, True


@routes.post("/api/join/{token}")
async def join(request: web.Request) -> web.Response:
    """Ask to join through a team's invite link; asking again returns the same request."""
    user = await current_user(request)
    async with guessing.guarded(request, "join", user.id, NotFound):
        request_id, created = await _join(request, user, token_param(request))
    row = await request.app[S.DB].fetchrow(_JOIN_REQUESTS + " WHERE r.id = $1", request_id)
    return json_response(join_request_json(row), status=201 if created else 200)


@routes.get("/api/teams/{team}/join-requests")
async def list_join_requests(request: web.Request) -> web.Response:
    """Pending requests, oldest first; ``?status=`` approved | denied | cancelled | all."""
    access = await team_access(request, Action.MANAGE_MEMBERS)
    wanted = request.query.get("status", "pending")
    if wanted not in (*JOIN_STATUSES, "all"):
        raise InvalidRequest(
            f"'status' must be one of: {', '.join(JOIN_STATUSES)}, all", param="status"
        )
    rows = await request.app[S.DB].fetch(
        _JOIN_REQUESTS + " WHERE r.team_id = $1 AND ($2 = 'all' OR r.status = $2)"
        " ORDER BY r.created_at, r.id",
        access.team_id,
        wanted,
    )
    return json_response({"data": [join_request_json(r) for r in rows]})


async def _decide(request: web.Request, approve: bool) -> web.Response:
    access = await team_access(request, Action.MANAGE_MEMBERS)
    request_id = path_id(request, "request", "join_request_not_found")
    status = "approved" if approve else "denied"
    async with request.app[S.DB].acquire() as conn, conn.transaction():
        await lock_team(conn, access.team_id)
        row = await conn.fetchrow(
            "SELECT * FROM join_requests WHERE id = $1 AND team_id = $2 FOR UPDATE",
            request_id,
            access.team_id,
        )
        if row is None:
            raise NotFound("no such join request", code="join_request_not_found")
        if row["status"] != "pending":
            raise Conflict(
                f"this request was {row['status']} already", code="join_request_not_pending"
            )
        await conn.execute(
            "UPDATE join_requests SET status = $2, decided_at = $4, decided_by = $3 WHERE id = $1",
            request_id,
            status,
            access.user.id,
            now_utc(request),
        )
        if approve:
            await add_member(
                conn,
                request,
                access.team_id,
                row["user_id"],
                MEMBER,
                actor_id=access.user.id,
                via="join_request",
            )
        entry = AuditEntry(
            team_id=access.team_id,
            actor_id=access.user.id,
            action=f"join_request.{'approve' if approve else 'deny'}",
            target_type="join_request",
            target_id=request_id,
            before={"status": "pending"},
            after={"status": status, "user_id": row["user_id"]},
        )
        await audit(conn, request, entry)
    full = await request.app[S.DB].fetchrow(_JOIN_REQUESTS + " WHERE r.id = $1", request_id)
    return json_response(join_request_json(full))


@routes.post("/api/teams/{team}/join-requests/{request}/approve")
async def approve_join_request(request: web.Request) -> web.Response:
    return await _decide(request, approve=True)


@routes.post("/api/teams/{team}/join-requests/{request}/deny")
async def deny_join_request(request: web.Request) -> web.Response:
    return await _decide(request, approve=False)
