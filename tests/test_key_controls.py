"""Key controls and rate limits through the public API (contract section 10): what a key's
creator or the team's owners and admins set, what the proxy answers, and what is refused."""

from __future__ import annotations

import time
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import openai
import pytest
from redis.asyncio import Redis

from policies import keyspace as rk
from policies.limits import KeyControls, key_entry
from policies.periods import seconds_to_period_end
from tests.billing_support import exact, models, patch_member, patch_team, usd
from tests.conftest import Gateway
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api, Session, chat, metric
from tests.people import add_member, client

BODY = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat().replace("+00:00", "Z")


async def make_key(
    api: Api, session: Session, team_id: str | None, expect: int = 201, **controls: Any
) -> Any:
    payload = {"name": "scoped", **controls}
    if team_id is not None:
        payload["team"] = team_id
    _, body = await api.call("POST", "/api/keys", session=session, json=payload, expect=expect)
    return body


async def patch_key(
    api: Api, session: Session, key_id: str, expect: int = 200, **fields: Any
) -> Any:
    _, body = await api.call(
        "PATCH", f"/api/keys/{key_id}", session=session, json=fields, expect=expect
    )
    return body


async def listed(api: Api, session: Session, team_id: str | None, key_id: str) -> dict[str, Any]:
    path = "/api/keys" + (f"?team={team_id}" if team_id else "")
    _, body = await api.call("GET", path, session=session, expect=200)
    return next(k for k in body["data"] if k["id"] == key_id)


async def test_controls_are_set_at_creation_shown_and_changed(
    gateway: Gateway, api: Api, db: asyncpg.Connection, redis: Redis
) -> None:
    owner, team, _ = await api.funded_team_key()
    expires = int(time.time()) + 86400
    key = await make_key(
        api,
        owner,
        team["id"],
        expires_at=iso(expires + 0.75),
        models=["gpt-4o-mini", "gpt-4o", "gpt-4o-mini"],
        monthly_limit_usd="20",
        rpm=60,
        tpm=40000,
    )
    assert key["expires_at"] == datetime.fromtimestamp(expires, UTC).isoformat()
    assert (key["models"], key["monthly_limit_usd"], key["rpm"], key["tpm"]) == (
        ["gpt-4o-mini", "gpt-4o"],
        "20.000000000",
        60,
        40000,
    )
    row = await listed(api, owner, team["id"], key["id"])
    assert row["spend_this_period_usd"] == "0.000000000"
    assert row["rate_usage"] == {"requests": 0, "tokens": 0, "window_s": 60}
    entry = await redis.hget(rk.AccountKeys(rk.team_account(team["id"])).keys, key["id"])
    assert entry == key_entry(
        owner.user["id"],
        KeyControls(expires, ("gpt-4o-mini", "gpt-4o"), 20 * 10**9, 60, 40000),
    )
    changed = await patch_key(api, owner, key["id"], rpm=None, models=None, name="renamed")
    assert (changed["rpm"], changed["models"], changed["name"]) == (None, None, "renamed")
    assert changed["tpm"] == 40000
    entry = await redis.hget(rk.AccountKeys(rk.team_account(team["id"])).keys, key["id"])
    assert entry == key_entry(owner.user["id"], KeyControls(expires, None, 20 * 10**9, None, 40000))
    audit = await db.fetch(
        "SELECT action, before, after FROM audit_log WHERE target_id = $1 ORDER BY id", key["id"]
    )
    assert [a["action"] for a in audit] == ["key.create", "key.update"]
    assert (
        audit[1]["before"] == '{"rpm": 60, "name": "scoped", "models": ["gpt-4o-mini", "gpt-4o"]}'
    )
    assert audit[1]["after"] == '{"rpm": null, "name": "renamed", "models": null}'


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("expires_at", "PAST"),
        ("expires_at", "NOW"),
        ("expires_at", "tomorrow"),
        ("expires_at", 5),
        ("models", ["gpt-4o-mini", "gpt-5-imaginary"]),
        ("models", "gpt-4o-mini"),
        ("models", [3]),
        ("rpm", -1),
        ("rpm", 1.5),
        ("rpm", "60"),
        ("rpm", True),
        ("tpm", -5),
        ("tpm", 2.0),
        ("monthly_limit_usd", "0.0000000001"),
        ("monthly_limit_usd", "-1"),
        ("monthly_limit_usd", "abc"),
        ("nmae", "typo"),
    ],
)
async def test_bad_controls_are_refused_naming_the_field_and_change_nothing(
    gateway: Gateway, api: Api, db: asyncpg.Connection, field: str, value: Any
) -> None:
    owner, team, _ = await api.funded_team_key()
    now = gateway.clock.now()
    value = (
        {"PAST": iso(now - 1), "NOW": iso(now)}.get(value, value)
        if isinstance(value, str)
        else value
    )
    count = "SELECT count(*) FROM api_keys WHERE team_id = $1"
    before = await db.fetchval(count, team["id"])
    body = await make_key(api, owner, team["id"], expect=400, **{field: value})
    assert body["error"]["param"] == field
    assert body["error"]["type"] == "invalid_request_error"
    assert await db.fetchval(count, team["id"]) == before
    if field == "expires_at" and value in (iso(now - 1), iso(now)):
        # on a change a past expiry is allowed: it expires the key at once
        key = await make_key(api, owner, team["id"])
        await patch_key(api, owner, key["id"], expires_at=value)
        return
    key = await make_key(api, owner, team["id"], rpm=7)
    row = await db.fetchrow("SELECT * FROM api_keys WHERE id = $1", key["id"])
    body = await patch_key(api, owner, key["id"], expect=400, **{"name": "changed", field: value})
    assert body["error"]["param"] == field
    assert await db.fetchrow("SELECT * FROM api_keys WHERE id = $1", key["id"]) == row


