"""Metering: hold before the upstream call, settle or release after it, in Redis.

Each step is one Lua script on the billing account's slot (one round trip each). Redis errors are
translated here, and only here, into :class:`gateway.errors.StoreUnavailable`: a request is
never forwarded unmetered.

Limit alerts ride along: the hold and settle scripts append any threshold they cross to the
account's alert stream in the same atomic step, and say so in their reply; ``on_alert`` (the
alert worker's in-memory ``notify``, set in ``app.cleanup_ctx``) is then told the account, with
no I/O on the request path.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar

from redis import exceptions as redis_errors

from gateway.accounts import Accounts
from gateway.errors import StoreUnavailable
from gateway.scriptclient import FastScript, ScriptError
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
    alerted: bool = False


@dataclass(frozen=True, slots=True)
class SettleResult:
    settled: bool
    from_allowance: int
    from_credits: int
    alerted: bool = False


async def guarded(call: Callable[[], Awaitable[T]]) -> T:
    try:
        return await call()
    except _REDIS_DOWN as exc:
        raise StoreUnavailable("the gateway's store is unreachable; request not forwarded") from exc
    except ScriptError as exc:
        if not str(exc).startswith(("LOADING", "BUSY", "MASTERDOWN", "READONLY")):
            raise
        raise StoreUnavailable("the gateway's store is not ready; request not forwarded") from exc


class Metering:
    def __init__(self, scripts: Scripts, accounts: Accounts, hold_ttl_s: int) -> None:
        self.scripts = scripts
        self.accounts = accounts
        self.hold_ttl_s = hold_ttl_s
        self.on_alert: Callable[[str], None] | None = None

    def _alerted(self, account: str) -> None:
        if self.on_alert is not None:
            self.on_alert(account)

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
            ak.hold_expiry, ak.hold_values, ak.alerts,
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
                if raw[4] == 1:
                    self._alerted(account)
                return HoldResult(status, int(raw[1]), int(raw[2]), raw[3] == 1, raw[4] == 1)
            await guarded(lambda: self.accounts.load(account, now))
        raise StoreUnavailable("the billing account could not be loaded")

    async def settle(self, **kwargs: Any) -> SettleResult:
        """Replace the request's hold by its cost and record its usage (``settle.lua``).
        Keywords: account, period, request_id, scope, key_id, model, charged, record, warned, at."""
        keys, args = self._settle_call(**kwargs)
        raw: Any = await guarded(lambda: self.scripts.settle(keys=keys, args=args))
        return self._settled(kwargs["account"], raw)

    def settle_sent(self, **kwargs: Any) -> Awaitable[SettleResult] | None:
        """Like :meth:`settle`, but the script is on its way to Redis when this returns (ordered
        before any later hold), so the caller can answer its client before awaiting the result.
        None when that cannot be promised (no lean connection open): call :meth:`settle`."""
        script = self.scripts.settle
        if not isinstance(script, FastScript):
            return None
        keys, args = self._settle_call(**kwargs)
        sent = script.send_now(keys, args)
        if sent is None:
            return None
        account = kwargs["account"]

        async def result() -> SettleResult:
            return self._settled(account, await guarded(lambda: sent))

        return result()

    @staticmethod
    def _settle_call(
        *,
        account: str,
        period: str,
        request_id: str,
        scope: str,
        key_id: str,
        model: str,
        charged: int,
        record: list[str | int],
        warned: bool = False,
        at: int = 0,
    ) -> tuple[list[str], list[str | int]]:
        ak = rk.AccountKeys(account)
        keys = [
            ak.state, ak.period(period), ak.hold_expiry, ak.hold_values,
            ak.settled_marker(request_id), ak.usage_stream, ak.cfg, ak.alerts,
        ]  # fmt: skip
        args: list[str | int] = [
            request_id, charged, scope, key_id, model, rk.PERIOD_TTL_S, rk.RID_TTL_S,
            int(warned), at, *record,
        ]  # fmt: skip
        return keys, args

    def _settled(self, account: str, raw: Any) -> SettleResult:
        if raw[3]:
            self._alerted(account)
        return SettleResult(raw[0] == 1, int(raw[1]), int(raw[2]), raw[3] > 0)

    async def release(self, *, account: str, request_id: str) -> int:
        ak = rk.AccountKeys(account)
        keys = [ak.state, ak.hold_expiry, ak.hold_values]
        return int(await guarded(lambda: self.scripts.release(keys=keys, args=[request_id])))
