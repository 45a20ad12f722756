"""Accounts and sessions: signup, login (with its guessing limit), logout, /api/me."""

from __future__ import annotations

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from gateway.api.common import token_hash
from tests.conftest import Gateway
from tests.helpers import PASSWORD, Api, unique_email
from tests.people import clear_guess_limits


async def test_signup_login_me_logout(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession, db: asyncpg.Connection
) -> None:
    email = unique_email("Mixed.Case")
    status, body = await api.call(
        "POST", "/api/auth/signup", json={"email": email, "password": PASSWORD, "name": "Ada"}
    )
    assert status == 201 and set(body["user"]) == {"id", "email", "name", "created_at"}
    async with http.post(
        gateway.base + "/api/auth/login", json={"email": email.upper(), "password": PASSWORD}
    ) as r:
        assert r.status == 200
        login = await r.json()
        cookie = r.headers["Set-Cookie"]
    assert "mb_session=" in cookie and "HttpOnly" in cookie and "SameSite=Lax" in cookie
    token = login["token"]
    stored = await db.fetchrow("SELECT * FROM sessions WHERE user_id = $1", login["user"]["id"])
    assert bytes(stored["token_hash"]) == token_hash(token) and token.encode() != bytes(
        stored["token_hash"]
    )
    password_hash = await db.fetchval(
        "SELECT password_hash FROM users WHERE id = $1", login["user"]["id"]
    )
    assert password_hash.startswith("$argon2id$") and PASSWORD not in password_hash
    owner = await api.login(email)
    team = await api.team(owner, "Research")
    await api.credit_user(owner.user["id"], "2.50")
    _, me = await api.call("GET", "/api/me", session=owner, expect=200)
    assert (me["email"], me["name"], me["balance_usd"]) == (email, "Ada", "2.500000000")
    assert [(t["id"], t["name"], t["role"]) for t in me["teams"]] == [
        (team["id"], "Research", "owner")
    ]
    await api.call("POST", "/api/auth/logout", session=owner, expect=200)
    status, err = await api.call("GET", "/api/me", session=owner)
    assert (status, err["error"]["code"]) == (401, "unauthenticated")


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"email": "not-an-email", "password": PASSWORD}, "email"),
        ({"email": "a@b.co", "password": "short"}, "password"),
        ({"email": "a@b.co", "password": 12345678}, "password"),
        ({"email": "a@b.co", "password": PASSWORD, "name": "bad\x00name"}, "name"),
        ({"email": "a@b.co", "password": PASSWORD, "name": "x" * 101}, "name"),
    ],
)
async def test_signup_validation(
    api: Api, payload: dict[str, object], param: str, db: asyncpg.Connection
) -> None:
    before = await db.fetchval("SELECT count(*) FROM users")
    status, err = await api.call("POST", "/api/auth/signup", json=payload)
    assert (status, err["error"]["param"]) == (400, param)
    assert await db.fetchval("SELECT count(*) FROM users") == before


async def test_email_taken_case_insensitively(api: Api) -> None:
    email = unique_email()
    await api.signup(email)
    status, err = await api.call(
        "POST", "/api/auth/signup", json={"email": email.upper(), "password": PASSWORD}
    )
    assert (status, err["error"]["code"]) == (409, "email_taken")


async def test_login_guessing_is_rate_limited_per_account(api: Api, redis: Redis) -> None:
    await clear_guess_limits(redis)
    email = unique_email()
    await api.signup(email)
    for _ in range(5):
        status, err = await api.call(
            "POST", "/api/auth/login", json={"email": email, "password": "wrong-password"}
        )
        assert (status, err["error"]["code"]) == (401, "invalid_credentials")
    # Now this address waits for this account: even the right password is not checked.
    status, err = await api.call(
        "POST", "/api/auth/login", json={"email": email, "password": PASSWORD}
    )
    assert (status, err["error"]["code"]) == (429, "rate_limited")
    # Another account from the same address is not limited by that.
    other = unique_email()
    await api.signup(other)
    await clear_guess_limits(redis)  # every test shares the address 127.0.0.1


async def test_unknown_email_and_wrong_password_look_the_same(api: Api) -> None:
    email = unique_email()
    await api.signup(email)
    a = await api.call(
        "POST", "/api/auth/login", json={"email": email, "password": "wrong-password"}
    )
    b = await api.call(
        "POST", "/api/auth/login", json={"email": unique_email(), "password": "wrong-password"}
    )
    assert a == b == (401, a[1])
