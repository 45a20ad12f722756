"""Limit alerts: webhooks registered by owners and admins receive signed events when the team or a
member crosses 80 % and 100 % of a limit and when a soft limit is exceeded — once per threshold
and period, retried with backoff, delivered at least once, from a PostgreSQL outbox."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import aiohttp
import asyncpg
import orjson
import pytest
from redis.asyncio import Redis
from yarl import URL

from gateway import state as S
from gateway.teams.alerts import system_lookup
from policies import keyspace as rk
from policies.periods import period_of
from tests.billing_support import Receiver, add_member, exact, patch_team, usd, verify
from tests.conftest import Gateway, free_port
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api, Session, chat, eventually


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    rec = await Receiver().start()
    yield rec
    await rec.stop()


async def webhook(api: Api, session: Session, team_id: str, url: str) -> dict[str, Any]:
    _, body = await api.call(
        "POST", f"/api/teams/{team_id}/webhooks", session=session, json={"url": url}, expect=201
    )
    return dict(body)


def events(receiver: Receiver) -> list[dict[str, Any]]:
    return [orjson.loads(d.raw) for d in receiver.deliveries]


def summary(receiver: Receiver) -> list[tuple[str, str | None, str, str]]:
    return [
        (e["type"], e["data"]["user_id"], e["data"]["threshold"], e["data"]["trigger"])
        for e in events(receiver)
    ]


async def test_webhooks_are_managed_by_owners_and_admins(
    gateway: Gateway, api: Api, db: asyncpg.Connection
) -> None:
    owner = await api.signup()
    tid = (await api.team(owner))["id"]
    admin = await add_member(api, owner, tid, "admin")
    member = await add_member(api, owner, tid)
    path = f"/api/teams/{tid}/webhooks"
    first = await webhook(api, owner, tid, "https://hooks.example.com/a?x=1")
    second = await webhook(api, admin, tid, "http://127.0.0.1:9/b")
    assert first["signing_secret"].startswith("whsec_")
    assert second["signing_secret"] == first["signing_secret"]  # one secret per team
    _, listed = await api.call("GET", path, session=admin, expect=200)
    assert [w["id"] for w in listed["data"]] == [first["id"], second["id"]]
    assert all("signing_secret" not in w for w in listed["data"])
    for who, status in ((member, 403), (await api.signup(), 404)):
        assert (await api.call("GET", path, session=who))[0] == status
        assert (await api.call("POST", path, session=who, json={"url": "https://x.io"}))[
            0
        ] == status
    for bad in (None, "", "ftp://x.io/h", "/relative", "https://", 5, "https://x.io/" + "a" * 2048):
        status, body = await api.call("POST", path, session=owner, json={"url": bad})
        assert (status, body["error"]["param"]) == (400, "url"), bad
    await api.call("DELETE", f"{path}/{first['id']}", session=admin, expect=200)
    await api.call("DELETE", f"{path}/{first['id']}", session=admin, expect=404)
    await api.call("DELETE", f"{path}/wh_00000000000000000000", session=owner, expect=404)
    _, listed = await api.call("GET", path, session=owner, expect=200)
    assert [w["id"] for w in listed["data"]] == [second["id"]]
    for i in range(9):
        await webhook(api, owner, tid, f"https://x.io/{i}")
    status, body = await api.call("POST", path, session=owner, json={"url": "https://x.io/11"})
    assert (status, body["error"]["code"]) == (409, "too_many_webhooks")
    actions = await db.fetch(
        "SELECT action FROM audit_log WHERE team_id = $1 AND action LIKE 'webhook.%' ORDER BY id",
        tid,
    )
    assert [a["action"] for a in actions] == ["webhook.create"] * 2 + ["webhook.delete"] + [
        "webhook.create"
    ] * 9


async def test_team_limit_thresholds_are_signed_and_sent_once_per_period(
    gateway: Gateway,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    receiver: Receiver,
    db: asyncpg.Connection,
) -> None:
    req = exact(gateway, fake)
    owner, team, secret = await api.funded_team_key("1.00")
    tid = team["id"]
    hook = await webhook(api, owner, tid, receiver.url)
    await patch_team(api, owner, tid, spending_limit_usd=usd(5 * req.cost))
    statuses = [(await chat(http, gateway, secret, req.body)).status for _ in range(7)]
    assert statuses == [200] * 5 + [429] * 2
    deliveries = await receiver.wait_for(2)
    for delivery in deliveries:
        assert verify(hook["signing_secret"], delivery)
        body = orjson.loads(delivery.raw)
        assert delivery.headers["X-Modelbridge-Event-Id"] == body["id"]
        assert delivery.headers["Content-Type"] == "application/json"
    first, second = events(receiver)
    period = period_of(gateway.clock.now())
    assert (first["type"], first["team_id"], first["period"]) == (
        "spending_limit.threshold_reached",
        tid,
        period,
    )
    assert first["data"] == {
        "limit": "team",
        "user_id": None,
        "threshold": "80",
        "threshold_percent": 80,
        "limit_usd": usd(5 * req.cost),
        "spend_usd": usd(4 * req.cost),
        "enforcement": "hard",
        "trigger": "spend",
    }
    assert (second["data"]["threshold_percent"], second["data"]["spend_usd"]) == (
        100,
        usd(5 * req.cost),
    )
    # Nothing more: the refusals after 100 % and the tampering check.
    assert not verify("whsec_wrong", deliveries[0])
    await patch_team(api, owner, tid, name="still quiet")
    _, alerts = await api.call("GET", f"/api/teams/{tid}/alerts", session=owner, expect=200)
    assert [a["threshold"] for a in alerts["data"]] == ["100", "80"]
    assert all(a["deliveries"][0]["delivered_at"] for a in alerts["data"])
    assert len(receiver.deliveries) == 2
    assert await db.fetchval("SELECT count(*) FROM alert_events WHERE team_id = $1", tid) == 2


async def test_member_alerts_soft_exceeded_and_refusal(
    gateway: Gateway,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    receiver: Receiver,
) -> None:
    req = exact(gateway, fake)
    owner, team, _ = await api.funded_team_key("1.00")
    tid = team["id"]
    await webhook(api, owner, tid, receiver.url)
    soft = await add_member(api, owner, tid)
    hard = await add_member(api, owner, tid)
    await patch_team(
        api, owner, tid, default_member_limit_usd=usd(2 * req.cost), default_enforcement="soft"
    )
    soft_key = (await api.key(soft, tid))["secret"]
    for _ in range(4):
        assert (await chat(http, gateway, soft_key, req.body)).status == 200
    await receiver.wait_for(3)
    sid = soft.user["id"]
    assert sorted(summary(receiver)) == [
        ("member_limit.soft_exceeded", sid, "exceeded", "spend"),
        ("member_limit.threshold_reached", sid, "100", "spend"),
        ("member_limit.threshold_reached", sid, "80", "spend"),
    ]
    # A hard limit refuses a big hold long before the settled spend reaches it: "100 % reached".
    await api.call(
        "PATCH",
        f"/api/teams/{tid}/members/{hard.user['id']}",
        session=owner,
        json={"enforcement": "hard"},
        expect=200,
    )
    hard_key = (await api.key(hard, tid))["secret"]
    reply = await chat(http, gateway, hard_key, {**req.body, "max_tokens": 1000})
    assert reply.code == "member_limit_reached"
    await receiver.wait_for(4)
    last = events(receiver)[-1]
    assert (last["type"], last["data"]["user_id"], last["data"]["trigger"]) == (
        "member_limit.threshold_reached",
        hard.user["id"],
        "refusal",
    )
    assert (last["data"]["threshold_percent"], last["data"]["spend_usd"]) == (100, usd(0))


async def test_failed_deliveries_are_retried_with_exponential_backoff(
    gateway: Gateway,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    receiver: Receiver,
    db: asyncpg.Connection,
) -> None:
    worker = gateway.app[S.ALERTS]
    saved = (worker.base_backoff_s, worker.poll_s)
    worker.base_backoff_s, worker.poll_s = 0.3, 0.02
    try:
        receiver.statuses = [500, 503, 404]
        req = exact(gateway, fake)
        owner, team, secret = await api.funded_team_key("1.00")
        hook = await webhook(api, owner, team["id"], receiver.url)
        # 80 % of the limit is crossed, 100 % is not: one event.
        await patch_team(api, owner, team["id"], spending_limit_usd=usd(req.cost * 10 // 9))
        assert (await chat(http, gateway, secret, req.body)).status == 200
        (delivery,) = await receiver.wait_for(1)
    finally:
        worker.base_backoff_s, worker.poll_s = saved
    assert verify(hook["signing_secret"], delivery)
    assert receiver.answered == [500, 503, 404, 200]
    row = await db.fetchrow(
        "SELECT d.attempts, d.last_status, d.delivered_at FROM alert_deliveries d"
        " JOIN alert_events e ON e.id = d.event_id WHERE e.team_id = $1",
        team["id"],
    )
    assert (row["attempts"], row["last_status"]) == (4, 200) and row["delivered_at"] is not None
    # Each retry waits twice as long as the one before: 0.3 s, 0.6 s, 1.2 s.
    gaps = [b - a for a, b in zip(receiver.arrivals, receiver.arrivals[1:], strict=False)]
    assert [round(g, 1) >= d for g, d in zip(gaps, (0.3, 0.6, 1.2), strict=True)] == [True] * 3


async def test_alerts_left_behind_by_a_crash_are_collected_once(
    gateway: Gateway, api: Api, receiver: Receiver, redis: Redis, db: asyncpg.Connection
) -> None:
    owner = await api.signup()
    tid = (await api.team(owner))["id"]
    hook = await webhook(api, owner, tid, receiver.url)
    stream = rk.AccountKeys(rk.team_account(tid)).alerts
    entry = {
        "kind": "team",
        "scope": owner.user["id"],
        "threshold": "80",
        "limit": "1000000000",
        "spend": "800000000",
        "enforcement": "hard",
        "trigger": "spend",
        "period": "2031-01",
        "at": "1924992000",
    }
    # Queued by a settle whose process died before the worker heard of it: the sweep finds it.
    await redis.xadd(stream, entry)
    worker = gateway.app[S.ALERTS]
    await worker.sweep()
    assert await redis.xlen(stream) == 0
    await redis.xadd(stream, entry)  # and again (a crash before the delete): recorded once
    await worker.collect([rk.team_account(tid)])
    (delivery,) = await receiver.wait_for(1)
    assert verify(hook["signing_secret"], delivery)
    body = orjson.loads(delivery.raw)
    assert (body["period"], body["created_at"], body["data"]["limit_usd"]) == (
        "2031-01",
        "2031-01-01T00:00:00+00:00",
        "1.000000000",
    )
    assert await db.fetchval("SELECT count(*) FROM alert_events WHERE team_id = $1", tid) == 1
    await eventually(
        lambda: db.fetchval(
            "SELECT count(*) FROM alert_deliveries d JOIN alert_events e ON e.id = d.event_id"
            " WHERE e.team_id = $1 AND d.delivered_at IS NOT NULL",
            tid,
        ),
        lambda n: n == 1,
    )
    assert len(receiver.deliveries) == 1


async def test_deleted_webhooks_receive_nothing(
    gateway: Gateway,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    receiver: Receiver,
) -> None:
    other = await Receiver().start()
    try:
        req = exact(gateway, fake)
        owner, team, secret = await api.funded_team_key("1.00")
        tid = team["id"]
        gone = await webhook(api, owner, tid, other.url)
        await webhook(api, owner, tid, receiver.url)
        await api.call("DELETE", f"/api/teams/{tid}/webhooks/{gone['id']}", session=owner)
        await patch_team(api, owner, tid, spending_limit_usd=usd(req.cost * 10 // 9))
        assert (await chat(http, gateway, secret, req.body)).status == 200
        await receiver.wait_for(1)
        assert summary(receiver) == [("spending_limit.threshold_reached", None, "80", "spend")]
        assert other.deliveries == [] and other.answered == []
    finally:
        await other.stop()


class ScriptedDns:
    """DNS answers set by the test (the outside world's DNS is the one fake here); names it has
    no answer for go to the system resolver (``localhost``, ``2130706433``)."""

    def __init__(self) -> None:
        self.answers: dict[str, list[str]] = {}
        self.asked: list[tuple[str, int]] = []

    async def __call__(self, host: str, port: int) -> list[str]:
        self.asked.append((host, port))
        if host in self.answers:
            return self.answers[host]
        return await system_lookup(host, port)


@pytest.fixture
def strict(gateway: Gateway) -> Iterator[ScriptedDns]:
    """The gateway as deployed: private addresses refused (``alerts.allow_private_urls`` off),
    with DNS scripted by the test."""
    guard = gateway.app[S.WEBHOOKS]
    dns = ScriptedDns()
    saved = (guard.allow_private, guard.lookup)
    guard.allow_private, guard.lookup = False, dns
    try:
        yield dns
    finally:
        guard.allow_private, guard.lookup = saved


async def queue_alert(gateway: Gateway, redis: Redis, team_id: str, user_id: str) -> None:
    """An 80 % team alert queued as a settle queues it, collected and sent at once."""
    account = rk.team_account(team_id)
    entry = {
        "kind": "team",
        "scope": user_id,
        "threshold": "80",
        "limit": "1000000000",
        "spend": "800000000",
        "enforcement": "hard",
        "trigger": "spend",
        "period": "2031-02",
        "at": "1924992000",
    }
    await redis.xadd(rk.AccountKeys(account).alerts, entry)
    worker = gateway.app[S.ALERTS]
    await worker.collect([account])
    await worker.deliver_due()


async def delivery_statuses(api: Api, owner: Session, team_id: str) -> list[dict[str, Any]]:
    _, alerts = await api.call("GET", f"/api/teams/{team_id}/alerts", session=owner, expect=200)
    return [d for a in alerts["data"] for d in a["deliveries"]]


async def _copy(items: list[Any]) -> list[Any]:
    return list(items)


async def give_up(db: asyncpg.Connection, team_id: str) -> None:
    """Stop the retries of a test's deliveries (the worker outlives the test)."""
    await db.execute(
        "UPDATE alert_deliveries d SET failed_at = now() FROM alert_events e"
        " WHERE e.id = d.event_id AND e.team_id = $1 AND d.delivered_at IS NULL",
        team_id,
    )


async def test_webhook_urls_must_reach_public_addresses(
    api: Api, strict: ScriptedDns, db: asyncpg.Connection
) -> None:
    owner = await api.signup()
    tid = (await api.team(owner))["id"]
    path = f"/api/teams/{tid}/webhooks"
    strict.answers = {
        "hooks.partner.test": ["93.184.216.34", "2606:2800:220:1:248:1893:25c8:1946"],
        "split.partner.test": ["93.184.216.34", "10.0.0.7"],
        "internal.partner.test": ["192.168.1.20"],
        "imds.partner.test": ["169.254.169.254"],
        "gone.partner.test": [],
    }
    refused = [
        "http://127.0.0.1:9/hook",
        "http://127.1.2.3/",
        "http://[::1]:8080/",
        "http://[::ffff:127.0.0.1]/",
        "http://[::ffff:169.254.169.254]/latest/meta-data",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/",
        "http://172.20.0.1/",
        "http://192.168.0.1/",
        "http://100.64.0.1/",
        "http://0.0.0.0:8080/",
        "http://[::]/",
        "http://[fe80::1]/",
        "http://[fd00:ec2::254]/",
        "http://224.0.0.1/",
        "http://168.63.129.16/",
        "http://localhost:8080/",
        "http://2130706433/",
        "https://split.partner.test/",
        "https://internal.partner.test/",
        "https://imds.partner.test/",
        "https://gone.partner.test/",
        "https://no-such-host.invalid/",
    ]
    for url in refused:
        status, body = await api.call("POST", path, session=owner, json={"url": url})
        assert (status, body["error"]["code"], body["error"]["param"]) == (
            400,
            "url_not_allowed",
            "url",
        ), url
        assert body["error"]["message"] == "'url' must resolve to a public address", url
    for url in ("https://hooks.partner.test/a?x=1", "https://93.184.216.34/hook"):
        await api.call("POST", path, session=owner, json={"url": url}, expect=201)
    assert ("hooks.partner.test", 443) in strict.asked
    assert await db.fetchval("SELECT count(*) FROM webhooks WHERE team_id = $1", tid) == 2


async def test_delivery_checks_the_address_again_and_connects_to_what_it_checked(
    gateway: Gateway,
    api: Api,
    strict: ScriptedDns,
    receiver: Receiver,
    redis: Redis,
    db: asyncpg.Connection,
) -> None:
    """DNS rebinding: the host resolved to a public address when the webhook was set, and to
    loopback (where the receiver listens) when the alert is sent; a URL stored before the check
    existed is refused too. The receiver hears nothing."""
    owner = await api.signup()
    tid = (await api.team(owner))["id"]
    port = URL(receiver.url).port
    strict.answers["rebind.partner.test"] = ["93.184.216.34"]
    await webhook(api, owner, tid, f"http://rebind.partner.test:{port}/hook")
    await db.execute(
        "INSERT INTO webhooks (id, team_id, url, created_by) VALUES ('wh_legacy', $1, $2, $3)",
        tid,
        receiver.url,
        owner.user["id"],
    )
    strict.answers["rebind.partner.test"] = ["127.0.0.1"]
    strict.asked.clear()
    try:
        await queue_alert(gateway, redis, tid, owner.user["id"])
        shown = await eventually(
            lambda: delivery_statuses(api, owner, tid),
            # not on attempts: the worker counts one when it claims the delivery, before it tries
            lambda ds: len(ds) == 2 and all(d["status"] != "pending" for d in ds),
        )
    finally:
        await give_up(db, tid)
    assert [d["status"] for d in shown] == ["refused: private address"] * 2
    assert receiver.answered == []
    # One resolution per connection attempt: what was checked is what it would connect to. A
    # retry (1 s later) may have come before give_up on a busy machine: it resolved once too.
    attempts = await db.fetchval(
        "SELECT d.attempts FROM alert_deliveries d JOIN webhooks w ON w.id = d.webhook_id"
        " WHERE w.team_id = $1 AND w.id <> 'wh_legacy'",
        tid,
    )
    assert attempts >= 1
    await eventually(lambda: _copy(strict.asked), lambda asked: len(asked) >= attempts)
    assert strict.asked == [("rebind.partner.test", port)] * attempts


async def test_admins_see_a_short_status_never_the_error(
    gateway: Gateway, api: Api, receiver: Receiver, redis: Redis, db: asyncpg.Connection
) -> None:
    owner = await api.signup()
    tid = (await api.team(owner))["id"]
    closed = free_port()
    receiver.statuses = [500] * 100
    await webhook(api, owner, tid, f"http://127.0.0.1:{closed}/hook")
    await webhook(api, owner, tid, receiver.url)
    try:
        await queue_alert(gateway, redis, tid, owner.user["id"])
        shown = await eventually(
            lambda: delivery_statuses(api, owner, tid),
            lambda ds: len(ds) == 2 and all(d["status"] != "pending" for d in ds),
        )
    finally:
        await give_up(db, tid)
    assert [(d["status"], d["attempts"]) for d in shown] == [
        ("connection failed", 1),
        ("HTTP 500", 1),
    ]
    assert set(shown[0]) == {"webhook_id", "attempts", "delivered_at", "failed_at", "status"}
    stored = await db.fetch(
        "SELECT last_error FROM alert_deliveries d JOIN alert_events e ON e.id = d.event_id"
        " WHERE e.team_id = $1 ORDER BY d.id",
        tid,
    )
    assert [r["last_error"] for r in stored] == ["connection failed", ""]


async def test_an_idle_worker_asks_postgresql_nothing_between_its_sweeps(gateway: Gateway) -> None:
    """With nothing notified and no delivery pending, the loop wakes (every ``poll_s``) without a
    query: before, each wake claimed due deliveries from PostgreSQL (a query and a connection
    reset a second per process)."""
    worker = gateway.app[S.ALERTS]
    saved = worker.poll_s
    worker.poll_s = 0.01
    try:
        polls, rounds = worker.polls, worker.rounds

        async def looked() -> int:
            return worker.polls

        await eventually(looked, lambda n: n >= polls + 40, timeout=20)
        # a sweep (every sweep_s) may fall in the window: one round, not one per poll
        assert worker.rounds - rounds <= 1, (worker.polls - polls, worker.rounds - rounds)
    finally:
        worker.poll_s = saved
