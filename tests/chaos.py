"""The fault suite's machinery: a ``modelbridge serve --workers 2`` on a PostgreSQL and a Redis of
its own, traffic from concurrent clients, and the checks run after every fault.

After each fault, once the stores answer again and the backlog is written:

* every 200 has exactly one usage record (its ``x-request-id``), and no 4xx/5xx has one;
* the reconcile of the scenario's account is clean (Redis vs ledger vs rollup, to the nano-dollar);
* no hold outlives its lifetime (hold TTL + the sweep interval, plus a second of slack).

The results are rows of one table (``Row``), printed by ``make chaos`` and kept in the README.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import orjson
import psutil
import yaml
from redis.asyncio import Redis

from gateway.metering.reconcile import Reconciler
from policies import keyspace as rk
from tests.conftest import ADMIN_TOKEN
from tests.helpers import Api
from tests.processes import GatewayProcess

UPSTREAM_TIMEOUT_S = 3
HOLD_MARGIN_S = 4
HOLD_TTL_S = UPSTREAM_TIMEOUT_S + HOLD_MARGIN_S
SWEEP_S = 1.0


def chaos_config(directory: Path, upstream_url: str) -> Path:
    config = {
        "server": {"host": "127.0.0.1", "shutdown_timeout_s": 5},
        "upstreams": {
            "fake": {
                "base_url": upstream_url,
                "api_key_env": "MB_TEST_UPSTREAM_KEY",
                "timeout_s": UPSTREAM_TIMEOUT_S,
            }
        },
        "models": {
            "gpt-4o-mini": {
                "upstream": "fake",
                "input_per_mtok": 0.15,
                "output_per_mtok": 0.60,
                "max_output_tokens": 50,
                "encoding": "o200k_base",
            }
        },
        "metering": {"hold_margin_s": HOLD_MARGIN_S, "sweep_every_s": SWEEP_S, "claim_idle_s": 5},
    }
    path = directory / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def body(stream: bool, **behaviour: Any) -> dict[str, Any]:
    """A chat request; ``behaviour`` reaches the fake provider as a marker in the content."""
    marker = f" [[fake:{orjson.dumps(behaviour).decode()}]]" if behaviour else ""
    return {
        "model": "gpt-4o-mini",
        "messages": [{"role": "user", "content": "hello there" + marker}],
        "stream": stream,
        "max_tokens": 20,
    }


@dataclass
class Outcome:
    request_id: str | None
    status: int | None  # None: the connection failed before a status
    stream: bool
    done: bool = False  # a stream that ended with [DONE]


@dataclass
class Traffic:
    """Clients sending requests until stopped; every outcome kept."""

    http: aiohttp.ClientSession
    v1: str
    secret: str
    outcomes: list[Outcome] = field(default_factory=list)
    behaviour: dict[str, Any] = field(default_factory=dict)
    ended_at: float = 0.0  # when the last request was sent
    _stop: asyncio.Event = field(default_factory=asyncio.Event)
    _tasks: list[asyncio.Task[None]] = field(default_factory=list)

    async def one(self, stream: bool, **behaviour: Any) -> Outcome:
        headers = {"Authorization": f"Bearer {self.secret}"}
        payload = body(stream, **{**self.behaviour, **behaviour})
        self.ended_at = time.time()
        try:
            timeout = aiohttp.ClientTimeout(total=30)
            async with (
                aiohttp.ClientSession() as fresh,  # its own connection: any worker may take it
                fresh.post(
                    self.v1 + "/chat/completions", json=payload, headers=headers, timeout=timeout
                ) as r,
            ):
                data = await r.read()
                out = Outcome(r.headers.get("x-request-id"), r.status, stream)
                out.done = data.endswith(b"data: [DONE]\n\n")
        except (aiohttp.ClientError, TimeoutError):
            out = Outcome(None, None, stream)
        self.outcomes.append(out)
        return out

    def start(self, clients: int, *, pause_s: float = 0.05) -> None:
        async def loop(n: int) -> None:
            i = 0
            while not self._stop.is_set():
                await self.one(stream=(n + i) % 2 == 0)
                i += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._stop.wait(), pause_s)

        self._stop.clear()
        self._tasks = [asyncio.create_task(loop(n)) for n in range(clients)]

    async def stop(self) -> None:
        self._stop.set()
        await asyncio.gather(*self._tasks)
        self._tasks = []


@dataclass
class Row:
    fault: str
    requests: int = 0
    ok: int = 0  # 200s
    ok_with_record: int = 0
    errors: int = 0  # 4xx/5xx
    errors_with_record: int = 0
    no_status: int = 0  # the connection broke (a killed worker)
    reconcile: str = ""
    holds_past_lifetime: int = 0
    note: str = ""

    @property
    def passed(self) -> bool:
        return (
            self.ok == self.ok_with_record
            and self.errors_with_record == 0
            and self.reconcile == "clean"
            and self.holds_past_lifetime == 0
        )

    def cells(self) -> list[str]:
        return [
            self.fault,
            str(self.requests),
            str(self.ok),
            str(self.ok_with_record),
            str(self.errors),
            str(self.errors_with_record),
            str(self.no_status),
            self.reconcile,
            str(self.holds_past_lifetime),
            self.note,
        ]


HEADER = [
    "fault",
    "requests",
    "200",
    "200 with 1 record",
    "4xx/5xx",
    "4xx/5xx with a record",
    "no status",
    "reconcile",
    "holds past lifetime",
    "recovery",
]


def table(rows: list[Row]) -> str:
    lines = ["| " + " | ".join(HEADER) + " |", "|" + "---|" * len(HEADER)]
    lines += ["| " + " | ".join(row.cells()) + " |" for row in rows]
    return "\n".join(lines)


class Stack:
    """The gateway under test and handles on its stores."""

    def __init__(
        self, directory: Path, upstream_url: str, database_url: str, redis_url: str
    ) -> None:
        self.directory = directory
        self.config = chaos_config(directory, upstream_url)
        self.database_url = database_url
        self.redis_url = redis_url
        self.gw: GatewayProcess | None = None

    async def start(self, http: aiohttp.ClientSession) -> GatewayProcess:
        self.gw = GatewayProcess(
            self.config,
            self.database_url,
            self.redis_url,
            workers=2,
            log=self.directory / f"gateway-{int(time.time())}.log",
        )
        await self.gw.ready(http, timeout=180)
        return self.gw

    async def stop(self) -> None:
        if self.gw is not None:
            await self.gw.stop()

    def children(self) -> list[psutil.Process]:
        """The live children of the serving process (a killed one not reaped yet left out)."""
        assert self.gw is not None
        alive = []
        with contextlib.suppress(psutil.Error):
            for proc in psutil.Process(self.gw.proc.pid).children(recursive=False):
                with contextlib.suppress(psutil.Error):
                    if proc.status() != psutil.STATUS_ZOMBIE:
                        alive.append(proc)
        return alive

    async def healthy(self, http: aiohttp.ClientSession) -> None:
        """Start the gateway again if it is gone or a fault left it with less than two workers
        listening and a writer (the supervisor replaces them: this is the net under it)."""
        assert self.gw is not None
        if self.gw.proc.poll() is not None or len(self.workers()) < 2 or self.writer() is None:
            await self.stop()
            await self.start(http)
        await until(self.spare_waits, 120)

    async def spare_waits(self) -> bool:
        """A spare worker waits (started since the last replacement): the next dead worker is
        replaced in a moment, not after a whole start."""
        assert self.gw is not None
        log = self.gw.log.read_text()
        return log.rfind("spare worker (pid") > log.rfind(" replaced: pid")

    def writer(self) -> psutil.Process | None:
        for proc in self.children():
            with contextlib.suppress(psutil.Error):
                if "_writer" in proc.cmdline():
                    return proc
        return None

    def workers(self) -> list[psutil.Process]:
        """The workers that listen on the gateway's port (not the spare that waits)."""
        assert self.gw is not None
        found = []
        for proc in self.children():
            with contextlib.suppress(psutil.Error):
                for conn in proc.net_connections("tcp"):
                    if conn.status == psutil.CONN_LISTEN and conn.laddr.port == self.gw.port:
                        found.append(proc)
                        break
        return found


