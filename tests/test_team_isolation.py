"""Cross-team isolation: a user of team A (its owner, with every right there) can read and change
nothing of team B, whatever ids they guess: 404 everywhere, and B's rows and live state are
untouched afterwards."""

from __future__ import annotations

import secrets
from typing import Any

import asyncpg
import pytest
from redis.asyncio import Redis

from policies import keyspace as rk
from tests.conftest import Gateway
from tests.helpers import Api, Session, unique_email
from tests.people import add_member, invite

TABLES = {
    "teams": "id = $1",
    "memberships": "team_id = $1",
    "invitations": "team_id = $1",
    "invite_links": "team_id = $1",
    "join_requests": "team_id = $1",
    "api_keys": "team_id = $1",
    "audit_log": "team_id = $1",
}


async def snapshot(db: asyncpg.Connection, redis: Redis, team_id: str) -> dict[str, Any]:
    rows = {
        table: [
            dict(r)
            for r in await db.fetch(f"SELECT * FROM {table} WHERE {where} ORDER BY 1", team_id)
        ]
        for table, where in TABLES.items()
    }
    ak = rk.AccountKeys(rk.team_account(team_id))
    rows["redis"] = [await redis.hgetall(ak.cfg), await redis.hgetall(ak.keys)]
    return rows


async def team_b(api: Api, db: asyncpg.Connection) -> tuple[dict[str, Any], dict[str, Any]]:
    owner = await api.signup()
    team = await api.team(owner, name="Team B")
    member = await add_member(api, owner, team["id"])
    await api.call(
        "PATCH",
        f"/api/teams/{team['id']}/members/{member.user['id']}",
        session=owner,
        json={"monthly_limit_usd": "4"},
        expect=200,
    )
    key = await api.key(member, team["id"])
    inv = await invite(api, owner, team["id"], unique_email())
    _, link = await api.call(
        "POST", f"/api/teams/{team['id']}/invite-link", session=owner, expect=201
    )
    _, req = await api.call(
        "POST", f"/api/join/{link['token']}", session=await api.signup(), expect=201
    )
    ids = {
        "team": team["id"],
        "owner": owner.user["id"],
        "member": member.user["id"],
        "key": key["id"],
        "invitation": inv["id"],
        "request": req["id"],
    }
    return ids, {"owner": owner, "member": member}


def attempts(b: dict[str, str], own_team: str, me: str) -> list[tuple[str, str, Any]]:
    t = f"/api/teams/{b['team']}"
    mine = f"/api/teams/{own_team}"
    return [
        ("GET", t, None),
        ("PATCH", t, {"name": "pwned", "spending_limit_usd": "0"}),
        ("DELETE", t, None),
        ("POST", f"{t}/transfer", {"user_id": me}),
        ("GET", f"{t}/members", None),
        ("PATCH", f"{t}/members/{b['member']}", {"role": "admin", "monthly_limit_usd": None}),
        ("PATCH", f"{t}/members/{me}", {"role": "admin"}),
        ("DELETE", f"{t}/members/{b['member']}", None),
        ("DELETE", f"{t}/members/{b['owner']}", None),
        ("GET", f"{t}/invitations", None),
        ("POST", f"{t}/invitations", {"email": unique_email(), "role": "admin"}),
        ("DELETE", f"{t}/invitations/{b['invitation']}", None),
        ("GET", f"{t}/invite-link", None),
        ("POST", f"{t}/invite-link", None),
        ("DELETE", f"{t}/invite-link", None),
        ("GET", f"{t}/join-requests", None),
        ("POST", f"{t}/join-requests/{b['request']}/approve", None),
        ("POST", f"{t}/join-requests/{b['request']}/deny", None),
        ("GET", f"{t}/audit", None),
        ("GET", f"{t}/usage", None),
        ("GET", f"{t}/billing", None),
        ("PUT", f"{t}/subscription", {"plan": "pro", "seats": 1}),
        ("GET", f"/api/keys?team={b['team']}", None),
        ("DELETE", f"/api/keys/{b['key']}", None),
        # B's ids under the attacker's own team.
        ("PATCH", f"{mine}/members/{b['member']}", {"role": "member"}),
        ("DELETE", f"{mine}/members/{b['member']}", None),
        ("DELETE", f"{mine}/members/{b['owner']}", None),
        ("DELETE", f"{mine}/invitations/{b['invitation']}", None),
        ("POST", f"{mine}/join-requests/{b['request']}/approve", None),
        ("POST", f"{mine}/join-requests/{b['request']}/deny", None),
    ]


