"""Hostile bytes (issue 10, item 3): credentials that are not UTF-8, compressed bodies and zip
bombs, and arbitrary request heads and bodies — on both request paths (the lean front and
aiohttp's), never a 500.

Each raw request goes on a connection of its own, which starts on the lean front; a request the
front does not serve itself is handed to aiohttp with the bytes read so far.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import logging
import resource
import time
import zlib
from collections.abc import AsyncIterator
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from gateway import state as S
from tests.conftest import Gateway
from tests.helpers import Api
from tests.rawhttp import CHAT, Conn, counts

HOSTILE = b"mb_\xff\xfe\xc3\x28 caf\xe9"


@pytest.fixture(scope="module")
async def secret(api_module: Api) -> str:
    _, _, key = await api_module.funded_team_key("100.00")
    return key


@pytest.fixture(scope="module")
async def api_module(gateway: Gateway) -> AsyncIterator[Api]:
    import aiohttp

    from tests.conftest import ADMIN_TOKEN

    async with aiohttp.ClientSession() as http:
        yield Api(http, gateway.base, ADMIN_TOKEN)


async def exchange(
    gateway: Gateway, raw: bytes, *, eof: bool = False
) -> tuple[int, dict[str, str], bytes] | None:
    """Send ``raw`` on a new connection; the answer, or None when the gateway closed it
    without one."""
    port = int(gateway.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(raw)
        if eof:
            writer.write_eof()
        try:
            return await Conn(reader, writer).response()
        except (asyncio.IncompleteReadError, ConnectionError):
            return None
    finally:
        writer.close()
        with contextlib.suppress(Exception):
            await writer.wait_closed()


def request(
    path: str,
    body: bytes = b"",
    method: bytes = b"POST",
    headers: list[tuple[bytes, bytes]] = (),  # type: ignore[assignment]
) -> bytes:
    head = [method + b" " + path.encode() + b" HTTP/1.1", b"Host: gw"]
    head += [name + b": " + value for name, value in headers]
    head.append(b"Content-Length: " + str(len(body)).encode())
    return b"\r\n".join(head) + b"\r\n\r\n" + body


def error_code(body: bytes) -> str:
    return str(orjson.loads(body)["error"]["code"])


@pytest.mark.parametrize(
    ("path", "method", "header", "code"),
    [
        ("/v1/chat/completions", b"POST", b"Authorization: Bearer ", "invalid_api_key"),
        ("/v1/chat/completions", b"POST", b"x-api-key: ", "invalid_api_key"),
        ("/v1/embeddings", b"POST", b"Authorization: Bearer ", "invalid_api_key"),
        ("/v1/models", b"GET", b"Authorization: Bearer ", "invalid_api_key"),
        ("/v1/models", b"GET", b"x-api-key: ", "invalid_api_key"),
        ("/admin/teams", b"GET", b"Authorization: Bearer ", "invalid_admin_token"),
        ("/api/me", b"GET", b"Authorization: Bearer ", "unauthenticated"),
    ],
)
async def test_a_credential_that_is_not_utf8_is_401(
    gateway: Gateway, path: str, method: bytes, header: str, code: str
) -> None:
    name, _, prefix = header.partition(b": ")
    body = orjson.dumps(CHAT) if method == b"POST" else b""
    answer = await exchange(gateway, request(path, body, method, [(name, prefix + HOSTILE)]))
    assert answer is not None
    status, _, payload = answer
    assert (status, error_code(payload)) == (401, code)


def deflate(data: bytes) -> bytes:
    return zlib.compress(data)


ENCODINGS: list[tuple[str, Any]] = [
    ("gzip", gzip.compress),
    ("deflate", deflate),
    ("identity", bytes),
]
ENCODINGS += [("GZip ", gzip.compress)]  # case and spaces as HTTP allows


@pytest.mark.parametrize(("encoding", "encode"), ENCODINGS)
async def test_a_compressed_body_is_served_alike_on_both_paths(
    gateway: Gateway, secret: str, encoding: str, encode: Any
) -> None:
    body = orjson.dumps({**CHAT, "max_tokens": 7})
    headers = [(b"Authorization", f"Bearer {secret}".encode())]
    plain = await exchange(gateway, request("/v1/chat/completions", body, headers=headers))
    coded = [*headers, (b"Content-Encoding", encoding.encode())]
    lean_first = request("/v1/chat/completions", encode(body), headers=coded)
    # Handed over before it: the connection is aiohttp's after a GET.
    aiohttp_first = request("/v1/models", b"", b"GET", headers) + lean_first
    answers = [await exchange(gateway, lean_first)]
    port = int(gateway.base.rsplit(":", 1)[1])
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    conn = Conn(reader, writer)
    writer.write(aiohttp_first)
    assert (await conn.response())[0] == 200
    answers.append(await conn.response())
    writer.close()
    assert plain is not None and plain[0] == 200
    for answer in answers:
        assert answer is not None
        assert answer[0] == 200, answer
        assert answer[1]["x-modelbridge-cost-usd"] == plain[1]["x-modelbridge-cost-usd"]


@pytest.mark.parametrize(
    "encoding",
    ["compress", "x-gzip", "gzip, gzip", "gzip;q=1", "*", "br", "zstd"],
)
async def test_an_unknown_content_encoding_is_415(
    gateway: Gateway, secret: str, encoding: str
) -> None:
    headers = [
        (b"Authorization", f"Bearer {secret}".encode()),
        (b"Content-Encoding", encoding.encode()),
    ]
    for path in ("/v1/chat/completions", "/api/auth/login"):
        answer = await exchange(
            gateway, request(path, gzip.compress(orjson.dumps(CHAT)), headers=headers)
        )
        assert answer is not None
        assert (answer[0], error_code(answer[2])) == (415, "unsupported_content_encoding")


async def test_a_corrupt_compressed_body_is_400(gateway: Gateway, secret: str) -> None:
    headers = [(b"Authorization", f"Bearer {secret}".encode()), (b"Content-Encoding", b"gzip")]
    for path in ("/v1/chat/completions", "/api/auth/login"):
        broken = gzip.compress(orjson.dumps(CHAT))[:-12] + b"garbage!"
        answer = await exchange(gateway, request(path, broken, headers=headers))
        assert answer is not None
        assert (answer[0], error_code(answer[2])) == (400, "invalid_request_error")


def bomb(size: int) -> bytes:
    """``size`` bytes of JSON-ish zeros, gzipped (about a thousandth of that)."""
    packer = zlib.compressobj(9, zlib.DEFLATED, 31)
    chunk = b"0" * (1 << 20)
    parts = [packer.compress(b'{"model": "')]
    parts += [packer.compress(chunk) for _ in range(size >> 20)]
    parts.append(packer.flush())
    return b"".join(parts)


async def test_a_zip_bomb_is_413_without_blowing_memory(gateway: Gateway, secret: str) -> None:
    payload = bomb(1 << 30)  # 1 GiB decompressed, ~1 MB on the wire
    assert len(payload) < 2 << 20
    headers = [(b"Authorization", f"Bearer {secret}".encode()), (b"Content-Encoding", b"gzip")]
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB; the gateway runs in here
    for path in ("/v1/chat/completions", "/api/auth/signup"):
        answer = await exchange(gateway, request(path, payload, headers=headers))
        assert answer is not None
        assert (answer[0], error_code(answer[2])) == (413, "payload_too_large")

    grown_mib = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak) / 1024
    print("zip bomb: peak memory grew", grown_mib, "MiB")
    assert grown_mib < 100, grown_mib  # a few times the 10 MiB cap, never the gigabyte


# --- property: arbitrary heads and bodies, both paths, no 500 ----------------------------------
FUZZ = settings(
    max_examples=150,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
    database=None,
)
PATHS = [
    "/v1/chat/completions",
    "/v1/completions",
    "/v1/embeddings",
    "/v1/models",
    "/api/auth/login",
    "/api/me",
    "/admin/teams",
    "/healthz",
]
NAMES = [
    b"Authorization",
    b"x-api-key",
    b"Content-Type",
    b"Content-Encoding",
    b"x-modelbridge-tags",
    b"Connection",
    b"Cookie",
    b"X-Forwarded-For",
    b"Accept-Encoding",
    b"Origin",
]
values = st.binary(max_size=24) | st.sampled_from(
    [b"gzip", b"deflate", b"Bearer ", b"close", b"br", b"identity"]
)
bodies = (
    st.binary(max_size=80)
    | st.just(orjson.dumps(CHAT))
    | st.builds(gzip.compress, st.just(orjson.dumps(CHAT)) | st.binary(max_size=40))
)


@FUZZ
@given(
    method=st.sampled_from([b"POST", b"GET", b"PUT", b"DELETE", b"P\xffST"]),
    path=st.sampled_from(PATHS),
    headers=st.lists(
        st.tuples(st.sampled_from(NAMES) | st.binary(min_size=1, max_size=12), values), max_size=5
    ),
    body=bodies,
    keyed=st.booleans(),
    handed_over=st.booleans(),
)
async def test_no_head_or_body_gets_a_500(
    gateway: Gateway,
    secret: str,
    caplog: pytest.LogCaptureFixture,
    method: bytes,
    path: str,
    headers: list[tuple[bytes, bytes]],
    body: bytes,
    keyed: bool,
    handed_over: bool,
) -> None:
    if keyed:
        headers = [(b"Authorization", b"Bearer " + secret.encode()), *headers]
    raw = request(path, body, method, headers)
    if handed_over:  # aiohttp's path from the start
        raw = request("/healthz", b"", b"GET") + raw
    caplog.clear()
    with caplog.at_level(logging.ERROR):
        before = counts(gateway)
        answer = await exchange(gateway, raw, eof=True)
        if handed_over and answer is not None:
            assert counts(gateway)[1] > before[1]
    assert answer is None or answer[0] != 500, (raw, answer)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], raw


async def test_a_client_that_leaves_mid_body_is_counted_not_logged(
    gateway: Gateway, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    metrics = gateway.app[S.METRICS]
    left = metrics.child(metrics.requests, "/v1/chat/completions", "other", "499")
    before = left._value.get()
    port = int(gateway.base.rsplit(":", 1)[1])
    auth = (b"Authorization", f"Bearer {secret}".encode())
    cases = [
        ("/api/auth/login", []),
        ("/v1/chat/completions", [auth, (b"Content-Encoding", b"identity")]),  # aiohttp's path
    ]
    with caplog.at_level(logging.WARNING):
        for path, headers in cases:
            head = request(path, b"", headers=[*headers, (b"Content-Length", b"1000")])
            head = head.replace(b"Content-Length: 0\r\n", b"")
            _, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(head + b'{"model": "gpt')
            await writer.drain()
            writer.close()
        deadline = time.monotonic() + 10
        while left._value.get() == before:
            assert time.monotonic() < deadline, "the request was not counted"
            await asyncio.sleep(0.05)
    assert left._value.get() == before + 1
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