async def test_expiry_takes_effect_on_the_next_request(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession
) -> None:
    owner, team, _ = await api.funded_team_key()
    now = int(gateway.clock.now())
    gateway.clock.fixed = float(now)
    key = await make_key(api, owner, team["id"], expires_at=iso(now + 30))
    assert (await chat(http, gateway, key["secret"], BODY)).status == 200
    gateway.clock.fixed = now + 29.999
    assert (await chat(http, gateway, key["secret"], BODY)).status == 200
    gateway.clock.fixed = float(now + 30)  # the exact second
    reply = await chat(http, gateway, key["secret"], BODY)
    assert (reply.status, reply.code) == (401, "invalid_api_key")
    assert reply.body["error"]["message"] == "This API key has expired."
    async with http.get(
        gateway.v1 + "/models", headers={"Authorization": f"Bearer {key['secret']}"}
    ) as r:
        assert r.status == 401
    # the owner extends it: valid again at once
    await patch_key(api, owner, key["id"], expires_at=iso(now + 3600))
    assert (await chat(http, gateway, key["secret"], BODY)).status == 200
    await patch_key(api, owner, key["id"], expires_at=None)
    gateway.clock.fixed = float(now + 10**6)
    assert (await chat(http, gateway, key["secret"], BODY)).status == 200


async def test_a_key_only_reaches_its_models(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession
) -> None:
    owner, team, _ = await api.funded_team_key()
    key = await make_key(api, owner, team["id"], models=["gpt-4o"])
    reply = await chat(http, gateway, key["secret"], BODY)
    assert (reply.status, reply.code, reply.body["error"]["param"]) == (
        403,
        "model_not_allowed",
        "model",
    )
    assert (await chat(http, gateway, key["secret"], {**BODY, "model": "gpt-4o"})).status == 200
    assert await models(http, gateway, key["secret"]) == ["gpt-4o"]
    # the team's restrictions still apply on top
    await patch_team(api, owner, team["id"], model_restrictions=["gpt-4o"])
    assert await models(http, gateway, key["secret"]) == []
    assert (await chat(http, gateway, key["secret"], {**BODY, "model": "gpt-4o"})).status == 403


