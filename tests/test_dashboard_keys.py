"""The API keys page with key controls, the usage page that shows what a key's limits refused,
and the dashboard at a phone's width (390 px), driven in headless chromium. Screenshots at both
widths land in ``tests/artifacts/``."""

from __future__ import annotations

import re
from collections.abc import AsyncIterator

import openai
import pytest
from playwright.async_api import Browser, Page, expect

from tests.browser import Tab, launch, open_tab
from tests.conftest import Gateway
from tests.helpers import Api, Session
from tests.people import add_member

PHONE = {"width": 390, "height": 844}
CHAT = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 5}
# datetime-local value for a time `days` from now, in the browser's own zone
LOCAL = """(days) => { const d = new Date(Date.now() + days * 86400e3);
  const p = (n) => String(n).padStart(2, '0');
  const date = `${d.getFullYear()}-${p(d.getMonth() + 1)}-${p(d.getDate())}`;
  return `${date}T${p(d.getHours())}:${p(d.getMinutes())}`; }"""


@pytest.fixture(scope="module")
async def browser() -> AsyncIterator[Browser]:
    async for b in launch():
        yield b


async def logged_in(browser: Browser, gateway: Gateway, session: Session) -> Tab:
    tab = await open_tab(browser, gateway.base)
    await tab.context.add_cookies(
        [{"name": "mb_session", "value": session.token, "url": gateway.base}]
    )
    return tab


WIDE = """() => [...document.querySelectorAll('body *')]
  .filter((el) => el.getBoundingClientRect().right > window.innerWidth + 0.5)
  .filter((el) => !el.closest('.table-wrap') || el.classList.contains('table-wrap'))
  .slice(0, 8)
  .map((el) => `${el.tagName}.${el.className} ${Math.round(el.getBoundingClientRect().right)}`)"""


async def no_sideways_scroll(page: Page) -> None:
    width = await page.evaluate("() => [document.documentElement.scrollWidth, window.innerWidth]")
    wide = await page.evaluate(WIDE) if width[0] > width[1] else []
    assert width[0] <= width[1], f"the page scrolls sideways: {width[0]} > {width[1]} px: {wide}"


@pytest.mark.browser
async def test_a_scoped_limited_expiring_key_and_its_429_on_the_usage_page(
    browser: Browser, gateway: Gateway, api: Api
) -> None:
    owner = await api.signup(name="Olga Owner")
    team = await api.team(owner, name="Limits Lab")
    await api.credit_team(team["id"], "5.00")
    member = await add_member(api, owner, team["id"])
    base = f"/teams/{team['id']}"
    tab = await logged_in(browser, gateway, owner)
    page = tab.page
    await tab.goto(base + "/keys")
    await expect(page.get_by_role("heading", level=1)).to_have_text("API keys")

    # An expiry in the past: the API's refusal shows next to that field, nothing is created.
    await page.get_by_label("Key name").fill("ci-bot")
    await page.get_by_text("Expiry, models and limits (optional)").click()
    await page.get_by_label("Expires").fill(await page.evaluate(LOCAL, -1))
    await page.get_by_role("button", name="Create key").click()
    expires = page.locator(".field", has=page.get_by_label("Expires"))
    await expect(expires.locator(".field-error")).to_have_text(
        "'expires_at' must be in the future."
    )
    await expect(page.get_by_label("Expires")).to_have_attribute("aria-invalid", "true")
    await tab.shot("30-key-controls-error")

    # A key for one model, $1 a month, 2 requests a minute, expiring in a week.
    await page.get_by_label("Expires").fill(await page.evaluate(LOCAL, 7))
    await page.get_by_role("checkbox", name="gpt-4o-mini").check()
    await page.get_by_label("Monthly limit").fill("1")
    await page.get_by_label("Requests per minute").fill("2")
    await page.get_by_role("button", name="Create key").click()
    secret_box = page.get_by_label("Secret of ci-bot")
    await expect(secret_box).to_have_value(re.compile(r"^mb_"))
    secret = await secret_box.input_value()
    key_row = page.locator("tbody tr", has_text="ci-bot")
    await expect(key_row).to_contain_text("gpt-4o-mini")
    await expect(key_row).to_contain_text("Expires in 7 days")
    await expect(key_row).to_contain_text("of $1.00")
    await expect(key_row).to_contain_text("0 / 2 requests")
    await tab.shot("31-keys-with-controls")

    # Two requests pass, the third is refused by the key's rate limit; another model, by its scope.
    sdk = openai.AsyncOpenAI(base_url=gateway.v1, api_key=secret, max_retries=0, timeout=10)
    for _ in range(2):
        await sdk.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    with pytest.raises(openai.RateLimitError) as refused:
        await sdk.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    assert refused.value.code == "rate_limit_exceeded"
    with pytest.raises(openai.PermissionDeniedError):
        gpt4o = {**CHAT, "model": "gpt-4o"}
        await sdk.chat.completions.create(**gpt4o)  # type: ignore[call-overload]

    # The usage page shows the key's refusal, its rate now and the real (tiny) amounts.
    await page.get_by_role("link", name="Usage").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Usage")
    limits = page.locator("#key-limits")
    limited_row = limits.locator("tbody tr", has_text="ci-bot")
    await expect(limited_row).to_contain_text("1 request · 429 rate limit")
    await expect(limited_row).to_contain_text("1 request · 429 model not allowed")
    await expect(limited_row).to_contain_text("2 / 2 requests")
    charged = page.locator('[data-stat="charged"] .value')
    for _ in range(50):  # the usage records arrive within a moment
        if (await charged.text_content() or "$0.00") != "$0.00":
            break
        await page.get_by_role("button", name="Show", exact=True).click()
        await page.wait_for_timeout(200)
    text = await charged.text_content() or ""
    assert re.fullmatch(r"\$0\.0000\d+", text), text  # the real figure, never "<$0.0001"
    title = await page.locator('[data-stat="charged"] .value').get_attribute("title")
    assert title is not None and re.fullmatch(r"\$0\.0000\d{5}", title)
    await tab.shot("32-usage-key-refusals")

    # The owner raises the rate limit in the edit dialog; it applies from the next request.
    await page.get_by_role("link", name="API keys").click()
    await page.get_by_role("button", name="Edit ci-bot").click()
    dialog = page.get_by_role("dialog", name="Edit ci-bot")
    await expect(dialog.get_by_label("Requests per minute")).to_have_value("2")
    await expect(dialog.get_by_role("checkbox", name="gpt-4o-mini")).to_be_checked()
    await dialog.get_by_label("Requests per minute").fill("5")
    await dialog.get_by_label("Monthly limit").fill("0.0000000001")
    await dialog.get_by_role("button", name="Save changes").click()
    error = dialog.locator(".field", has=page.get_by_label("Monthly limit")).locator(".field-error")
    await expect(error).to_contain_text("9 decimal")
    await tab.shot("33-key-edit-error", full_page=False)
    await dialog.get_by_label("Monthly limit").fill("2")
    await dialog.get_by_role("button", name="Save changes").click()
    await expect(dialog).to_have_count(0)
    await expect(key_row).to_contain_text("2 / 5 requests")
    await expect(key_row).to_contain_text("of $2.00")
    await sdk.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    await tab.close()

    # A member sees their own keys' settings (and not the owner's key).
    await api.call(
        "POST",
        "/api/keys",
        session=member,
        json={"name": "intern", "team": team["id"], "tpm": 5000},
        expect=201,
    )
    mtab = await logged_in(browser, gateway, member)
    await mtab.goto(base + "/keys")
    mine = mtab.page.locator("tbody tr", has_text="intern")
    await expect(mine).to_contain_text("0 / 5,000 tokens")
    await expect(mtab.page.locator("tbody tr", has_text="ci-bot")).to_have_count(0)
    await mtab.close()


