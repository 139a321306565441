"""The whole-tensor kernels (native/whole.c) give the same bytes as the torch code beside them.

The torch code is the reference (its results are checked against hand-worked tensors and
mergekit elsewhere); here each method that can use these kernels runs through both paths on
every dtype pairing, on shapes whose rows are shorter and longer than a summed chunk, with
signed zeros, NaN and infinities, and as a whole merge through the CLI. The order in which the
dot products are summed is checked against an independent Python rendering of ops.spherical's
definition, and their values against exact sums.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from contextlib import nullcontext
from fractions import Fraction
from pathlib import Path

import pytest
import torch

from mergesmith import native
from mergesmith.methods import arcee_fusion as fusion_module
from mergesmith.methods.karcher import karcher
from mergesmith.methods.model_stock import model_stock
from mergesmith.methods.multislerp import multislerp
from mergesmith.methods.nearswap import nearswap
from mergesmith.methods.nuslerp import nuslerp
from mergesmith.native import whole
from mergesmith.ops.spherical import SUM_CHUNK, row_grams
from tests.conftest import assert_kernels_match_torch_code, write_recipe

needs_kernels = pytest.mark.skipif(
    not whole.handles(torch.zeros(1)), reason="C kernels (with whole.c) not built"
)

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, with every NaN made one value (only NaN payloads may differ)."""
    t = t.clone()
    t[t.isnan()] = float("nan")
    return t.view({8: torch.int64, 4: torch.int32, 2: torch.int16}[t.element_size()])


def assert_same_bytes(fn: Callable[[], torch.Tensor]) -> torch.Tensor:
    got = fn()
    with native.torch_only():
        expected = fn()
    assert got.dtype == expected.dtype and got.shape == expected.shape
    assert torch.equal(bits(got), bits(expected))
    return got


