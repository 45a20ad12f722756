"""A request that comes in part and then stalls is refused: 408 ``request_timeout`` in its path's
envelope, ``Connection: close``, the connection closed, nothing held or charged — on the lean
front (a head or a body it holds in part) and on aiohttp's path (a chunked body, a head over
16 KiB, both handed over; a later head on a connection aiohttp serves).
The limit is on a wait for more (``server.request_read_timeout_s``, here 0.5 s), not on the whole:
a request that keeps coming is served."""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import orjson
import pytest
from redis.asyncio import Redis

from gateway.config import ConfigError
from gateway.proxy.head import MAX_HEAD
from tests.conftest import ADMIN_TOKEN, Gateway, gateway_config, start_gateway
from tests.fake_upstream import FakeUpstream
from tests.helpers import Api, account_state
from tests.rawhttp import CHAT, chunked, connect, counts, post

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


@contextlib.asynccontextmanager
async def account_unchanged(redis: Redis, team: str) -> AsyncIterator[None]:
    """The team's account state (balance, holds, spend) is the same after the block as before."""
    before = await account_state(redis, team)
    yield
    assert await account_state(redis, team) == before


async def refused_after_stalling(gateway: Gateway, data: bytes, first: bytes = b"") -> Any:
    """Send ``data`` (a request in part) on a new connection (after ``first``, a whole request
    answered 200 on it, when given) and stall: the 408 it gets (not before the limit) with its
    headers checked, and its JSON body; the connection is closed after it."""
    conn = await connect(gateway)
    try:
        if first:
            conn.send(first)
            status, _, answer = await asyncio.wait_for(conn.response(), 5)
            assert status == 200, answer
        sent_at = time.monotonic()
        conn.send(data)
        status, headers, body = await asyncio.wait_for(conn.response(), 5)
        assert time.monotonic() - sent_at >= LIMIT_S
        assert status == 408
        assert headers["content-type"].startswith("application/json")
        assert headers["x-modelbridge-error-code"] == "request_timeout"
        assert headers["connection"] == "close"
        assert await conn.closed()
        return orjson.loads(body)
    finally:
        await conn.aclose()


def big(secret: str, path: str = "/v1/chat/completions") -> bytes:
    """A whole request whose head is over the lean front's 16 KiB: aiohttp's to read."""
    request = post(secret, CHAT, path, **{f"X-Pad-{i}": "p" * 200 for i in range(100)})
    assert request.index(b"\r\n\r\n") > MAX_HEAD
    return request


def head_of(request: bytes) -> bytes:
    """``request``'s head but its last CRLF CRLF: a head that never ends."""
    return request[: request.index(b"\r\n\r\n")]


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
    head = post(funded[1], CHAT, "/v1/messages")
    anthropic_timeout(await refused_after_stalling(stalling, head[: head.index(b"\r\n\r\n")]))


async def test_a_body_that_stalls_on_the_lean_front_gets_408_and_nothing_is_held(
    stalling: Gateway, funded: tuple[str, str], redis: Redis
) -> None:
    team, secret = funded
    whole = post(secret, CHAT)  # Content-Length says 10 bytes more than sent
    async with account_unchanged(redis, team):
        openai_timeout(await refused_after_stalling(stalling, whole[: len(whole) - 10]))


async def test_a_chunked_body_that_stalls_on_aiohttps_path_gets_408_in_its_paths_envelope(
    stalling: Gateway, funded: tuple[str, str], redis: Redis
) -> None:
    team, secret = funded
    first = chunked(b'{"model": "gpt-4o-mini",')[: -len(b"0\r\n\r\n")]  # no last chunk
    head = post(secret, b"", "/v1/messages", **{"Transfer-Encoding": "chunked"})
    async with account_unchanged(redis, team):
        anthropic_timeout(await refused_after_stalling(stalling, head + first))


