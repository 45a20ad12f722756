"""Membership lifecycle over HTTP: the member list, per-member policy (in PostgreSQL and in the
live Redis state the hold script reads), roles, ownership transfer, removal, leaving, team
deletion and the audit log; and every row of the role matrix of contract section 3."""

from __future__ import annotations

from typing import Any

import asyncpg
import openai
import pytest
from redis.asyncio import Redis

from policies import keyspace as rk
from tests.conftest import Gateway
from tests.helpers import Api, Session, eventually
from tests.people import CHAT, add_member, client, team_with_roles

HI_COST = 5 * 150 + 6 * 600  # "hi there" on gpt-4o-mini, nano-USD


async def members(api: Api, session: Session, team_id: str) -> dict[str, dict[str, Any]]:
    _, body = await api.call("GET", f"/api/teams/{team_id}/members", session=session, expect=200)
    return {m["user_id"]: m for m in body["data"]}


async def patch(
    api: Api, session: Session, team_id: str, user_id: str, expect: int, **fields: Any
) -> Any:
    _, body = await api.call(
        "PATCH",
        f"/api/teams/{team_id}/members/{user_id}",
        session=session,
        json=fields,
        expect=expect,
    )
    return body


async def cfg(redis: Redis, team_id: str) -> dict[str, str]:
    return dict(await redis.hgetall(rk.AccountKeys(rk.team_account(team_id)).cfg))


# --- the list -------------------------------------------------------------------------------------
async def test_member_list_shapes(gateway: Gateway, api: Api) -> None:
    team, people = await team_with_roles(api)
    listed = await members(api, people["member"], team["id"])
    owner = people["owner"].user
    assert listed[owner["id"]] == {
        "id": owner["id"],
        "user_id": owner["id"],
        "email": owner["email"],
        "name": "Tester",
        "role": "owner",
        "monthly_limit_usd": None,
        "limit_source": "team",
        "enforcement": "hard",
        "enforcement_source": "team",
        "billing_mode": "team",
        "rpm": None,
        "tpm": None,
        "spend_this_period_usd": "0.000000000",
        "joined_at": listed[owner["id"]]["joined_at"],
    }
    assert [m["role"] for m in listed.values()] == ["owner", "admin", "member"]


async def test_member_spend_this_period(gateway: Gateway, api: Api) -> None:
    team, people = await team_with_roles(api)
    await api.credit_team(team["id"], "1.00")
    key = await api.key(people["member"], team["id"])
    sdk = client(gateway, key["secret"])
    await sdk.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    listed = await members(api, people["owner"], team["id"])
    assert listed[people["member"].user["id"]]["spend_this_period_usd"] == "0.000004350"
    assert listed[people["admin"].user["id"]]["spend_this_period_usd"] == "0.000000000"


