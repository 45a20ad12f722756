"""The aiohttp application: routes, the error middleware, and every pool opened in
``cleanup_ctx`` (PostgreSQL, Redis, upstream sessions, the usage writer, the key listener).

Shutdown runs in order (see :mod:`gateway.cli`): stop accepting, let streams finish within
``server.shutdown_timeout_s``, cancel the rest (a cancelled stream settles what it streamed),
then the contexts below close in reverse: the usage writer drains its last batch before the
pools close.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from pathlib import Path

import orjson
from aiohttp import web

from gateway import dashboard
from gateway import state as S
from gateway.api import csrf
from gateway.api import routes as api_routes
from gateway.config import Config
from gateway.errors import GatewayError, NotFound, PayloadTooLarge
from gateway.infra import bodies, health, outages
from gateway.infra.db import create_pool, migrate
from gateway.infra.metrics import Metrics
from gateway.infra.redisconn import open_redis
from gateway.metering.accounts import Accounts
from gateway.metering.changes import Outbox
from gateway.metering.incarnations import Incarnations
from gateway.metering.journal import SettleJournal
from gateway.metering.meter import Metering
from gateway.metering.scripts import Scripts
from gateway.metering.sweeper import HoldSweeper
from gateway.metering.usage_writer import UsageWriter
from gateway.proxy import catalog, forwarding, front, surfaces
from gateway.proxy.front import Fronts
from gateway.proxy.keycache import KeyCache
from gateway.proxy.routing import Router
from gateway.proxy.tokens import TokenCounter
from gateway.teams import billing
from gateway.teams.alerts import AlertWorker, WebhookGuard
from gateway.upstream.upstreams import Upstreams
from policies.holds import hold_ttl
from policies.routing import chain, longest_wait_s

log = logging.getLogger("modelbridge.app")


def error_response(
    exc: GatewayError, extra_headers: Mapping[str, str] | None = None, *, anthropic: bool = False
) -> web.Response:
    """An error of the tree in :mod:`gateway.errors`, as a JSON response in OpenAI's envelope,
    or Anthropic's (``anthropic``: a path of the Messages API, :func:`bodies.anthropic_path`)."""
    return web.Response(
        body=surfaces.anthropic_error_body(exc) if anthropic else orjson.dumps(exc.body()),
        status=exc.status,
        content_type="application/json",
        headers={**exc.response_headers(), **(extra_headers or {})},
    )


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def errors_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Every error in the envelope of its path's protocol: Anthropic's on the Messages API's
    (``/v1/messages``, ``/v1/messages/count_tokens``, any other below it), OpenAI's elsewhere."""
    if not request.path.startswith("/v1/"):  # the proxy makes its own request ids
        request[S.REQUEST_ID] = request.app[S.REQUEST_IDS].new()
    try:
        return await handler(request)
    except Exception as exc:  # a cancel (BaseException) goes on
        if isinstance(exc, web.HTTPException) and exc.status < 400:
            raise
        error, headers = _as_error(request, exc)
        return error_response(error, headers, anthropic=bodies.anthropic_path(request.path))


def _as_error(request: web.Request, exc: Exception) -> tuple[GatewayError, dict[str, str]]:
    """What the error middleware answers for ``exc``, and the headers it adds."""
    if isinstance(exc, GatewayError):
        return exc, {}
    if isinstance(exc, web.HTTPRequestEntityTooLarge):
        return PayloadTooLarge("request body too large"), {}
    if isinstance(exc, web.HTTPException):
        if exc.status == 404:
            return NotFound(f"Unknown route {request.method} {request.path}"), {}
        error = GatewayError(
            exc.reason, code=exc.reason.lower().replace(" ", "_"), status=exc.status
        )
        return error, {k: v for k, v in exc.headers.items() if k.lower() == "allow"}
    # A store unreachable while answering (a management read; a committed change's Redis write
    # is left to the account outbox): the store is down, not the request wrong. One line per
    # outage, not per request.
    unavailable = outages.unavailable(request.app[S.OUTAGES], exc)
    if unavailable is None:
        log.error("unhandled error on %s %s", request.method, request.path, exc_info=exc)
        return GatewayError("The gateway failed to handle the request.", status=500), {}
    return unavailable, {}


