"""How the usage writer shares one read among many streams, and how it acknowledges them.

``XREADGROUP``'s ``COUNT`` applies to each stream the command names, not to the whole read: one
read naming 50 streams with ``COUNT 2000`` could return 100,000 records, an insert too big to
finish within the write timeout (retried whole, forever: the backlog never drained). So each
read gets a budget (the writer's batch) and :func:`read_counts` splits it among the streams:

* every stream may have received records since it was last measured, so each gets at least one
  when there are fewer streams than the budget (no account waits behind a busy one);
* the rest goes to the streams with a backlog (their last measured length), water-filled: a
  stream asking less than an equal share gets what it asks, the others share what is left;
* what nobody asked for is spread evenly (a stream may have grown since it was measured);
* with more streams than the budget, half of it (at least) goes to the backlog and the other
  streams are named in turn, one record each, a different window every read (``turn``).

The counts add up to at most the budget. A length is XLEN, which also counts records another
consumer read and has not acknowledged yet: an over-estimate costs a smaller read, never more.

Acknowledgements go out :data:`ACK_AT_ONCE` streams at a time (:func:`groups`): one ack per
stream at once for hundreds of streams needed as many Redis connections as streams and
exhausted the client's pool.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TypeVar

T = TypeVar("T")

ACK_AT_ONCE = 16


def groups(items: Sequence[T], size: int = ACK_AT_ONCE) -> list[Sequence[T]]:
    """``items`` in consecutive groups of at most ``size``."""
    if size < 1:
        raise ValueError("size must be at least 1")
    return [items[i : i + size] for i in range(0, len(items), size)]


def water_fill(demands: Sequence[int], budget: int) -> list[int]:
    """What each demand gets of ``budget``: all of it when it is below an equal share of what is
    left, else that share (whole numbers, the remainder to the largest demands)."""
    counts = [0] * len(demands)
    left = budget
    order = sorted(range(len(demands)), key=lambda i: (demands[i], i))
    for done, i in enumerate(order):
        share = left // (len(order) - done)
        counts[i] = min(max(demands[i], 0), share)
        left -= counts[i]
    return counts


def _in_turn(indices: Sequence[int], k: int, turn: int) -> list[int]:
    """``k`` of ``indices``: window number ``turn`` of ``k`` each (wrapping), so consecutive turns
    name consecutive windows."""
    if not indices or k <= 0:
        return []
    start = (turn * k) % len(indices)
    rotated = [*indices[start:], *indices[:start]]
    return rotated[:k]


def read_counts(lengths: Sequence[int | None], budget: int, turn: int = 0) -> list[int]:
    """The ``COUNT`` of each stream in the next read (0: not named this time), from each one's
    last measured length (None: not measured yet); they add up to at most ``budget``."""
    if budget < 1:
        raise ValueError("budget must be at least 1")
    n = len(lengths)
    known = [max(length or 0, 0) for length in lengths]
    if n <= budget:
        counts = water_fill([max(k, 1) for k in known], budget)
        spare = budget - sum(counts)
        return [c + spare // n for c in counts]
    counts = [0] * n
    backlog = [i for i in range(n) if known[i] > 0]
    idle = [i for i in range(n) if known[i] == 0]
    for_backlog = budget - min(len(idle), budget // 2)
    if len(backlog) <= for_backlog:
        filled = water_fill([known[i] for i in backlog], for_backlog)
        for i, c in zip(backlog, filled, strict=True):
            counts[i] = c
    else:
        for i in _in_turn(backlog, for_backlog, turn):
            counts[i] = 1
    for i in _in_turn(idle, budget - sum(counts), turn):
        counts[i] = 1
    return counts
