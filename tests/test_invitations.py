"""Invitations by email (over a real SMTP server: aiosmtpd), the outbox, the public invite link
and join requests, and the limits on guessing their tokens."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from email import message_from_bytes, policy
from email.message import EmailMessage
from typing import Any

import aiohttp
import asyncpg
import pytest
from aiosmtpd.controller import Controller
from redis.asyncio import Redis

from gateway.config import SmtpConfig
from policies import keyspace as rk
from tests.conftest import Gateway, free_port, gateway_config, start_gateway
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api, Session, unique_email
from tests.people import (
    INVITE_LINK,
    add_member,
    clear_guess_limits,
    invite,
    outbox_token,
)

INVITATION_FIELDS = {
    "id",
    "team_id",
    "email",
    "role",
    "status",
    "invited_by",
    "created_at",
    "expires_at",
    "accepted_at",
    "revoked_at",
    "email_status",
}


class Inbox:
    """An aiosmtpd handler keeping every delivered message."""

    def __init__(self, delay_s: float = 0.0) -> None:
        self.delay_s = delay_s
        self.messages: list[tuple[str, list[str], EmailMessage]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        if self.delay_s:
            await asyncio.sleep(self.delay_s)
        msg = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(msg, EmailMessage)
        self.messages.append((envelope.mail_from, list(envelope.rcpt_tos), msg))
        return "250 Message accepted for delivery"

    def token_for(self, rcpt: str) -> str:
        found = [m for _, to, m in self.messages if to == [rcpt]]
        assert len(found) == 1, [to for _, to, _ in self.messages]
        match = INVITE_LINK.search(str(found[0].get_content()))
        assert match is not None
        return match.group(1)


@dataclasses.dataclass
class MailGateway:
    gateway: Gateway
    api: Api
    inbox: Inbox


async def _gateway_with_smtp(
    fake: FakeUpstream, database_url: str, redis_url: str, smtp: SmtpConfig
) -> tuple[Gateway, Any]:
    config = dataclasses.replace(gateway_config(fake.base_url), smtp=smtp)
    return await start_gateway(config, database_url, redis_url)


@pytest.fixture(scope="module")
async def mail(
    fake: FakeUpstream, database_url: str, redis_url: str, http: aiohttp.ClientSession
) -> AsyncIterator[MailGateway]:
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    smtp = SmtpConfig(
        host="127.0.0.1",
        port=controller.port,
        from_addr="ModelBridge <noreply@mb.test>",
        timeout_s=5,
    )
    gw, runner = await _gateway_with_smtp(fake, database_url, redis_url, smtp)
    yield MailGateway(gw, Api(http, gw.base, "test-admin-token"), inbox)
    await runner.cleanup()
    controller.stop()


async def accept(api: Api, session: Session | None, token: str) -> tuple[int, Any]:
    return await api.call("POST", f"/api/invitations/{token}/accept", session=session)


# --- invitations by mail --------------------------------------------------------------------------
async def test_invitation_by_mail_end_to_end(
    mail: MailGateway, db: asyncpg.Connection, redis: Redis
) -> None:
    api = mail.api
    owner = await api.signup(name="Olive Owner")
    team = await api.team(owner, name="Rocket Lab")
    address = unique_email("invitee")
    invitee = await api.signup(address.lower(), name="Ivan")
    shouted = address.upper()
    _, body = await api.call(
        "POST",
        f"/api/teams/{team['id']}/invitations",
        session=owner,
        json={"email": shouted, "role": "admin"},
        expect=201,
    )
    assert set(body) == INVITATION_FIELDS
    assert (body["email"], body["role"], body["status"], body["email_status"]) == (
        shouted,
        "admin",
        "pending",
        "sent",
    )
    assert body["invited_by"] == {
        "id": owner.user["id"],
        "email": owner.user["email"],
        "name": "Olive Owner",
    }
    created = datetime.fromisoformat(body["created_at"])
    assert datetime.fromisoformat(body["expires_at"]) - created == timedelta(days=7)

    sender, rcpt, msg = mail.inbox.messages[-1]
    assert (sender, rcpt) == ("noreply@mb.test", [shouted])
    assert msg["Subject"] == "Olive Owner invited you to Rocket Lab on ModelBridge"
    assert msg["From"] == "ModelBridge <noreply@mb.test>"
    token = mail.inbox.token_for(shouted)
    assert f"{mail.gateway.config.public_url}/invite/{token}" in msg.get_content()
    assert token not in str(body)
    stored = await db.fetchrow("SELECT token_hash FROM invitations WHERE id = $1", body["id"])
    assert bytes(stored["token_hash"]) == hashlib.sha256(token.encode()).digest()
    outbox = await db.fetchrow("SELECT * FROM outbox WHERE ref_id = $1", body["id"])
    assert (outbox["status"], outbox["to_addr"], outbox["error"]) == ("sent", shouted, None)
    assert token not in outbox["body"] and "/invite/[redacted]" in outbox["body"]

    _, shown = await api.call("GET", f"/api/invitations/{token}", expect=200)  # no login
    assert shown == {
        "id": body["id"],
        "team": {"id": team["id"], "name": "Rocket Lab"},
        "role": "admin",
        "email": shouted,
        "invited_by": {"name": "Olive Owner", "email": owner.user["email"]},
        "expires_at": body["expires_at"],
        "status": "pending",
    }
    assert (await accept(api, None, token))[0] == 401
    stranger = await api.signup()
    status, err = await accept(api, stranger, token)
    assert (status, err["error"]["code"]) == (403, "invitation_email_mismatch")
    _, joined = await api.call(
        "POST", f"/api/invitations/{token}/accept", session=invitee, expect=200
    )
    assert (joined["team"], joined["role"], joined["user_id"]) == (
        {"id": team["id"], "name": "Rocket Lab"},
        "admin",
        invitee.user["id"],
    )
    assert (await api.overview(invitee, team["id"]))["your_role"] == "admin"
    assert (await api.overview(owner, team["id"]))["member_count"] == 2
    for session in (invitee, stranger, None):
        status, err = (
            await accept(api, session, token)
            if session
            else await api.call("GET", f"/api/invitations/{token}")
        )
        assert (status, err["error"]["code"]) == (410, "invitation_not_valid")
    actions = [
        r["action"]
        for r in await db.fetch(
            "SELECT action FROM audit_log WHERE team_id = $1 ORDER BY id", team["id"]
        )
    ]
    assert actions == ["team.create", "invitation.create", "member.add", "invitation.accept"]
    await clear_guess_limits(redis)


async def test_accepting_needs_a_valid_pending_invitation(
    gateway: Gateway, api: Api, db: asyncpg.Connection, redis: Redis
) -> None:
    owner = await api.signup()
    team = await api.team(owner)
    member = await add_member(api, owner, team["id"])
    # Invited, but meanwhile a member by other means: 409, and the invitation stays pending.
    email = unique_email()
    user = await api.signup(email)
    inv = await invite(api, owner, team["id"], email)
    token = await outbox_token(db, inv["id"])
    _, link = await api.call(
        "POST", f"/api/teams/{team['id']}/invite-link", session=owner, expect=201
    )
    _, req = await api.call("POST", f"/api/join/{link['token']}", session=user, expect=201)
    await api.call(
        "POST",
        f"/api/teams/{team['id']}/join-requests/{req['id']}/approve",
        session=owner,
        expect=200,
    )
    status, err = await accept(api, user, token)
    assert (status, err["error"]["code"]) == (409, "already_member")
    await api.call("GET", f"/api/invitations/{token}", expect=200)
    # Unknown tokens: 404.
    for bogus in ("x" * 43, "short", "a" * 200):
        status, err = await accept(api, member, bogus)
        assert (status, err["error"]["code"]) == (404, "invitation_not_found")
    await clear_guess_limits(redis)


async def test_no_smtp_logs_the_mail_and_keeps_it_in_the_outbox(
    gateway: Gateway, api: Api, db: asyncpg.Connection, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="modelbridge.mailer")
    owner = await api.signup()
    team = await api.team(owner)
    email = unique_email()
    inv = await invite(api, owner, team["id"], email)
    assert inv["email_status"] == "logged"
    token = await outbox_token(db, inv["id"])
    row = await db.fetchrow(
        "SELECT status, to_addr, sent_at FROM outbox WHERE ref_id = $1", inv["id"]
    )
    assert (row["status"], row["to_addr"], row["sent_at"]) == ("logged", email, None)
    assert any(f"/invite/{token}" in r.getMessage() for r in caplog.records)
    user = await api.signup(email)
    await api.call("POST", f"/api/invitations/{token}/accept", session=user, expect=200)


async def test_smtp_down_or_slow_never_fails_the_request(
    fake: FakeUpstream,
    database_url: str,
    redis_url: str,
    http: aiohttp.ClientSession,
    db: asyncpg.Connection,
) -> None:
    slow = Inbox(delay_s=3.0)
    controller = Controller(slow, hostname="127.0.0.1", port=free_port())
    controller.start()
    cases = [("refused", free_port(), "SMTPConnectError"), ("slow", controller.port, "timed out")]
    try:
        for name, port, error in cases:
            smtp = SmtpConfig(host="127.0.0.1", port=port, timeout_s=0.5)
            gw, runner = await _gateway_with_smtp(fake, database_url, redis_url, smtp)
            try:
                api = Api(http, gw.base, "test-admin-token")
                owner = await api.signup()
                team = await api.team(owner)
                email = unique_email(name)
                started = time.monotonic()
                inv = await invite(api, owner, team["id"], email)
                assert time.monotonic() - started < 2.5, name
                assert inv["email_status"] == "failed"
                row = await db.fetchrow(
                    "SELECT status, error FROM outbox WHERE ref_id = $1", inv["id"]
                )
                assert row["status"] == "failed" and error in row["error"], (name, row["error"])
                # The body is kept, so the link can still be passed on by hand.
                token = await outbox_token(db, inv["id"])
                user = await api.signup(email)
                await api.call("POST", f"/api/invitations/{token}/accept", session=user, expect=200)
            finally:
                await runner.cleanup()
    finally:
        controller.stop()


async def test_expiry(gateway: Gateway, api: Api, db: asyncpg.Connection) -> None:
    owner = await api.signup()
    team = await api.team(owner)
    email = unique_email()
    inv = await invite(api, owner, team["id"], email, expires_in_s=60)
    assert datetime.fromisoformat(inv["expires_at"]) - datetime.fromisoformat(
        inv["created_at"]
    ) == timedelta(seconds=60)
    token = await outbox_token(db, inv["id"])
    user = await api.signup(email)
    gateway.clock.fixed = time.time() + 61
    status, err = await api.call("GET", f"/api/invitations/{token}")
    assert (status, err["error"]["code"]) == (410, "invitation_not_valid")
    status, err = await accept(api, user, token)
    assert (status, err["error"]["code"]) == (410, "invitation_not_valid")
    _, pending = await api.call(
        "GET", f"/api/teams/{team['id']}/invitations", session=owner, expect=200
    )
    assert pending == {"data": []}
    _, every = await api.call(
        "GET", f"/api/teams/{team['id']}/invitations?status=all", session=owner, expect=200
    )
    assert [(i["id"], i["status"]) for i in every["data"]] == [(inv["id"], "expired")]


async def test_list_and_revoke(gateway: Gateway, api: Api, db: asyncpg.Connection) -> None:
    owner = await api.signup()
    team = await api.team(owner)
    tid = team["id"]
    member = await add_member(api, owner, tid)
    first = await invite(api, owner, tid, unique_email(), role="admin")
    second = await invite(api, owner, tid, unique_email())
    _, listed = await api.call("GET", f"/api/teams/{tid}/invitations", session=owner, expect=200)
    assert [i["id"] for i in listed["data"]] == [second["id"], first["id"]]
    assert all(set(i) == INVITATION_FIELDS and i["status"] == "pending" for i in listed["data"])
    await api.call("GET", f"/api/teams/{tid}/invitations", session=member, expect=403)
    await api.call(
        "DELETE", f"/api/teams/{tid}/invitations/{first['id']}", session=member, expect=403
    )
    token = await outbox_token(db, first["id"])
    _, revoked = await api.call(
        "DELETE", f"/api/teams/{tid}/invitations/{first['id']}", session=owner, expect=200
    )
    assert (revoked["id"], revoked["status"]) == (first["id"], "revoked") and revoked["revoked_at"]
    status, err = await api.call(
        "DELETE", f"/api/teams/{tid}/invitations/{first['id']}", session=owner
    )
    assert (status, err["error"]["code"]) == (409, "invitation_not_pending")
    status, err = await api.call("GET", f"/api/invitations/{token}")
    assert (status, err["error"]["code"]) == (410, "invitation_not_valid")
    _, listed = await api.call("GET", f"/api/teams/{tid}/invitations", session=owner, expect=200)
    assert [i["id"] for i in listed["data"]] == [second["id"]]
    for bad in ("inv_00000000000000000000", "nope"):
        status, err = await api.call("DELETE", f"/api/teams/{tid}/invitations/{bad}", session=owner)
        assert (status, err["error"]["code"]) == (404, "invitation_not_found")
    assert (
        await db.fetchval(
            "SELECT count(*) FROM audit_log WHERE team_id = $1 AND action = 'invitation.revoke'",
            tid,
        )
        == 1
    )


async def test_reinviting(gateway: Gateway, api: Api, db: asyncpg.Connection) -> None:
    owner = await api.signup()
    team = await api.team(owner)
    member = await add_member(api, owner, team["id"])
    status, err = await api.call(
        "POST",
        f"/api/teams/{team['id']}/invitations",
        session=owner,
        json={"email": member.user["email"].upper(), "role": "member"},
    )
    assert (status, err["error"]["code"], err["error"]["param"]) == (409, "already_member", "email")
    # A second invitation to the same address replaces the first (a resend).
    email = unique_email()
    first = await invite(api, owner, team["id"], email)
    old = await outbox_token(db, first["id"])
    second = await invite(api, owner, team["id"], email.upper(), role="admin")
    new = await outbox_token(db, second["id"])
    assert (await api.call("GET", f"/api/invitations/{old}"))[0] == 410
    user = await api.signup(email)
    _, joined = await api.call("POST", f"/api/invitations/{new}/accept", session=user, expect=200)
    assert joined["role"] == "admin"


@pytest.mark.parametrize(
    ("payload", "param"),
    [
        ({"role": "member"}, "email"),
        ({"email": "not-an-email", "role": "member"}, "email"),
        ({"email": "a@b", "role": "member"}, "email"),
        ({"email": "a,b@example.com", "role": "member"}, "email"),
        ({"email": "Bob <bob@example.com>", "role": "member"}, "email"),
        ({"email": "x@example.com\r\nBcc: y@example.com", "role": "member"}, "email"),
        ({"email": ["x@example.com"], "role": "member"}, "email"),
        ({"email": "x@example.com"}, "role"),
        ({"email": "x@example.com", "role": "owner"}, "role"),
        ({"email": "x@example.com", "role": "MEMBER"}, "role"),
        ({"email": "x@example.com", "role": "member", "expires_in_s": 0}, "expires_in_s"),
        ({"email": "x@example.com", "role": "member", "expires_in_s": 2592001}, "expires_in_s"),
        ({"email": "x@example.com", "role": "member", "expires_in_s": "60"}, "expires_in_s"),
        ({"email": "x@example.com", "role": "member", "expires_in_s": 1.5}, "expires_in_s"),
        ({"email": "x@example.com", "role": "member", "expires_in_s": True}, "expires_in_s"),
        ({"email": "x@example.com", "role": "member", "token": "mine"}, "token"),
    ],
)
async def test_invitation_validation(
    gateway: Gateway, api: Api, db: asyncpg.Connection, payload: dict[str, Any], param: str
) -> None:
    owner = await api.signup()
    team = await api.team(owner)
    outbox = await db.fetchval("SELECT count(*) FROM outbox")
    status, body = await api.call(
        "POST", f"/api/teams/{team['id']}/invitations", session=owner, json=payload
    )
    assert (status, body["error"]["param"]) == (400, param), body
    assert await db.fetchval("SELECT count(*) FROM invitations WHERE team_id = $1", team["id"]) == 0
    assert await db.fetchval("SELECT count(*) FROM outbox") == outbox


async def test_expires_in_bounds_are_accepted(gateway: Gateway, api: Api) -> None:
    owner = await api.signup()
    team = await api.team(owner)
    for seconds in (1, 2592000):
        inv = await invite(api, owner, team["id"], unique_email(), expires_in_s=seconds)
        assert datetime.fromisoformat(inv["expires_at"]) - datetime.fromisoformat(
            inv["created_at"]
        ) == timedelta(seconds=seconds)


async def test_guessing_invitation_tokens_is_rate_limited(
    gateway: Gateway, api: Api, db: asyncpg.Connection, redis: Redis
) -> None:
    await clear_guess_limits(redis)
    owner = await api.signup()
    team = await api.team(owner)
    email = unique_email()
    user = await api.signup(email)
    token = await outbox_token(db, (await invite(api, owner, team["id"], email))["id"])
    for i in range(10):
        status, _ = await accept(api, user, f"guess{i:02d}" + "x" * 38)
        assert status == 404
    status, err = await accept(api, user, token)  # even the right token, for now
    assert (status, err["error"]["code"]) == (429, "rate_limited")
    other = await api.signup()  # another account from the same address is not locked out
    assert (await accept(api, other, "y" * 43))[0] == 404
    # Per address: the 50th attempt from one address makes every account there wait.
    await redis.set(rk.guess_keys("invite", "client", "127.0.0.1")[0], 49)
    assert (await api.call("GET", f"/api/invitations/{'z' * 43}"))[0] == 404
    assert (await api.call("GET", f"/api/invitations/{token}"))[0] == 429
    await clear_guess_limits(redis)
    await api.call("POST", f"/api/invitations/{token}/accept", session=user, expect=200)


# --- the invite link and join requests ------------------------------------------------------------
async def test_invite_link_and_join_requests(
    gateway: Gateway, api: Api, db: asyncpg.Connection
) -> None:
    owner = await api.signup()
    team = await api.team(owner)
    tid = team["id"]
    admin = await add_member(api, owner, tid, "admin")
    _, link = await api.call("POST", f"/api/teams/{tid}/invite-link", session=admin, expect=201)
    assert link["url"] == f"{gateway.config.public_url}/join/{link['token']}"
    _, state = await api.call("GET", f"/api/teams/{tid}/invite-link", session=owner, expect=200)
    assert state["enabled"] is True and "token" not in state and "url" not in state
    first, second = await api.signup(name="First"), await api.signup(name="Second")
    _, req1 = await api.call("POST", f"/api/join/{link['token']}", session=first, expect=201)
    _, again = await api.call("POST", f"/api/join/{link['token']}", session=first, expect=200)
    assert again == req1 and req1["status"] == "pending" and req1["team_id"] == tid
    _, req2 = await api.call("POST", f"/api/join/{link['token']}", session=second, expect=201)
    assert (await api.overview(owner, tid))["pending_join_requests"] == 2
    _, pending = await api.call("GET", f"/api/teams/{tid}/join-requests", session=admin, expect=200)
    assert [(r["id"], r["email"], r["name"]) for r in pending["data"]] == [
        (req1["id"], first.user["email"], "First"),
        (req2["id"], second.user["email"], "Second"),
    ]
    _, approved = await api.call(
        "POST", f"/api/teams/{tid}/join-requests/{req1['id']}/approve", session=admin, expect=200
    )
    assert (approved["status"], approved["decided_by"]) == ("approved", admin.user["id"])
    _, denied = await api.call(
        "POST", f"/api/teams/{tid}/join-requests/{req2['id']}/deny", session=owner, expect=200
    )
    assert denied["status"] == "denied"
    for rid in (req1["id"], req2["id"]):
        status, err = await api.call(
            "POST", f"/api/teams/{tid}/join-requests/{rid}/approve", session=owner
        )
        assert (status, err["error"]["code"]) == (409, "join_request_not_pending")
    assert (await api.overview(first, tid))["your_role"] == "member"
    await api.call("GET", f"/api/teams/{tid}", session=second, expect=404)
    status, err = await api.call("POST", f"/api/join/{link['token']}", session=first)
    assert (status, err["error"]["code"]) == (409, "already_member")
    _, every = await api.call(
        "GET", f"/api/teams/{tid}/join-requests?status=all", session=owner, expect=200
    )
    assert [r["status"] for r in every["data"]] == [
        "approved",
        "approved",
        "denied",
    ]  # admin, first, second
    assert (await api.overview(owner, tid))["pending_join_requests"] == 0

    # A new link kills the old one; deleting disables it.
    _, link2 = await api.call("POST", f"/api/teams/{tid}/invite-link", session=owner, expect=201)
    assert link2["token"] != link["token"]
    third = await api.signup()
    status, err = await api.call("POST", f"/api/join/{link['token']}", session=third)
    assert (status, err["error"]["code"]) == (410, "invite_link_not_valid")
    await api.call("DELETE", f"/api/teams/{tid}/invite-link", session=owner, expect=200)
    status, err = await api.call("POST", f"/api/join/{link2['token']}", session=third)
    assert (status, err["error"]["code"]) == (410, "invite_link_not_valid")
    _, state = await api.call("GET", f"/api/teams/{tid}/invite-link", session=owner, expect=200)
    assert state == {"enabled": False}
    assert (await api.call("POST", f"/api/join/{link2['token']}"))[0] == 401  # login needed
    actions = await db.fetch(
        "SELECT action FROM audit_log WHERE team_id = $1 AND (action LIKE 'join_request.%'"
        " OR action LIKE 'invite_link.%') ORDER BY id",
        tid,
    )
    assert [a["action"] for a in actions][-7:] == [
        "invite_link.create",
        "join_request.create",
        "join_request.create",
        "join_request.approve",
        "join_request.deny",
        "invite_link.create",
        "invite_link.disable",
    ]


async def test_join_request_list_validation(gateway: Gateway, api: Api) -> None:
    owner = await api.signup()
    team = await api.team(owner)
    for query, param in (("?status=open", "status"),):
        status, err = await api.call(
            "GET", f"/api/teams/{team['id']}/join-requests{query}", session=owner
        )
        assert (status, err["error"]["param"]) == (400, param)
    status, err = await api.call(
        "GET", f"/api/teams/{team['id']}/invitations?status=x", session=owner
    )
    assert (status, err["error"]["param"]) == (400, "status")
    status, err = await api.call(
        "POST",
        f"/api/teams/{team['id']}/join-requests/jrq_00000000000000000000/approve",
        session=owner,
    )
    assert (status, err["error"]["code"]) == (404, "join_request_not_found")


async def test_guessing_join_links_is_rate_limited(
    gateway: Gateway, api: Api, redis: Redis
) -> None:
    await clear_guess_limits(redis)
    owner = await api.signup()
    team = await api.team(owner)
    _, link = await api.call(
        "POST", f"/api/teams/{team['id']}/invite-link", session=owner, expect=201
    )
    user = await api.signup()
    for i in range(10):
        status, err = await api.call("POST", f"/api/join/guess{i:02d}" + "z" * 38, session=user)
        assert (status, err["error"]["code"]) == (404, "invite_link_not_found")
    status, err = await api.call("POST", f"/api/join/{link['token']}", session=user)
    assert (status, err["error"]["code"]) == (429, "rate_limited")
    assert err["error"]["type"] == "rate_limit_error"
    await clear_guess_limits(redis)
    await api.call("POST", f"/api/join/{link['token']}", session=user, expect=201)