# --- per-member policy ----------------------------------------------------------------------------
async def test_limit_override_reaches_postgres_redis_and_the_hold(
    gateway: Gateway, api: Api, db: asyncpg.Connection, redis: Redis
) -> None:
    team, people = await team_with_roles(api)
    tid, member = team["id"], people["member"]
    uid = member.user["id"]
    await api.credit_team(tid, "1.00")
    sdk = client(gateway, (await api.key(member, tid))["secret"])
    await sdk.chat.completions.create(**CHAT)  # type: ignore[call-overload]  # spend: HI_COST

    body = await patch(api, people["admin"], tid, uid, 200, monthly_limit_usd="0.000005")
    assert (body["monthly_limit_usd"], body["limit_source"]) == ("0.000005000", "member")
    row = await db.fetchrow(
        "SELECT monthly_limit, limit_set FROM memberships WHERE team_id = $1 AND user_id = $2"
        " AND removed_at IS NULL",
        tid,
        uid,
    )
    assert (row["monthly_limit"], row["limit_set"]) == (5_000, True)
    assert (await cfg(redis, tid))["ml:" + uid] == "5000"
    with pytest.raises(openai.RateLimitError) as err:
        await sdk.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert err.value.code == "member_limit_reached"

    body = await patch(api, people["owner"], tid, uid, 200, enforcement="soft")
    assert (body["enforcement"], body["enforcement_source"]) == ("soft", "member")
    assert (await cfg(redis, tid))["me:" + uid] == "soft"
    raw = await sdk.chat.completions.with_raw_response.create(**CHAT)  # type: ignore[call-overload]
    assert raw.headers["x-modelbridge-limit-warning"] == "member_limit_exceeded"

    body = await patch(
        api, people["owner"], tid, uid, 200, monthly_limit_usd=None, enforcement=None
    )
    assert (body["monthly_limit_usd"], body["limit_source"], body["enforcement"]) == (
        None,
        "team",
        "hard",
    )
    current = await cfg(redis, tid)
    assert "ml:" + uid not in current and "me:" + uid not in current
    raw = await sdk.chat.completions.with_raw_response.create(**CHAT)  # type: ignore[call-overload]
    assert "x-modelbridge-limit-warning" not in raw.headers

    body = await patch(api, people["owner"], tid, uid, 200, monthly_limit_usd="unlimited")
    assert (body["monthly_limit_usd"], body["limit_source"]) == (None, "member")
    assert (await cfg(redis, tid))["ml:" + uid] == "-1"
    actions = await db.fetch(
        "SELECT action, before, after FROM audit_log WHERE team_id = $1 AND target_id = $2"
        " AND action = 'member.update' ORDER BY id",
        tid,
        uid,
    )
    assert len(actions) == 4


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"monthly_limit_usd": "-1"}, "monthly_limit_usd"),
        ({"monthly_limit_usd": "abc"}, "monthly_limit_usd"),
        ({"monthly_limit_usd": "0.0000000001"}, "monthly_limit_usd"),
        ({"monthly_limit_usd": True}, "monthly_limit_usd"),
        ({"enforcement": "strict"}, "enforcement"),
        ({"enforcement": 1}, "enforcement"),
        ({"role": "owner"}, "role"),
        ({"role": "Admin"}, "role"),
        ({"role": None}, "role"),
        ({"billing_mode": "both"}, "billing_mode"),
        ({"nickname": "x"}, "nickname"),
        ({}, None),
    ],
)
async def test_patch_validation(
    gateway: Gateway, api: Api, db: asyncpg.Connection, fields: dict[str, Any], param: str | None
) -> None:
    owner = await api.signup()
    team = await api.team(owner)
    member = await add_member(api, owner, team["id"])
    before = await db.fetch("SELECT * FROM memberships WHERE team_id = $1 ORDER BY id", team["id"])
    status, body = await api.call(
        "PATCH", f"/api/teams/{team['id']}/members/{member.user['id']}", session=owner, json=fields
    )
    assert status == 400 and body["error"]["param"] == param, body
    assert body["error"]["type"] == "invalid_request_error"
    assert (
        await db.fetch("SELECT * FROM memberships WHERE team_id = $1 ORDER BY id", team["id"])
        == before
    )


async def test_admins_cannot_change_the_owner_and_members_nobody(
    gateway: Gateway, api: Api
) -> None:
    team, people = await team_with_roles(api)
    tid = team["id"]
    owner_id, admin_id, member_id = (people[r].user["id"] for r in ("owner", "admin", "member"))
    for fields in ({"role": "admin"}, {"monthly_limit_usd": "1"}, {"enforcement": "soft"}):
        await patch(api, people["admin"], tid, owner_id, 403, **fields)
    await patch(api, people["owner"], tid, owner_id, 403, role="admin")  # transfer instead
    for target in (owner_id, admin_id, member_id):
        for fields in ({"role": "admin"}, {"role": "member"}, {"monthly_limit_usd": "1"}):
            await patch(api, people["member"], tid, target, 403, **fields)
    await patch(api, people["member"], tid, member_id, 403, monthly_limit_usd=None)
    # The owner sets their own limit; billing mode is each member's own choice.
    assert (await patch(api, people["owner"], tid, owner_id, 200, monthly_limit_usd="3"))[
        "monthly_limit_usd"
    ] == "3.000000000"
    await patch(api, people["owner"], tid, member_id, 403, billing_mode="personal")
    await patch(api, people["admin"], tid, member_id, 403, billing_mode="team")


