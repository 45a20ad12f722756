"""Typed application state: every ``web.AppKey`` of the gateway, declared in this one module.

A leaf: it imports the types of what it holds for type checking only, so any module may import
it without pulling in the rest of the gateway.

Pools and background tasks are opened in ``app.cleanup_ctx`` (see :mod:`gateway.app`); nothing
lives in module globals.
"""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    import asyncpg
    from redis.asyncio import Redis

    from gateway.config import Config
    from gateway.infra.metrics import Metrics
    from gateway.infra.outages import Outages
    from gateway.infra.redisconn import RedisLink
    from gateway.metering.accounts import Accounts
    from gateway.metering.meter import Metering
    from gateway.proxy.front import Fronts
    from gateway.proxy.keycache import KeyCache
    from gateway.proxy.routing import Router
    from gateway.proxy.tokens import TokenCounter
    from gateway.teams.alerts import AlertWorker, WebhookGuard
    from gateway.upstream.upstreams import Upstreams


@dataclass
class Clock:
    """The gateway's time. Tests set ``fixed`` (or ``offset``) to cross month boundaries."""

    fixed: float | None = None
    offset: float = 0.0

    def now(self) -> float:
        return self.fixed if self.fixed is not None else time.time() + self.offset


class RequestIds:
    """Request ids, unique across processes and restarts: 64 random bits drawn once per process,
    then a counter (no system call per request). Not secrets."""

    def __init__(self) -> None:
        self._prefix = "req_" + secrets.token_hex(8)
        self._counter = itertools.count(1)

    def new(self) -> str:
        return f"{self._prefix}{next(self._counter):012x}"


@dataclass(frozen=True)
class Runtime:
    """Values fixed at start: the store URLs and the operator token."""

    database_url: str
    redis_url: str
    admin_token: str
    worker_id: str = "0"
    data_dir: str = ""  # where this process keeps its settle journal ("" = memory only)


REQUEST_ID = web.RequestKey("request_id", str)  # management requests; the proxy keeps its own

CONFIG: web.AppKey[Config] = web.AppKey("config")
REQUEST_IDS = web.AppKey("request_ids", RequestIds)
RUNTIME = web.AppKey("runtime", Runtime)
FRONTS: web.AppKey[Fronts] = web.AppKey("fronts")
CLOCK = web.AppKey("clock", Clock)
DB: web.AppKey[asyncpg.Pool] = web.AppKey("db")
REDIS: web.AppKey[Redis] = web.AppKey("redis")
REDIS_LINK: web.AppKey[RedisLink] = web.AppKey("redis_link")
OUTAGES: web.AppKey[Outages] = web.AppKey("outages")
METERING: web.AppKey[Metering] = web.AppKey("metering")
ACCOUNTS: web.AppKey[Accounts] = web.AppKey("accounts")
KEYS: web.AppKey[KeyCache] = web.AppKey("key_cache")
UPSTREAMS: web.AppKey[Upstreams] = web.AppKey("upstreams")
ROUTER: web.AppKey[Router] = web.AppKey("router")  # this process's routing plans and cooldowns
TOKENS: web.AppKey[TokenCounter] = web.AppKey("tokens")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
ALERTS: web.AppKey[AlertWorker] = web.AppKey("alerts")
WEBHOOKS: web.AppKey[WebhookGuard] = web.AppKey("webhooks")
