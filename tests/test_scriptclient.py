"""The lean Redis connection of the hot path: URL parsing, order, reconnection, NOSCRIPT."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from redis.asyncio import Redis

from gateway.metering.scriptclient import Endpoint, FastScript, ScriptClient, ScriptError
from tests.conftest import Gateway
from tests.helpers import Api


@pytest.mark.parametrize(
    ("url", "endpoint"),
    [
        ("redis://127.0.0.1:6380/3", Endpoint("127.0.0.1", 6380, 3, None, None)),
        ("redis://localhost", Endpoint("localhost", 6379, 0, None, None)),
        ("redis://:s%40cret@h:1/0", Endpoint("h", 1, 0, None, "s@cret")),
        ("redis://user:pw@h:1", Endpoint("h", 1, 0, "user", "pw")),
        ("rediss://h:1/0", None),
        ("unix:///tmp/redis.sock", Endpoint("", 0, 0, None, None, "/tmp/redis.sock")),
        ("unix:///tmp/r%20s.sock?db=2", Endpoint("", 0, 2, None, None, "/tmp/r s.sock")),
        ("redis+unix:///r.sock?password=pw", Endpoint("", 0, 0, None, "pw", "/r.sock")),
        ("unix://u:p%40w@/r.sock?db=1", Endpoint("", 0, 1, "u", "p@w", "/r.sock")),
        ("unix://", None),
    ],
)
def test_endpoint_from_url(url: str, endpoint: Endpoint | None) -> None:
    assert Endpoint.from_url(url) == endpoint


async def test_replies_come_back_in_order_and_a_lost_connection_reopens(redis_url: str) -> None:
    endpoint = Endpoint.from_url(redis_url)
    assert endpoint is not None
    client = ScriptClient(endpoint)
    try:
        replies = await asyncio.gather(*(client.call("ECHO", str(i)) for i in range(200)))
        assert replies == [str(i) for i in range(200)]
        if endpoint.path is not None:  # the embedded Redis: on its unix socket
            assert f"laddr={endpoint.path}:0 " in await client.call("CLIENT", "INFO")
        first = client._protocol
        assert first is not None
        first.close()
        assert await client.call("PING") == "PONG"
        assert client._protocol is not first
        with pytest.raises(ScriptError, match="unknown command"):
            await client.call("NOSUCHCOMMAND")
        assert await client.call("PING") == "PONG"  # an error reply leaves the stream in step
    finally:
        await client.close()


async def test_a_silent_server_times_out_every_waiting_call_and_the_next_call_reconnects() -> None:
    accepted: list[asyncio.StreamWriter] = []

    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        accepted.append(writer)  # reads nothing, answers nothing

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = ScriptClient(Endpoint("127.0.0.1", port, 0, None, None), timeout_s=0.3)
    try:
        loop = asyncio.get_running_loop()
        started = loop.time()
        results = await asyncio.gather(
            client.call("PING"), client.call("PING"), return_exceptions=True
        )
        assert [type(r) for r in results] == [TimeoutError, TimeoutError]
        assert 0.3 <= loop.time() - started < 3
        first = client._protocol
        assert first is not None and first.closed
        with pytest.raises(TimeoutError):
            await client.call("PING")
        assert client._protocol is not first
        assert len(accepted) == 2
    finally:
        await client.close()
        server.close()
        for writer in accepted:
            writer.close()


async def test_a_script_flush_is_survived(redis_url: str, redis: Redis) -> None:
    endpoint = Endpoint.from_url(redis_url)
    assert endpoint is not None
    client = ScriptClient(endpoint)
    try:
        script = FastScript(client, "return ARGV[1] .. KEYS[1]")
        assert await script(keys=["k"], args=["v"]) == "vk"
        await redis.script_flush()
        assert await script(keys=["k"], args=["w"]) == "wk"
        sent = script.send_now(["k"], ["x"])
        assert sent is not None
        await redis.script_flush()
        assert await script(keys=["k"], args=["y"]) == "yk"
        assert await sent == "xk"
    finally:
        await client.close()


async def test_requests_go_on_after_redis_forgot_every_script(
    gateway: Gateway, api: Api, http: aiohttp.ClientSession, redis: Redis
) -> None:
    _, _, secret = await api.funded_team_key()
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}
    headers = {"Authorization": f"Bearer {secret}"}
    for _ in range(2):
        await redis.script_flush()
        async with http.post(gateway.v1 + "/chat/completions", json=body, headers=headers) as r:
            assert r.status == 200
