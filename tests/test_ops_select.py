"""Exact rank selection (SEMANTICS.md section 3: ties at a boundary go by flat index).

Expected values are hand-worked or come from Python's `sorted`, which is a full stable sort: a
formulation entirely unlike the two-quickselect code under test.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesmith.ops.select import rank_window_mask, stable_ranks, top_k_mask

# Few distinct values so that most windows start or stop inside a run of equal keys; -0.0 and 0.0
# compare equal, so they too must be ordered by index.
DUPLICATE_HEAVY = st.sampled_from([-2.0, -1.0, -0.0, 0.0, 0.5, 1.0, 3.0])


def _stable_window_reference(values: list[float], start: int, stop: int) -> list[bool]:
    n = len(values)
    order = sorted(range(n), key=lambda i: (values[i], i))
    lo, hi = max(0, start), min(n, stop)
    chosen = set(order[lo:hi]) if lo < hi else set()
    return [i in chosen for i in range(n)]


def _top_k_reference(values: list[float], k: int) -> list[bool]:
    order = sorted(range(len(values)), key=lambda i: (-values[i], i))
    chosen = set(order[: max(0, k)])
    return [i in chosen for i in range(len(values))]


def _mask(bits: list[bool]) -> torch.Tensor:
    return torch.tensor(bits, dtype=torch.bool)


def test_top_k_keeps_exactly_the_k_largest() -> None:
    values = torch.tensor([3.0, 1.0, 4.0, 1.0, 5.0, 9.0, 2.0, 6.0])
    # 9 (index 5), 6 (index 7), 5 (index 4)
    expected = _mask([False, False, False, False, True, True, False, True])
    assert torch.equal(top_k_mask(values, 3), expected)


def test_top_k_tie_at_threshold_keeps_lower_index() -> None:
    values = torch.tensor([2.0, 5.0, 5.0, 5.0, 1.0])
    assert torch.equal(top_k_mask(values, 2), _mask([False, True, True, False, False]))


def test_top_k_all_equal_keeps_a_prefix() -> None:
    values = torch.full((6,), 7.0)
    assert torch.equal(top_k_mask(values, 4), _mask([True] * 4 + [False] * 2))


@pytest.mark.parametrize(("k", "kept"), [(0, 0), (-3, 0), (5, 5), (9, 5)])
def test_top_k_out_of_range_k_keeps_none_or_all(k: int, kept: int) -> None:
    values = torch.tensor([1.0, 2.0, 3.0, 4.0, 5.0])
    assert int(top_k_mask(values, k).sum()) == kept


def test_rank_window_counts_equal_keys_in_index_order() -> None:
    # Stable ascending order: idx1 (1), idx3 (1), idx4 (2), idx2 (3), idx0 (5).
    key = torch.tensor([5.0, 1.0, 3.0, 1.0, 2.0])
    assert torch.equal(rank_window_mask(key, 1, 3), _mask([False, False, False, True, True]))
    assert torch.equal(rank_window_mask(key, 0, 1), _mask([False, True, False, False, False]))
    assert torch.equal(rank_window_mask(key, 3, 5), _mask([True, False, True, False, False]))


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


def test_stable_ranks_hand_worked_rows() -> None:
    rows = torch.tensor([[5.0, 1.0, 3.0, 1.0, 2.0], [0.0, 0.0, -1.0, 4.0, 0.0]])
    expected = torch.tensor([[4, 0, 3, 1, 2], [1, 2, 0, 4, 3]])
    assert torch.equal(stable_ranks(rows), expected)


@settings(max_examples=150, deadline=None)
@given(
    values=st.lists(DUPLICATE_HEAVY, min_size=1, max_size=40),
    start=st.integers(-3, 43),
    length=st.integers(-2, 43),
)
def test_rank_window_matches_full_stable_sort(values: list[float], start: int, length: int) -> None:
    stop = start + length
    got = rank_window_mask(torch.tensor(values), start, stop)
    assert got.tolist() == _stable_window_reference(values, start, stop)


@settings(max_examples=100, deadline=None)
@given(values=st.lists(DUPLICATE_HEAVY, min_size=1, max_size=40), k=st.integers(-1, 42))
def test_top_k_matches_full_stable_sort(values: list[float], k: int) -> None:
    assert top_k_mask(torch.tensor(values), k).tolist() == _top_k_reference(values, k)


@settings(max_examples=60, deadline=None)
@given(
    rows=st.integers(1, 4).flatmap(
        lambda width: st.lists(
            st.lists(DUPLICATE_HEAVY, min_size=width, max_size=width), min_size=1, max_size=4
        )
    )
)
def test_stable_ranks_match_full_stable_sort(rows: list[list[float]]) -> None:
    expected = []
    for row in rows:
        order = sorted(range(len(row)), key=lambda i: (row[i], i))
        ranks = [0] * len(row)
        for rank, index in enumerate(order):
            ranks[index] = rank
        expected.append(ranks)
    assert stable_ranks(torch.tensor(rows)).tolist() == expected


def test_selection_does_not_modify_its_input() -> None:
    key = torch.tensor([5.0, 1.0, 3.0, 1.0, 2.0])
    before = key.clone()
    rank_window_mask(key, 1, 4)
    top_k_mask(key, 2)
    stable_ranks(key.reshape(1, -1))
    assert torch.equal(key, before)
