"""Helpers for the billing and limits tests: requests whose hold equals their actual cost, raw
chat calls, members added through the public API, team settings, a webhook receiver."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from gateway import state as S
from policies.money import format_usd
from tests.conftest import Gateway
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api, HasV1, Session, eventually
from tests.people import add_member  # noqa: F401  (re-exported for the billing tests)

INPUT = 150  # gpt-4o-mini, nano-USD per token
OUTPUT = 600


def usd(nanos: int) -> str:
    return format_usd(nanos)


@dataclass(frozen=True)
class Exact:
    """A chat body whose hold is exactly its actual list cost: the fake reports the prompt tokens
    the gateway counts with tiktoken, and ``max_tokens`` completion tokens."""

    body: dict[str, Any]
    prompt_tokens: int
    completion_tokens: int

    @property
    def cost(self) -> int:
        return self.prompt_tokens * INPUT + self.completion_tokens * OUTPUT


def exact(gateway: Gateway, fake: FakeUpstream, max_tokens: int = 6, content: str = "hi") -> Exact:
    """Also sets the fake's default prompt tokens (reset after the test)."""
    assert max_tokens <= 6, "the fake sends at most 6 pieces by default"
    body = {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": content}],
        "max_tokens": max_tokens,
    }
    prompt = gateway.app[S.TOKENS].count_chat_prompt(body, "o200k_base")
    fake.set_default(prompt_tokens=prompt)
    return Exact(body, prompt, max_tokens)


async def models(http: aiohttp.ClientSession, gateway: HasV1, secret: str) -> list[str]:
    async with http.get(
        gateway.v1 + "/models", headers={"Authorization": f"Bearer {secret}"}
    ) as resp:
        assert resp.status == 200, await resp.text()
        return [m["id"] for m in (await resp.json())["data"]]


async def patch_team(
    api: Api, session: Session, team_id: str, expect: int = 200, **fields: Any
) -> Any:
    _, body = await api.call(
        "PATCH", f"/api/teams/{team_id}", session=session, json=fields, expect=expect
    )
    return body


async def patch_member(
    api: Api, session: Session, team_id: str, user_id: str, expect: int = 200, **fields: Any
) -> Any:
    _, body = await api.call(
        "PATCH",
        f"/api/teams/{team_id}/members/{user_id}",
        session=session,
        json=fields,
        expect=expect,
    )
    return body


async def billing(api: Api, session: Session, team_id: str) -> dict[str, Any]:
    _, body = await api.call("GET", f"/api/teams/{team_id}/billing", session=session, expect=200)
    return dict(body)


async def subscribe(
    api: Api, session: Session, team_id: str, plan: str | None, seats: int, expect: int = 200
) -> Any:
    _, body = await api.call(
        "PUT",
        f"/api/teams/{team_id}/subscription",
        session=session,
        json={"plan": plan, "seats": seats},
        expect=expect,
    )
    return body


@dataclass
class Delivery:
    headers: CIMultiDict[str]
    raw: bytes


@dataclass
class Receiver:
    """A real HTTP server on loopback that records webhook deliveries. ``statuses`` are answered
    in order, then 200."""

    statuses: list[int] = field(default_factory=list)
    deliveries: list[Delivery] = field(default_factory=list)
    answered: list[int] = field(default_factory=list)
    arrivals: list[float] = field(default_factory=list)  # monotonic, every attempt
    url: str = ""
    _runner: web.AppRunner | None = None

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hook", self._hook)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.url = f"http://{host}:{port}/hook"
        return self

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()

    async def _hook(self, request: web.Request) -> web.Response:
        status = self.statuses.pop(0) if self.statuses else 200
        self.answered.append(status)
        self.arrivals.append(asyncio.get_running_loop().time())
        if status == 200:
            self.deliveries.append(Delivery(CIMultiDict(request.headers), await request.read()))
        return web.Response(status=status, text="ok" if status == 200 else "try again")

    async def wait_for(self, count: int, timeout: float = 10.0) -> list[Delivery]:
        """The deliveries, once there are ``count`` (fails at the deadline)."""
        await eventually(
            lambda: asyncio.sleep(0, len(self.deliveries)), lambda n: n >= count, timeout
        )
        return self.deliveries


def verify(secret: str, delivery: Delivery) -> bool:
    expected = "sha256=" + hmac.new(secret.encode(), delivery.raw, hashlib.sha256).hexdigest()
    return hmac.compare_digest(expected, delivery.headers.get("X-Modelbridge-Signature", ""))
