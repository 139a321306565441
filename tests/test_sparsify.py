"""Sparsifiers against SEMANTICS.md section 3.

Deterministic ones are checked on hand-worked tensors; random ones statistically, with tolerances
of four to five standard deviations so a change of RNG stream cannot make them flaky.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesmith.ops.sparsify import (
    della_magprune,
    magnitude,
    magnitude_outliers,
    random_keep,
    rescale_l1,
)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _nonzero_delta(n: int, seed: int) -> torch.Tensor:
    # Bounded away from zero so "kept" is exactly "nonzero in the output".
    g = _gen(seed)
    magnitudes = torch.rand(n, generator=g) + 0.1
    signs = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0)
    return magnitudes * signs


# ---------------------------------------------------------------------------------------------
# magnitude (TIES trim)

# |.| descending: 4.0 (i5), 3.0 (i1), 2.5 (i7), 2.0 (i3), 1.5 (i9), 1.0 (i2), 0.5 (i0), ...
TEN = _t([0.5, -3.0, 1.0, 2.0, -0.1, 4.0, 0.0, -2.5, 0.2, 1.5])


def test_magnitude_keeps_the_k_largest_in_absolute_value() -> None:
    expected = _t([0.0, -3.0, 0.0, 0.0, 0.0, 4.0, 0.0, -2.5, 0.0, 0.0])
    assert torch.equal(magnitude(TEN, 0.3), expected)


def test_magnitude_tie_at_threshold_is_spread_over_the_tied_entries() -> None:
    # Four entries share |2| (indices 1, 2, 3, 5), nothing is larger, k = 3: need 3 of T = 4.
    # The j-th tied entry is kept when floor(3(j+1)/4) > floor(3j/4): 0 > 0 no, 1 > 0, 2 > 1,
    # 3 > 2: j = 1, 2, 3, i.e. indices 2, 3, 5.
    delta = _t([1.0, -2.0, 2.0, -2.0, 0.5, 2.0])
    assert torch.equal(magnitude(delta, 0.5), _t([0.0, 0.0, 2.0, -2.0, 0.0, 2.0]))


def test_magnitude_ranks_a_matrix_by_flat_index() -> None:
    delta = torch.tensor([[2.0, 1.0], [2.0, -2.0]])
    # k = 2 among three |2| at flat indices 0, 2, 3 (row-major): need 2 of 3 keeps j = 1, 2
    # (floor(4/3) = 1 > floor(2/3) = 0, floor(6/3) = 2 > 1), flat indices 2 and 3.
    assert torch.equal(magnitude(delta, 0.5), torch.tensor([[0.0, 0.0], [2.0, -2.0]]))


def test_magnitude_tie_spread_gives_every_row_its_share() -> None:
    # Rows of |0.5| ties under a larger first column: k = 4 + 8 keeps the four 1s and 8 of the
    # 16 tied entries; spread evenly (j odd) that is two per row, where keeping the lowest
    # indices (round 1) kept rows 0 and 1 whole and nothing of rows 2 and 3.
    delta = torch.full((4, 5), -0.5)
    delta[:, 0] = 1.0
    kept = magnitude(delta, 12 / 20) != 0
    assert kept[:, 0].all()
    assert kept[:, 1:].sum(dim=1).tolist() == [2, 2, 2, 2]
    assert kept[0, 1:].tolist() == [False, True, False, True]


def test_magnitude_keeps_at_least_one_entry() -> None:
    # floor(0.05 * 10) = 0, so k = max(1, 0) = 1.
    assert torch.equal(magnitude(TEN, 0.05), _t([0.0] * 5 + [4.0] + [0.0] * 4))


@pytest.mark.parametrize("density", [0.0, -0.5])
def test_magnitude_density_at_most_zero_keeps_none(density: float) -> None:
    assert torch.equal(magnitude(TEN, density), torch.zeros(10))


@pytest.mark.parametrize("density", [1.0, 1.5])
def test_magnitude_density_at_least_one_passes_unchanged(density: float) -> None:
    assert torch.equal(magnitude(TEN, density), TEN)


@pytest.mark.parametrize("density", [0.01, 0.1, 0.29, 0.3, 0.5, 0.7, 0.99])
def test_magnitude_keeps_exactly_max_1_floor_d_n(density: float) -> None:
    delta = _nonzero_delta(100, seed=3)
    kept = magnitude(delta, density)
    k = max(1, math.floor(density * 100))
    assert int((kept != 0).sum()) == k
    # Kept entries are untouched and every one is at least as large as every dropped one.
    assert torch.equal(kept[kept != 0], delta[kept != 0])
    assert delta[kept != 0].abs().min() >= delta[kept == 0].abs().max()


def test_magnitude_rescale_restores_l1_by_hand() -> None:
    # Keeps -4 and 3 (L1 7) of a vector with L1 10.
    got = magnitude(_t([1.0, -2.0, 3.0, -4.0]), 0.5, rescale=True)
    torch.testing.assert_close(got, _t([0.0, 0.0, 30.0 / 7.0, -40.0 / 7.0]))


# ---------------------------------------------------------------------------------------------
# magnitude_outliers (breadcrumbs)

# |.| ascending: 0.1 (i0), 0.2 (i6), 0.3 (i3), 0.4 (i8), 0.5 (i2), 0.6 (i9), 0.7 (i5),
# 0.8 (i7), 0.9 (i1), 1.0 (i4)
CRUMBS = _t([0.1, -0.9, 0.5, 0.3, -1.0, 0.7, -0.2, 0.8, 0.4, -0.6])


def test_breadcrumbs_drops_top_outliers_and_smallest() -> None:
    # target = 5, n_top = 2, n_bot = 3: keep ascending positions 3..7.
    expected = _t([0.0, 0.0, 0.5, 0.0, 0.0, 0.7, 0.0, 0.8, 0.4, -0.6])
    assert torch.equal(magnitude_outliers(CRUMBS, 0.5, gamma=0.2), expected)


def test_breadcrumbs_with_no_top_outliers_keeps_the_largest() -> None:
    # gamma N = 0.1 so n_top = 0: mergekit < 0.1.5 zeroed everything here; the spec keeps the top 5.
    got = magnitude_outliers(CRUMBS, 0.5, gamma=0.01)
    expected = _t([0.0, -0.9, 0.0, 0.0, -1.0, 0.7, 0.0, 0.8, 0.0, -0.6])
    assert torch.equal(got, expected)


def test_breadcrumbs_default_gamma_is_one_percent() -> None:
    delta = _nonzero_delta(300, seed=5)
    assert torch.equal(magnitude_outliers(delta, 0.5), magnitude_outliers(delta, 0.5, gamma=0.01))
    # n_top = 3, n_bot = 147: exactly the three largest entries go from the top.
    kept = magnitude_outliers(delta, 0.5)
    ascending = delta.abs().sort().values
    assert torch.equal(kept.abs()[kept != 0].sort().values, ascending[147:297])


def test_breadcrumbs_n_bot_clamps_at_zero() -> None:
    # target = 9, n_top = 2, n_bot = max(0, -1) = 0: positions 0..8 stay, only the largest goes.
    expected = CRUMBS.clone()
    expected[4] = 0.0
    assert torch.equal(magnitude_outliers(CRUMBS, 0.9, gamma=0.2), expected)


def test_breadcrumbs_ties_at_either_bound_are_spread_over_their_run() -> None:
    # |.|: 1 at indices 0, 3, 7; 2 at 1, 5, 8; 3 at 2, 4, 6, 9. N = 10, target 5, n_top 2,
    # n_bot 3: ascending positions [3, 8) are the three 2s (positions 3-5) and two of the four
    # 3s (positions 6-7 of the run's 6-9): need 2 of 4 keeps j = 1, 3 (floor(2(j+1)/4) steps
    # up there), indices 4 and 9.
    delta = _t([1.0, -2.0, 3.0, 1.0, -3.0, 2.0, 3.0, -1.0, 2.0, -3.0])
    expected = _t([0.0, -2.0, 0.0, 0.0, -3.0, 2.0, 0.0, 0.0, 2.0, -3.0])
    assert torch.equal(magnitude_outliers(delta, 0.5, gamma=0.2), expected)


def test_breadcrumbs_window_inside_one_run_keeps_its_width_spread_over_the_run() -> None:
    # Ten equal magnitudes, target 3, n_top 2, n_bot 5: the window [5, 8) lies inside the one
    # run, which keeps 3 of 10: j = 3, 6, 9 (floor(3(j+1)/10) = 1, 2, 3 first there).
    delta = _t([1.0, -1.0] * 5)
    kept = magnitude_outliers(delta, 0.3, gamma=0.2)
    assert [i for i in range(10) if kept[i] != 0] == [3, 6, 9]


def test_breadcrumbs_density_one_passes_unchanged_even_with_gamma() -> None:
    assert torch.equal(magnitude_outliers(CRUMBS, 1.0, gamma=0.3), CRUMBS)


def test_breadcrumbs_density_zero_keeps_none() -> None:
    assert torch.equal(magnitude_outliers(CRUMBS, 0.0, gamma=0.2), torch.zeros(10))


@settings(max_examples=80, deadline=None)
@given(
    n=st.integers(1, 60),
    density=st.floats(0.0, 0.999),
    gamma=st.floats(0.0, 0.5),
    seed=st.integers(0, 2**16),
)
def test_breadcrumbs_keeps_the_spec_window_of_magnitudes(
    n: int, density: float, gamma: float, seed: int
) -> None:
    delta = _nonzero_delta(n, seed)
    target = math.floor(density * n)
    n_top = math.floor(gamma * n)
    n_bot = max(0, n - target - n_top)
    kept = magnitude_outliers(delta, density, gamma=gamma)
    ascending = sorted(abs(v) for v in delta.tolist())
    # Compared as multisets so the check holds whatever order equal magnitudes take.
    assert sorted(abs(v) for v in kept.tolist() if v != 0) == ascending[n_bot : n_bot + target]
    assert all(k in (0.0, d) for k, d in zip(kept.tolist(), delta.tolist(), strict=True))


# ---------------------------------------------------------------------------------------------
# random (DARE)


def test_random_keeps_about_density_fraction() -> None:
    delta = _nonzero_delta(20000, seed=1)
    kept = random_keep(delta, 0.3, 11)
    fraction = float((kept != 0).float().mean())
    # sigma = sqrt(0.3 * 0.7 / 20000) ~ 0.0032
    assert abs(fraction - 0.3) < 0.016
    # Kept values are the originals, not scaled.
    assert torch.equal(kept[kept != 0], delta[kept != 0])


def test_random_keep_is_uniform_over_positions() -> None:
    delta = _nonzero_delta(20000, seed=2)
    kept = (random_keep(delta, 0.6, 12) != 0).float()
    # Large and small entries alike: DARE ignores magnitude.
    big = delta.abs() > delta.abs().median()
    assert abs(float(kept[big].mean()) - 0.6) < 0.025
    assert abs(float(kept[~big].mean()) - 0.6) < 0.025


def test_random_same_seed_same_mask_different_seed_different_mask() -> None:
    delta = _nonzero_delta(1000, seed=4)
    first = random_keep(delta, 0.5, 7)
    again = random_keep(delta, 0.5, 7)
    other = random_keep(delta, 0.5, 8)
    assert torch.equal(first, again)
    assert not torch.equal(first != 0, other != 0)


def test_random_density_bounds() -> None:
    delta = _nonzero_delta(500, seed=6)
    assert torch.equal(random_keep(delta, 1.0, 0), delta)
    assert torch.equal(random_keep(delta, 0.0, 0), torch.zeros(500))


# ---------------------------------------------------------------------------------------------
# della_magprune (DELLA)

# |.| ranks within the row: i3 -> 0, i0 -> 1, i4 -> 2, i2 -> 3, i1 -> 4.
DELLA_ROW = [0.3, -2.0, 1.0, 0.1, -0.7]
DELLA_RANKS = [1, 4, 3, 0, 2]


def _della_expected(density: float, epsilon: float, width: int) -> list[float]:
    # Linear in rank from d - eps (rank 0) to d + eps (rank width - 1).
    return [density - epsilon + 2 * epsilon * rank / (width - 1) for rank in DELLA_RANKS[:width]]


def test_della_keep_probability_rises_linearly_with_rank_in_each_row() -> None:
    rows = torch.tensor([DELLA_ROW] * 4000)
    kept = della_magprune(rows, 0.5, 0.2, 21) != 0
    frequency = kept.float().mean(dim=0).tolist()
    expected = _della_expected(0.5, 0.2, 5)  # 0.4, 0.7, 0.6, 0.3, 0.5
    for got, want in zip(frequency, expected, strict=True):
        assert abs(got - want) < 0.035, (frequency, expected)


def test_della_ranks_within_a_row_not_across_the_tensor() -> None:
    # Alternate tiny and huge rows: a tensor-wide ranking would keep the tiny rows far less often.
    row = torch.tensor(DELLA_ROW)
    rows = torch.stack([row * 1e-3, row * 1e3] * 2000)
    kept = (della_magprune(rows, 0.5, 0.2, 22) != 0).float()
    expected = _della_expected(0.5, 0.2, 5)
    for half in (kept[0::2], kept[1::2]):
        for got, want in zip(half.mean(dim=0).tolist(), expected, strict=True):
            assert abs(got - want) < 0.05


def test_della_one_dimensional_tensor_is_one_row() -> None:
    delta = torch.tensor(DELLA_ROW)
    counts = torch.zeros(5)
    draws = 3000
    for seed in range(draws):
        counts += (della_magprune(delta, 0.5, 0.2, seed) != 0).float()
    for got, want in zip((counts / draws).tolist(), _della_expected(0.5, 0.2, 5), strict=True):
        assert abs(got - want) < 0.045


def test_della_equal_magnitudes_share_their_mean_rank() -> None:
    # Row |.| = [1, 1, 1, 1, 2]: the four 1s span ranks 0-3 and all take 1.5, so each is kept
    # with 0.3 + 0.4 * 1.5 / 4 = 0.45 (ranking them by index gave 0.3, 0.4, 0.5, 0.6); the 2
    # has rank 4: 0.7.
    rows = torch.tensor([[1.0, -1.0, 1.0, -1.0, 2.0]] * 4000)
    frequency = (della_magprune(rows, 0.5, 0.2, 24) != 0).float().mean(dim=0).tolist()
    for got, want in zip(frequency, [0.45, 0.45, 0.45, 0.45, 0.7], strict=True):
        assert abs(got - want) < 0.035, frequency


def test_della_row_of_length_one_keeps_with_probability_density() -> None:
    column = torch.ones(4000, 1) * 0.5
    kept = della_magprune(column, 0.3, 0.2, 23) != 0
    # d - eps would be 0.1, d + eps 0.5.
    assert abs(float(kept.float().mean()) - 0.3) < 0.035
    single = torch.tensor([0.5])
    hits = sum(int(della_magprune(single, 0.3, 0.2, s).item() != 0) for s in range(2000))
    assert abs(hits / 2000 - 0.3) < 0.05


def test_della_density_one_passes_unchanged() -> None:
    delta = torch.tensor([DELLA_ROW, DELLA_ROW])
    assert torch.equal(della_magprune(delta, 1.0, 0.15, 0), delta)


def test_della_same_seed_same_result() -> None:
    delta = _nonzero_delta(600, seed=9).reshape(20, 30)
    assert torch.equal(della_magprune(delta, 0.4, 0.1, 5), della_magprune(delta, 0.4, 0.1, 5))
    kept = della_magprune(delta, 0.4, 0.1, 5)
    assert torch.equal(kept[kept != 0], delta[kept != 0])


# ---------------------------------------------------------------------------------------------
# rescale and purity, across all sparsifiers

Sparsifier = Callable[[torch.Tensor, float, bool], torch.Tensor]
SPARSIFIERS: dict[str, Sparsifier] = {
    "magnitude": lambda d, density, rescale: magnitude(d, density, rescale),
    "magnitude_outliers": lambda d, density, rescale: magnitude_outliers(d, density, 0.1, rescale),
    "random": lambda d, density, rescale: random_keep(d, density, 3, rescale),
    "della_magprune": lambda d, density, rescale: della_magprune(
        d, density, min(0.1, density / 2, (1 - density) / 2), 3, rescale
    ),
}


def test_rescale_l1_by_hand() -> None:
    got = rescale_l1(_t([1.0, -2.0, 3.0]), _t([0.0, -2.0, 0.0]))
    assert torch.equal(got, _t([0.0, -6.0, 0.0]))


def test_rescale_when_nothing_is_kept_stays_zero() -> None:
    assert torch.equal(rescale_l1(_t([1.0, -2.0]), torch.zeros(2)), torch.zeros(2))


@settings(max_examples=60, deadline=None)
@given(
    name=st.sampled_from(sorted(SPARSIFIERS)),
    values=st.lists(
        st.floats(0.01, 10.0).flatmap(lambda m: st.sampled_from([m, -m])), min_size=2, max_size=40
    ),
    density=st.floats(0.05, 0.95),
)
def test_rescale_restores_l1_norm_and_scales_kept_entries_uniformly(
    name: str, values: list[float], density: float
) -> None:
    delta = _t(values)
    plain = SPARSIFIERS[name](delta, density, False)
    scaled = SPARSIFIERS[name](delta, density, True)
    kept = plain != 0
    # Same entries survive; rescaling only multiplies them.
    assert torch.equal(scaled != 0, kept)
    if not kept.any():
        return
    torch.testing.assert_close(scaled.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)
    factor = delta.abs().sum() / delta[kept].abs().sum()
    torch.testing.assert_close(scaled[kept], delta[kept] * factor, rtol=1e-5, atol=0)


@pytest.mark.parametrize("name", sorted(SPARSIFIERS))
@pytest.mark.parametrize("rescale", [False, True])
def test_sparsifiers_do_not_modify_their_input(name: str, rescale: bool) -> None:
    delta = _nonzero_delta(64, seed=8).reshape(8, 8)
    before = delta.clone()
    SPARSIFIERS[name](delta, 0.4, rescale)
    assert torch.equal(delta, before)
    kept = torch.zeros(64)
    rescale_l1(delta, kept)
    assert torch.equal(delta, before)
