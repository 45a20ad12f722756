"""``/healthz`` (the process is alive), ``/readyz`` (stores reachable, migrations applied) and
``/metrics`` (Prometheus text, merged over every worker process)."""

from __future__ import annotations

import asyncio
import hmac

import orjson
from aiohttp import web

from gateway import state as S
from gateway.credentials import bearer
from gateway.errors import AuthenticationFailed
from gateway.infra.db import migrations_pending
from gateway.infra.metrics import CONTENT_TYPE
from gateway.infra.outages import store_of
from gateway.infra.redisconn import cluster_problem


def _json(body: dict[str, object], status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(body), status=status, content_type="application/json")


async def healthz(request: web.Request) -> web.Response:
    return _json({"status": "ok"})


async def _check_redis(app: web.Application) -> str | None:
    link = app[S.REDIS_LINK]
    try:
        async with asyncio.timeout(2):
            if link.cluster:
                return await cluster_problem(link)
            await link.client.ping()
    except Exception as exc:
        _failed(app, "redis", exc)
        return f"redis: {type(exc).__name__}"
    app[S.OUTAGES].answered("redis")
    return None


async def _check_db(app: web.Application) -> str | None:
    try:
        async with asyncio.timeout(2):
            async with app[S.DB].acquire() as conn:
                pending = await migrations_pending(conn)
    except Exception as exc:
        _failed(app, "postgresql", exc)
        return f"postgresql: {type(exc).__name__}"
    app[S.OUTAGES].answered("postgresql")
    return f"migrations pending: {pending}" if pending else None


def _failed(app: web.Application, store: str, exc: BaseException) -> None:
    """A check that failed: an outage (one line) when it is the store's connection or time."""
    if store_of(exc) == store or isinstance(exc, TimeoutError):
        app[S.OUTAGES].failed(store, exc if str(exc) else "no answer within 2 s")


async def readyz(request: web.Request) -> web.Response:
    problems = [
        p for p in await asyncio.gather(_check_redis(request.app), _check_db(request.app)) if p
    ]
    if problems:
        return _json({"status": "unavailable", "down": problems}, status=503)
    worker = request.app[S.RUNTIME].worker_id
    return _json({"status": "ready", "redis": "ok", "postgresql": "ok", "worker": worker})


async def metrics(request: web.Request) -> web.Response:
    """The merged metrics; first the stores are checked as for ``/readyz``, so that
    ``modelbridge_store_up`` is as fresh as the scrape."""
    token = request.app[S.CONFIG].metrics.token()
    if token and not hmac.compare_digest((bearer(request) or "").encode(), token.encode()):
        raise AuthenticationFailed("metrics token required", code="invalid_metrics_token")
    problems = await asyncio.gather(_check_redis(request.app), _check_db(request.app))
    found = request.app[S.METRICS]
    for store, problem in zip(("redis", "postgresql"), problems, strict=True):
        down = problem is not None and problem.startswith(store + ":")
        found.child(found.store_up, store).set(0 if down else 1)
    body = await found.render_off_loop()
    return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})
