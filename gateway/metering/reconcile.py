"""The reconcile (contract section 11): every account's money, Redis against the PostgreSQL
ledger against the daily rollup (policies/reconcile.py compares; this module reads).

Each account is read consistently while traffic goes on, by the argument of the rebuild
(gateway/metering/accounts.py): the usage stream's entries up to an id L, then the ledger in one
SQL statement, then Redis's counters in one script that also says whether the stream moved past
L (a settle ran meanwhile: read again). Records still in the stream count on the ledger's side
(de-duplicated by request id), so the answer holds before the writer has drained its backlog.

``repair`` rebuilds the accounts that differ (a forced load: the current period from the ledger
plus the stream) and drops their past periods' hashes that differ (nothing reads them for a
decision; the ledger keeps every record).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from gateway.config import Config
from gateway.metering.accounts import Accounts
from gateway.metering.ledger import ledger_totals, stream_entries
from gateway.metering.scripts import lua_source
from policies import keyspace as rk
from policies import ledger
from policies.periods import period_of
from policies.reconcile import Difference, LedgerView, RedisView, compare, report

log = logging.getLogger("modelbridge.reconcile")

ATTEMPTS = 20
PARALLEL = 8

_PERIODS = """
SELECT coalesce(array_agg(DISTINCT period), '{}') FROM (
  SELECT period FROM usage_records WHERE account = $1
  UNION SELECT period FROM ledger WHERE account = $1 AND period IS NOT NULL
) p
"""
_ROLLUP = """
SELECT
  (SELECT coalesce(json_agg(json_build_array(period, n, s)), '[]') FROM (
     SELECT period, count(*) AS n, sum(charged)::text AS s FROM usage_records
     WHERE account = $1 GROUP BY period) r) AS records,
  (SELECT coalesce(json_agg(json_build_array(period, n, s)), '[]') FROM (
     SELECT to_char(day, 'YYYY-MM') AS period, sum(requests)::text AS n, sum(charged)::text AS s
     FROM usage_daily WHERE account = $1 GROUP BY 1) d) AS rollup
"""
_ROLLUP_REBUILD = """
INSERT INTO usage_daily
SELECT account, (created_at AT TIME ZONE 'UTC')::date, user_id, key_id, model, tags, count(*),
       sum(prompt_tokens), sum(completion_tokens), sum(list_cost), sum(discount), sum(charged)
