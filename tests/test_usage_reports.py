"""Usage reports through the gateway: exact rows for every grouping, day boundaries, CSV bytes,
validation, who may read them, personal usage, and sums that equal the debits to the nano-dollar.

Requests go through the proxy at chosen instants (``gateway.clock.fixed``) with the token counts
chosen through the fake upstream; the usage writer moves the records into PostgreSQL. The test on
the real clock alternates its requests over the gateway processes (two under ``--redis-cluster``,
each with its own usage writer: ``tests/replicas.py``).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import pytest

from policies.money import format_usd
from tests.conftest import Gateway
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api, HasV1, Session, chat, eventually
from tests.replicas import Replicas

pytestmark = pytest.mark.cluster

PRICES = {"gpt-4o-mini": (150, 600), "gpt-4o": (2500, 10_000)}  # nano-USD per token in / out


def at(text: str) -> float:
    return datetime.fromisoformat(text).replace(tzinfo=UTC).timestamp()


def cost(model: str, prompt: int, completion: int, bps: int = 0) -> tuple[int, int, int]:
    """(list, discount, charged) of one request, by the contract's formula."""
    inp, out = PRICES[model]
    listed = prompt * inp + completion * out
    charged = listed * (10_000 - bps) // 10_000
    return listed, listed - charged, charged


def row(
    group: str | None, reqs: list[tuple[str, int, int]], bps: int = 0, **extra: Any
) -> dict[str, Any]:
    """The expected report row of these (model, prompt, completion) requests."""
    costs = [cost(m, p, c, bps) for m, p, c in reqs]
    return {
        "group": group,
        **extra,
        "requests": len(reqs),
        "prompt_tokens": sum(p for _, p, _ in reqs),
        "completion_tokens": sum(c for _, _, c in reqs),
        "list_cost_usd": format_usd(sum(x[0] for x in costs)),
        "discount_usd": format_usd(sum(x[1] for x in costs)),
        "charged_usd": format_usd(sum(x[2] for x in costs)),
    }


async def chat_at(
    http: aiohttp.ClientSession,
    gateway: Gateway,
    fake: FakeUpstream,
    secret: str,
    when: str,
    model: str,
    prompt: int,
    completion: int,
    tags: str | None = None,
    to: HasV1 | None = None,
) -> None:
    """One chat at ``when`` (the gateway's clock), the fake reporting these token counts; through
    ``to`` if given (another process, on its own clock)."""
    gateway.clock.fixed = at(when)
    fake.next(prompt_tokens=prompt, completion_tokens=completion)
    body = {"model": model, "messages": [{"role": "user", "content": "hi"}]}
    headers = None if tags is None else {"x-modelbridge-tags": tags}
    reply = await chat(http, to or gateway, secret, body, headers)
    assert reply.status == 200, reply.body


async def written(db: asyncpg.Connection, account: str, count: int) -> None:
    """Wait until the usage writer has moved ``count`` records of the account into PostgreSQL."""
    await eventually(
        lambda: db.fetchval("SELECT count(*) FROM usage_records WHERE account = $1", account),
        lambda n: n == count,
    )


async def add_member(
    db: asyncpg.Connection,
    team_id: str,
    user_id: str,
    role: str = "member",
    billing_mode: str = "team",
) -> None:
    await db.execute(
        "INSERT INTO memberships (team_id, user_id, role, billing_mode) VALUES ($1, $2, $3, $4)",
        team_id,
        user_id,
        role,
        billing_mode,
    )


async def report(api: Api, session: Session, path: str, expect: int = 200) -> Any:
    _, body = await api.call("GET", path, session=session, expect=expect)
    return body