async def test_role_changes(gateway: Gateway, api: Api, db: asyncpg.Connection) -> None:
    team, people = await team_with_roles(api)
    tid = team["id"]
    admin_id, member_id = people["admin"].user["id"], people["member"].user["id"]
    assert (await patch(api, people["admin"], tid, member_id, 200, role="admin"))["role"] == "admin"
    assert (await patch(api, people["admin"], tid, member_id, 200, role="member"))[
        "role"
    ] == "member"
    assert (await patch(api, people["owner"], tid, admin_id, 200, role="member"))[
        "role"
    ] == "member"
    # Now a member: may no longer manage anyone.
    await patch(api, people["admin"], tid, member_id, 403, role="admin")
    roles = await db.fetch(
        "SELECT user_id, role FROM memberships WHERE team_id = $1 AND removed_at IS NULL", tid
    )
    assert sorted(r["role"] for r in roles) == ["member", "member", "owner"]
    audit = await db.fetch(
        "SELECT before, after FROM audit_log WHERE team_id = $1 AND action = 'member.update'"
        " ORDER BY id",
        tid,
    )
    assert [(a["before"], a["after"]) for a in audit][-1] == (
        '{"role": "admin"}',
        '{"role": "member"}',
    )


async def test_billing_mode_is_stored_for_the_member_themselves(
    gateway: Gateway, api: Api, db: asyncpg.Connection
) -> None:
    team, people = await team_with_roles(api)
    uid = people["member"].user["id"]
    body = await patch(api, people["member"], team["id"], uid, 200, billing_mode="personal")
    assert body["billing_mode"] == "personal"
    assert (
        await db.fetchval(
            "SELECT billing_mode FROM memberships"
            " WHERE team_id = $1 AND user_id = $2 AND removed_at IS NULL",
            team["id"],
            uid,
        )
        == "personal"
    )
    body = await patch(api, people["member"], team["id"], uid, 200, billing_mode="team")
    assert body["billing_mode"] == "team"


async def test_unknown_member_is_404(gateway: Gateway, api: Api) -> None:
    owner = await api.signup()
    team = await api.team(owner)
    stranger = await api.signup()
    for user_id in (stranger.user["id"], "usr_00000000000000000000", "nope", "..%2f"):
        status, body = await api.call(
            "PATCH",
            f"/api/teams/{team['id']}/members/{user_id}",
            session=owner,
            json={"role": "admin"},
        )
        assert (status, body["error"]["code"]) == (404, "member_not_found")
        status, _ = await api.call(
            "DELETE", f"/api/teams/{team['id']}/members/{user_id}", session=owner
        )
        assert status == 404


