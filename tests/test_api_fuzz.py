"""Property-based: arbitrary JSON (and non-JSON) thrown at the management endpoints never gets a
500, and a refused payload changes nothing (the rows it could touch compare equal before and
after). Bounded: about 40 examples per endpoint."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from redis.asyncio import Redis

from policies import keyspace as rk
from tests.conftest import Gateway
from tests.helpers import Api, Session
from tests.people import add_member

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
) -> None:
    before = await state()
    status, body = await send(api, method, path, session, payload, raw)
    assert status < 500, (payload, status, body)
    if status != ok:
        assert set(body) == {"error"}, body
        if status == 400:
            assert body["error"]["type"] == "invalid_request_error"
        assert await state() == before, (payload, status, body)


def payloads(fields: dict[str, st.SearchStrategy[Any]]) -> st.SearchStrategy[tuple[Any, bool]]:
    return st.tuples(body_of(fields), st.just(False)) | st.tuples(raw_bodies, st.just(True))


@FUZZ
@given(
    case=payloads({"email": emails, "password": st.text(max_size=12), "name": st.text(max_size=12)})
)
async def test_signup(
    gateway: Gateway, api: Api, db: asyncpg.Connection, case: tuple[Any, bool]
) -> None:
    async def state() -> Any:
        return await db.fetchval("SELECT count(*) FROM users")

    await check(api, "POST", "/api/auth/signup", None, case[0], case[1], state, 201)


@pytest.fixture
async def team(api: Api) -> dict[str, Any]:
    owner = await api.signup()
    team = await api.team(owner)
    member = await add_member(api, owner, team["id"])
    return {"owner": owner, "member": member, "id": team["id"]}


@FUZZ
@given(case=payloads({"name": st.text(max_size=120)}))
async def test_create_team(
    gateway: Gateway, api: Api, db: asyncpg.Connection, team: dict[str, Any], case: tuple[Any, bool]
) -> None:
    async def state() -> Any:
        return await db.fetchval(
            "SELECT count(*) FROM teams WHERE owner_id = $1", team["owner"].user["id"]
        )

    await check(api, "POST", "/api/teams", team["owner"], case[0], case[1], state, 201)


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
async def test_patch_member(
    gateway: Gateway,
    api: Api,
    db: asyncpg.Connection,
    redis: Redis,
    team: dict[str, Any],
    case: tuple[Any, bool],
) -> None:
    async def state() -> Any:
        rows = await db.fetch(
            "SELECT * FROM memberships WHERE team_id = $1 ORDER BY id", team["id"]
        )
        cfg = await redis.hgetall(rk.AccountKeys(rk.team_account(team["id"])).cfg)
        audit = await db.fetchval("SELECT count(*) FROM audit_log WHERE team_id = $1", team["id"])
        return [dict(r) for r in rows], cfg, audit

    path = f"/api/teams/{team['id']}/members/{team['member'].user['id']}"
    await check(api, "PATCH", path, team["owner"], case[0], case[1], state, 200)


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
async def test_create_invitation(
    gateway: Gateway, api: Api, db: asyncpg.Connection, team: dict[str, Any], case: tuple[Any, bool]
) -> None:
    async def state() -> Any:
        invitations = await db.fetch(
            "SELECT * FROM invitations WHERE team_id = $1 ORDER BY id", team["id"]
        )
        return [dict(r) for r in invitations], await db.fetchval("SELECT count(*) FROM outbox")

    path = f"/api/teams/{team['id']}/invitations"
    await check(api, "POST", path, team["owner"], case[0], case[1], state, 201)


@FUZZ
@given(case=payloads({"user_id": st.sampled_from(["usr_" + "0" * 20, "", "x"])}))
async def test_transfer(
    gateway: Gateway, api: Api, db: asyncpg.Connection, team: dict[str, Any], case: tuple[Any, bool]
) -> None:
    async def state() -> Any:
        rows = await db.fetch(
            "SELECT * FROM memberships WHERE team_id = $1 ORDER BY id", team["id"]
        )
        return [dict(r) for r in rows], await db.fetchval(
            "SELECT owner_id FROM teams WHERE id = $1", team["id"]
        )

    path = f"/api/teams/{team['id']}/transfer"
    await check(api, "POST", path, team["owner"], case[0], case[1], state, 200)


@FUZZ
@given(
    case=payloads(
        {
            "name": st.text(max_size=120),
            "team": st.sampled_from(["own", "", "team_" + "0" * 20]) | st.text(max_size=30),
        }
    )
)
async def test_create_key(
    gateway: Gateway, api: Api, db: asyncpg.Connection, team: dict[str, Any], case: tuple[Any, bool]
) -> None:
    user_id = team["member"].user["id"]

    async def state() -> Any:
        return await db.fetchval("SELECT count(*) FROM api_keys WHERE user_id = $1", user_id)

    payload = case[0]
    if not case[1] and isinstance(payload, dict) and payload.get("team") == "own":
        payload = {**payload, "team": team["id"]}
    await check(api, "POST", "/api/keys", team["member"], payload, case[1], state, 201)