async def test_a_big_head_that_stalls_on_aiohttps_path_gets_408_in_its_paths_envelope(
    stalling: Gateway, funded: tuple[str, str], redis: Redis
) -> None:
    """A head over 16 KiB is handed to aiohttp in part: aiohttp alone would wait an hour."""
    team, secret = funded
    async with account_unchanged(redis, team):
        handed = counts(stalling)[1]
        openai_timeout(await refused_after_stalling(stalling, head_of(big(secret))))
        assert counts(stalling)[1] == handed + 1
        big_messages = head_of(big(secret, "/v1/messages"))
        anthropic_timeout(await refused_after_stalling(stalling, big_messages))


async def test_a_later_head_that_stalls_on_a_connection_aiohttp_serves_gets_408(
    stalling: Gateway, funded: tuple[str, str]
) -> None:
    """After a request aiohttp served (a big head: the connection is aiohttp's, kept alive), the
    next request's head comes in part: refused, in its path's envelope (its own first bytes)."""
    secret = funded[1]
    later = head_of(post(secret, CHAT, "/v1/messages"))
    anthropic_timeout(await refused_after_stalling(stalling, later, first=big(secret)))
    later = head_of(post(secret, CHAT))
    openai_timeout(await refused_after_stalling(stalling, later, first=big(secret)))


async def test_a_connection_aiohttp_serves_stays_open_between_requests(
    stalling: Gateway, funded: tuple[str, str]
) -> None:
    """The limit is on a request partly in, not on a connection between requests: one aiohttp
    serves, idle for three times the limit after a request, serves the next."""
    conn = await connect(stalling)
    try:
        for _ in range(2):
            conn.send(big(funded[1]))
            status, _, answer = await asyncio.wait_for(conn.response(), 5)
            assert status == 200, answer
            await asyncio.sleep(3 * LIMIT_S)
    finally:
        await conn.aclose()


async def served_in_pieces(gateway: Gateway, pieces: list[bytes]) -> None:
    """Send ``pieces`` (one request) 0.3 s apart on a new connection: it is served, a chat
    completion."""
    conn = await connect(gateway)
    try:
        for piece in pieces:
            conn.send(piece)
            await asyncio.sleep(0.3)  # the client's pace: what the test is about
        status, _, answer = await asyncio.wait_for(conn.response(), 5)
        assert status == 200, answer
        assert orjson.loads(answer)["object"] == "chat.completion"
    finally:
        await conn.aclose()


async def test_a_big_head_that_keeps_coming_slowly_is_served(
    stalling: Gateway, funded: tuple[str, str]
) -> None:
    """A head handed to aiohttp with its first piece, then the rest in four pieces 0.3 s apart:
    1.2 s on aiohttp's path, never 0.5 s without a byte."""
    request = big(funded[1])
    step = (len(request) - MAX_HEAD) // 4 + 1
    pieces = [request[: MAX_HEAD + 1]]
    pieces += [request[start : start + step] for start in range(MAX_HEAD + 1, len(request), step)]
    await served_in_pieces(stalling, pieces)


async def test_a_request_that_keeps_coming_slowly_is_served(
    stalling: Gateway, funded: tuple[str, str]
) -> None:
    """Five pieces 0.3 s apart: 1.2 s for the whole, more than the limit, but never 0.5 s
    without a byte — on the lean front and as a chunked body on aiohttp's path."""
    whole = post(funded[1], CHAT)
    body = orjson.dumps(CHAT)
    te = post(funded[1], b"", **{"Transfer-Encoding": "chunked"}) + chunked(body)
    for request in (whole, te):
        step = len(request) // 5 + 1
        await served_in_pieces(
            stalling, [request[start : start + step] for start in range(0, len(request), step)]
        )


@pytest.mark.parametrize("value", [0, -1])
def test_the_limit_must_be_above_zero(fake: FakeUpstream, value: float) -> None:
    with pytest.raises(ConfigError, match="request_read_timeout_s must be above 0"):
        gateway_config(fake.base_url, request_read_timeout_s=value)