FROM usage_records WHERE account = $1
GROUP BY 1, 2, 3, 4, 5, 6
"""
_ACCOUNTS = "SELECT 't_' || id FROM teams UNION ALL SELECT 'u_' || id FROM users ORDER BY 1"


class Reconciler:
    def __init__(self, db: asyncpg.Pool, redis: Redis, accounts: Accounts | None = None) -> None:
        self.db = db
        self.redis = redis
        self.accounts = accounts
        self._snapshot = redis.register_script(lua_source("snapshot"))

    async def all_accounts(self) -> list[str]:
        return [r[0] for r in await self.db.fetch(_ACCOUNTS)]

    async def check(
        self, accounts: Iterable[str] | None = None, now: float | None = None
    ) -> tuple[int, list[Difference]]:
        """(accounts checked, differences) for ``accounts`` (default: every account)."""
        names = list(accounts) if accounts is not None else await self.all_accounts()
        gate = asyncio.Semaphore(PARALLEL)

        async def one(account: str) -> list[Difference]:
            async with gate:
                return await self.account(account, now)

        found = await asyncio.gather(*(one(a) for a in names))
        return len(names), [d for diffs in found for d in diffs]

    async def account(self, account: str, now: float | None = None) -> list[Difference]:
        periods = await self._periods(account, now)
        records, rollup = await self._rollup(account)
        for _ in range(ATTEMPTS):
            entries, last_id = await stream_entries(self.redis, account)
            totals, allowances, in_ledger = await ledger_totals(
                self.db, account, periods, [e.request_id for e in entries]
            )
            ledger.add(totals, ledger.pending(entries, in_ledger))
            view = await self._redis_view(account, periods, last_id)
            if view is None:
                continue  # a settle ran meanwhile
            return compare(account, view, LedgerView(totals, allowances, records, rollup))
        raise RuntimeError(f"account {account}: usage kept arriving; not compared")

    async def _periods(self, account: str, now: float | None) -> list[str]:
        found = set(await self.db.fetchval(_PERIODS, account))
        if now is not None:
            found.add(period_of(now))
        return sorted(found)

    async def _rollup(
        self, account: str
    ) -> tuple[dict[str, tuple[int, int]], dict[str, tuple[int, int]]]:
        row = await self.db.fetchrow(_ROLLUP, account)
        assert row is not None

        def table(raw: str) -> dict[str, tuple[int, int]]:
            return {p: (int(n), int(s)) for p, n, s in orjson.loads(raw)}

        return table(row["records"]), table(row["rollup"])

    async def _redis_view(self, account: str, periods: list[str], last_id: str) -> RedisView | None:
        ak = rk.AccountKeys(account)
        keys = [ak.state, ak.hold_values, ak.usage_stream, *(ak.period(p) for p in periods)]
        raw: Any = await self._snapshot(keys=keys, args=[last_id])
        if int(raw[0]):
            return None
        state, holds = _hash(raw[1]), _hash(raw[2])
        present = {p: _hash(h) for p, h in zip(periods, raw[3:], strict=True) if h}
        return RedisView(state.get("loaded") == "1", state, holds, present)

    async def repair(self, differences: list[Difference], now: float) -> list[str]:
        """Rebuild every account with a difference; the accounts repaired."""
        assert self.accounts is not None
        current = period_of(now)
        by_account: dict[str, set[str]] = {}
        for d in differences:
            by_account.setdefault(d.account, set()).add(d.field)
        for account, fields in sorted(by_account.items()):
            in_redis = [f for f in fields if "usage_daily" not in f]
            if len(in_redis) < len(fields):
                await self._rebuild_rollup(account)
            if in_redis:
                await self.accounts.load(account, now, force=True)
            past = {f.split(":", 1)[0] for f in in_redis if f[:1].isdigit()} - {current}
            if past:
                await self.redis.delete(*(rk.AccountKeys(account).period(p) for p in past))
            log.warning("reconcile: rebuilt account %s (%s)", account, ", ".join(sorted(fields)))
        return sorted(by_account)

    async def _rebuild_rollup(self, account: str) -> None:
        """The account's daily rollup recomputed from its usage records. The table lock makes
        a writer's batch wait (its records and rollup are one transaction): one committed
        before is in the recomputation, one committed after adds to it."""
        async with self.db.acquire() as conn, conn.transaction():
            await conn.execute("LOCK TABLE usage_daily IN SHARE ROW EXCLUSIVE MODE")
            await conn.execute("DELETE FROM usage_daily WHERE account = $1", account)
            await conn.execute(_ROLLUP_REBUILD, account)


def _hash(flat: list[Any]) -> dict[str, str]:
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}


async def reconcile(
    reconciler: Reconciler, now: float, *, repair: bool = False, accounts: list[str] | None = None
) -> dict[str, Any]:
    """The report of contract section 11; with ``repair``, the differing accounts rebuilt and
    checked again (``repaired``, ``after_repair``)."""
    checked, differences = await reconciler.check(accounts, now)
    result = report(checked, differences)
    if repair and differences:
        repaired = await reconciler.repair(differences, now)
        again, left = await reconciler.check(repaired, now)
        result["repaired"] = repaired
        result["after_repair"] = report(again, left)
    return result


async def run_check(
    database_url: str, redis_url: str, config: Config, repair: bool
) -> dict[str, Any]:
    """``modelbridge reconcile`` on the stores named: the report (and the repair)."""
    import time

    from gateway.infra.db import create_pool
    from gateway.infra.redisconn import open_redis
    from gateway.metering.scripts import Scripts

    link = await open_redis(redis_url, script_client="redis-py")
    db = await create_pool(database_url, min_size=1, max_size=PARALLEL)
    try:
        accounts = Accounts(config, db, link.client, Scripts(link.client))
        return await reconcile(Reconciler(db, link.client, accounts), time.time(), repair=repair)
    finally:
        await link.close()
        await db.close()
