"""The team dashboard at ``/``, driven in headless chromium; and its security headers and CSRF
protection over plain HTTP.

The story: an owner signs up in the browser, creates a team and invites a member; the mail
arrives over SMTP (aiosmtpd); the member follows its link, signs up, joins and creates a key; a
request through the proxy with that key shows up in the Usage page and its CSV; the owner sets a
hard limit for the member, whose next request is refused. Screenshots of every page land in
``tests/artifacts/``.
"""

from __future__ import annotations

import asyncio
import csv
import dataclasses
import io
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
from aiosmtpd.controller import Controller
from playwright.async_api import Browser, Page, expect

from gateway.config import SmtpConfig
from tests.browser import Inbox, Tab, launch, open_tab
from tests.conftest import ADMIN_TOKEN, Gateway, free_port, gateway_config, start_gateway
from tests.fake_upstream import FakeUpstream
from tests.helpers import PASSWORD, Api, Session, eventually, unique_email

INVITE_PATH = re.compile(r"/invite/[A-Za-z0-9_-]{20,}")
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi there"}]}
# The fake upstream reports these tokens for the member's request: 20000 * 150 + 5000 * 600 nanos.
BIG = {"prompt_tokens": 20_000, "completion_tokens": 5_000}
BIG_COST = "0.006000000"


@dataclasses.dataclass
class MailGateway:
    gateway: Gateway
    api: Api
    inbox: Inbox


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async for b in launch():
        yield b


@pytest.fixture(scope="module")
async def mail(
    fake: FakeUpstream, database_url: str, redis_url: str, http: aiohttp.ClientSession
) -> AsyncIterator[MailGateway]:
    """A second gateway whose invitation mails go to a real SMTP server on loopback."""
    inbox = Inbox()
    controller = Controller(inbox, hostname="127.0.0.1", port=free_port())
    controller.start()
    smtp = SmtpConfig(
        host="127.0.0.1",
        port=controller.port,
        from_addr="ModelBridge <noreply@mb.test>",
        timeout_s=5,
    )
    config = dataclasses.replace(gateway_config(fake.base_url), smtp=smtp)
    gw, runner = await start_gateway(config, database_url, redis_url)
    yield MailGateway(gw, Api(http, gw.base, ADMIN_TOKEN), inbox)
    await runner.cleanup()
    controller.stop()


def sdk(gateway: Gateway, key: str) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=gateway.v1, api_key=key, max_retries=0, timeout=10)


async def sign_up(tab: Tab, name: str, email: str) -> None:
    page = tab.page
    await tab.goto("/")
    await expect(page).to_have_url(re.compile(r"/login"))
    await tab.shot("01-login")
    await page.get_by_role("link", name="Create an account").click()
    await page.get_by_label("Your name").fill(name)
    await page.get_by_label("Email").fill(email)
    await page.get_by_label("Password").fill(PASSWORD)
    await tab.shot("02-signup")
    await page.get_by_role("button", name="Create account").click()
    await expect(page).to_have_url(re.compile(r"/teams/new$"))


async def log_in_with_cookie(tab: Tab, session: Session) -> None:
    await tab.context.add_cookies([{"name": "mb_session", "value": session.token, "url": tab.base}])


def row(page: Page, text: str) -> Any:
    return page.locator("tbody tr", has_text=text)


