"""The L1 norms behind `rescale` are exact sums (ops.exact_sum), held to math.fsum (Python's
correctly rounded sum of the same values, an independent algorithm), by the torch code and by
the C kernels' counts alike, so no order, cut or device can change the rescale factor."""

from __future__ import annotations

import math
import random
from fractions import Fraction

import numpy as np
import pytest
import torch

from mergesmith import native
from mergesmith.ops.exact_sum import ExactSum

needs_kernels = pytest.mark.skipif(not native.available(), reason="C kernels not built")


def hostile(n: int, seed: int) -> torch.Tensor:
    """Float32 values over the whole range, subnormals and both zeros included, with huge
    cancellations: a float32 (or double) running sum of them is far off."""
    g = torch.Generator().manual_seed(seed)
    exponent = torch.randint(-149, 128, (n,), generator=g).float()
    x = torch.randn(n, generator=g).sign() * torch.rand(n, generator=g) * torch.pow(2, exponent)
    x = x.float()
    x[::7] = 0.0
    x[1::11] = -0.0
    x[2::13] = torch.finfo(torch.float32).tiny * 2**-23  # the least subnormal
    pairs = min(len(x[3::17]), len(x[4::17]))
    x[3::17][:pairs] = -x[4::17][:pairs]  # cancelling pairs
    return x


def fsum(x: torch.Tensor) -> float:
    return math.fsum(x.double().tolist())


def torch_sum(x: torch.Tensor) -> ExactSum:
    total = ExactSum()
    total.add(x)
    return total


@pytest.mark.parametrize("n", [1, 3, 1000, 1025, 40_000])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_torch_code_is_fsum(n: int, seed: int) -> None:
    x = hostile(n, seed)
    assert torch_sum(x).value() == fsum(x)


@needs_kernels
@pytest.mark.parametrize("n", [1, 3, 1000, 1025, 40_000])
@pytest.mark.parametrize("seed", [0, 1])
def test_the_kernels_count_the_same_sum(n: int, seed: int) -> None:
    x = hostile(n, seed)
    assert native.exact_sum(x) == torch_sum(x)


def test_the_docstring_example() -> None:
    """A float32 sum loses the 1.0 next to 1e30; the exact sum keeps it."""
    x = torch.tensor([1e30, 1.0, -1e30])
    assert float(x.sum()) == 0.0
    assert torch_sum(x).value() == 1.0


def running_float32_sum(x: torch.Tensor) -> float:
    total = np.float32(0.0)
    for value in x.numpy():
        total = np.float32(total + value)
    return float(total)


def test_no_cut_or_order_changes_it() -> None:
    """What the rescale factor needs: a float32 sum of the same values in another order may
    differ in its last bits, the exact one never."""
    g = torch.Generator().manual_seed(2)
    x = torch.rand(2000, generator=g) * torch.randint(-30, 1, (2000,), generator=g).float().exp2()
    order = torch.randperm(x.numel(), generator=torch.Generator().manual_seed(3))
    assert running_float32_sum(x) != running_float32_sum(x[order])  # the problem
    whole = torch_sum(x)
    pieces = ExactSum()
    cuts = sorted(random.Random(4).sample(range(1, x.numel()), 9))
    for part in torch.tensor_split(x[order], cuts):
        pieces.add(part)
    assert pieces == whole
    assert whole.value() == fsum(x)


def test_a_sum_beyond_the_double_range_rounds_once() -> None:
    """Counts past 2^1024 units still give the correctly rounded double (int / int)."""
    x = torch.full((4,), torch.finfo(torch.float32).max)
    assert torch_sum(x).value() == 4 * float(torch.finfo(torch.float32).max)


def test_infinities_and_nans_make_the_sum_what_float_makes_it() -> None:
    with_inf = torch_sum(torch.tensor([1.0, math.inf, 2.0]))
    assert with_inf.value() == math.inf and with_inf.infinities == 1
    assert math.isnan(torch_sum(torch.tensor([1.0, math.inf, math.nan])).value())


def test_ratio_rounds_once() -> None:
    """total / kept as one correctly rounded quotient of the exact sums, not a quotient of two
    already rounded doubles."""
    total, kept = torch_sum(torch.tensor([1.0, 2.0**-30])), torch_sum(torch.tensor([3.0]))
    assert total.ratio(kept) == (1 + 2**-30) / 3  # both exact as doubles here
    a, b = hostile(999, 5).abs(), hostile(998, 6).abs()
    exact = sum(map(Fraction, a.double().tolist())) / sum(map(Fraction, b.double().tolist()))
    assert torch_sum(a).ratio(torch_sum(b)) == float(exact)  # Fraction rounds correctly
    nonfinite = torch_sum(torch.tensor([math.inf]))
    assert math.isnan(nonfinite.ratio(nonfinite))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_16_bit_values_are_widened_exactly(dtype: torch.dtype) -> None:
    x = hostile(3000, 7).clamp(-100, 100).to(dtype)
    assert torch_sum(x).value() == fsum(x)
