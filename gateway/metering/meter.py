"""Metering: hold before the upstream call, settle or release after it, in Redis.

Each step is one Lua script on the billing account's slot (one round trip each). Redis errors are
translated here, and only here, into :class:`gateway.errors.StoreUnavailable`: a request is
never forwarded unmetered.

A settle Redis cannot take (unreachable, an error, no answer in time) is never lost: it is kept
in the :class:`~gateway.metering.journal.SettleJournal` and sent again by :meth:`Metering.replay`
(run every fraction of a second by :meth:`Metering.run` while anything is kept) once Redis answers;
the caller is told ``kept=True`` and goes on answering its client.

A settle Redis took is kept a while too (:class:`~gateway.metering.recent.RecentSettles`): when
the run id of the Redis serving its account changes (a restart, a failover), :meth:`Metering.watch`
sends it again, in case that Redis lost it before its record reached PostgreSQL; why that is
exact, and its window, is argued in gateway/metering/recent.py.

Limit alerts ride along: the hold and settle scripts append any threshold they cross to the
account's alert stream in the same atomic step, and say so in their reply; ``on_alert`` (the
alert worker's in-memory ``notify``, set in ``app.cleanup_ctx``) is then told the account, with
no I/O on the request path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, TypeVar, cast

from redis import exceptions as redis_errors

from gateway.errors import StoreUnavailable
from gateway.metering.accounts import Accounts
from gateway.metering.incarnations import Incarnations
from gateway.metering.journal import SettleCall, SettleJournal
from gateway.metering.recent import RecentSettles, kept_record, resettle_calls
from gateway.metering.scriptclient import FastScript, ScriptError
from gateway.metering.scripts import Scripts
from policies import keyspace as rk
from policies.ratelimits import WINDOW_MS, RateView, Usage
from policies.translate.responses_api import Note

T = TypeVar("T")

log = logging.getLogger("modelbridge.metering")

KEY_CACHE_MAX = 100_000

_REDIS_DOWN = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    OSError,
)


# Error replies of a Redis (or a Redis Cluster) that cannot serve the slot right now.
_NOT_READY = ("LOADING", "BUSY", "MASTERDOWN", "READONLY", "CLUSTERDOWN", "TRYAGAIN", "MOVED ")


@dataclass(slots=True)  # per request: frozen's __init__ is ~5x slower
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
    tokens: int = 0  # worst-case tokens (prompt + output cap), for TPM limits


@dataclass(slots=True)  # per request: frozen's __init__ is ~5x slower
class SettleAsk:
    """What a settle is asked for: the request's cost, who bills it, and its usage record (as
    ``settle.lua`` takes it: policies/usage_record.py's ``opened``)."""

    account: str
    period: str
    request_id: str
    scope: str
    key_id: str
    model: str
    charged: int
    record: str
    warned: bool = False  # the hold warned (soft limit exceeded): no second alert
    at: int = 0  # unix seconds of the request, for alert events
    tokens: int = 0  # the actual tokens, for the rate logs
    note: Note | None = None  # a stored response's note, kept in the same step (settle.lua)


@dataclass(slots=True)  # per request: frozen's __init__ is ~5x slower
class HoldResult:
    status: str  # "ok" or a refusal code
    amount: int
    discount_bps: int
    warn: bool
    alerted: bool = False
    retry_after: int = 0  # seconds, for rate_limit_exceeded
    stamp_ms: int = 0  # the rate-limit stamp, when a rate limit applies
    # When a rate limit applies, the x-ratelimit-* figures as the hold's reply gives them: limit,
    # remaining, reset ms for requests, then for tokens (a limit < 0: no such limit). Kept as
    # they come (no RateView per request); the lean front renders them with
    # gateway.proxy.ratelines, the rest reads :attr:`rate`.
    figures: list[int] | None = None

    @property
    def rate(self) -> RateView | None:
        """The x-ratelimit-* figures, when a rate limit applies (built on each call)."""
        figures = self.figures
        if figures is None:
            return None
        limit_r, left_r, reset_r, limit_t, left_t, reset_t = figures
        return RateView(
            None if limit_r < 0 else Usage(limit_r, left_r, reset_r),
            None if limit_t < 0 else Usage(limit_t, left_t, reset_t),
        )


@dataclass(slots=True)  # per request: frozen's __init__ is ~5x slower
class SettleResult:
    settled: bool
    from_allowance: int
    from_credits: int
    alerted: bool = False
    kept: bool = False  # Redis did not take it: kept in the journal, sent again later


