"""Accounts and sessions: signup, login, logout, ``/api/me``.

Passwords are hashed with Argon2id (in a worker thread, off the event loop); session tokens are
256 random bits, stored only as SHA-256, and expire. Login attempts are limited against guessing
per account and client address, per account (the account found, so that case folding cannot
multiply the guesses) and per address; signups per address (:mod:`gateway.api.guessing`).
"""

from __future__ import annotations

import asyncio
import functools
from datetime import timedelta
from typing import Any

import asyncpg
from aiohttp import web
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

from gateway import state as S
from gateway.api import guessing
from gateway.api.common import (
    SESSION_COOKIE,
    current_user,
    email_field,
    json_response,
    now_utc,
    read_body,
    session_token,
    text_field,
    token_hash,
    usd,
)
from gateway.api.csrf import secure_cookies
from gateway.api.teams import account_money, user_teams
from gateway.credentials import new_id, new_token
from gateway.errors import AuthenticationFailed, Conflict, InvalidRequest
from policies import guessing as rules
from policies import keyspace as rk

routes = web.RouteTableDef()

# OWASP's minimum Argon2id parameters: 19 MiB, 2 passes.
_HASHER = PasswordHasher(time_cost=2, memory_cost=19_456, parallelism=1)
MIN_PASSWORD = 8
MAX_PASSWORD = 256


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
    per_hour = request.app[S.CONFIG].server.signups_per_hour
    if per_hour:  # before the Argon2 hash, which is what a flood would cost
        await guessing.attempt(request, "signup", None, (rules.signup_rule(per_hour),))
    password_hash = await hash_password(password)
    try:
        row = await request.app[S.DB].fetchrow(
            "INSERT INTO users (id, email, name, password_hash) VALUES ($1, $2, $3, $4)"
            " RETURNING *",
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


@routes.post("/api/auth/login")
async def login(request: web.Request) -> web.Response:
    body = await read_body(request)
    email = email_field(body)
    password = body.get("password")
    if not isinstance(password, str) or len(password) > MAX_PASSWORD:
        raise InvalidRequest("'password' is required", param="password")
    db = request.app[S.DB]
    row = await db.fetchrow(
        "SELECT * FROM users WHERE lower(email) = lower($1) AND deleted_at IS NULL", email
    )
    # The account's bucket is the account found; an unknown email still counts, in its own.
    account = row["id"] if row is not None else "?" + email.lower()
    attempt = await guessing.attempt(request, "login", account)
    ok = await verify_password(row["password_hash"] if row else _dummy_hash(), password)
    if row is None or not ok:
        raise AuthenticationFailed("wrong email or password", code="invalid_credentials")
    await guessing.succeeded(request, attempt)
    token = new_token()
    ttl = request.app[S.CONFIG].server.session_ttl_s
    expires = now_utc(request) + timedelta(seconds=ttl)
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
            "UPDATE sessions SET revoked_at = $2 WHERE token_hash = $1 AND revoked_at IS NULL",
            token_hash(token),
            now_utc(request),
        )
    response = json_response({"ok": True})
    response.del_cookie(SESSION_COOKIE, path="/")
    return response


@routes.get("/api/me")
async def me(request: web.Request) -> web.Response:
    user = await current_user(request)
    teams = await user_teams(request.app, user.id)
    money = await account_money(request.app, rk.user_account(user.id))
    return json_response(
        {
            "id": user.id,
            "email": user.email,
            "name": user.name,
            "balance_usd": usd(money["credits"]),
            "teams": teams,
        }
    )