async def _stores(app: web.Application) -> AsyncIterator[None]:
    runtime = app[S.RUNTIME]
    app[S.DB] = await create_pool(runtime.database_url)
    async with app[S.DB].acquire() as conn:
        await migrate(conn)
    redis = app[S.CONFIG].redis
    link = await open_redis(
        runtime.redis_url,
        script_client=redis.script_client,
        wait_replicas=redis.wait_replicas,
        wait_timeout_ms=redis.wait_timeout_ms,
    )
    app[S.REDIS_LINK] = link
    app[S.REDIS] = link.client
    found = app[S.OUTAGES]
    pool_log = logging.getLogger(outages.POOL_LOGGER)
    pool_log.addFilter(found.filter)
    asks = {"postgresql": lambda: app[S.DB].fetchval("SELECT 1"), "redis": link.client.ping}
    probing = asyncio.create_task(found.probe(asks), name="store-probe")
    yield
    probing.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await probing
    await link.close()
    await app[S.DB].close()
    pool_log.removeFilter(found.filter)


async def _metering(app: web.Application) -> AsyncIterator[None]:
    config = app[S.CONFIG]
    scripts = Scripts(app[S.REDIS], app[S.REDIS_LINK].scripts)
    app[S.ACCOUNTS] = Accounts(config, app[S.DB], app[S.REDIS], scripts)
    longest = _longest_wait_s(config)
    runtime = app[S.RUNTIME]
    journal = SettleJournal(
        Path(runtime.data_dir) / "journal" if runtime.data_dir else None,
        f"w{runtime.worker_id}",
        config.metering.journal_max,
    )
    journal.open()
    metering = Metering(
        scripts, app[S.ACCOUNTS], hold_ttl(longest, config.metering.hold_margin_s), journal
    )
    metering.response_notes_s = config.metering.response_notes_s
    metering.incarnations = Incarnations(app[S.REDIS], cluster=app[S.REDIS_LINK].cluster)
    with contextlib.suppress(Exception):  # the run ids Redis has at start (else on the next look)
        await asyncio.wait_for(metering.watch(), 1.0)
    app[S.METERING] = metering
    app[S.KEYS] = KeyCache(app[S.DB], app[S.REDIS])
    await app[S.KEYS].start()
    stop = asyncio.Event()
    replaying = asyncio.create_task(metering.run(stop), name="settle-replay")
    # account changes committed but not yet in Redis: applied at start, then every few seconds
    outbox = Outbox(app[S.ACCOUNTS], app[S.CLOCK].now)
    sweeping = asyncio.create_task(outbox.run(stop), name="account-outbox")
    yield
    stop.set()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.gather(replaying, sweeping), timeout=5)
    journal.close()
    await app[S.KEYS].stop()


def _longest_wait_s(config: Config) -> float:
    """The longest a request may wait on providers (its hold outlives it): the slowest routing
    chain, each attempt up to its upstream's connect timeout and then its answer timeout."""
    fallbacks = {m.name: m.fallbacks for m in config.models.values()}
    timeouts = {name: up.connect_timeout_s + up.timeout_s for name, up in config.upstreams.items()}
    waits = [
        longest_wait_s(
            (m.retries, [timeouts[d.upstream] for d in m.deployments])
            for m in (config.models[n] for n in chain(name, fallbacks))
        )
        for name in config.models
    ]
    return max(waits, default=max(timeouts.values(), default=600.0))


async def _upstreams(app: web.Application) -> AsyncIterator[None]:
    app[S.UPSTREAMS] = Upstreams(app[S.CONFIG])
    app[S.ROUTER] = Router(app[S.CONFIG], app[S.UPSTREAMS].providers)
    await app[S.UPSTREAMS].open()
    tokens = TokenCounter()
    tokens.preload({m.encoding for m in app[S.CONFIG].models.values()})
    app[S.TOKENS] = tokens
    yield
    await app[S.UPSTREAMS].close()


