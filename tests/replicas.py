"""The gateway processes a test spreads its requests over: ``replicas[i]`` for the i-th request.

Under ``--redis-cluster`` (``make test-cluster``) they are two: the session's in-process gateway
(first: tests read its app state and set its clock) and a ``modelbridge serve`` process on the
same Redis Cluster, PostgreSQL and fake upstream, with the same configuration
(``gateway_settings``). Each has its own key cache, revocation listener, usage writer (a consumer
of its own in the same groups) and sweeper, so what the tests assert (exactly K of 10 K admitted
to the nano-dollar, a revocation on one refused on the other at once, the rebuild after a loss,
every record written once, a clean reconcile) holds across processes, not within one.

On a single node they are the session gateway alone, so ``make test`` starts no process for them;
``MODELBRIDGE_TEST_REPLICAS=2`` adds the second one there too. The second process runs on the
real clock: a test that fixes ``gateway.clock`` sends its requests to ``replicas.first`` only.
"""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import aiohttp
import yaml

from tests.conftest import gateway_settings
from tests.processes import GatewayProcess


class Endpoint(Protocol):
    """A gateway to send requests to: ``tests.conftest.Gateway`` or a ``GatewayProcess``."""

    base: str

    @property
    def v1(self) -> str: ...


@dataclass(frozen=True)
class Replicas:
    members: tuple[Endpoint, ...]

    def __getitem__(self, i: int) -> Endpoint:
        return self.members[i % len(self.members)]

    def __len__(self) -> int:
        return len(self.members)

    @property
    def first(self) -> Endpoint:
        """The session's in-process gateway."""
        return self.members[0]

    @property
    def other(self) -> Endpoint:
        """The second process (the session gateway itself on a single node)."""
        return self.members[-1]

    def spread(self, count: int) -> list[Endpoint]:
        """``count`` targets, alternating: half the requests go to each process."""
        return [self[i] for i in range(count)]


@asynccontextmanager
async def start_replicas(
    gateway: Endpoint,
    http: aiohttp.ClientSession,
    *,
    upstream_url: str,
    database_url: str,
    redis_url: str,
    second: bool,
) -> AsyncIterator[Replicas]:
    if not second:
        yield Replicas((gateway,))
        return
    with tempfile.TemporaryDirectory(prefix="mb-test-replica-") as tmp:
        directory = Path(tmp)
        config = directory / "config.yaml"
        config.write_text(yaml.safe_dump(gateway_settings(upstream_url)))
        proc = GatewayProcess(config, database_url, redis_url, log=directory / "gateway.log")
        try:
            await proc.ready(http)
            yield Replicas((gateway, proc))
            assert proc.proc.poll() is None, f"the second gateway died: {proc.log.read_text()}"
        finally:
            await proc.stop()