async def test_key_limit_is_hard_and_counts_this_period(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession, fake: FakeUpstream
) -> None:
    req = exact(gateway, fake)
    owner, team, _ = await api.funded_team_key()
    key = await make_key(api, owner, team["id"], monthly_limit_usd=usd(3 * req.cost))
    now = gateway.clock.now()
    gateway.clock.fixed = now
    for _ in range(3):
        assert (await chat(http, gateway, key["secret"], req.body)).status == 200
    reply = await chat(http, gateway, key["secret"], req.body)
    assert (reply.status, reply.code) == (429, "key_limit_reached")
    assert reply.headers["Retry-After"] == str(seconds_to_period_end(now))
    row = await listed(api, owner, team["id"], key["id"])
    assert row["spend_this_period_usd"] == usd(3 * req.cost)
    assert row["refused_this_period"] == {"key_limit_reached": 1}
    # another key of the same member is not limited by it
    other = await make_key(api, owner, team["id"])
    assert (await chat(http, gateway, other["secret"], req.body)).status == 200
    await patch_key(api, owner, key["id"], monthly_limit_usd=usd(4 * req.cost))
    assert (await chat(http, gateway, key["secret"], req.body)).status == 200
    text = await (await http.get(gateway.base + "/metrics")).text()
    assert metric(text, "modelbridge_limit_rejections_total", reason="key_limit_reached") >= 1


async def test_rpm_per_key_with_openai_headers_on_both_paths(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession
) -> None:
    owner, team, _ = await api.funded_team_key()
    key = await make_key(api, owner, team["id"], rpm=3)
    now = gateway.clock.now()
    gateway.clock.fixed = now
    plain = await chat(http, gateway, key["secret"], BODY)  # the lean front
    assert plain.status == 200
    assert plain.headers["x-ratelimit-limit-requests"] == "3"
    assert plain.headers["x-ratelimit-remaining-requests"] == "2"
    assert plain.headers["x-ratelimit-reset-requests"] == "1m0s"
    assert "x-ratelimit-limit-tokens" not in plain.headers
    gateway.clock.fixed = now + 20
    async with http.post(
        gateway.v1 + "/chat/completions",
        json={**BODY, "stream": True},
        headers={"Authorization": f"Bearer {key['secret']}"},
    ) as resp:  # a stream (the lean front's too)
        await resp.read()
        assert resp.status == 200
        assert resp.headers["x-ratelimit-remaining-requests"] == "1"
        assert resp.headers["x-ratelimit-reset-requests"] == "40s"
    assert (await chat(http, gateway, key["secret"], BODY)).status == 200
    reply = await chat(http, gateway, key["secret"], BODY)
    assert (reply.status, reply.code) == (429, "rate_limit_exceeded")
    assert reply.headers["Retry-After"] == "40"
    assert reply.headers["x-ratelimit-remaining-requests"] == "0"
    row = await listed(api, owner, team["id"], key["id"])
    assert row["rate_usage"]["requests"] == 3
    gateway.clock.fixed = now + 60  # the first request leaves the window
    assert (await chat(http, gateway, key["secret"], BODY)).status == 200
    reply = await chat(http, gateway, key["secret"], BODY)
    assert (reply.status, reply.headers["Retry-After"]) == (429, "20")
    refused = (await listed(api, owner, team["id"], key["id"]))["refused_this_period"]
    assert refused == {"rate_limit_exceeded": 2}
    text = await (await http.get(gateway.base + "/metrics")).text()
    assert metric(text, "modelbridge_limit_rejections_total", reason="rate_limit_exceeded") >= 2


async def test_tpm_counts_the_worst_case_then_the_actual_tokens(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession, fake: FakeUpstream
) -> None:
    req = exact(gateway, fake, max_tokens=5)
    worst = req.prompt_tokens + 5
    owner, team, _ = await api.funded_team_key()
    key = await make_key(api, owner, team["id"], tpm=3 * worst)
    gateway.clock.fixed = gateway.clock.now()
    fake.set_default(prompt_tokens=req.prompt_tokens, completion_tokens=2)
    first = await chat(http, gateway, key["secret"], req.body)
    # admitted on its worst case ...
    assert first.headers["x-ratelimit-limit-tokens"] == str(3 * worst)
    assert first.headers["x-ratelimit-remaining-tokens"] == str(2 * worst)
    # ... and corrected to what it used when it settled
    second = await chat(http, gateway, key["secret"], req.body)
    used = req.prompt_tokens + 2
    assert second.headers["x-ratelimit-remaining-tokens"] == str(3 * worst - used - worst)
    row = await listed(api, owner, team["id"], key["id"])
    assert row["rate_usage"] == {"requests": 2, "tokens": 2 * used, "window_s": 60}
    # a request larger than the limit can never fit
    await patch_key(api, owner, key["id"], tpm=worst - 1)
    reply = await chat(http, gateway, key["secret"], req.body)
    assert (reply.status, reply.code, reply.headers["Retry-After"]) == (
        429,
        "rate_limit_exceeded",
        "60",
    )


