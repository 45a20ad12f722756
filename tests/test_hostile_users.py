"""Hostile users (issue 10, item 10): nobody can lock an owner out from elsewhere, case folding
does not multiply guesses, forwarded addresses are believed only from trusted proxies, the
operator token only as a Bearer token, signups limited per address.

A second gateway, ``proxied``, trusts 127.0.0.1 as its TLS proxy, so that each test can speak
from addresses of its own through ``X-Forwarded-For``; the ``gateway`` fixture trusts nobody.
"""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from redis.asyncio import Redis

from policies import keyspace as rk
from tests.conftest import ADMIN_TOKEN, Gateway, gateway_config, start_gateway
from tests.fake_upstream import FakeUpstream
from tests.helpers import PASSWORD, Api, unique_email

WRONG = "wrong-password"


@pytest.fixture(scope="module")
async def proxied(fake: FakeUpstream, database_url: str, redis_url: str) -> AsyncIterator[Gateway]:
    config = gateway_config(fake.base_url, trusted_proxies=["127.0.0.1"], signups_per_hour=3)
    gw, runner = await start_gateway(config, database_url, redis_url)
    yield gw
    await runner.cleanup()


def address() -> str:
    """A client address of this test's own (198.18.0.0/15, for benchmarks: never routed)."""
    return f"198.{18 + secrets.randbelow(2)}.{secrets.randbelow(256)}.{1 + secrets.randbelow(254)}"


async def login(
    http: aiohttp.ClientSession, base: str, email: str, password: str, xff: str | None = None
) -> tuple[int, dict[str, Any], str | None]:
    headers = {"X-Forwarded-For": xff} if xff else {}
    async with http.post(
        base + "/api/auth/login", json={"email": email, "password": password}, headers=headers
    ) as resp:
        return resp.status, await resp.json(), resp.headers.get("Retry-After")


async def user_id(api: Api, email: str) -> str:
    return str((await api.login(email)).user["id"])


async def test_a_stranger_cannot_lock_the_owner_out(
    proxied: Gateway, api: Api, http: aiohttp.ClientSession
) -> None:
    email = unique_email()
    await api.signup(email)
    stranger, owner = address(), address()
    for _ in range(5):
        status, body, _ = await login(http, proxied.base, email, WRONG, stranger)
        assert (status, body["error"]["code"]) == (401, "invalid_credentials")
    # The stranger now waits, and is not told whether even the right password is right.
    for password in (WRONG, PASSWORD):
        status, body, retry = await login(http, proxied.base, email, password, stranger)
        assert (status, body["error"]["code"]) == (429, "rate_limited")
        assert retry in ("1", "2")  # whole seconds left of the 2 s back-off
    status, body, _ = await login(http, proxied.base, email, PASSWORD, owner)
    assert status == 200 and body["user"]["email"] == email


async def test_a_success_clears_the_clients_bucket(
    proxied: Gateway, api: Api, http: aiohttp.ClientSession
) -> None:
    email = unique_email()
    await api.signup(email)
    me = address()
    for _ in range(2):
        for _ in range(4):
            assert (await login(http, proxied.base, email, WRONG, me))[0] == 401
        assert (await login(http, proxied.base, email, PASSWORD, me))[0] == 200


async def test_the_account_ceiling_slows_a_distributed_guess_without_a_lock(
    proxied: Gateway, api: Api, http: aiohttp.ClientSession, redis: Redis
) -> None:
    email = unique_email()
    await api.signup(email)
    account = await user_id(api, email)
    # 49 guesses on this account from 49 addresses so far (each below its own pair limit).
    await redis.set(rk.guess_keys("login", "account", account)[0], 49, ex=3600)
    assert (await login(http, proxied.base, email, WRONG, address()))[0] == 401
    # The 50th made the account wait a second, from every address, the owner's too ...
    status, body, retry = await login(http, proxied.base, email, PASSWORD, address())
    assert (status, body["error"]["code"], retry) == (429, "rate_limited", "1")
    # ... but only that long: the owner gets in.
    owner, deadline = address(), time.monotonic() + 10
    while (status := (await login(http, proxied.base, email, PASSWORD, owner))[0]) == 429:
        assert time.monotonic() < deadline
        await asyncio.sleep(0.2)
    assert status == 200


