"""sce, ram and ramplus_tl on hand-worked tensors, against independently written formulas, and
their recipe checks through the real CLI.

Expected values are worked out in the comments or computed here by a different route (per-entry
Python, torch.var and one sort of a whole tensor) than the methods take (Welford sums, rank
cuts, blocks)."""

from __future__ import annotations

import doctest
import math
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch

from mergesmith.methods import MethodInputs, get_method
from mergesmith.methods import ram as ram_module
from mergesmith.methods import sce as sce_module
from mergesmith.methods.registry import JobSize
from mergesmith.ops.blocks import BLOCK
from tests.conftest import run_cli, run_method, write_recipe

Family = tuple[Path, list[Path]]


def _t(values: list[float], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _sce(base: torch.Tensor, models: list[torch.Tensor], **params: object) -> torch.Tensor:
    return run_method("sce", base, models, [{}] * len(models), dict(params))


def _ram(base: torch.Tensor, models: list[torch.Tensor], **params: object) -> torch.Tensor:
    return run_method("ram", base, models, [{}] * len(models), dict(params))


def _ramplus(base: torch.Tensor, models: list[torch.Tensor], **params: object) -> torch.Tensor:
    return run_method("ramplus_tl", base, models, [{}] * len(models), dict(params))


def _random_family(
    n: int, k: int, seed: int, scale: float = 0.01
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    models = []
    for i in range(k):
        spikes = (torch.rand(n, generator=g) < 0.05) * torch.randn(n, generator=g) * 5 * scale
        models.append(base + torch.randn(n, generator=g) * scale * (i + 1) + spikes)
    return base, models


def test_docstring_examples_run() -> None:
    for module in (sce_module, ram_module):
        result = doctest.testmod(module)
        assert result.attempted > 0 and result.failed == 0, module.__name__


def test_registered_with_mergekit_parameters_and_a_required_base() -> None:
    sce = get_method("sce")
    assert sce is not None and sce.needs_base and sce.min_models == 1
    assert {p.name: p.default for p in sce.params} == {"select_topk": 1.0, "int8_mask": False}
    assert not any(p.per_model for p in sce.params)
    ram = get_method("ram")
    assert ram is not None and ram.needs_base
    assert {p.name: p.default for p in ram.params} == {"epsilon": 1e-5}
    plus = get_method("ramplus_tl")
    assert plus is not None and plus.needs_base
    assert {p.name: p.default for p in plus.params} == {"r": 0.1, "alpha": 0.2, "epsilon": 1e-5}
    # Non-finite inputs provably reach RAM's output, never necessarily SCE's.
    assert ram.finite_check == plus.finite_check == "output"
    assert sce.finite_check == "inputs"


# ---------------------------------------------------------------------------------------------
# sce: hand-worked


def test_sce_selects_by_variance_weights_by_mean_square_and_erases_by_sign() -> None:
    # deltas x = [2, 1, 1], y = [-1, 3, 0]; variances [2.25, 1, 0.25] (all nonzero: 3).
    # select_topk 0.7: k = floor(3 * 0.7) = 2 -> entries 0 and 1.
    # selected x = [2, 1, 0], y = [-1, 3, 0]; mean squares 5/3, 10/3 -> weights 1/3, 2/3.
    # entry 0: sum 1 >= 0 elects +, only x agrees -> 2 * (1/3) / (1/3) = 2.
    # entry 1: both agree -> (1/3 * 1 + 2/3 * 3) / 1 = 7/3.  entry 2: nothing agrees -> 0.
    base = _t([10.0, 20.0, 30.0])
    x, y = base + _t([2.0, 1.0, 1.0]), base + _t([-1.0, 3.0, 0.0])
    torch.testing.assert_close(_sce(base, [x, y], select_topk=0.7), _t([12.0, 20 + 7 / 3, 30.0]))
    # No selection: mean squares 2 and 10/3 -> weights 3/8, 5/8.
    # entry 1: 3/8 + 15/8 = 9/4; entry 2: only x (y's zero never agrees) -> 1.
    torch.testing.assert_close(_sce(base, [x, y]), _t([12.0, 22.25, 31.0]))


def test_sce_elects_on_unweighted_deltas() -> None:
    # Mean squares: x (-1, 10) -> 50.5, y (2, 0) -> 2; weights 50.5/52.5 and 2/52.5.
    # Entry 0: unweighted sum -1 + 2 = 1 elects +, so y alone gives 2 (a vote weighted by the
    # weights would elect - and give -1).
    got = _sce(_t([0.0, 0.0]), [_t([-1.0, 10.0]), _t([2.0, 0.0])])
    torch.testing.assert_close(got, _t([2.0, 10.0]))


def test_sce_zero_sum_elects_plus() -> None:
    got = _sce(_t([0.0, 0.0]), [_t([1.0, -2.0]), _t([-1.0, 2.0])])
    assert got.tolist() == [1.0, 2.0]


def test_sce_uniform_weights_when_mean_squares_sum_below_1e_6() -> None:
    # Mean squares (1e-4)^2 / 2 and (3e-4)^2 / 2 sum to 5e-8 < 1e-6: weights 1/2, 1/2, and
    # entry 0 is (1e-4 + 3e-4) / 2 = 2e-4 (weights 1/10, 9/10 would give 2.8e-4).
    small = _sce(_t([0.0, 0.0]), [_t([1e-4, 0.0]), _t([3e-4, 0.0])])
    torch.testing.assert_close(small, _t([2e-4, 0.0]), rtol=1e-6, atol=0)
    # 1000 times larger the sum is 0.05: weights 0.1, 0.9 -> 0.01 + 0.27.
    large = _sce(_t([0.0, 0.0]), [_t([0.1, 0.0]), _t([0.3, 0.0])])
    torch.testing.assert_close(large, _t([0.28, 0.0]), rtol=1e-6, atol=0)


def test_sce_divisor_never_goes_below_1e_6() -> None:
    # Mean squares 1e6/2 and 0.25/2: y's weight w = 0.125 / 500000.125 < 1e-6. Entry 1 has only
    # y's 0.5, so it is 0.5 * w / 1e-6, not 0.5.
    w = 0.125 / 500000.125
    got = _sce(_t([0.0, 0.0]), [_t([1000.0, 0.0]), _t([0.0, 0.5])])
    torch.testing.assert_close(got, _t([1000.0, 0.5 * w / 1e-6]), rtol=1e-5, atol=0)


def test_sce_select_topk_zero_or_no_selectable_entry_gives_the_base() -> None:
    base, models = _random_family(257, 3, seed=1)
    assert torch.equal(_sce(base, models, select_topk=0.0), base)
    # 257 nonzero variances * 0.003 = 0.77: k = 0, nothing selected.
    assert torch.equal(_sce(base, models, select_topk=0.003), base)


def test_sce_select_topk_one_is_no_selection() -> None:
    base, models = _random_family(300, 3, seed=2)
    # Just below 1 keeps floor(300 * 0.999) = 299 of 300 entries: a different result.
    full = _sce(base, models, select_topk=1.0)
    assert torch.equal(full, _sce(base, models))
    assert not torch.equal(full, _sce(base, models, select_topk=0.999))


def test_sce_all_zero_task_vectors_give_the_base() -> None:
    base = _t([0.5, -1.0, 2.0, 0.0])
    for select_topk in (1.0, 0.5):
        got = _sce(base, [base.clone(), base.clone()], select_topk=select_topk)
        assert torch.equal(got, base)


def test_sce_single_model() -> None:
    base, (model,) = _random_family(100, 1, seed=3)
    # One model: its weight is 1 and it agrees wherever its delta is nonzero.
    assert torch.equal(_sce(base, [model]), base + (model - base))
    # Its variance is zero everywhere: no entry is selectable.
    assert torch.equal(_sce(base, [model], select_topk=0.5), base)


def test_sce_counts_the_kept_entries_in_float32_as_mergekit() -> None:
    # 100 nonzero variances: 100 * 0.29 is 28.999999999999996 in float64, but mergekit
    # multiplies a tensor count, in float32, where it is 29.0: 29 entries are kept.
    base = torch.zeros(100)
    x = torch.arange(1, 101, dtype=torch.float32)  # variance (x/2)^2: all distinct
    got = _sce(base, [x, torch.zeros(100)], select_topk=0.29)
    assert int(np.float32(100) * np.float32(0.29)) == 29 and int(100 * 0.29) == 28
    assert torch.equal(got != 0, torch.arange(100) >= 71)  # the 29 largest


def test_sce_equal_variances_at_the_cut_are_spread_evenly() -> None:
    # Entry 0 has variance 1 (x = 2), entries 1..8 tie at 0.25 (x = 1), entry 9 has 0.
    # 9 nonzero * 0.6 = 5.4: k = 5, so 4 of the 8 tied entries: the j-th tied entry
    # (j = 0..7) is kept when floor((j+1) * 4/8) > floor(j * 4/8), i.e. j = 1, 3, 5, 7.
    x = _t([2.0, 1, 1, 1, 1, 1, 1, 1, 1, 0])
    got = _sce(torch.zeros(10), [x, torch.zeros(10)], select_topk=0.6)
    assert got.tolist() == [2.0, 0, 1, 0, 1, 0, 1, 0, 1, 0]
    # 3 of 8 (9 * 0.45 = 4.05: k = 4): j kept where floor((j+1) 3/8) steps: j = 2, 5, 7.
    got = _sce(torch.zeros(10), [x, torch.zeros(10)], select_topk=0.45)
    assert got.tolist() == [2.0, 0, 0, 1, 0, 0, 1, 0, 1, 0]


def test_sce_a_tie_run_wholly_inside_the_selection_is_kept() -> None:
    # Variances [1, 1, 0.25, 0.25, 0]: k = floor(4 * 0.5) = 2 keeps the two tied ones at 1.
    x = _t([2.0, -2.0, 1.0, 1.0, 0.0])
    got = _sce(torch.zeros(5), [x, torch.zeros(5)], select_topk=0.5)
    assert got.tolist() == [2.0, -2.0, 0.0, 0.0, 0.0]


def test_sce_ties_spread_across_blocks() -> None:
    # Every variance ties (x = 1, y = 0); n is not a multiple of the block. k = n/4 exactly, so
    # the kept entries are every fourth, j = 3, 7, 11, ...: the pattern runs on through the
    # block boundary instead of restarting there.
    n = BLOCK + 12
    x = torch.ones(n)
    got = _sce(torch.zeros(n), [x, torch.zeros(n)], select_topk=0.25)
    expected = (torch.arange(n) % 4 == 3).float()
    assert torch.equal(got, expected)
    # An uneven share: k = floor(n * 0.3); kept gaps are floor(1/0.3) or one more.
    got = _sce(torch.zeros(n), [x, torch.zeros(n)], select_topk=0.3)
    kept = got.nonzero().squeeze(1)
    assert kept.numel() == int(np.float32(n) * np.float32(0.3))
    assert set(torch.diff(kept).unique().tolist()) <= {3, 4}


def _spread_top_k(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest values; of the T values equal to the k-th largest, `need` are
    kept, spread evenly in index order (SEMANTICS.md 3), from one sort of the whole tensor."""
    if k <= 0:
        return torch.zeros_like(values, dtype=torch.bool)
    cut = torch.sort(values, descending=True).values[k - 1]
    above, tied = values > cut, values == cut
    need, total = k - int(above.sum()), int(tied.sum())
    rank = torch.cumsum(tied.long(), 0)  # 1-based among the tied
    return above | (tied & ((rank * need) // total > ((rank - 1) * need) // total))


def _sce_reference(
    base: torch.Tensor, models: list[torch.Tensor], select_topk: float
) -> torch.Tensor:
    """SCE written directly from its definition in float64, the selection by one sort."""
    b = base.double().reshape(-1)
    deltas = torch.stack([m.double().reshape(-1) - b for m in models])
    if select_topk < 1:
        var = torch.var(deltas.float(), dim=0, unbiased=False)
        nonzero = int((var != 0).sum())
        k = int(np.float32(nonzero) * np.float32(select_topk))
        deltas = deltas * _spread_top_k(var, k)
    means = deltas.square().mean(dim=1)
    weights = (
        means / means.sum() if means.sum() >= 1e-6 else torch.full_like(means, 1 / len(models))
    )
    elected = torch.where(deltas.sum(dim=0) >= 0, 1.0, -1.0).double()
    agree = (torch.sign(deltas) == elected).double() * weights[:, None]
    out = b + (deltas * agree).sum(dim=0) / agree.sum(dim=0).clamp(min=1e-6)
    return out.float().reshape(base.shape)


@pytest.mark.parametrize("k", [1, 2, 3, 5])
@pytest.mark.parametrize("select_topk", [1.0, 0.6, 0.15])
def test_sce_matches_a_directly_written_formula(k: int, select_topk: float) -> None:
    base, models = _random_family(2000, k, seed=10 + k)
    shape = (40, 50)
    base, models = base.reshape(shape), [m.reshape(shape) for m in models]
    got = _sce(base, models, select_topk=select_topk)
    torch.testing.assert_close(got, _sce_reference(base, models, select_topk), rtol=0, atol=2e-6)


def test_sce_over_several_blocks_matches_the_formula() -> None:
    base, models = _random_family(BLOCK + 1000, 3, seed=7)
    got = _sce(base, models, select_topk=0.4)
    torch.testing.assert_close(got, _sce_reference(base, models, 0.4), rtol=0, atol=2e-6)


def test_sce_bf16_ties_at_the_cut_match_the_spread_rule() -> None:
    # bfloat16 deltas take few distinct values, so many variances tie at the cut.
    base, models = _random_family(70_000, 3, seed=9)
    base, models = base.bfloat16(), [m.bfloat16() for m in models]
    var = torch.var(torch.stack([m.float() - base.float() for m in models]), 0, unbiased=False)
    k = int(np.float32(int((var != 0).sum())) * np.float32(0.5))
    at_cut = int((var == torch.sort(var, descending=True).values[k - 1]).sum())
    assert at_cut > 10  # a real tie run, split by the cut
    got = _sce(base, models, select_topk=0.5)
    torch.testing.assert_close(got, _sce_reference(base, models, 0.5), rtol=0, atol=2e-6)


def test_sce_variance_is_torch_var_bit_for_bit() -> None:
    # mergekit ranks torch.var's float32 values; ours come from the same float64 Welford sums.
    g = torch.Generator().manual_seed(5)
    for k in range(1, 7):
        for scale in (1e-3, 1.0, 1e4):
            deltas = [torch.randn(20_000, generator=g) * scale * (i + 1) for i in range(k)]
            expected = torch.var(torch.stack(deltas), dim=0, unbiased=False)
            assert torch.equal(sce_module._variance(deltas), expected), (k, scale)


def test_sce_int8_mask_never_changes_the_result() -> None:
    base, models = _random_family(500, 3, seed=4)
    for select_topk in (1.0, 0.4):
        plain = _sce(base, models, select_topk=select_topk)
        assert torch.equal(plain, _sce(base, models, select_topk=select_topk, int8_mask=True))


def test_sce_bf16_inputs_compute_in_float32() -> None:
    base, models = _random_family(3000, 3, seed=6)
    base16, models16 = base.bfloat16(), [m.bfloat16() for m in models]
    for select_topk in (1.0, 0.5):
        got = _sce(base16, models16, select_topk=select_topk)
        assert got.dtype == torch.float32
        upcast = _sce(base16.float(), [m.float() for m in models16], select_topk=select_topk)
        assert torch.equal(got, upcast)
        # Rounded once to the output dtype.
        method = get_method("sce")
        assert method is not None
        inputs = MethodInputs(
            base16,
            models16,
            {"select_topk": select_topk, "int8_mask": False},
            [{}] * 3,
            [0] * 3,
            out_dtype=torch.bfloat16,
        )
        assert torch.equal(method.run(inputs), upcast.bfloat16())


def test_sce_leaves_its_inputs_alone() -> None:
    base, models = _random_family(400, 3, seed=8)
    copies = [t.clone() for t in (base, *models)]
    _sce(base, models, select_topk=0.5)
    _sce(base, models)
    assert all(torch.equal(a, b) for a, b in zip(copies, (base, *models), strict=True))


def test_sce_memory_model_covers_inputs_output_and_selection() -> None:
    method = get_method("sce")
    assert method is not None
    n = 10 * BLOCK
    size = JobSize(numel=n, inputs=4, in_itemsize=2, out_itemsize=2)
    # Stored inputs and output, the bit mask, block temporaries.
    assert method.memory(size) >= n * (2 * 4 + 2) + n // 8 + BLOCK * 4 * 3


# ---------------------------------------------------------------------------------------------
# ram and ramplus_tl


def _ram_reference(
    base: list[float], models: list[list[float]], epsilon: float, boosts: list[float] | None = None
) -> list[float]:
    """RAM entry by entry in Python floats (epsilon compared in float32, as mergekit does)."""
    eps32 = float(np.float32(epsilon))
    out = []
    for j, b in enumerate(base):
        deltas = [float(np.float32(m[j]) - np.float32(b)) for m in models]
        counting = [i for i, d in enumerate(deltas) if abs(d) > eps32]
        if len(counting) == 1:
            (i,) = counting
            out.append(b + deltas[i] * (boosts[i] if boosts else 1.0))
        else:
            out.append(b + sum(deltas[i] for i in counting) / max(1, len(counting)))
    return out


def test_ram_keeps_unique_changes_and_averages_shared_ones() -> None:
    # entry 0: x alone -> 0.5; 1: x, y -> (1 + 3)/2; 2: all three -> (3 + 6 - 3)/3 = 2;
    # 3: nobody; 4: y's 5e-6 is below epsilon, x's 2 alone counts -> 2.
    base = _t([1.0, 1.0, 1.0, 1.0, 1.0])
    x = base + _t([0.5, 1.0, 3.0, 0.0, 2.0])
    y = base + _t([0.0, 3.0, 6.0, 0.0, 5e-6])
    z = base + _t([0.0, 0.0, -3.0, 0.0, 0.0])
    torch.testing.assert_close(_ram(base, [x, y, z]), _t([1.5, 3.0, 3.0, 1.0, 3.0]))


def test_ram_epsilon_is_a_strict_float32_threshold() -> None:
    # float32(0.1) is slightly above 0.1, yet a delta of exactly float32(0.1) does not count:
    # mergekit compares in float32, where they are equal. The next float32 up counts.
    eps32 = float(np.float32(0.1))
    above = float(np.nextafter(np.float32(0.1), np.float32(1)))
    x = _t([eps32, above, 0.05])
    got = _ram(torch.zeros(3), [x], epsilon=0.1)
    assert got.tolist() == [0.0, above, 0.0]
    # Epsilon 0: every nonzero change counts.
    assert _ram(torch.zeros(3), [x], epsilon=0.0).tolist() == x.tolist()


def test_ram_single_model_and_zero_deltas() -> None:
    base, (model,) = _random_family(64, 1, seed=20)
    expected = _t(_ram_reference(base.tolist(), [model.tolist()], 0.01))
    torch.testing.assert_close(_ram(base, [model], epsilon=0.01), expected)
    assert torch.equal(_ram(base, [base.clone(), base.clone()]), base)
    assert torch.equal(_ramplus(base, [base.clone(), base.clone()]), base)


@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("epsilon", [1e-5, 0.01, 0.03])
def test_ram_matches_an_entrywise_loop(k: int, epsilon: float) -> None:
    base, models = _random_family(500, k, seed=30 + k)
    expected = _ram_reference(base.tolist(), [m.tolist() for m in models], epsilon)
    torch.testing.assert_close(
        _ram(base, models, epsilon=epsilon), _t(expected), rtol=1e-6, atol=1e-7
    )


def test_ramplus_boosts_each_models_unique_changes() -> None:
    # x counts at 0, 1 (alone) and 2 (shared): S=1, U=2, rho=0.5, lambda = 1 + 0.4*0.5 = 1.2.
    # y counts at 2 (shared) and 3 (alone): rho = 1, capped at alpha 0.8: lambda = 1.32.
    x = _t([1.0, -2.0, 4.0, 0.0])
    y = _t([0.0, 0.0, 2.0, 10.0])
    got = _ramplus(torch.zeros(4), [x, y], r=0.4, alpha=0.8)
    torch.testing.assert_close(got, _t([1.2, -2.4, 3.0, 13.2]))
    # r = 0 is plain RAM.
    assert torch.equal(_ramplus(torch.zeros(4), [x, y], r=0.0), _ram(torch.zeros(4), [x, y]))


def test_ramplus_model_without_unique_entries_uses_epsilon_as_divisor() -> None:
    # y has one shared and no unique entry: rho = 1 / max(0, eps) = 1e5, capped at alpha. x: S=1,
    # U=1 -> rho 1 -> capped at 0.5 too: lambda_x = 1 + 2 * 0.5 = 2.
    x, y = _t([1.0, 3.0]), _t([0.0, 1.0])
    got = _ramplus(torch.zeros(2), [x, y], r=2.0, alpha=0.5)
    torch.testing.assert_close(got, _t([2.0, 2.0]))


def test_ramplus_epsilon_zero_and_an_unchanged_model_stays_finite() -> None:
    # With epsilon 0, the unchanged model has 0 shared / 0 unique: mergekit's lambda is NaN and
    # its whole output NaN. That lambda multiplies nothing, so we give RAM's result.
    x, unchanged = _t([0.5, 1.0, 0.0]), torch.zeros(3)
    got = _ramplus(torch.zeros(3), [x, unchanged], epsilon=0.0)
    assert torch.isfinite(got).all()
    # x: 2 unique, 0 shared -> lambda 1.
    assert got.tolist() == [0.5, 1.0, 0.0]


@pytest.mark.parametrize("k", [2, 3])
def test_ramplus_matches_an_entrywise_loop(k: int) -> None:
    base, models = _random_family(800, k, seed=40 + k)
    r, alpha, epsilon = 0.6, 2.0, 0.015
    eps32 = float(np.float32(epsilon))
    deltas = [
        [
            float(np.float32(v) - np.float32(b))
            for v, b in zip(m.tolist(), base.tolist(), strict=True)
        ]
        for m in models
    ]
    counts = [sum(abs(d[j]) > eps32 for d in deltas) for j in range(800)]
    boosts = []
    for d in deltas:
        shared = sum(1 for j, v in enumerate(d) if abs(v) > eps32 and counts[j] > 1)
        unique = sum(1 for j, v in enumerate(d) if abs(v) > eps32 and counts[j] == 1)
        boosts.append(1 + r * min(max(shared / max(unique, epsilon), 0.0), alpha))
    # Some ratios below the cap, and with three models one above it.
    assert any(b < 1 + r * alpha for b in boosts)
    assert k == 2 or any(b == 1 + r * alpha for b in boosts)
    expected = _ram_reference(base.tolist(), [m.tolist() for m in models], epsilon, boosts)
    got = _ramplus(base, models, r=r, alpha=alpha, epsilon=epsilon)
    torch.testing.assert_close(got, _t(expected), rtol=1e-6, atol=1e-7)


def test_ram_over_several_blocks_and_in_bf16() -> None:
    base, models = _random_family(BLOCK + 777, 3, seed=50)
    base16, models16 = base.bfloat16(), [m.bfloat16() for m in models]
    for name in ("ram", "ramplus_tl"):
        params = {"epsilon": 0.01}
        got = run_method(name, base16, models16, [{}] * 3, params)
        upcast = run_method(name, base16.float(), [m.float() for m in models16], [{}] * 3, params)
        assert got.dtype == torch.float32 and torch.equal(got, upcast)
    # Blocks change nothing: the first entries agree with a merge of those entries alone.
    head = _ram(base[:1000], [m[:1000] for m in models], epsilon=0.01)
    assert torch.equal(_ram(base, models, epsilon=0.01)[:1000], head)


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
@pytest.mark.parametrize("where", ["base", "model"])
def test_ram_non_finite_inputs_reach_the_output_entry(bad: float, where: str) -> None:
    # Why the engine may look for NaN and Inf in RAM's output only.
    base, models = _random_family(6, 3, seed=60)
    (base if where == "base" else models[1])[2] = bad
    for name in ("ram", "ramplus_tl"):
        got = run_method(name, base, models, [{}] * 3, {})
        assert not math.isfinite(float(got[2])), (name, got)
        assert torch.isfinite(got[torch.arange(6) != 2]).all()


def test_ram_leaves_its_inputs_alone() -> None:
    base, models = _random_family(300, 3, seed=70)
    copies = [t.clone() for t in (base, *models)]
    _ram(base, models, epsilon=0.01)
    _ramplus(base, models, epsilon=0.01)
    assert all(torch.equal(a, b) for a, b in zip(copies, (base, *models), strict=True))


# ---------------------------------------------------------------------------------------------
# recipes through the real CLI


BAD_RECIPES = {
    "sce_no_base": """\
merge_method: sce
models:
  - model: {ft1}
  - model: {ft2}
dtype: float32
""",
    # A gradient whose ends leave [0, 1] on both sides.
    "sce_topk_out_of_range": """\
merge_method: sce
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
parameters:
  select_topk: [1.5, 0.5, -0.1]
dtype: float32
""",
    "sce_misspelled": """\
merge_method: sce
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
parameters:
  select_top_k: 0.5
dtype: float32
""",
    "ram_no_base": """\
merge_method: ram
models:
  - model: {ft1}
  - model: {ft2}
dtype: float32
""",
    "ramplus_negative": """\
merge_method: ramplus_tl
base_model: {base}
models:
  - model: {ft1}
  - model: {ft2}
parameters:
  alpha: -0.5
  epsilon: -1e-5
dtype: float32
""",
    "ram_epsilon_per_model": """\
merge_method: ram
base_model: {base}
models:
  - model: {ft1}
    parameters:
      epsilon: 0.01
  - model: {ft2}
dtype: float32
""",
    "sce_published": """\
merge_method: sce
base_model: {base}
models:
  - model: {base}
  - model: {ft1}
    parameters:
      weight: 1.0
      density: 0.5
  - model: {ft2}
    parameters:
      weight: 0.5
      density: 0.5
parameters:
  select_topk: 0.6
dtype: float32
""",
}


@pytest.fixture(scope="module")
def validated(
    family: Family, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, subprocess.CompletedProcess]:
    """`mergesmith validate` on each of BAD_RECIPES, run together."""
    base, tuned = family
    folder = tmp_path_factory.mktemp("sce_ram_recipes")
    paths = {
        name: write_recipe(
            folder, text.format(base=base, ft1=tuned[0], ft2=tuned[1]), f"{name}.yml"
        )
        for name, text in BAD_RECIPES.items()
    }
    with ThreadPoolExecutor(max_workers=2) as pool:
        futures = {name: pool.submit(run_cli, "validate", path) for name, path in paths.items()}
        return {name: future.result() for name, future in futures.items()}


def _errors(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def test_cli_sce_and_ram_need_a_base_model(
    validated: dict[str, subprocess.CompletedProcess],
) -> None:
    for name, method in (("sce_no_base", "sce"), ("ram_no_base", "ram")):
        stderr = _errors(validated[name])
        assert f"{method} needs a base model" in stderr
        assert "base_model" in stderr


def test_cli_select_topk_outside_the_unit_interval(
    validated: dict[str, subprocess.CompletedProcess],
) -> None:
    stderr = _errors(validated["sce_topk_out_of_range"])
    assert "parameter 'select_topk': 1.5 is outside [0, 1]" in stderr
    assert "parameter 'select_topk': -0.1 is outside [0, 1]" in stderr


def test_cli_misspelled_parameter_names_the_key_and_the_close_name(
    validated: dict[str, subprocess.CompletedProcess],
) -> None:
    stderr = _errors(validated["sce_misspelled"])
    assert "sce_misspelled.yml:7: 'select_top_k' is not a parameter of sce" in stderr
    assert "did you mean 'select_topk'?" in stderr


def test_cli_ramplus_negative_alpha_and_epsilon(
    validated: dict[str, subprocess.CompletedProcess],
) -> None:
    stderr = _errors(validated["ramplus_negative"])
    assert "'alpha'" in stderr and "'epsilon'" in stderr and "negative" in stderr


def test_cli_ram_epsilon_is_global(validated: dict[str, subprocess.CompletedProcess]) -> None:
    stderr = _errors(validated["ram_epsilon_per_model"])
    assert "'epsilon' applies to the whole merge" in stderr


def test_cli_parameters_sce_does_not_read_are_warnings(
    validated: dict[str, subprocess.CompletedProcess],
) -> None:
    result = validated["sce_published"]
    assert result.returncode == 0, result.stderr
    for key in ("weight", "density"):
        assert f"'{key}' is not a parameter of sce; it is ignored" in result.stderr