async def test_member_and_team_rate_limits(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession
) -> None:
    owner, team, _ = await api.funded_team_key()
    tid = team["id"]
    member = await add_member(api, owner, tid)
    mine = [await make_key(api, member, tid) for _ in range(2)]
    # a member may not set their own rate limit; an owner may
    await patch_member(api, member, tid, member.user["id"], expect=403, rpm=100)
    changed = await patch_member(api, owner, tid, member.user["id"], rpm=2, tpm=None)
    assert (changed["rpm"], changed["tpm"]) == (2, None)
    gateway.clock.fixed = gateway.clock.now()
    assert (await chat(http, gateway, mine[0]["secret"], BODY)).status == 200
    assert (await chat(http, gateway, mine[1]["secret"], BODY)).status == 200
    reply = await chat(http, gateway, mine[0]["secret"], BODY)
    assert (reply.status, reply.code) == (429, "rate_limit_exceeded")
    # the owner's keys are not the member's
    own = await make_key(api, owner, tid)
    assert (await chat(http, gateway, own["secret"], BODY)).status == 200
    # the team limit binds everyone's keys together, counted from when it is set
    body = await patch_team(api, owner, tid, rpm_limit=4, tpm_limit=None)
    assert (body["rpm_limit"], body["tpm_limit"]) == (4, None)
    for left in (3, 2, 1, 0):
        ok = await chat(http, gateway, own["secret"], BODY)
        assert ok.headers["x-ratelimit-remaining-requests"] == str(left)
    assert (await chat(http, gateway, own["secret"], BODY)).code == "rate_limit_exceeded"
    await patch_member(api, owner, tid, member.user["id"], rpm=None)
    assert (await chat(http, gateway, mine[1]["secret"], BODY)).code == "rate_limit_exceeded"
    await patch_team(api, owner, tid, rpm_limit=None)
    assert (await chat(http, gateway, mine[0]["secret"], BODY)).status == 200
    status, _ = await api.call("PATCH", f"/api/teams/{tid}", session=owner, json={"rpm_limit": -1})
    assert status == 400


async def test_who_may_change_a_key(gateway: Gateway, api: Api) -> None:
    owner, team, _ = await api.funded_team_key()
    tid = team["id"]
    member = await add_member(api, owner, tid)
    admin = await add_member(api, owner, tid, role="admin")
    other = await add_member(api, owner, tid)
    stranger = await api.signup()
    key = await make_key(api, member, tid, rpm=10)
    assert (await patch_key(api, member, key["id"], rpm=20))["rpm"] == 20  # its creator
    assert (await patch_key(api, admin, key["id"], rpm=30))["rpm"] == 30
    assert (await patch_key(api, owner, key["id"], rpm=40))["rpm"] == 40
    await patch_key(api, other, key["id"], expect=403, rpm=50)
    await patch_key(api, stranger, key["id"], expect=404, rpm=50)
    # members see their own keys' settings, not others'
    _, body = await api.call("GET", f"/api/keys?team={tid}", session=other, expect=200)
    assert body["data"] == []
    assert (await listed(api, member, tid, key["id"]))["rpm"] == 40
    personal = await make_key(api, member, None, tpm=1000)
    await patch_key(api, owner, personal["id"], expect=404, tpm=1)
    assert (await listed(api, member, None, personal["id"]))["tpm"] == 1000


async def test_openai_sdk_sees_the_limits(gateway: Gateway, api: Api, fake: FakeUpstream) -> None:
    owner, team, _ = await api.funded_team_key()
    key = await make_key(api, owner, team["id"], rpm=1)
    gateway.clock.fixed = gateway.clock.now()
    sdk = client(gateway, key["secret"])
    raw = await sdk.chat.completions.with_raw_response.create(**BODY)  # type: ignore[call-overload]
    assert raw.headers["x-ratelimit-remaining-requests"] == "0"
    with pytest.raises(openai.RateLimitError) as caught:
        await sdk.chat.completions.create(**BODY)  # type: ignore[call-overload]
    assert caught.value.code == "rate_limit_exceeded"
    assert caught.value.response.headers["retry-after"] == "60"


