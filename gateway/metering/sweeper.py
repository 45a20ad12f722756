"""Expired holds cleared without waiting for the account's next request.

A hold expires on its own (a crashed worker never locks funds for good), but ``hold.lua`` only
clears expired holds of the account it admits a request to: an account nobody calls again would
show the crashed request's hold in its balance for good. The sweeper runs beside each usage
writer: every ``every_s`` it asks, in one pipelined round trip per thousand accounts, which
loaded accounts (those in the usage stream registry) have a hold past its expiry
(``ZRANGEBYSCORE ... LIMIT 0 1`` on each account's own slot), and runs ``sweep.lua`` on those
only. Several sweepers (several gateway hosts) are harmless: clearing is idempotent.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable
from typing import Any

from redis.asyncio import Redis

from gateway.metering.scripts import lua_source
from policies import keyspace as rk

log = logging.getLogger("modelbridge.sweeper")

PAGE = 1000
PER_CALL = 500


class HoldSweeper:
    def __init__(
        self, redis: Redis, every_s: float, clock: Callable[[], float] = time.time
    ) -> None:
        self.redis = redis
        self.every_s = every_s
        self.clock = clock
        self.cleared = 0
        self._script = redis.register_script(lua_source("sweep"))

    async def accounts(self) -> list[str]:
        pipe = self.redis.pipeline(transaction=False)
        for registry in rk.usage_registries():
            pipe.smembers(registry)
        streams = {str(s) for members in await pipe.execute() for s in members}
        return sorted(rk.account_of_stream(s) for s in streams)

    async def sweep(self) -> int:
        """Clear every expired hold now; how many."""
        now = int(self.clock())
        accounts = await self.accounts()
        cleared = 0
        for start in range(0, len(accounts), PAGE):
            page = accounts[start : start + PAGE]
            pipe = self.redis.pipeline(transaction=False)
            for account in page:
                pipe.zrangebyscore(rk.AccountKeys(account).hold_expiry, "-inf", now, 0, 1)
            due: list[Any] = await pipe.execute(raise_on_error=False)
            for account, found in zip(page, due, strict=True):
                if isinstance(found, list) and found:
                    cleared += await self._clear(account, now)
        if cleared:
            log.info("cleared %d expired holds", cleared)
        self.cleared += cleared
        return cleared

    async def _clear(self, account: str, now: int) -> int:
        ak = rk.AccountKeys(account)
        total = 0
        while True:
            keys = [ak.state, ak.hold_expiry, ak.hold_values]
            n = int(await self._script(keys=keys, args=[now, PER_CALL]))
            total += n
            if n < PER_CALL:
                return total

    async def run(self, stop: asyncio.Event) -> None:
        while not stop.is_set():
            try:
                await self.sweep()
            except Exception as exc:  # a store away: the writer says so; try again next time
                log.debug("hold sweep failed: %r", exc)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), self.every_s)