# --- the story ------------------------------------------------------------------------------------
@pytest.mark.browser
async def test_owner_runs_a_team_from_the_browser(
    browser: Browser, mail: MailGateway, fake: FakeUpstream
) -> None:
    gw, api = mail.gateway, mail.api
    owner = await open_tab(browser, gw.base)
    member = await open_tab(browser, gw.base, clipboard=True)
    page = owner.page

    # The owner signs up and creates a team.
    owner_email = unique_email("olivia")
    await sign_up(owner, "Olivia Owner", owner_email)
    await page.get_by_label("Team name").fill("Rocket Lab")
    await page.get_by_role("button", name="Create team").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Rocket Lab")
    team_id = page.url.rstrip("/").split("/")[-1]
    await api.credit_team(team_id, "5.00")  # the operator tops the team up
    await page.reload()
    await expect(page.locator('[data-stat="balance"] .value')).to_have_text("$5.00")
    await owner.shot("03-overview")

    # ... and invites a member by email; the mail arrives over SMTP.
    member_email = unique_email("max")
    await page.get_by_role("link", name="Members", exact=True).click()
    await page.get_by_label("Email address").fill(member_email)
    await page.get_by_label("Role").select_option("member")
    await page.get_by_role("button", name="Send invitation").click()
    invitation = row(page, member_email)
    await expect(invitation).to_contain_text("emailed")
    await owner.shot("04-members-invited")
    messages = await eventually(
        lambda: asyncio.sleep(0, mail.inbox.to(member_email)), lambda m: len(m) == 1
    )
    link = INVITE_PATH.search(str(messages[0].get_content()))
    assert link is not None, messages[0].get_content()

    # The member follows the link, signs up with that address and lands in the team.
    mpage = member.page
    await member.goto(link.group(0))
    await expect(mpage.get_by_role("heading", level=1)).to_have_text("Join Rocket Lab")
    await expect(mpage.get_by_text("Olivia Owner invited")).to_be_visible()
    signup = mpage.get_by_role("tabpanel", name="Create account")
    await expect(signup.get_by_label("Email")).to_have_value(member_email)
    await expect(signup.get_by_label("Email")).not_to_be_editable()
    await signup.get_by_label("Your name").fill("Max Member")
    await signup.get_by_label("Password").fill(PASSWORD)
    await member.shot("05-invitation")
    await signup.get_by_role("button", name="Create account and join").click()
    await expect(mpage).to_have_url(re.compile(rf"/teams/{team_id}$"))
    await expect(mpage.get_by_role("heading", level=1)).to_have_text("Rocket Lab")

    # The member creates a key: the secret is shown once, with a working copy button.
    await mpage.get_by_role("link", name="API keys").click()
    await expect(mpage.get_by_role("heading", level=1)).to_have_text("API keys")
    await mpage.get_by_label("Key name").fill("laptop")
    await mpage.get_by_role("button", name="Create key").click()
    secret_box = mpage.get_by_label("Secret of laptop")
    await expect(secret_box).to_have_value(re.compile(r"^mb_[A-Za-z0-9]{32,}"))
    secret = await secret_box.input_value()
    await mpage.get_by_role("region", name="New API key").get_by_role("button", name="Copy").click()
    assert await mpage.evaluate("navigator.clipboard.readText()") == secret
    await expect(row(mpage, "laptop")).to_contain_text(secret[:8])
    await member.shot("06-keys-secret-once")
    await mpage.get_by_role("button", name="Done, I saved it").click()
    await expect(secret_box).to_have_count(0)

    # A request through the proxy with that key.
    fake.next(**BIG)
    raw = await sdk(gw, secret).chat.completions.with_raw_response.create(**CHAT)
    assert raw.headers["x-modelbridge-cost-usd"] == BIG_COST

    # It shows up in the owner's Usage page: the chart, the per-member breakdown, the CSV.
    await page.get_by_role("link", name="Usage").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Usage")
    member_row = row(page, member_email)

    async def shown() -> int:  # the usage record may land after the page loaded: ask again
        count = await member_row.count()
        if not count:
            await page.get_by_role("button", name="Show", exact=True).click()
        return count

    await eventually(shown, lambda count: count > 0, interval=0.2)
    await expect(member_row).to_contain_text("$0.006")
    await expect(member_row).to_contain_text("20,000")
    await expect(page.locator('[data-stat="charged"] .value')).to_have_text("$0.006")
    await expect(page.locator('rect.bar[data-nanos="6000000"]')).to_have_count(1)
    await owner.shot("07-usage")
    async with page.expect_download() as download_info:
        await page.get_by_role("link", name="Export usage by member as CSV").click()
    download = await download_info.value
    text = Path(await download.path()).read_text()
    rows = list(csv.DictReader(io.StringIO(text)))
    assert rows[0]["label"] == member_email and rows[0]["charged_usd"] == BIG_COST, text
    assert rows[-1]["group"] == "total" and rows[-1]["requests"] == "1"
    await page.get_by_role("radio", name="Model").check()
    await expect(row(page, "gpt-4o-mini")).to_contain_text("$0.006")

    # The owner gives the member a hard limit below what they spent; their next request is refused.
    await page.get_by_role("link", name="Members", exact=True).click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Members")
    await page.get_by_role("button", name="Edit Max Member").click()
    dialog = page.get_by_role("dialog", name="Edit Max Member")
    await dialog.get_by_label("Individual limit").check()
    await dialog.get_by_label("Individual monthly limit").fill("0.005")
    await dialog.get_by_label("Hard: refuse requests").check()
    await owner.shot("08-member-limit-dialog", full_page=False)
    await dialog.get_by_role("button", name="Save changes").click()
    await expect(dialog).to_have_count(0)
    await expect(row(page, member_email)).to_contain_text("$0.005")
    await expect(row(page, member_email)).to_contain_text("individual")
    await owner.shot("09-members-limit")
    with pytest.raises(openai.RateLimitError) as refused:
        await sdk(gw, secret).chat.completions.create(**CHAT)
    assert refused.value.code == "member_limit_reached"

    # The member sees their own spend against that limit on the overview.
    await mpage.get_by_role("link", name="Overview").click()
    await expect(mpage.locator('[data-stat="your-spend"]')).to_contain_text("of $0.005 limit")
    await member.shot("10-member-overview")

    # The remaining pages, for the record.
    for name, link_name in (("11-settings", "Settings"), ("12-billing", "Billing")):
        await page.get_by_role("link", name=link_name).click()
        await expect(page.get_by_role("heading", level=1)).to_have_text(link_name)
        await owner.shot(name)
    await page.get_by_role("link", name="Personal").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Olivia Owner")
    await owner.shot("13-personal")
    await owner.close()
    await member.close()