async def test_every_grouping_has_exact_rows(
    gateway: Gateway,
    api: Api,
    fake: FakeUpstream,
    db: asyncpg.Connection,
    http: aiohttp.ClientSession,
) -> None:
    owner, team, secret_a = await api.funded_team_key("10.00")
    tid = team["id"]
    member = await api.signup(name="Mia")
    await add_member(db, tid, member.user["id"])
    _, keys = await api.call("GET", f"/api/keys?team={tid}", session=owner, expect=200)
    key_a = keys["data"][0]
    key_b = await api.key(member, tid, name="beta")
    bps = 333
    await api.call(
        "PUT", f"/admin/teams/{tid}/discount", admin=True, json={"discount_bps": bps}, expect=200
    )
    r1, r2 = ("gpt-4o-mini", 10, 20), ("gpt-4o", 100, 5)
    r3, r4 = ("gpt-4o-mini", 7, 3), ("gpt-4o-mini", 1001, 999)
    plan = [
        (secret_a, "2026-02-28T23:59:59", ("gpt-4o", 1, 1), None),  # before the range
        (secret_a, "2026-03-10T12:00:00", r1, "project=search,env=prod"),
        (key_b["secret"], "2026-03-10T13:00:00", r2, "project=chat"),
        (secret_a, "2026-03-12T09:00:00", r3, None),
        (key_b["secret"], "2026-03-12T10:00:00", r4, "env=prod"),
        (secret_a, "2026-04-01T00:00:00", ("gpt-4o", 1, 1), None),  # after the range
    ]
    for secret, when, (model, p, c), tags in plan:
        await chat_at(http, gateway, fake, secret, when, model, p, c, tags)
    await written(db, f"t_{tid}", len(plan))

    base = f"/api/teams/{tid}/usage?from=2026-03-01&to=2026-03-31"
    total = row("total", [r1, r2, r3, r4], bps)
    # Hand-checked anchors: r4 lists 1001*150 + 999*600 = 749550, charged floor(749550*0.9667).
    assert cost(*r4, bps) == (749_550, 24_961, 724_589)
    assert total["charged_usd"] == "0.001030404" and total["list_cost_usd"] == "0.001065900"

    body = await report(api, owner, base)  # group_by defaults to model
    assert body == {
        "data": [row("gpt-4o-mini", [r1, r3, r4], bps), row("gpt-4o", [r2], bps)],
        "total": total,
        "from": "2026-03-01",
        "to": "2026-03-31",
        "group_by": "model",
    }
    body = await report(api, owner, base + "&group_by=member")
    assert body["data"] == [
        row(member.user["id"], [r2, r4], bps, label=member.user["email"]),
        row(owner.user["id"], [r1, r3], bps, label=owner.user["email"]),
    ]
    assert body["total"] == {**total, "label": None}
    body = await report(api, owner, base + "&group_by=key")
    assert body["data"] == [
        row(key_b["id"], [r2, r4], bps, label=f"beta ({key_b['prefix']})"),
        row(key_a["id"], [r1, r3], bps, label=f"key ({key_a['prefix']})"),
    ]
    body = await report(api, owner, base + "&group_by=day")
    assert body["data"] == [row("2026-03-10", [r1, r2], bps), row("2026-03-12", [r3, r4], bps)]
    assert body["total"] == total and body["group_by"] == "day"
    body = await report(api, owner, base + "&group_by=tag")
    assert body["data"] == [
        row("env=prod", [r1, r4], bps),
        row("project=chat", [r2], bps),
        row("project=search", [r1], bps),
        row(None, [r3], bps),  # untagged requests, last
    ]
    assert body["total"] == total  # r1 carries two tags and still counts once