async def _usage_writer(app: web.Application) -> AsyncIterator[None]:
    metrics = app[S.METRICS]
    writer = UsageWriter.configured(
        app[S.REDIS],
        app[S.DB],
        f"worker-{app[S.RUNTIME].worker_id}",
        app[S.CONFIG].metering,
        metrics.usage_pending.set,
    )
    task = asyncio.create_task(writer.run(), name="usage-writer")
    sweeper = HoldSweeper(app[S.REDIS], app[S.CONFIG].metering.sweep_every_s, app[S.CLOCK].now)
    stop = asyncio.Event()
    sweeping = asyncio.create_task(sweeper.run(stop), name="hold-sweeper")
    yield
    stop.set()
    writer.stop()
    with contextlib.suppress(Exception):
        await asyncio.wait_for(asyncio.gather(task, sweeping), timeout=10)


async def _teams_background(app: web.Application) -> AsyncIterator[None]:
    """The alert worker (webhook deliveries) and the renewal sweep."""
    worker = AlertWorker(app[S.DB], app[S.REDIS], app[S.WEBHOOKS], now=app[S.CLOCK].now)
    app[S.ALERTS] = worker
    app[S.METERING].on_alert = worker.notify
    tasks = [
        asyncio.create_task(worker.run(), name="alert-worker"),
        asyncio.create_task(
            billing.renewals(app[S.DB], app[S.CONFIG], app[S.CLOCK].now), name="renewal-sweep"
        ),
    ]
    yield
    app[S.METERING].on_alert = None
    worker.stop()
    tasks[1].cancel()
    with contextlib.suppress(Exception, asyncio.CancelledError):
        await asyncio.wait_for(asyncio.gather(*tasks), timeout=10)


async def _flush_metrics(app: web.Application) -> None:
    app[S.METRICS].flush()


def build_app(
    config: Config, runtime: S.Runtime, clock: S.Clock | None = None, *, usage_writer: bool = True
) -> web.Application:
    """The gateway. ``usage_writer=False`` when a separate writer process moves usage records
    (``modelbridge serve`` runs one, so that its batches never stall a request's event loop)."""
    app = web.Application(
        middlewares=[errors_middleware, csrf.csrf_middleware],
        client_max_size=config.server.max_body_bytes,
    )
    app[S.CONFIG] = config
    app[S.RUNTIME] = runtime
    app[S.CLOCK] = clock or S.Clock()
    app[S.OUTAGES] = outages.Outages()
    app[S.REQUEST_IDS] = S.RequestIds()
    app[S.METRICS] = Metrics(team_labels=config.metrics.team_labels)
    app[S.FRONTS] = Fronts()
    app[S.WEBHOOKS] = WebhookGuard(config.alerts.allow_private_urls)
    app.on_shutdown.append(front.on_shutdown)
    app.on_cleanup.append(_flush_metrics)  # the folded updates of the last loop step
    app.cleanup_ctx.extend([_stores, _metering, _upstreams])
    if usage_writer:
        app.cleanup_ctx.append(_usage_writer)
    app.cleanup_ctx.append(_teams_background)
    app.router.add_post("/v1/chat/completions", forwarding.chat_completions)
    app.router.add_post("/v1/completions", forwarding.completions)
    app.router.add_post("/v1/embeddings", forwarding.embeddings)
    app.router.add_post("/v1/messages", surfaces.messages)
    app.router.add_post("/v1/messages/count_tokens", surfaces.count_tokens)
    app.router.add_post("/v1/responses", surfaces.responses)
    app.router.add_get("/v1/responses", surfaces.responses_websocket)
    app.router.add_get("/v1/models", catalog.list_models)
    app.router.add_get("/v1/models/{model}", catalog.get_model)
    app.router.add_get("/healthz", health.healthz)
    app.router.add_get("/readyz", health.readyz)
    app.router.add_get("/metrics", health.metrics)
    api_routes.setup(app)
    dashboard.setup(app)
    app[S.METRICS].preset(proxied_routes(app), [*config.models, "other"])
    fallbacks = {m.name: m.fallbacks for m in config.models.values()}
    app[S.METRICS].preset_routing(
        list(config.upstreams), [(m, to) for m in fallbacks for to in chain(m, fallbacks)[1:]]
    )
    return app


def proxied_routes(app: web.Application) -> list[str]:
    """The proxy API's POST routes (the ``endpoint`` label of the request metrics)."""
    return sorted(
        {
            route.resource.canonical
            for route in app.router.routes()
            if route.method == "POST"
            and route.resource
            and route.resource.canonical.startswith("/v1/")
        }
    )