# --- roles ----------------------------------------------------------------------------------------
async def _join(api: Api, owner: Session, team_id: str, role: str) -> Session:
    user = await api.signup(name=f"{role.title()} Person")
    _, link = await api.call("POST", f"/api/teams/{team_id}/invite-link", session=owner, expect=201)
    _, req = await api.call("POST", f"/api/join/{link['token']}", session=user, expect=201)
    await api.call(
        "POST", f"/api/teams/{team_id}/join-requests/{req['id']}/approve", session=owner, expect=200
    )
    if role != "member":
        await api.call(
            "PATCH",
            f"/api/teams/{team_id}/members/{user.user['id']}",
            session=owner,
            json={"role": role},
            expect=200,
        )
    return user


@pytest.mark.browser
async def test_controls_follow_the_role_matrix(
    browser: Browser, gateway: Gateway, api: Api
) -> None:
    owner = await api.signup(name="Owner Person")
    team = await api.team(owner, name="Matrix")
    admin = await _join(api, owner, team["id"], "admin")
    member = await _join(api, owner, team["id"], "member")
    base = f"/teams/{team['id']}"

    tab = await open_tab(browser, gateway.base)
    page = tab.page
    await log_in_with_cookie(tab, member)
    await tab.goto(base + "/members")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Members")
    nav = page.get_by_role("navigation", name="Team Matrix")
    await expect(nav.get_by_role("link")).to_have_text(["Overview", "Members", "Usage", "API keys"])
    await expect(page.get_by_role("button", name="Send invitation")).to_have_count(0)
    await expect(page.get_by_role("button", name=re.compile(r"^(Edit|Remove) "))).to_have_count(0)
    await expect(page.get_by_role("button", name="Leave the team")).to_have_count(1)
    await expect(page.get_by_text("Pending invitations")).to_have_count(0)
    await tab.shot("20-member-members")
    await tab.goto(base + "/keys")
    await expect(page.get_by_role("heading", name="Your keys in this team")).to_be_visible()
    for forbidden in ("settings", "billing"):
        await tab.goto(f"{base}/{forbidden}")
        await expect(page.get_by_role("heading", level=1)).to_have_text("Not available")
        await expect(page.get_by_text("for team owners and admins")).to_be_visible()
    await tab.close()

    tab = await open_tab(browser, gateway.base)
    page = tab.page
    await log_in_with_cookie(tab, admin)
    await tab.goto(base + "/settings")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Settings")
    await expect(page.get_by_role("button", name="Save member limits")).to_be_visible()
    await expect(page.get_by_role("button", name="Save spending limit")).to_have_count(0)
    await expect(page.get_by_text("Only the owner changes it.")).to_be_visible()
    await expect(page.get_by_role("heading", name="Owner actions")).to_have_count(0)
    await tab.goto(base + "/members")
    await expect(page.get_by_role("button", name="Send invitation")).to_be_visible()
    await expect(page.get_by_role("button", name="Edit Owner Person")).to_have_count(0)
    await expect(page.get_by_role("button", name="Remove Owner Person")).to_have_count(0)
    await expect(page.get_by_role("button", name="Remove Member Person")).to_be_visible()
    await tab.goto(base + "/billing")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Billing")
    await expect(page.get_by_role("button", name="Update subscription")).to_have_count(0)
    await tab.shot("21-admin-billing")
    await tab.close()

    tab = await open_tab(browser, gateway.base)
    page = tab.page
    await log_in_with_cookie(tab, owner)
    await tab.goto(base + "/settings")
    await expect(page.get_by_role("button", name="Save spending limit")).to_be_visible()
    await expect(page.get_by_role("heading", name="Owner actions")).to_be_visible()
    await tab.goto(base + "/billing")
    await expect(page.get_by_role("button", name="Update subscription")).to_be_visible()
    await tab.close()