async def test_sums_equal_the_debits_to_the_nano_dollar(
    gateway: Gateway,
    replicas: Replicas,
    api: Api,
    fake: FakeUpstream,
    db: asyncpg.Connection,
    http: aiohttp.ClientSession,
) -> None:
    owner, team, secret = await api.funded_team_key("5.00")
    tid = team["id"]
    bps = 777  # every request rounds down on its own: the sums must add the rounded amounts
    await api.call(
        "PUT", f"/admin/teams/{tid}/discount", admin=True, json={"discount_bps": bps}, expect=200
    )
    now = datetime.now(UTC).replace(microsecond=0).isoformat()[:19]
    mini, big = "gpt-4o-mini", "gpt-4o"
    reqs = [
        (mini, 5, 6),
        (big, 17, 1),
        (mini, 123, 77),
        (big, 1000, 999),
        (mini, 1, 1),
        (big, 42, 300),
        (mini, 9, 0),
    ]
    for i, ((model, p, c), to) in enumerate(zip(reqs, replicas.spread(len(reqs)), strict=True)):
        await chat_at(http, gateway, fake, secret, now, model, p, c, tags=f"n={i % 3}", to=to)
    await written(db, f"t_{tid}", len(reqs))
    body = await report(api, owner, f"/api/teams/{tid}/usage")  # default: this period so far
    charged = sum(cost(m, p, c, bps)[2] for m, p, c in reqs)
    assert body["total"] == row("total", reqs, bps)
    assert body["from"] == now[:8] + "01" and body["to"] == now[:10]
    overview = await api.overview(owner, tid)
    assert body["total"]["charged_usd"] == overview["spend_this_period_usd"] == format_usd(charged)
    assert overview["credits_usd"] == format_usd(5_000_000_000 - charged)
    in_pg = await db.fetchval(
        "SELECT sum(charged) FROM usage_records WHERE account = $1", f"t_{tid}"
    )
    assert in_pg == charged
    for group_by in ("member", "key", "model", "day"):
        body = await report(api, owner, f"/api/teams/{tid}/usage?group_by={group_by}")
        assert sum(int(r["charged_usd"].replace(".", "")) for r in body["data"]) == charged
        assert body["total"]["charged_usd"] == format_usd(charged)


async def test_day_boundaries_are_inclusive_utc_days(
    gateway: Gateway,
    api: Api,
    fake: FakeUpstream,
    db: asyncpg.Connection,
    http: aiohttp.ClientSession,
) -> None:
    owner, team, secret = await api.funded_team_key()
    tid = team["id"]
    times = [
        "2026-04-09T23:59:59.500",
        "2026-04-10T00:00:00",
        "2026-04-20T23:59:59",
        "2026-04-20T23:59:59.500",
        "2026-04-21T00:00:00",
    ]
    for n, when in enumerate(times, start=1):
        await chat_at(http, gateway, fake, secret, when, "gpt-4o-mini", n, 0)
    await written(db, f"t_{tid}", len(times))
    gateway.clock.fixed = at("2026-04-21T12:00:00")
    body = await report(
        api, owner, f"/api/teams/{tid}/usage?from=2026-04-10&to=2026-04-20&group_by=day"
    )
    m = "gpt-4o-mini"
    assert body["data"] == [
        row("2026-04-10", [(m, 2, 0)]),
        row("2026-04-20", [(m, 3, 0), (m, 4, 0)]),
    ]
    assert body["total"] == row("total", [(m, 2, 0), (m, 3, 0), (m, 4, 0)])
    one_day = await report(
        api, owner, f"/api/teams/{tid}/usage?from=2026-04-21&to=2026-04-21&group_by=day"
    )
    assert one_day["data"] == [row("2026-04-21", [(m, 5, 0)])]
    # Only 'to': from is the first day of that month. Neither: this period (by the clock) so far.
    body = await report(api, owner, f"/api/teams/{tid}/usage?to=2026-04-20&group_by=day")
    assert (body["from"], body["to"], body["total"]["requests"]) == ("2026-04-01", "2026-04-20", 4)
    body = await report(api, owner, f"/api/teams/{tid}/usage")
    assert (body["from"], body["to"], body["total"]["requests"]) == ("2026-04-01", "2026-04-21", 5)


