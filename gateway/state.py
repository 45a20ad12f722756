"""Typed application state: every ``web.AppKey`` of the gateway, declared in this one module.

Pools and background tasks are opened in ``app.cleanup_ctx`` (see :mod:`gateway.app`); nothing
lives in module globals.
"""

from __future__ import annotations

import itertools
import secrets
import time
from dataclasses import dataclass

import asyncpg
from aiohttp import web
from redis.asyncio import Redis

from gateway.accounts import Accounts
from gateway.alerts import AlertWorker
from gateway.auth import KeyCache
from gateway.config import Config
from gateway.fronts import Fronts
from gateway.metering import Metering
from gateway.metrics import Metrics
from gateway.tokens import TokenCounter
from gateway.upstream import Upstreams


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


REQUEST_ID = web.RequestKey("request_id", str)  # management requests; the proxy keeps its own

CONFIG = web.AppKey("config", Config)
REQUEST_IDS = web.AppKey("request_ids", RequestIds)
RUNTIME = web.AppKey("runtime", Runtime)
FRONTS = web.AppKey("fronts", Fronts)
CLOCK = web.AppKey("clock", Clock)
DB = web.AppKey("db", asyncpg.Pool)
REDIS = web.AppKey("redis", Redis)
METERING = web.AppKey("metering", Metering)
ACCOUNTS = web.AppKey("accounts", Accounts)
KEYS = web.AppKey("key_cache", KeyCache)
UPSTREAMS = web.AppKey("upstreams", Upstreams)
TOKENS = web.AppKey("tokens", TokenCounter)
METRICS = web.AppKey("metrics", Metrics)
ALERTS = web.AppKey("alerts", AlertWorker)
