"""Store outages in the log: one warning line when PostgreSQL or Redis stops answering, one line
when it answers again, whatever the number of requests and background tasks that meet it.

Whoever meets a store's connection failure reports it (:meth:`Outages.failed`): the error
middleware (which answers 503 ``gateway_unavailable``, not 500), ``/readyz`` and ``/metrics``,
and asyncpg's pool, whose "failed to restore the pool connection floor" warnings come with a
traceback every second or two: :meth:`Outages.filter` takes them off its logger. While a store is
down, :meth:`Outages.probe` asks it every second and logs its return with the outage's length.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sys
import time
from collections.abc import Awaitable, Callable

import asyncpg
from redis import exceptions as redis_errors

from gateway.errors import GatewayError, StoreUnavailable

log = logging.getLogger("modelbridge.stores")

NAMES = {"postgresql": "PostgreSQL", "redis": "Redis"}
POOL_LOGGER = "asyncpg.pool"

_POSTGRES_DOWN: tuple[type[BaseException], ...] = (
    asyncpg.PostgresConnectionError,
    asyncpg.CannotConnectNowError,  # starting up, shutting down, recovering
    ConnectionError,  # refused, reset: what asyncpg raises as is
)
_REDIS_DOWN = (redis_errors.ConnectionError, redis_errors.TimeoutError)


def store_of(exc: BaseException) -> str | None:
    """The store whose connection failure ``exc`` is, if it is one (an upstream's is not)."""
    if isinstance(exc, _REDIS_DOWN):
        return "redis"
    # aiohttp is not imported where it is not used (the usage writer): none of its errors there
    aiohttp = sys.modules.get("aiohttp")
    if aiohttp is not None and isinstance(exc, aiohttp.ClientError):
        return None
    if isinstance(exc, _POSTGRES_DOWN):
        return "postgresql"
    return None


def unavailable(outages: Outages, exc: BaseException) -> GatewayError | None:
    """What a store's connection failure that escaped a handler answers: the store is down, not
    the request wrong (503 ``gateway_unavailable``; one log line per outage). None for any
    other exception: a bug, for the caller to log and answer 500."""
    store = store_of(exc)
    if store is None:
        return None
    outages.failed(store, exc)
    log.debug("%s unreachable: %r", store, exc)
    return StoreUnavailable("The gateway's store is unreachable; retry.")


def _brief(exc: BaseException) -> str:
    text = " ".join(str(exc).split())[:200]
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


class Outages:
    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._since: dict[str, float] = {}

    def down(self) -> list[str]:
        return sorted(self._since)

    def failed(self, store: str, exc: BaseException | str) -> None:
        if store in self._since:
            return
        self._since[store] = self._clock()
        reason = exc if isinstance(exc, str) else _brief(exc)
        log.warning("%s unreachable: %s (logged once until it is back)", NAMES[store], reason)

    def answered(self, store: str) -> None:
        since = self._since.pop(store, None)
        if since is not None:
            log.warning("%s is back after %.1f s", NAMES[store], self._clock() - since)

    def filter(self, record: logging.LogRecord) -> bool:
        """For asyncpg's pool logger: a connection failure becomes this outage's one line."""
        exc = record.exc_info[1] if record.exc_info else None
        if exc is not None and store_of(exc) == "postgresql":
            self.failed("postgresql", exc)
            return False
        return True

    async def probe(self, asks: dict[str, Callable[[], Awaitable[object]]]) -> None:
        """Until cancelled: every second, ask each store that is down whether it answers."""
        while True:
            await asyncio.sleep(1.0)
            for store in self.down():
                with contextlib.suppress(Exception):
                    async with asyncio.timeout(2):
                        await asks[store]()
                    self.answered(store)
