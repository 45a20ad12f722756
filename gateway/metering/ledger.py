"""Reading an account's money as the ledger and its usage stream have it (policies/ledger.py):
the PostgreSQL sums in one statement (one snapshot, even under READ COMMITTED, while the usage
writer commits), and the records waiting in the account's Redis stream."""

from __future__ import annotations

from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from policies import keyspace as rk
from policies.ledger import Totals, UsageEntry, entry_of

STREAM_PAGE = 10_000


def _scope_sql(account: str) -> str:
    return "user_id" if account.startswith("t_") else "coalesce(team_id, user_id)"


def _totals_sql(account: str) -> str:
    scope = _scope_sql(account)
    mine = "FROM usage_records WHERE account = $1 AND period = ANY($2::text[])"
    return f"""
SELECT
  (SELECT coalesce(sum(amount), 0)::text FROM ledger WHERE account = $1 AND kind = 'credit')
    AS credited,
  (SELECT coalesce(sum(from_credits), 0)::text FROM usage_records WHERE account = $1) AS used,
  (SELECT coalesce(json_agg(json_build_array(period, s)), '[]') FROM (
     SELECT period, sum(amount)::text AS s FROM ledger
     WHERE account = $1 AND kind = 'allowance' AND period = ANY($2::text[]) GROUP BY period
   ) a) AS allowances,
  (SELECT coalesce(json_agg(json_build_array(period, g, s, n)), '[]') FROM (
     SELECT period, '' AS g, sum(charged)::text AS s, count(*) AS n {mine} GROUP BY period
     UNION ALL SELECT period, 'ms:' || {scope}, sum(charged)::text, count(*) {mine}
       GROUP BY period, {scope}
     UNION ALL SELECT period, 'ks:' || key_id, sum(charged)::text, count(*) {mine}
       GROUP BY period, key_id
     UNION ALL SELECT period, 'mo:' || model, sum(charged)::text, count(*) {mine}
       GROUP BY period, model
   ) x) AS sums,
  (SELECT coalesce(json_agg(json_build_array(period, a)), '[]') FROM (
     SELECT period, sum(from_allowance)::text AS a {mine} GROUP BY period
   ) y) AS aspent,
  (SELECT coalesce(array_agg(request_id), '{{}}') FROM usage_records
     WHERE request_id = ANY($3::text[])) AS in_ledger
"""


async def ledger_totals(
    conn: asyncpg.Connection | asyncpg.Pool,
    account: str,
    periods: list[str],
    request_ids: list[str],
) -> tuple[Totals, dict[str, int], set[str]]:
    """The ledger's counters of ``account`` for ``periods``, the allowance rows of each period
    that has some, and which of ``request_ids`` the ledger has — all from one snapshot."""
    row = await conn.fetchrow(_totals_sql(account), account, periods, request_ids)
    assert row is not None
    totals = Totals(credits=int(row["credited"]) - int(row["used"]))
    for period in periods:
        totals.period(period)
    for period, name, amount, n in orjson.loads(row["sums"]):
        counters = totals.period(period)
        if name == "":
            counters.update(spend=int(amount), req=int(n))
            continue
        counters[name] = int(amount)
        if name.startswith("ms:"):
            counters["mr:" + name[3:]] = int(n)
    for period, amount in orjson.loads(row["aspent"]):
        totals.period(period)["aspent"] = int(amount)
    for counters in totals.periods.values():
        for name in ("spend", "aspent", "req"):
            counters.setdefault(name, 0)
    allowances = {period: int(amount) for period, amount in orjson.loads(row["allowances"])}
    return totals, allowances, set(row["in_ledger"])


async def stream_entries(redis: Redis, account: str) -> tuple[list[UsageEntry], str]:
    """The usage records in ``account``'s stream now, and the id of the last one read ("0-0"
    when there are none): anything the stream holds past that id came later."""
    stream = rk.AccountKeys(account).usage_stream
    entries: list[UsageEntry] = []
    last = "0-0"
    start = "-"
    while True:
        page: Any = await redis.xrange(stream, start, "+", count=STREAM_PAGE)
        for entry_id, fields in page:
            last = entry_id
            entry = entry_of(account, fields)
            if entry is not None:
                entries.append(entry)
        if len(page) < STREAM_PAGE:
            return entries, str(last)
        start = "(" + str(last)
