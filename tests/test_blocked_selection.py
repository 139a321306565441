"""Exact selection over tensors larger than one block, checked against a full stable sort.

The fused kernel finds magnitude cuts from a sample and one counting sweep; these cases force
its hard paths: heavy ties (as in bf16 deltas), cuts that split a run of equal values across
blocks, and samples that mislead the bracket so the sweep must widen and rerun.
"""

from __future__ import annotations

import math

import pytest
import torch

from mergesmith.methods.task_arithmetic import merge_task_vectors
from mergesmith.ops.blocks import BLOCK


def reference_top_k(delta: torch.Tensor, k: int) -> torch.Tensor:
    """Keep the k largest |delta|, equal values by lower index: a full stable sort."""
    order = sorted(range(delta.numel()), key=lambda i: (-abs(float(delta[i])), i))
    keep = torch.zeros(delta.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return torch.where(keep, delta, torch.zeros(()))


def reference_window(delta: torch.Tensor, density: float, gamma: float) -> torch.Tensor:
    n = delta.numel()
    target, n_top = math.floor(density * n), math.floor(gamma * n)
    n_bottom = max(0, n - target - n_top)
    order = torch.argsort(delta.abs(), stable=True)
    keep = torch.zeros(n, dtype=torch.bool)
    keep[order[n_bottom : n_bottom + target]] = True
    return torch.where(keep, delta, torch.zeros(()))


def trimmed(delta: torch.Tensor, sparsifier: str, density: float, gamma: float = 0.0):
    base = torch.zeros_like(delta)
    return merge_task_vectors(
        base, [delta], [1.0], densities=[density], sparsifier=sparsifier, gammas=[gamma]
    )


@pytest.mark.parametrize("density", [0.1, 0.5, 0.77])
def test_magnitude_with_heavy_ties_across_blocks_matches_a_stable_sort(density: float) -> None:
    g = torch.Generator().manual_seed(1)
    n = 2 * BLOCK + 12_345
    # 21 distinct magnitudes over 500k entries: every cut splits a long run of equal values.
    delta = torch.randint(-10, 11, (n,), generator=g).float() * 0.125
    k = max(1, math.floor(density * n))
    expected = torch.where(torch.zeros(n, dtype=torch.bool), delta, 0.0)
    # A stable argsort is the reference here (a Python sort of 500k items is slow).
    order = torch.argsort(-delta.abs(), stable=True)
    expected[order[:k]] = delta[order[:k]]
    got = trimmed(delta, "magnitude", density)
    assert torch.equal(got, expected)
    assert int((got != 0).sum()) <= k


def test_magnitude_small_case_matches_the_python_reference() -> None:
    delta = torch.tensor([0.5, -0.5, 0.25, 0.5, -0.125, 0.0, 0.5, -0.25])
    assert torch.equal(trimmed(delta, "magnitude", 0.5), reference_top_k(delta, 4))


@pytest.mark.parametrize(("density", "gamma"), [(0.4, 0.05), (0.9, 0.1), (0.3, 0.0)])
def test_breadcrumbs_window_with_heavy_ties_matches_a_stable_sort(
    density: float, gamma: float
) -> None:
    g = torch.Generator().manual_seed(2)
    n = BLOCK + 70_001
    delta = torch.randint(-6, 7, (n,), generator=g).float() * 0.5
    assert torch.equal(
        trimmed(delta, "magnitude_outliers", density, gamma),
        reference_window(delta, density, gamma),
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
    order = torch.argsort(-delta.abs(), stable=True)
    expected = torch.zeros(n)
    expected[order[:k]] = delta[order[:k]]
    assert torch.equal(trimmed(delta, "magnitude", density), expected)


def test_continuous_values_across_blocks_match_kthvalue() -> None:
    g = torch.Generator().manual_seed(3)
    delta = torch.randn(3 * BLOCK + 5, generator=g)
    k = math.floor(0.37 * delta.numel())
    threshold = torch.kthvalue(delta.abs(), delta.numel() - k + 1).values
    expected = torch.where(delta.abs() >= threshold, delta, 0.0)
    assert torch.equal(trimmed(delta, "magnitude", 0.37), expected)
