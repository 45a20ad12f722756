"""Billing accounts in Redis: rebuilt from PostgreSQL on demand, changed under one lock.

PostgreSQL is the record (ledger, usage records, teams, memberships, keys); Redis holds the live
state the hold and settle scripts need. An account's Redis state is installed by ``load.lua`` the
first time a request needs it (the hold script answers ``not_loaded``), so a Redis that lost its
data (restarted without persistence, flushed) rebuilds itself account by account, with no job:

* credits  = sum of credit ledger rows - sum of ``from_credits`` of usage records
* allowance of the period = the period's allowance ledger rows, else the subscription's
* period counters (spend, per member, key, model) = sums of the period's usage records
* policy (limits, enforcement, discount, blocked models) and active keys from their tables

Every writer of an account's state (management API, operator credits, this loader) holds the
account's PostgreSQL advisory lock for the length of its transaction, so a rebuild can never
interleave with a change and lose it.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from typing import Any

import asyncpg
import orjson
from redis.asyncio import Redis

from gateway.config import Config
from gateway.scripts import Scripts
from policies import keys as rk
from policies.periods import period_of

log = logging.getLogger("modelbridge.accounts")

NO_LIMIT = "-1"


async def lock_account(conn: asyncpg.Connection, account: str) -> None:
    """Take the account's advisory lock for the current transaction."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", account)


def _limit(value: int | None) -> str:
    return NO_LIMIT if value is None else str(value)


