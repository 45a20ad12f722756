"""Accounts and sessions: signup, login, logout, ``/api/me``.

Passwords are hashed with Argon2id (in a worker thread, off the event loop); session tokens are
256 random bits, stored only as SHA-256, and expire. Login is rate limited per account and per
client address against guessing.
"""

from __future__ import annotations

import asyncio
import functools
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from gateway import state as S
from gateway.api.common import (
    SESSION_COOKIE,
    current_user,
    email_field,
    json_response,
    read_body,
    session_token,
    text_field,
    token_hash,
    usd,
)
from gateway.auth import new_id, new_token
from gateway.csrf import secure_cookies
from gateway.errors import AuthenticationFailed, Conflict, InvalidRequest, RateLimited
from policies import keys as rk

routes = web.RouteTableDef()

# OWASP's minimum Argon2id parameters: 19 MiB, 2 passes.
_HASHER = PasswordHasher(time_cost=2, memory_cost=19_456, parallelism=1)
MIN_PASSWORD = 8
MAX_PASSWORD = 256
LOGIN_WINDOW_S = 300
LOGIN_MAX_FAILURES = 10


@functools.cache
def _dummy_hash() -> str:
    """A hash to verify against when the email is unknown, so timing does not tell."""
    return _HASHER.hash("not-a-password")


async def hash_password(password: str) -> str:
    return await asyncio.to_thread(_HASHER.hash, password)


async def verify_password(stored: str, password: str) -> bool:
    try:
        return await asyncio.to_thread(_HASHER.verify, stored, password)
    except (VerificationError, InvalidHashError):
        return False


def password_field(body: dict[str, Any]) -> str:
    value = body.get("password")
    if not isinstance(value, str) or not MIN_PASSWORD <= len(value) <= MAX_PASSWORD:
        raise InvalidRequest(
            f"'password' must be {MIN_PASSWORD} to {MAX_PASSWORD} characters", param="password"
        )
    return value


def user_json(row: Any) -> dict[str, Any]:
    return {
        "id": row["id"],
        "email": row["email"],
        "name": row["name"],
        "created_at": row["created_at"],
    }


@routes.post("/api/auth/signup")
async def signup(request: web.Request) -> web.Response:
    body = await read_body(request)
    email = email_field(body)
    password = password_field(body)
    name = text_field(body, "name", required=False) or email.split("@")[0][:100]
    password_hash = await hash_password(password)
    try:
        row = await request.app[S.DB].fetchrow(
            "INSERT INTO users (id, email, name, password_hash) VALUES ($1, $2, $3, $4) RETURNING *",
            new_id("usr"),
            email,
            name,
            password_hash,
        )
    except asyncpg.UniqueViolationError as exc:
        raise Conflict(
            "an account with this email exists already", code="email_taken", param="email"
        ) from exc
    return json_response({"user": user_json(row)}, status=201)


async def _throttle(request: web.Request, email: str) -> list[str]:
    redis = request.app[S.REDIS]
    buckets = [f"mb:login:email:{email.lower()}", f"mb:login:ip:{request.remote or '-'}"]
    counts = await redis.mget(buckets)
    if any(int(c or 0) >= LOGIN_MAX_FAILURES for c in counts):
        raise RateLimited(
            "too many failed logins; try again in a few minutes",
            headers={"Retry-After": str(LOGIN_WINDOW_S)},
        )
    return buckets


async def _record_failure(request: web.Request, buckets: list[str]) -> None:
    pipe = request.app[S.REDIS].pipeline(transaction=False)
    for bucket in buckets:
        pipe.incr(bucket)
        pipe.expire(bucket, LOGIN_WINDOW_S, nx=True)
    await pipe.execute()


@routes.post("/api/auth/login")
async def login(request: web.Request) -> web.Response:
    body = await read_body(request)
    email = email_field(body)
    password = body.get("password")
    if not isinstance(password, str) or len(password) > MAX_PASSWORD:
        raise InvalidRequest("'password' is required", param="password")
    buckets = await _throttle(request, email)
    db = request.app[S.DB]
    row = await db.fetchrow(
        "SELECT * FROM users WHERE lower(email) = lower($1) AND deleted_at IS NULL", email
    )
    ok = await verify_password(row["password_hash"] if row else _dummy_hash(), password)
    if row is None or not ok:
        await _record_failure(request, buckets)
        raise AuthenticationFailed("wrong email or password", code="invalid_credentials")
    token = new_token()
    ttl = request.app[S.CONFIG].server.session_ttl_s
    expires = datetime.now(UTC) + timedelta(seconds=ttl)
    await db.execute(
        "INSERT INTO sessions (token_hash, user_id, expires_at) VALUES ($1, $2, $3)",
        token_hash(token),
        row["id"],
        expires,
    )
    response = json_response({"token": token, "user": user_json(row), "expires_at": expires})
    response.set_cookie(
        SESSION_COOKIE,
        token,
        max_age=ttl,
        httponly=True,
        samesite="Lax",
        secure=secure_cookies(request),
        path="/",
    )
    return response


@routes.post("/api/auth/logout")
async def logout(request: web.Request) -> web.Response:
    token = session_token(request)
    if token:
        await request.app[S.DB].execute(
            "UPDATE sessions SET revoked_at = now() WHERE token_hash = $1 AND revoked_at IS NULL",
            token_hash(token),
        )
    response = json_response({"ok": True})
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


async def personal_balance(request: web.Request, user_id: str) -> int:
    """Credits left on the user's personal account (from Redis once loaded, else rebuilt)."""
    app = request.app
    account = rk.user_account(user_id)
    state = rk.AccountKeys(account).state
    loaded, credits = await app[S.REDIS].hmget(state, ["loaded", "credits"])
    if loaded != "1":
        await app[S.ACCOUNTS].load(account, app[S.CLOCK].now())
        credits = await app[S.REDIS].hget(state, "credits")
    return int(credits or 0)


@routes.get("/api/me")
async def me(request: web.Request) -> web.Response:
    user = await current_user(request)
    teams = await request.app[S.DB].fetch(
        "SELECT t.id, t.name, m.role, m.billing_mode FROM memberships m JOIN teams t ON t.id = m.team_id"
        " WHERE m.user_id = $1 AND m.removed_at IS NULL AND t.deleted_at IS NULL ORDER BY t.created_at",
        user.id,
    )
    balance = await personal_balance(request, user.id)
    return json_response(
        {
            "id": user.id,
            "email": user.email,
            "name": user.name,
            "balance_usd": usd(balance),
            "teams": [dict(t) for t in teams],
        }
    )
