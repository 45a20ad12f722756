"""Recent settles, sent again when the Redis that took them may have lost them.

A settle Redis acknowledged lives, until the usage writer has moved its record to PostgreSQL,
only in Redis: its usage stream holds the record, the account's counters its cost. A Redis that
restarts without persistence, or a cluster master that fails over to a replica that had not
received the last writes, loses it: the client was served and nobody pays. So each gateway
process keeps the settles Redis acknowledged recently (:class:`RecentSettles`, in memory) and
watches the run id of the Redis serving each slot (gateway/metering/incarnations.py). When it
changes, :meth:`gateway.metering.meter.Metering.watch` sends the settles of that slot again
through ``resettle.lua``, one call per account; so are the settles the process still keeps in
its journal for that slot (gateway/metering/journal.py: Redis did not take them, and they may
or may not have run on the Redis that is gone).

Why the result is exact. For a settle S of request R on account A, sent again:

* If the new Redis has R's settle marker, S ran there (settle.lua sets the marker in the same
  atomic step as it moves A's counters and appends the record; replication and persistence keep
  a script's writes together): resettle.lua does nothing for it. No double charge.
* Else resettle.lua sets the marker, appends S's record to A's usage stream exactly as settle.lua
  appended it (same request id, same split between allowance and credits), and marks A not
  loaded. Whatever A's state holds now (nothing after a loss; a replica's or a snapshot's older
  state after a failover or an old persistence file), it is not used again: the next request
  rebuilds A from the ledger plus its stream, counting each request id once
  (gateway/metering/accounts.py: if the ledger has R — the writer had moved S's record before the
  loss, or moves it from a batch it read before the loss — the stream's copy is left out; if not,
  the stream's copy counts). The writer inserts each request id once (``ON CONFLICT
  (request_id) DO NOTHING``; the daily rollup adds only rows it inserted), so the ledger and the
  rollup have R once too. No lost charge, no double charge, whichever order the rebuild, the
  writer and the re-send run in; a rebuild that read the stream before the re-send appended
  sees the new entry and reads again (load.lua).
* The hold of R, if the new Redis still has it, is dropped with it; the other holds in flight
  survive the rebuild (load.lua sums them again), so no limit is passed meanwhile.

What it does not cover (the window): a settle is kept ``window_s`` seconds of Redis seen alive
with the same run id after it (a Redis that is away stops the clock), and at most
``max_entries`` of them (the oldest go first); a settle acknowledged before that, whose record
the writer had not moved to PostgreSQL when Redis lost it (the writer far behind, PostgreSQL
away longer than the window), is lost, as is everything a process kept in memory when that
process dies at the same time as Redis. ``modelbridge reconcile`` cannot see such a loss either
(both sides lack the record). The run id is asked every ``watch_every_s``; the time Redis takes
to come back, or a replica to be promoted, does not count against the window. A Redis that lost
its data but kept its process (``FLUSHALL``, a ``DEBUG RELOAD`` from an old file) keeps its run
id and is not noticed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from gateway.metering.journal import RECORD_AT, SettleCall
from policies import keyspace as rk
from policies import usage_record


@dataclass(slots=True)  # per request: frozen's __init__ is ~5x slower
class RecentSettle:
    """A settle Redis acknowledged: the call's arguments as sent and the split Redis answered.
    Its usage record is built only if it has to be sent again (:attr:`record`), never on the hot
    path. The call's keys are not kept (``resettle.lua``'s come from the account): 20,000
    entries held 22.7 MiB with them, 16.4 without (README, performance)."""

    account: str
    request_id: str
    args: list[str | int]  # settle.lua's ARGV, the call's own list (not a copy)
    from_allowance: int
    from_credits: int
    at: float  # monotonic seconds, when it was acknowledged

    @property
    def record(self) -> list[str | int]:
        """The fields ``settle.lua`` appended to the usage stream (``r``, the record with its
        split)."""
        return _record(self.args, self.from_allowance, self.from_credits)


def record_of(call: SettleCall, from_allowance: int, from_credits: int) -> list[str | int]:
    """The usage stream entry ``settle.lua`` appended for ``call`` (``r``, the record with its
    split)."""
    return _record(call.args, from_allowance, from_credits)


def _record(args: list[str | int], from_allowance: int, from_credits: int) -> list[str | int]:
    closed = usage_record.closed(str(args[RECORD_AT]), from_allowance, from_credits)
    return [usage_record.RECORD, closed]


def kept_record(call: SettleCall) -> list[str | int]:
    """The entry for a kept settle that never got a reply: as ``settle.lua`` appends it on an
    account that is not loaded (all from credits; the rebuild counts it so)."""
    return record_of(call, 0, int(call.args[1]))


class RecentSettles:
    def __init__(self, window_s: float = 30.0, max_entries: int = 20_000) -> None:
        self.window_s = window_s
        self.max_entries = max_entries
        self.entries: deque[RecentSettle] = deque()
        self.resent = 0  # settles appended again (resettle.lua found no marker)

    def __len__(self) -> int:
        return len(self.entries)

    def add(self, call: SettleCall, from_allowance: int, from_credits: int, now: float) -> None:
        self.entries.append(
            RecentSettle(
                call.account, call.request_id, call.args, from_allowance, from_credits, now
            )
        )
        if len(self.entries) > self.max_entries:
            self.entries.popleft()

    def prune(self, now: float) -> None:
        """Forget the settles acknowledged more than ``window_s`` before ``now``."""
        horizon = now - self.window_s
        while self.entries and self.entries[0].at < horizon:
            self.entries.popleft()

    def pause(self, seconds: float) -> None:
        """Redis was away (or not asked) for ``seconds``: that time does not count."""
        if seconds > 0:
            self.entries = deque(
                RecentSettle(
                    e.account,
                    e.request_id,
                    e.args,
                    e.from_allowance,
                    e.from_credits,
                    e.at + seconds,
                )
                for e in self.entries
            )

    def of_slots(self, slots: set[int], slot_of: Callable[[str], int]) -> list[RecentSettle]:
        return [e for e in self.entries if slot_of(e.account) in slots]


def resettle_calls(
    account: str, settles: Iterable[tuple[str, list[str | int]]], per_call: int = 100
) -> list[tuple[list[str], list[str | int]]]:
    """``resettle.lua``'s keys and arguments for (request id, record) of one account, at most
    ``per_call`` settles a call."""
    ak = rk.AccountKeys(account)
    head = [ak.state, ak.hold_expiry, ak.hold_values, ak.usage_stream]
    calls: list[tuple[list[str], list[str | int]]] = []
    keys: list[str] = []
    args: list[str | int] = []
    for request_id, record in settles:
        if not keys:
            keys, args = list(head), [rk.RID_TTL_S]
        keys.append(ak.settled_marker(request_id))
        args += [request_id, len(record), *record]
        if len(keys) - len(head) == per_call:
            calls.append((keys, args))
            keys = []
    if keys:
        calls.append((keys, args))
    return calls
