"""The usage writer as a process of its own (``modelbridge serve`` starts one, ``python -m gateway
_writer``): its writer and hold sweeper, stopped by SIGTERM or SIGINT or by the death of the
serving process that started it."""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable

from gateway.config import MeteringConfig
from gateway.metering.usage_writer import UsageWriter


class _ParentWatch:
    """Calls ``on_exit`` when process ``parent`` exits: its pidfd becomes readable (no wake-up
    until then); where pidfd_open is missing, os.getppid() is polled every second."""

    def __init__(self, parent: int, on_exit: Callable[[], None]) -> None:
        self.loop = asyncio.get_running_loop()
        self.on_exit = on_exit
        self.fd: int | None = None
        self.task: asyncio.Task[None] | None = None
        try:
            self.fd = os.pidfd_open(parent)
        except (AttributeError, OSError):
            self.task = asyncio.create_task(self._poll(parent))
            return
        if os.getppid() != parent:  # exited before the pidfd was opened
            self.loop.call_soon(on_exit)
        self.loop.add_reader(self.fd, self._exited)

    def _exited(self) -> None:
        if self.fd is not None:
            self.loop.remove_reader(self.fd)
        self.on_exit()

    async def _poll(self, parent: int) -> None:
        while os.getppid() == parent:
            await asyncio.sleep(1.0)
        self.on_exit()

    def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
        if self.fd is not None:
            self.loop.remove_reader(self.fd)
            os.close(self.fd)
            self.fd = None


async def serve_writer(
    database_url: str, redis_url: str, consumer: str, settings: MeteringConfig | None = None
) -> None:
    """The writer as a process of its own (``modelbridge serve`` starts one): runs until
    SIGTERM or SIGINT, then drains what is left and exits."""
    import signal

    from gateway.infra.db import create_pool
    from gateway.infra.metrics import Metrics
    from gateway.infra.redisconn import open_redis
    from gateway.metering.sweeper import HoldSweeper

    settings = settings or MeteringConfig()
    metrics = Metrics()
    link = await open_redis(redis_url, script_client="redis-py")
    # No reset query on release (a round trip and four statements per batch): the writer leaves
    # no session state behind (its locks and settings are the transaction's).
    db = await create_pool(database_url, min_size=1, max_size=2, reset=False)
    writer = UsageWriter.configured(link.client, db, consumer, settings, metrics.usage_pending.set)
    sweeper = HoldSweeper(link.client, settings.sweep_every_s)
    stop_sweeping = asyncio.Event()
    sweeping = asyncio.create_task(sweeper.run(stop_sweeping))

    def stop() -> None:
        writer.stop()
        stop_sweeping.set()

    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop)
    watch = _ParentWatch(os.getppid(), stop)  # the serving process died without stopping us
    try:
        await writer.run()
    finally:
        stop_sweeping.set()
        watch.close()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(sweeping, 5)
        await link.close()
        await db.close()
