"""The front of every connection: the common plain proxy call served lean, the rest by aiohttp.

A client's connection starts on :class:`Front`. While it sends complete, well-formed
``POST /v1/chat/completions`` (``/completions``, ``/embeddings``) requests with a ``Content-Length``
body and no ``stream``, Front serves them itself, with the same code as aiohttp's path
(:mod:`gateway.proxy.handlers`: parse, hold, ask, answer, settle, count) minus aiohttp's request and
response objects, which cost more than the rest of the gateway's work at low load. For a key
this process has cached and a sound body, the hold goes to Redis straight from
``data_received`` (no task, no loop iteration before it) and the upstream request is built while
Redis works; otherwise a task looks the key up first. Errors are answered in the OpenAI
envelope, as on aiohttp's path; an upstream failure after the hold releases it.

Anything else, at a request boundary, hands the connection to aiohttp for good: the bytes read
so far go to a fresh ``RequestHandler``, which serves them as if it had read them itself. That
covers every other route, streams, ``Expect``, chunked bodies, HTTP/1.0, folded or duplicate
framing headers, non-ASCII heads and bodies over the size cap.

Shutdown (``app.on_shutdown``, after the listening socket is closed): idle connections are
closed, requests in flight get ``shutdown_timeout_s`` to finish, then are cancelled (a hold
already placed is released; one still on its way to Redis expires on its own).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE

from gateway import state as S
from gateway.errors import GatewayError
from gateway.metering.meter import guarded
from gateway.proxy import handlers as proxy

log = logging.getLogger("modelbridge.front")

ROUTES = {
    b"/v1/chat/completions": proxy.CHAT,
    b"/v1/completions": proxy.COMPLETION,
    b"/v1/embeddings": proxy.EMBEDDING,
}
MAX_HEAD = 16 * 1024  # a longer head goes to aiohttp (which refuses past 8190 per line)
KEEPALIVE_S = 3630.0  # as aiohttp's server
# aiohttp's business: other framing, interim answers, protocol switches, folded header lines
_HANDED_OVER = (b"\r\ntransfer-encoding", b"\r\nexpect", b"\r\nupgrade", b"\r\n ", b"\r\n\t")
# The request line, then "name: value" lines: token names, printable ASCII values (a C match).
_HEAD = re.compile(rb"[^\r\n]+(?:\r\n[!#$%&'*+.^_`|~0-9A-Za-z-]+:[\t\x20-\x7e]*)*")
_READ = (b"content-length", b"authorization", b"x-api-key", b"connection", b"x-modelbridge-tags")
_NEEDLES = tuple((name, b"\r\n" + name + b":") for name in _READ)
_SINGLE = {b"content-length", b"authorization", b"x-api-key"}


class Fronts:
    """The lean connections of one app (for shutdown), and how many requests they served."""

    def __init__(self) -> None:
        self.connections: set[Front] = set()
        self.served = 0
        self.handed_over = 0
        self.closing = False
        self._date = (0, "")

    def date(self) -> str:
        """The ``Date`` header's value, formatted once a second."""
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True))
        return self._date[1]

    async def shutdown(self, timeout: float) -> None:
        self.closing = True
        for conn in list(self.connections):
            if conn.task is None:
                conn.close()
        deadline = time.monotonic() + timeout
        while any(c.task is not None for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        tasks = [c.task for c in self.connections if c.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for conn in list(self.connections):
            conn.close()


class HandOver(Exception):
    """This request is aiohttp's to serve."""


class Front(asyncio.Protocol):
    def __init__(self, app: web.Application, server: web.Server, fronts: Fronts) -> None:
        self.app = app
        self.server = server
        self.fronts = fronts
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.task: asyncio.Task[None] | None = None
        self.closed = False
        self._write_paused = False
        self._read_paused = False
        self._resumed: asyncio.Future[None] | None = None
        self._idle_since = self.loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None

    # --- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        self.fronts.connections.add(self)
        self._idle_timer = self.loop.call_later(KEEPALIVE_S, self._check_idle)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self.task is None:
            self._next()
        elif len(self.buffer) > MAX_HEAD and self.transport is not None and not self._read_paused:
            self._read_paused = True  # a client racing ahead: wait for our answer
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.fronts.connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)

    def pause_writing(self) -> None:
        self._write_paused = True

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._resumed is not None and not self._resumed.done():
            self._resumed.set_result(None)

    # --- requests ---------------------------------------------------------------------------------
    def _next(self) -> None:
        """Start on the next complete request in the buffer, if there is one."""
        if self.closed or not self.buffer:
            return
        if self.fronts.closing:
            self.close()
            return
        head_end = self.buffer.find(b"\r\n\r\n", 0, MAX_HEAD + 4)
        if head_end < 0:
            if len(self.buffer) > MAX_HEAD:
                self._hand_over()
            return
        try:
            endpoint, headers, length = _read_head(bytes(self.buffer[:head_end]))
            if length > self.app[S.CONFIG].server.max_body_bytes:
                raise HandOver  # aiohttp refuses it without reading it
        except HandOver:
            self._hand_over()
            return
        end = head_end + 4 + length
        if len(self.buffer) < end:
            return  # the body is still coming
        raw = bytes(self.buffer[head_end + 4 : end])
        started = time.perf_counter()
        try:
            fast = self._begin(endpoint, headers, raw)
        except HandOver:
            self._hand_over()
            return
        except Exception:  # a bug: aiohttp's path meets it again, logs it, answers 500
            log.exception("front: unexpected error; handing the connection to aiohttp")
            self._hand_over()
            return
        del self.buffer[:end]
        request = Request(endpoint, headers, raw, started)
        self.task = self.loop.create_task(self._serve(request, fast))

    def _begin(
        self, endpoint: proxy.Endpoint, headers: dict[bytes, bytes], raw: bytes
    ) -> tuple[proxy.Call, Awaitable[Any]] | None:
        """For a known key and a sound body: parse, size and send the hold before any await.
        None: the request needs I/O first (or is refused); :meth:`_serve` goes the long way."""
        try:
            body = proxy.decode_json(raw)
        except GatewayError:
            return None
        if body.get("stream") is True and endpoint.kind != "embedding":
            raise HandOver
        app = self.app
        secret = _bearer(headers)
        key = app[S.KEYS].cached(secret) if secret else None
        if secret is None or key is None:
            return None
        try:
            call = proxy.parse(app, endpoint, secret, key, raw, body, _tags(headers))
        except GatewayError:
            return None
        sent = app[S.METERING].hold_now(proxy.hold_ask(call, proxy.worst_cost(call)))
        if sent is None:
            return None
        proxy.prepare_upstream(call)  # while Redis works
        return call, sent

    async def _parsed(self, request: Request) -> proxy.Call:
        """The request checked and sized, as :func:`gateway.proxy.handlers.begin` does it."""
        app = self.app
        secret = _bearer(request.headers)
        key = await app[S.KEYS].lookup(secret)
        assert secret is not None  # lookup refuses a missing key
        body = proxy.decode_json(request.raw)
        tags = _tags(request.headers)
        return proxy.parse(app, request.endpoint, secret, key, request.raw, body, tags)

    async def _hold(self, call: proxy.Call, sent: Awaitable[Any] | None) -> None:
        """Place the hold as :func:`gateway.proxy.handlers.place_hold` does (refusals raise), reading the
        reply to the one sent ahead when there is one."""
        if sent is not None:
            result = self.app[S.METERING].hold_result(call.key.account, await guarded(sent))
            if result.status == "ok":
                call.hold = result
                return
        call.hold = await proxy.place_hold(call)

    async def _serve(
        self, request: Request, fast: tuple[proxy.Call, Awaitable[Any]] | None
    ) -> None:
        app = self.app
        app[S.METRICS].inflight.inc()
        self.fronts.served += 1
        keep_alive = b"close" not in request.headers.get(b"connection", b"").lower()
        call: proxy.Call | None = fast[0] if fast is not None else None
        status = 500
        try:
            try:
                if call is None:
                    call = await self._parsed(request)
                await self._hold(call, fast[1] if fast is not None else None)
                try:
                    plain = await proxy.ask_upstream(call)
                except BaseException:
                    await proxy.release_quietly(call)
                    raise
            except GatewayError as exc:
                status = exc.status
                if call is not None:
                    proxy.annotate(exc, call)
                self._write_error(exc, keep_alive)
            except Exception:
                log.exception("unhandled error on POST %s", request.endpoint.route)
                self._write_error(
                    GatewayError("The gateway failed to handle the request."), keep_alive
                )
            else:
                status = 200
                self._write(200, plain.headers, plain.body, keep_alive)
                await proxy.settle_plain(call, plain)
        finally:
            model = call.model.name if call is not None else "other"
            proxy.observe(app, request.endpoint, model, status, call, request.started)
            self.task = None
        await self._after(keep_alive)

    async def _after(self, keep_alive: bool) -> None:
        """Answered: close, or wait until the client reads, then take the next request."""
        if not keep_alive:
            self.close()
            return
        if self._write_paused:
            self._resumed = self.loop.create_future()
            await self._resumed
        self._idle_since = self.loop.time()
        if self._read_paused and self.transport is not None and not self.closed:
            self._read_paused = False
            self.transport.resume_reading()
        self._next()

    def _write_error(self, exc: GatewayError, keep_alive: bool) -> None:
        headers = {**exc.response_headers(), "Content-Type": "application/json"}
        self._write(exc.status, headers, orjson.dumps(exc.body()), keep_alive)

    def _write(
        self, status: int, headers: dict[str, str], body: bytes, keep_alive: bool = True
    ) -> None:
        if self.transport is None or self.closed:
            return  # the client left: a plain answer is billed anyway
        head = [f"HTTP/1.1 {status} {HTTPStatus(status).phrase}"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        head += [f"Content-Length: {len(body)}", f"Date: {self.fronts.date()}"]
        head.append(f"Server: {SERVER_SOFTWARE}")
        if not keep_alive:
            head.append("Connection: close")
        self.transport.write("\r\n".join(head).encode("latin-1") + b"\r\n\r\n" + body)

    # --- the connection ------------------------------------------------------------------------
    def _hand_over(self) -> None:
        """Give the connection, and what it sent so far, to aiohttp."""
        transport = self.transport
        self.fronts.connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        if transport is None or self.closed:
            return
        self.closed = True
        self.fronts.handed_over += 1
        handler = self.server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._read_paused:
            transport.resume_reading()
        pending, self.buffer = bytes(self.buffer), bytearray()
        if pending:
            handler.data_received(pending)

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self.closed:
            return
        due = self._idle_since + KEEPALIVE_S
        if self.task is None and self.loop.time() >= due:
            self.close()
        else:
            self._idle_timer = self.loop.call_at(max(due, self.loop.time() + 1), self._check_idle)

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.closed = True
            self.transport.close()


def _read_head(head: bytes) -> tuple[proxy.Endpoint, dict[bytes, bytes], int]:
    """The route, the headers Front reads (lower-case names) and the body length of a request
    Front serves; raises :class:`HandOver` for anything else. A handful of searches in C, no
    loop over the header lines."""
    line_end = head.find(b"\r\n")
    parts = head[: line_end if line_end >= 0 else len(head)].split(b" ")
    if len(parts) != 3 or parts[0] != b"POST" or parts[2] != b"HTTP/1.1":
        raise HandOver
    endpoint = ROUTES.get(parts[1])
    if endpoint is None or _HEAD.fullmatch(head) is None:
        raise HandOver
    lower = head.lower()
    for marker in _HANDED_OVER:
        if marker in lower:
            raise HandOver
    headers: dict[bytes, bytes] = {}
    for name, needle in _NEEDLES:
        at = lower.find(needle)
        if at < 0:
            continue
        start = at + len(needle)
        end = head.find(b"\r\n", start)
        end = end if end >= 0 else len(head)
        if name in _SINGLE and lower.find(needle, end) >= 0:
            raise HandOver  # twice: ambiguous
        headers[name] = head[start:end].strip(b" \t")
    length = headers.get(b"content-length")
    if length is None or not length.isdigit():
        raise HandOver
    return endpoint, headers, int(length)


@dataclass(frozen=True, slots=True)
class Request:
    endpoint: proxy.Endpoint
    headers: dict[bytes, bytes]  # lower-case names
    raw: bytes
    started: float


def _tags(headers: dict[bytes, bytes]) -> str | None:
    tags = headers.get(proxy.TAGS_HEADER.encode())
    return tags.decode() if tags is not None else None


def _bearer(headers: dict[bytes, bytes]) -> str | None:
    """As :func:`gateway.credentials.bearer`, on raw headers."""
    header = headers.get(b"authorization")
    if header:
        scheme, _, value = header.partition(b" ")
        if scheme.lower() == b"bearer" and value.strip():
            return value.strip().decode()
    key = headers.get(b"x-api-key")
    return key.decode() if key else None


class FrontSite(web.TCPSite):
    """aiohttp's TCP site, with :class:`Front` as every connection's first protocol."""

    async def start(self) -> None:
        runner = self._runner
        assert isinstance(runner, web.AppRunner) and runner.server is not None
        app, server = runner.app, runner.server
        fronts = app[S.FRONTS]
        await web.BaseSite.start(self)
        self._server = await asyncio.get_running_loop().create_server(
            lambda: Front(app, server, fronts),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )


async def on_shutdown(app: web.Application) -> None:
    await app[S.FRONTS].shutdown(app[S.CONFIG].server.shutdown_timeout_s)
