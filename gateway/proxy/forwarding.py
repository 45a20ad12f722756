"""The proxy API's upstream side: a held request goes to the provider, attempt by attempt, and
its answer is relayed, priced and settled.

Each attempt goes to the target its route holds (:mod:`gateway.proxy.routing`). A failure worth a
retry (a connect error, a timeout before the first byte, a 429/500/502/503/504/529) moves the
route on to another deployment, then to the fallback models, **only while nothing of the answer
has reached the client**: a plain answer is read whole before anything is written, a stream's
first bytes are read before the client's 200 goes out. Any other error status goes back as it
is; a stream cut after its first byte is not retried (the client gets an error event and what was
streamed is billed as estimated), nor is a request whose client has left (the hold is released).
However many attempts: one hold, one settle, one usage record.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable
from typing import Any

import aiohttp
import orjson
from aiohttp import web

from gateway import state as S
from gateway.errors import (
    ClientGone,
    GatewayError,
    InvalidRequest,
    UpstreamFailed,
    UpstreamTimeout,
)
from gateway.metering.meter import SettleResult
from gateway.proxy import handlers
from gateway.proxy.exchange import forwarded_headers, malformed
from gateway.proxy.handlers import (
    CHAT,
    COMPLETION,
    EMBEDDING,
    Call,
    Endpoint,
    Plain,
    base_headers,
    count,
    estimate,
    price,
    rate_headers,
    settle,
    settle_ask,
    upstream_body,
    upstream_error,
)
from gateway.proxy.routing import allowed_models, count_attempt, count_fallback
from gateway.proxy.streaming import SSERelay, StreamOutcome, error_body, relay
from gateway.upstream.upstreams import UpstreamRequest
from policies.money import format_usd
from policies.translate import usage as usage_mod


# --- routing: the next attempt ----------------------------------------------------------------
async def retry(call: Call, exc: UpstreamFailed) -> bool:
    """After a failed attempt: move the call to the next target of its route (True), or leave it
    (False: ``exc`` goes to the client). Counts the attempt either way."""
    app, route = call.app, call.route
    assert route is not None
    failed = route.target
    now = app[S.CLOCK].now()  # a cooldown runs from the failure, not from the request's start
    if exc.retryable:
        app[S.ROUTER].failed(failed, now)
    moved = exc.retryable and not client_left(call) and await _next_target(call, now)
    count_attempt(app[S.METRICS], failed, failed=True, last=not moved)
    return moved


def client_left(call: Call) -> bool:
    """The client closed its connection: no other attempt is made for nobody (the error goes
    back unread and the hold is released)."""
    if call.request is not None:
        transport = call.request.transport
        return transport is None or transport.is_closing()
    return call.left is not None and call.left()


async def _next_target(call: Call, now: float) -> bool:
    app, route = call.app, call.route
    assert route is not None
    router = app[S.ROUTER]
    entered = stage = route.stage
    while (target := router.advance(route, now)) is not None:
        if route.stage != stage:  # on to a fallback model, if the key may use it
            stage = route.stage
            if target.served.name not in await allowed_models(call):
                router.skip_stage(route)
                continue
        call.model, call.exchange, call.translated = target.model, target.exchange, None
        try:
            target.exchange.prepare(call)  # this deployment's protocol (may translate)
        except InvalidRequest:
            router.skip_stage(route)  # the request does not translate for this model
            continue
        if route.stage != entered:
            count_fallback(app[S.METRICS], call.model.name, target)
        route.attempts += 1
        return True
    return False


# --- plain answers ----------------------------------------------------------------------------
async def forward(call: Call) -> web.StreamResponse:
    if call.stream:
        return await forward_stream(call)
    assert call.request is not None
    plain = await ask_upstream(call)
    headers = {**plain.headers, **rate_headers(call)}
    answer = web.Response(body=plain.body, status=200, headers=headers)
    settled = await settle_plain(call, plain)
    try:
        with contextlib.suppress(ConnectionError, RuntimeError):  # a client gone is billed anyway
            await answer.prepare(call.request)
            await answer.write_eof()
    finally:
        await settled  # sent already: its result is awaited (or it is kept) whatever happened
    return answer


async def ask_upstream(call: Call) -> Plain:
    """Make a plain call (the first attempt built ahead in ``call.wire``), retried along its
    route, and price the answer."""
    while True:
        try:
            plain = await ask_once(call)
        except UpstreamFailed as exc:
            if not await retry(call, exc):
                raise
            handlers.prepare_upstream(call)
            continue
        assert call.route is not None
        count_attempt(call.app[S.METRICS], call.route.target, failed=False, last=True)
        return plain


async def ask_once(call: Call) -> Plain:
    app = call.app
    started = time.perf_counter()
    try:
        response = await app[S.UPSTREAMS].call(call.model.upstream, call.wire)
    finally:  # a failed attempt's wait is upstream time too, not the gateway's overhead
        call.upstream_s += time.perf_counter() - started
    if response.status >= 400:
        app[S.METRICS].child(app[S.METRICS].ttfb, call.model.name).observe(response.ttfb_s)
        raise upstream_error(response.status, response.body, call.model.upstream)
    raw = response.body
    if call.exchange.native:
        tokens, texts = usage_mod.from_chat(_usage_of(raw)), None
    else:
        answer = call.exchange.answer(call, raw)
        raw, tokens, texts = answer.body, answer.tokens, answer.texts
    source = "upstream"
    if tokens is None:
        tokens, source = estimate(call, _texts_of(raw) if texts is None else texts), "estimated"
    charge = price(call, tokens)
    headers = base_headers(call)
    headers["x-modelbridge-cost-usd"] = format_usd(charge.charged)
    headers["Content-Type"] = "application/json"
    return Plain(raw, headers, tokens, source, charge, response.ttfb_s)


async def settle_plain(call: Call, plain: Plain) -> Awaitable[None]:
    """Settle a plain call before its answer is written; the caller writes it, then awaits what
    this returns. The settle is sent on the open script connection first, so Redis has it before
    the client can send its next request, to this process or to any other replica: that request
    is held after this one's actual cost (a soft limit sees its spend, a hard one no longer its
    worst case). With no lean connection open the settle is made here, as for streams. Never
    raises: a settle Redis does not take is kept and sent later."""
    metering = call.app[S.METERING]
    ask = settle_ask(call, plain.tokens, plain.source, 200, plain.charge)
    pending = metering.settle_sent(ask)
    if pending is None:
        await metering.settle(ask)
    return _settled(call, plain, pending)


async def _settled(call: Call, plain: Plain, pending: Awaitable[SettleResult] | None) -> None:
    """After the answer: the settle's result (kept when Redis did not take it), the metrics."""
    if pending is not None:
        await pending
    metrics = call.app[S.METRICS]
    metrics.observe(metrics.child(metrics.ttfb, call.model.name), plain.ttfb_s)
    count(call, plain.tokens, plain.charge)


