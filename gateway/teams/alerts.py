"""Limit alerts: from the accounts' Redis alert streams to PostgreSQL, then to the teams' webhooks.

The request path does no alert work of its own. The hold and settle scripts detect a threshold
crossed (policies/alerts.py) in the same atomic step that moves the money, flag it in the period
hash (once per period and limit value) and append it to the account's stream ``{acct:A}:alerts``;
``Metering`` then calls :meth:`AlertWorker.notify` (an in-memory set, no I/O). This worker:

1. **collects**: reads the streams of notified accounts (and, every ``sweep_s`` and at start,
   of every account: a process that died between a settle and its collection leaves entries
   behind) and inserts one ``alert_events`` row per alert — the unique index drops repeats —
   with one ``alert_deliveries`` row per active webhook of the team, then deletes the entries;
   a crash before the delete re-inserts nothing.
2. **delivers**: claims due deliveries with a lease (``FOR UPDATE SKIP LOCKED``, next attempt
   pushed past the request timeout, so several processes never send one delivery at once and a
   dead process's claim runs out), POSTs the event's stored body signed with the team's secret,
   and records success, or schedules the retry with exponential backoff until it gives up. It
   looks for due deliveries when it collected something, when the earliest pending one it saw
   is due, and at every sweep (which also finds a dead process's deliveries once their lease
   runs out); an idle worker asks PostgreSQL nothing in between.

Delivery is at least once: receivers dedupe on ``x-modelbridge-event-id``.

A webhook URL is chosen by a team admin: :class:`WebhookGuard` keeps deliveries on the public
internet (policies/addresses.py) unless ``alerts.allow_private_urls``. The URL's host is resolved
and checked when the webhook is set and again at every delivery, by the resolver of the
connection itself, so the address checked is the address connected to (a DNS answer that
changes in between, "DNS rebinding", cannot swap it). Admins see a short outcome ("HTTP 500",
"connection failed", "refused: private address"), never the text of an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import logging
import math
import secrets
import socket
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import aiohttp
import asyncpg
import orjson
from aiohttp.abc import AbstractResolver, ResolveResult
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from yarl import URL

from policies import addresses
from policies import alerts as policy
from policies import keyspace as rk
from policies.money import format_usd

log = logging.getLogger("modelbridge.alerts")

SIGNATURE_HEADER = "x-modelbridge-signature"
EVENT_ID_HEADER = "x-modelbridge-event-id"
EVENT_TYPE_HEADER = "x-modelbridge-event-type"
USER_AGENT = "ModelBridge-Webhooks/1"


def sign(secret: str, body: bytes) -> str:
    """``sha256=<hex>``: HMAC-SHA256 of the raw body with the team's signing secret."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def new_secret() -> str:
    return "whsec_" + secrets.token_urlsafe(32)


# --- where webhooks may go ------------------------------------------------------------------------
#: What admins see of a delivery (``GET /api/teams/{team}/alerts``), besides "HTTP <status>".
DELIVERED = "delivered"
PENDING = "pending"
REFUSED = "refused: private address"
CONNECTION_FAILED = "connection failed"
TIMED_OUT = "timed out"
INVALID_RESPONSE = "invalid response"
WEBHOOK_DELETED = "webhook deleted"
OUTCOMES = frozenset(
    {DELIVERED, PENDING, REFUSED, CONNECTION_FAILED, TIMED_OUT, INVALID_RESPONSE, WEBHOOK_DELETED}
)


class RefusedAddress(OSError):
    """The host is, or resolves to, an address webhooks may not reach (the kind in ``args``)."""


#: host, port -> the addresses the host resolves to (the system resolver; tests script it).
Lookup = Callable[[str, int], Awaitable[list[str]]]


async def system_lookup(host: str, port: int) -> list[str]:
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return list(dict.fromkeys(str(info[4][0]) for info in infos))


