"""Property-based: arbitrary JSON (and non-JSON) thrown at the management endpoints never gets a
500; a refused payload changes nothing (the rows it could touch compare equal before and after);
an accepted one did what it asked (the rows, the answer and the live state in Redis say so).
Examples that change who may do what (a member's role, the owner) each get a team of their own.
Bounded: about 40 examples per endpoint."""

from __future__ import annotations

import unicodedata
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from gateway.metering.accounts import Accounts
from policies import keyspace as rk
from policies.money import parse_usd
from tests.conftest import Gateway
from tests.helpers import PASSWORD, Api, Session, unique_email
from tests.people import add_member, join

FUZZ = settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)

scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=40)
)
json_values = st.recursive(
    scalars,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3)
    ),
    max_leaves=8,
)
money_like = st.sampled_from(
    ["1", "0", "-1", "1e400", "0.0000000001", "12.5", " 3 ", "unlimited", "NaN"]
)
emails = st.sampled_from(
    ["a@b.co", "A@B.CO", "x@y", "@example.com", "a b@c.de", "ü@ü.de", "a@b.c\n"]
)


def body_of(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[Any]:
    """Anything JSON, or an object with a subset of the endpoint's fields set to plausible or
    arbitrary values, plus stray fields."""
    plausible = st.fixed_dictionaries(
        {}, optional={name: values | json_values for name, values in fields.items()}
    )
    with_extra = st.tuples(plausible, st.dictionaries(st.text(max_size=8), json_values, max_size=2))
    return json_values | plausible | with_extra.map(lambda t: {**t[1], **t[0]})


raw_bodies = st.binary(max_size=40)


async def send(
    api: Api, method: str, path: str, session: Session | None, payload: Any, raw: bool
) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", **(session.headers if session else {})}
    kwargs: dict[str, Any] = {"data": payload} if raw else {"json": payload}
    async with api.http.request(method, api.base + path, headers=headers, **kwargs) as resp:
        body = (
            await resp.json(content_type=None)
            if resp.content_type == "application/json"
            else await resp.text()
        )
        return resp.status, body


async def check(
    api: Api,
    method: str,
    path: str,
    session: Session | None,
    payload: Any,
    raw: bool,
    state: Callable[[], Awaitable[Any]],
    ok: int,
) -> tuple[Any, Any] | None:
    """Send ``payload``; never a 500, and a refusal changes nothing. On success, the answer and
    the state before, for the caller to check what changed; None when refused."""
    before = await state()
    status, body = await send(api, method, path, session, payload, raw)
    assert status < 500, (payload, status, body)
    if status == ok:
        return body, before
    assert set(body) == {"error"}, body
    if status == 400:
        assert body["error"]["type"] == "invalid_request_error"
    assert await state() == before, (payload, status, body)
    return None


def payloads(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[tuple[Any, bool]]:
    return st.tuples(body_of(fields), st.just(False)) | st.tuples(raw_bodies, st.just(True))


@FUZZ
@given(
    case=payloads({"email": emails, "password": st.text(max_size=12), "name": st.text(max_size=12)})
)
@example(case=({"email": " " + unique_email("fuzz"), "password": PASSWORD, "name": "Ü"}, False))
async def test_signup(
    gateway: Gateway, api: Api, db: asyncpg.Connection, case: tuple[Any, bool]
) -> None:
    async def state() -> Any:
        return await db.fetchval("SELECT count(*) FROM users")

    done = await check(api, "POST", "/api/auth/signup", None, case[0], case[1], state, 201)
    if done is not None:
        body, before = done
        assert await state() == before + 1
        assert body["user"]["email"] == case[0]["email"].strip()


@pytest.fixture
async def people(api: Api) -> dict[str, Session]:
    """An owner and a user who joins each of the owner's fresh teams (signed up once: a password
    hash is the slow part)."""
    return {"owner": await api.signup(), "member": await api.signup()}


async def fresh_team(api: Api, people: dict[str, Session]) -> str:
    """A team of its own for one example: the owner's, the other person a member."""
    team = await api.team(people["owner"])
    await join(api, people["owner"], team["id"], people["member"])
    return str(team["id"])


@pytest.fixture
async def team(api: Api) -> dict[str, Any]:
    owner = await api.signup()
    team = await api.team(owner)
    member = await add_member(api, owner, team["id"])
    return {"owner": owner, "member": member, "id": team["id"]}


@FUZZ
@given(case=payloads({"name": st.text(max_size=120)}))
@example(case=({"name": " Cafe\u0301 "}, False))
async def test_create_team(
    gateway: Gateway, api: Api, db: asyncpg.Connection, team: dict[str, Any], case: tuple[Any, bool]
) -> None:
    async def state() -> Any:
        return await db.fetchval(
            "SELECT count(*) FROM teams WHERE owner_id = $1", team["owner"].user["id"]
        )

    done = await check(api, "POST", "/api/teams", team["owner"], case[0], case[1], state, 201)
    if done is not None:
        body, before = done
        assert await state() == before + 1
        assert body["name"] == unicodedata.normalize("NFC", case[0]["name"]).strip()


@FUZZ
@given(
    case=payloads(
        {
            "role": st.sampled_from(["owner", "admin", "member", "", "ADMIN"]),
            "monthly_limit_usd": money_like,
            "enforcement": st.sampled_from(["hard", "soft", "HARD"]),
            "billing_mode": st.sampled_from(["team", "personal", "x"]),
        }
    )
)
@example(case=({"role": "admin", "monthly_limit_usd": "12.5", "enforcement": "soft"}, False))
@example(case=({"monthly_limit_usd": " unlimited "}, False))
@example(case=({"monthly_limit_usd": None, "enforcement": None}, False))
async def test_patch_member(
    gateway: Gateway,
    api: Api,
    db: asyncpg.Connection,
    redis: Redis,
    people: dict[str, Session],
    case: tuple[Any, bool],
) -> None:
    tid, uid = await fresh_team(api, people), people["member"].user["id"]
    cfg_key = rk.AccountKeys(rk.team_account(tid)).cfg

    async def state() -> Any:
        rows = await db.fetch("SELECT * FROM memberships WHERE team_id = $1 ORDER BY id", tid)
        audit = await db.fetchval("SELECT count(*) FROM audit_log WHERE team_id = $1", tid)
        return [dict(r) for r in rows], await redis.hgetall(cfg_key), audit

    path = f"/api/teams/{tid}/members/{uid}"
    done = await check(api, "PATCH", path, people["owner"], case[0], case[1], state, 200)
    if done is None:
        return
    body, payload = done[0], case[0]
    row = await db.fetchrow(
        "SELECT * FROM memberships WHERE team_id = $1 AND user_id = $2 AND removed_at IS NULL",
        tid,
        uid,
    )
    if "role" in payload:
        assert body["role"] == row["role"] == payload["role"]
    if payload.get("enforcement") is not None:
        assert body["enforcement"] == row["enforcement"] == payload["enforcement"]
    if "monthly_limit_usd" in payload:
        limit = payload["monthly_limit_usd"]
        unlimited = isinstance(limit, str) and limit.strip().lower() == "unlimited"
        assert row["limit_set"] == (limit is not None)
        assert row["monthly_limit"] == (None if unlimited or limit is None else parse_usd(limit))
    # The live state says what the row says.
    cfg = await redis.hgetall(cfg_key)
    mine = {k: v for k, v in cfg.items() if k in Accounts.member_fields(uid)}
    assert mine == Accounts.member_cfg(uid, row)


@FUZZ
@given(
    case=payloads(
        {
            "email": emails,
            "role": st.sampled_from(["owner", "admin", "member"]),
            "expires_in_s": st.integers(min_value=-5, max_value=2_592_005) | st.floats(),
        }
    )
)
@example(case=({"email": unique_email("fuzz"), "role": "admin"}, False))
async def test_create_invitation(
    gateway: Gateway, api: Api, db: asyncpg.Connection, team: dict[str, Any], case: tuple[Any, bool]
) -> None:
    async def state() -> Any:
        invitations = await db.fetch(
            "SELECT * FROM invitations WHERE team_id = $1 ORDER BY id", team["id"]
        )
        return [dict(r) for r in invitations], await db.fetchval("SELECT count(*) FROM outbox")

    path = f"/api/teams/{team['id']}/invitations"
    done = await check(api, "POST", path, team["owner"], case[0], case[1], state, 201)
    if done is not None:
        body, (invitations, mails) = done
        after, sent = await state()
        assert (len(after), sent) == (len(invitations) + 1, mails + 1)
        assert (body["role"], body["status"]) == (case[0]["role"], "pending")
        assert {r["id"] for r in after} - {r["id"] for r in invitations} == {body["id"]}


@FUZZ
@given(case=payloads({"user_id": st.sampled_from(["usr_" + "0" * 20, "", "x", "member"])}))
@example(case=({"user_id": "member"}, False))
async def test_transfer(
    gateway: Gateway,
    api: Api,
    db: asyncpg.Connection,
    people: dict[str, Session],
    case: tuple[Any, bool],
) -> None:
    tid, uid = await fresh_team(api, people), people["member"].user["id"]

    async def state() -> Any:
        rows = await db.fetch("SELECT * FROM memberships WHERE team_id = $1 ORDER BY id", tid)
        owner = await db.fetchval("SELECT owner_id FROM teams WHERE id = $1", tid)
        return [dict(r) for r in rows], owner

    payload, raw = case
    if not raw and isinstance(payload, dict) and payload.get("user_id") == "member":
        payload = {**payload, "user_id": uid}
    path = f"/api/teams/{tid}/transfer"
    done = await check(api, "POST", path, people["owner"], payload, raw, state, 200)
    if done is not None:
        rows, owner = await state()
        assert owner == uid == done[0]["owner_id"]
        roles = {r["user_id"]: r["role"] for r in rows}
        assert roles == {uid: "owner", people["owner"].user["id"]: "admin"}


@FUZZ
@given(
    case=payloads(
        {
            "name": st.text(max_size=120),
            "team": st.sampled_from(["own", "", "team_" + "0" * 20]) | st.text(max_size=30),
        }
    )
)
@example(case=({"name": "k", "team": "own"}, False))
@example(case=({"name": "k"}, False))
async def test_create_key(
    gateway: Gateway,
    api: Api,
    db: asyncpg.Connection,
    redis: Redis,
    team: dict[str, Any],
    case: tuple[Any, bool],
) -> None:
    user_id = team["member"].user["id"]

    async def state() -> Any:
        return await db.fetchval("SELECT count(*) FROM api_keys WHERE user_id = $1", user_id)

    payload = case[0]
    if not case[1] and isinstance(payload, dict) and payload.get("team") == "own":
        payload = {**payload, "team": team["id"]}
    done = await check(api, "POST", "/api/keys", team["member"], payload, case[1], state, 201)
    if done is not None:
        body, before = done
        assert await state() == before + 1
        assert body["team_id"] == (payload.get("team") or payload.get("team_id") or None)
        assert body["secret"].startswith(body["prefix"])
        # it bills at once: in the live key set of the account it bills
        billed = rk.team_account(team["id"]) if body["team_id"] else rk.user_account(user_id)
        assert await redis.hexists(rk.AccountKeys(billed).keys, body["id"])
