"""Which Redis process serves each slot, and which slots changed hands (pure).

A Redis's ``run_id`` (``INFO server``) is new each time its process starts: a restart, or on a
cluster a replica promoted in a master's place. Either may have lost the last writes (a restart
without persistence loses everything; an asynchronous replica lacks what it had not received),
so a slot whose serving run id changed may have lost settles (gateway/metering/recent.py).

A view is one run id per slot: on a single node one entry that stands for every slot, on a
cluster ``SLOTS`` entries (None: nobody serves it now, or we could not ask its master).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

View = list[str | None]


def view_of(ranges: Iterable[tuple[int, int, str | None]], size: int) -> View:
    """A view of ``size`` slots from (first slot, last slot, run id) ranges."""
    view: View = [None] * size
    for start, end, run_id in ranges:
        view[start : end + 1] = [run_id] * (end - start + 1)
    return view


def changed(known: Sequence[str | None], seen: Sequence[str | None]) -> tuple[View, set[int]]:
    """(the view to keep, the slots whose run id changed). A slot nobody answered for keeps
    what was known (it is judged when it is served again); a slot known for the first time is
    the baseline, not a change."""
    if len(known) != len(seen):  # first view, or the topology's kind changed: a baseline
        return list(seen), set()
    kept: View = list(known)
    moved: set[int] = set()
    for slot, (before, now) in enumerate(zip(known, seen, strict=True)):
        if now is None or now == before:
            continue
        if before is not None:
            moved.add(slot)
        kept[slot] = now
    return kept, moved
