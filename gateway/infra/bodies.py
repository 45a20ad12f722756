"""Request bodies and malformed requests on aiohttp's path, the same for every route.

:func:`read_body` reads a body whole (:func:`decode_json` makes it the JSON object a route takes): its content coding checked (415 when not served), capped at
``server.max_body_bytes`` as sent *and* as decoded (413), decoded by
:func:`policies.codings.decode`, which never holds more than the cap (a zip bomb stops there,
whatever its ratio); a body that does not decode is 400; one of which nothing more comes for
``server.request_read_timeout_s`` is 408 with ``Connection: close`` (the lean front answers a
request it holds in part the same way); a body aiohttp's parser refuses mid-way
(a later chunk that is not one: :meth:`Handler._fail_body`) is 400 with ``Connection: close``; a
client that leaves mid-body is :class:`~gateway.errors.ClientGone` (no answer, no traceback).

:class:`Handler` is aiohttp's connection handler with these changes: it leaves bodies coded (aiohttp
would decode them in steps of its own, several times the cap in memory), and a request it cannot
parse is answered in its path's error envelope (Anthropic's below ``/v1/messages``, OpenAI's
elsewhere) and logged as one line at INFO, not as a traceback at ERROR. aiohttp's parser refuses
such a request before any route is known; its path is read, on that error path only, from the
request line of the bytes the lean front handed over (:meth:`Handler.take_over`): it hands a
connection over at a request boundary, with the whole head when it has one, so that line is the
refused request's when it is the first aiohttp parses. For a later request on a connection
aiohttp serves (or a request line that names no path) the envelope stays OpenAI's. A request
whose head parsed but whose body the parser refuses in a later packet is a route's by then: its
body fails with the parse error (:meth:`Handler.data_received`; aiohttp's C parser would leave it
waiting for ever) and :func:`read_body` answers it, in the route's envelope.

A head that stalls on aiohttp's path (one over the lean front's 16 KiB, handed over in part; a
later request's, on a connection aiohttp serves) is refused as the lean front refuses one: once
nothing more of it came for ``server.request_read_timeout_s``, 408 ``request_timeout`` in its
path's envelope (read from its first bytes, best effort on a later request), ``Connection:
close``, one line at INFO, the connection closed (:meth:`Handler._head_stalled`; aiohttp itself
would hold it until its keep-alive timeout, an hour). A head that comes while the request before
it is still in service is refused once that one is answered. Not timed (telling the head's bytes
from that request's takes the parser's state, which aiohttp's C parser keeps to itself): the
bytes that came in the packet that ended the request before (its head or its body), or while a
whole request waited behind the one in service; a head begun there waits for aiohttp's
keep-alive timeout as before.
"""

from __future__ import annotations

import asyncio
import logging
from email.utils import formatdate
from typing import Any
from urllib.parse import unquote

import orjson
from aiohttp import web
from aiohttp.http import SERVER_SOFTWARE
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from aiohttp.web_protocol import RequestHandler, RequestPayloadError, _ErrInfo

from gateway.errors import (
    ClientGone,
    GatewayError,
    InvalidRequest,
    PayloadTooLarge,
    RequestTimeout,
    UnsupportedEncoding,
)
from policies import codings
from policies.translate.errors import anthropic_error

log = logging.getLogger("modelbridge.http")
REQUEST_LINE_MAX = 8192  # of the bytes handed over, kept for an error's path (aiohttp's 8190)


def check_coding(request: web.BaseRequest) -> str:
    """The body's content coding, or 415."""
    try:
        return codings.content_coding(request.headers.getall("Content-Encoding", ()))
    except codings.UnsupportedCoding as exc:
        raise UnsupportedEncoding(str(exc)) from exc


async def read_body(
    request: web.BaseRequest, max_bytes: int, read_timeout_s: float = 60.0
) -> bytes:
    """The whole body, decoded; see the module docstring for the refusals."""
    coding = check_coding(request)
    too_large = PayloadTooLarge(f"request body larger than {max_bytes} bytes")
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    chunks: list[bytes] = []
    size = 0
    try:
        while True:  # aiohttp's request.read(), with a limit on a wait for more
            async with asyncio.timeout(read_timeout_s):
                chunk = await request.content.readany()
            if not chunk:
                break
            size += len(chunk)
            if size > max_bytes:
                raise too_large
            chunks.append(chunk)
    except TimeoutError as exc:
        log.info("body from %s stalled for %ss: 408", request.remote, read_timeout_s)
        if isinstance(request.protocol, Handler):
            request.protocol.stop_lingering()  # closed after the answer, not 10 s later
        raise RequestTimeout(
            f"The request body was not received in whole: nothing came for {read_timeout_s:g} s.",
            headers={"Connection": "close"},
        ) from exc
    except (RequestPayloadError, ConnectionError) as exc:
        raise ClientGone("the client closed the connection mid-body") from exc
    except HttpProcessingError as exc:  # a later packet of the body refused (Handler.data_received)
        log.info("malformed body from %s: %s", request.remote, _one_line(exc))
        raise InvalidRequest(
            f"Malformed HTTP request: {_one_line(exc)}", headers={"Connection": "close"}
        ) from exc
    raw = b"".join(chunks)
    try:
        return codings.decode(raw, coding, max_bytes)
    except codings.TooLarge as exc:
        raise too_large from exc
    except codings.BadCoding as exc:
        raise InvalidRequest(f"The request body could not be decoded: {exc}.") from exc


