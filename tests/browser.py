"""Browser helpers for the dashboard tests: Debian's chromium driven by Playwright.

``playwright install`` cannot download browsers here, so the tests use the system chromium and
install it with apt (once, as root) when it is missing. Every page is opened in its own context
at a laptop size, with every request to another origin refused and recorded, and uncaught script
errors and CSP violations collected, so a test can assert the dashboard never calls out and never
breaks.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from email import message_from_bytes, policy
from email.message import EmailMessage
from pathlib import Path
from typing import Any

from playwright.async_api import Browser, BrowserContext, Page, Route, async_playwright

from tests.debian import ensure_binary

CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
LAPTOP = {"width": 1280, "height": 800}
ARTIFACTS = Path(__file__).resolve().parent / "artifacts"


def ensure_chromium() -> str:
    """The chromium binary; installs Debian's package with apt when missing (root only)."""
    return ensure_binary(("chromium", "chromium-browser"), "chromium")


async def launch() -> AsyncIterator[Browser]:
    executable = ensure_chromium()
    async with async_playwright() as pw:
        browser = await pw.chromium.launch(
            executable_path=executable, headless=True, args=CHROMIUM_ARGS
        )
        try:
            yield browser
        finally:
            await browser.close()


@dataclass
class Tab:
    """One browser context (one person's cookies) and its page, on one gateway."""

    context: BrowserContext
    page: Page
    base: str
    external: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)

    async def goto(self, path: str) -> None:
        await self.page.goto(self.base + path)

    async def shot(self, name: str, *, full_page: bool = True) -> Path:
        ARTIFACTS.mkdir(exist_ok=True)
        path = ARTIFACTS / f"{name}.png"
        await self.page.screenshot(path=str(path), full_page=full_page)
        return path

    def assert_clean(self) -> None:
        assert self.external == [], f"the dashboard called out to: {self.external}"
        assert self.errors == [], f"script errors or CSP violations: {self.errors}"

    async def close(self) -> None:
        self.assert_clean()
        await self.context.close()


async def open_tab(browser: Browser, base: str, *, clipboard: bool = False) -> Tab:
    context = await browser.new_context(viewport=LAPTOP, base_url=base, accept_downloads=True)
    if clipboard:
        await context.grant_permissions(["clipboard-read", "clipboard-write"], origin=base)
    page = await context.new_page()
    tab = Tab(context, page, base)

    async def guard(route: Route) -> None:
        url = route.request.url
        if url.startswith(base + "/") or url == base or url.startswith(("data:", "blob:")):
            await route.continue_()
        else:
            tab.external.append(url)
            await route.abort()

    def on_console(message: Any) -> None:
        text = message.text
        script_error = message.type == "error" and "Failed to load resource" not in text
        if script_error or "Content Security Policy" in text:
            tab.errors.append(text)

    await context.route("**/*", guard)
    page.on("pageerror", lambda exc: tab.errors.append(f"uncaught: {exc}"))
    page.on("console", on_console)
    return tab


class Inbox:
    """An aiosmtpd handler that keeps every delivered message."""

    def __init__(self) -> None:
        self.messages: list[tuple[list[str], EmailMessage]] = []

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        msg = message_from_bytes(envelope.content, policy=policy.default)
        assert isinstance(msg, EmailMessage)
        self.messages.append((list(envelope.rcpt_tos), msg))
        return "250 Message accepted for delivery"

    def to(self, address: str) -> list[EmailMessage]:
        return [m for rcpt, m in self.messages if rcpt == [address]]