def _usage_of(raw: bytes) -> dict[str, Any] | None:
    try:
        payload = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:  # a 200 that is not JSON: 502, nothing charged
        raise malformed("not JSON") from exc
    if isinstance(payload, dict):
        usage = payload.get("usage")
        return usage if isinstance(usage, dict) else None
    return None


def _texts_of(raw: bytes) -> list[str]:
    texts: list[str] = []
    with contextlib.suppress(orjson.JSONDecodeError, AttributeError, TypeError):
        for choice in orjson.loads(raw).get("choices") or ():
            message = choice.get("message") or {}
            texts.append(message.get("content") or choice.get("text") or "")
    return texts


# --- streams ----------------------------------------------------------------------------------
async def forward_stream(call: Call) -> web.StreamResponse:
    while True:
        started = time.perf_counter()
        try:
            response, first = await _open_stream(call)
        except UpstreamFailed as exc:
            call.upstream_s += time.perf_counter() - started
            if not await retry(call, exc):
                raise
            continue
        try:
            return await _relay_stream(call, response, started, first)
        finally:
            response.release()


async def _open_stream(call: Call) -> tuple[aiohttp.ClientResponse, bytes]:
    """Start the stream on the call's target and read its first bytes: until then nothing has
    reached the client, and a failure may be retried elsewhere."""
    app = call.app
    upstreams, model, exchange = app[S.UPSTREAMS], call.model, call.exchange
    path = upstreams.path(model.upstream, exchange.route, model.upstream_model)
    body = upstream_body(call, True) if exchange.native else exchange.body(call, True)
    req = UpstreamRequest(model.upstream, path, body, True, forwarded_headers(call))
    started = time.perf_counter()
    response = await upstreams.send(req)
    app[S.METRICS].child(app[S.METRICS].ttfb, model.name).observe(time.perf_counter() - started)
    try:
        if response.status >= 400:
            raw = await error_body(response, _max_bytes(call))
            raise upstream_error(response.status, raw, model.upstream)
        return response, await _first_bytes(call, response)
    except BaseException:
        response.release()
        raise


async def _first_bytes(call: Call, response: aiohttp.ClientResponse) -> bytes:
    upstream = call.model.upstream
    try:
        first = await response.content.readany()
    except TimeoutError as exc:
        error: UpstreamFailed = UpstreamTimeout(f"upstream {upstream} sent no byte in time")
        error.retryable = True
        raise error from exc
    except aiohttp.ClientError as exc:
        error = UpstreamFailed(f"upstream {upstream} broke before its first byte")
        error.retryable = True
        raise error from exc
    if not first:
        error = UpstreamFailed(f"upstream {upstream} ended the stream before its first byte")
        error.retryable = True
        raise error
    return first


