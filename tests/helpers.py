"""Test helpers: a small client of the gateway's management API, polling with a deadline, one
chat call over plain HTTP, reading metrics, forgetting an account in Redis."""

from __future__ import annotations

import asyncio
import secrets
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Protocol, TypeVar

import aiohttp
from multidict import CIMultiDictProxy
from redis.asyncio import Redis

from policies import keyspace as rk

T = TypeVar("T")
PASSWORD = "correct-horse-battery"


async def eventually(
    probe: Callable[[], Awaitable[T]],
    check: Callable[[T], bool],
    timeout: float = 10.0,
    interval: float = 0.02,
) -> T:
    """Poll ``probe`` until ``check`` holds; fail with the last value at the deadline."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if check(value):
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s; last value: {value!r}")
        await asyncio.sleep(interval)


def unique_email(tag: str = "user") -> str:
    return f"{tag}-{secrets.token_hex(6)}@example.com"


@dataclass
class Session:
    user: dict[str, Any]
    token: str

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}


class Api:
    """Management API calls against one gateway base URL (``http://host:port``)."""

    def __init__(self, http: aiohttp.ClientSession, base: str, admin_token: str) -> None:
        self.http = http
        self.base = base
        self.admin_token = admin_token

    async def call(
        self,
        method: str,
        path: str,
        *,
        session: Session | None = None,
        json: Any = None,
        admin: bool = False,
        expect: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> tuple[int, Any]:
        hdrs = dict(headers or {})
        if session is not None:
            hdrs.update(session.headers)
        if admin:
            hdrs["Authorization"] = f"Bearer {self.admin_token}"
        async with self.http.request(method, self.base + path, json=json, headers=hdrs) as resp:
            body = (
                await resp.json(content_type=None)
                if resp.content_type == "application/json"
                else await resp.text()
            )
            if expect is not None:
                assert resp.status == expect, (method, path, resp.status, body)
            return resp.status, body

    async def signup(self, email: str | None = None, name: str = "Tester") -> Session:
        email = email or unique_email()
        _, _body = await self.call(
            "POST",
            "/api/auth/signup",
            json={"email": email, "password": PASSWORD, "name": name},
            expect=201,
        )
        return await self.login(email)

    async def login(self, email: str) -> Session:
        _, body = await self.call(
            "POST", "/api/auth/login", json={"email": email, "password": PASSWORD}, expect=200
        )
        return Session(body["user"], body["token"])

    async def team(self, owner: Session, name: str = "Team") -> dict[str, Any]:
        _, body = await self.call(
            "POST", "/api/teams", session=owner, json={"name": name}, expect=201
        )
        return dict(body)

    async def credit_team(self, team_id: str, amount: str) -> None:
        await self.call(
            "POST",
            f"/admin/teams/{team_id}/credits",
            admin=True,
            json={"amount_usd": amount, "note": "test"},
            expect=201,
        )

    async def credit_user(self, user_id: str, amount: str) -> None:
        await self.call(
            "POST",
            f"/admin/users/{user_id}/credits",
            admin=True,
            json={"amount_usd": amount, "note": "test"},
            expect=201,
        )

    async def key(
        self, session: Session, team_id: str | None = None, name: str = "key"
    ) -> dict[str, Any]:
        payload: dict[str, Any] = {"name": name}
        if team_id is not None:
            payload["team"] = team_id
        _, body = await self.call("POST", "/api/keys", session=session, json=payload, expect=201)
        return dict(body)

    async def overview(self, session: Session, team_id: str) -> dict[str, Any]:
        _, body = await self.call("GET", f"/api/teams/{team_id}", session=session, expect=200)
        return dict(body)

    async def funded_team_key(self, amount: str = "10.00") -> tuple[Session, dict[str, Any], str]:
        """A new owner, their team with ``amount`` of credits, and a team key's secret."""
        owner = await self.signup()
        team = await self.team(owner)
        await self.credit_team(team["id"], amount)
        key = await self.key(owner, team["id"])
        return owner, team, key["secret"]


def ts(text: str) -> float:
    """An ISO time in UTC (``2026-12-31T23:59:50``) as unix seconds."""
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


async def until(predicate: Callable[[], bool], timeout: float = 10.0) -> None:
    """Poll ``predicate`` until it holds; fail at the deadline."""
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(0.01)


def metric(text: str, name: str, **labels: str) -> float:
    """The sum of a Prometheus family's samples in ``text`` that carry ``labels``."""
    total = 0.0
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


class HasV1(Protocol):
    @property
    def v1(self) -> str: ...


@dataclass
class Reply:
    status: int
    headers: CIMultiDictProxy[str]
    body: Any

    @property
    def code(self) -> str | None:
        if isinstance(self.body, dict) and isinstance(self.body.get("error"), dict):
            return str(self.body["error"].get("code"))
        return None


async def chat(
    http: aiohttp.ClientSession,
    gateway: HasV1,
    secret: str,
    body: dict[str, Any],
    headers: dict[str, str] | None = None,
) -> Reply:
    """One POST /v1/chat/completions with the API key ``secret``, answered whole."""
    sent = {**(headers or {}), "Authorization": f"Bearer {secret}"}
    async with http.post(gateway.v1 + "/chat/completions", json=body, headers=sent) as resp:
        return Reply(resp.status, resp.headers, await resp.json(content_type=None))


async def forget_account(redis: Redis, account: str) -> None:
    """Drop every Redis key of ``account`` (as a Redis that lost it): the next request rebuilds
    it."""
    keys = [k async for k in redis.scan_iter(match=f"{{acct:{account}}}:*")]
    if keys:
        await redis.delete(*keys)


async def account_state(redis: Redis, team_id: str) -> dict[str, str]:
    """A team account's Redis state hash (credits, holds, counters)."""
    return dict(await redis.hgetall(rk.AccountKeys(rk.team_account(team_id)).state))