# --- transfer -------------------------------------------------------------------------------------
async def test_transfer_ownership(gateway: Gateway, api: Api, db: asyncpg.Connection) -> None:
    team, people = await team_with_roles(api)
    tid = team["id"]
    owner, admin, member = people["owner"], people["admin"], people["member"]
    stranger = await api.signup()
    path = f"/api/teams/{tid}/transfer"
    await api.call("POST", path, session=admin, json={"user_id": member.user["id"]}, expect=403)
    await api.call("POST", path, session=member, json={"user_id": member.user["id"]}, expect=403)
    for bad in (
        {"user_id": stranger.user["id"]},
        {"user_id": owner.user["id"]},
        {"user_id": 5},
        {},
    ):
        status, body = await api.call("POST", path, session=owner, json=bad)
        assert (status, body["error"]["param"]) == (400, "user_id"), body
    _, body = await api.call(
        "POST", path, session=owner, json={"user_id": member.user["id"]}, expect=200
    )
    assert body == {
        "team_id": tid,
        "owner_id": member.user["id"],
        "previous_owner_id": owner.user["id"],
    }
    listed = await members(api, owner, tid)
    assert (listed[owner.user["id"]]["role"], listed[member.user["id"]]["role"]) == (
        "admin",
        "owner",
    )
    assert await db.fetchval("SELECT owner_id FROM teams WHERE id = $1", tid) == member.user["id"]
    assert (await api.overview(owner, tid))["your_role"] == "admin"
    # The old owner is an admin now: may leave, may not transfer back.
    await api.call("POST", path, session=owner, json={"user_id": owner.user["id"]}, expect=403)
    await api.call("POST", path, session=owner, json={"user_id": admin.user["id"]}, expect=403)
    assert (
        await db.fetchval(
            "SELECT count(*) FROM audit_log WHERE team_id = $1 AND action = 'team.transfer'", tid
        )
        == 1
    )


# --- removal --------------------------------------------------------------------------------------
async def test_removed_member_key_is_refused_at_the_next_request(
    gateway: Gateway, api: Api, db: asyncpg.Connection, redis: Redis
) -> None:
    team, people = await team_with_roles(api)
    tid, member = team["id"], people["member"]
    uid = member.user["id"]
    await api.credit_team(tid, "1.00")
    keys = [await api.key(member, tid, name=f"k{i}") for i in range(2)]
    personal = await api.key(member)
    await patch(api, people["owner"], tid, uid, 200, monthly_limit_usd="1", enforcement="soft")
    sdk = client(gateway, keys[0]["secret"])
    raw = await sdk.chat.completions.with_raw_response.create(**CHAT)  # type: ignore[call-overload]
    request_id = raw.headers["x-request-id"]

    _, body = await api.call(
        "DELETE", f"/api/teams/{tid}/members/{uid}", session=people["admin"], expect=200
    )
    assert (body["user_id"], body["keys_revoked"]) == (uid, 2)
    for key in keys:
        sdk = client(gateway, key["secret"])
        with pytest.raises(openai.AuthenticationError) as err:
            await sdk.chat.completions.create(**CHAT)  # type: ignore[call-overload]
        assert err.value.code == "invalid_api_key"
    assert await redis.hlen(rk.AccountKeys(rk.team_account(tid)).keys) == 0
    current = await cfg(redis, tid)
    assert "ml:" + uid not in current and "me:" + uid not in current
    revoked = await db.fetch("SELECT revoked_at, revoked_by FROM api_keys WHERE team_id = $1", tid)
    assert all(
        r["revoked_at"] is not None and r["revoked_by"] == people["admin"].user["id"]
        for r in revoked
    )
    # The personal key is untouched; past usage stays attributed to the member.
    assert (
        await db.fetchval("SELECT revoked_at FROM api_keys WHERE id = $1", personal["id"]) is None
    )
    row = await eventually(
        lambda: db.fetchrow(
            "SELECT user_id, team_id FROM usage_records WHERE request_id = $1", request_id
        ),
        lambda r: r is not None,
    )
    assert (row["user_id"], row["team_id"]) == (uid, tid)
    # Dashboard access ends: 404 everywhere in the team.
    for method, path in (
        ("GET", f"/api/teams/{tid}"),
        ("GET", f"/api/teams/{tid}/members"),
        ("GET", f"/api/keys?team={tid}"),
    ):
        status, body = await api.call(method, path, session=member)
        assert (status, body["error"]["code"]) == (404, "team_not_found")
    status, _ = await api.call("POST", "/api/keys", session=member, json={"name": "x", "team": tid})
    assert status == 404
    _, me = await api.call("GET", "/api/me", session=member, expect=200)
    assert me["teams"] == []
    audit = await db.fetch(
        "SELECT action FROM audit_log WHERE team_id = $1 AND action LIKE 'key.revoke%' OR"
        " (team_id = $1 AND action = 'member.remove')",
        tid,
    )
    assert sorted(a["action"] for a in audit) == ["key.revoke.member_removed"] * 2 + [
        "member.remove"
    ]


