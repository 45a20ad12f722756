"""Request bodies and malformed requests on aiohttp's path, the same for every route.

:func:`read_body` reads a body whole (:func:`decode_json` makes it the JSON object a route takes): its content coding checked (415 when not served), capped at
``server.max_body_bytes`` as sent *and* as decoded (413), decoded by
:func:`policies.codings.decode`, which never holds more than the cap (a zip bomb stops there,
whatever its ratio); a body that does not decode is 400; a client that leaves mid-body is
:class:`~gateway.errors.ClientGone` (no answer, no traceback).

:class:`Handler` is aiohttp's connection handler with two changes: it leaves bodies coded (aiohttp
would decode them in steps of its own, several times the cap in memory), and a request it cannot
parse is answered in the OpenAI error envelope and logged as one warning line, not as a
traceback at ERROR.
"""

from __future__ import annotations

import logging
from typing import Any

import orjson
from aiohttp import web
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web_protocol import RequestHandler, RequestPayloadError

from gateway.errors import ClientGone, InvalidRequest, PayloadTooLarge, UnsupportedEncoding
from policies import codings

log = logging.getLogger("modelbridge.http")


def check_coding(request: web.BaseRequest) -> str:
    """The body's content coding, or 415."""
    try:
        return codings.content_coding(request.headers.getall("Content-Encoding", ()))
    except codings.UnsupportedCoding as exc:
        raise UnsupportedEncoding(str(exc)) from exc


async def read_body(request: web.BaseRequest, max_bytes: int) -> bytes:
    """The whole body, decoded; see the module docstring for the refusals."""
    coding = check_coding(request)
    too_large = PayloadTooLarge(f"request body larger than {max_bytes} bytes")
    if request.content_length is not None and request.content_length > max_bytes:
        raise too_large
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge as exc:
        raise too_large from exc
    except (RequestPayloadError, ConnectionError) as exc:
        raise ClientGone("the client closed the connection mid-body") from exc
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
    """aiohttp's handler, answering what it cannot parse in our envelope, with a one-line log."""

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
            body=orjson.dumps(error.body()), status=error.status, content_type="application/json"
        )
        response.force_close()
        return response


def handler_factory(server: web.Server) -> Any:
    """What makes a connection's :class:`Handler` (as ``server()`` makes aiohttp's own)."""
    kwargs = getattr(server, "_kwargs", None)
    loop = getattr(server, "_loop", None)
    if kwargs is None or loop is None:  # another aiohttp: its own handler, as it was
        return server

    def make() -> RequestHandler:
        return Handler(server, loop=loop, **{**kwargs, "auto_decompress": False})

    return make
