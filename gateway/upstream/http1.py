"""A lean keep-alive HTTP/1.1 client for the provider calls: answers read whole, and streams.

aiohttp's client spends more CPU on a request than the rest of the gateway's path does (request
and response objects, tracing hooks, cookie handling, per-read timers, a task per connect). A
non-streamed chat completion needs none of that: one ``POST`` with a JSON body, one JSON answer.
:class:`Origin` writes the whole request in one ``write`` (its head is prepared once per path) on a
pooled connection and parses the answer with ``httptools`` (llhttp, as Node.js uses) as it
arrives, chunked or not. :meth:`Origin.stream` sends the same request and returns once the
answer's head is in: the body then goes, as it arrives (its chunked framing decoded), to a
:class:`BodySink` — one ``on_body`` per read of the socket, whatever the number of chunks in it,
then one ``on_end`` (``None``, or the error that cut it). The sink may pause the socket's reading
(backpressure); the read timeout does not run while it is paused. Everything else (listings,
``count_tokens``, handed-over streams) keeps aiohttp's ``ClientSession``.

Interim answers (``100 Continue``, ``103 Early Hints``) are skipped: the answer is the first final
one. The body is bounded (``max_body_bytes``, the upstream's ``max_response_bytes``): past it the
request fails and the connection is dropped, whether the ``Content-Length`` announced it or the
bytes only showed it.

Errors, all raised from one place per cause::

    OriginError                     the provider's connection failed or spoke no HTTP (a status
     │                              outside 100-599, a ``101 Switching Protocols``)
     ├── OriginTimeout              no connection within the connect timeout, or the provider
     │                              sent nothing for ``read_timeout`` seconds
     └── OriginTooLarge             the body is over ``max_body_bytes``

Connections are reused last-in first-out (the warmest first), dropped after ``keepalive_s``
idle, when the provider closes them or answers ``Connection: close``. A request is never sent
twice: a reused connection that the provider closed in the meantime fails the request
(``OriginError``), as aiohttp does for a ``POST``.
"""

from __future__ import annotations

import asyncio
import ssl as ssl_module
from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Protocol
from urllib.parse import urlsplit

import httptools


class OriginError(Exception):
    """The provider's connection failed, or what came back was not HTTP."""


class OriginTimeout(OriginError, TimeoutError):
    """No connection in time, or no byte from the provider for ``read_timeout`` seconds."""


class OriginTooLarge(OriginError):
    """The provider's body is over the bound."""

    def __init__(self, limit: int) -> None:
        super().__init__(f"the provider's body is over {limit} bytes")
        self.limit = limit


MAX_BODY_BYTES = 64 * 1024 * 1024  # the default bound of a provider's body


@dataclass(slots=True)  # per request: frozen's __init__ is ~5x slower
class Response:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    ttfb_s: float  # from the request's write to the end of the response head


class BodySink(Protocol):
    """Where a streamed answer's body goes (called from the event loop's reading of the socket)."""

    def on_body(self, data: bytes) -> None:
        """The bytes of the body read from one read of the socket."""

    def on_end(self, error: OriginError | None) -> None:
        """The body is over: whole (``None``), or cut by ``error``. Called once."""


@dataclass(frozen=True, slots=True)
class Streamed:
    """A streamed answer's head; its body goes to the sink it was asked with."""

    status: int
    headers: list[tuple[bytes, bytes]]
    ttfb_s: float
    _conn: _Connection
    _serial: int  # the connection's request this is (after its end, it serves others)

    @property
    def _live(self) -> bool:
        return self._conn.serial == self._serial and self._conn.busy

    def pause(self) -> None:
        """Stop reading the provider's socket (the reader is behind)."""
        if self._live:
            self._conn.pause()

    def resume(self) -> None:
        if self._live:
            self._conn.resume()

    def abort(self) -> None:
        """Drop the stream, if it is still going: the connection is closed and the sink hears
        nothing more."""
        if self._live:
            self._conn.abort()