class WebhookGuard:
    """Resolves and checks webhook hosts (``alerts.allow_private_urls`` lifts the check)."""

    def __init__(self, allow_private: bool = False, lookup: Lookup = system_lookup) -> None:
        self.allow_private = allow_private
        self.lookup = lookup

    def check_literal(self, host: str) -> None:
        """Refuse a host written as a refused address (the connector takes a literal as is)."""
        literal = _literal(host)
        if literal is not None:
            self._check([literal])

    async def resolve(self, host: str, port: int) -> list[str]:
        """The addresses to connect to for ``host``, all checked: refused when any is not
        public. ``OSError`` when the host does not resolve."""
        literal = _literal(host)
        found = [literal] if literal is not None else await self.lookup(host, port)
        if not found:
            raise OSError(f"{host} has no address")
        self._check(found)
        return found

    def _check(self, found: list[str]) -> None:
        for address in found:
            kind = addresses.refusal(address, allow_private=self.allow_private)
            if kind is not None:
                raise RefusedAddress(kind)

    async def check_url(self, url: str) -> None:
        """Set time: refuse a URL whose host is or resolves to a refused address (OSError)."""
        if self.allow_private:
            return
        parsed = URL(url)
        assert parsed.host is not None
        await self.resolve(parsed.host, parsed.explicit_port or parsed.port or 0)

    def resolver(self) -> AbstractResolver:
        return _GuardedResolver(self)


def _literal(host: str) -> str | None:
    try:
        return str(addresses.parse(host))
    except ValueError:
        return None


class _GuardedResolver(AbstractResolver):
    """aiohttp's connector connects to exactly what its resolver answers: the checked addresses."""

    def __init__(self, guard: WebhookGuard) -> None:
        self.guard = guard

    async def resolve(
        self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
    ) -> list[ResolveResult]:
        results: list[ResolveResult] = []
        for address in await self.guard.resolve(host, port):
            ip = addresses.parse(address)
            results.append(
                {
                    "hostname": host,
                    "host": str(ip),
                    "port": port,
                    "family": socket.AF_INET6 if ip.version == 6 else socket.AF_INET,
                    "proto": 0,
                    "flags": socket.AI_NUMERICHOST | socket.AI_NUMERICSERV,
                }
            )
        return results

    async def close(self) -> None:
        return None


def outcome(exc: BaseException) -> str:
    """What admins are told of a failed attempt (the exception itself goes to the log only)."""
    cause: BaseException | None = exc
    while cause is not None:  # the connector wraps what its resolver raised
        if isinstance(cause, RefusedAddress):
            return REFUSED
        cause = cause.__cause__
    if isinstance(exc, TimeoutError):
        return TIMED_OUT
    if isinstance(exc, aiohttp.ClientResponseError | aiohttp.ClientPayloadError):
        return INVALID_RESPONSE
    return CONNECTION_FAILED


def shown_status(delivered: bool, last_status: int | None, last_error: str) -> str:
    """A delivery's status for admins: an outcome of :data:`OUTCOMES` or ``HTTP <status>``."""
    if delivered:
        return DELIVERED
    if last_error in OUTCOMES:
        return last_error
    if last_status is not None:
        return f"HTTP {last_status}"
    return CONNECTION_FAILED if last_error else PENDING


@dataclass(frozen=True, slots=True)
class Alert:
    """One stream entry, attributed to a team (and a member for member limits)."""

    team_id: str
    user_id: str  # "" for the team's spending limit
    kind: str  # policies.alerts.TEAM | MEMBER
    threshold: str
    limit: int
    spend: int
    enforcement: str
    trigger: str  # "spend" (settled spend crossed it) | "refusal" (a request was refused)
    period: str
    at: int

    @classmethod
    def from_entry(cls, account: str, fields: Mapping[str, str]) -> Alert:
        """Account ``t_T``: scope is the member (or the team limit); ``u_X``: scope is the team
        whose keys X uses with personal billing."""
        kind, scope = fields["kind"], fields["scope"]
        if account.startswith("t_"):
            team_id, user_id = account[2:], "" if kind == policy.TEAM else scope
        else:
            team_id, user_id = scope, account[2:]
        return cls(
            team_id,
            user_id,
            kind,
            fields["threshold"],
            int(fields["limit"]),
            int(fields["spend"]),
            fields.get("enforcement", "hard"),
            fields.get("trigger", "spend"),
            fields["period"],
            int(fields.get("at") or 0),
        )

    def body(self, event_id: str) -> bytes:
        percent = int(self.threshold) if self.threshold.isdigit() else None
        return orjson.dumps(
            {
                "id": event_id,
                "type": policy.event_type(self.kind, self.threshold),
                "created_at": datetime.fromtimestamp(self.at, UTC).isoformat(),
                "team_id": self.team_id,
                "period": self.period,
                "data": {
                    "limit": self.kind,
                    "user_id": self.user_id or None,
                    "threshold": self.threshold,
                    "threshold_percent": percent,
                    "limit_usd": format_usd(self.limit),
                    "spend_usd": format_usd(self.spend),
                    "enforcement": self.enforcement,
                    "trigger": self.trigger,
                },
            }
        )