async def guarded(pending: Awaitable[T]) -> T:
    """Await a Redis call, translating an unreachable or unready Redis to a 503."""
    try:
        return await pending
    except _REDIS_DOWN as exc:
        raise StoreUnavailable("the gateway's store is unreachable; request not forwarded") from exc
    except ScriptError as exc:
        if not str(exc).startswith(_NOT_READY):
            raise
        raise StoreUnavailable("the gateway's store is not ready; request not forwarded") from exc


class Metering:
    def __init__(
        self,
        scripts: Scripts,
        accounts: Accounts,
        hold_ttl_s: int,
        journal: SettleJournal | None = None,
    ) -> None:
        self.scripts = scripts
        self.accounts = accounts
        self.hold_ttl_s = hold_ttl_s
        self.response_notes_s = rk.RESPONSE_NOTE_TTL_S  # 0: no notes kept (config.metering)
        self.journal = journal if journal is not None else SettleJournal(None, "memory")
        self._kept = asyncio.Event()
        self.recent = RecentSettles()
        self.incarnations: Incarnations | None = None  # None: Redis's run id is not watched
        self._due: set[int] = set()  # slots whose recent settles are to be sent again
        self._resettle: set[str] = set()  # kept settles to send again as resettle.lua does
        self._seen_at: float | None = None  # when Redis last answered the watch
        self._away_from: float | None = None
        self.on_alert: Callable[[str], None] | None = None
        self._keys: dict[tuple[str, ...], list[str]] = {}  # hold keys, built once
        # settle keys, built once: those before the request's marker, its prefix, those after
        self._settle_keys: dict[tuple[str, ...], tuple[tuple[str, ...], str, tuple[str, ...]]] = {}

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
        """Write ``hold.lua`` to Redis now, without awaiting (``gateway.proxy.front``); None when
        the lean script connection is not open. Await the reply with :func:`guarded`, read it
        with :meth:`hold_result` (``not_loaded`` included: then :meth:`hold` loads the
        account)."""
        return self._send_now(self.scripts.hold, *self._hold_call(ask))

    def _hold_call(self, ask: HoldAsk) -> tuple[list[str], list[str | int]]:
        keys = self._hold_keys(ask)
        args: list[str | int] = [
            int(ask.now),
            ask.request_id,
            ask.key_id,
            ask.scope,
            ask.model,
            ask.worst_list_cost,
            self.hold_ttl_s,
            rk.PERIOD_TTL_S,
            int(ask.now * 1000),
            ask.tokens,
            WINDOW_MS,
        ]
        return keys, args

    def hold_result(self, account: str, raw: Any) -> HoldResult:
        if raw[4] == 1:
            self._alerted(account)
        if len(raw) == 5:
            return HoldResult(raw[0], int(raw[1]), int(raw[2]), raw[3] == 1, raw[4] == 1)
        # Integer replies come as ints: no int(), and the rate figures kept as a slice of the
        # reply (this runs on every request of a limited key).
        return HoldResult(
            raw[0], raw[1], raw[2], raw[3] == 1, raw[4] == 1, raw[5], raw[6], raw[7:13]
        )

    @staticmethod
    def _send_now(script: Any, keys: list[str], args: list[str | int]) -> Awaitable[Any] | None:
        """The script call written to Redis now, or None when the lean connection is not open."""
        return script.send_now(keys, args) if isinstance(script, FastScript) else None

    def _send(self, script: Any, keys: list[str], args: list[str | int]) -> Awaitable[Any]:
        """The script call, already written to Redis when the lean connection is open."""
        sent = self._send_now(script, keys, args)
        return sent if sent is not None else cast(Awaitable[Any], script(keys=keys, args=args))

    def _hold_keys(self, ask: HoldAsk) -> list[str]:
        index = (ask.account, ask.period, ask.blocked_scope, ask.key_id, ask.scope)
        cached = self._keys.get(index)
        if cached is None:
            if len(self._keys) >= KEY_CACHE_MAX:
                self._keys.clear()
            ak = rk.AccountKeys(ask.account)
            cached = [
                ak.state,
                ak.period(ask.period),
                ak.cfg,
                ak.keys,
                ak.blocked(ask.blocked_scope),
                ak.hold_expiry,
                ak.hold_values,
                ak.alerts,
                *ak.rate_keys(ask.key_id, ask.scope),
            ]
            self._keys[index] = cached
        return cached

    async def settle(self, ask: SettleAsk) -> SettleResult:
        """Replace the request's hold by its cost and record its usage (``settle.lua``).
        Never raises for Redis's sake: a settle Redis does not take is kept and sent again."""
        call = self._settle_call(ask)
        try:
            sent = self._send(self.scripts.settle, call.keys, call.args)
        except Exception as exc:
            return self._keep(call, exc)
        return await self._settled_or_kept(call, sent)

    def settle_sent(self, ask: SettleAsk) -> Awaitable[SettleResult] | None:
        """Like :meth:`settle`, but the script is on its way to Redis when this returns (ordered
        before any later hold), so the caller can answer its client before awaiting the result.
        None when that cannot be promised (no lean connection open): call :meth:`settle`."""
        call = self._settle_call(ask)
        sent = self._send_now(self.scripts.settle, call.keys, call.args)
        if sent is None:
            return None
        return self._settled_or_kept(call, sent)

    async def _settled_or_kept(self, call: SettleCall, sent: Awaitable[Any]) -> SettleResult:
        try:
            raw = await sent  # not through guarded(): whatever fails is kept either way
        except asyncio.CancelledError:
            self.journal.keep(call)  # it may or may not have run: replaying is safe
            raise
        except Exception as exc:  # guarded() would wrap these, and _keep name the cause
            return self._keep(call, exc, isinstance(exc, (*_REDIS_DOWN, ScriptError)))
        return self._settled(call, raw)

    def _keep(self, call: SettleCall, exc: Exception, unwrapped: bool = False) -> SettleResult:
        reason = repr(exc if unwrapped else exc.__cause__ or exc)
        if self.journal.keep(call):
            log.warning("settle of %s kept for later: %s", call.request_id, reason)
            self._kept.set()
        return SettleResult(True, 0, 0, kept=True)

    def _settle_call(self, ask: SettleAsk) -> SettleCall:
        index = (ask.account, ask.period, ask.key_id, ask.scope)
        cached = self._settle_keys.get(index)
        if cached is None:
            if len(self._settle_keys) >= KEY_CACHE_MAX:
                self._settle_keys.clear()
            ak = rk.AccountKeys(ask.account)
            cached = self._settle_keys[index] = (
                (ak.state, ak.period(ask.period), ak.hold_expiry, ak.hold_values),
                ak.settled_marker(""),
                (ak.usage_stream, ak.cfg, ak.alerts, *ak.rate_keys(ask.key_id, ask.scope)),
            )
        before, marker, after = cached
        keys = [*before, marker + ask.request_id, *after]  # each call its own list (kept)
        args: list[str | int] = [
            ask.request_id,
            ask.charged,
            ask.scope,
            ask.key_id,
            ask.model,
            rk.PERIOD_TTL_S,
            rk.RID_TTL_S,
            int(ask.warned),
            ask.at,
            ask.tokens,
            ask.record,
        ]
        note = ask.note
        if note is not None and self.response_notes_s > 0:
            keys.append(rk.AccountKeys(ask.account).response(note.response_id))
            args += [note.encode(), self.response_notes_s]
        return SettleCall(ask.account, ask.request_id, keys, args)

    # --- the kept settles -------------------------------------------------------------------------
    async def replay(self) -> int:
        """Send the kept settles again, oldest first; how many are done with (settled now, settled
        before, or in the ledger already). Stops at the first one Redis does not take."""
        calls = list(self.journal)
        if not calls:
            return 0
        in_ledger = await self._in_ledger([c.request_id for c in calls])
        done = 0
        for call in calls:
            if call.request_id not in in_ledger:
                try:
                    if call.request_id in self._resettle:  # its Redis may be gone: see recent.py
                        await self.resend(call.account, [(call.request_id, kept_record(call))])
                        self.recent.add(call, 0, int(call.args[1]), time.monotonic())
                    else:
                        raw = await guarded(self._send(self.scripts.settle, call.keys, call.args))
                        self._settled(call, raw)
                except StoreUnavailable:
                    break
                except Exception as exc:  # an error reply (OOM, a script bug): try again later
                    log.error("kept settle of %s refused again: %r", call.request_id, exc)
                    break
            self._resettle.discard(call.request_id)
            self.journal.done(call.request_id)
            done += 1
        if done:
            log.info("%d kept settles done; %d left", done, len(self.journal))
        return done

    async def _in_ledger(self, request_ids: list[str]) -> set[str]:
        """The request ids whose usage record PostgreSQL has (an empty set when it is away: the
        settle marker in Redis still stops a second settle)."""
        try:
            async with asyncio.timeout(2):
                rows = await self.accounts.db.fetch(
                    "SELECT request_id FROM usage_records WHERE request_id = ANY($1::text[])",
                    request_ids,
                )
        except Exception:
            return set()
        return {r["request_id"] for r in rows}

    async def run(
        self, stop: asyncio.Event, every_s: float = 0.25, watch_every_s: float = 2.0
    ) -> None:
        """Watch Redis's run id and replay kept settles until ``stop``; a last replay before
        returning. A kept settle is replayed only once the watch has seen whether Redis is
        the one that may have run it (then as ``settle.lua``) or another (as ``resettle.lua``)."""
        while not stop.is_set():
            try:
                answered = await self.watch()
            except Exception:
                log.exception("watching Redis's run id failed")
                answered = False
            if len(self.journal) and answered:
                try:
                    await self.replay()
                except Exception:
                    log.exception("replaying kept settles failed")
            if len(self.journal):
                await _wait(stop, every_s)
            else:
                self._kept.clear()
                await _wait_any(stop, self._kept, watch_every_s)
        with contextlib.suppress(Exception):
            async with asyncio.timeout(2):
                await self.replay()

    async def watch(self) -> bool:
        """Ask for Redis's run ids; send the recent settles of slots whose run id changed again
        (and mark the kept ones of those slots to be replayed so). False when Redis did not
        answer (or the re-send failed: it is tried again on the next call)."""
        watched = self.incarnations
        if watched is None:
            return True
        now = time.monotonic()
        moved = await watched.look()
        if moved is None:
            if self._away_from is None:
                self._away_from = self._seen_at if self._seen_at is not None else now
            return False
        if self._away_from is not None:  # the time Redis was away does not count
            self.recent.pause(now - self._away_from)
            self._away_from = None
        self._seen_at = now
        if moved:
            self._due |= moved
            self._resettle.update(
                c.request_id for c in self.journal if watched.slot_of(c.account) in moved
            )
        if self._due:
            try:
                await self._resend_recent(self._due)
            except Exception as exc:
                log.warning("sending recent settles again failed (%r); retrying", exc)
                return False
            self._due = set()
        self.recent.prune(now)
        return True

    async def _resend_recent(self, slots: set[int]) -> None:
        assert self.incarnations is not None
        settles = self.recent.of_slots(slots, self.incarnations.slot_of)
        in_ledger = await self._in_ledger([s.request_id for s in settles]) if settles else set()
        by_account: dict[str, list[tuple[str, list[str | int]]]] = {}
        for s in settles:
            if s.request_id not in in_ledger:
                by_account.setdefault(s.account, []).append((s.request_id, s.record))
        appended = 0
        for account, items in by_account.items():
            appended += await self.resend(account, items)
        log.warning(
            "Redis run id changed (%d slots): %d recent settles sent again, %d of them lost there",
            len(slots),
            len(settles),
            appended,
        )

    async def resend(self, account: str, items: list[tuple[str, list[str | int]]]) -> int:
        """``resettle.lua`` for (request id, record) of ``account``; how many were appended."""
        appended = 0
        for keys, args in resettle_calls(account, items):
            appended += int(await guarded(self.scripts.resettle(keys=keys, args=args)))
        if appended:
            self.recent.resent += appended
            await guarded(self.accounts.ensure_stream(account))  # for the writer, at once
        return appended

    def _settled(self, call: SettleCall, raw: Any) -> SettleResult:
        if raw[3]:
            self._alerted(call.account)
        if raw[0] == 1:
            self.recent.add(call, raw[1], raw[2], time.monotonic())
        return SettleResult(raw[0] == 1, int(raw[1]), int(raw[2]), raw[3] > 0)

    async def release(self, *, account: str, request_id: str, key_id: str, scope: str) -> int:
        ak = rk.AccountKeys(account)
        keys = [ak.state, ak.hold_expiry, ak.hold_values, *ak.rate_keys(key_id, scope)]
        return int(await guarded(self.scripts.release(keys=keys, args=[request_id])))

    async def recall(self, account: str, response_id: str) -> Note | None:
        """The note settle.lua kept of a stored response ``account`` made (None: no note)."""
        key = rk.AccountKeys(account).response(response_id)
        return Note.decode(response_id, await guarded(self.accounts.redis.get(key)))

    async def count_refusal(self, account: str, period: str, key_id: str, code: str) -> None:
        """One more request of ``key_id`` refused with ``code`` this period (shown with the key;
        informational: never fails the refusal, not rebuilt after a Redis loss)."""
        key = rk.AccountKeys(account).refusals(period)
        try:
            pipe = self.accounts.redis.pipeline(transaction=False)
            pipe.hincrby(key, f"{key_id}|{code}", 1)
            pipe.expire(key, rk.PERIOD_TTL_S)
            await pipe.execute()
        except Exception as exc:  # Redis away: the refusal itself still stands
            log.debug("refusal of %s not counted: %r", key_id, exc)


async def _wait(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)


async def _wait_any(stop: asyncio.Event, other: asyncio.Event, seconds: float) -> None:
    waits = [asyncio.ensure_future(stop.wait()), asyncio.ensure_future(other.wait())]
    try:
        await asyncio.wait(waits, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
