"""The proxy's cache of API keys.

API keys are looked up by their SHA-256 (the only form stored) and cached in the process. The
cache never decides whether a key is still valid: the hold script checks the key against its
billing account's live key set in Redis on every request, so a revoked key fails on its very next
request on every gateway process. Revocations are also published so that every process drops the
cached entry (memory hygiene, and the account a key bills can change with the billing mode).
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import time
from dataclasses import dataclass

import asyncpg
from redis.asyncio import Redis
from redis.asyncio.client import PubSub

from gateway.credentials import hash_secret
from gateway.errors import AuthenticationFailed
from policies import key_format
from policies import keyspace as rk

log = logging.getLogger("modelbridge.auth")

NEGATIVE_TTL_S = 10.0
CACHE_MAX = 100_000


@dataclass(frozen=True, slots=True)
class KeyInfo:
    key_id: str
    user_id: str
    team_id: str | None
    account: str  # the billing account: t_<team> or u_<user>
    scope: str  # member scope within the account (see policies/keyspace.py)
    blocked_scope: str = ""  # the account's blocked-model set to check ("" = the account's own)


_KEY_QUERY = """
SELECT k.id, k.hash, k.user_id, k.team_id, m.billing_mode
FROM api_keys k
LEFT JOIN memberships m ON m.team_id = k.team_id AND m.user_id = k.user_id AND m.removed_at IS NULL
LEFT JOIN teams t ON t.id = k.team_id
WHERE k.hash = $1 AND k.revoked_at IS NULL
  AND (k.team_id IS NULL OR (m.id IS NOT NULL AND t.deleted_at IS NULL))
"""


class KeyCache:
    def __init__(self, db: asyncpg.Pool, redis: Redis) -> None:
        self.db = db
        self.redis = redis
        self._by_hash: dict[bytes, KeyInfo] = {}
        self._hash_by_id: dict[str, bytes] = {}
        self._unknown: dict[bytes, float] = {}
        self._listener: asyncio.Task[None] | None = None
        self._stopping = False
        self._pubsub: PubSub | None = None

    def cached(self, secret: str) -> KeyInfo | None:
        """The key's entry when this process has it (no I/O); None means: ask :meth:`lookup`."""
        return self._by_hash.get(hash_secret(secret))

    async def lookup(self, secret: str | None) -> KeyInfo:
        if not secret:
            raise AuthenticationFailed("Incorrect API key provided.")
        digest = hash_secret(secret)
        info = self._by_hash.get(digest)
        if info is not None:  # a cached key was well formed
            return info
        if not key_format.well_formed(secret):  # refuse made-up keys without a lookup
            raise AuthenticationFailed("Incorrect API key provided.")
        miss = self._unknown.get(digest)
        if miss is not None and miss > time.monotonic():
            raise AuthenticationFailed("Incorrect API key provided.")
        info = await self._fetch(digest)
        if info is None:
            if len(self._unknown) > CACHE_MAX:
                self._unknown.clear()
            self._unknown[digest] = time.monotonic() + NEGATIVE_TTL_S
            raise AuthenticationFailed("Incorrect API key provided.")
        if len(self._by_hash) > CACHE_MAX:
            self._by_hash.clear()
            self._hash_by_id.clear()
        self._by_hash[digest] = info
        self._hash_by_id[info.key_id] = digest
        return info

    async def _fetch(self, digest: bytes) -> KeyInfo | None:
        row = await self.db.fetchrow(_KEY_QUERY, digest)
        if row is None or not hmac.compare_digest(bytes(row["hash"]), digest):
            return None
        team_id = row["team_id"]
        user_id = row["user_id"]
        if team_id is None:
            return KeyInfo(row["id"], user_id, None, rk.user_account(user_id), user_id)
        if row["billing_mode"] == "personal":
            # Billed to the user, under the team's policies mirrored in the user's slot.
            return KeyInfo(row["id"], user_id, team_id, rk.user_account(user_id), team_id, team_id)
        return KeyInfo(row["id"], user_id, team_id, rk.team_account(team_id), user_id)

    def forget(self, key_id: str) -> None:
        digest = self._hash_by_id.pop(key_id, None)
        if digest is not None:
            self._by_hash.pop(digest, None)

    def forget_secret(self, secret: str) -> None:
        info = self._by_hash.pop(hash_secret(secret), None)
        if info is not None:
            self._hash_by_id.pop(info.key_id, None)

    async def start(self) -> None:
        self._listener = asyncio.create_task(self._listen(), name="key-invalidation")

    async def stop(self) -> None:
        if self._listener is not None:
            self._stopping = True
            self._listener.cancel()
            # bounded: redis-py's pub/sub listen() can swallow the cancel, and a stop must end
            done, _ = await asyncio.wait({self._listener}, timeout=2.0)
            if not done and self._pubsub is not None:  # its connection closed ends listen()
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(self._pubsub.aclose(), 1.0)

    async def _listen(self) -> None:
        """Until stopped. redis-py may turn the cancel into a connection error (the cancel is
        then used up): the loop ends on ``_stopping`` too, else the event loop's last cancel
        of every task would wait for it forever (a ``serve`` stopped soon after start hung)."""
        task = asyncio.current_task()
        failing = False  # a Redis outage is one line, not one a second
        while not self._stopping:
            try:
                pubsub = self._pubsub = self.redis.pubsub(ignore_subscribe_messages=True)
                await pubsub.subscribe(rk.INVALIDATE_CHANNEL)
                if failing:
                    log.info("key invalidation listener: subscribed again")
                failing = False
                async for message in pubsub.listen():
                    data = message.get("data")
                    if isinstance(data, bytes):
                        data = data.decode()
                    for key_id in str(data or "").split():
                        self.forget(key_id)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # Redis away: the hold check still guards revocation
                if self._stopping or (task is not None and task.cancelling()):
                    return
                (log.debug if failing else log.warning)("key invalidation listener: %s", exc)
                failing = True
                await asyncio.sleep(1.0)