# --- smaller browser checks -----------------------------------------------------------------------
@pytest.mark.browser
async def test_money_is_formatted_without_floats(browser: Browser, gateway: Gateway) -> None:
    tab = await open_tab(browser, gateway.base)
    await tab.goto("/login")
    cases = {
        "12.500000000": "$12.50",
        "0.000000000": "$0.00",
        "1234567.891234567": "$1,234,567.8912",
        "0.004350000": "$0.0044",
        "0.000004350": "$0.000004",
        "0.000000001": "$0.000000001",
        "0.000030000": "$0.00003",
        "-3.100000000": "-$3.10",
        "90071992547409.930000001": "$90,071,992,547,409.93",
        "0.999950000": "$1.00",
    }
    got = await tab.page.evaluate(
        "async (cases) => { const m = await import('/static/js/money.js');"
        " return Object.fromEntries(Object.keys(cases).map((k) => [k, m.usd(k)])); }",
        cases,
    )
    assert got == cases
    plain = await tab.page.evaluate(
        "async () => { const m = await import('/static/js/money.js');"
        " return [m.plain('12.500000000'), m.plain(null), m.parseAmount('$1,000.25'),"
        " String(m.sum(['0.1', '0.2']))]; }"
    )
    assert plain == ["12.50", "", "1000.25", "300000000"]
    await tab.close()


