"""Bad input, provider failures and cut streams: clear errors, holds released, usage kept."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any, cast

import aiohttp
import asyncpg
import pytest
from redis.asyncio import Redis

from gateway import state as S
from gateway.proxy.handlers import Call, release_quietly
from gateway.proxy.tokens import TokenCounter
from tests.conftest import ADMIN_TOKEN, Gateway
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api, account_state, eventually
from tests.rawhttp import counts

CHAT = [{"role": "user", "content": "hi there"}]


async def post(
    http: aiohttp.ClientSession, gateway: Gateway, key: str, body: Any, **kw: Any
) -> tuple[int, Any, Any]:
    data = body if isinstance(body, bytes) else None
    async with http.post(
        gateway.v1 + "/chat/completions",
        json=None if data is not None else body,
        data=data,
        headers={"Authorization": f"Bearer {key}", **kw.get("headers", {})},
    ) as resp:
        payload = await resp.json(content_type=None)
        return resp.status, payload, resp.headers


@pytest.mark.parametrize(
    ("body", "status", "code", "param"),
    [
        (b"not json", 400, "invalid_request_error", None),
        (b"[1, 2]", 400, "invalid_request_error", None),
        ({"messages": CHAT}, 400, "invalid_request_error", "model"),
        ({"model": 7, "messages": CHAT}, 400, "invalid_request_error", "model"),
        ({"model": "gpt-9", "messages": CHAT}, 404, "model_not_found", "model"),
        ({"model": "gpt-4o-mini", "messages": "hi"}, 400, "invalid_request_error", "messages"),
        ({"model": "gpt-4o-mini", "messages": []}, 400, "invalid_request_error", "messages"),
        (
            {"model": "gpt-4o-mini", "messages": [{"content": "x"}]},
            400,
            "invalid_request_error",
            "messages",
        ),
        (
            {"model": "gpt-4o-mini", "messages": CHAT, "stream": "yes"},
            400,
            "invalid_request_error",
            "stream",
        ),
        (
            {"model": "gpt-4o-mini", "messages": CHAT, "max_tokens": -1},
            400,
            "invalid_request_error",
            "max_tokens",
        ),
        ({"model": "gpt-4o-mini", "messages": CHAT, "n": 0}, 400, "invalid_request_error", "n"),
    ],
)
async def test_bad_input_is_a_clear_4xx_and_changes_nothing(
    gateway: Gateway,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    redis: Redis,
    body: Any,
    status: int,
    code: str,
    param: str | None,
) -> None:
    owner, team, secret = await api.funded_team_key("1.00")
    before = await api.overview(owner, team["id"])
    got_status, payload, _headers = await post(http, gateway, secret, body)
    assert got_status == status
    assert payload["error"]["code"] == code
    assert payload["error"]["param"] == param
    assert set(payload["error"]) == {"message", "type", "param", "code"}
    assert fake.requests == []
    assert await api.overview(owner, team["id"]) == before


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (b"not json", "The request body is not valid JSON."),
        (b"[1, 2]", "The request body must be a JSON object."),
    ],
)
async def test_a_body_that_is_not_a_json_object_is_refused_alike_by_the_proxy_and_the_api(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession, raw: bytes, message: str
) -> None:
    _, team, secret = await api.funded_team_key()
    refusal = {"message": message, "type": "invalid_request_error", "param": None}
    proxied = await post(http, gateway, secret, raw)
    assert proxied[:2] == (400, {"error": {**refusal, "code": "invalid_request_error"}})
    async with http.post(
        f"{gateway.base}/admin/teams/{team['id']}/credits",
        data=raw,
        headers={"Authorization": f"Bearer {ADMIN_TOKEN}", "Content-Type": "application/json"},
    ) as resp:
        managed = (resp.status, await resp.json())
    assert managed == (400, {"error": {**refusal, "code": "invalid_request_error"}})


async def test_body_over_the_cap_is_413(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession
) -> None:
    _, _, secret = await api.funded_team_key()
    big = (
        b'{"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "'
        + b"a" * (10 * 1024 * 1024)
        + b'"}]}'
    )
    status, payload, _ = await post(http, gateway, secret, big)
    assert status == 413 and payload["error"]["code"] == "payload_too_large"


@pytest.mark.parametrize("upstream_status", [500, 503, 429, 400])
async def test_upstream_error_releases_the_hold(
    gateway: Gateway,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    redis: Redis,
    upstream_status: int,
) -> None:
    owner, team, secret = await api.funded_team_key("1.00")
    fake.next(status=upstream_status)
    status, payload, headers = await post(
        http, gateway, secret, {"model": "gpt-4o-mini", "messages": CHAT}
    )
    assert status == upstream_status
    assert payload["error"]["code"] == "upstream_error"
    assert headers["x-request-id"].startswith("req_")
    state = await account_state(redis, team["id"])
    assert (state["holds"], state["credits"]) == ("0", "1000000000")
    assert (await api.overview(owner, team["id"]))["spend_this_period_usd"] == "0.000000000"


async def test_upstream_timeout_is_504(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession, fake: FakeUpstream, redis: Redis
) -> None:
    _, team, secret = await api.funded_team_key("1.00")
    fake.next(hang=True)
    status, payload, _ = await post(
        http, gateway, secret, {"model": "gpt-4o-mini", "messages": CHAT}
    )
    assert (status, payload["error"]["code"]) == (504, "upstream_timeout")
    assert (await account_state(redis, team["id"]))["holds"] == "0"
    await fake.wait_until(lambda: fake.cancelled == 1)


async def test_unreachable_upstream_is_502(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession, redis: Redis
) -> None:
    from gateway import state as S
    from gateway.upstream.http1 import Origin

    _, team, secret = await api.funded_team_key("1.00")
    upstreams = gateway.app[S.UPSTREAMS]
    saved = upstreams.origins["fake"]
    # the discard port: nothing listens
    upstreams.origins["fake"] = Origin(
        "http://127.0.0.1:9/v1", {}, connect_timeout=5, read_timeout=5
    )
    try:
        status, payload, _ = await post(
            http, gateway, secret, {"model": "gpt-4o-mini", "messages": CHAT}
        )
    finally:
        upstreams.origins["fake"] = saved
    assert (status, payload["error"]["code"]) == (502, "upstream_error")
    assert payload["error"]["message"] == "upstream fake unreachable or broken"
    assert (await account_state(redis, team["id"]))["holds"] == "0"


async def test_missing_usage_is_estimated_with_tiktoken(
    gateway: Gateway,
    api: Api,
    http: aiohttp.ClientSession,
    fake: FakeUpstream,
    db: asyncpg.Connection,
) -> None:
    _, _, secret = await api.funded_team_key()
    fake.next(omit_usage=True)
    status, _, headers = await post(
        http, gateway, secret, {"model": "gpt-4o-mini", "messages": CHAT}
    )
    assert status == 200
    counter = TokenCounter()
    prompt = counter.count_chat_prompt({"messages": CHAT}, "o200k_base")
    completion = counter.count_text("Hello from the fake upstream.", "o200k_base")
    row = await eventually(
        lambda: db.fetchrow(
            "SELECT * FROM usage_records WHERE request_id = $1", headers["x-request-id"]
        ),
        lambda r: r is not None,
    )
    assert (row["usage_source"], row["prompt_tokens"], row["completion_tokens"]) == (
        "estimated",
        prompt,
        completion,
    )
    assert row["encoding"] == "o200k_base"
    assert row["charged"] == prompt * 150 + completion * 600


async def test_client_leaving_mid_stream_cancels_upstream_and_bills_what_was_streamed(
    gateway: Gateway,
    api: Api,
    lean: aiohttp.ClientSession,
    fake: FakeUpstream,
    db: asyncpg.Connection,
    redis: Redis,
) -> None:
    _, team, secret = await api.funded_team_key()
    fake.next(
        chunk_delay_s=0.3,
        content_pieces=["alpha", " beta", " gamma", " delta", " epsilon", " zeta"],
    )
    body = {"model": "gpt-4o-mini", "messages": CHAT, "stream": True}
    seen = b""
    served, handed = counts(gateway)
    async with lean.post(
        gateway.v1 + "/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"}
    ) as resp:
        request_id = resp.headers["x-request-id"]
        async for chunk in resp.content.iter_any():
            seen += chunk
            if b"beta" in seen:
                break
        resp.close()
    await fake.wait_until(lambda: fake.cancelled == 1, timeout=10)
    row = await eventually(
        lambda: db.fetchrow("SELECT * FROM usage_records WHERE request_id = $1", request_id),
        lambda r: r is not None,
    )
    assert row["usage_source"] == "estimated" and row["status"] == 499
    counter = TokenCounter()
    streamed = counter.count_text("alpha beta", "o200k_base")
    assert row["completion_tokens"] in (
        streamed,
        counter.count_text("alpha beta gamma", "o200k_base"),
    )
    assert (await account_state(redis, team["id"]))["holds"] == "0"
    assert counts(gateway) == (served + 1, handed)  # served by the lean front


async def test_upstream_dropping_mid_stream_bills_what_was_streamed(
    gateway: Gateway,
    api: Api,
    lean: aiohttp.ClientSession,
    fake: FakeUpstream,
    db: asyncpg.Connection,
) -> None:
    _, _, secret = await api.funded_team_key()
    fake.next(drop_after=3, content_pieces=["one", " two", " three", " four"])
    body = {"model": "gpt-4o-mini", "messages": CHAT, "stream": True}
    served, handed = counts(gateway)
    async with lean.post(
        gateway.v1 + "/chat/completions", json=body, headers={"Authorization": f"Bearer {secret}"}
    ) as resp:
        request_id = resp.headers["x-request-id"]
        text = (await resp.read()).decode()
    assert '"code":"upstream_error"' in text and "[DONE]" not in text
    row = await eventually(
        lambda: db.fetchrow("SELECT * FROM usage_records WHERE request_id = $1", request_id),
        lambda r: r is not None,
    )
    assert row["usage_source"] == "estimated"
    assert row["completion_tokens"] == TokenCounter().count_text("one two", "o200k_base")
    assert counts(gateway) == (served + 1, handed)


async def test_redis_down_is_503_and_never_forwarded(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession, fake: FakeUpstream
) -> None:
    from gateway import state as S

    _, _, secret = await api.funded_team_key()
    metering = gateway.app[S.METERING]
    broken = Redis.from_url("redis://127.0.0.1:9/0", socket_connect_timeout=0.5)
    from gateway.metering.scripts import Scripts

    saved = metering.scripts
    metering.scripts = Scripts(broken)
    try:
        status, payload, _ = await post(
            http, gateway, secret, {"model": "gpt-4o-mini", "messages": CHAT}
        )
    finally:
        metering.scripts = saved
        await broken.aclose()
    assert (status, payload["error"]["code"]) == (503, "gateway_unavailable")
    assert fake.requests == []
    await asyncio.sleep(0)


class _Metering:
    """A metering whose release fails as when Redis went away after the hold."""

    def __init__(self) -> None:
        self.released: list[str] = []

    async def release(self, *, account: str, request_id: str, key_id: str, scope: str) -> int:
        self.released.append(request_id)
        raise ConnectionError("redis went away")


async def test_a_release_that_fails_is_logged_never_raised(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The one release of every path (plain, aiohttp's stream, the lean front's stream):
    a failure leaves the hold to expire, is one warning naming the request, and the hold's
    figures stay on the call (its error answer still carries the rate-limit headers)."""
    metering = _Metering()
    key = SimpleNamespace(account="acct", key_id="k1", scope="s")
    hold = object()
    call = cast(Call, SimpleNamespace(app={S.METERING: metering}, key=key, request_id="r1"))
    call.hold = None
    await release_quietly(call)  # no hold: nothing to give back
    assert metering.released == []
    call.hold = hold  # type: ignore[assignment]
    with caplog.at_level("WARNING", logger="modelbridge.proxy"):
        await release_quietly(call)
    assert metering.released == ["r1"]
    assert call.hold is hold
    assert [(r.levelname, r.getMessage()) for r in caplog.records] == [
        ("WARNING", "request r1: hold not released: ConnectionError('redis went away')")
    ]