def guessed_ids() -> list[str]:
    return [
        f"team_{secrets.token_hex(10)}",
        f"usr_{secrets.token_hex(10)}",
        "team_" + "0" * 20,
        "x",
        "' OR 1=1 --",
        "%2e%2e",
        "TEAM_" + "A" * 20,
        "team_" + "g" * 20,
        "1",
    ]


@pytest.mark.parametrize("attacker_kind", ["owner_of_other_team", "no_team"])
async def test_nothing_of_another_team_is_visible_or_changeable(
    gateway: Gateway, api: Api, db: asyncpg.Connection, redis: Redis, attacker_kind: str
) -> None:
    b, _ = await team_b(api, db)
    attacker = await api.signup()
    own = (
        await api.team(attacker)
        if attacker_kind == "owner_of_other_team"
        else {"id": "team_" + "1" * 20}
    )
    before = await snapshot(db, redis, b["team"])
    for method, path, payload in attempts(b, own["id"], attacker.user["id"]):
        status, body = await api.call(method, path, session=attacker, json=payload)
        if status == 405 or "Unknown route" in body["error"]["message"]:
            continue  # an endpoint of another module, not built yet
        assert status == 404, (method, path, status, body)
        assert body["error"]["type"] == "invalid_request_error"
    # Creating a key on B, or accepting B's join request through the key API, is refused too.
    status, _ = await api.call(
        "POST", "/api/keys", session=attacker, json={"name": "k", "team": b["team"]}
    )
    assert status == 404
    assert await snapshot(db, redis, b["team"]) == before


async def test_guessed_ids_are_404(gateway: Gateway, api: Api, db: asyncpg.Connection) -> None:
    attacker = await api.signup()
    own = await api.team(attacker)
    for guess in guessed_ids():
        for method, path in (
            ("GET", f"/api/teams/{guess}"),
            ("GET", f"/api/teams/{guess}/members"),
            ("DELETE", f"/api/teams/{guess}"),
            ("GET", f"/api/teams/{guess}/audit"),
            ("POST", f"/api/teams/{guess}/invite-link"),
            ("GET", f"/api/keys?team={guess}"),
            ("PATCH", f"/api/teams/{own['id']}/members/{guess}"),
            ("DELETE", f"/api/teams/{own['id']}/members/{guess}"),
            ("DELETE", f"/api/teams/{own['id']}/invitations/{guess}"),
            ("POST", f"/api/teams/{own['id']}/join-requests/{guess}/approve"),
            ("DELETE", f"/api/keys/{guess}"),
        ):
            status, body = await api.call(method, path, session=attacker, json={"role": "admin"})
            assert status == 404, (method, path, status, body)


async def test_transfer_to_a_member_of_another_team_is_refused(
    gateway: Gateway, api: Api, db: asyncpg.Connection, redis: Redis
) -> None:
    b, _ = await team_b(api, db)
    attacker: Session = await api.signup()
    own = await api.team(attacker)
    before = await snapshot(db, redis, b["team"])
    status, body = await api.call(
        "POST", f"/api/teams/{own['id']}/transfer", session=attacker, json={"user_id": b["member"]}
    )
    assert (status, body["error"]["param"]) == (400, "user_id")
    assert await snapshot(db, redis, b["team"]) == before
    assert (await api.overview(attacker, own["id"]))["your_role"] == "owner"