@pytest.mark.browser
async def test_keyboard_login_shows_the_apis_error(
    browser: Browser, gateway: Gateway, api: Api
) -> None:
    session = await api.signup(name="Kay Board")
    tab = await open_tab(browser, gateway.base)
    page = tab.page
    await tab.goto("/teams/new/typo")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Page not found")
    await tab.goto("/login")
    await expect(page.get_by_label("Email")).to_be_visible()
    await page.keyboard.press("Tab")
    await expect(page.get_by_role("link", name="Skip to content")).to_be_focused()
    await page.keyboard.press("Tab")
    await expect(page.get_by_label("Email")).to_be_focused()
    await page.keyboard.type(session.user["email"])
    await page.keyboard.press("Tab")
    await page.keyboard.type("not-the-password")
    await page.keyboard.press("Enter")
    alert = page.get_by_role("alert")
    await expect(alert).to_have_text("Wrong email or password.")  # the API's error.message
    await tab.shot("14-login-error")
    await page.get_by_label("Password").fill(PASSWORD)
    await page.keyboard.press("Enter")
    await expect(page.get_by_role("heading", level=1)).to_have_text("Welcome, Kay Board")
    await page.get_by_role("button", name="Log out").press("Enter")
    await expect(page).to_have_url(re.compile(r"/login$"))
    status, _ = await api.call("GET", "/api/me", headers={"Cookie": "mb_session=" + session.token})
    assert status == 200  # logging out one browser does not end other sessions
    await tab.close()


@pytest.mark.browser
async def test_join_from_a_public_link_and_approve(
    browser: Browser, gateway: Gateway, api: Api
) -> None:
    owner = await api.signup(name="Link Owner")
    team = await api.team(owner, name="Open House")
    tab = await open_tab(browser, gateway.base)
    page = tab.page
    await log_in_with_cookie(tab, owner)
    await tab.goto(f"/teams/{team['id']}/settings")
    await page.get_by_role("button", name="Enable a public link").click()
    url = await page.get_by_label("Public invite link").input_value()
    path = url[url.index("/join/") :]

    guest = await open_tab(browser, gateway.base)
    gpage = guest.page
    email = unique_email("guest")
    await guest.goto(path)
    await expect(gpage.get_by_role("heading", level=1)).to_have_text("Request to join a team")
    signup = gpage.get_by_role("tabpanel", name="Create account")
    await signup.get_by_label("Your name").fill("Gus Guest")
    await signup.get_by_label("Email").fill(email)
    await signup.get_by_label("Password").fill(PASSWORD)
    await signup.get_by_role("button", name="Create account and ask to join").click()
    await gpage.get_by_role("button", name="Request to join").click()
    await expect(gpage.get_by_text("Request sent.")).to_be_visible()
    await expect(gpage.get_by_text("Open House")).to_be_visible()
    await guest.shot("30-join-requested")

    await tab.goto(f"/teams/{team['id']}/members")
    await page.get_by_role("button", name=f"Approve {email}").click()
    await expect(row(page, email)).to_contain_text("member")
    await expect(page.get_by_text("No join requests")).to_be_visible()
    await tab.close()
    await guest.close()


# --- HTTP: headers, CSRF, static files ------------------------------------------------------------
async def test_pages_carry_security_headers(gateway: Gateway, http: aiohttp.ClientSession) -> None:
    for path in ("/", "/login", "/teams/team_00000000000000000000/usage", "/invite/abc"):
        async with http.get(gateway.base + path) as resp:
            assert resp.status == 200
            assert resp.headers["X-Frame-Options"] == "DENY"
            csp = resp.headers["Content-Security-Policy"]
            assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp
            assert "unsafe-inline" not in csp
            html = await resp.text()
    assert re.search(r"<script(?![^>]*\bsrc=)[^>]*>", html) is None, "no inline scripts"
    assert " style=" not in html and "http://" not in html and "https://" not in html
    async with http.get(gateway.base + "/static/js/app.js") as resp:
        assert resp.status == 200 and resp.content_type == "text/javascript"
        assert resp.headers["X-Content-Type-Options"] == "nosniff"
    for bad in ("/static/../__init__.py", "/static/%2e%2e/__init__.py", "/static/js/nope.js"):
        async with http.get(gateway.base + bad) as resp:
            assert resp.status == 404, bad
    async with http.get(gateway.base + "/api/nope") as resp:
        assert resp.status == 404 and resp.content_type == "application/json"