class Accounts:
    def __init__(self, config: Config, db: asyncpg.Pool, redis: Redis, scripts: Scripts) -> None:
        self.config = config
        self.db = db
        self.redis = redis
        self.scripts = scripts

    # --- rebuild -------------------------------------------------------------------------
    async def load(self, account: str, now: float, *, force: bool = False) -> bool:
        """Install the account's state in Redis unless it is there; True when installed now."""
        period = period_of(now)
        ak = rk.AccountKeys(account)
        async with self.db.acquire() as conn, conn.transaction():
            await lock_account(conn, account)
            snapshot = await self._snapshot(conn, account, period)
            blocked_keys = [ak.blocked(scope) for scope in snapshot["scopes"]]
            payload = {k: snapshot[k] for k in ("state", "period", "cfg", "keys", "blocked")}
            installed = await self.scripts.load(
                keys=[
                    ak.state,
                    ak.period(period),
                    ak.cfg,
                    ak.keys,
                    ak.hold_expiry,
                    ak.hold_values,
                    *blocked_keys,
                ],
                args=[orjson.dumps(payload), rk.PERIOD_TTL_S, "force" if force else ""],
            )
        await self.ensure_stream(account)
        if installed:
            log.info("loaded account %s from PostgreSQL", account)
        return bool(installed)

    async def ensure_stream(self, account: str) -> None:
        """Register the account's usage stream and consumer group (again: after a Redis loss
        both are gone, and every account passes through ``load`` first)."""
        stream = rk.AccountKeys(account).usage_stream
        pipe = self.redis.pipeline(transaction=False)
        pipe.sadd(rk.USAGE_STREAMS, stream)
        pipe.xgroup_create(stream, rk.USAGE_GROUP, id="0", mkstream=True)
        try:
            await pipe.execute()
        except Exception as exc:  # BUSYGROUP: the group exists already
            if "BUSYGROUP" not in str(exc):
                raise

    async def _snapshot(
        self, conn: asyncpg.Connection, account: str, period: str
    ) -> dict[str, Any]:
        credits = await conn.fetchval(
            "SELECT coalesce((SELECT sum(amount) FROM ledger WHERE account = $1 AND kind = 'credit'), 0)"
            " - coalesce((SELECT sum(from_credits) FROM usage_records WHERE account = $1), 0)",
            account,
        )
        state: dict[str, str] = {"credits": str(credits), "sub_alw": "0"}
        cfg: dict[str, str] = {}
        keys: dict[str, str] = {}
        blocked: list[list[str]] = [[]]
        if account.startswith("t_"):
            team_id = account[2:]
            await self._team_snapshot(conn, team_id, state, cfg, keys, blocked)
        else:
            rows = await conn.fetch(
                "SELECT id, user_id FROM api_keys WHERE user_id = $1 AND team_id IS NULL AND revoked_at IS NULL",
                account[2:],
            )
            keys.update({r["id"]: r["user_id"] for r in rows})
        return {
            "state": state,
            "period": await self._period_snapshot(conn, account, period, state["sub_alw"]),
            "cfg": cfg,
            "keys": keys,
            "blocked": blocked,
            "scopes": [""],
        }

    async def _team_snapshot(
        self,
        conn: asyncpg.Connection,
        team_id: str,
        state: dict[str, str],
        cfg: dict[str, str],
        keys: dict[str, str],
        blocked: list[list[str]],
    ) -> None:
        team = await conn.fetchrow("SELECT * FROM teams WHERE id = $1", team_id)
        if team is None or team["deleted_at"] is not None:
            cfg["deleted"] = "1"
            return
        state["sub_alw"] = str(self.subscription_allowance(team["plan"], team["seats"]))
        cfg.update(self.team_cfg(team))
        blocked[0] = list(team["model_restrictions"])
        members = await conn.fetch(
            "SELECT user_id, monthly_limit, limit_set, enforcement FROM memberships"
            " WHERE team_id = $1 AND removed_at IS NULL",
            team_id,
        )
        for m in members:
            cfg.update(
                self.member_cfg(m["user_id"], m["monthly_limit"], m["limit_set"], m["enforcement"])
            )
        rows = await conn.fetch(
            "SELECT k.id, k.user_id FROM api_keys k JOIN memberships m"
            " ON m.team_id = k.team_id AND m.user_id = k.user_id AND m.removed_at IS NULL"
            " WHERE k.team_id = $1 AND k.revoked_at IS NULL AND m.billing_mode = 'team'",
            team_id,
        )
        keys.update({r["id"]: r["user_id"] for r in rows})

    async def _period_snapshot(
        self, conn: asyncpg.Connection, account: str, period: str, sub_alw: str
    ) -> dict[str, str]:
        alw = await conn.fetchval(
            "SELECT sum(amount) FROM ledger WHERE account = $1 AND kind = 'allowance' AND period = $2",
            account,
            period,
        )
        counters: dict[str, str] = {"alw": str(alw) if alw is not None else sub_alw}
        total = await conn.fetchrow(
            "SELECT count(*) AS req, coalesce(sum(charged), 0) AS spend,"
            " coalesce(sum(from_allowance), 0) AS aspent"
            " FROM usage_records WHERE account = $1 AND period = $2",
            account,
            period,
        )
        counters.update(
            req=str(total["req"]), spend=str(total["spend"]), aspent=str(total["aspent"])
        )
        for column, prefix in (("user_id", "ms:"), ("key_id", "ks:"), ("model", "mo:")):
            rows = await conn.fetch(
                f"SELECT {column} AS g, sum(charged) AS s, count(*) AS n FROM usage_records"
                f" WHERE account = $1 AND period = $2 GROUP BY {column}",
                account,
                period,
            )
            for r in rows:
                counters[prefix + r["g"]] = str(r["s"])
                if prefix == "ms:":
                    counters["mr:" + r["g"]] = str(r["n"])
        return counters

    # --- pieces of state, shared by the loader and the management writes ---------------------
    def subscription_allowance(self, plan: str | None, seats: int) -> int:
        spec = self.config.plans.get(plan or "")
        return 0 if spec is None else spec.included_usage_per_seat * seats

    @staticmethod
    def team_cfg(team: Mapping[str, Any]) -> dict[str, str]:
        return {
            "limit": _limit(team["spending_limit"]),
            "dml": _limit(team["default_member_limit"]),
            "den": team["default_enforcement"],
            "disc": str(team["discount_bps"]),
        }

    @staticmethod
    def member_cfg(
        user_id: str, limit: int | None, limit_set: bool, enforcement: str | None
    ) -> dict[str, str]:
        cfg = {}
        if limit_set:
            cfg["ml:" + user_id] = _limit(limit)
        if enforcement:
            cfg["me:" + user_id] = enforcement
        return cfg

    # --- management writes (call inside a transaction holding lock_account) -------------------
    async def add_credits(self, account: str, amount: int) -> None:
        await self.redis.hincrby(rk.AccountKeys(account).state, "credits", amount)

    async def add_keys(self, account: str, keys: Mapping[str, str]) -> None:
        if keys:
            await self.redis.hset(rk.AccountKeys(account).keys, mapping=dict(keys))  # type: ignore[arg-type]

    async def remove_keys(self, account: str, key_ids: Iterable[str]) -> None:
        ids = list(key_ids)
        if ids:
            await self.redis.hdel(rk.AccountKeys(account).keys, *ids)
            await self.redis.publish(rk.INVALIDATE_CHANNEL, " ".join(ids))

    async def set_cfg(
        self, account: str, fields: Mapping[str, str], delete: Iterable[str] = ()
    ) -> None:
        ak = rk.AccountKeys(account)
        pipe = self.redis.pipeline(transaction=True)
        if fields:
            pipe.hset(ak.cfg, mapping=dict(fields))  # type: ignore[arg-type]
        dels = list(delete)
        if dels:
            pipe.hdel(ak.cfg, *dels)
        await pipe.execute()

    async def set_blocked(self, account: str, models: Iterable[str], scope: str = "") -> None:
        key = rk.AccountKeys(account).blocked(scope)
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(key)
        names = list(models)
        if names:
            pipe.sadd(key, *names)
        await pipe.execute()

    async def unload(self, account: str) -> None:
        """Forget the account's live state so the next request rebuilds it (team deletion)."""
        await self.redis.hset(rk.AccountKeys(account).state, "loaded", "0")
