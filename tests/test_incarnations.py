"""Which slots changed hands between two looks at Redis's run ids (policies/incarnations.py)."""

from __future__ import annotations

import pytest

from policies.incarnations import changed, view_of

A, B, C = "run-a", "run-b", "run-c"


@pytest.mark.parametrize(
    ("known", "seen", "kept", "moved"),
    [
        ([], [A], [A], set()),  # the first look: a baseline
        ([A], [A], [A], set()),
        ([A], [B], [B], {0}),  # restarted
        ([A], [None], [A], set()),  # not answering: judged when it answers again
        ([None], [B], [B], set()),  # never known: a baseline
        ([A, A, B], [A, C, B], [A, C, B], {1}),  # one master's slots failed over
        ([A, A, B], [C, C, None], [C, C, B], {0, 1}),
        ([A, A], [A], [A], set()),  # another kind of topology: a new baseline
    ],
)
def test_changed(
    known: list[str | None], seen: list[str | None], kept: list[str | None], moved: set[int]
) -> None:
    assert changed(known, seen) == (kept, moved)


def test_view_of_ranges() -> None:
    assert view_of([(0, 1, A), (3, 4, B)], 6) == [A, A, None, B, B, None]
