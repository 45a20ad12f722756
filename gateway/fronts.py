"""The lean connections of one app (:mod:`gateway.front`): kept for shutdown, and counted."""

from __future__ import annotations

import asyncio
import contextlib
import time
from email.utils import formatdate
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from gateway.front import Front


class Fronts:
    """The lean connections of one app (for shutdown), and how many requests they served."""

    def __init__(self) -> None:
        self.connections: set[Front] = set()
        self.served = 0
        self.handed_over = 0
        self.closing = False
        self._date = (0, "")

    def date(self) -> str:
        """The ``Date`` header's value, formatted once a second."""
        now = int(time.time())
        if self._date[0] != now:
            self._date = (now, formatdate(now, usegmt=True))
        return self._date[1]

    async def shutdown(self, timeout: float) -> None:
        self.closing = True
        for conn in list(self.connections):
            if conn.task is None:
                conn.close()
        deadline = time.monotonic() + timeout
        while any(c.task is not None for c in self.connections) and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        tasks = [c.task for c in self.connections if c.task is not None]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
        for conn in list(self.connections):
            conn.close()
