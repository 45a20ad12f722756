"""Billing accounts in Redis: rebuilt from PostgreSQL on demand, changed under one lock.

PostgreSQL is the record (ledger, usage records, teams, memberships, keys); Redis holds the live
state the hold and settle scripts need. An account's Redis state is installed by ``load.lua`` the
first time a request needs it (the hold script answers ``not_loaded``), so a Redis that lost its
data (restarted without persistence, flushed) rebuilds itself account by account, with no job:

* credits  = sum of credit ledger rows - sum of ``from_credits`` of usage records
* allowance of the period = the period's allowance ledger rows, else the subscription's
* period counters (spend, per member, key, model) = sums of the period's usage records; ``mx:``
  = a member's spend in the same team billed to the other account (billing mode switched)
* policy (limits, enforcement, discount, rate limits, blocked models) and active keys with their
  controls (expiry, models, monthly limit, rpm, tpm: policies/limits.py:key_entry) from their
  tables; a user account also gets the team keys and mirrored team policies of every team where
  the user bills personally (scope = team id, see policies/keyspace.py)
* ``kx:<key>``: a key's spend this period billed to the other account (as ``mx:`` for members)

"Usage records" means the ledger's *and those still in flight*: a settle on an account that is
not loaded (Redis lost it; streams that span the loss settle there) only appends its record to
the account's usage stream, and the writer may not have moved it (or older ones) to PostgreSQL
yet. The rebuild counts them, exactly once (policies/ledger.py), by this argument:

1. read the stream's entries E, up to the id L of the last one (time T0);
2. in one SQL statement (one snapshot S, T1 > T0): the ledger's sums, and which of E's request
   ids S has; the state = S + the entries of E that S lacks;
3. ``load.lua`` (T2) installs it only if the stream has no entry past L, else we go back to 1.

A record is counted once: if S has it, from S only (E's copy is left out by request id). If S
lacks it, it was not committed at T1; then it was in the stream at T0 (the writer deletes an
entry only after committing it, and a record appended after T0 has an id past L and makes step
3 retry), so it is in E and counted from there. None is missed: a record committed before T1 is
in S; one not committed by T1 was in the stream at T0 (as just argued) or came after (retry).
No settle moves this account's counters between T0 and T2 (the account is not loaded, and a
forced reload marks it so first), and every management write holds the account's lock, as we do.

Settles kept in a process's journal (Redis did not take them, gateway/metering/journal.py) are
in neither the ledger nor the stream, so the rebuild leaves them out; replayed later, each is an
ordinary settle on the rebuilt state, unless the ledger already has its record (then it was
applied before and is dropped) or Redis's settle marker says it ran (then ``settle.lua`` changes
nothing). Settles sent again after Redis's run id changed (gateway/metering/recent.py) append
their record and unload the account: the next rebuild counts them by the argument above.

The holds in flight are not rebuilt from PostgreSQL (it has none): ``load.lua`` keeps the hold
hash and sums it again, so a rebuild of a loaded account forgets no reservation.

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
from gateway.errors import StoreUnavailable
from gateway.metering.ledger import ledger_totals, stream_entries
from gateway.metering.scripts import Scripts
from policies import keyspace as rk
from policies import ledger
from policies.ledger import UsageEntry
from policies.limits import (
    KeyControls,
    effective_enforcement,
    effective_member_limit,
    key_entry,
)
from policies.periods import period_of

log = logging.getLogger("modelbridge.accounts")

NO_LIMIT = "-1"
LOAD_ATTEMPTS = 20


async def lock_account(conn: asyncpg.Connection, account: str) -> None:
    """Take the account's advisory lock for the current transaction."""
    await conn.execute("SELECT pg_advisory_xact_lock(hashtext($1))", account)


def _n(value: object) -> str:
    """A PostgreSQL sum as Redis wants it: ``sum(bigint)`` is numeric, which asyncpg decodes to a
    Decimal that may print as ``2.5E+10``; HINCRBY needs plain digits."""
    return str(int(value or 0))  # type: ignore[call-overload]