_INSERT_EVENT = """
INSERT INTO alert_events (id, team_id, user_id, type, period, threshold, limit_amount, body)
SELECT $1, $2, $3, $4, $5, $6, $7, $8
WHERE EXISTS (SELECT 1 FROM teams WHERE id = $2 AND deleted_at IS NULL)
ON CONFLICT DO NOTHING RETURNING id
"""
_FAN_OUT = """
INSERT INTO alert_deliveries (event_id, webhook_id, next_attempt_at)
SELECT $1, id, $3 FROM webhooks WHERE team_id = $2 AND deleted_at IS NULL
"""
_NEXT_DUE = (
    "SELECT extract(epoch FROM min(next_attempt_at)) FROM alert_deliveries"
    " WHERE delivered_at IS NULL AND failed_at IS NULL"
)
_CLAIM = """
WITH due AS (
    SELECT id FROM alert_deliveries
    WHERE delivered_at IS NULL AND failed_at IS NULL AND next_attempt_at <= $3::timestamptz
    ORDER BY next_attempt_at LIMIT $1 FOR UPDATE SKIP LOCKED
)
UPDATE alert_deliveries d
SET attempts = d.attempts + 1, next_attempt_at = $3::timestamptz + make_interval(secs => $2)
FROM due, alert_events e, webhooks w
WHERE d.id = due.id AND e.id = d.event_id AND w.id = d.webhook_id
RETURNING d.id, d.attempts, e.id AS event_id, e.type, e.body, w.url, w.deleted_at,
          (SELECT secret FROM webhook_secrets s WHERE s.team_id = e.team_id) AS secret
"""


