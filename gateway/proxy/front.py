"""The front of every connection: the common proxy calls served lean, the rest by aiohttp.

A client's connection starts on :class:`Front`. While it sends complete, well-formed
``POST /v1/chat/completions`` (``/completions``, ``/embeddings``, ``/responses``, ``/messages``)
requests with a ``Content-Length`` body (framed by :mod:`gateway.proxy.head`), streamed or not,
Front serves them itself, with the same code as aiohttp's path (:mod:`gateway.proxy.handlers` and
:mod:`gateway.proxy.forwarding`: parse, hold, ask along the routing chain, answer, settle, count)
minus aiohttp's request and response objects, which cost more than the rest of the gateway's work
at low load. For a key
this process has cached and a sound body, the hold goes to Redis straight from
``data_received`` (no task, no loop iteration before it) and the upstream request is built while
Redis works; otherwise a task looks the key up first. Errors are answered in the surface's
envelope (:func:`gateway.proxy.surfaces.error_envelope`: Anthropic's for ``/v1/messages``, OpenAI's
for the others), as on aiohttp's path, with the provider's status whatever it is (a 524 too); an
upstream failure after the hold releases it. One request at most is in service on a connection
(:class:`State`); the next waits until the answer is out and the client reads. An exception
that escapes all that is a bug: logged, and the connection closed, never left unanswered.

Streams (``"stream": true``) are served from end to end (:mod:`gateway.proxy.stream_front`: the
provider's SSE read with the lean client and relayed one write per read, retried before the first
byte, billed in the loop step of the last write), whatever the model's upstream protocol: a
translated stream (a Chat Completions stream on an Anthropic model, a Messages stream on an
OpenAI one) goes through its exchange's relay, as on aiohttp's path.

The hand-over rule: anything else, at a request boundary, hands the connection to aiohttp for
good: the bytes read so far go to a fresh ``RequestHandler``, which serves them as if it had read
them itself. That covers every other route (``/v1/messages/count_tokens``, the management API...)
and, on these routes, ``Expect``, chunked or compressed bodies, HTTP/1.0, folded or duplicate
framing headers, non-ASCII heads and bodies over the size cap — streams included: a stream sent
that way is aiohttp's, relayed with aiohttp's client
(:func:`gateway.proxy.forwarding.forward_stream`).

A request that comes in part and then stalls (nothing more of it for
``server.request_read_timeout_s``, 60 s by default) is answered 408 ``request_timeout`` in its
path's envelope and its connection closed; aiohttp's path refuses a stalled body
(:func:`gateway.infra.bodies.read_body`) and a stalled head (a head over 16 KiB handed over in
part, a later request's on a connection it serves: :class:`gateway.infra.bodies.Handler`) the same
way. A connection between requests stays open for ``KEEPALIVE_S``.

Shutdown (``app.on_shutdown``, after the listening socket is closed): idle connections are
closed, requests in flight (streams too) get ``shutdown_timeout_s`` to finish, then are cancelled
(a hold already placed is released; one still on its way to Redis expires on its own; a stream
cut is billed on what it streamed, 499).
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from email.utils import formatdate
from http import HTTPStatus
from typing import Any

from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.web_protocol import RequestHandler

from gateway import state as S
from gateway.errors import GatewayError, RequestTimeout
from gateway.infra import bodies, outages
from gateway.metering.meter import guarded
from gateway.proxy import forwarding, stream_front, surfaces
from gateway.proxy import handlers as proxy
from gateway.proxy.head import FORWARDED, MAX_HEAD, PATHS, HandOver, Head, frame

log = logging.getLogger("modelbridge.front")

ROUTES = {
    b"/v1/chat/completions": proxy.CHAT,
    b"/v1/completions": proxy.COMPLETION,
    b"/v1/embeddings": proxy.EMBEDDING,
    b"/v1/responses": proxy.RESPONSES,  # OpenAI's envelope and Bearer keys too
    b"/v1/messages": proxy.MESSAGES,  # Anthropic's envelope, x-api-key, anthropic-* forwarded
}
assert set(ROUTES) == PATHS
KEEPALIVE_S = 3630.0  # as aiohttp's server
# The status line's reason phrase, as aiohttp writes it: none for a status without a standard one
# (a provider's 524 or 499 is relayed as "HTTP/1.1 524 ").
_REASONS = {status.value: status.phrase for status in HTTPStatus}


# Answers to the hold sent ahead that send it again by place_hold: after a fresh look-up of the
# key, after loading the account into Redis.
_HELD_AGAIN = ("invalid_api_key", "not_loaded")


class State(enum.Enum):
    """Where a connection is. One request at most is in service on a connection::

    IDLE ──a whole request──> SERVING ──answered──> IDLE (and the next request, if any)
                                 │  └─answered while the client does not read─> DRAINING
                                 │                      └─the client reads─> IDLE
    any ──closed, lost or handed to aiohttp──> CLOSED
    """

    IDLE = "idle"  # reading; the next whole request starts SERVING
    SERVING = "serving"  # one request's task runs (``task``); the bytes that come are buffered
    DRAINING = "draining"  # answered, writes paused: the next request waits for the client
    CLOSED = "closed"


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

    def serving(self) -> list[Front]:
        return [c for c in self.connections if c.state is State.SERVING]

    async def shutdown(self, timeout: float) -> None:
        self.closing = True
        for conn in list(self.connections):
            if conn.state is not State.SERVING:
                conn.close()
        deadline = time.monotonic() + timeout
        while self.serving() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        tasks = [c.task for c in self.serving() if c.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for conn in list(self.connections):
            conn.close()


class Front(asyncio.Protocol):
    def __init__(
        self, app: web.Application, server: Callable[[], RequestHandler], fronts: Fronts
    ) -> None:
        self.app = app
        self.server = server
        self.fronts = fronts
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.buffer = bytearray()
        self.state = State.IDLE
        self.task: asyncio.Task[None] | None = None  # the request in service (SERVING)
        self._write_paused = False
        self._read_paused = False
        self._idle_since = self.loop.time()
        self._idle_timer: asyncio.TimerHandle | None = None
        # A request partly in: when more of it last came, and the timer that refuses it once
        # nothing has for server.request_read_timeout_s (408, closed); None while none is.
        self._read_timer: asyncio.TimerHandle | None = None
        self._last_read = 0.0
        self._stream: stream_front.LeanStream | None = None  # a stream past its first byte
        self._keep_alive = True  # the request in service's

    @property
    def closed(self) -> bool:
        return self.state is State.CLOSED

    # --- asyncio.Protocol -----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # uvloop's is no asyncio.Transport
        self.fronts.connections.add(self)
        self._idle_timer = self.loop.call_later(KEEPALIVE_S, self._check_idle)

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        if self._read_timer is not None:
            self._last_read = self.loop.time()
        if self.state is State.IDLE:
            self._next()
        elif len(self.buffer) > MAX_HEAD and self.transport is not None and not self._read_paused:
            self._read_paused = True  # a client racing ahead: wait for our answer
            self.transport.pause_reading()

    def connection_lost(self, exc: Exception | None) -> None:
        self.state = State.CLOSED  # a request in service goes on (and is billed), unanswered
        self.fronts.connections.discard(self)
        if self._idle_timer is not None:
            self._idle_timer.cancel()
        self._stop_read_timer()
        if self._stream is not None:  # a stream stops at once, billed on what was streamed
            self._stream.client_lost()

    def pause_writing(self) -> None:
        self._write_paused = True
        if self._stream is not None:  # the provider waits for the client
            self._stream.pause()

    def resume_writing(self) -> None:
        self._write_paused = False
        if self._stream is not None:
            self._stream.resume()
        if self.state is State.DRAINING:
            self._take_next()

    # --- requests ---------------------------------------------------------------------------------
    def _take_next(self) -> None:
        """Back to IDLE: read again, and start on the next request if it is here already."""
        self.state = State.IDLE
        self._idle_since = self.loop.time()
        if self._read_paused and self.transport is not None:
            self._read_paused = False
            self.transport.resume_reading()
        self._next()

    def _next(self) -> None:
        """Start on the next complete request in the buffer, if there is one."""
        assert self.state is State.IDLE and self.task is None, self.state
        if not self.buffer:
            return
        if self.fronts.closing:
            self.close()
            return
        try:
            framed = frame(self.buffer, self.app[S.CONFIG].server.max_body_bytes)
            if framed is None:
                if self._read_timer is None:  # the rest is still coming: for so long
                    self._last_read = self.loop.time()
                    limit = self.app[S.CONFIG].server.request_read_timeout_s
                    self._read_timer = self.loop.call_later(limit, self._read_stalled)
                return
            if self._read_timer is not None:
                self._stop_read_timer()
            endpoint = ROUTES[framed.head.path]
            raw = bytes(self.buffer[framed.body_start : framed.end])
            started = time.perf_counter()
            fast = self._begin(endpoint, framed.head.headers, raw)
        except HandOver:
            self._hand_over()
            return
        except Exception:  # a bug: aiohttp's path meets it again, logs it, answers 500
            log.exception("front: unexpected error; handing the connection to aiohttp")
            self._hand_over()
            return
        del self.buffer[: framed.end]
        request = Request(endpoint, framed.head, raw, started)
        self.state = State.SERVING
        self.task = self.loop.create_task(self._serve(request, fast))

    def _begin(
        self, endpoint: proxy.Endpoint, headers: dict[bytes, bytes], raw: bytes
    ) -> tuple[proxy.Call, Awaitable[Any]] | None:
        """For a known key and a sound body: parse, size and send the hold before any await.
        None: the request needs I/O first (or is refused); :meth:`_serve` goes the long way."""
        try:
            body = bodies.decode_json(raw)
        except GatewayError:
            return None
        if endpoint.kind == "responses" and "previous_response_id" in body:
            return None  # its hold needs the continued response's note first (place_hold)
        app = self.app
        secret = _bearer(headers)
        key = app[S.KEYS].cached(secret) if secret else None
        if secret is None or key is None:
            return None
        try:
            call = proxy.parse(app, endpoint, secret, key, raw, body, _tags(headers))
        except GatewayError:
            return None
        call.client_headers = _forwardable(headers)
        sent = app[S.METERING].hold_now(proxy.hold_ask(call, proxy.worst_cost(call)))
        if sent is None:
            return None
        proxy.prepare_upstream(call)  # while Redis works
        return call, sent

    async def _parsed(self, request: Request) -> proxy.Call:
        """The request checked and sized, as :func:`gateway.proxy.handlers.begin` does it."""
        app = self.app
        headers = request.head.headers
        secret = _bearer(headers)
        key = await app[S.KEYS].lookup(secret)
        assert secret is not None  # lookup refuses a missing key
        body = bodies.decode_json(request.raw)
        call = proxy.parse(app, request.endpoint, secret, key, request.raw, body, _tags(headers))
        call.client_headers = _forwardable(headers)
        return call

    async def _hold(self, call: proxy.Call, sent: Awaitable[Any] | None) -> None:
        """Place the hold as :func:`gateway.proxy.handlers.place_hold` does (refusals raise),
        reading the reply to the one sent ahead when there is one. Its refusal is taken as
        it is; only a key Redis no longer knows (it may bill another account by now: looked up
        afresh) or an account it has not loaded is held again, the long way."""
        if sent is not None:
            result = self.app[S.METERING].hold_result(call.key.account, await guarded(sent))
            if result.status not in _HELD_AGAIN:
                call.hold = await proxy.hold_taken(call, result)
                return
        call.hold = await proxy.place_hold(call)

    async def _serve(
        self, request: Request, fast: tuple[proxy.Call, Awaitable[Any]] | None
    ) -> None:
        """The task of one request in service: answer it, then take the next. Whatever escapes
        the answer's own error handling is a bug: logged, and the connection closed (its state
        is unknown), never left waiting."""
        try:
            await self._answer(request, fast)
            self._answered(request.head.keep_alive)
        except asyncio.CancelledError:  # shutdown's deadline
            self.close()
            raise
        except Exception:
            log.exception("front: unexpected error on POST %s; closing", request.endpoint.route)
            self.close()
            if self.task is asyncio.current_task():
                self.task = None

    async def _answer(
        self, request: Request, fast: tuple[proxy.Call, Awaitable[Any]] | None
    ) -> None:
        app = self.app
        app[S.METRICS].add(app[S.METRICS].inflight)
        self.fronts.served += 1
        keep_alive = request.head.keep_alive
        call: proxy.Call | None = fast[0] if fast is not None else None
        status = 500
        try:
            try:
                if call is None:
                    call = await self._parsed(request)
                call.left = self._left
                await self._hold(call, fast[1] if fast is not None else None)
                try:
                    if call.stream:
                        self._keep_alive = keep_alive
                        try:
                            await stream_front.serve(call, self)
                        finally:
                            self._stream = None
                        status = 200
                        return
                    plain = await forwarding.ask_upstream(call)
                except BaseException:
                    await proxy.release_quietly(call)
                    raise
            except GatewayError as exc:
                status = exc.status
                proxy.count_refusal(app, exc)
                if call is not None:
                    proxy.annotate(exc, call)
                self._write_error(request.endpoint, exc, keep_alive)
            except Exception as exc:  # a store down (503, as on aiohttp's path), else a bug
                failed = outages.unavailable(app[S.OUTAGES], exc)
                if failed is None:
                    log.exception("unhandled error on POST %s", request.endpoint.route)
                    failed = GatewayError("The gateway failed to handle the request.")
                status = failed.status
                self._write_error(request.endpoint, failed, keep_alive)
            else:
                status = 200
                settled = await forwarding.settle_plain(call, plain)  # sent before the answer
                try:
                    self._write(200, plain.headers, plain.body, keep_alive, proxy.rate_lines(call))
                finally:
                    await settled
        finally:
            model = call.model.name if call is not None else "other"
            proxy.observe(app, request.endpoint, model, status, call, request.started)

    def _left(self) -> bool:
        """The client closed the connection (a retry would answer nobody)."""
        return self.closed

    def _answered(self, keep_alive: bool) -> None:
        """SERVING is over: close, wait until the client reads, or take the next request."""
        assert self.state in (State.SERVING, State.CLOSED), self.state
        self.task = None
        if self.state is State.CLOSED:
            return
        if not keep_alive:
            self.close()
        elif self._write_paused:
            self.state = State.DRAINING  # resume_writing takes the next
            self._idle_since = self.loop.time()
        else:
            self._take_next()

    def _write_error(self, endpoint: proxy.Endpoint, exc: GatewayError, keep_alive: bool) -> None:
        headers = {**exc.response_headers(), "Content-Type": "application/json"}
        self._write(exc.status, headers, surfaces.error_envelope(endpoint, exc), keep_alive)

    # --- a stream (gateway.proxy.stream_front) ---------------------------------------------------
    def write_raw(self, data: bytes) -> None:
        if self.transport is not None and not self.closed:
            self.transport.write(data)

    def stream_head(self, headers: dict[str, str], lines: str = "") -> bytes:
        return stream_front.head(headers, self.fronts.date(), self._keep_alive, lines)

    def streaming(self, stream: stream_front.LeanStream | None) -> None:
        self._stream = stream
        if stream is not None and self._write_paused:
            stream.pause()

    def _write(
        self,
        status: int,
        headers: dict[str, str],
        body: bytes,
        keep_alive: bool = True,
        lines: str = "",
    ) -> None:
        """Write an answer: ``headers``, then ``lines`` (more header lines, joined by CRLF)."""
        if self.transport is None or self.closed:
            return  # the client left: a plain answer is billed anyway
        head = [f"HTTP/1.1 {status} {_REASONS.get(status, '')}"]
        head += [f"{name}: {value}" for name, value in headers.items()]
        if lines:
            head.append(lines)
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
        self._stop_read_timer()
        if transport is None or self.closed:
            return
        self.state = State.CLOSED
        self.fronts.handed_over += 1
        handler = self.server()
        transport.set_protocol(handler)
        handler.connection_made(transport)
        if self._read_paused:
            transport.resume_reading()
        pending, self.buffer = bytes(self.buffer), bytearray()
        if pending and isinstance(handler, bodies.Handler):
            handler.take_over(pending)  # the request line kept for a parse error's envelope
        elif pending:
            handler.data_received(pending)

    def _check_idle(self) -> None:
        self._idle_timer = None
        if self.closed:
            return
        due = self._idle_since + KEEPALIVE_S
        if self.state is not State.SERVING and self.loop.time() >= due:
            self.close()
        else:
            self._idle_timer = self.loop.call_at(max(due, self.loop.time() + 1), self._check_idle)

    def _stop_read_timer(self) -> None:
        if self._read_timer is not None:
            self._read_timer.cancel()
            self._read_timer = None

    def _read_stalled(self) -> None:
        """A request partly in: refused with 408 (its path's envelope, when its line is in) and
        the connection closed once nothing more of it came for the configured time."""
        self._read_timer = None
        if self.closed or self.state is not State.IDLE or not self.buffer:
            return
        limit = self.app[S.CONFIG].server.request_read_timeout_s
        due = self._last_read + limit
        if self.loop.time() < due:
            self._read_timer = self.loop.call_at(due, self._read_stalled)
            return
        log.info("a request stalled for %ss: 408, closed", limit)
        error = RequestTimeout(
            f"The request was not received in whole: nothing came for {limit:g} s."
        )
        head = bytes(self.buffer[: bodies.REQUEST_LINE_MAX])
        headers = {**error.response_headers(), "Content-Type": "application/json"}
        self._write(error.status, headers, bodies.envelope_of(error, head), keep_alive=False)
        self.close()

    def close(self) -> None:
        if self.transport is not None and not self.closed:
            self.state = State.CLOSED
            self.transport.close()


@dataclass(slots=True)  # per request: not frozen, as gateway.proxy.head's Head
class Request:
    endpoint: proxy.Endpoint
    head: Head
    raw: bytes
    started: float


def _tags(headers: dict[bytes, bytes]) -> str | None:
    tags = headers.get(proxy.TAGS_HEADER.encode())
    return tags.decode() if tags is not None else None


def _forwardable(headers: dict[bytes, bytes]) -> dict[str, str]:
    """The client's headers an upstream may get (:data:`gateway.proxy.head.FORWARDED`)."""
    return {name.decode(): headers[name].decode() for name in FORWARDED if name in headers}


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
        limit = app[S.CONFIG].server.request_read_timeout_s  # for a head that stalls there
        handlers = bodies.handler_factory(server, limit)  # what a handed-over connection gets
        await web.BaseSite.start(self)
        self._server = await asyncio.get_running_loop().create_server(
            lambda: Front(app, handlers, fronts),
            self._host,
            self._port,
            backlog=self._backlog,
            reuse_address=self._reuse_address,
            reuse_port=self._reuse_port,
        )


async def on_shutdown(app: web.Application) -> None:
    await app[S.FRONTS].shutdown(app[S.CONFIG].server.shutdown_timeout_s)
