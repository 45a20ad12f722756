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
from typing import Any, TypeVar, cast

from redis import exceptions as redis_errors

from gateway.errors import StoreUnavailable
from gateway.metering.accounts import Accounts
from gateway.metering.scriptclient import FastScript, ScriptError
from gateway.metering.scripts import Scripts
from policies import keyspace as rk

T = TypeVar("T")

KEY_CACHE_MAX = 100_000

_REDIS_DOWN = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    OSError,
)


@dataclass(frozen=True, slots=True)
class HoldAsk:
    """What a hold is asked for: the request, who bills it, its worst-case list cost."""

    account: str
    period: str
    now: float
    request_id: str
    key_id: str
    scope: str
    model: str
    worst_list_cost: int
    blocked_scope: str = ""  # see policies/keyspace.py


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


async def guarded(pending: Awaitable[T]) -> T:
    """Await a Redis call, translating an unreachable or unready Redis to a 503."""
    try:
        return await pending
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
        self._keys: dict[tuple[str, str, str], list[str]] = {}  # hold keys, built once

    def _alerted(self, account: str) -> None:
        if self.on_alert is not None:
            self.on_alert(account)

    async def hold(self, ask: HoldAsk, meanwhile: Callable[[], object] | None = None) -> HoldResult:
        """Place the hold (``hold.lua``). ``meanwhile`` runs once the script is on its way, while
        Redis works (the caller prepares its upstream request there)."""
        keys, args = self._hold_call(ask)
        for _ in range(3):
            sent = self._send(self.scripts.hold, keys, args)
            if meanwhile is not None:
                meanwhile()
                meanwhile = None
            result = self.hold_result(ask.account, await guarded(sent))
            if result.status != "not_loaded":
                return result
            await guarded(self.accounts.load(ask.account, ask.now))
        raise StoreUnavailable("the billing account could not be loaded")

    def hold_now(self, ask: HoldAsk) -> Awaitable[Any] | None:
        """Write ``hold.lua`` to Redis now, without awaiting (``gateway.proxy.front``); None when the
        lean script connection is not open. Await the reply with :func:`guarded`, read it with
        :meth:`hold_result` (``not_loaded`` included: then :meth:`hold` loads the account)."""
        return self._send_now(self.scripts.hold, *self._hold_call(ask))

    def _hold_call(self, ask: HoldAsk) -> tuple[list[str], list[str | int]]:
        keys = self._hold_keys(ask.account, ask.period, ask.blocked_scope)
        args: list[str | int] = [
            int(ask.now), ask.request_id, ask.key_id, ask.scope, ask.model, ask.worst_list_cost,
            self.hold_ttl_s, rk.PERIOD_TTL_S,
        ]  # fmt: skip
        return keys, args

    def hold_result(self, account: str, raw: Any) -> HoldResult:
        if raw[4] == 1:
            self._alerted(account)
        return HoldResult(raw[0], int(raw[1]), int(raw[2]), raw[3] == 1, raw[4] == 1)

    @staticmethod
    def _send_now(script: Any, keys: list[str], args: list[str | int]) -> Awaitable[Any] | None:
        """The script call written to Redis now, or None when the lean connection is not open."""
        return script.send_now(keys, args) if isinstance(script, FastScript) else None

    def _send(self, script: Any, keys: list[str], args: list[str | int]) -> Awaitable[Any]:
        """The script call, already written to Redis when the lean connection is open."""
        sent = self._send_now(script, keys, args)
        return sent if sent is not None else cast(Awaitable[Any], script(keys=keys, args=args))

    def _hold_keys(self, account: str, period: str, blocked_scope: str) -> list[str]:
        cached = self._keys.get((account, period, blocked_scope))
        if cached is None:
            if len(self._keys) >= KEY_CACHE_MAX:
                self._keys.clear()
            ak = rk.AccountKeys(account)
            cached = [
                ak.state, ak.period(period), ak.cfg, ak.keys, ak.blocked(blocked_scope),
                ak.hold_expiry, ak.hold_values, ak.alerts,
            ]  # fmt: skip
            self._keys[(account, period, blocked_scope)] = cached
        return cached

    async def settle(self, **kwargs: Any) -> SettleResult:
        """Replace the request's hold by its cost and record its usage (``settle.lua``).
        Keywords: account, period, request_id, scope, key_id, model, charged, record, warned, at."""
        raw: Any = await guarded(self._send(self.scripts.settle, *self._settle_call(**kwargs)))
        return self._settled(kwargs["account"], raw)

    def settle_sent(self, **kwargs: Any) -> Awaitable[SettleResult] | None:
        """Like :meth:`settle`, but the script is on its way to Redis when this returns (ordered
        before any later hold), so the caller can answer its client before awaiting the result.
        None when that cannot be promised (no lean connection open): call :meth:`settle`."""
        sent = self._send_now(self.scripts.settle, *self._settle_call(**kwargs))
        if sent is None:
            return None
        account = kwargs["account"]

        async def result() -> SettleResult:
            return self._settled(account, await guarded(sent))

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
        return int(await guarded(self.scripts.release(keys=keys, args=[request_id])))
