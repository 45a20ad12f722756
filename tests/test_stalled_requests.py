"""A request that comes in part and then stalls is refused: 408 ``request_timeout`` in its path's
envelope, ``Connection: close``, the connection closed, nothing held or charged — on the lean
front (a head or a body it holds in part) and on aiohttp's path (a chunked body, handed over).
The limit is on a wait for more (``server.request_read_timeout_s``, here 0.5 s), not on the whole:
a request that keeps coming is served."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from gateway.config import ConfigError
from tests.conftest import ADMIN_TOKEN, Gateway, gateway_config, start_gateway
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api, account_state
from tests.rawhttp import CHAT, Conn, chunked, connect, post

LIMIT_S = 0.5


@pytest.fixture(scope="module")
async def stalling(fake: FakeUpstream, database_url: str, redis_url: str) -> AsyncIterator[Gateway]:
    config = gateway_config(fake.base_url, request_read_timeout_s=LIMIT_S)
    gw, runner = await start_gateway(config, database_url, redis_url)
    yield gw
    await runner.cleanup()


@pytest.fixture(scope="module")
async def funded(stalling: Gateway) -> AsyncIterator[tuple[str, str]]:
    """(team id, a key's secret) of a funded team."""
    async with aiohttp.ClientSession() as http:
        _, team, secret = await Api(http, stalling.base, ADMIN_TOKEN).funded_team_key("1.00")
        yield team["id"], secret


async def refused_after_stalling(conn: Conn, sent_at: float) -> tuple[dict[str, str], Any]:
    """The 408 a stalled request gets (not before the limit), its headers and JSON body; the
    connection is closed after it."""
    status, headers, body = await asyncio.wait_for(conn.response(), 5)
    assert time.monotonic() - sent_at >= LIMIT_S
    assert status == 408
    assert headers["content-type"].startswith("application/json")
    assert headers["x-modelbridge-error-code"] == "request_timeout"
    assert headers["connection"] == "close"
    assert await conn.closed()
    return headers, orjson.loads(body)


def openai_timeout(body: Any) -> None:
    assert body["error"]["type"] == "invalid_request_error"
    assert body["error"]["code"] == "request_timeout"
    assert body["error"]["message"].startswith("The request")
    assert f"nothing came for {LIMIT_S:g} s" in body["error"]["message"]


def anthropic_timeout(body: Any) -> None:
    assert set(body) == {"type", "error"}
    assert body["type"] == "error"
    assert body["error"]["type"] == "invalid_request_error"
    assert f"nothing came for {LIMIT_S:g} s" in body["error"]["message"]


async def test_a_head_that_stalls_on_the_lean_front_gets_408_in_its_paths_envelope(
    stalling: Gateway, funded: tuple[str, str]
) -> None:
    conn = await connect(stalling)
    try:
        head = post(funded[1], CHAT, "/v1/messages")
        conn.send(head[: head.index(b"\r\n\r\n")])  # the head without its blank line
        _, body = await refused_after_stalling(conn, time.monotonic())
        anthropic_timeout(body)
    finally:
        await conn.aclose()


async def test_a_body_that_stalls_on_the_lean_front_gets_408_and_nothing_is_held(
    stalling: Gateway, funded: tuple[str, str], redis: Redis
) -> None:
    team, secret = funded
    before = await account_state(redis, team)
    conn = await connect(stalling)
    try:
        whole = post(secret, CHAT)
        conn.send(whole[: len(whole) - 10])  # Content-Length says 10 bytes more
        _, body = await refused_after_stalling(conn, time.monotonic())
        openai_timeout(body)
    finally:
        await conn.aclose()
    assert await account_state(redis, team) == before


async def test_a_chunked_body_that_stalls_on_aiohttps_path_gets_408_in_its_paths_envelope(
    stalling: Gateway, funded: tuple[str, str], redis: Redis
) -> None:
    team, secret = funded
    before = await account_state(redis, team)
    conn = await connect(stalling)
    try:
        first = chunked(b'{"model": "gpt-4o-mini",')[: -len(b"0\r\n\r\n")]  # no last chunk
        conn.send(post(secret, b"", "/v1/messages", **{"Transfer-Encoding": "chunked"}) + first)
        _, body = await refused_after_stalling(conn, time.monotonic())
        anthropic_timeout(body)
    finally:
        await conn.aclose()
    assert await account_state(redis, team) == before


async def test_a_request_that_keeps_coming_slowly_is_served(
    stalling: Gateway, funded: tuple[str, str]
) -> None:
    """Five pieces 0.3 s apart: 1.2 s for the whole, more than the limit, but never 0.5 s
    without a byte — on the lean front and as a chunked body on aiohttp's path."""
    whole = post(funded[1], CHAT)
    body = orjson.dumps(CHAT)
    te = post(funded[1], b"", **{"Transfer-Encoding": "chunked"}) + chunked(body)
    for request in (whole, te):
        conn = await connect(stalling)
        try:
            step = len(request) // 5 + 1
            for start in range(0, len(request), step):
                conn.send(request[start : start + step])
                await asyncio.sleep(0.3)  # the client's pace: what the test is about
            status, _, answer = await asyncio.wait_for(conn.response(), 5)
            assert status == 200, answer
            assert orjson.loads(answer)["object"] == "chat.completion"
        finally:
            await conn.aclose()


@pytest.mark.parametrize("value", [0, -1])
def test_the_limit_must_be_above_zero(fake: FakeUpstream, value: float) -> None:
    with pytest.raises(ConfigError, match="request_read_timeout_s must be above 0"):
        gateway_config(fake.base_url, request_read_timeout_s=value)
