"""The lean HTTP/1.1 client (``gateway.upstream.http1``) against real sockets: a scripted server that
records what it received and answers as each test tells it (keep-alive, chunked, close-delimited,
silent, trickling, malformed, TLS)."""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest
import trustme

from gateway.upstream.http1 import Origin, OriginError, OriginTimeout, OriginTooLarge
from tests.helpers import until

Answer = Callable[[asyncio.StreamWriter], Awaitable[None]]

OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


def fixed(raw: bytes) -> Answer:
    async def answer(writer: asyncio.StreamWriter) -> None:
        writer.write(raw)

    return answer


@dataclass
class Scripted:
    """A server answering each request with the next scripted answer (``OK`` when none)."""

    answers: list[Answer] = field(default_factory=list)
    requests: list[tuple[bytes, bytes]] = field(default_factory=list)  # (head, body)
    connections: int = 0
    port: int = 0
    server: asyncio.Server | None = None
    writers: list[asyncio.StreamWriter] = field(default_factory=list)

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.writers.append(writer)
        with contextlib.suppress(ConnectionError, asyncio.IncompleteReadError):
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                length = 0
                for line in head.split(b"\r\n"):
                    name, _, value = line.partition(b":")
                    if name.lower() == b"content-length":
                        length = int(value)
                body = await reader.readexactly(length)
                self.requests.append((head, body))
                answer = self.answers.pop(0) if self.answers else fixed(OK)
                await answer(writer)
                await writer.drain()
                if writer.is_closing():
                    return

    def url(self, scheme: str = "http") -> str:
        return f"{scheme}://127.0.0.1:{self.port}/v1"

    def close_all(self) -> None:
        for writer in self.writers:
            writer.close()


@pytest.fixture
async def server() -> AsyncIterator[Scripted]:
    scripted = Scripted()
    scripted.server = await asyncio.start_server(scripted.handle, "127.0.0.1", 0)
    scripted.port = scripted.server.sockets[0].getsockname()[1]
    yield scripted
    scripted.close_all()
    scripted.server.close()


def origin(url: str, **kw: float) -> Origin:
    return Origin(
        url,
        {"Authorization": "Bearer up-key", "Content-Type": "application/json"},
        connect_timeout=kw.get("connect_timeout", 5.0),
        read_timeout=kw.get("read_timeout", 5.0),
        keepalive_s=kw.get("keepalive_s", 60.0),
        max_body_bytes=int(kw.get("max_body_bytes", 64 * 1024 * 1024)),
    )


async def test_the_request_on_the_wire_and_a_reused_connection(server: Scripted) -> None:
    client = origin(server.url())
    try:
        first = await client.post(client.encode("/chat/completions", b'{"a":1}'))
        second = await client.post(client.encode("/embeddings", b"{}"))
    finally:
        client.close()
    assert (first.status, first.body, second.body) == (200, b'{"ok":true}', b'{"ok":true}')
    assert (b"content-type", b"application/json") in [(k.lower(), v) for k, v in first.headers]
    assert server.connections == 1
    head, body = server.requests[0]
    assert body == b'{"a":1}'
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /v1/chat/completions HTTP/1.1"
    assert f"Host: 127.0.0.1:{server.port}" in lines
    assert "Authorization: Bearer up-key" in lines
    assert "Content-Length: 7" in lines
    assert "Accept-Encoding: identity" in lines
    assert server.requests[1][0].startswith(b"POST /v1/embeddings HTTP/1.1\r\n")


async def test_a_chunked_answer_is_joined(server: Scripted) -> None:
    server.answers.append(
        fixed(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
        )
    )
    client = origin(server.url())
    try:
        response = await client.post(client.encode("/x", b""))
        again = await client.post(client.encode("/x", b""))
    finally:
        client.close()
    assert (response.status, response.body, again.body) == (200, b"hello world", b'{"ok":true}')
    assert server.connections == 1