async def test_a_case_variant_of_the_email_counts_in_the_accounts_bucket(
    proxied: Gateway, api: Api, http: aiohttp.ClientSession
) -> None:
    name = f"iris-{secrets.token_hex(4)}@example.com"
    await api.signup(name)
    variant = "İ" + name[1:]  # PostgreSQL's lower() makes it "iris…"; Python's "i̇ris…"
    status, body, _ = await login(http, proxied.base, variant, PASSWORD, address())
    assert (status, body["user"]["email"]) == (200, name)  # the same account, found
    me = address()
    for _ in range(5):
        assert (await login(http, proxied.base, name, WRONG, me))[0] == 401
    for email in (variant, variant.upper(), name.upper()):
        status, body, _ = await login(http, proxied.base, email, PASSWORD, me)
        assert (status, body["error"]["code"]) == (429, "rate_limited")


async def test_forwarded_for_is_believed_only_from_a_trusted_proxy(
    gateway: Gateway, proxied: Gateway, api: Api, http: aiohttp.ClientSession, redis: Redis
) -> None:
    email = unique_email()
    await api.signup(email)
    account = await user_id(api, email)
    # Through a trusted proxy: the rightmost untrusted hop, not what the client wrote left of it.
    spoofed, real = address(), address()
    assert (await login(http, proxied.base, email, WRONG, f"{spoofed}, {real}"))[0] == 401
    assert await redis.get(rk.guess_keys("login", "pair", f"{account}|{real}")[0]) == "1"
    assert await redis.get(rk.guess_keys("login", "pair", f"{account}|{spoofed}")[0]) is None
    # From an untrusted peer the header is ignored: a new address per request changes nothing.
    for _ in range(5):
        assert (await login(http, gateway.base, email, WRONG, address()))[0] == 401
    status, body, _ = await login(http, gateway.base, email, PASSWORD, address())
    assert (status, body["error"]["code"]) == (429, "rate_limited")
    assert await redis.get(rk.guess_keys("login", "pair", f"{account}|127.0.0.1")[0]) == "5"
    await redis.delete(*rk.guess_keys("login", "pair", f"{account}|127.0.0.1"))


async def test_the_operator_token_only_as_a_bearer_token(
    gateway: Gateway, http: aiohttp.ClientSession
) -> None:
    for headers in ({"x-api-key": ADMIN_TOKEN}, {"Authorization": ADMIN_TOKEN}):
        async with http.get(gateway.base + "/admin/teams", headers=headers) as resp:
            body = await resp.json()
            assert (resp.status, body["error"]["code"]) == (401, "invalid_admin_token")
    headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    async with http.get(gateway.base + "/admin/teams", headers=headers) as resp:
        assert resp.status == 200


async def test_signups_are_limited_per_client_address(
    proxied: Gateway, http: aiohttp.ClientSession
) -> None:
    async def signup(xff: str) -> tuple[int, dict[str, Any], str | None]:
        body = {"email": unique_email(), "password": PASSWORD}
        headers = {"X-Forwarded-For": xff}
        async with http.post(proxied.base + "/api/auth/signup", json=body, headers=headers) as r:
            return r.status, await r.json(), r.headers.get("Retry-After")

    busy = address()
    assert [(await signup(busy))[0] for _ in range(3)] == [201, 201, 201]  # signups_per_hour: 3
    status, body, retry = await signup(busy)
    assert (status, body["error"]["code"], retry) == (429, "rate_limited", "60")
    assert (await signup(address()))[0] == 201
