"""model_stock, nearswap and arcee_fusion against mergekit 0.1.5's formulas (SEMANTICS.md 5).

Expected values are worked by hand or by small float64 references written here from the
formulas (plain Python over lists), never by calling the code under test. Bad recipes are run
through the real CLI (`mergesmith validate`).
"""

from __future__ import annotations

import doctest
import math
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from mergesmith.methods import MethodInputs, get_method
from mergesmith.methods import arcee_fusion as fusion_module
from mergesmith.methods import model_stock as stock_module
from mergesmith.methods import nearswap as swap_module
from mergesmith.methods.registry import JobSize
from mergesmith.ops.blocks import BLOCK
from tests.conftest import run_cli, run_method, write_recipe

Family = tuple[Path, list[Path]]
ROOT3_2 = math.sqrt(3.0) / 2


def _t(values: Any, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _randn(shape: tuple[int, ...], seed: int, scale: float = 1.0) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * scale


def _close(got: torch.Tensor, expected: Any, atol: float = 1e-6, rtol: float = 1e-5) -> None:
    want = expected if isinstance(expected, torch.Tensor) else _t(expected)
    torch.testing.assert_close(got.float(), want.float(), rtol=rtol, atol=atol)


def stock(base: torch.Tensor, models: list[torch.Tensor], **params: Any) -> torch.Tensor:
    return run_method("model_stock", base, models, [{} for _ in models], params)


def swap(base: torch.Tensor, model: torch.Tensor, t: float) -> torch.Tensor:
    return run_method("nearswap", base, [model], [{}], {"t": t})


def fuse(base: torch.Tensor, model: torch.Tensor, seed: int = 0) -> torch.Tensor:
    return run_method("arcee_fusion", base, [model], [{}], seeds=[seed])


@pytest.mark.parametrize("module", [stock_module, swap_module, fusion_module])
def test_docstring_examples_run(module: Any) -> None:
    failed, attempted = doctest.testmod(module, extraglobs={"torch": torch})
    assert attempted > 0 and failed == 0


# ---------------------------------------------------------------------------------------------
# model_stock: a float64 reference over plain lists


def _stock_rows(
    base: list[float], models: list[list[float]]
) -> tuple[float, list[float]]:  # (t, output row)
    n = len(models)
    offsets = [[w - b for w, b in zip(m, base, strict=True)] for m in models]
    cosines = []
    for i in range(n):
        for j in range(i + 1, n):
            dot = sum(x * y for x, y in zip(offsets[i], offsets[j], strict=True))
            product = math.sqrt(sum(x * x for x in offsets[i])) * math.sqrt(
                sum(y * y for y in offsets[j])
            )
            cosines.append(min(1.0, max(-1.0, dot / max(product, 1e-6))))
    c = sum(cosines) / len(cosines)
    denominator = 1 + (n - 1) * c
    t = 0.0 if abs(denominator) < 1e-6 else n * c / denominator
    mean = [sum(column) / n for column in zip(*models, strict=True)]
    return t, [t * m + (1 - t) * b for m, b in zip(mean, base, strict=True)]


def stock_reference(
    base: torch.Tensor, models: list[torch.Tensor], filter_wise: bool
) -> torch.Tensor:
    if filter_wise and base.dim() >= 2:
        width = base.shape[-1]
        rows = [r.tolist() for r in base.double().reshape(-1, width)]
        model_rows = [[r.tolist() for r in m.double().reshape(-1, width)] for m in models]
        out = [_stock_rows(row, [mr[k] for mr in model_rows])[1] for k, row in enumerate(rows)]
        return torch.tensor(out, dtype=torch.float64).reshape(base.shape)
    _, out = _stock_rows(
        base.double().reshape(-1).tolist(), [m.double().reshape(-1).tolist() for m in models]
    )
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def test_model_stock_sixty_degrees_gives_two_thirds_of_the_way() -> None:
    # cos = 1/2, N = 2: t = 2 * 0.5 / (1 + 0.5) = 2/3; mean = (0.75, sqrt(3)/4).
    base = _t([0.0, 0.0])
    got = stock(base, [_t([1.0, 0.0]), _t([0.5, ROOT3_2])])
    _close(got, [2 / 3 * 0.75, 2 / 3 * ROOT3_2 / 2])


def test_model_stock_offsets_are_taken_from_the_base() -> None:
    # The same geometry shifted by the base: the result shifts with it.
    base = _t([2.0, -1.0])
    got = stock(base, [_t([3.0, -1.0]), _t([2.5, -1.0 + ROOT3_2])])
    _close(got, [2.0 + 0.5, -1.0 + ROOT3_2 / 3])


def test_model_stock_three_models_use_the_mean_of_the_pairwise_cosines() -> None:
    # Offsets e1, e1, e2: cosines 1, 0, 0, mean 1/3; t = 3 * (1/3) / (1 + 2/3) = 3/5.
    base = _t([1.0, 1.0])
    models = [_t([2.0, 1.0]), _t([2.0, 1.0]), _t([1.0, 2.0])]
    mean = [1 + 2 / 3, 1 + 1 / 3]
    _close(stock(base, models), [0.6 * mean[0] + 0.4, 0.6 * mean[1] + 0.4])


def test_model_stock_orthogonal_offsets_keep_the_base() -> None:
    base = _t([0.5, -0.5, 0.25])
    models = [base + _t([1.0, 0.0, 0.0]), base + _t([0.0, 2.0, 0.0]), base + _t([0.0, 0.0, 3.0])]
    assert torch.equal(stock(base, models), base)


def test_model_stock_colinear_offsets_give_the_mean() -> None:
    # cos = 1: t = N / (1 + N - 1) = 1, the plain average of the models.
    base = _t([1.0, 2.0, 3.0])
    direction = _t([1.0, -2.0, 0.5])
    models = [base + direction, base + 2 * direction, base + 0.5 * direction]
    _close(stock(base, models), (models[0] + models[1] + models[2]) / 3)


def test_model_stock_opposite_offsets_are_singular_and_keep_the_base() -> None:
    # N = 2, cos = -1: 1 + (N - 1) cos = 0, no finite t; mergekit keeps the base.
    base = _t([1.0, 2.0])
    got = stock(base, [base + _t([1.0, 1.0]), base - _t([2.0, 2.0])])
    assert torch.equal(got, base)


def test_model_stock_three_offsets_at_120_degrees_are_singular() -> None:
    # Every cosine -1/2, N = 3: 1 + 2 * (-1/2) = 0.
    base = _t([0.0, 0.0])
    models = [_t([1.0, 0.0]), _t([-0.5, ROOT3_2]), _t([-0.5, -ROOT3_2])]
    assert torch.equal(stock(base, models), base)


def test_model_stock_zero_offsets_keep_the_base() -> None:
    base = _t([[0.1, 0.2], [0.3, 0.4]])
    for filter_wise in (False, True):
        assert torch.equal(stock(base, [base.clone(), base.clone()], filter_wise=filter_wise), base)


def test_model_stock_one_zero_offset_counts_as_orthogonal() -> None:
    # Offsets d, 0, d: cosines 0 (d, 0), 1 (d, d), 0 (0, d): mean 1/3, t = 3/5.
    base = _t([0.0, 0.0])
    d = _t([3.0, 4.0])
    got = stock(base, [d, base.clone(), d])
    _close(got, 0.6 * (2 * d / 3))


def test_model_stock_tiny_offsets_are_damped_by_the_norm_clamp() -> None:
    # mergekit divides by max(|a||b|, 1e-6): offsets of norm 1e-4 each have |a||b| = 1e-8, so
    # even identical ones get cos = 1e-8 / 1e-6 = 0.01 and t = 0.02 / 1.01.
    base = _t([0.0, 0.0])
    d = _t([1e-4, 0.0])
    t = 2 * 0.01 / 1.01
    _close(stock(base, [d, d]), t * d, atol=1e-12)


def test_model_stock_treats_a_matrix_as_one_vector_by_default() -> None:
    # Row 0 offsets are colinear, row 1 orthogonal; flat: offsets (1,0,1,0), (1,0,0,1):
    # cos = 1 / 2, t = 2/3.
    base = torch.zeros(2, 2)
    a = _t([[1.0, 0.0], [1.0, 0.0]])
    b = _t([[1.0, 0.0], [0.0, 1.0]])
    _close(stock(base, [a, b]), 2 / 3 * (a + b) / 2)


def test_model_stock_filter_wise_gives_each_row_its_own_ratio() -> None:
    # Same inputs: row 0 colinear (t = 1, the mean), row 1 orthogonal (t = 0, the base).
    base = torch.zeros(2, 2)
    a = _t([[1.0, 0.0], [1.0, 0.0]])
    b = _t([[1.0, 0.0], [0.0, 1.0]])
    _close(stock(base, [a, b], filter_wise=True), [[1.0, 0.0], [0.0, 0.0]])


def test_model_stock_filter_wise_on_a_vector_is_the_flat_merge() -> None:
    base = _randn((9,), 1)
    models = [base + _randn((9,), s, 0.1) for s in (2, 3, 4)]
    flat = stock(base, models)
    _close(stock(base, models, filter_wise=True), flat, atol=0)
    _close(flat, stock_reference(base, models, False))


def test_model_stock_single_row_matrix_filter_wise_equals_flat() -> None:
    base = _randn((1, 7), 5)
    models = [base + _randn((1, 7), s, 0.2) for s in (6, 7)]
    _close(stock(base, models, filter_wise=True), stock(base, models), atol=0)


def test_model_stock_filter_wise_takes_rows_along_the_last_dimension() -> None:
    base = _randn((2, 3, 5), 8)
    models = [base + _randn((2, 3, 5), s, 0.1) + 0.05 for s in (9, 10, 11)]
    got = stock(base, models, filter_wise=True)
    _close(got, stock_reference(base, models, True))
    assert not torch.allclose(got, stock(base, models), atol=1e-6)


@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("count", [2, 3, 5])
def test_model_stock_matches_the_reference_on_random_tensors(filter_wise: bool, count: int) -> None:
    base = _randn((6, 11), count)
    shared = _randn((6, 11), 99, 0.05)
    models = [base + shared + _randn((6, 11), 100 + s, 0.05) for s in range(count)]
    _close(stock(base, models, filter_wise=filter_wise), stock_reference(base, models, filter_wise))


@pytest.mark.parametrize("block", [4, 64])
@pytest.mark.parametrize("filter_wise", [False, True])
@pytest.mark.parametrize("shape", [(37,), (5, 9), (3, 2, 7), (40, 1)])
def test_model_stock_block_by_block_equals_whole_rows(
    filter_wise: bool, shape: tuple[int, ...], block: int
) -> None:
    # Blocks of 4 split rows into columns; blocks of 64 hold groups of rows (a few, with
    # their statistics). Neither may change the result.
    base = _randn(shape, 21)
    models = [base + _randn(shape, 22 + s, 0.1) for s in range(3)]
    small = stock_module.stock_merge(base, models, filter_wise, block=block)
    _close(small, stock_module.stock_merge(base, models, filter_wise))
    _close(small, stock_reference(base, models, filter_wise))


def test_model_stock_computes_bf16_inputs_in_float32() -> None:
    base = _randn((4, 8), 30).bfloat16()
    models = [(base.float() + _randn((4, 8), 31 + s, 0.1)).bfloat16() for s in range(3)]
    want = stock_reference(base.float(), [m.float() for m in models], True)
    got = stock(base, models, filter_wise=True)
    assert got.dtype == torch.float32
    _close(got, want)
    method = get_method("model_stock")
    assert method is not None
    rounded = method.run(
        MethodInputs(base, models, {"filter_wise": True}, [{}] * 3, [0] * 3, torch.bfloat16)
    )
    assert rounded.dtype == torch.bfloat16
    assert torch.equal(rounded, got.bfloat16())


def test_model_stock_does_not_modify_its_inputs() -> None:
    base = _randn((3, 4), 40)
    models = [base + _randn((3, 4), 41 + s, 0.1) for s in range(2)]
    copies = [base.clone(), *(m.clone() for m in models)]
    for filter_wise in (False, True):
        stock(base, models, filter_wise=filter_wise)
    assert all(torch.equal(x, y) for x, y in zip([base, *models], copies, strict=True))


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_model_stock_non_finite_inputs_reach_the_output(bad: float) -> None:
    # finite_check="output" relies on this: the row holding the bad entry comes out NaN.
    base = torch.zeros(2, 3)
    models = [_t([[1.0, 0.0, 0.0], [1.0, 2.0, 0.0]]), _t([[0.0, 1.0, 0.0], [0.0, 1.0, 2.0]])]
    models[1][1, 2] = bad
    assert torch.isnan(stock(base, models)).all()
    got = stock(base, models, filter_wise=True)
    assert torch.isfinite(got[0]).all() and torch.isnan(got[1]).all()


def test_model_stock_registration() -> None:
    method = get_method("model_stock")
    assert method is not None
    assert method.needs_base and (method.min_models, method.max_models) == (2, None)
    spec = method.param("filter_wise")
    assert spec is not None and spec.kind is bool and spec.default is False and not spec.per_model
    assert [p.name for p in method.params] == ["filter_wise"]


# ---------------------------------------------------------------------------------------------
# nearswap


def swap_reference(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    out = []
    for x, y in zip(a.double().reshape(-1).tolist(), b.double().reshape(-1).tolist(), strict=True):
        w = min(1.0, max(0.0, t / max(abs(x - y), 1e-6)))
        out.append(y * w + x * (1 - w))
    return torch.tensor(out, dtype=torch.float64).reshape(a.shape)


def test_nearswap_takes_near_values_and_blends_far_ones() -> None:
    # t = 0.1; distances 0.05, 0.1, 0.2, 0.4: weights 1, 1, 1/2, 1/4.
    base = _t([0.0, 0.0, 0.0, 0.0])
    model = _t([0.05, 0.1, 0.2, -0.4])
    _close(swap(base, model, 0.1), [0.05, 0.1, 0.1, -0.1])


def test_nearswap_weights_by_distance_from_a_nonzero_base() -> None:
    # distances 1, 4: weights 0.5, 0.125.
    base = _t([[1.0, -2.0]])
    model = _t([[2.0, 2.0]])
    _close(swap(base, model, 0.5), [[1.5, -2.0 + 0.125 * 4.0]])


def test_nearswap_t_zero_is_the_base() -> None:
    base, model = _randn((4, 5), 1), _randn((4, 5), 2)
    assert torch.equal(swap(base, model, 0.0), base)


def test_nearswap_large_t_is_the_model() -> None:
    base, model = _randn((4, 5), 3), _randn((4, 5), 4)
    assert torch.equal(swap(base, model, 1e9), model)


def test_nearswap_equal_entries_stay_put() -> None:
    # |a - b| = 0 is taken as 1e-6: the weight is 1 (or 0 at t = 0) and the value is a = b.
    base = _t([0.25, -1.5, 3.0])
    for t in (0.0, 1e-9, 0.3):
        assert torch.equal(swap(base, base.clone(), t), base)


def test_nearswap_distances_below_the_floor_use_the_floor() -> None:
    # |a - b| = 1e-7 is taken as 1e-6: at t = 5e-7 the weight is 5e-7 / 1e-6 = 1/2.
    base, model = _t([0.0]), _t([1e-7])
    _close(swap(base, model, 5e-7), 0.5 * model, atol=1e-12)


@pytest.mark.parametrize("t", [0.001, 0.02, 0.5])
def test_nearswap_matches_the_reference_across_blocks(t: float) -> None:
    n = BLOCK + 1000  # two blocks
    base = _randn((n,), 5, 0.05)
    model = base + _randn((n,), 6, 0.02)
    _close(swap(base, model, t), swap_reference(base, model, t), atol=1e-7)


def test_nearswap_computes_bf16_inputs_in_float32() -> None:
    base = _randn((3, 16), 7).bfloat16()
    model = (base.float() + _randn((3, 16), 8, 0.3)).bfloat16()
    got = swap(base, model, 0.1)
    assert got.dtype == torch.float32
    _close(got, swap_reference(base.float(), model.float(), 0.1))


def test_nearswap_does_not_modify_its_inputs() -> None:
    base, model = _randn((6,), 9), _randn((6,), 10)
    copies = base.clone(), model.clone()
    swap(base, model, 0.3)
    assert torch.equal(base, copies[0]) and torch.equal(model, copies[1])


@pytest.mark.parametrize("where", ["base", "model"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("t", [0.0, 0.1])
def test_nearswap_non_finite_inputs_reach_the_output(where: str, bad: float, t: float) -> None:
    base, model = _t([0.0, 1.0]), _t([0.5, 1.5])
    (base if where == "base" else model)[1] = bad
    got = swap(base, model, t)
    assert torch.isfinite(got[0]) and not torch.isfinite(got[1])


def test_nearswap_registration() -> None:
    method = get_method("nearswap")
    assert method is not None
    assert method.needs_base and (method.min_models, method.max_models) == (1, 1)
    spec = method.param("t")
    assert spec is not None and spec.required and spec.kind is float and not spec.per_model
    assert spec.check is not None
    assert spec.check(0.0) is None and spec.check(2.0) is None
    assert spec.check(-0.1) is not None and spec.check(float("inf")) is not None


# ---------------------------------------------------------------------------------------------
# arcee_fusion: a float64 reference over plain lists


def _kl(x: list[float], y: list[float]) -> float:
    def softmax(v: list[float]) -> list[float]:
        top = max(v)
        e = [math.exp(u - top) for u in v]
        s = sum(e)
        return [u / s + 1e-8 for u in e]

    p, q = softmax(x), softmax(y)
    return sum(pi * math.log(pi / qi) for pi, qi in zip(p, q, strict=True))


def fusion_reference(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    width = base.shape[-1] if base.dim() else 1
    b_rows = base.double().reshape(-1, width).tolist()
    m_rows = model.double().reshape(-1, width).tolist()
    importance = []
    for b, m in zip(b_rows, m_rows, strict=True):
        kl = _kl(m, b)
        importance.append([abs(x - y) * kl for x, y in zip(m, b, strict=True)])
    ordered = sorted(v for row in importance for v in row)
    last = len(ordered) - 1
    q1, median, q3 = ordered[last // 4], ordered[last // 2], ordered[(3 * last) // 4]
    threshold = median + 1.5 * (q3 - q1)
    out = [
        [
            y + (x - y) * (1.0 if imp >= threshold else 0.0)
            for x, y, imp in zip(m, b, i, strict=True)
        ]
        for b, m, i in zip(b_rows, m_rows, importance, strict=True)
    ]
    return torch.tensor(out, dtype=torch.float64).reshape(base.shape)


def test_arcee_fusion_keeps_only_the_outlying_change() -> None:
    # One row: kl is one positive number, so importance ranks as |change|. Sorted |change|:
    # .1 .1 .1 .1 .1 .2 .2 3; n - 1 = 7: q1 = [1] = .1, median = [3] = .1, q3 = [5] = .2;
    # threshold = (.1 + 1.5 * .1) kl = .25 kl: only the 3.0 passes.
    base = torch.zeros(8)
    model = _t([0.1, -0.1, 0.2, 0.1, -0.2, 0.1, 3.0, 0.1])
    assert fuse(base, model).tolist() == [0.0] * 6 + [3.0, 0.0]


def test_arcee_fusion_adds_the_change_to_a_nonzero_base() -> None:
    base = _t([1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 7.0, 8.0])
    change = _t([0.1, -0.1, 0.2, 0.1, -0.2, 0.1, -3.0, 0.1])
    expected = base.clone()
    expected[6] = base[6] + change[6]
    assert torch.equal(fuse(base, base + change), expected)


def test_arcee_fusion_equal_importances_all_pass() -> None:
    # All importances equal: q1 = median = q3, threshold = that value, and >= lets all through.
    base = torch.zeros(6)
    model = _t([0.5, -0.5, 0.5, -0.5, 0.5, -0.5])
    assert torch.equal(fuse(base, model), model)


def test_arcee_fusion_rows_are_weighted_by_their_divergence() -> None:
    # Two rows changed at one entry by 0.5 (the same kl k > 0), a third row unchanged (kl 0).
    # Importances sorted: 0 x10, .5k x2; n - 1 = 11: q1 = [2], median = [5], q3 = [8] are all
    # 0, so the threshold is 0 and every entry passes (importance >= 0): out = model.
    base = torch.zeros(3, 4)
    model = _t([[0.5, 0, 0, 0], [0.5, 0, 0, 0], [0, 0, 0, 0]])
    assert torch.equal(fuse(base, model), model)
    # A change by a constant leaves a row's softmax as it was: rows 0 and 2 have kl = 0 and
    # importance 0 although every entry moved by 0.1. Row 1 (kl k > 0): .1k x3, 2k. Sorted:
    # 0 x8, .1k x3, 2k: q1 = median = 0, q3 = [8] = .1k, threshold .15k: only the 2.0 passes.
    model = _t([[0.1, 0.1, 0.1, 0.1], [0.1, 0.1, 0.1, 2.0], [0.1, 0.1, 0.1, 0.1]])
    got = fuse(base, model)
    _close(got, fusion_reference(base, model), atol=0)
    assert got[1, 3] == 2.0 and got[0].eq(0).all() and got[2].eq(0).all()


def test_arcee_fusion_kl_uses_softmax_plus_epsilon() -> None:
    # One row, base 0 and model (L, 0, 0, 0): p = (e^L, 1, 1, 1) / (e^L + 3) + 1e-8,
    # q = 1/4 + 1e-8 each; the mask depends only on ranks, so check the divergence itself.
    rows = fusion_module._as_rows
    base, model = torch.zeros(1, 4), _t([[2.0, 0.0, 0.0, 0.0]])
    got = fusion_module.row_divergence(rows(model), rows(base), 0, 1)
    s = math.exp(2.0) + 3
    p = [math.exp(2.0) / s + 1e-8] + [1 / s + 1e-8] * 3
    q = 0.25 + 1e-8
    want = sum(pi * math.log(pi / q) for pi in p)
    assert got.shape == (1,)
    assert math.isclose(float(got[0]), want, rel_tol=1e-5)


def test_arcee_fusion_without_change_is_the_base() -> None:
    base = _randn((5, 6), 3)
    assert torch.equal(fuse(base, base.clone()), base)


@pytest.mark.parametrize("shape", [(1,), (9,), (7, 10), (2, 3, 6), ()])
def test_arcee_fusion_matches_the_reference(shape: tuple[int, ...]) -> None:
    base = _randn(shape, 11, 0.5)
    model = base + _randn(shape, 12, 0.3) * (_randn(shape, 13) > 1).float() * 5 + 0.01
    _close(fuse(base, model), fusion_reference(base, model))


@pytest.mark.parametrize("shape", [(37,), (5, 9), (3, 2, 7)])
def test_arcee_fusion_long_rows_read_in_blocks_give_the_same_result(
    shape: tuple[int, ...],
) -> None:
    # A block of 4 entries splits every row: the softmax sums are then gathered block by block.
    base = _randn(shape, 14)
    model = base + _randn(shape, 15, 0.5)
    small = fusion_module.fusion_merge(base, model, seed=0, block=4)
    _close(small, fusion_module.fusion_merge(base, model, seed=0))
    _close(small, fusion_reference(base, model))


def test_arcee_fusion_computes_bf16_inputs_in_float32() -> None:
    base = _randn((4, 8), 16).bfloat16()
    model = (base.float() + _randn((4, 8), 17, 0.5)).bfloat16()
    got = fuse(base, model)
    assert got.dtype == torch.float32
    _close(got, fusion_reference(base.float(), model.float()))


def test_arcee_fusion_does_not_modify_its_inputs() -> None:
    base, model = _randn((4, 5), 18), _randn((4, 5), 19)
    copies = base.clone(), model.clone()
    fuse(base, model)
    assert torch.equal(base, copies[0]) and torch.equal(model, copies[1])


@pytest.mark.parametrize("where", ["base", "model"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_arcee_fusion_non_finite_inputs_reach_the_output(where: str, bad: float) -> None:
    base = torch.zeros(2, 8)
    model = _t([[0.1, -0.1, 0.2, 0.1, -0.2, 0.1, 3.0, 0.1]] * 2)
    (base if where == "base" else model)[1, 2] = bad
    got = fuse(base, model)
    assert not torch.isfinite(got[1, 2])


# Sampling: tensors of more than 1e6 entries take their quartiles from 1e6 seeded draws.
BIG = (1001, 1000)
BIG_SEED = 1234


@pytest.fixture(scope="module")
def big_merge() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(base, model, merge with BIG_SEED) of a tensor just over the sampling size."""
    base = _randn(BIG, 20, 0.05)
    spikes = (_randn(BIG, 21) > 1.5).float()
    model = base + _randn(BIG, 22, 0.01) + spikes * _randn(BIG, 23, 0.05)
    torch.manual_seed(0)
    return base, model, fuse(base, model, seed=BIG_SEED)


def _divergences(base: torch.Tensor, model: torch.Tensor) -> torch.Tensor:
    """kl of every row by a whole-tensor formula (float64), shape (rows, 1)."""
    p = torch.softmax(model.double(), -1) + 1e-8
    q = torch.softmax(base.double(), -1) + 1e-8
    return (p * (p / q).log()).sum(-1, keepdim=True)


def _exact_threshold(base: torch.Tensor, model: torch.Tensor) -> float:
    """median + 1.5 IQR of every importance (float64, no sampling)."""
    kl = _divergences(base, model)
    ordered = ((model.double() - base.double()).abs() * kl).reshape(-1).sort().values
    last = ordered.numel() - 1
    q1, med, q3 = (float(ordered[k]) for k in (last // 4, last // 2, 3 * last // 4))
    return med + 1.5 * (q3 - q1)


def test_arcee_fusion_sampling_is_reproducible_and_ignores_the_global_generator(
    big_merge: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    base, model, first = big_merge
    assert base.numel() > fusion_module.SAMPLE_SIZE
    torch.manual_seed(99)  # another global state than the fixture's: no effect
    state = torch.get_rng_state()
    assert torch.equal(fuse(base, model, seed=BIG_SEED), first)
    assert torch.equal(torch.get_rng_state(), state)  # and the global generator is not used


def test_arcee_fusion_sampled_threshold_is_near_the_exact_one(
    big_merge: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
) -> None:
    base, model, merged = big_merge
    thresholds = [float(fusion_module.fusion_threshold(model, base, s)) for s in (BIG_SEED, 7)]
    assert thresholds[0] != thresholds[1]  # each seed draws its own sample
    exact = _exact_threshold(base, model)
    assert all(math.isclose(t, exact, rel_tol=0.02) for t in thresholds)
    # The sample's threshold passes about the same entries as the exact one would.
    passed = (merged != base).double().mean().item()
    kl = _divergences(base, model)
    exact_passed = (((model - base).abs().double() * kl) >= exact).double().mean().item()
    assert 0.0 < passed < 0.2
    assert abs(passed - exact_passed) < 0.002


def test_arcee_fusion_small_tensors_ignore_the_seed() -> None:
    base = _randn((50, 40), 24)
    model = base + _randn((50, 40), 25, 0.3) * (_randn((50, 40), 26) > 1).float()
    assert torch.equal(fuse(base, model, seed=1), fuse(base, model, seed=2))


def test_arcee_fusion_registration_and_memory() -> None:
    method = get_method("arcee_fusion")
    assert method is not None
    assert method.needs_base and (method.min_models, method.max_models) == (1, 1)
    assert method.params == () and method.random
    # The sample adds a constant: beyond 1e6 entries memory grows only with the stored tensors.
    small = method.memory(JobSize(numel=10**6, inputs=2, in_itemsize=4, out_itemsize=4))
    large = method.memory(JobSize(numel=10**8, inputs=2, in_itemsize=4, out_itemsize=4))
    assert large - small == (10**8 - 10**6) * (2 * 4 + 4)


# ---------------------------------------------------------------------------------------------
# Bad recipes through the CLI: exit 2 with one error line naming the method or the key.


def _recipe(method: str, base: str | None, models: list[str], params: str = "") -> str:
    lines = [f"merge_method: {method}"]
    if base is not None:
        lines.append(f"base_model: {base}")
    lines.append("models:")
    lines += [f"  - model: {m}" for m in models]
    if params:
        lines += ["parameters:", *(f"  {p}" for p in params.split("; "))]
    lines.append("dtype: float32")
    return "\n".join(lines) + "\n"


BAD_RECIPES = {
    "stock_one_model": (("model_stock", "B", ["F1"]), ["model_stock", "at least 2", "got 1"]),
    "stock_no_base": (("model_stock", None, ["F1", "F2"]), ["model_stock", "base model"]),
    "stock_filter_wise_not_bool": (
        ("model_stock", "B", ["F1", "F2"], "filter_wise: 3"),
        ["filter_wise"],
    ),
    "swap_two_models": (("nearswap", "B", ["F1", "F2"], "t: 0.1"), ["nearswap", "exactly 1"]),
    "swap_no_base": (("nearswap", None, ["F1"], "t: 0.1"), ["nearswap", "base model"]),
    "swap_negative_t": (("nearswap", "B", ["F1"], "t: -0.1"), ["'t'", "negative"]),
    "swap_missing_t": (("nearswap", "B", ["F1"]), ["nearswap", "'t'"]),
    "fusion_two_models": (("arcee_fusion", "B", ["B", "F1", "F2"]), ["arcee_fusion", "exactly 1"]),
    "fusion_no_base": (("arcee_fusion", None, ["F1"]), ["arcee_fusion", "base model"]),
}


@pytest.fixture(scope="module")
def bad_runs(family: Family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """`mergesmith validate` on every bad recipe, run side by side (each starts Python)."""
    base, tuned = family
    names = {"B": str(base), "F1": str(tuned[0]), "F2": str(tuned[1])}
    folder = tmp_path_factory.mktemp("bad_recipes")

    def validate(case: str) -> Any:
        method, b, models, *params = BAD_RECIPES[case][0]
        text = _recipe(method, names.get(b) if b else None, [names[m] for m in models], *params)
        return run_cli("validate", write_recipe(folder, text, f"{case}.yml"))

    with ThreadPoolExecutor(max_workers=4) as pool:
        return dict(zip(BAD_RECIPES, pool.map(validate, BAD_RECIPES), strict=True))


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipes_exit_2_with_one_error_line(case: str, bad_runs: dict[str, Any]) -> None:
    done = bad_runs[case]
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    errors = [line for line in done.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1, done.stderr
    assert all(part in errors[0] for part in BAD_RECIPES[case][1]), errors[0]


def test_a_weight_on_model_stock_is_a_warning_naming_it(family: Family, tmp_path: Path) -> None:
    base, tuned = family
    text = _recipe("model_stock", str(base), [str(t) for t in tuned], "weight: 0.5")
    done = run_cli("validate", write_recipe(tmp_path, text))
    assert done.returncode == 0, done.stderr
    output = done.stdout + done.stderr
    assert "'weight' is not a parameter of model_stock" in output