async def test_leaving_and_who_may_remove_whom(gateway: Gateway, api: Api) -> None:
    team, people = await team_with_roles(api)
    tid = team["id"]
    owner, admin, member = people["owner"], people["admin"], people["member"]
    ids = {r: s.user["id"] for r, s in people.items()}
    path = f"/api/teams/{tid}/members/"
    status, body = await api.call("DELETE", path + ids["owner"], session=owner)
    assert (status, body["error"]["code"]) == (403, "owner_cannot_leave")
    await api.call("DELETE", path + ids["owner"], session=admin, expect=403)
    await api.call("DELETE", path + ids["admin"], session=member, expect=403)
    await api.call("DELETE", path + ids["owner"], session=member, expect=403)
    other = await add_member(api, owner, tid)
    await api.call("DELETE", path + other.user["id"], session=member, expect=403)
    _, body = await api.call("DELETE", path + ids["member"], session=member, expect=200)  # leaves
    assert body["keys_revoked"] == 0
    await api.call("GET", f"/api/teams/{tid}", session=member, expect=404)
    await api.call("DELETE", path + other.user["id"], session=admin, expect=200)
    await api.call("DELETE", path + ids["admin"], session=admin, expect=200)  # an admin leaves
    listed = await members(api, owner, tid)
    assert list(listed) == [ids["owner"]]
    assert (await api.overview(owner, tid))["member_count"] == 1


async def test_rejoining_after_removal(gateway: Gateway, api: Api, db: asyncpg.Connection) -> None:
    owner = await api.signup()
    team = await api.team(owner)
    member = await add_member(api, owner, team["id"], "admin")
    key = await api.key(member, team["id"])
    await api.call(
        "DELETE", f"/api/teams/{team['id']}/members/{member.user['id']}", session=owner, expect=200
    )
    _, link = await api.call(
        "POST", f"/api/teams/{team['id']}/invite-link", session=owner, expect=201
    )
    _, req = await api.call("POST", f"/api/join/{link['token']}", session=member, expect=201)
    await api.call(
        "POST",
        f"/api/teams/{team['id']}/join-requests/{req['id']}/approve",
        session=owner,
        expect=200,
    )
    listed = await members(api, owner, team["id"])
    assert listed[member.user["id"]]["role"] == "member"  # a fresh membership, not the old one
    assert await db.fetchval("SELECT revoked_at FROM api_keys WHERE id = $1", key["id"]) is not None


async def test_removing_a_personally_billed_member(
    gateway: Gateway, api: Api, db: asyncpg.Connection, redis: Redis
) -> None:
    team, people = await team_with_roles(api)
    tid, member = team["id"], people["member"]
    uid = member.user["id"]
    # Load the personal account before crediting it. (Rebuilding an account whose credits come
    # from PostgreSQL as a round number hits Accounts._snapshot's str(Decimal('1.0E+9')), which
    # settle's HINCRBY refuses: reported, not this module's to fix.)
    await api.call("GET", "/api/me", session=member, expect=200)
    await api.credit_user(uid, "1.00")
    key = await api.key(member, tid)
    await patch(api, member, tid, uid, 200, billing_mode="personal")
    await patch(api, people["owner"], tid, uid, 200, monthly_limit_usd="0.5")
    user_cfg = rk.AccountKeys(rk.user_account(uid)).cfg
    assert (await redis.hgetall(user_cfg))["ml:" + tid] == "500000000"  # mirrored by billing
    sdk = client(gateway, key["secret"])
    await sdk.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    _, me = await api.call("GET", "/api/me", session=member, expect=200)
    assert me["balance_usd"] == "0.999995650"
    listed = await eventually(
        lambda: members(api, people["owner"], tid),
        lambda m: m[uid]["spend_this_period_usd"] != "0.000000000",
    )
    assert listed[uid]["spend_this_period_usd"] == "0.000004350"
    _, body = await api.call(
        "DELETE", f"/api/teams/{tid}/members/{uid}", session=people["owner"], expect=200
    )
    assert body["keys_revoked"] == 1
    with pytest.raises(openai.AuthenticationError):
        await sdk.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    left = await redis.hgetall(user_cfg)
    assert "ml:" + tid not in left and "me:" + tid not in left
    assert await redis.hlen(rk.AccountKeys(rk.user_account(uid)).keys) == 0


