"""What the log shows for what is not the gateway's fault: a malformed request is one INFO line,
a client that leaves mid-body nothing above DEBUG, a store outage one warning line (and one when
the store is back) without tracebacks, while the requests that need the store get 503
``gateway_unavailable``, never a 500."""

from __future__ import annotations

import asyncio
import logging
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest

from tests.conftest import ADMIN_TOKEN, Gateway
from tests.fake_upstream import FakeUpstream
from tests.faults import PostgresServer, RedisServer
from tests.helpers import eventually
from tests.processes import GatewayProcess, write_config

MALFORMED = [
    b"GARBAGE\r\n\r\n",
    b"GET / HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    b"GET /\x00 HTTP/1.1\r\nHost: x\r\n\r\n",
    b"POST /v1/messages HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n",
]


async def _send(port: int, data: bytes, *, read: bool = True) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(data)
    await writer.drain()
    answer = await asyncio.wait_for(reader.read(200), 5) if read else b""
    writer.close()
    return answer


async def test_malformed_requests_and_clients_gone_mid_body_are_no_error(
    gateway: Gateway, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    port = int(gateway.base.rsplit(":", 1)[1])
    for data in MALFORMED:
        assert (await _send(port, data)).startswith(b"HTTP/1.")
    # Bodies promised and not sent: on the lean path, and on aiohttp's (an operator route).
    for head in (
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer mb_x\r\n",
        f"POST /admin/teams HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ADMIN_TOKEN}\r\n".encode(),
    ):
        head += b"Content-Type: application/json\r\nContent-Length: 1000\r\n\r\n"
        await _send(port, head + b'{"name": "hal', read=False)
    await asyncio.sleep(0.5)  # what the gateway logs about them, it logs within this
    loud = [r for r in caplog.records if r.levelno >= logging.WARNING or r.exc_info]
    assert loud == []
    malformed = [r for r in caplog.records if r.getMessage().startswith("malformed request")]
    assert malformed and {r.levelno for r in malformed} == {logging.INFO}


@pytest.fixture(scope="module")
def stoppable() -> Iterator[tuple[PostgresServer, RedisServer, Path]]:
    directory = Path(tempfile.mkdtemp(prefix="mb-noise-"))  # PostgreSQL's user must reach it
    pg, redis = PostgresServer(directory / "pg"), RedisServer(directory / "redis")
    pg.start()
    redis.start()
    yield pg, redis, directory
    redis.stop()
    pg.close()
    shutil.rmtree(directory, ignore_errors=True)


async def _status(http: aiohttp.ClientSession, url: str) -> tuple[int, str]:
    async with http.get(url, headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
        body = await r.json(content_type=None)
        return r.status, (body.get("error") or {}).get("code", "")


@pytest.mark.slow
async def test_a_store_outage_is_one_line_and_one_when_back_never_a_traceback(
    stoppable: tuple[PostgresServer, RedisServer, Path],
    fake: FakeUpstream,
    http: aiohttp.ClientSession,
) -> None:
    pg, redis, directory = stoppable
    config = write_config(directory, fake.base_url)
    gw = GatewayProcess(config, pg.url, redis.url, log=directory / "gw.log")
    try:
        await gw.ready(http)
        pg.stop_server()
        # A management read needs PostgreSQL: 503, for as long as the outage lasts.
        for _ in range(5):
            assert await _status(http, gw.base + "/admin/teams") == (503, "gateway_unavailable")
        await asyncio.sleep(2)  # asyncpg's pool tries to reconnect every second or two
        pg.start_server()
        await eventually(
            lambda: asyncio.to_thread(gw.log.read_text), lambda t: "PostgreSQL is back" in t, 20
        )
        assert await _status(http, gw.base + "/admin/teams") == (200, "")

        redis.stop()
        assert (await _status(http, gw.base + "/readyz"))[0] == 503
        await asyncio.sleep(1.5)
        redis.start()
        await eventually(
            lambda: asyncio.to_thread(gw.log.read_text), lambda t: "Redis is back" in t, 20
        )
    finally:
        gw.terminate()
        await gw.wait()
    log = gw.log.read_text()
    assert "Traceback" not in log, log
    assert "unhandled error" not in log
    lines = log.splitlines()
    # One line per outage from the worker; the writer process, with a pool of its own, says it
    # once too (and its own "usage writer: ..." line).
    assert sum("PostgreSQL unreachable" in line for line in lines) <= 2, log
    assert sum("Redis unreachable" in line for line in lines) == 1, log
    # The key invalidation listener: one line if it met the outage (its next try may already
    # find Redis back), and one when it is subscribed again (unless the gateway stopped first).
    listener = [line for line in lines if "key invalidation listener:" in line]
    again = [line for line in listener if "subscribed again" in line]
    assert len(listener) - len(again) <= 1, log
    assert len(again) <= len(listener) - len(again), log
    assert sum("alert worker:" in line for line in lines) <= 2, log
