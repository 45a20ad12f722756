"""A request the HTTP layer cannot parse is answered in its path's error envelope: Anthropic's
below ``/v1/messages`` (contract section 9), OpenAI's elsewhere; 400, JSON, and the connection
closed. The lean front hands such a request to aiohttp (it serves none of them itself), whose
parser refuses it before any route is known: the path is read from the bytes handed over.

Each raw request goes on a connection of its own, in the writes listed (a head split over two
writes is put together by the front before it hands over)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

import asyncpg
import orjson
import pytest
from redis.asyncio import Redis

from tests.conftest import Gateway
from tests.helpers import Api, account_state
from tests.rawhttp import CHAT, chunked, connect, post

MESSAGES = b"/v1/messages"
CHAT_PATH = b"/v1/chat/completions"


def head(path: bytes, *lines: bytes, line: bytes = b"") -> bytes:
    """A request head to ``path`` (``line`` replaces its request line), the CRLF CRLF included."""
    first = line or b"POST " + path + b" HTTP/1.1"
    return b"\r\n".join([first, b"Host: gw", *lines]) + b"\r\n\r\n"


def lean_call(path: bytes) -> bytes:
    """A well-formed call the front serves itself (401: no key)."""
    body = orjson.dumps(CHAT)
    return head(path, b"Content-Length: " + str(len(body)).encode()) + body


LENGTH = b"Content-Length: 2"
# name -> the writes that make the request, for a path
MALFORMED = {
    "invalid header name": lambda p: [head(p, b"Bad Header: x", LENGTH) + b"{}"],
    "content-length not a number": lambda p: [head(p, b"Content-Length: abc") + b"{}"],
    "two content-lengths": lambda p: [head(p, LENGTH, b"Content-Length: 3") + b"{}"],
    "content-length and chunked": lambda p: [
        head(p, LENGTH, b"Transfer-Encoding: chunked") + b"2\r\n{}\r\n0\r\n\r\n"
    ],
    "invalid chunk size": lambda p: [
        head(p, b"Transfer-Encoding: chunked") + b"zz\r\n{}\r\n0\r\n\r\n"
    ],
    "header line over 8190 bytes": lambda p: [head(p, b"X-Long: " + b"a" * 17000, LENGTH)],
    "too many headers": lambda p: [
        head(p, *(b"X-H%d: %s" % (i, b"a" * 100) for i in range(300)), LENGTH) + b"{}"
    ],
    "control byte in a header value": lambda p: [head(p, b"X-A: a\x01b", LENGTH) + b"{}"],
    "NUL in a header value": lambda p: [head(p, b"X-A: a\x00b", LENGTH) + b"{}"],
    "unknown HTTP version": lambda p: [head(p, LENGTH, line=b"POST " + p + b" HTTP/9.9") + b"{}"],
    "invalid method": lambda p: [head(p, LENGTH, line=b"P@ST " + p + b" HTTP/1.1") + b"{}"],
    "bare LF line ends": lambda p: [(head(p, LENGTH) + b"{}").replace(b"\r\n", b"\n")],
    "head split over two writes": lambda p: [
        b"POST " + p + b" HTTP/1.1\r\nHost: gw\r\n",
        b"Bad Header: x\r\n" + LENGTH + b"\r\n\r\n{}",
    ],
}


async def malformed_answer(
    gateway: Gateway, writes: list[bytes], *, skip: int = 0
) -> tuple[int, dict[str, str], bytes]:
    """The answer to the last of the requests in ``writes`` (``skip`` answers before it), on a
    new connection, which must be closed after it."""
    conn = await connect(gateway)
    try:
        for data in writes:
            conn.send(data)
            await asyncio.sleep(0.05)  # each write its own segment
        for _ in range(skip):
            await conn.response()
        answer = await conn.response()
        assert await conn.closed()
        return answer
    finally:
        await conn.aclose()


def anthropic_envelope(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    error = orjson.loads(body)
    assert set(error) == {"type", "error"}
    assert error["type"] == "error"
    assert set(error["error"]) == {"type", "message"}
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith("Malformed HTTP request: ")
    assert headers["x-modelbridge-error-code"] == "invalid_request_error"  # as the middleware's


def openai_envelope(status: int, headers: dict[str, str], body: bytes) -> None:
    assert status == 400
    assert headers["content-type"].startswith("application/json")
    error = orjson.loads(body)
    assert set(error) == {"error"}
    assert set(error["error"]) == {"message", "type", "param", "code"}
    assert error["error"]["type"] == "invalid_request_error"
    assert error["error"]["code"] == "invalid_request_error"
    assert error["error"]["message"].startswith("Malformed HTTP request: ")
    assert headers["x-modelbridge-error-code"] == "invalid_request_error"


@pytest.mark.parametrize("case", list(MALFORMED))
@pytest.mark.parametrize(
    "path",
    [MESSAGES, b"/v1/messages?beta=true", b"/v1/messages/count_tokens", b"/v1/messages/x"],
)
async def test_a_malformed_request_to_the_messages_api_gets_anthropics_envelope(
    gateway: Gateway, path: bytes, case: str
) -> None:
    anthropic_envelope(*await malformed_answer(gateway, MALFORMED[case](path)))


@pytest.mark.parametrize("case", list(MALFORMED))
@pytest.mark.parametrize("path", [CHAT_PATH, b"/v1/messagesx", b"/v2/messages"])
async def test_a_malformed_request_elsewhere_keeps_openais_envelope(
    gateway: Gateway, path: bytes, case: str
) -> None:
    openai_envelope(*await malformed_answer(gateway, MALFORMED[case](path)))


@pytest.mark.parametrize(
    ("path", "envelope"), [(MESSAGES, anthropic_envelope), (CHAT_PATH, openai_envelope)]
)
async def test_a_malformed_request_behind_a_call_served_lean_gets_its_paths_envelope(
    gateway: Gateway, path: bytes, envelope: Callable[[int, dict[str, str], bytes], None]
) -> None:
    """The front answers the first itself (401: no key), then hands the rest over."""
    writes = [lean_call(path) + head(path, b"Bad Header: x", LENGTH) + b"{}"]
    envelope(*await malformed_answer(gateway, writes, skip=1))


@pytest.mark.parametrize(
    "raw",
    [
        b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03\r\n\r\n",  # TLS on the plain port
        b"POST\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}",  # no path at all
        b"POST /v1/messages\x00 HTTP/1.1 extra\r\nHost: gw\r\n\r\n",  # four words
        b"POST v1/messages HTTP/1.1\r\nHost: gw\r\nContent-Length: 2\r\n\r\n{}",  # no slash
    ],
)
async def test_a_request_line_without_a_path_keeps_openais_envelope(
    gateway: Gateway, raw: bytes
) -> None:
    openai_envelope(*await malformed_answer(gateway, [raw]))


@pytest.mark.parametrize(
    ("head", "path"),
    [
        (b"POST /v1/messages HTTP/1.1\r\nHost: gw", "/v1/messages"),
        (b"POST /v1/messages?beta=true#x HTTP/9.9\r\n", "/v1/messages"),
        (b"P@ST /v1/%6Dessages HTTP/1.1\n", "/v1/messages"),  # bare LF; as request.path reads it
        (b"POST /v1/messages", None),  # no version: the line may be cut
        (b"POST /v1/messages HTTP/1.1 x\r\n", None),
        (b"POST v1/messages HTTP/1.1\r\n", None),
        (b"\x16\x03\x01\x00\xa5\x01", None),
        (b"", None),
    ],
)
def test_request_path(head: bytes, path: str | None) -> None:
    from gateway.infra.bodies import request_path

    assert request_path(head) == path


# A chunked body whose head and first chunk arrive, then a packet holding an invalid chunk, with
# a funded key: the route is in service, waiting for the rest of its body, when aiohttp's parser
# refuses the packet. The body in service fails with the parse error: a prompt 400 in the path's
# envelope, the connection closed, nothing held or charged.
FIRST_CHUNK = chunked(b'{"model": "gpt-4o-mini",')[: -len(b"0\r\n\r\n")]  # the chunk, not the last
LATER_CHUNK = {
    "chunk size not hex": b"zz\r\n{}\r\n0\r\n\r\n",
    "chunk without its CRLF": b"2\r\n{}XX0\r\n\r\n",
    "negative chunk size": b"-1\r\n}\r\n0\r\n\r\n",
}


@pytest.mark.parametrize("case", list(LATER_CHUNK))
@pytest.mark.parametrize(
    ("path", "envelope"), [(MESSAGES, anthropic_envelope), (CHAT_PATH, openai_envelope)]
)
async def test_an_invalid_later_chunk_of_a_body_in_service_gets_a_prompt_400(
    gateway: Gateway,
    api: Api,
    redis: Redis,
    db: asyncpg.Connection,
    path: bytes,
    envelope: Callable[[int, dict[str, str], bytes], None],
    case: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, team, secret = await api.funded_team_key("1.00")
    before = await account_state(redis, team["id"])
    head_and_first = post(secret, b"", path.decode(), **{"Transfer-Encoding": "chunked"})
    writes = [head_and_first + FIRST_CHUNK, LATER_CHUNK[case]]
    status, headers, body = await asyncio.wait_for(malformed_answer(gateway, writes), 5)  # no hang
    envelope(status, headers, body)
    assert headers["connection"] == "close"
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]  # no traceback
    assert await account_state(redis, team["id"]) == before  # nothing held, nothing charged
    count = "SELECT count(*) FROM usage_records WHERE team_id = $1"
    assert await db.fetchval(count, team["id"]) == 0


async def test_an_invalid_later_chunk_behind_a_request_in_service_gets_its_own_400(
    gateway: Gateway, api: Api
) -> None:
    """The refused body is the second request's, waiting (or in service by then) behind a first
    one: the first is answered, then the second's 400, and the connection closes."""
    _, _, secret = await api.funded_team_key("1.00")
    te = {"Transfer-Encoding": "chunked"}
    first = post(secret, chunked(orjson.dumps(CHAT)), **te)
    writes = [first + post(secret, b"", **te) + FIRST_CHUNK, LATER_CHUNK["chunk size not hex"]]
    status, headers, body = await asyncio.wait_for(malformed_answer(gateway, writes, skip=1), 5)
    openai_envelope(status, headers, body)