class AlertWorker:
    def __init__(
        self,
        db: asyncpg.Pool,
        redis: Redis,
        guard: WebhookGuard,
        *,
        now: Callable[[], float] = time.time,
        poll_s: float = 1.0,
        sweep_s: float = 30.0,
        timeout_s: float = 10.0,
        base_backoff_s: float = policy.BASE_BACKOFF_S,
        max_attempts: int = policy.MAX_ATTEMPTS,
        batch: int = 50,
    ) -> None:
        self.db = db
        self.redis = redis
        self.guard = guard
        self.now = now  # the app's clock: every time the worker records or compares
        self.poll_s = poll_s
        self.sweep_s = sweep_s
        self.timeout_s = timeout_s
        self.base_backoff_s = base_backoff_s
        self.max_attempts = max_attempts
        self.batch = batch
        self.delivered = 0
        self.polls = 0  # times the loop looked whether there is work
        self.rounds = 0  # times it collected and asked PostgreSQL for due deliveries
        self._notified: set[str] = set()
        self._collected = False  # deliveries were made outside the loop's step (a sweep's)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._http: aiohttp.ClientSession | None = None

    # --- the loop -------------------------------------------------------------------------------
    def notify(self, account: str) -> None:
        """An account queued alerts (called on the request path: memory only)."""
        self._notified.add(account)
        self._wake.set()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()

    async def run(self) -> None:
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        # No DNS cache: every new connection resolves through the guard, and connects only to
        # what it answered. No proxies from the environment (trust_env is off).
        connector = aiohttp.TCPConnector(resolver=self.guard.resolver(), use_dns_cache=False)
        async with aiohttp.ClientSession(timeout=timeout, connector=connector) as http:
            self._http = http
            last_sweep = float("-inf")
            due_at = 0.0  # when (app clock) the next delivery this worker knows of is due
            failing = False  # a store outage is one line, not one every retry
            while not self._stopping.is_set():
                self.polls += 1
                try:
                    if time.monotonic() - last_sweep >= self.sweep_s:
                        last_sweep = time.monotonic()
                        await self.sweep()
                        due_at = 0.0  # and look: another process's deliveries (a dead one's)
                    if self._notified or self._collected or self.now() >= due_at:
                        self.rounds += 1
                        self._collected = False
                        await self.step()
                        due_at = await self.next_due()
                    if failing:
                        log.info("alert worker: working again")
                    failing = False
                except (redis_errors.RedisError, OSError, asyncpg.PostgresError) as exc:
                    (log.debug if failing else log.warning)("alert worker: %s; retrying", exc)
                    failing = True
                    due_at = 0.0
                    await asyncio.sleep(1.0)
                self._wake.clear()
                if not self._notified:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self.poll_s)
        self._http = None

    async def step(self) -> int:
        """Collect what notified accounts queued, then send what is due."""
        accounts, self._notified = self._notified, set()
        try:
            await self.collect(accounts)
        except BaseException:
            self._notified |= accounts
            raise
        return await self.deliver_due()

    # --- collecting -----------------------------------------------------------------------------
    async def sweep(self) -> int:
        """Collect the alert streams of every account (after a crash or a lost notification)."""
        found = [
            rk.account_of_stream(key)
            async for key in self.redis.scan_iter(match="{acct:*}:alerts", count=1000)
        ]
        return await self.collect(found)

    async def collect(self, accounts: Iterable[str]) -> int:
        total = 0
        for account in sorted(set(accounts)):
            while moved := await self._collect_one(account):
                total += moved
        if total:  # their deliveries are due now: the loop looks
            self._collected = True
            self._wake.set()
        return total

    async def _collect_one(self, account: str) -> int:
        stream = rk.AccountKeys(account).alerts
        entries: Any = await self.redis.xrange(stream, count=self.batch)
        if not entries:
            return 0
        async with self.db.acquire() as conn, conn.transaction():
            for _, fields in entries:
                try:
                    alert = Alert.from_entry(account, fields)
                except (KeyError, ValueError) as exc:
                    log.error("malformed alert entry on %s dropped: %s %r", stream, exc, fields)
                    continue
                await self._record(conn, alert, self._now())
        await self.redis.xdel(stream, *[entry_id for entry_id, _ in entries])
        return len(entries)

    @staticmethod
    async def _record(conn: asyncpg.Connection, alert: Alert, now: datetime) -> None:
        event_id = "evt_" + secrets.token_hex(12)
        inserted = await conn.fetchval(
            _INSERT_EVENT,
            event_id,
            alert.team_id,
            alert.user_id,
            policy.event_type(alert.kind, alert.threshold),
            alert.period,
            alert.threshold,
            alert.limit,
            alert.body(event_id).decode(),
        )
        if inserted:
            await conn.execute(_FAN_OUT, event_id, alert.team_id, now)

    def _now(self) -> datetime:
        return datetime.fromtimestamp(self.now(), UTC)

    # --- delivering -----------------------------------------------------------------------------
    async def next_due(self) -> float:
        """When the next pending delivery is due (app clock, seconds; infinity for none). An idle
        worker asks PostgreSQL nothing until then, a notification or its sweep (it asked every
        ``poll_s``: a query and a connection reset a second per process, for nothing)."""
        due = await self.db.fetchval(_NEXT_DUE)
        return float(due) if due is not None else math.inf

    async def deliver_due(self) -> int:
        rows = await self.db.fetch(_CLAIM, self.batch, self.timeout_s + 5.0, self._now())
        if rows:
            await asyncio.gather(*(self._deliver(row) for row in rows))
        return len(rows)

    async def _deliver(self, row: asyncpg.Record) -> None:
        if row["deleted_at"] is not None or not row["secret"]:
            await self._finish(row["id"], failed=True, error=WEBHOOK_DELETED)
            return
        body = row["body"].encode()
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            SIGNATURE_HEADER: sign(row["secret"], body),
            EVENT_ID_HEADER: row["event_id"],
            EVENT_TYPE_HEADER: row["type"],
        }
        status, error = None, ""
        try:
            assert self._http is not None
            url = URL(row["url"])
            self.guard.check_literal(url.host or "")
            async with self._http.post(
                url, data=body, headers=headers, allow_redirects=False
            ) as resp:
                status = resp.status
                await resp.read()
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
            error = outcome(exc)
            log.info("webhook delivery %s: %s: %s", row["id"], error, exc)
        if status is not None and 200 <= status < 300:
            self.delivered += 1
            await self._finish(row["id"], status=status)
            return
        if policy.gives_up(row["attempts"], self.max_attempts):
            log.warning(
                "webhook delivery %s given up after %d attempts", row["id"], row["attempts"]
            )
            await self._finish(row["id"], failed=True, status=status, error=error)
            return
        delay = policy.retry_delay(row["attempts"], self.base_backoff_s)
        await self.db.execute(
            "UPDATE alert_deliveries SET last_status = $3, last_error = $4,"
            " next_attempt_at = $5::timestamptz + make_interval(secs => $2) WHERE id = $1",
            row["id"],
            delay,
            status,
            error,
            self._now(),
        )

    async def _finish(
        self, delivery_id: int, *, failed: bool = False, status: int | None = None, error: str = ""
    ) -> None:
        column = "failed_at" if failed else "delivered_at"
        await self.db.execute(
            f"UPDATE alert_deliveries SET {column} = $4, last_status = $2, last_error = $3"
            " WHERE id = $1",
            delivery_id,
            status,
            error,
            self._now(),
        )