def _max_bytes(call: Call) -> int:
    return call.app[S.CONFIG].upstreams[call.model.upstream].max_response_bytes


async def _relay_stream(
    call: Call, response: aiohttp.ClientResponse, started: float, first: bytes
) -> web.StreamResponse:
    wants_usage = bool((call.body.get("stream_options") or {}).get("include_usage"))
    client = web.StreamResponse(status=200, headers={**base_headers(call), **rate_headers(call)})
    client.content_type = "text/event-stream"
    client.headers["Cache-Control"] = "no-cache"
    assert call.request is not None  # streams are served by aiohttp
    assert call.route is not None
    try:
        await client.prepare(call.request)
    except (ConnectionError, RuntimeError) as exc:  # the client left as the answer began
        count_attempt(call.app[S.METRICS], call.route.target, failed=False, last=True)
        raise ClientGone("the client closed the connection before its stream began") from exc
    sse = SSERelay(not wants_usage) if call.exchange.native else call.exchange.relay(call)
    try:
        outcome = await relay(response, client, sse, _max_bytes(call), first)
    except asyncio.CancelledError:
        # Shutdown cancelled the stream: bill what was streamed, then let the cancel go on.
        response.close()
        await settle(call, estimate(call, sse.outcome.streamed_text()), "estimated", 499)
        raise
    call.upstream_s += time.perf_counter() - started
    if outcome.upstream_failed:  # cut after its first byte: not retried, the target failed
        call.app[S.ROUTER].failed(call.route.target, call.app[S.CLOCK].now())
    count_attempt(call.app[S.METRICS], call.route.target, outcome.upstream_failed, last=True)
    await finish_stream(call, client, outcome)
    return client


async def finish_stream(call: Call, client: web.StreamResponse, outcome: StreamOutcome) -> None:
    """Bill a finished stream — the provider's usage, else tiktoken on what was streamed (the
    client left, or the provider reported none), nothing when it failed before any text — and
    end the client's stream. As for plain answers, the settle is sent before the end goes out.
    Nothing here raises once the 200 has started: a settle Redis does not take is kept by the
    metering (and applied when Redis answers); a release that fails leaves the hold to expire."""
    metering = call.app[S.METERING]
    tokens = None if outcome.client_gone else outcome.tokens or usage_mod.from_chat(outcome.usage)
    pending: Awaitable[SettleResult] | None = None
    if tokens is None and outcome.upstream_failed and not outcome.streamed_text():
        await handlers.release_quietly(call)
        call.hold = None
    else:
        source = "upstream" if tokens is not None else "estimated"
        tokens = tokens or estimate(call, outcome.streamed_text())
        charge = price(call, tokens)
        ask = settle_ask(call, tokens, source, 499 if outcome.client_gone else 200, charge)
        pending = metering.settle_sent(ask)
        if pending is None:  # no open script connection: wait for the settle (or its keeping)
            await metering.settle(ask)
        count(call, tokens, charge)
    if not outcome.client_gone:
        with contextlib.suppress(ConnectionError, RuntimeError):
            if outcome.upstream_failed:
                # SDKs raise on an event carrying "error"; never end a broken stream as if whole.
                await client.write(outcome.broken)
            await client.write_eof()
    if pending is not None:
        await pending


# --- the entry points -------------------------------------------------------------------------
async def proxy(request: web.Request, endpoint: Endpoint) -> web.StreamResponse:
    app = request.app
    started = time.perf_counter()
    app[S.METRICS].add(app[S.METRICS].inflight)
    model_label = "other"
    status = 500
    call: Call | None = None
    try:
        call = await handlers.begin(request, endpoint)
        model_label = call.model.name
        call.hold = await handlers.place_hold(call)
        try:
            response = await forward(call)
        except BaseException:
            await handlers.release_quietly(call)
            raise
        status = response.status
        return response
    except GatewayError as exc:
        status = exc.status
        handlers.count_refusal(app, exc)
        if call is not None:
            handlers.annotate(exc, call)
        raise
    finally:
        handlers.observe(app, endpoint, model_label, status, call, started)


async def chat_completions(request: web.Request) -> web.StreamResponse:
    return await proxy(request, CHAT)


async def completions(request: web.Request) -> web.StreamResponse:
    return await proxy(request, COMPLETION)


async def embeddings(request: web.Request) -> web.StreamResponse:
    return await proxy(request, EMBEDDING)