async def test_csrf_double_submit(gateway: Gateway, api: Api) -> None:
    session = await api.signup()
    base = gateway.base
    async with aiohttp.ClientSession(cookie_jar=aiohttp.CookieJar(unsafe=True)) as browser_like:
        async with browser_like.get(base + "/") as resp:
            token = resp.cookies["mb_csrf"].value
            assert not resp.cookies["mb_csrf"]["httponly"]
            assert resp.cookies["mb_csrf"]["samesite"] == "Lax"
        async with browser_like.post(
            base + "/api/auth/login", json={"email": session.user["email"], "password": PASSWORD}
        ) as resp:
            assert resp.status == 200
            cookie = resp.cookies["mb_session"]
            assert cookie["httponly"] and cookie["samesite"] == "Lax" and not cookie["secure"]
            token = resp.cookies["mb_csrf"].value  # a fresh token per login
        async with browser_like.post(base + "/api/teams", json={"name": "x"}) as resp:
            body = await resp.json()
            assert resp.status == 403 and body["error"]["code"] == "csrf_failed", body
        async with browser_like.post(
            base + "/api/teams", json={"name": "x"}, headers={"x-csrf-token": token + "x"}
        ) as resp:
            assert resp.status == 403
        async with browser_like.post(
            base + "/api/teams", json={"name": "x"}, headers={"x-csrf-token": token}
        ) as resp:
            assert resp.status == 201
        async with browser_like.post(
            base + "/api/teams",
            json={"name": "x"},
            headers={"x-csrf-token": token, "Origin": "https://evil.example"},
        ) as resp:
            assert resp.status == 403
        async with browser_like.get(base + "/api/me") as resp:
            assert resp.status == 200  # reads need no token
    # Scripts with a bearer token are not affected; a cross-site login is refused.
    await api.call("POST", "/api/teams", session=session, json={"name": "y"}, expect=201)
    await api.call(
        "POST",
        "/api/auth/login",
        json={"email": session.user["email"], "password": PASSWORD},
        headers={"Origin": "https://evil.example"},
        expect=403,
    )
    await api.call(
        "POST",
        "/api/auth/login",
        json={"email": session.user["email"], "password": PASSWORD},
        headers={"Sec-Fetch-Site": "cross-site"},
        expect=403,
    )
    await api.call(
        "POST",
        "/api/auth/login",
        json={"email": session.user["email"], "password": PASSWORD},
        headers={"Origin": base},
        expect=200,
    )


async def test_models_and_plans_for_the_dashboard(gateway: Gateway, api: Api) -> None:
    status, _ = await api.call("GET", "/api/models")
    assert status == 401
    session = await api.signup()
    _, body = await api.call("GET", "/api/models", session=session, expect=200)
    assert [m["id"] for m in body["data"]] == ["gpt-4o-mini", "gpt-4o", "text-embedding-3-small"]
    assert body["data"][0]["input_per_mtok_usd"] == "0.150000000"
    assert body["data"][0]["cached_input_per_mtok_usd"] == "0.075000000"
    _, body = await api.call("GET", "/api/plans", session=session, expect=200)
    assert body["data"][0] == {
        "id": "starter",
        "seat_price_usd": "10.000000000",
        "included_usage_per_seat_usd": "2.000000000",
    }


async def test_csrf_cookie_is_secure_behind_tls(
    fake: FakeUpstream, database_url: str, redis_url: str, http: aiohttp.ClientSession
) -> None:
    config = gateway_config(fake.base_url, public_url="https://gateway.example")
    gw, runner = await start_gateway(config, database_url, redis_url)
    try:
        async with http.get(gw.base + "/") as resp:
            assert resp.cookies["mb_csrf"]["secure"]
    finally:
        await runner.cleanup()
