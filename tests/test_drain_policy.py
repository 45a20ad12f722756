"""policies.drain: one read's budget shared among streams, and acknowledgements in groups."""

from __future__ import annotations

import pytest

from policies import drain


@pytest.mark.parametrize(
    ("lengths", "budget", "turn", "counts"),
    [
        # not measured yet: an equal share each (50 streams, 2000: 40 each, not 2000 each)
        ([None] * 50, 2000, 0, [40] * 50),
        ([None, None, None], 10, 0, [3, 3, 3]),
        # a backlog: water-filled, a stream asking less than a share gets what it asks
        ([1000, 1000], 100, 0, [50, 50]),
        ([5, 1000, 1000], 100, 0, [5, 47, 48]),
        # streams measured empty still get one (a record may have come since); the rest to the
        # busy stream
        ([0, 0, 5000, 0], 100, 0, [1, 1, 97, 1]),
        # nobody asks for the whole budget: what is left is spread evenly
        ([3, 0], 100, 0, [3 + 48, 1 + 48]),
        # one stream: the whole budget
        ([None], 7, 0, [7]),
        ([], 7, 0, []),
        # more streams than the budget: the backlog gets what the idle streams leave (at most
        # half); idle streams one record each, in turn
        ([0, 0, 0, 0, 0, 90], 4, 0, [1, 1, 0, 0, 0, 2]),
        ([0, 0, 0, 0, 0, 90], 4, 1, [0, 0, 1, 1, 0, 2]),
        ([0, 0, 0, 0, 0, 90], 4, 2, [1, 0, 0, 0, 1, 2]),
        # more backlog streams than their part of the budget: one each, in turn
        ([9, 9, 9, 9, 9], 3, 0, [1, 1, 1, 0, 0]),
        ([9, 9, 9, 9, 9], 3, 1, [1, 0, 0, 1, 1]),
        ([None] * 5, 2, 2, [1, 0, 0, 0, 1]),
    ],
)
def test_read_counts(lengths: list[int | None], budget: int, turn: int, counts: list[int]) -> None:
    assert drain.read_counts(lengths, budget, turn) == counts
    assert sum(counts) <= budget


@pytest.mark.parametrize("n", [1, 3, 49, 50, 51, 1999, 2000, 2001, 5000])
@pytest.mark.parametrize("busy", [0, 1, 7])
def test_read_counts_never_exceed_the_budget(n: int, busy: int) -> None:
    lengths: list[int | None] = [10_000 if i < busy else 0 for i in range(n)]
    for turn in range(3):
        counts = drain.read_counts(lengths, 2000, turn)
        assert len(counts) == n
        assert sum(counts) <= 2000
        assert min(counts) >= 0
        if n <= 2000:  # every stream named in every read
            assert min(counts) >= 1


def test_every_idle_stream_is_named_within_a_few_reads() -> None:
    lengths: list[int | None] = [0] * 5000
    named: set[int] = set()
    for turn in range(3):
        named |= {i for i, c in enumerate(drain.read_counts(lengths, 2000, turn)) if c}
    assert named == set(range(5000))


@pytest.mark.parametrize(
    ("demands", "budget", "counts"),
    [
        ([1, 1, 1], 10, [1, 1, 1]),
        ([10, 10], 5, [2, 3]),
        ([1, 100, 100], 11, [1, 5, 5]),
        ([0, 4], 3, [0, 3]),
        ([], 3, []),
    ],
)
def test_water_fill(demands: list[int], budget: int, counts: list[int]) -> None:
    assert drain.water_fill(demands, budget) == counts


@pytest.mark.parametrize(
    ("n", "size", "sizes"),
    [(0, 16, []), (5, 16, [5]), (16, 16, [16]), (17, 16, [16, 1]), (600, 16, [16] * 37 + [8])],
)
def test_groups(n: int, size: int, sizes: list[int]) -> None:
    parts = drain.groups(list(range(n)), size)
    assert [len(p) for p in parts] == sizes
    assert [x for p in parts for x in p] == list(range(n))


def test_bad_sizes_are_refused() -> None:
    with pytest.raises(ValueError):
        drain.groups([1], 0)
    with pytest.raises(ValueError):
        drain.read_counts([1], 0)