async def test_an_answer_that_runs_until_close_and_connection_close(server: Scripted) -> None:
    async def until_close(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 500 Internal Server Error\r\nConnection: close\r\n\r\npart one, ")
        await writer.drain()
        writer.write(b"part two")
        writer.close()

    server.answers += [
        until_close,
        fixed(OK.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n")),
    ]
    client = origin(server.url())
    try:
        broken = await client.post(client.encode("/x", b""))
        closing = await client.post(client.encode("/x", b""))
        third = await client.post(client.encode("/x", b""))
    finally:
        client.close()
    assert (broken.status, broken.body) == (500, b"part one, part two")
    assert (closing.status, third.status) == (200, 200)
    assert server.connections == 3  # neither closing connection was used again


async def test_a_silent_provider_times_out_but_a_slow_trickle_does_not(server: Scripted) -> None:
    read_timeout = 1.0
    loop = asyncio.get_running_loop()
    client = origin(server.url(), read_timeout=read_timeout)

    async def silent(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    async def trickle(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n")
        await writer.drain()
        (conn,) = client._busy
        for sent, byte in enumerate(b"slower"):
            # each byte once the client has read the one before and waited a quarter of its timeout
            await until(lambda sent=sent: sum(map(len, conn._chunks)) == sent)
            await until(lambda: loop.time() - conn._last_read >= read_timeout / 4)
            writer.write(bytes([byte]))
            await writer.drain()

    server.answers += [trickle, silent]
    try:
        started = loop.time()
        slow = await client.post(client.encode("/x", b""))
        assert loop.time() - started > read_timeout  # the whole answer took longer than that
        started = loop.time()
        with pytest.raises(OriginTimeout):
            await client.post(client.encode("/x", b""))
        assert loop.time() - started >= read_timeout  # never sooner
        after = await client.post(client.encode("/x", b""))
    finally:
        client.close()
    assert slow.body == b"slower"
    assert after.status == 200
    assert server.connections == 2  # the timed-out connection was dropped


async def test_garbage_and_a_hang_up_are_origin_errors(server: Scripted) -> None:
    async def hang_up(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\nshort")
        writer.close()

    server.answers += [fixed(b"SMTP ready\r\n\r\n"), hang_up]
    client = origin(server.url())
    try:
        with pytest.raises(OriginError, match="malformed"):
            await client.post(client.encode("/x", b""))
        with pytest.raises(OriginError, match="before answering in full"):
            await client.post(client.encode("/x", b""))
        assert (await client.post(client.encode("/x", b""))).status == 200
    finally:
        client.close()
    assert server.connections == 3


async def test_interim_answers_are_skipped(server: Scripted) -> None:
    server.answers += [
        fixed(b"HTTP/1.1 100 Continue\r\n\r\n" + OK),
        fixed(
            b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
            b"HTTP/1.1 100 Continue\r\n\r\n"
            b"HTTP/1.1 201 Created\r\nContent-Length: 4\r\nX-Final: yes\r\n\r\ndone"
        ),
    ]
    client = origin(server.url())
    try:
        first = await client.post(client.encode("/x", b""))
        second = await client.post(client.encode("/x", b""))
        third = await client.post(client.encode("/x", b""))
    finally:
        client.close()
    assert (first.status, first.body) == (200, b'{"ok":true}')
    assert (second.status, second.body) == (201, b"done")
    assert second.headers == [(b"Content-Length", b"4"), (b"X-Final", b"yes")]
    assert third.body == b'{"ok":true}'
    assert server.connections == 1  # the connection stayed in step


@pytest.mark.parametrize(
    "status_line",
    [
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\n",
        b"HTTP/1.1 099 Low\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 600 High\r\nContent-Length: 0\r\n\r\n",
        b"HTTP/1.1 999 High\r\nContent-Length: 0\r\n\r\n",
    ],
)
async def test_a_protocol_switch_or_a_status_outside_100_599_is_malformed(
    server: Scripted, status_line: bytes
) -> None:
    server.answers.append(fixed(status_line))
    client = origin(server.url())
    try:
        with pytest.raises(OriginError, match="malformed"):
            await client.post(client.encode("/x", b""))
        assert (await client.post(client.encode("/x", b""))).status == 200
    finally:
        client.close()
    assert server.connections == 2


async def test_a_body_over_the_bound_fails_and_drops_the_connection(server: Scripted) -> None:
    bound = 1000

    async def announced(writer: asyncio.StreamWriter) -> None:  # the body never comes
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 1001\r\n\r\n")

    def chunked(sizes: list[int]) -> Answer:
        chunks = b"".join(b"%x\r\n%s\r\n" % (n, b"c" * n) for n in sizes)
        return fixed(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunks + b"0\r\n\r\n"
        )

    async def until_close(writer: asyncio.StreamWriter) -> None:
        writer.write(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\n" + b"u" * 600)
        await writer.drain()
        writer.write(b"u" * 600)
        writer.close()

    server.answers += [
        fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n" + b"x" * 1000),  # at the bound
        announced,
        chunked([500, 500]),  # at the bound
        chunked([600, 401]),
        until_close,
        fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 999999999999999\r\n\r\n"),
    ]
    client = origin(server.url(), max_body_bytes=bound, read_timeout=30)
    outcomes: list[object] = []
    try:
        for _ in range(7):
            try:
                outcomes.append(len((await client.post(client.encode("/x", b""))).body))
            except OriginTooLarge as exc:
                outcomes.append((exc.limit, str(exc)))
    finally:
        client.close()
    too_large = (bound, "the provider's body is over 1000 bytes")
    assert outcomes == [bound, too_large, bound, too_large, too_large, too_large, 11]
    # at the bound: kept; each one over it: its connection dropped (four of them), then a new one
    assert server.connections == 5


async def test_nothing_listening_is_an_origin_error() -> None:
    client = origin("http://127.0.0.1:9/v1")  # the discard port
    with pytest.raises(OriginError, match="cannot connect"):
        await client.post(client.encode("/x", b""))


async def test_an_idle_connection_the_provider_closed_is_not_used(server: Scripted) -> None:
    client = origin(server.url())
    try:
        await client.post(client.encode("/x", b""))
        server.close_all()  # the provider ends its idle keep-alive connection
        conn = client._idle[0]
        deadline = asyncio.get_running_loop().time() + 5
        while not conn.closed and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        assert conn.closed
        assert (await client.post(client.encode("/x", b""))).status == 200
    finally:
        client.close()
    assert server.connections == 2


async def test_connections_idle_past_keepalive_are_dropped(server: Scripted) -> None:
    client = origin(server.url(), keepalive_s=0.2)
    loop = asyncio.get_running_loop()
    try:
        await client.post(client.encode("/x", b""))
        (conn,) = client._idle
        await until(lambda: loop.time() - conn.idle_since >= 0.2)
        await client.post(client.encode("/x", b""))
    finally:
        client.close()
    assert server.connections == 2


async def test_concurrent_requests_get_a_connection_each(server: Scripted) -> None:
    async def slow(writer: asyncio.StreamWriter) -> None:
        await until(lambda: len(server.requests) == 3)  # all three are in flight at once
        writer.write(OK)

    server.answers += [slow, slow, slow]
    client = origin(server.url())
    try:
        answers = await asyncio.gather(*(client.post(client.encode("/x", b"")) for _ in range(3)))
        assert [a.status for a in answers] == [200, 200, 200]
        assert len(client._idle) == 3
        await client.post(client.encode("/x", b""))
    finally:
        client.close()
    assert server.connections == 3


async def test_a_cancelled_request_drops_its_connection(server: Scripted) -> None:
    async def silent(writer: asyncio.StreamWriter) -> None:
        await asyncio.sleep(30)

    server.answers.append(silent)
    client = origin(server.url())
    try:
        task = asyncio.ensure_future(client.post(client.encode("/x", b"")))
        deadline = asyncio.get_running_loop().time() + 5
        while not server.requests and asyncio.get_running_loop().time() < deadline:
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not client._idle and not client._busy
        assert (await client.post(client.encode("/x", b""))).status == 200
    finally:
        client.close()
    assert server.connections == 2


async def test_https_with_a_verified_certificate(tmp_path: object) -> None:
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(server_ctx)
    scripted = Scripted()
    srv = await asyncio.start_server(scripted.handle, "127.0.0.1", 0, ssl=server_ctx)
    scripted.port = srv.sockets[0].getsockname()[1]
    trusting = ssl.create_default_context()
    ca.configure_trust(trusting)
    good = Origin(
        scripted.url("https"), {}, connect_timeout=5, read_timeout=5, ssl_context=trusting
    )
    untrusting = Origin(scripted.url("https"), {}, connect_timeout=5, read_timeout=5)
    try:
        response = await good.post(good.encode("/x", b"{}"))
        assert (response.status, response.body) == (200, b'{"ok":true}')
        with pytest.raises(OriginError, match="cannot connect"):
            await untrusting.post(untrusting.encode("/x", b"{}"))
    finally:
        good.close()
        untrusting.close()
        scripted.close_all()
        srv.close()
    assert scripted.requests[0][0].startswith(b"POST /v1/x HTTP/1.1\r\n")


def test_only_http_urls() -> None:
    with pytest.raises(ValueError):
        origin("ftp://example.com/v1")
    assert (
        origin("https://api.openai.com/v1")
        .head("/x")
        .startswith(b"POST /v1/x HTTP/1.1\r\nHost: api.openai.com\r\n")
    )


# --- streamed answers (Origin.stream) -------------------------------------------------------------
@dataclass
class Sink:
    """A :class:`gateway.upstream.http1.BodySink` that records what it hears."""

    bodies: list[bytes] = field(default_factory=list)
    ends: list[OriginError | None] = field(default_factory=list)

    def on_body(self, data: bytes) -> None:
        self.bodies.append(data)

    def on_end(self, error: OriginError | None) -> None:
        self.ends.append(error)


HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n"


async def test_a_stream_gives_its_head_then_each_read_as_it_comes(server: Scripted) -> None:
    sink = Sink()

    async def events(writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"5\r\nhello\r\n")
        await writer.drain()
        await until(lambda: sink.bodies == [b"hello"])  # read before the rest is sent
        writer.write(b"1\r\n \r\n5\r\nworld\r\n")  # two chunks in one read: one on_body
        await writer.drain()
        await until(lambda: len(sink.bodies) == 2)
        writer.write(b"0\r\n\r\n")

    server.answers.append(events)
    client = origin(server.url())
    try:
        streamed = await client.stream(client.encode("/chat/completions", b"{}"), sink)
        assert (streamed.status, sink.ends) == (200, [])  # the body is still coming
        assert (b"Transfer-Encoding", b"chunked") in streamed.headers
        await until(lambda: sink.ends == [None])
        assert sink.bodies == [b"hello", b" world"]
        assert (await client.post(client.encode("/x", b""))).status == 200
    finally:
        client.close()
    assert server.connections == 1  # back in the pool once the stream ended


async def test_a_streamed_error_answer_goes_to_the_sink_whole(server: Scripted) -> None:
    server.answers.append(fixed(b"HTTP/1.1 429 Too Many\r\nContent-Length: 4\r\n\r\nslow"))
    sink = Sink()
    client = origin(server.url())
    try:
        streamed = await client.stream(client.encode("/x", b""), sink)
        await until(lambda: sink.ends == [None])
    finally:
        client.close()
    assert (streamed.status, b"".join(sink.bodies)) == (429, b"slow")


async def test_a_stream_over_the_bound_gives_what_is_within_it_then_fails(
    server: Scripted,
) -> None:
    server.answers.append(fixed(HEAD + b"6\r\nhello \r\n6\r\nworld!\r\n0\r\n\r\n"))
    sink = Sink()
    client = origin(server.url(), max_body_bytes=10)
    try:
        await client.stream(client.encode("/x", b""), sink)
        await until(lambda: len(sink.ends) == 1)
    finally:
        client.close()
    assert b"".join(sink.bodies) == b"hello worl"
    assert isinstance(sink.ends[0], OriginTooLarge)
    assert not client._idle  # the connection was dropped


async def test_a_stalled_stream_times_out_unless_its_reader_paused_it(server: Scripted) -> None:
    read_timeout = 0.5
    loop = asyncio.get_running_loop()
    sink, paused = Sink(), Sink()
    client = origin(server.url(), read_timeout=read_timeout)
    waited = asyncio.Event()

    async def stalls(writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"1\r\na\r\n")
        await writer.drain()
        await asyncio.sleep(30)

    async def waits(writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD + b"1\r\na\r\n")
        await writer.drain()
        await waited.wait()  # the rest once the reader was paused past the read timeout
        writer.write(b"1\r\nb\r\n0\r\n\r\n")

    server.answers += [stalls]
    try:
        started = loop.time()
        await client.stream(client.encode("/x", b""), sink)
        await until(lambda: len(sink.ends) == 1)
        assert isinstance(sink.ends[0], OriginTimeout)
        assert loop.time() - started >= read_timeout
        server.answers.append(waits)
        streamed = await client.stream(client.encode("/x", b""), paused)
        streamed.pause()
        paused_at = loop.time()
        await until(lambda: loop.time() - paused_at > read_timeout * 3)
        assert paused.ends == []  # no timeout while paused
        streamed.resume()
        waited.set()
        await until(lambda: paused.ends == [None])
    finally:
        client.close()
    assert b"".join(paused.bodies) == b"ab"


async def test_an_aborted_stream_drops_its_connection_and_hears_no_more(server: Scripted) -> None:
    async def endless(writer: asyncio.StreamWriter) -> None:
        writer.write(HEAD)
        with contextlib.suppress(ConnectionError):
            for _ in range(500):
                writer.write(b"1\r\nx\r\n")
                await writer.drain()
                await asyncio.sleep(0.01)

    server.answers.append(endless)
    sink = Sink()
    client = origin(server.url())
    try:
        streamed = await client.stream(client.encode("/x", b""), sink)
        await until(lambda: len(sink.bodies) >= 2)
        streamed.abort()
        heard = len(sink.bodies)
        assert (await client.post(client.encode("/x", b""))).status == 200
        streamed.abort()  # a second abort touches nothing: the connection serves others now
        assert (await client.post(client.encode("/x", b""))).status == 200
    finally:
        client.close()
    assert (len(sink.bodies), sink.ends) == (heard, [])
    assert server.connections == 2
