"""The client surfaces of contract section 9 besides Chat Completions: Anthropic's Messages API
(``POST /v1/messages``, ``POST /v1/messages/count_tokens``) and OpenAI's Responses API
(``POST /v1/responses``; ``GET /v1/responses`` asking for a WebSocket gets 426 at once).

Each generating surface goes the one way of :func:`gateway.proxy.forwarding.proxy` — key check,
hold, upstream call, settle, one usage record — with the exchange that suits the model's upstream
(:mod:`gateway.proxy.exchange`). Messages errors are in Anthropic's envelope, with the status and
``x-modelbridge-error-code`` of the gateway's error, on every path below ``/v1/messages`` (the app's
error middleware, :func:`gateway.infra.bodies.anthropic_path`; a request aiohttp cannot parse
too, :class:`gateway.infra.bodies.Handler`); an Anthropic upstream's own error answer goes back
unmodified (clients match on its wording). A plain (not streamed) call of either is served
by the lean front (:mod:`gateway.proxy.front`) with the same code and :func:`error_envelope`; the
handlers here serve what it hands over (streams, anything unusual).
"""

from __future__ import annotations

import aiohttp
import orjson
from aiohttp import web

from gateway import state as S
from gateway.credentials import bearer
from gateway.errors import GatewayError, NotFound, UpstreamFailed, UpstreamTimeout
from gateway.proxy import forwarding, handlers
from gateway.proxy.exchange import count_texts
from gateway.proxy.streaming import error_body
from gateway.upstream.provider import ANTHROPIC
from gateway.upstream.upstreams import UpstreamRequest
from policies.translate import errors as envelopes


class UpgradeRequired(GatewayError):
    status = 426
    type = "invalid_request_error"
    code = "websocket_not_supported"


def anthropic_error_body(exc: GatewayError) -> bytes:
    """A gateway error in Anthropic's envelope; a provider's own Anthropic error as it came."""
    raw = exc.upstream_body if isinstance(exc, UpstreamFailed) else b""
    try:
        parsed = orjson.loads(raw) if raw else None
    except orjson.JSONDecodeError:
        parsed = None
    if isinstance(parsed, dict) and parsed.get("type") == "error":
        return raw  # unmodified
    if parsed is not None:
        return orjson.dumps(envelopes.to_anthropic(exc.status, parsed))
    return orjson.dumps(envelopes.anthropic_error(exc.status, exc.message))


def error_envelope(endpoint: handlers.Endpoint, exc: GatewayError) -> bytes:
    """A proxy error's body in its surface's envelope: Anthropic's for the Messages API,
    OpenAI's for every other (the lean front's answers; on aiohttp's path the app's error
    middleware picks the same by path, :func:`gateway.infra.bodies.anthropic_path`)."""
    if endpoint is handlers.MESSAGES:
        return anthropic_error_body(exc)
    return orjson.dumps(exc.body())


async def messages(request: web.Request) -> web.StreamResponse:
    """Every error in Anthropic's envelope, as on the lean front (:mod:`gateway.proxy.front`):
    a store down too (503), and a bug (logged, 500), by the app's error middleware
    (:func:`gateway.infra.bodies.anthropic_path`)."""
    return await forwarding.proxy(request, handlers.MESSAGES)


async def count_tokens(request: web.Request) -> web.StreamResponse:
    """``{"input_tokens": N}``: the Anthropic upstream's count, else tiktoken's. Not charged.
    Errors in Anthropic's envelope, as for :func:`messages`."""
    app = request.app
    secret = bearer(request)
    await app[S.KEYS].lookup(secret)
    _, body = await handlers.read_json(request, app[S.CONFIG].server)
    name = body.get("model")
    model = app[S.CONFIG].models.get(name) if isinstance(name, str) else None
    if model is None:
        raise NotFound(f"The model '{name}' does not exist.", code="model_not_found")
    upstreams = app[S.UPSTREAMS]
    provider = upstreams.providers[model.upstream]
    if provider.protocol != ANTHROPIC:
        tokens = app[S.TOKENS]
        count = count_texts(tokens, "messages", model.encoding, body, model.image_tokens)
        return web.json_response({"input_tokens": count})
    path = upstreams.path(model.upstream, "/messages/count_tokens", model.upstream_model)
    data = orjson.dumps({**body, "model": model.upstream_model})
    ask = UpstreamRequest(model.upstream, path, data, False, provider.forward(request.headers))
    limit = app[S.CONFIG].upstreams[model.upstream].max_response_bytes
    response = await upstreams.send(ask)
    try:
        if response.status >= 400:
            raw = await error_body(response, limit)
            raise handlers.upstream_error(response.status, raw, model.upstream)
        answer = await _bounded(response, model.upstream, limit)
    finally:
        response.release()
    return web.Response(body=answer, content_type="application/json")


async def _bounded(response: aiohttp.ClientResponse, upstream: str, limit: int) -> bytes:
    """The provider's whole answer, at most ``limit`` bytes (its ``max_response_bytes``): past
    it a 502 ``upstream_error``, as on the other paths."""
    body = bytearray()
    try:
        async for chunk in response.content.iter_any():
            body += chunk
            if len(body) > limit:
                response.close()
                raise UpstreamFailed(
                    f"upstream {upstream} answered more than {limit} bytes (max_response_bytes)"
                )
    except TimeoutError as exc:
        raise UpstreamTimeout(f"upstream {upstream} did not answer in time") from exc
    except aiohttp.ClientError as exc:
        raise UpstreamFailed(f"upstream {upstream} broke off its answer") from exc
    return bytes(body)


async def responses(request: web.Request) -> web.StreamResponse:
    return await forwarding.proxy(request, handlers.RESPONSES)


async def responses_websocket(request: web.Request) -> web.StreamResponse:
    """Codex CLI tries a WebSocket first: refuse at once so that it falls back to HTTP."""
    if request.headers.get("Upgrade", "").lower() == "websocket":
        raise UpgradeRequired("WebSocket is not supported here: use HTTP POST /v1/responses.")
    raise web.HTTPMethodNotAllowed("GET", ["POST"])
