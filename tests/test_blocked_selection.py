"""Exact selection over tensors larger than one block, checked against a reference in numpy.

The fused kernel finds magnitude cuts from a sample and one counting sweep; these cases force
its hard paths: heavy ties (as in bf16 deltas), cuts that split a run of equal values across
blocks (whose kept share is then spread over the whole run, SEMANTICS.md 3), and samples that
mislead the bracket so the sweep must widen and rerun.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from mergesmith.methods.task_arithmetic import merge_task_vectors
from mergesmith.ops.blocks import BLOCK
from mergesmith.ops.rank_cut import CutRequest, find_cuts, sample_positions


def spread(members: np.ndarray, need: int) -> np.ndarray:
    """The members (indices in increasing order) that SEMANTICS.md 3 keeps: the j-th when
    floor((j+1) need / T) > floor(j need / T)."""
    j = np.arange(members.size, dtype=np.int64)
    return members[((j + 1) * need) // members.size > (j * need) // members.size]


def reference_window(values: np.ndarray, start: int, stop: int) -> np.ndarray:
    """Entries whose ascending rank lies in [start, stop), each run of equal values giving the
    window its overlap, spread over the run: one run at a time, by counting."""
    keep = np.zeros(values.size, dtype=bool)
    for value in np.unique(values):
        members = np.flatnonzero(values == value)
        first = int((values < value).sum())
        need = max(0, min(stop, first + members.size) - max(start, first))
        keep[spread(members, need)] = True
    return keep


def reference_top_k(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest |delta|, the ties at the k-th spread evenly."""
    keep = reference_window(-delta.abs().numpy(), 0, k)
    return torch.where(torch.from_numpy(keep), delta, torch.zeros(()))


def reference_breadcrumbs(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = delta.numel()
    target, n_top = math.floor(density * n), math.floor(gamma * n)
    n_bottom = max(0, n - target - n_top)
    keep = reference_window(delta.abs().numpy(), n_bottom, n_bottom + target)
    return torch.where(torch.from_numpy(keep), delta, torch.zeros(()))


def trimmed(delta: torch.Tensor, sparsifier: str, density: float, gamma: float = 0.0):
    base = torch.zeros_like(delta)
    return merge_task_vectors(
        base, [delta], [1.0], densities=[density], sparsifier=sparsifier, gammas=[gamma]
    )


@pytest.mark.parametrize("density", [0.1, 0.5, 0.77])
def test_magnitude_with_heavy_ties_across_blocks_matches_the_reference(density: float) -> None:
    g = torch.Generator().manual_seed(1)
    n = 2 * BLOCK + 12_345
    # 21 distinct magnitudes over 500k entries: every cut splits a long run of equal values.
    delta = torch.randint(-10, 11, (n,), generator=g).float() * 0.125
    k = max(1, math.floor(density * n))
    got = trimmed(delta, "magnitude", density)
    assert torch.equal(got, reference_top_k(delta, k))
    assert int((got != 0).sum()) <= k


def test_magnitude_small_case_matches_the_reference() -> None:
    delta = torch.tensor([0.5, -0.5, 0.25, 0.5, -0.125, 0.0, 0.5, -0.25])
    assert torch.equal(trimmed(delta, "magnitude", 0.5), reference_top_k(delta, 4))
    # By hand: the four |0.5| (indices 0, 1, 3, 6) fill k = 4 exactly.
    assert torch.equal(trimmed(delta, "magnitude", 0.5), torch.where(delta.abs() == 0.5, delta, 0))


def test_a_tie_run_split_across_blocks_keeps_its_share_in_each_block() -> None:
    # One run of equal magnitudes fills three blocks and a bit; k keeps 40% of it. Each block
    # must keep about 40% of its entries, not the first blocks all and the last none.
    n = 3 * BLOCK + 1000
    delta = torch.full((n,), 0.25)
    delta[1::2] *= -1
    got = trimmed(delta, "magnitude", 0.4)
    assert int((got != 0).sum()) == math.floor(0.4 * n)
    for start in range(0, n, BLOCK):
        share = float((got[start : start + BLOCK] != 0).float().mean())
        assert abs(share - 0.4) < 1e-3, (start, share)


@pytest.mark.parametrize(("density", "gamma"), [(0.4, 0.05), (0.9, 0.1), (0.3, 0.0)])
def test_breadcrumbs_window_with_heavy_ties_matches_the_reference(
    density: float, gamma: float
) -> None:
    g = torch.Generator().manual_seed(2)
    n = BLOCK + 70_001
    delta = torch.randint(-6, 7, (n,), generator=g).float() * 0.5
    assert torch.equal(
        trimmed(delta, "magnitude_outliers", density, gamma),
        reference_breadcrumbs(delta, density, gamma),
    )


def test_breadcrumbs_window_inside_one_run_across_blocks() -> None:
    # Both ends of the window in the single run of equal magnitudes.
    n = 2 * BLOCK + 3
    delta = torch.full((n,), -0.75)
    assert torch.equal(
        trimmed(delta, "magnitude_outliers", 0.3, 0.2),
        reference_breadcrumbs(delta, 0.3, 0.2),
    )


def test_a_misleading_sample_still_gives_the_exact_cut() -> None:
    # The sample reads evenly spaced positions; put the large values exactly there, so the
    # sample's quantiles say "everything is large" and the first bracket must miss.
    n = 3 * BLOCK
    delta = torch.full((n,), 0.001)
    sampled = torch.arange(min(n, 1 << 16)) * n // min(n, 1 << 16)
    delta[sampled] = 5.0
    delta[1::7] *= -1
    density = 0.3
    k = math.floor(density * n)
    assert torch.equal(trimmed(delta, "magnitude", density), reference_top_k(delta, k))


def test_continuous_values_across_blocks_match_kthvalue() -> None:
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(3 * BLOCK + 5, generator=g)
    k = math.floor(0.37 * delta.numel())
    threshold = torch.kthvalue(delta.abs(), delta.numel() - k + 1).values
    expected = torch.where(delta.abs() >= threshold, delta, 0.0)
    assert torch.equal(trimmed(delta, "magnitude", 0.37), expected)


def test_a_sample_that_underestimates_the_bracket_still_gives_the_exact_cut() -> None:
    # The sampled positions spread over [-1, 1] while every other entry sits within 1e-3 of 0:
    # judged by the sample, few entries fall inside the bracket around the median, in truth
    # nearly all do, so the entries collected there outgrow the room estimated for them.
    n = 3 * BLOCK + 11
    positions = sample_positions(n)
    g = torch.Generator().manual_seed(5)
    keys = (torch.rand(n, generator=g, dtype=torch.float64) * 2e-3 - 1e-3).float()
    keys[positions] = torch.linspace(-1, 1, positions.numel())
    k = n // 2
    request = CutRequest(lambda start, end, _: keys[start:end], keys[positions], [k - 1], [True])
    find_cuts([request], n, BLOCK, lambda start, end: keys[start:end])
    (cut,) = request.cuts
    assert cut is not None
    assert cut.key == float(torch.kthvalue(keys, k).values)
    assert cut.tied == int((keys == cut.key).sum())