def _limit(value: int | None) -> str:
    return NO_LIMIT if value is None else str(value)


#: the columns of api_keys (alias k) that :func:`key_controls` reads
KEY_CONTROLS = "k.expires_at, k.models, k.monthly_limit, k.rpm, k.tpm"


def key_controls(row: Mapping[str, Any]) -> KeyControls:
    """A key's controls from its api_keys row (:data:`KEY_CONTROLS`)."""
    expires = row["expires_at"]
    models = row["models"]
    return KeyControls(
        expires_at=None if expires is None else int(expires.timestamp()),
        models=None if models is None else tuple(models),
        monthly_limit=row["monthly_limit"],
        rpm=row["rpm"],
        tpm=row["tpm"],
    )


def key_value(scope: str, row: Mapping[str, Any]) -> str:
    """A key's entry in the key set of the account it bills."""
    return key_entry(scope, key_controls(row))


class Accounts:
    def __init__(self, config: Config, db: asyncpg.Pool, redis: Redis, scripts: Scripts) -> None:
        self.config = config
        self.db = db
        self.redis = redis
        self.scripts = scripts

    # --- rebuild -------------------------------------------------------------------------
    async def load(self, account: str, now: float, *, force: bool = False) -> bool:
        """Install the account's state in Redis unless it is there; True when installed now."""
        async with self.db.acquire() as conn, conn.transaction():
            installed = await self.load_with(conn, account, now, force=force)
        await self.ensure_stream(account)
        if installed:
            log.info("loaded account %s from PostgreSQL", account)
        return installed

    async def load_with(
        self, conn: asyncpg.Connection, account: str, now: float, *, force: bool = False
    ) -> bool:
        """``load`` on the caller's connection, inside its transaction (which then holds the
        account's lock): for management writes that need the live state of an account they
        already locked (a second connection would wait on that lock forever)."""
        period = period_of(now)
        ak = rk.AccountKeys(account)
        await lock_account(conn, account)
        if force:  # holds wait for us (not_loaded -> load -> the lock); settles only append
            await self.redis.hset(ak.state, "loaded", "0")
        for _ in range(LOAD_ATTEMPTS):
            entries, last_id = await stream_entries(self.redis, account)
            snapshot = await self._snapshot(conn, account, period, entries)
            blocked_keys = [ak.blocked(scope) for scope in snapshot["scopes"]]
            payload = {k: snapshot[k] for k in ("state", "period", "cfg", "keys", "blocked")}
            keys = [ak.state, ak.period(period), ak.cfg, ak.keys, ak.hold_expiry, ak.hold_values]
            installed = await self.scripts.load(
                keys=[*keys, ak.usage_stream, *blocked_keys],
                args=[orjson.dumps(payload), rk.PERIOD_TTL_S, "force" if force else "", last_id],
            )
            if installed != -1:
                return bool(installed)
        raise StoreUnavailable(f"account {account}: usage kept arriving; not loaded")

    async def ensure_stream(self, account: str) -> None:
        """Register the account's usage stream and consumer group (again: after a Redis loss
        both are gone, and every account passes through ``load`` first), then ring the doorbell:
        an idle writer waits on the streams it knows, and reads this one at once."""
        stream = rk.AccountKeys(account).usage_stream
        pipe = self.redis.pipeline(transaction=False)
        pipe.sadd(rk.usage_registry(account), stream)
        pipe.xgroup_create(stream, rk.USAGE_GROUP, id="0", mkstream=True)
        pipe.xadd(rk.USAGE_DOORBELL, {"stream": stream}, maxlen=100, approximate=True)
        try:
            await pipe.execute()
        except Exception as exc:  # BUSYGROUP: the group exists already
            if "BUSYGROUP" not in str(exc):
                raise

    async def _snapshot(
        self, conn: asyncpg.Connection, account: str, period: str, entries: list[UsageEntry]
    ) -> dict[str, Any]:
        """The account's state: money from the ledger plus the stream's ``entries`` the ledger
        does not have (policies/ledger.py), read in one statement; policies and keys."""
        totals, allowances, in_ledger = await ledger_totals(
            conn, account, [period], [e.request_id for e in entries]
        )
        ledger.add(totals, ledger.pending(entries, in_ledger))
        # crid: the last credit row counted (gateway/metering/changes.py adds the later ones);
        # credit rows of the account are inserted under its lock, which we hold
        crid = await conn.fetchval(
            "SELECT coalesce(max(id), 0) FROM ledger WHERE account = $1 AND kind = 'credit'",
            account,
        )
        state: dict[str, str] = {
            "credits": str(totals.credits),
            "sub_alw": "0",
            "crid": str(crid),
        }
        cfg: dict[str, str] = {}
        keys: dict[str, str] = {}
        blocked: list[list[str]] = [[]]
        scopes = [""]
        if account.startswith("t_"):
            team_id = account[2:]
            await self._team_snapshot(conn, team_id, state, cfg, keys, blocked)
        else:
            rows = await conn.fetch(
                f"SELECT k.id, k.user_id, {KEY_CONTROLS} FROM api_keys k"
                " WHERE k.user_id = $1 AND k.team_id IS NULL AND k.revoked_at IS NULL",
                account[2:],
            )
            keys.update({r["id"]: key_value(r["user_id"], r) for r in rows})
            for team_id, models in await self._personal_teams(conn, account[2:], cfg, keys):
                scopes.append(team_id)
                blocked.append(models)
        counters = {name: str(value) for name, value in totals.period(period).items()}
        counters["alw"] = str(allowances.get(period, state["sub_alw"]))
        counters.update(await self._elsewhere(conn, account, period))
        return {
            "state": state,
            "period": counters,
            "cfg": cfg,
            "keys": keys,
            "blocked": blocked,
            "scopes": scopes,
        }

    async def _personal_teams(
        self, conn: asyncpg.Connection, user_id: str, cfg: dict[str, str], keys: dict[str, str]
    ) -> list[tuple[str, list[str]]]:
        """Teams where the user bills personally: their team keys, and the team's policies
        mirrored under scope <team id> (policies/keyspace.py). Returns (team id, blocked models)."""
        teams = await conn.fetch(
            "SELECT m.team_id, m.monthly_limit, m.limit_set, m.enforcement, m.rpm, m.tpm,"
            " t.default_member_limit, t.default_enforcement, t.model_restrictions"
            " FROM memberships m JOIN teams t ON t.id = m.team_id"
            " WHERE m.user_id = $1 AND m.removed_at IS NULL AND m.billing_mode = 'personal'"
            " AND t.deleted_at IS NULL",
            user_id,
        )
        found = []
        for t in teams:
            cfg.update(self.mirror_cfg(t["team_id"], t, t))
            found.append((t["team_id"], list(t["model_restrictions"])))
        if found:
            rows = await conn.fetch(
                f"SELECT k.id, k.team_id, {KEY_CONTROLS} FROM api_keys k WHERE k.user_id = $1"
                " AND k.team_id = ANY($2::text[]) AND k.revoked_at IS NULL",
                user_id,
                [team_id for team_id, _ in found],
            )
            keys.update({r["id"]: key_value(r["team_id"], r) for r in rows})
        return found

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
            "SELECT user_id, monthly_limit, limit_set, enforcement, rpm, tpm FROM memberships"
            " WHERE team_id = $1 AND removed_at IS NULL",
            team_id,
        )
        for m in members:
            cfg.update(self.member_cfg(m["user_id"], m))
        rows = await conn.fetch(
            f"SELECT k.id, k.user_id, {KEY_CONTROLS} FROM api_keys k JOIN memberships m"
            " ON m.team_id = k.team_id AND m.user_id = k.user_id AND m.removed_at IS NULL"
            " WHERE k.team_id = $1 AND k.revoked_at IS NULL AND m.billing_mode = 'team'",
            team_id,
        )
        keys.update({r["id"]: key_value(r["user_id"], r) for r in rows})

    @staticmethod
    async def _elsewhere(conn: asyncpg.Connection, account: str, period: str) -> dict[str, str]:
        """``mx:<scope>``: a member's spend this period in the same team billed to the other
        account (team vs personal billing mode), so member limits count both."""
        if account.startswith("t_"):
            query = (
                "SELECT user_id AS g, sum(charged) AS s FROM usage_records"
                " WHERE team_id = $1 AND period = $2 AND account <> $3 GROUP BY user_id"
            )
        else:
            query = (
                "SELECT team_id AS g, sum(charged) AS s FROM usage_records"
                " WHERE user_id = $1 AND period = $2 AND account <> $3 AND team_id IS NOT NULL"
                " GROUP BY team_id"
            )
        rows = await conn.fetch(query, account[2:], period, account)
        found = {"mx:" + r["g"]: _n(r["s"]) for r in rows if r["s"]}
        # kx: the same for each team key (a key's monthly limit counts both accounts)
        column = "team_id" if account.startswith("t_") else "user_id"
        keys = await conn.fetch(
            "SELECT key_id AS g, sum(charged) AS s FROM usage_records"
            f" WHERE {column} = $1 AND period = $2 AND account <> $3 AND team_id IS NOT NULL"
            " GROUP BY key_id",
            account[2:],
            period,
            account,
        )
        found.update({"kx:" + r["g"]: _n(r["s"]) for r in keys if r["s"]})
        return found

    # --- pieces of state, shared by the loader and the management writes ---------------------
    def subscription_allowance(self, plan: str | None, seats: int) -> int:
        spec = self.config.plans.get(plan or "")
        return 0 if spec is None else spec.included_usage_per_seat * seats

    #: the team's cfg fields present only when set (drop them when unset: :meth:`team_cfg`)
    TEAM_RATE_FIELDS = ("rpm", "tpm")

    @staticmethod
    def team_cfg(team: Mapping[str, Any]) -> dict[str, str]:
        """The team's own cfg fields; a rate limit only when set (absent: the hold's common path
        never looks further)."""
        cfg = {
            "limit": _limit(team["spending_limit"]),
            "dml": _limit(team["default_member_limit"]),
            "den": team["default_enforcement"],
            "disc": str(team["discount_bps"]),
        }
        for field, column in (("rpm", "rpm_limit"), ("tpm", "tpm_limit")):
            if team[column] is not None:
                cfg[field] = str(team[column])
        return cfg

    @staticmethod
    def member_fields(scope: str) -> list[str]:
        """Every cfg field of one member scope (to drop those a member no longer has)."""
        return ["ml:" + scope, "me:" + scope, "rpm:" + scope, "tpm:" + scope]

    @staticmethod
    def member_cfg(user_id: str, member: Mapping[str, Any]) -> dict[str, str]:
        """A member's own cfg fields in the team account: limit and enforcement overrides, rate
        limits; absent when not set (see :meth:`set_member_cfg`)."""
        cfg = {}
        if member["limit_set"]:
            cfg["ml:" + user_id] = _limit(member["monthly_limit"])
        if member["enforcement"]:
            cfg["me:" + user_id] = member["enforcement"]
        for name in ("rpm", "tpm"):
            if member[name] is not None:
                cfg[f"{name}:{user_id}"] = str(member[name])
        return cfg

    @staticmethod
    def mirror_cfg(
        team_id: str, member: Mapping[str, Any], team: Mapping[str, Any]
    ) -> dict[str, str]:
        """A personally billing member's limit and enforcement in ``team_id``, resolved, as the
        cfg fields of their user account (``ml:<team>``, ``me:<team>``)."""
        limit = effective_member_limit(
            member["monthly_limit"], member["limit_set"], team["default_member_limit"]
        )
        enforcement = effective_enforcement(member["enforcement"], team["default_enforcement"])
        cfg = {"ml:" + team_id: _limit(limit), "me:" + team_id: enforcement}
        for name in ("rpm", "tpm"):
            if member[name] is not None:
                cfg[f"{name}:{team_id}"] = str(member[name])
        return cfg

    # --- management writes (gateway/metering/changes.py, holding the accounts' locks) ---------
    async def credit_mark(self, account: str) -> tuple[bool, int | None]:
        """Whether the account is loaded, and the id of the last credit ledger row its live
        credits count (``crid``; None when it was loaded without one)."""
        loaded, crid = await self.redis.hmget(rk.AccountKeys(account).state, ["loaded", "crid"])
        return loaded == "1", None if crid is None else int(crid)

    async def add_credits(self, account: str, amount: int, through_id: int) -> None:
        """Count ``amount`` more credits: the credit ledger rows up to id ``through_id``."""
        ak = rk.AccountKeys(account)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hincrby(ak.state, "credits", amount)
        pipe.hset(ak.state, "crid", str(through_id))
        await pipe.execute()

    async def add_keys(self, account: str, keys: Mapping[str, str]) -> None:
        if keys:
            key = rk.AccountKeys(account).keys
            await self.redis.hset(key, mapping=dict(keys))  # type: ignore[arg-type]

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

    async def set_member_cfg(self, account: str, scope: str, fields: Mapping[str, str]) -> None:
        """Make the cfg fields of member ``scope`` exactly ``fields`` (:meth:`member_fields`)."""
        stale = [f for f in self.member_fields(scope) if f not in fields]
        await self.set_cfg(account, fields, delete=stale)

    async def set_blocked(self, account: str, models: Iterable[str], scope: str = "") -> None:
        key = rk.AccountKeys(account).blocked(scope)
        pipe = self.redis.pipeline(transaction=True)
        pipe.delete(key)
        names = list(models)
        if names:
            pipe.sadd(key, *names)
        await pipe.execute()

    async def set_subscription(
        self, account: str, period: str, sub_alw: int, period_alw: int | None
    ) -> None:
        """The subscription allowance ``sub_alw`` (of the periods not fixed yet) and, when the
        ledger pins it, ``period``'s allowance ``period_alw``; one MULTI, so no hold fixes the
        period's allowance from the new ``sub_alw`` in between."""
        ak = rk.AccountKeys(account)
        pipe = self.redis.pipeline(transaction=True)
        pipe.hset(ak.state, "sub_alw", str(sub_alw))
        if period_alw is not None:
            pipe.hset(ak.period(period), "alw", str(period_alw))
            pipe.expire(ak.period(period), rk.PERIOD_TTL_S)
        await pipe.execute()

    async def period_fields(self, account: str, period: str, fields: list[str]) -> list[int]:
        values = await self.redis.hmget(rk.AccountKeys(account).period(period), fields)
        return [int(v or 0) for v in values]

    async def set_period_fields(self, account: str, period: str, fields: Mapping[str, int]) -> None:
        """Set (or, for 0, drop) counters of the period hash: the ``mx:`` baselines."""
        key = rk.AccountKeys(account).period(period)
        pipe = self.redis.pipeline(transaction=True)
        for name, value in fields.items():
            if value:
                pipe.hset(key, name, str(value))
            else:
                pipe.hdel(key, name)
        pipe.expire(key, rk.PERIOD_TTL_S)
        await pipe.execute()

    async def unload(self, account: str) -> None:
        """Forget the account's live state so the next request rebuilds it (team deletion)."""
        await self.redis.hset(rk.AccountKeys(account).state, "loaded", "0")