# --- team deletion --------------------------------------------------------------------------------
async def test_delete_team_is_a_soft_delete(
    gateway: Gateway, api: Api, db: asyncpg.Connection, redis: Redis
) -> None:
    team, people = await team_with_roles(api)
    tid = team["id"]
    await api.credit_team(tid, "1.00")
    keys = [await api.key(people[r], tid) for r in ("owner", "admin", "member")]
    sdk = client(gateway, keys[2]["secret"])
    raw = await sdk.chat.completions.with_raw_response.create(**CHAT)  # type: ignore[call-overload]
    request_id = raw.headers["x-request-id"]
    await eventually(
        lambda: db.fetchval("SELECT count(*) FROM usage_records WHERE request_id = $1", request_id),
        lambda n: n == 1,
    )
    _, link = await api.call(
        "POST", f"/api/teams/{tid}/invite-link", session=people["owner"], expect=201
    )
    await api.call("DELETE", f"/api/teams/{tid}", session=people["admin"], expect=403)
    await api.call("DELETE", f"/api/teams/{tid}", session=people["member"], expect=403)
    _, body = await api.call("DELETE", f"/api/teams/{tid}", session=people["owner"], expect=200)
    assert (body["id"], body["keys_revoked"]) == (tid, 3) and body["deleted_at"]

    for key in keys:
        sdk = client(gateway, key["secret"])
        with pytest.raises(openai.AuthenticationError):
            await sdk.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert await redis.hlen(rk.AccountKeys(rk.team_account(tid)).keys) == 0
    assert (
        await db.fetchval(
            "SELECT count(*) FROM api_keys WHERE team_id = $1 AND revoked_at IS NULL", tid
        )
        == 0
    )
    for session in people.values():
        await api.call("GET", f"/api/teams/{tid}", session=session, expect=404)
        _, listed = await api.call("GET", "/api/teams", session=session, expect=200)
        assert tid not in [t["id"] for t in listed["data"]]
    status, body = await api.call("POST", f"/api/join/{link['token']}", session=await api.signup())
    assert (status, body["error"]["code"]) == (410, "invite_link_not_valid")
    _, admin_list = await api.call("GET", "/admin/teams", admin=True, expect=200)
    listed_team = next(t for t in admin_list["data"] if t["id"] == tid)
    assert listed_team["deleted_at"] is not None
    # History stays: usage and the audit trail.
    assert await db.fetchval("SELECT count(*) FROM usage_records WHERE team_id = $1", tid) == 1
    actions = [
        r["action"]
        for r in await db.fetch("SELECT action FROM audit_log WHERE team_id = $1 ORDER BY id", tid)
    ]
    assert actions[0] == "team.create" and actions[-1] == "team.delete"
    assert actions.count("key.revoke.team_deleted") == 3


