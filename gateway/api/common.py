"""What every management handler shares: JSON in and out, the session's user, field
validation with the field named in ``error.param``, and the audit log."""

from __future__ import annotations

import hashlib
import re
import unicodedata
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import asyncpg
import orjson
from aiohttp import web

from gateway import state as S
from gateway.credentials import bearer, secret_bytes
from gateway.errors import AuthenticationFailed, InvalidRequest, NotFound
from gateway.infra import bodies
from gateway.metering.changes import AccountChanges, Outbox
from policies import forwarded
from policies.money import MoneyError, format_usd, parse_usd

SESSION_COOKIE = "mb_session"
_EMAIL = re.compile(r"^[^@\s]{1,64}@[^@\s]{1,255}\.[^@\s]{1,63}$")
MAX_NAME = 100


def json_response(
    body: object, status: int = 200, headers: dict[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=orjson.dumps(body, default=_default),
        status=status,
        content_type="application/json",
        headers=headers,
    )


def _default(value: object) -> object:
    if isinstance(value, datetime):
        return value.isoformat()
    raise TypeError


async def read_body(request: web.Request) -> dict[str, Any]:
    server = request.app[S.CONFIG].server
    raw = await bodies.read_body(request, server.max_body_bytes, server.request_read_timeout_s)
    return bodies.decode_json(raw) if raw else {}


@dataclass(frozen=True, slots=True)
class User:
    id: str
    email: str
    name: str


def client_address(request: web.Request) -> str:
    """The caller's address: the peer, or through ``server.trusted_proxies`` the rightmost
    untrusted hop of ``X-Forwarded-For`` (:mod:`policies.forwarded`)."""
    trusted = forwarded.networks(request.app[S.CONFIG].server.trusted_proxies)
    return forwarded.client_address(
        request.remote, request.headers.getall("X-Forwarded-For", ()), trusted
    )


def session_token(request: web.Request) -> str | None:
    return bearer(request) or request.cookies.get(SESSION_COOKIE)


def now_utc(request: web.Request) -> datetime:
    """The app's clock (``state.Clock``) as a timestamp for PostgreSQL: every time the management
    API records or compares comes from it, never from the database's ``now()``."""
    return datetime.fromtimestamp(request.app[S.CLOCK].now(), UTC)


def token_hash(token: str) -> bytes:
    return hashlib.sha256(secret_bytes(token)).digest()


async def current_user(request: web.Request) -> User:
    token = session_token(request)
    if not token:
        raise AuthenticationFailed("log in first", code="unauthenticated")
    row = await request.app[S.DB].fetchrow(
        "SELECT u.id, u.email, u.name FROM sessions s JOIN users u ON u.id = s.user_id"
        " WHERE s.token_hash = $1 AND s.revoked_at IS NULL AND s.expires_at > $2"
        " AND u.deleted_at IS NULL",
        token_hash(token),
        now_utc(request),
    )
    if row is None:
        raise AuthenticationFailed(
            "session expired or invalid; log in again", code="unauthenticated"
        )
    return User(row["id"], row["email"], row["name"])


@asynccontextmanager
async def changing(
    request: web.Request,
) -> AsyncIterator[tuple[asyncpg.Connection, AccountChanges]]:
    """A management transaction that changes accounts' live state. The body notes in the
    :class:`AccountChanges` what it changed; the note is recorded in the outbox as the
    transaction's last statement, and written to Redis once it committed (a failure there is
    logged and left to the outbox sweep: the committed change stands). A rolled-back
    transaction writes nothing anywhere."""
    app = request.app
    changes = AccountChanges()
    async with app[S.DB].acquire() as conn, conn.transaction():
        yield conn, changes
        await changes.record(conn, app[S.CLOCK].now())
    await Outbox(app[S.ACCOUNTS], app[S.CLOCK].now).deliver(changes)


# --- field validation ---------------------------------------------------------------------------
def text_field(
    body: dict[str, Any], name: str, *, max_len: int = MAX_NAME, required: bool = True
) -> str | None:
    value = body.get(name)
    if value is None:
        if required:
            raise InvalidRequest(f"'{name}' is required", param=name)
        return None
    if not isinstance(value, str):
        raise InvalidRequest(f"'{name}' must be a string", param=name)
    value = unicodedata.normalize("NFC", value).strip()
    if not value:
        raise InvalidRequest(f"'{name}' must not be empty", param=name)
    if len(value) > max_len:
        raise InvalidRequest(f"'{name}' must be at most {max_len} characters", param=name)
    if any(unicodedata.category(ch) in ("Cc", "Cf", "Zl", "Zp") for ch in value):
        raise InvalidRequest(f"'{name}' must not contain control characters", param=name)
    return value


def email_field(body: dict[str, Any], name: str = "email") -> str:
    value = body.get(name)
    if not isinstance(value, str) or not _EMAIL.match(value.strip()) or len(value) > 320:
        raise InvalidRequest(f"'{name}' must be an email address", param=name)
    return value.strip()


def money_field(
    body: dict[str, Any], name: str, *, nullable: bool = False, allow_negative: bool = False
) -> int | None:
    value = body.get(name)
    if value is None:
        if nullable:
            return None
        raise InvalidRequest(f"'{name}' is required", param=name)
    try:
        return parse_usd(value, allow_negative=allow_negative)
    except MoneyError as exc:
        raise InvalidRequest(f"'{name}': {exc}", param=name) from exc


#: the largest rate limits accepted (rpm is a PostgreSQL integer)
MAX_RPM = 1_000_000_000
MAX_TPM = 10**15


def count_field(body: dict[str, Any], name: str, *, maximum: int) -> int | None:
    """A whole number >= 0 (``null``: none), e.g. a rate limit; floats and strings are refused."""
    value = body.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidRequest(f"'{name}' must be a whole number or null", param=name)
    if value < 0 or value > maximum:
        raise InvalidRequest(f"'{name}' must be between 0 and {maximum}", param=name)
    return value


def id_param(request: web.Request, name: str) -> str:
    value = request.match_info[name]
    if not re.fullmatch(r"[a-z]{2,4}_[0-9a-f]{20}", value):
        raise NotFound(f"no such {name}", code=f"{name}_not_found")
    return value


def usd(nanos: int | None) -> str | None:
    return None if nanos is None else format_usd(nanos)


# --- audit ---------------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class AuditEntry:
    """One row of the audit log: ``actor_id`` did ``action`` to a target, in ``team_id``, with
    what the target was before and is after (JSON values, only the fields that changed)."""

    team_id: str | None
    actor_id: str | None  # a user id, or "operator"
    action: str
    target_type: str = ""
    target_id: str = ""
    before: object = None
    after: object = None


async def audit(conn: asyncpg.Connection, request: web.Request, entry: AuditEntry) -> None:
    """Record ``entry`` in the caller's transaction, with the request's id."""
    await conn.execute(
        "INSERT INTO audit_log (team_id, actor_id, action, target_type, target_id, before, after,"
        " request_id) VALUES ($1, $2, $3, $4, $5, $6::jsonb, $7::jsonb, $8)",
        entry.team_id,
        entry.actor_id,
        entry.action,
        entry.target_type,
        entry.target_id,
        None if entry.before is None else orjson.dumps(entry.before, default=_default).decode(),
        None if entry.after is None else orjson.dumps(entry.after, default=_default).decode(),
        request.get(S.REQUEST_ID, ""),
    )
