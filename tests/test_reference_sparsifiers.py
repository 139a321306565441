"""ops.sparsify is the one whole-tensor definition of each sparsifier, and the blocked family
pass (C kernels and torch code alike) must agree with it: the fast path is tested against the
plain one rather than against a copy of itself.

All are compared on tensors spanning several blocks, with heavy ties: the random ones draw
element i of their stream for entry i whichever block it is in, and `rescale` divides exact L1
norms (ops.exact_sum) summed block by block here and whole there, so blocks change nothing.
"""

from __future__ import annotations

import pytest
import torch

from mergesmith import native
from mergesmith.methods.task_arithmetic import merge_task_vectors
from mergesmith.ops import sparsify
from mergesmith.ops.blocks import BLOCK

SEED = 1234


def blocked(delta: torch.Tensor, sparsifier: str, density: float, **kw) -> torch.Tensor:
    """The family pass on one model with weight 1 from a zero base: exactly the sparsified
    delta (rescaled when asked)."""
    base = torch.zeros_like(delta)
    return merge_task_vectors(
        base,
        [delta],
        [1.0],
        densities=[density],
        sparsifier=sparsifier,
        gammas=[kw.get("gamma", 0.01)],
        epsilons=[kw.get("epsilon", 0.15)],
        rescale=kw.get("rescale", False),
        seeds=[SEED],
    )


def tied_delta(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(-12, 13, shape, generator=g).float() * 0.0625


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("density", [0.05, 0.3, 0.9])
def test_magnitude_trim_is_the_reference_across_blocks(kernels: bool, density: float) -> None:
    delta = tied_delta((3 * BLOCK + 17,), 1)
    expected = sparsify.magnitude(delta, density)
    if kernels:
        got = blocked(delta, "magnitude", density)
    else:
        with native.torch_only():
            got = blocked(delta, "magnitude", density)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize(("density", "gamma"), [(0.5, 0.01), (0.8, 0.1), (0.2, 0.0)])
def test_breadcrumbs_window_is_the_reference_across_blocks(
    kernels: bool, density: float, gamma: float
) -> None:
    delta = tied_delta((2 * BLOCK + 5,), 2)
    expected = sparsify.magnitude_outliers(delta, density, gamma)
    if kernels:
        got = blocked(delta, "magnitude_outliers", density, gamma=gamma)
    else:
        with native.torch_only():
            got = blocked(delta, "magnitude_outliers", density, gamma=gamma)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("rescale", [False, True])
def test_dare_drop_is_the_reference_across_blocks(kernels: bool, rescale: bool) -> None:
    delta = tied_delta((3 * BLOCK + 11,), 3)
    expected = sparsify.random_keep(delta, 0.4, SEED, rescale)
    if kernels:
        got = blocked(delta, "random", 0.4, rescale=rescale)
    else:
        with native.torch_only():
            got = blocked(delta, "random", 0.4, rescale=rescale)
    assert torch.equal(got, expected)


@pytest.mark.parametrize("kernels", [True, False], ids=["kernels", "torch"])
@pytest.mark.parametrize("rescale", [False, True])
def test_della_drop_is_the_reference_across_blocks(kernels: bool, rescale: bool) -> None:
    # Rows of 3000 entries: each block holds 87 whole rows, so the tensor spans four blocks.
    delta = tied_delta((300, 3000), 4)
    expected = sparsify.della_magprune(delta, 0.5, 0.2, SEED, rescale)
    if kernels:
        got = blocked(delta, "della_magprune", 0.5, epsilon=0.2, rescale=rescale)
    else:
        with native.torch_only():
            got = blocked(delta, "della_magprune", 0.5, epsilon=0.2, rescale=rescale)
    assert torch.equal(got, expected)