# --- the audit log --------------------------------------------------------------------------------
async def test_audit_log_newest_first_and_paged(gateway: Gateway, api: Api) -> None:
    team, people = await team_with_roles(api)
    tid = team["id"]
    owner = people["owner"]
    member_id = people["member"].user["id"]
    await patch(api, owner, tid, member_id, 200, monthly_limit_usd="2.5")
    _, body = await api.call("GET", f"/api/teams/{tid}/audit", session=people["admin"], expect=200)
    entries = body["data"]
    assert [e["id"] for e in entries] == sorted((e["id"] for e in entries), reverse=True)
    assert entries[0]["action"] == "member.update"
    assert entries[0]["actor"] == {
        "id": owner.user["id"],
        "email": owner.user["email"],
        "name": "Tester",
    }
    assert entries[0]["target"] == {"type": "user", "id": member_id}
    assert (entries[0]["before"], entries[0]["after"]) == (
        {"monthly_limit_usd": None, "limit_set": False},
        {"monthly_limit_usd": "2.500000000", "limit_set": True},
    )
    assert entries[-1]["action"] == "team.create" and body["has_more"] is False
    assert set(entries[0]) == {
        "id",
        "actor",
        "action",
        "target",
        "before",
        "after",
        "created_at",
        "request_id",
    }
    # Pages of two, following next_before_id, give the same entries.
    paged: list[dict[str, Any]] = []
    query = "?limit=2"
    while True:
        _, page = await api.call("GET", f"/api/teams/{tid}/audit{query}", session=owner, expect=200)
        paged += page["data"]
        if not page["has_more"]:
            break
        query = f"?limit=2&before_id={page['next_before_id']}"
    assert paged == entries
    await api.call("GET", f"/api/teams/{tid}/audit", session=people["member"], expect=403)
    for bad in (
        "limit=0",
        "limit=201",
        "limit=x",
        "before_id=-1",
        "before_id=1e3",
        "limit=%EF%BC%91",
    ):
        status, err = await api.call("GET", f"/api/teams/{tid}/audit?{bad}", session=owner)
        assert (status, err["error"]["param"]) == (400, bad.split("=")[0]), bad


# --- the role matrix, row by row, over HTTP -------------------------------------------------------
async def _route_missing(status: int, body: Any) -> bool:
    return status == 405 or (status == 404 and "Unknown route" in body["error"]["message"])


async def test_matrix_view_team(gateway: Gateway, api: Api) -> None:
    team, people = await team_with_roles(api)
    for role, session in people.items():
        assert (await api.overview(session, team["id"]))["your_role"] == role
        await api.call("GET", f"/api/teams/{team['id']}/members", session=session, expect=200)
        status, body = await api.call("GET", f"/api/teams/{team['id']}/usage", session=session)
        if not await _route_missing(status, body):
            assert status == 200, (role, status, body)


async def test_matrix_own_keys(gateway: Gateway, api: Api) -> None:
    team, people = await team_with_roles(api)
    for session in people.values():
        key = await api.key(session, team["id"])
        await api.call("DELETE", f"/api/keys/{key['id']}", session=session, expect=200)


async def test_matrix_any_members_keys(gateway: Gateway, api: Api) -> None:
    team, people = await team_with_roles(api)
    tid = team["id"]
    mine = {role: await api.key(s, tid, name=role) for role, s in people.items()}
    for role, session in people.items():
        _, body = await api.call("GET", f"/api/keys?team={tid}", session=session, expect=200)
        listed = sorted(k["name"] for k in body["data"])
        assert listed == (["admin", "member", "owner"] if role != "member" else ["member"]), role
        assert all("secret" not in k and "hash" not in k for k in body["data"])
        assert all("last_used_at" in k for k in body["data"])
        emails = {k["name"]: k["user_email"] for k in body["data"]}
        assert all(emails[name] == people[name].user["email"] for name in emails)
    await api.call(
        "DELETE", f"/api/keys/{mine['owner']['id']}", session=people["member"], expect=403
    )
    await api.call(
        "DELETE", f"/api/keys/{mine['member']['id']}", session=people["admin"], expect=200
    )
    await api.call(
        "DELETE", f"/api/keys/{mine['admin']['id']}", session=people["owner"], expect=200
    )