async def test_csv_is_byte_exact_and_streamed(
    gateway: Gateway,
    api: Api,
    fake: FakeUpstream,
    db: asyncpg.Connection,
    http: aiohttp.ClientSession,
) -> None:
    owner = await api.signup()
    team = await api.team(owner)
    tid = team["id"]
    await api.credit_team(tid, "1.00")
    comma = await api.key(owner, tid, name='ci, "bot"')
    formula = await api.key(owner, tid, name='=HYPERLINK("x")')
    await chat_at(
        http,
        gateway,
        fake,
        comma["secret"],
        "2026-05-05T10:00:00",
        "gpt-4o-mini",
        10,
        20,
        tags="env=prod",
    )
    await chat_at(
        http, gateway, fake, formula["secret"], "2026-05-06T10:00:00", "gpt-4o-mini", 1, 1
    )
    await written(db, f"t_{tid}", 2)
    query = "from=2026-05-01&to=2026-05-31&group_by=key&format=csv"
    url = f"{gateway.base}/api/teams/{tid}/usage?{query}"
    async with http.get(url, headers=owner.headers) as resp:
        assert resp.status == 200
        assert resp.headers["Content-Type"] == "text/csv; charset=utf-8"
        assert resp.headers["Content-Disposition"] == (
            f'attachment; filename="usage-{tid}-2026-05-01-2026-05-31-key.csv"'
        )
        assert resp.headers["Transfer-Encoding"] == "chunked"
        data = await resp.read()
    header = "group,label,requests,prompt_tokens,completion_tokens,list_cost_usd,discount_usd,"
    assert (
        data
        == (
            f"{header}charged_usd\r\n"
            f'{comma["id"]},"ci, ""bot"" ({comma["prefix"]})",1,10,20,'
            "0.000013500,0.000000000,0.000013500\r\n"
            f'{formula["id"]},"\'=HYPERLINK(""x"") ({formula["prefix"]})",1,1,1,'
            "0.000000750,0.000000000,0.000000750\r\n"
            "total,,2,11,21,0.000014250,0.000000000,0.000014250\r\n"
        ).encode()
    )
    async with http.get(url.replace("group_by=key", "group_by=tag"), headers=owner.headers) as resp:
        data = await resp.read()
    assert data == (
        b"group,requests,prompt_tokens,completion_tokens,list_cost_usd,discount_usd,charged_usd\r\n"
        b"env=prod,1,10,20,0.000013500,0.000000000,0.000013500\r\n"
        b",1,1,1,0.000000750,0.000000000,0.000000750\r\n"
        b"total,2,11,21,0.000014250,0.000000000,0.000014250\r\n"
    )
    async with http.get(
        url.replace("2026-05-01", "2026-06-01").replace("2026-05-31", "2026-06-30"),
        headers=owner.headers,
    ) as resp:
        assert (
            await resp.read()
            == (
                f"{header}charged_usd\r\ntotal,,0,0,0,0.000000000,0.000000000,0.000000000\r\n"
            ).encode()
        )


@pytest.mark.parametrize(
    ("query", "param"),
    [
        ("from=2026-13-01&to=2026-12-31", "from"),
        ("from=20260101&to=2026-01-31", "from"),
        ("from=2026-02-30&to=2026-03-01", "from"),
        ("from=2026-01-01&to=soon", "to"),
        ("from=2026-01-01&to=2026-1-31", "to"),
        ("from=2026-01-01&to=9999-12-31", "to"),
        ("from=2026-02-01&to=2026-01-31", "from"),
        ("from=2025-01-01&to=2026-02-05", "from"),  # 401 days; 400 is the most
        ("group_by=team", "group_by"),
        ("group_by=", "group_by"),
        ("format=xml", "format"),
        ("from=2026-01-01&from=2026-01-02", "from"),
    ],
)
async def test_bad_parameters_are_400_naming_the_field(api: Api, query: str, param: str) -> None:
    owner = await api.signup()
    team = await api.team(owner)
    for path in (f"/api/teams/{team['id']}/usage?{query}", f"/api/me/usage?{query}"):
        body = await report(api, owner, path, expect=400)
        assert body["error"]["param"] == param and body["error"]["type"] == "invalid_request_error"


async def test_longest_range_is_400_days(api: Api) -> None:
    owner = await api.signup()
    team = await api.team(owner)
    body = await report(api, owner, f"/api/teams/{team['id']}/usage?from=2025-01-01&to=2026-02-04")
    assert (body["from"], body["to"], body["data"]) == ("2025-01-01", "2026-02-04", [])
    assert body["total"] == row("total", [])


