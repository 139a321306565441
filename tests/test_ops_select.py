"""Exact rank selection (SEMANTICS.md section 3: of a run of equal values that a boundary
splits, the share inside the window is spread evenly over the run in flat-index order).

Expected values are hand-worked, or come from plain-Python references that count and sort (a
formulation entirely unlike the quickselect-and-cumsum code under test).
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesmith.ops.select import (
    rank_window_mask,
    spread_mask,
    tie_averaged_ranks,
    top_k_mask,
)

# Few distinct values so that most windows start or stop inside a run of equal keys; -0.0 and 0.0
# compare equal, so they form one run too.
DUPLICATE_HEAVY = st.sampled_from([-2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 3.0])


def _spread_reference(count: int, need: int) -> list[bool]:
    """The rule as SEMANTICS.md states it, with exact integers: the j-th of `count` tied
    entries is kept when floor((j+1) need / count) > floor(j need / count)."""
    return [(j + 1) * need // count > j * need // count for j in range(count)]


def _window_reference(values: list[float], start: int, stop: int) -> list[bool]:
    """Each run of equal values occupies ranks [P, P + T) of the ascending order; the window
    [start, stop) takes `need` of them, chosen among the run's entries (in index order) by the
    spread rule."""
    n = len(values)
    lo, hi = max(0, start), min(n, stop)
    keep = [False] * n
    for value in sorted(set(values)):
        members = [i for i in range(n) if values[i] == value]
        first = sum(1 for v in values if v < value)
        need = max(0, min(hi, first + len(members)) - max(lo, first))
        for i, kept in zip(members, _spread_reference(len(members), need), strict=True):
            keep[i] = kept
    return keep


def _mask(bits: list[bool]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


def test_top_k_keeps_exactly_the_k_largest() -> None:
    values = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])
    # 9 (index 5), 6 (index 7), 5 (index 4)
    expected = _mask([False, False, False, False, True, True, False, True])
    assert torch.equal(top_k_mask(values, 3), expected)


def test_top_k_tie_at_threshold_is_spread_over_the_run() -> None:
    # k = 2, nothing above 5, three 5s tied (indices 1, 2, 3), need 2: j = 0 has
    # floor(2/3) = 0 = floor(0); j = 1: floor(4/3) = 1 > floor(2/3) = 0; j = 2: 2 > 1.
    values = torch.tensor([2.0, 5.0, 5.0, 5.0, 1.0])
    assert torch.equal(top_k_mask(values, 2), _mask([False, False, True, True, False]))


@pytest.mark.parametrize(
    ("k", "kept"),
    [
        # need 1 of 6: only j = 5 has floor(6/6) = 1 > floor(5/6) = 0.
        (1, [5]),
        # need 3 of 6: floor(3(j+1)/6) steps up at j = 1, 3, 5.
        (3, [1, 3, 5]),
        # need 4 of 6: floor(4(j+1)/6) = 0, 1, 2, 2, 3, 4 for j = 0..5.
        (4, [1, 2, 4, 5]),
        (6, [0, 1, 2, 3, 4, 5]),
    ],
)
def test_top_k_all_equal_keeps_an_evenly_spread_subset(k: int, kept: list[int]) -> None:
    values = torch.full((6,), 7.0)
    assert torch.equal(top_k_mask(values, k), _mask([i in kept for i in range(6)]))


def test_a_tie_filling_a_matrix_is_kept_alike_in_every_row() -> None:
    # 24 equal magnitudes, k = 12: the odd j are kept, three in each row of six. Keeping the
    # lowest indices (round 1) kept rows 0 and 1 whole and dropped rows 2 and 3.
    keep = top_k_mask(torch.full((24,), 0.5), 12).reshape(4, 6)
    assert keep.sum(dim=1).tolist() == [3, 3, 3, 3]
    assert keep[0].tolist() == [False, True, False, True, False, True]


@pytest.mark.parametrize(("k", "kept"), [(0, 0), (-3, 0), (5, 5), (9, 5)])
def test_top_k_out_of_range_k_keeps_none_or_all(k: int, kept: int) -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert int(top_k_mask(values, k).sum()) == kept


def test_rank_window_splits_runs_of_equal_keys_evenly() -> None:
    # Ascending: the two 1s (i1, i3) take ranks 0-1, then 2 (i4), 3 (i2), 5 (i0).
    key = torch.tensor([5.0, 1.0, 3.0, 1.0, 2.0])
    # [1, 3): one of the two 1s (need 1 of 2: j = 1, index 3) and the 2.
    assert torch.equal(rank_window_mask(key, 1, 3), _mask([False, False, False, True, True]))
    # [0, 1): again one of the two 1s, and again the second of them.
    assert torch.equal(rank_window_mask(key, 0, 1), _mask([False, False, False, True, False]))
    assert torch.equal(rank_window_mask(key, 3, 5), _mask([True, False, True, False, False]))


def test_rank_window_inside_one_run_keeps_its_width_spread_over_the_run() -> None:
    # [2, 5) of eight equal keys: need 3 of 8, floor(3(j+1)/8) steps up at j = 2, 5, 7.
    got = rank_window_mask(torch.full((8,), 4.0), 2, 5)
    assert torch.equal(got, _mask([i in (2, 5, 7) for i in range(8)]))


@pytest.mark.parametrize(
    ("start", "stop", "expected"),
    [
        (-4, 2, [False, True, False, True, False]),
        (3, 99, [True, False, True, False, False]),
        (3, 3, [False] * 5),
        (4, 2, [False] * 5),
        (-5, 99, [True] * 5),
    ],
)
def test_rank_window_clips_bounds_to_the_tensor(
    start: int, stop: int, expected: list[bool]
) -> None:
    key = torch.tensor([5.0, 1.0, 3.0, 1.0, 2.0])
    assert torch.equal(rank_window_mask(key, start, stop), _mask(expected))


def test_spread_mask_in_blocks_matches_the_whole() -> None:
    # 10 tied entries, need 4: kept j = 2, 4, 7, 9 (floor(4(j+1)/10) = 0,0,1,1,2,2,2,3,3,4).
    tied = torch.ones(10, dtype=torch.bool)
    whole = spread_mask(tied, 4, 10)
    assert [i for i in range(10) if whole[i]] == [2, 4, 7, 9]
    # The same from blocks of 3, each given (tied entries before it * need) mod 10.
    parts = [spread_mask(tied[s : s + 3], 4, 10, s * 4 % 10) for s in range(0, 10, 3)]
    assert torch.equal(torch.cat(parts), whole)


def test_tie_averaged_ranks_hand_worked_rows() -> None:
    # Row 0 ascending: the 1s (i1, i3) span ranks 0-1 and share 0.5; 2 -> 2, 3 -> 3, 5 -> 4.
    # Row 1: -1 -> 0; the three 0s span 1-3 and share 2; 4 -> 4.
    rows = torch.tensor([[5.0, 1.0, 3.0, 1.0, 2.0], [0.0, 0.0, -1.0, 4.0, 0.0]])
    expected = torch.tensor([[4.0, 0.5, 3.0, 0.5, 2.0], [2.0, 2.0, 0.0, 4.0, 2.0]])
    assert torch.equal(tie_averaged_ranks(rows), expected)


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(DUPLICATE_HEAVY, min_size=1, max_size=40),
    start=st.integers(-3, 43),
    length=st.integers(-2, 43),
)
def test_rank_window_matches_the_reference(values: list[float], start: int, length: int) -> None:
    stop = start + length
    got = rank_window_mask(torch.tensor(values), start, stop)
    assert got.tolist() == _window_reference(values, start, stop)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(DUPLICATE_HEAVY, min_size=1, max_size=40), k=st.integers(-1, 42))
def test_top_k_matches_the_reference(values: list[float], k: int) -> None:
    expected = _window_reference([-v for v in values], 0, k)
    assert top_k_mask(torch.tensor(values), k).tolist() == expected
    assert sum(expected) == max(0, min(k, len(values)))


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 6).flatmap(
        lambda width: st.lists(
            st.lists(DUPLICATE_HEAVY, min_size=width, max_size=width), min_size=1, max_size=4
        )
    )
)
def test_tie_averaged_ranks_count_smaller_and_equal_entries(rows: list[list[float]]) -> None:
    # Rank of x = (entries smaller than x) + (entries equal to x, itself included, - 1) / 2.
    expected = [
        [sum(v < x for v in row) + (sum(v == x for v in row) - 1) / 2 for x in row] for row in rows
    ]
    assert tie_averaged_ranks(torch.tensor(rows)).tolist() == expected


def test_selection_does_not_modify_its_input() -> None:
    key = torch.tensor([5.0, 1.0, 3.0, 1.0, 2.0])
    before = key.clone()
    rank_window_mask(key, 1, 4)
    top_k_mask(key, 2)
    tie_averaged_ranks(key.reshape(1, -1))
    assert torch.equal(key, before)