async def test_matrix_manage_members(gateway: Gateway, api: Api) -> None:
    team, people = await team_with_roles(api)
    tid = team["id"]
    for role, session in people.items():
        ok = role != "member"
        status, _ = await api.call(
            "POST",
            f"/api/teams/{tid}/invitations",
            session=session,
            json={"email": f"{role}-invitee-{tid}@example.com", "role": "member"},
        )
        assert status == (201 if ok else 403), role
        for method, path in (
            ("GET", "invitations"),
            ("POST", "invite-link"),
            ("GET", "invite-link"),
            ("DELETE", "invite-link"),
            ("GET", "join-requests"),
        ):
            status, _ = await api.call(method, f"/api/teams/{tid}/{path}", session=session)
            assert (status < 300) is ok and (ok or status == 403), (role, method, path, status)
        target = await add_member(api, people["owner"], tid)
        target_id = target.user["id"]
        await patch(api, session, tid, target_id, 200 if ok else 403, role="admin")
        requester = await api.signup()
        _, link = await api.call(
            "POST", f"/api/teams/{tid}/invite-link", session=people["owner"], expect=201
        )
        _, req = await api.call("POST", f"/api/join/{link['token']}", session=requester, expect=201)
        await api.call(
            "POST",
            f"/api/teams/{tid}/join-requests/{req['id']}/approve",
            session=session,
            expect=200 if ok else 403,
        )
        await api.call(
            "DELETE",
            f"/api/teams/{tid}/members/{target_id}",
            session=session,
            expect=200 if ok else 403,
        )


async def test_matrix_member_policies(gateway: Gateway, api: Api) -> None:
    team, people = await team_with_roles(api)
    tid = team["id"]
    target = await add_member(api, people["owner"], tid)
    for role, session in people.items():
        ok = role != "member"
        for fields in (
            {"monthly_limit_usd": "1.5"},
            {"enforcement": "soft"},
            {"monthly_limit_usd": None},
        ):
            await patch(api, session, tid, target.user["id"], 200 if ok else 403, **fields)
        status, body = await api.call(
            "PATCH", f"/api/teams/{tid}", session=session, json={"default_member_limit_usd": "5"}
        )
        if not await _route_missing(status, body):
            assert status == (200 if ok else 403), (role, status, body)


async def test_matrix_view_billing_and_audit(gateway: Gateway, api: Api) -> None:
    team, people = await team_with_roles(api)
    for role, session in people.items():
        expected = 403 if role == "member" else 200
        await api.call("GET", f"/api/teams/{team['id']}/audit", session=session, expect=expected)
        status, body = await api.call("GET", f"/api/teams/{team['id']}/billing", session=session)
        if not await _route_missing(status, body):
            assert status == expected, (role, status, body)


async def test_matrix_manage_billing(gateway: Gateway, api: Api) -> None:
    team, people = await team_with_roles(api)
    for role, session in people.items():
        status, body = await api.call(
            "PATCH", f"/api/teams/{team['id']}", session=session, json={"spending_limit_usd": "100"}
        )
        if await _route_missing(status, body):
            pytest.skip("PATCH /api/teams/{team} is not built yet")
        assert status == (200 if role == "owner" else 403), (role, status, body)


async def test_matrix_transfer_and_delete(gateway: Gateway, api: Api) -> None:
    team, people = await team_with_roles(api)
    tid = team["id"]
    for role in ("member", "admin"):
        session = people[role]
        await api.call(
            "POST",
            f"/api/teams/{tid}/transfer",
            session=session,
            json={"user_id": people["member"].user["id"]},
            expect=403,
        )
        await api.call("DELETE", f"/api/teams/{tid}", session=session, expect=403)
    await api.call(
        "POST",
        f"/api/teams/{tid}/transfer",
        session=people["owner"],
        json={"user_id": people["admin"].user["id"]},
        expect=200,
    )
    await api.call("DELETE", f"/api/teams/{tid}", session=people["owner"], expect=403)  # admin now
    await api.call("DELETE", f"/api/teams/{tid}", session=people["admin"], expect=200)