class _Connection(asyncio.Protocol):
    """One HTTP/1.1 connection: at most one request in flight."""

    def __init__(self, loop: asyncio.AbstractEventLoop, read_timeout: float, max_body: int) -> None:
        self.loop = loop
        self.read_timeout = read_timeout
        self.max_body = max_body
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self.idle_since = 0.0
        self._parser = httptools.HttpResponseParser(self)
        self._waiter: asyncio.Future[Response] | None = None
        self._timer: asyncio.TimerHandle | None = None
        # a streamed answer: its sink once the head is in, and what to do when it ends
        self._sink: BodySink | None = None
        self._streaming = False  # the head went to the waiter; the body goes to _sink
        self._on_done: Callable[[_Connection], None] | None = None
        self.paused = False
        self.serial = 0  # requests made on this connection
        self._reset()

    def _reset(self) -> None:
        self._headers: list[tuple[bytes, bytes]] = []
        self._chunks: list[bytes] = []
        self._sent_at = 0.0
        self._head_at = 0.0
        self._last_read = 0.0
        self._status = 0
        self._size = 0
        self._length_known = False

    # --- asyncio.Protocol ---------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport

    def data_received(self, data: bytes) -> None:
        if not self.busy:  # bytes nobody asked for: the connection is out of step
            self._fail(OriginError("unexpected data from the provider"))
            return
        self._last_read = self.loop.time()
        try:
            self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            cause = exc.__context__  # what a callback below raised
            self._fail(cause if isinstance(cause, OriginError) else _malformed(str(exc)))
            return
        if self._streaming and self._chunks:
            self._deliver()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if not self._streaming and (self._waiter is None or self._waiter.done()):
            return
        if self._status and not self._length_known:  # the body ran until the close
            self._complete(keep_alive=False)
            return
        what = "closed the connection" if exc is None else f"connection lost ({exc})"
        self._fail(OriginError(f"the provider {what} before answering in full"))

    # --- httptools callbacks (an OriginError raised here fails the request) -----------------------
    def on_message_begin(self) -> None:
        self._headers = []  # after an interim answer: the final one's
        self._status = 0
        self._length_known = False

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name, value))
        lowered = name.lower()
        if lowered == b"content-length":
            self._length_known = True
            length = value.strip()
            if length.isdigit() and (len(length) > 18 or int(length) > self.max_body):
                raise self._too_large()
        elif lowered == b"transfer-encoding" and b"chunked" in value.lower():
            self._length_known = True

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if not 100 <= status <= 599:
            raise _malformed(f"status {status}")
        if status == 101:
            raise _malformed("101 Switching Protocols to a request that asked for no upgrade")
        self._status = status
        self._head_at = self.loop.time()
        if self._sink is not None and status >= 200:  # a stream: its head now, its body later
            waiter, self._waiter = self._waiter, None
            self._streaming = True
            if waiter is not None and not waiter.done():
                ttfb = self._head_at - self._sent_at
                waiter.set_result(Response(status, self._headers, b"", ttfb))

    def on_body(self, body: bytes) -> None:
        self._size += len(body)
        if self._size > self.max_body:
            if self._streaming:  # what is within the bound goes on, then the stream fails
                room = self.max_body - self._size + len(body)
                if room > 0:
                    self._chunks.append(body[:room])
                self._deliver()
            raise self._too_large()
        self._chunks.append(body)

    def on_message_complete(self) -> None:
        if self._status < 200:  # 100 Continue, 103 Early Hints: the answer is still to come
            self._status = 0
            return
        self._length_known = True
        self._complete(keep_alive=self._parser.should_keep_alive())

    def _too_large(self) -> OriginTooLarge:
        return OriginTooLarge(self.max_body)

    # --- one request ------------------------------------------------------------------------------
    def request(
        self,
        data: bytes,
        sink: BodySink | None = None,
        on_done: Callable[[_Connection], None] | None = None,
    ) -> asyncio.Future[Response]:
        """Send ``data``; the whole answer, or with a ``sink`` its head only (the body goes to
        the sink, and ``on_done`` is called when it has ended)."""
        assert self.transport is not None and not self.busy
        self._reset()
        self.serial += 1
        self._sink, self._on_done, self._streaming = sink, on_done, False
        self._waiter = waiter = self.loop.create_future()
        self._sent_at = self._last_read = self.loop.time()
        self._timer = self.loop.call_at(self._sent_at + self.read_timeout, self._check_timeout)
        self.transport.write(data)
        return waiter

    def _check_timeout(self) -> None:
        self._timer = None
        if not self.busy:
            return
        now = self.loop.time()
        if self.paused:  # the sink does not read: no timeout meanwhile
            self._last_read = now
        due = self._last_read + self.read_timeout
        if now >= due:
            self._fail(OriginTimeout(f"no answer from the provider in {self.read_timeout:g} s"))
        else:
            self._timer = self.loop.call_at(due, self._check_timeout)

    def _complete(self, keep_alive: bool) -> None:
        if self._streaming:
            self._deliver()
            self._end(None, keep_alive)
            return
        waiter, self._waiter = self._waiter, None
        self._stop_timer()
        if not keep_alive:
            self.close()
        if waiter is not None and not waiter.done():
            body = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
            ttfb = (self._head_at or self.loop.time()) - self._sent_at
            waiter.set_result(Response(self._status, self._headers, body, ttfb))

    def _fail(self, exc: OriginError) -> None:
        if self._streaming:
            self._end(exc, False)
            return
        waiter, self._waiter = self._waiter, None
        self._stop_timer()
        self.close()
        if waiter is not None and not waiter.done():
            waiter.set_exception(exc)
        self._done()

    # --- a streamed body --------------------------------------------------------------------------
    def _deliver(self) -> None:
        chunks, self._chunks = self._chunks, []
        if chunks and self._sink is not None:
            self._sink.on_body(chunks[0] if len(chunks) == 1 else b"".join(chunks))

    def _end(self, error: OriginError | None, keep_alive: bool) -> None:
        sink, self._sink, self._streaming = self._sink, None, False
        self._stop_timer()
        if not keep_alive or self.paused:
            self.close()
        self._done()
        if sink is not None:
            sink.on_end(error)

    def _done(self) -> None:
        on_done, self._on_done = self._on_done, None
        if on_done is not None:
            on_done(self)

    def abort(self) -> None:
        """Stop a stream (its reader left): the connection is closed, the sink hears nothing
        more."""
        self._sink = None
        self._streaming = False
        self._waiter = None
        self._stop_timer()
        self.close()
        self._done()

    def pause(self) -> None:
        if not self.paused and self.transport is not None and not self.closed:
            self.paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self.paused:
            self.paused = False
            self._last_read = self.loop.time()
            if self.transport is not None and not self.closed:
                self.transport.resume_reading()

    def _stop_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    @property
    def busy(self) -> bool:
        return self._waiter is not None or self._streaming

    def close(self) -> None:
        self.closed = True
        if self.transport is not None:
            self.transport.close()