def decode_json(body: bytes) -> dict[str, Any]:
    """A decoded body as the JSON object every route takes (else 400, in the same words on the
    proxy's routes and the management API's)."""
    try:
        value = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise InvalidRequest("The request body is not valid JSON.") from exc
    if not isinstance(value, dict):
        raise InvalidRequest("The request body must be a JSON object.")
    return value


def _one_line(exc: BaseException | None) -> str:
    text = exc.message if isinstance(exc, HttpProcessingError) else str(exc or "")
    return " ".join(str(text).split())[:200]


class Handler(RequestHandler):
    """aiohttp's handler, answering what it cannot parse in its path's envelope, with a one-line
    log, and a head that stalls for ``read_timeout_s`` with 408."""

    handed = b""  # the start of what the lean front had read when it handed the connection over
    # The body of the last request parsed, until it is known whole (None then, and before the
    # first request): a byte that comes after is a head's.
    _body: StreamReader | None = None
    # A head partly in: the timer that refuses it once nothing more came for read_timeout_s
    # (None while there is none), when its last bytes came, and its first bytes (the envelope's).
    _head_timer: asyncio.TimerHandle | None = None
    _head_read = 0.0
    _head = b""

    def __init__(self, manager: web.Server, *, read_timeout_s: float, **kwargs: Any) -> None:
        """``read_timeout_s``: ``server.request_read_timeout_s``; the rest is aiohttp's."""
        super().__init__(manager, **kwargs)
        self.read_timeout_s = read_timeout_s

    def take_over(self, pending: bytes) -> None:
        """Serve ``pending``, what the lean front read before it handed the connection over at a
        request boundary; its first line is kept for the envelope of an error (nothing else)."""
        self.handed = pending[:REQUEST_LINE_MAX]
        self.data_received(pending)

    def stop_lingering(self) -> None:
        """Close the connection right after the answer: aiohttp otherwise reads (and drops) the
        rest of an unread body for up to 10 s first, which a stalled body will not send."""
        self._lingering_time = 0.0

    def data_received(self, data: bytes) -> None:
        """aiohttp's, and a body the parser refuses mid-way failed (see :meth:`_fail_body`), a
        head that comes in part timed (:meth:`_partial_head`). A packet of a body costs two
        reads and a call here."""
        super().data_received(data)
        messages = self._messages  # empty, or the requests waiting: one read on the fast exit
        if messages:
            message, last = messages[-1]
            self._body = None if last.is_eof() else last
            if self._head_timer is not None:  # the head it timed is in
                self._stop_head_timer()
            if isinstance(message, _ErrInfo):
                self._fail_body()
        elif (body := self._body) is None:  # past the last body: a head's bytes
            if data:
                self._partial_head(data)
        elif body.is_eof():  # this packet ended it (what came after it in the packet: not timed)
            self._body = None

    def connection_lost(self, exc: BaseException | None) -> None:
        self._stop_head_timer()
        super().connection_lost(exc)

    def _partial_head(self, data: bytes) -> None:
        """``data``, past the body of the last request parsed and no request in it: the start of
        a head, or more of it. Timed from its last bytes; its first ones kept for the envelope
        (on a connection handed over, the same as :attr:`handed`; on a later request, best
        effort). Not on a connection closing or switched to another protocol."""
        if self._close or self._force_close or self._upgraded:
            return
        self._head_read = self._loop.time()
        if self._head_timer is None:
            self._head = data[:REQUEST_LINE_MAX]
            due = self._head_read + self.read_timeout_s
            self._head_timer = self._loop.call_at(due, self._head_stalled)
        elif len(self._head) < REQUEST_LINE_MAX:
            self._head += data[: REQUEST_LINE_MAX - len(self._head)]

    def _head_stalled(self) -> None:
        """Nothing more of a head for ``read_timeout_s``: once aiohttp waits for it (the request
        before it answered; until then, looked at again every ``read_timeout_s``), 408 in its
        path's envelope as the lean front writes it (no request parsed: written as it is), one
        line at INFO, and the connection closed."""
        self._head_timer = None
        transport = self.transport
        if transport is None or self._close or self._force_close or self._messages:
            return
        limit = self.read_timeout_s
        now = self._loop.time()
        due = self._head_read + limit
        waiter = self._waiter  # a future while aiohttp waits for the next request
        if now < due:  # more of it came meanwhile: due from its last bytes
            self._head_timer = self._loop.call_at(due, self._head_stalled)
            return
        if self._request_in_progress or waiter is None or waiter.done():
            self._head_timer = self._loop.call_at(now + limit, self._head_stalled)
            return
        log.info("head from %s stalled for %ss: 408, closed", _remote(transport), limit)
        error = RequestTimeout(
            f"The request was not received in whole: nothing came for {limit:g} s.",
            headers={"Connection": "close"},
        )
        body = envelope_of(error, self._head)
        headers = {
            **error.response_headers(),
            "Content-Type": "application/json",
            "Content-Length": str(len(body)),
            "Date": formatdate(usegmt=True),
            "Server": SERVER_SOFTWARE,
        }
        head = "".join(f"{name}: {value}\r\n" for name, value in headers.items())
        transport.write(f"HTTP/1.1 408 Request Timeout\r\n{head}\r\n".encode("latin-1") + body)
        self.force_close()

    def _stop_head_timer(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _fail_body(self) -> None:
        """When the parser refuses a packet in the middle of a request's body (a later chunk that
        is not one), aiohttp queues the error as a request of its own and leaves that body
        waiting for bytes that never come: its C parser drops the body without failing it, and
        the request in service waits for it (forever: no timeout runs while a handler does).
        Here the body fails with the parse error instead (:func:`read_body` answers it: 400 in
        its path's envelope, ``Connection: close``), at its end (aiohttp lingers on no more of
        it), the error queued is dropped (it is that request's answer) and the connection closes
        after it. The body is the last request's parsed before the error, waiting or in service;
        one complete (the error is in a later head) is left alone: the error is answered as
        queued."""
        messages = self._messages
        error = messages[-1][0]
        assert isinstance(error, _ErrInfo)
        if len(messages) > 1:
            body = messages[-2][1]
        elif self._current_request is not None:
            body = self._current_request.content
        else:
            return  # the last request answered already, its body left unread: aiohttp lingers
        if body.is_eof():
            return
        body.set_exception(error.exc)
        body.feed_eof()
        messages.pop()
        self.close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500 or not isinstance(exc, HttpProcessingError):
            return super().handle_error(request, status, exc, message)
        if request.writer.output_size > 0:
            raise ConnectionError("the response was sent already")
        log.info("malformed request from %s: %s", request.remote, _one_line(exc))
        error = InvalidRequest(f"Malformed HTTP request: {_one_line(exc)}", status=status)
        response = web.Response(
            body=envelope_of(error, self._refused_head()),
            status=error.status,
            content_type="application/json",
            headers=error.response_headers(),  # x-modelbridge-error-code, as on every error
        )
        response.force_close()
        return response

    def _refused_head(self) -> bytes:
        """The start of the refused request when it is the first aiohttp parsed on this
        connection (the one :attr:`handed` starts with; a parse error drops the requests read
        with it), else nothing: then no path is known."""
        return self.handed if getattr(self, "_request_count", 0) == 1 else b""


def _remote(transport: asyncio.BaseTransport) -> str:
    """The client's address, as ``request.remote`` gives it."""
    peer = transport.get_extra_info("peername")
    return str(peer[0] if isinstance(peer, tuple) and peer else peer)


def request_path(head: bytes) -> str | None:
    """The path of the request line ``head`` starts with (method, target, version, one space
    between each, the version unchecked), percent-decoded (UTF-8, as yarl decodes it); None when
    the line names none."""
    line = head.split(b"\n", 1)[0].removesuffix(b"\r")
    parts = line.split(b" ")
    if len(parts) != 3 or not parts[1].startswith(b"/"):
        return None
    target = parts[1].split(b"#", 1)[0].split(b"?", 1)[0]
    return unquote(target.decode("latin-1"))


def anthropic_path(path: str) -> bool:
    """A path of Anthropic's Messages API, whose errors are in Anthropic's envelope."""
    return path == "/v1/messages" or path.startswith("/v1/messages/")


def envelope_of(error: GatewayError, head: bytes) -> bytes:
    """``error`` in the envelope of the request whose line ``head`` starts with: Anthropic's
    below ``/v1/messages``, else (or with no path to read) OpenAI's."""
    path = request_path(head)
    if path is not None and anthropic_path(path):
        return orjson.dumps(anthropic_error(error.status, error.message))
    return orjson.dumps(error.body())


def handler_factory(server: web.Server, read_timeout_s: float) -> Any:
    """What makes a connection's :class:`Handler` (as ``server()`` makes aiohttp's own), one
    that refuses a head of which nothing more came for ``read_timeout_s`` seconds
    (``server.request_read_timeout_s``)."""
    kwargs = getattr(server, "_kwargs", None)
    loop = getattr(server, "_loop", None)
    if kwargs is None or loop is None:  # another aiohttp: its own handler, as it was
        return server

    def make() -> RequestHandler:
        options = {**kwargs, "auto_decompress": False}
        return Handler(server, loop=loop, read_timeout_s=read_timeout_s, **options)

    return make