def near_base(
    shape: tuple[int, ...], dtype: torch.dtype, k: int, seed: int, special: bool = False
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """A base and k fine-tunes near it; with `special`, signed zeros, NaN and infinities."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(shape, generator=g)
    models = [base + 0.05 * torch.randn(shape, generator=g) for _ in range(k)]
    if special and base.numel() >= 8:
        flat = base.view(-1)
        flat[0], flat[1] = 0.0, -0.0
        models[0].view(-1)[1] = -0.0
        models[0].view(-1)[3] = float("nan")
        models[-1].view(-1)[5] = float("inf")
        models[-1].view(-1)[6] = -float("inf")
    return base.to(dtype), [m.to(dtype) for m in models]


SHAPES = [(7,), (37, 5), (3, 1500), (2, 3, 700), (2 * SUM_CHUNK + 3,), (0,)]


@needs_kernels
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_spherical_methods_match_torch(
    shape: tuple[int, ...], dtype: torch.dtype, out_dtype: torch.dtype
) -> None:
    base, models = near_base(shape, dtype, 3, seed=len(shape) + shape[-1])
    weights = [1.0, 0.5, 0.7]
    for filter_wise in (False, True):
        assert_same_bytes(
            lambda fw=filter_wise: model_stock(base, models, filter_wise=fw, out_dtype=out_dtype)
        )
    assert_same_bytes(lambda: karcher(None, models, out_dtype=out_dtype))
    for b in (base, None):
        assert_same_bytes(lambda b=b: multislerp(b, models, weight=weights, out_dtype=out_dtype))
        for row_wise, flatten in ((False, True), (False, False), (True, False)):
            assert_same_bytes(
                lambda b=b, rw=row_wise, fl=flatten: nuslerp(
                    b,
                    models[:2],
                    weight=weights[:2],
                    nuslerp_row_wise=rw,
                    nuslerp_flatten=fl,
                    out_dtype=out_dtype,
                )
            )


@needs_kernels
@pytest.mark.parametrize("out_dtype", DTYPES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
def test_nearswap_and_fusion_match_torch(
    shape: tuple[int, ...], dtype: torch.dtype, out_dtype: torch.dtype
) -> None:
    base, (model,) = near_base(shape, dtype, 1, seed=shape[-1] + 1)
    for t in (0.0, 0.001, 0.05, 3.0):
        assert_same_bytes(lambda t=t: nearswap(base, [model], t=t, out_dtype=out_dtype))
    if base.numel():
        assert_same_bytes(lambda: fusion_module.fusion_merge(base, model, 7, out_dtype))


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_non_finite_values_take_the_same_path(dtype: torch.dtype) -> None:
    base, models = near_base((4, 300), dtype, 3, seed=5, special=True)
    assert_same_bytes(lambda: model_stock(base, models, filter_wise=True))
    assert_same_bytes(lambda: model_stock(base, models))
    assert_same_bytes(lambda: multislerp(base, models, weight=[1.0, 2.0, 1.0]))
    assert_same_bytes(lambda: nuslerp(base, models[:2], weight=[1.0, 2.0], nuslerp_flatten=False))
    assert_same_bytes(lambda: karcher(None, models))
    assert_same_bytes(lambda: nearswap(base, [models[0]], t=0.01))
    assert_same_bytes(lambda: nearswap(base, [models[-1]], t=0.01))
    assert_same_bytes(lambda: fusion_module.fusion_merge(base, models[-1], 3))


@needs_kernels
def test_sampled_fusion_quartiles_match_torch() -> None:
    """Over 1e6 entries the quartiles come from a drawn sample: the kernel visits it in index
    order, the torch code as drawn; the order statistics are the same."""
    base, (model,) = near_base((1100, 1000), torch.bfloat16, 1, seed=9)
    assert base.numel() > fusion_module.SAMPLE_SIZE
    got = fusion_module.fusion_threshold(model, base, 11)
    with native.torch_only():
        expected = fusion_module.fusion_threshold(model, base, 11)
    assert float(got) == float(expected)
    assert_same_bytes(lambda: fusion_module.fusion_merge(base, model, 11, torch.bfloat16))


def test_fusion_quartiles_are_those_of_the_sorted_importances() -> None:
    """Independent of both paths: sort every importance and read the three positions."""
    base, (model,) = near_base((40, 25), torch.float32, 1, seed=12)
    kl = fusion_module.all_row_divergences(model, base)
    importance = ((model - base).abs() * kl[:, None]).reshape(-1).sort().values
    n = importance.numel()
    q1, median, q3 = (
        importance[(n - 1) // 4],
        importance[(n - 1) // 2],
        importance[3 * (n - 1) // 4],
    )
    for use_kernels in (True, False):
        with native.torch_only() if not use_kernels else nullcontext():
            got = fusion_module.fusion_threshold(model, base, 0)
        assert float(got) == float(median + 1.5 * (q3 - q1))


def _tree(values: list[float]) -> float:
    """The halving tree of ops.spherical in plain Python floats: pad to a power of two with
    zeros, then add the second half onto the first until one value is left."""
    size = 1
    while size < len(values):
        size *= 2
    values = values + [0.0] * (size - len(values))
    while len(values) > 1:
        half = len(values) // 2
        values = [values[k] + values[k + half] for k in range(half)]
    return values[0]


def _documented_sum(products: list[float]) -> float:
    width = 1
    while width < min(len(products), SUM_CHUNK):
        width *= 2
    chunks = [_tree(products[k : k + width]) for k in range(0, len(products), width)]
    return _tree(chunks) if chunks else 0.0


@pytest.mark.parametrize("length", [0, 1, 3, 8, 1000, SUM_CHUNK, SUM_CHUNK + 1, 5000])
@pytest.mark.parametrize("use_kernels", [True, False])
def test_dot_products_are_summed_in_the_documented_order(length: int, use_kernels: bool) -> None:
    if use_kernels and not whole.handles(torch.zeros(1)):
        pytest.skip("C kernels (with whole.c) not built")
    g = torch.Generator().manual_seed(length)
    # Values over many magnitudes, so that another order of the sum gives other bits.
    scale = torch.exp(torch.randn(2, length, generator=g) * 4)
    base = torch.randn(1, length, generator=g)
    models = [base + torch.randn(1, length, generator=g) * scale[i] for i in range(2)]
    with native.torch_only() if not use_kernels else nullcontext():
        got = row_grams(models, base)[0].tolist()
    d = [[float(models[i][0, k] - base[0, k]) for k in range(length)] for i in range(2)]
    for p, (i, j) in enumerate([(0, 0), (0, 1), (1, 1)]):
        products = [x * y for x, y in zip(d[i], d[j], strict=True)]
        assert got[p] == _documented_sum(products)
        exact = sum((Fraction(x) for x in products), Fraction(0))
        assert math.isclose(got[p], float(exact), rel_tol=1e-13, abs_tol=1e-300 if exact else 0)


@needs_kernels
@pytest.mark.parametrize("method", ["model_stock", "karcher", "multislerp", "nuslerp", "nearswap"])
def test_cli_output_is_byte_identical_without_kernels(
    method: str, family: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """A whole merge, as a user runs it, with MERGESMITH_KERNELS=torch and without."""
    base, tuned = family
    count = {"nuslerp": 2, "nearswap": 1}.get(method, 3)
    weights = method in ("multislerp", "nuslerp")
    models = "".join(
        f"  - model: {p}\n" + (f"    parameters: {{weight: {w}}}\n" if weights else "")
        for p, w in zip(tuned[:count], (0.5, 0.3, 0.2), strict=False)
    )
    base_line = "" if method == "karcher" else f"base_model: {base}\n"
    extra = "parameters: {t: 0.001}\n" if method == "nearswap" else ""
    recipe = write_recipe(
        tmp_path, f"merge_method: {method}\n{base_line}models:\n{models}{extra}dtype: bfloat16\n"
    )
    assert_kernels_match_torch_code(recipe, tmp_path)