async def test_members_read_team_usage_and_outsiders_get_404(
    gateway: Gateway,
    api: Api,
    fake: FakeUpstream,
    db: asyncpg.Connection,
    http: aiohttp.ClientSession,
) -> None:
    owner, team, secret = await api.funded_team_key()
    tid = team["id"]
    member, admin, outsider = await api.signup(), await api.signup(), await api.signup()
    await add_member(db, tid, member.user["id"])
    await add_member(db, tid, admin.user["id"], role="admin")
    await chat_at(http, gateway, fake, secret, "2026-06-02T08:00:00", "gpt-4o", 3, 4)
    await written(db, f"t_{tid}", 1)
    path = f"/api/teams/{tid}/usage?from=2026-06-01&to=2026-06-30&group_by=member"
    seen = [await report(api, s, path) for s in (owner, admin, member)]
    assert seen[0] == seen[1] == seen[2]
    assert seen[0]["data"] == [row(owner.user["id"], [("gpt-4o", 3, 4)], label=owner.user["email"])]
    body = await report(api, outsider, path, expect=404)
    assert body["error"]["code"] == "team_not_found"
    await report(api, outsider, path + "&format=csv", expect=404)
    await report(api, outsider, f"/api/teams/{tid}/usage?group_by=nope", expect=404)
    await api.call("GET", path, expect=401)
    await api.call("GET", "/api/me/usage", expect=401)
    await db.execute(
        "UPDATE memberships SET removed_at = now() WHERE team_id = $1 AND user_id = $2",
        tid,
        member.user["id"],
    )
    await report(api, member, path, expect=404)


async def test_personal_usage_is_what_the_personal_balance_paid(
    gateway: Gateway,
    api: Api,
    fake: FakeUpstream,
    db: asyncpg.Connection,
    http: aiohttp.ClientSession,
) -> None:
    user = await api.signup(name="Pat")
    uid = user.user["id"]
    personal = await api.key(user, name="mine")
    await api.call("GET", "/api/me", session=user, expect=200)  # loads the personal account first
    await api.credit_user(uid, "2.00")
    _, team_billed, _ = await api.funded_team_key()
    _, self_billed, _ = await api.funded_team_key()
    await add_member(db, team_billed["id"], uid)
    await add_member(db, self_billed["id"], uid, billing_mode="personal")
    via_team = await api.key(user, team_billed["id"], name="team-billed")
    via_self = await api.key(user, self_billed["id"], name="self-billed")
    p1, p2, p3 = ("gpt-4o-mini", 11, 12), ("gpt-4o", 13, 14), ("gpt-4o-mini", 15, 16)
    for secret, (model, p, c) in (
        (personal["secret"], p1),
        (via_team["secret"], p2),
        (via_self["secret"], p3),
    ):
        await chat_at(http, gateway, fake, secret, "2026-07-07T07:07:07", model, p, c)
    await written(db, f"u_{uid}", 2)
    await written(db, f"t_{team_billed['id']}", 1)
    rng = "from=2026-07-01&to=2026-07-31"
    body = await report(api, user, f"/api/me/usage?{rng}&group_by=key")
    assert body["data"] == [
        row(via_self["id"], [p3], label=f"self-billed ({via_self['prefix']})"),
        row(personal["id"], [p1], label=f"mine ({personal['prefix']})"),
    ]
    assert body["total"] == {**row("total", [p1, p3]), "label": None}
    body = await report(api, user, f"/api/me/usage?{rng}&group_by=member")
    assert body["data"] == [row(uid, [p1, p3], label=user.user["email"])]
    _, me = await api.call("GET", "/api/me", session=user, expect=200)
    charged = cost(*p1)[2] + cost(*p3)[2]
    assert me["balance_usd"] == format_usd(2_000_000_000 - charged)
    team_view = await report(api, user, f"/api/teams/{team_billed['id']}/usage?{rng}")
    assert team_view["data"] == [row("gpt-4o", [p2])]
    body = await report(api, user, f"/api/teams/{self_billed['id']}/usage?{rng}")
    assert body["data"] == [] and body["total"]["requests"] == 0
