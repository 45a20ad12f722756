"""Metering: hold before the upstream call, settle or release after it, in Redis.

Each step is one Lua script on the billing account's slot (one round trip each). Redis errors are
translated here, and only here, into :class:`gateway.errors.StoreUnavailable`: a request is
never forwarded unmetered.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis import exceptions as redis_errors

from gateway.accounts import Accounts
from gateway.errors import StoreUnavailable
from gateway.scripts import Scripts
from policies import keys as rk

T = TypeVar("T")

_REDIS_DOWN = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    OSError,
)


@dataclass(frozen=True, slots=True)
class HoldResult:
    status: str  # "ok" or a refusal code
    amount: int
    discount_bps: int
    warn: bool


@dataclass(frozen=True, slots=True)
class SettleResult:
    settled: bool
    from_allowance: int
    from_credits: int


async def guarded(call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except _REDIS_DOWN as exc:
        raise StoreUnavailable("the gateway's store is unreachable; request not forwarded") from exc


class Metering:
    def __init__(self, scripts: Scripts, accounts: Accounts, hold_ttl_s: int) -> None:
        self.scripts = scripts
        self.accounts = accounts
        self.hold_ttl_s = hold_ttl_s

    async def hold(
        self,
        *,
        account: str,
        period: str,
        now: float,
        request_id: str,
        key_id: str,
        scope: str,
        model: str,
        worst_list_cost: int,
        blocked_scope: str = "",
    ) -> HoldResult:
        ak = rk.AccountKeys(account)
        keys = [
            ak.state, ak.period(period), ak.cfg, ak.keys, ak.blocked(blocked_scope),
            ak.hold_expiry, ak.hold_values,
        ]  # fmt: skip
        args: list[str | int] = [
            int(now),
            request_id,
            key_id,
            scope,
            model,
            worst_list_cost,
            self.hold_ttl_s,
            rk.PERIOD_TTL_S,
        ]
        for _ in range(3):
            raw: Any = await guarded(lambda: self.scripts.hold(keys=keys, args=args))
            status = raw[0]
            if status != "not_loaded":
                return HoldResult(status, int(raw[1]), int(raw[2]), raw[3] == 1)
            await guarded(lambda: self.accounts.load(account, now))
        raise StoreUnavailable("the billing account could not be loaded")

    async def settle(
        self,
        *,
        account: str,
        period: str,
        request_id: str,
        scope: str,
        key_id: str,
        model: str,
        charged: int,
        record: list[str | int],
    ) -> SettleResult:
        ak = rk.AccountKeys(account)
        keys = [
            ak.state, ak.period(period), ak.hold_expiry, ak.hold_values,
            ak.settled_marker(request_id), ak.usage_stream,
        ]  # fmt: skip
        args = [request_id, charged, scope, key_id, model, rk.PERIOD_TTL_S, rk.RID_TTL_S, *record]
        raw: Any = await guarded(lambda: self.scripts.settle(keys=keys, args=args))
        return SettleResult(raw[0] == 1, int(raw[1]), int(raw[2]))

    async def release(self, *, account: str, request_id: str) -> int:
        ak = rk.AccountKeys(account)
        keys = [ak.state, ak.hold_expiry, ak.hold_values]
        return int(await guarded(lambda: self.scripts.release(keys=keys, args=[request_id])))