async def funded(http: aiohttp.ClientSession, base: str) -> tuple[str, str]:
    """A new team with $100 of credits; (its billing account, a key's secret)."""
    api = Api(http, base, ADMIN_TOKEN)
    _, team, secret = await api.funded_team_key("100.00")
    return rk.team_account(team["id"]), secret


async def until(
    probe: Callable[[], Awaitable[Any]], timeout: float, interval: float = 0.1
) -> float | None:
    """Seconds until ``probe()`` is truthy (a failing probe counts as false); None at timeout."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        with contextlib.suppress(Exception):
            if await probe():
                return time.monotonic() - started
        await asyncio.sleep(interval)
    return None


async def check(
    fault: str, traffic: Traffic, account: str, database_url: str, redis_url: str, note: str = ""
) -> Row:
    """(Call once the scenario's last request is answered.)"""
    """The checks of the module docstring, once the backlog is written."""
    row = Row(fault, note=note)
    outcomes = traffic.outcomes
    row.requests = len(outcomes)
    db = await asyncpg.connect(database_url)
    redis = Redis.from_url(redis_url, decode_responses=True)
    try:
        stream = rk.AccountKeys(account).usage_stream
        await until(lambda: _drained(redis, stream), 60)
        ids = {
            r["request_id"]
            for r in await db.fetch(
                "SELECT request_id FROM usage_records WHERE account = $1", account
            )
        }
        for out in outcomes:
            if out.status is None:
                row.no_status += 1
            elif out.status == 200:
                row.ok += 1
                row.ok_with_record += out.request_id in ids
            else:
                row.errors += 1
                row.errors_with_record += out.request_id in ids
        pool = await asyncpg.create_pool(database_url, min_size=1, max_size=2)
        try:
            reconciler = Reconciler(pool, redis)
            _, differences = await reconciler.check([account], time.time())
        finally:
            await pool.close()
        row.reconcile = "clean" if not differences else f"{len(differences)} differences"
        row.holds_past_lifetime = await _holds_past_lifetime(redis, account, traffic.ended_at)
    finally:
        await db.close()
        await redis.aclose()
    return row


async def _drained(redis: Redis, stream: str) -> bool:
    return int(await redis.xlen(stream)) == 0


async def _holds_past_lifetime(redis: Redis, account: str, ended_at: float) -> int:
    """Holds still there a sweep (plus a second) after their expiry, once every hold placed
    during the scenario (all before ``ended_at``) has had its lifetime."""
    await asyncio.sleep(max(0.0, ended_at + HOLD_TTL_S + SWEEP_S + 1 - time.time()))
    late = time.time() - SWEEP_S - 1
    return int(await redis.zcount(rk.AccountKeys(account).hold_expiry, "-inf", late))