@pytest.mark.browser
async def test_the_dashboard_at_a_phones_width(
    browser: Browser, gateway: Gateway, api: Api
) -> None:
    owner = await api.signup(name="Pat Phone")
    team = await api.team(owner, name="Pocket Team")
    await api.credit_team(team["id"], "1.00")
    for _ in range(3):
        await add_member(api, owner, team["id"], email=None)
    _, key = await api.call(
        "POST",
        "/api/keys",
        session=owner,
        json={"name": "phone-key", "team": team["id"], "rpm": 10},
        expect=201,
    )
    sdk = openai.AsyncOpenAI(base_url=gateway.v1, api_key=key["secret"], max_retries=0, timeout=10)
    await sdk.chat.completions.create(**CHAT)  # type: ignore[call-overload]
    base = f"/teams/{team['id']}"

    tab = await logged_in(browser, gateway, owner)
    page = tab.page
    await page.set_viewport_size(PHONE)
    nav = page.get_by_role("navigation", name="Team Pocket Team")
    for slug, heading in (
        ("usage", "Usage"),
        ("members", "Members"),
        ("keys", "API keys"),
        ("", "Pocket Team"),
    ):
        await tab.goto(f"{base}/{slug}" if slug else base)
        # a generous wait: the shared test machine can take seconds to render a page
        await expect(page.get_by_role("heading", level=1)).to_have_text(heading, timeout=30_000)
        await expect(nav).to_be_hidden()  # the sidebar waits behind the menu button
        await no_sideways_scroll(page)
        await tab.shot(f"40-phone-{slug or 'overview'}")
        # every table fits its card or scrolls inside it
        for wrap in await page.locator(".table-wrap").all():
            box = await wrap.bounding_box()
            assert box is not None and box["x"] >= 0 and box["x"] + box["width"] <= PHONE["width"]
    menu = page.get_by_role("button", name="Menu")
    await expect(menu).to_have_attribute("aria-expanded", "false")
    await menu.click()
    await expect(menu).to_have_attribute("aria-expanded", "true")
    await expect(nav).to_be_visible()
    await tab.shot("41-phone-menu-open", full_page=False)
    await nav.get_by_role("link", name="Usage").click()
    await expect(page.get_by_role("heading", level=1)).to_have_text("Usage")
    await expect(nav).to_be_hidden()  # closed again after navigating
    await no_sideways_scroll(page)

    # the same pages at a laptop's width: the sidebar is always there, no menu button
    await page.set_viewport_size({"width": 1280, "height": 800})
    await expect(nav).to_be_visible()
    await expect(menu).to_be_hidden()
    for slug in ("usage", "members"):
        await tab.goto(f"{base}/{slug}")
        await no_sideways_scroll(page)
        await tab.shot(f"42-laptop-{slug}")
    await tab.close()
