"""Helpers for the people tests: members added through the public API, invitation tokens read
from the outbox (the gateway of the ``gateway`` fixture has no SMTP host), the OpenAI SDK."""

from __future__ import annotations

import re
from typing import Any

import asyncpg
import openai
from redis.asyncio import Redis

from tests.conftest import Gateway
from tests.helpers import Api, Session

INVITE_LINK = re.compile(r"/invite/([A-Za-z0-9_-]{40,})")
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi there"}]}


def client(gateway: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.v1, api_key=key, max_retries=0, timeout=10)


async def add_member(
    api: Api, owner: Session, team_id: str, role: str = "member", email: str | None = None
) -> Session:
    """A new user who joins ``team_id`` through its invite link, approved by ``owner``."""
    user = await api.signup(email)
    await join(api, owner, team_id, user)
    if role != "member":
        await api.call(
            "PATCH",
            f"/api/teams/{team_id}/members/{user.user['id']}",
            session=owner,
            json={"role": role},
            expect=200,
        )
    return user


async def join(api: Api, owner: Session, team_id: str, user: Session) -> None:
    """``user`` (signed up already) joins ``team_id`` through its invite link, approved by
    ``owner``, as a member."""
    _, link = await api.call("POST", f"/api/teams/{team_id}/invite-link", session=owner, expect=201)
    _, req = await api.call("POST", f"/api/join/{link['token']}", session=user, expect=201)
    await api.call(
        "POST", f"/api/teams/{team_id}/join-requests/{req['id']}/approve", session=owner, expect=200
    )


async def team_with_roles(api: Api) -> tuple[dict[str, Any], dict[str, Session]]:
    """A team with an owner, an admin and a member."""
    owner = await api.signup()
    team = await api.team(owner)
    admin = await add_member(api, owner, team["id"], "admin")
    member = await add_member(api, owner, team["id"], "member")
    return team, {"owner": owner, "admin": admin, "member": member}


async def invite(
    api: Api, session: Session, team_id: str, email: str, role: str = "member", **extra: Any
) -> dict[str, Any]:
    _, body = await api.call(
        "POST",
        f"/api/teams/{team_id}/invitations",
        session=session,
        json={"email": email, "role": role, **extra},
        expect=201,
    )
    return dict(body)


async def outbox_token(db: asyncpg.Connection, invitation_id: str) -> str:
    body = await db.fetchval(
        "SELECT body FROM outbox WHERE kind = 'invitation' AND ref_id = $1"
        " ORDER BY id DESC LIMIT 1",
        invitation_id,
    )
    match = INVITE_LINK.search(body or "")
    assert match is not None, body
    return match.group(1)


async def clear_guess_limits(redis: Redis) -> None:
    """Forget counted attempts (every test client shares the address 127.0.0.1)."""
    keys = [k async for k in redis.scan_iter("mb:{guess}:*")]
    if keys:
        await redis.delete(*keys)