class Origin:
    """A pool of keep-alive connections to one provider base URL (``https://host/v1``)."""

    def __init__(
        self,
        base_url: str,
        headers: dict[str, str],
        *,
        connect_timeout: float,
        read_timeout: float,
        keepalive_s: float = 60.0,
        ssl_context: ssl_module.SSLContext | None = None,
        max_body_bytes: int = MAX_BODY_BYTES,
    ) -> None:
        parts = urlsplit(base_url.rstrip("/"))
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"not an http(s) URL: {base_url!r}")
        self.host = parts.hostname
        self.port = parts.port or (443 if parts.scheme == "https" else 80)
        self.ssl: ssl_module.SSLContext | None = None
        if parts.scheme == "https":
            self.ssl = ssl_context or ssl_module.create_default_context()
        default_port = self.port == (443 if self.ssl else 80)
        authority = self.host if default_port else f"{self.host}:{self.port}"
        if ":" in self.host and not default_port:  # an IPv6 literal
            authority = f"[{self.host}]:{self.port}"
        self.prefix = parts.path
        lines = [f"Host: {authority}", "Accept-Encoding: identity"]
        lines += [f"{name}: {value}" for name, value in headers.items()]
        self._common = ("\r\n".join(lines) + "\r\n").encode("latin-1")
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.keepalive_s = keepalive_s
        self.max_body_bytes = max_body_bytes
        self._idle: deque[_Connection] = deque()
        self._busy: set[_Connection] = set()
        self._heads: dict[str, bytes] = {}

    def head(self, path: str) -> bytes:
        """The request line and fixed headers of a ``POST`` to ``path``, built once."""
        head = self._heads.get(path)
        if head is None:
            head = f"POST {self.prefix}{path} HTTP/1.1\r\n".encode("latin-1") + self._common
            self._heads[path] = head
        return head

    def encode(self, path: str, body: bytes, headers: Mapping[str, str] | None = None) -> bytes:
        """The whole request on the wire (built ahead, e.g. while the hold is in flight);
        ``headers`` replace or add to the fixed ones for this request only."""
        head = self.head(path)
        if headers:
            head = _with_headers(head, headers)
        return b"%sContent-Length: %d\r\n\r\n%s" % (head, len(body), body)

    async def post(self, data: bytes) -> Response:
        """Send a request made by :meth:`encode`; the whole answer, whatever its status."""
        conn = await self._acquire()
        try:
            response = await conn.request(data)
        except asyncio.CancelledError:
            conn.close()  # the answer will never be read: the connection is out of step
            raise
        finally:
            self._busy.discard(conn)
            self._release(conn)
        return response

    async def stream(self, data: bytes, sink: BodySink) -> Streamed:
        """Send a request made by :meth:`encode`; its answer's head, whatever its status, once
        it is in. The body goes to ``sink`` (the connection back to the pool when it ends)."""
        conn = await self._acquire()
        try:
            head = await conn.request(data, sink, self._ended)
        except asyncio.CancelledError:
            conn.abort()
            raise
        return Streamed(head.status, head.headers, head.ttfb_s, conn, conn.serial)

    def _ended(self, conn: _Connection) -> None:
        self._busy.discard(conn)
        self._release(conn)

    async def _acquire(self) -> _Connection:
        while self._idle:
            conn = self._idle.pop()
            if not conn.closed and conn.loop.time() - conn.idle_since < self.keepalive_s:
                self._busy.add(conn)
                return conn
            conn.close()
        loop = asyncio.get_running_loop()
        read_timeout, max_body = self.read_timeout, self.max_body_bytes
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(
                    lambda: _Connection(loop, read_timeout, max_body),
                    self.host,
                    self.port,
                    ssl=self.ssl,
                    server_hostname=self.host if self.ssl else None,
                )
        except TimeoutError as exc:
            raise OriginTimeout(f"no connection to {self.host}:{self.port} in time") from exc
        except OSError as exc:  # refused, unreachable, DNS, TLS (ssl.SSLError is an OSError)
            raise OriginError(f"cannot connect to {self.host}:{self.port}: {exc}") from exc
        self._busy.add(conn)
        return conn

    def _release(self, conn: _Connection) -> None:
        if conn.closed or conn.busy:
            conn.close()
            return
        conn.idle_since = conn.loop.time()
        self._idle.append(conn)
        self._prune(conn.idle_since)

    def _prune(self, now: float) -> None:
        """Close the connections idle for too long (the oldest are at the left)."""
        while self._idle and (
            self._idle[0].closed or now - self._idle[0].idle_since >= self.keepalive_s
        ):
            self._idle.popleft().close()

    def close(self) -> None:
        for conn in (*self._idle, *self._busy):
            conn.close()
        self._idle.clear()
        self._busy.clear()


def _malformed(what: str) -> OriginError:
    return OriginError(f"malformed HTTP response: {what}")


def _with_headers(head: bytes, headers: Mapping[str, str]) -> bytes:
    """``head`` with the lines of ``headers`` in place of its lines of the same names."""
    names = {name.lower().encode("latin-1") for name in headers}
    lines = head.split(b"\r\n")[:-1]
    kept = [lines[0], *(ln for ln in lines[1:] if ln.split(b":", 1)[0].lower() not in names)]
    kept += [f"{name}: {value}".encode("latin-1") for name, value in headers.items()]
    return b"\r\n".join(kept) + b"\r\n"