async def test_controls_survive_a_rebuild(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession, redis: Redis
) -> None:
    owner, team, _ = await api.funded_team_key()
    tid = team["id"]
    key = await make_key(api, owner, tid, models=["gpt-4o"], rpm=5)
    await patch_team(api, owner, tid, rpm_limit=9, tpm_limit=900)
    await patch_member(api, owner, tid, owner.user["id"], tpm=800)
    ak = rk.AccountKeys(rk.team_account(tid))
    entry = await redis.hget(ak.keys, key["id"])
    cfg = await redis.hgetall(ak.cfg)
    await redis.delete(ak.state, ak.keys, ak.cfg)
    assert (await chat(http, gateway, key["secret"], {**BODY, "model": "gpt-4o"})).status == 200
    assert await redis.hget(ak.keys, key["id"]) == entry
    rebuilt = await redis.hgetall(ak.cfg)
    assert {k: rebuilt.get(k) for k in cfg} == cfg
    assert (rebuilt["rpm"], rebuilt["tpm"], rebuilt["tpm:" + owner.user["id"]]) == (
        "9",
        "900",
        "800",
    )


async def test_a_rate_window_survives_a_rebuild_of_its_account(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession, redis: Redis
) -> None:
    """The logs' counts live in the account's state hash, which a rebuild replaces: they are kept
    (a forced reload), or counted again from the logs (a state hash lost alone)."""
    from gateway import state as S

    owner, team, _ = await api.funded_team_key()
    key = await make_key(api, owner, team["id"], rpm=3)
    account = rk.team_account(team["id"])
    ak = rk.AccountKeys(account)
    gateway.clock.fixed = gateway.clock.now()
    for _ in range(2):
        assert (await chat(http, gateway, key["secret"], BODY)).status == 200
    counted = await redis.hmget(ak.state, ["rc:k:" + key["id"], "rs:k:" + key["id"]])
    assert counted[0] is not None and counted[0].startswith("2|")
    assert await gateway.app[S.ACCOUNTS].load(account, gateway.clock.now(), force=True)
    assert await redis.hmget(ak.state, ["rc:k:" + key["id"], "rs:k:" + key["id"]]) == counted
    assert (await chat(http, gateway, key["secret"], BODY)).status == 200
    await redis.delete(ak.state)  # lost alone: the next request rebuilds it, the log counts
    reply = await chat(http, gateway, key["secret"], BODY)
    assert (reply.status, reply.code) == (429, "rate_limit_exceeded")
    assert reply.headers["x-ratelimit-remaining-requests"] == "0"


async def test_controls_follow_a_key_into_personal_billing(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession, fake: FakeUpstream
) -> None:
    req = exact(gateway, fake)
    owner, team, _ = await api.funded_team_key()
    tid = team["id"]
    member = await add_member(api, owner, tid)
    await api.credit_user(member.user["id"], "1.00")
    key = await make_key(
        api, member, tid, monthly_limit_usd=usd(3 * req.cost), models=["gpt-4o-mini"]
    )
    gateway.clock.fixed = gateway.clock.now()
    for _ in range(2):
        assert (await chat(http, gateway, key["secret"], req.body)).status == 200
    await patch_member(api, member, tid, member.user["id"], billing_mode="personal")
    # the key's spend billed to the team still counts against its limit
    assert (await chat(http, gateway, key["secret"], req.body)).status == 200
    assert (await chat(http, gateway, key["secret"], req.body)).code == "key_limit_reached"
    assert (
        await chat(http, gateway, key["secret"], {**req.body, "model": "gpt-4o"})
    ).code == "model_not_allowed"
    assert (await listed(api, member, tid, key["id"]))["spend_this_period_usd"] == usd(3 * req.cost)
    # a member rate limit reaches the personally billed keys too
    await patch_key(api, member, key["id"], monthly_limit_usd=None)
    await patch_member(api, owner, tid, member.user["id"], rpm=0)
    assert (await chat(http, gateway, key["secret"], req.body)).code == "rate_limit_exceeded"
    await patch_member(api, owner, tid, member.user["id"], rpm=None)
    assert (await chat(http, gateway, key["secret"], req.body)).status == 200
