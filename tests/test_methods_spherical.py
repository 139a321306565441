"""nuslerp, multislerp and karcher (SEMANTICS.md 5: as mergekit 0.1.5 computes them).

Expected values are worked by hand (angles of small vectors in the plane) or computed by direct
whole-vector float64 implementations written below in mergekit's own terms: per-vector loops for
nuslerp, the tangent-space step for multislerp, the full-vector iteration for karcher. The
methods themselves work from Gram matrices and coefficients, block by block, so agreement with
the direct forms checks those rewrites. Bad recipes go through the real CLI.
"""

from __future__ import annotations

import doctest
import math
from pathlib import Path

import pytest
import torch

from mergesmith.errors import MergeError
from mergesmith.methods import MethodInputs, get_method
from mergesmith.methods import karcher as karcher_module
from mergesmith.methods import multislerp as multislerp_module
from mergesmith.methods import nuslerp as nuslerp_module
from mergesmith.methods.registry import INPUT_WARNED, OPTIONAL, JobSize
from mergesmith.ops.blocks import BLOCK
from tests.conftest import run_cli, run_method, write_recipe

R = 1.0 / math.sqrt(2.0)
Family = tuple[Path, list[Path]]


def _t(values: list[float] | list[list[float]], dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.tensor(values, dtype=dtype)


def _close(got: torch.Tensor, expected: list | torch.Tensor, tol: float = 1e-6) -> None:
    want = expected if isinstance(expected, torch.Tensor) else _t(expected)
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


def _random(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def nuslerp(
    models: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None = None,
    **params: object,
) -> torch.Tensor:
    return run_method("nuslerp", base, models, [{"weight": w} for w in weights], params)


def multislerp(
    models: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None = None,
    **params: object,
) -> torch.Tensor:
    return run_method("multislerp", base, models, [{"weight": w} for w in weights], params)


def karcher(models: list[torch.Tensor], **params: object) -> torch.Tensor:
    return run_method("karcher", None, models, [{} for _ in models], params)


# ---------------------------------------------------------------------------------------------
# Direct whole-vector references (float64), written from mergekit's description of each step.


def direct_slerp_pair(t: float, v0: torch.Tensor, v1: torch.Tensor) -> torch.Tensor:
    """One pair of 1-D float64 vectors, as mergekit's nuslerp treats it."""
    u0 = v0 / max(float(v0.norm()), 1e-7)
    u1 = v1 / max(float(v1.norm()), 1e-7)
    cos = min(1.0, max(-1.0, float((u0 * u1).sum())))
    if 1.0 - cos * cos <= 1e-16:
        return (1 - t) * v0 + t * v1
    theta = math.acos(cos)
    return (math.sin((1 - t) * theta) * v0 + math.sin(t * theta) * v1) / math.sin(theta)


def direct_slerp_rows(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Every row of two float64 [count, length] matrices at once, as mergekit's nuslerp."""
    ua = a / a.norm(dim=1, keepdim=True).clamp(min=1e-7)
    ub = b / b.norm(dim=1, keepdim=True).clamp(min=1e-7)
    cos = (ua * ub).sum(dim=1, keepdim=True).clamp(-1.0, 1.0)
    colinear = 1.0 - cos**2 <= 1e-16
    theta = torch.acos(torch.where(colinear, 0.0, cos))
    arc = (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)
    return torch.where(colinear, (1 - t) * a + t * b, arc)


def direct_nuslerp(
    models: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    row_wise: bool,
    flatten: bool,
    loop: bool = True,
) -> torch.Tensor:
    total = weights[0] + weights[1]
    t = 0.5 if abs(total) < 1e-6 else weights[1] / total
    a, b = (m.double() for m in models)
    if base is not None:
        a, b = a - base.double(), b - base.double()
    shape = a.shape
    if flatten or a.dim() <= 1:
        out = direct_slerp_pair(t, a.reshape(-1), b.reshape(-1))
    else:
        # Vectors along the last axis, or (row-wise) along the first: move it last, loop.
        axis = 0 if row_wise else -1
        a_m, b_m = a.movedim(axis, -1), b.movedim(axis, -1)
        moved = a_m.shape
        rows_a, rows_b = a_m.reshape(-1, moved[-1]), b_m.reshape(-1, moved[-1])
        if loop:
            pairs = zip(rows_a, rows_b, strict=True)
            rows = torch.stack([direct_slerp_pair(t, x, y) for x, y in pairs])
        else:
            rows = direct_slerp_rows(t, rows_a, rows_b)
        out = rows.reshape(moved).movedim(-1, axis)
    out = out.reshape(shape)
    return out + base.double() if base is not None else out


def direct_multislerp(
    models: list[torch.Tensor],
    weights: list[float],
    base: torch.Tensor | None,
    normalize: bool = True,
    eps: float = 1e-8,
) -> torch.Tensor:
    """Mergekit's steps, tangent-space interpolation included."""
    if len(models) == 1:
        return models[0].double()
    x = torch.stack([m.double().reshape(-1) for m in models])
    if base is not None:
        x = x - base.double().reshape(-1)
    w = torch.tensor(weights, dtype=torch.float64)
    if normalize:
        w = w / w.sum()
    norms = x.norm(dim=1, keepdim=True)
    units = x / (norms + eps)
    mean = (units * w[:, None]).sum(0)
    if mean.norm() < eps:
        out = (x * w[:, None]).sum(0)
    else:
        mean = mean / mean.norm()
        dots = (units * mean).sum(1, keepdim=True)
        tangent = ((units - dots * mean) * w[:, None]).sum(0)
        r = tangent.norm() + eps
        out = (mean * torch.cos(r) + tangent * torch.sin(r) / r) * (norms[:, 0] * w).sum()
    out = out.reshape(models[0].shape)
    return out + base.double() if base is not None else out


def direct_karcher(models: list[torch.Tensor], max_iter: int = 10, tol: float = 1e-5):
    """Mergekit's loop on whole float64 vectors (for inputs away from the antipodes)."""
    xs = [m.double().reshape(-1) for m in models]
    if len(xs) == 1:
        return models[0].double()
    alphas = [1.0 / len(xs)] * len(xs)
    norms = [float(x.norm()) for x in xs]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros(models[0].shape, dtype=torch.float64)
    total = sum(alphas[i] for i in valid)
    a = [alphas[i] / total for i in valid]
    units = [xs[i] / norms[i] for i in valid]
    mean = sum(ai * u for ai, u in zip(a, units, strict=True))
    mean = units[0].clone() if float(mean.norm()) < tol else mean / mean.norm()
    for _ in range(max_iter):
        tangent = torch.zeros_like(mean)
        for ai, u in zip(a, units, strict=True):
            dot = min(1.0, max(-1.0, float(mean @ u)))
            theta = math.acos(dot)
            if theta < tol:
                continue
            tangent += ai * theta / math.sin(theta) * (u - dot * mean)
        r = float(tangent.norm())
        if r < tol:
            break
        mean = math.cos(r) * mean + math.sin(r) * tangent / r
        if float(mean.norm()) > tol:
            mean = mean / mean.norm()
    scale = sum(al * n for al, n in zip(alphas, norms, strict=True))
    return (scale * mean).reshape(models[0].shape)


# ---------------------------------------------------------------------------------------------
# The registry's view


def test_the_methods_are_registered_with_mergekits_parameters_and_base_rules() -> None:
    nu, multi, kar = (get_method(n) for n in ("nuslerp", "multislerp", "karcher"))
    assert nu is not None and multi is not None and kar is not None
    assert (nu.base, nu.min_models, nu.max_models) == (OPTIONAL, 2, 2)
    assert (multi.base, multi.min_models, multi.max_models) == (OPTIONAL, 1, None)
    assert (kar.base, kar.min_models, kar.max_models) == (INPUT_WARNED, 1, None)
    specs = {m.name: {p.name: p for p in m.params} for m in (nu, multi, kar)}
    assert specs["nuslerp"]["weight"].per_model and specs["nuslerp"]["weight"].required
    assert specs["nuslerp"]["nuslerp_row_wise"].default is False
    assert specs["nuslerp"]["nuslerp_flatten"].default is True
    assert specs["multislerp"]["weight"].per_model and specs["multislerp"]["weight"].required
    assert specs["multislerp"]["normalize_weights"].default is True
    assert specs["multislerp"]["eps"].default == 1e-8
    assert specs["karcher"]["max_iter"].kind is int and specs["karcher"]["max_iter"].default == 10
    assert specs["karcher"]["tol"].kind is float and specs["karcher"]["tol"].default == 1e-5
    assert set(specs["karcher"]) == {"max_iter", "tol"}


@pytest.mark.parametrize("module", [nuslerp_module, multislerp_module, karcher_module])
def test_the_docstring_examples_run(module: object) -> None:
    result = doctest.testmod(module)  # type: ignore[arg-type]
    assert result.attempted > 0 and result.failed == 0


def test_the_memory_models_do_not_grow_with_the_tensor_beyond_its_storage() -> None:
    for name in ("nuslerp", "multislerp", "karcher"):
        method = get_method(name)
        assert method is not None
        small, large = (JobSize(n, 3, 4, 4) for n in (BLOCK, 100 * BLOCK))
        extra = [method.memory(j) - j.numel * (4 * 3 + 4) for j in (small, large)]
        assert extra[0] == extra[1] > 0


# ---------------------------------------------------------------------------------------------
# nuslerp


def test_nuslerp_equal_weights_of_orthogonal_vectors_is_the_midpoint_of_the_arc() -> None:
    _close(nuslerp([_t([1.0, 0.0]), _t([0.0, 1.0])], [1.0, 1.0]), [R, R])


def test_nuslerp_t_is_the_second_weight_over_the_sum() -> None:
    # t = 3 / 4 of a right angle from the first vector: angle 3 pi / 8.
    got = nuslerp([_t([1.0, 0.0]), _t([0.0, 1.0])], [1.0, 3.0])
    _close(got, [math.cos(3 * math.pi / 8), math.sin(3 * math.pi / 8)])
    # Only the ratio matters.
    _close(nuslerp([_t([1.0, 0.0]), _t([0.0, 1.0])], [0.25, 0.75]), got)


def test_nuslerp_weights_that_cancel_give_t_one_half() -> None:
    got = nuslerp([_t([1.0, 0.0]), _t([0.0, 1.0])], [1.0, -1.0])
    _close(got, [R, R])


def test_nuslerp_negative_t_extrapolates_along_the_arc() -> None:
    # weights (2, -1): t = -1, the angle -pi/2: sin(2 theta)/sin(theta) v0 - v1 = [0, -1].
    got = nuslerp([_t([1.0, 0.0]), _t([0.0, 1.0])], [2.0, -1.0])
    _close(got, [0.0, -1.0])


def test_nuslerp_scales_the_vectors_not_their_unit_copies() -> None:
    # sin(pi/4) * (2 e1) + sin(pi/4) * (4 e2) over sin(pi/2).
    got = nuslerp([_t([2.0, 0.0]), _t([0.0, 4.0])], [1.0, 1.0])
    _close(got, [2 * R, 4 * R])


def test_nuslerp_parallel_vectors_use_lerp() -> None:
    got = nuslerp([_t([1.0, 2.0]), _t([2.0, 4.0])], [3.0, 1.0])
    _close(got, [0.75 * 1 + 0.25 * 2, 0.75 * 2 + 0.25 * 4])


def test_nuslerp_antipodal_vectors_use_lerp() -> None:
    got = nuslerp([_t([1.0, 0.0]), _t([-2.0, 0.0])], [1.0, 1.0])
    _close(got, [-0.5, 0.0])


def test_nuslerp_a_zero_vector_counts_as_orthogonal() -> None:
    # Mergekit's unit copy of 0 is 0, so cos = 0, theta = pi/2: sin(t pi/2) v, not t v.
    got = nuslerp([_t([0.0, 0.0]), _t([3.0, 4.0])], [1.0, 1.0])
    _close(got, [3 * R, 4 * R])
    both = nuslerp([_t([0.0, 0.0]), _t([0.0, 0.0])], [1.0, 2.0])
    assert both.tolist() == [0.0, 0.0]


def test_nuslerp_with_a_base_interpolates_the_task_vectors() -> None:
    base = _t([1.0, 1.0])
    got = nuslerp([_t([2.0, 1.0]), _t([1.0, 3.0])], [1.0, 1.0], base=base)
    # deltas e1 and 2 e2 are orthogonal: base + sin(pi/4) (e1 + 2 e2).
    _close(got, [1 + R, 1 + 2 * R])


def test_nuslerp_a_model_equal_to_the_base_shrinks_the_other_task_vector() -> None:
    base = _t([1.0, -1.0])
    got = nuslerp([base.clone(), _t([4.0, 3.0])], [1.0, 3.0], base=base)
    scale = math.sin(0.75 * math.pi / 2)
    _close(got, [1 + 3 * scale, -1 + 4 * scale])


def _matrices() -> tuple[torch.Tensor, torch.Tensor]:
    # Row 0: e1 and e2 (orthogonal); row 1: (1, 1) and (2, 2) (parallel).
    # Column 0: (1, 1) and (0, 2); column 1: (0, 1) and (1, 2).
    return _t([[1.0, 0.0], [1.0, 1.0]]), _t([[0.0, 1.0], [2.0, 2.0]])


def test_nuslerp_without_flatten_interpolates_each_row() -> None:
    a, b = _matrices()
    got = nuslerp([a, b], [1.0, 1.0], nuslerp_flatten=False)
    _close(got, [[R, R], [1.5, 1.5]])


def test_nuslerp_row_wise_without_flatten_interpolates_each_column() -> None:
    a, b = _matrices()
    got = nuslerp([a, b], [1.0, 1.0], nuslerp_flatten=False, nuslerp_row_wise=True)
    # Column 0: (1, 1) and (0, 2) are 45 degrees apart: sin(pi/8) / sin(pi/4) each.
    c = math.sin(math.pi / 8) / math.sin(math.pi / 4)
    col0 = [c * 1 + c * 0, c * 1 + c * 2]
    # Column 1: (0, 1) and (1, 2): cos = 2 / sqrt(5).
    theta = math.acos(2 / math.sqrt(5))
    k = math.sin(theta / 2) / math.sin(theta)
    col1 = [k * 0 + k * 1, k * 1 + k * 2]
    _close(got, [[col0[0], col1[0]], [col0[1], col1[1]]])


def test_nuslerp_flatten_takes_the_whole_matrix_and_ignores_row_wise() -> None:
    a, b = _matrices()
    va, vb = a.reshape(-1).double(), b.reshape(-1).double()
    theta = math.acos(float(va @ vb) / float(va.norm() * vb.norm()))
    k = math.sin(theta / 2) / math.sin(theta)
    expected = (k * (va + vb)).reshape(2, 2)
    _close(nuslerp([a, b], [1.0, 1.0]), expected)
    _close(nuslerp([a, b], [1.0, 1.0], nuslerp_row_wise=True), expected)


@pytest.mark.parametrize("flags", [(False, False), (True, False), (False, True), (True, True)])
def test_nuslerp_one_dimensional_tensors_are_one_vector_whatever_the_flags(
    flags: tuple[bool, bool],
) -> None:
    row_wise, flatten = flags
    got = nuslerp(
        [_t([1.0, 0.0, 0.0]), _t([0.0, 0.0, 2.0])],
        [1.0, 1.0],
        nuslerp_row_wise=row_wise,
        nuslerp_flatten=flatten,
    )
    _close(got, [R, 0.0, 2 * R])


@pytest.mark.parametrize("flags", [(False, False), (True, False), (False, True)])
@pytest.mark.parametrize("with_base", [False, True])
def test_nuslerp_three_dimensional_tensors_match_a_per_vector_loop(
    flags: tuple[bool, bool], with_base: bool
) -> None:
    row_wise, flatten = flags
    models = [_random((3, 4, 5), 1), _random((3, 4, 5), 2)]
    base = _random((3, 4, 5), 3) if with_base else None
    got = nuslerp(models, [0.3, 0.9], base=base, nuslerp_row_wise=row_wise, nuslerp_flatten=flatten)
    expected = direct_nuslerp(models, [0.3, 0.9], base, row_wise, flatten)
    _close(got, expected, tol=1e-5)


@pytest.mark.parametrize(
    "shape,row_wise,flatten",
    [
        ((2, BLOCK + 1000), False, False),  # rows longer than a block: two passes
        ((BLOCK + 1000, 3), True, False),  # columns longer than a block
        ((BLOCK // 4 + 3, 5), False, False),  # many short rows: several panels
        ((7, BLOCK // 3), True, False),  # many short columns
        ((3, BLOCK // 2 + 5), False, True),  # one flat vector over two blocks
    ],
)
def test_nuslerp_blocked_panels_match_the_direct_form(
    shape: tuple[int, int], row_wise: bool, flatten: bool
) -> None:
    models = [_random(shape, 4), _random(shape, 5)]
    base = _random(shape, 6)
    got = nuslerp(models, [1.0, 2.0], base=base, nuslerp_row_wise=row_wise, nuslerp_flatten=flatten)
    expected = direct_nuslerp(models, [1.0, 2.0], base, row_wise, flatten, loop=False)
    _close(got, expected, tol=2e-5)


def test_nuslerp_bf16_inputs_are_computed_in_float32_and_rounded_once() -> None:
    a, b = _random((4, 8), 7).bfloat16(), _random((4, 8), 8).bfloat16()
    method = get_method("nuslerp")
    assert method is not None
    inputs = MethodInputs(
        None,
        [a, b],
        {"nuslerp_row_wise": False, "nuslerp_flatten": False},
        [{"weight": 1.0}, {"weight": 2.0}],
        [0, 0],
        out_dtype=torch.bfloat16,
    )
    got = method.run(inputs)
    assert got.dtype == torch.bfloat16
    expected = direct_nuslerp([a, b], [1.0, 2.0], None, False, False)
    assert torch.equal(got, expected.to(torch.bfloat16))


def test_nuslerp_does_not_modify_its_inputs() -> None:
    a, b, base = _t([1.0, 2.0]), _t([3.0, -2.0]), _t([0.5, 0.5])
    nuslerp([a, b], [1.0, 1.0], base=base)
    nuslerp([a, b], [1.0, 1.0])
    assert a.tolist() == [1.0, 2.0] and b.tolist() == [3.0, -2.0]
    assert base.tolist() == [0.5, 0.5]


# ---------------------------------------------------------------------------------------------
# multislerp


def test_multislerp_is_the_mean_direction_scaled_by_the_mean_norm() -> None:
    got = multislerp([_t([2.0, 0.0]), _t([0.0, 4.0])], [1.0, 1.0])
    # Direction halfway (45 degrees), length (2 + 4) / 2.
    _close(got, [3 * R, 3 * R])


def test_multislerp_weights_pull_the_direction_and_the_length() -> None:
    got = multislerp([_t([2.0, 0.0]), _t([0.0, 4.0])], [3.0, 1.0])
    # Mean of units: (3/4, 1/4); length 3/4 * 2 + 1/4 * 4 = 2.5.
    direction = [0.75 / math.hypot(0.75, 0.25), 0.25 / math.hypot(0.75, 0.25)]
    _close(got, [2.5 * direction[0], 2.5 * direction[1]])


def test_multislerp_unnormalized_weights_scale_the_length() -> None:
    got = multislerp([_t([2.0, 0.0]), _t([0.0, 4.0])], [1.0, 1.0], normalize_weights=False)
    _close(got, [6 * R, 6 * R])


def test_multislerp_eps_enters_the_unit_vectors_and_the_final_cosine() -> None:
    eps = 0.5
    got = multislerp([_t([2.0, 0.0]), _t([0.0, 4.0])], [1.0, 1.0], eps=eps)
    m = [0.5 * 2 / (2 + eps), 0.5 * 4 / (4 + eps)]
    size = math.hypot(*m)
    _close(got, [math.cos(eps) * 3 * m[0] / size, math.cos(eps) * 3 * m[1] / size])


def test_multislerp_with_a_base_works_on_task_vectors() -> None:
    base = _t([1.0, -1.0])
    got = multislerp([_t([3.0, -1.0]), _t([1.0, 3.0])], [1.0, 1.0], base=base)
    _close(got, [1 + 3 * R, -1 + 3 * R])


def test_multislerp_one_model_is_returned_unchanged_whatever_the_base_or_weight() -> None:
    x = _t([1.0, 2.0, 3.0])
    assert torch.equal(multislerp([x], [0.0], base=_t([9.0, 9.0, 9.0])), x)
    assert torch.equal(multislerp([x], [5.0], normalize_weights=False), x)


def test_multislerp_parallel_vectors_keep_their_direction() -> None:
    got = multislerp([_t([1.0, 1.0]), _t([3.0, 3.0])], [1.0, 1.0])
    _close(got, [2.0, 2.0])


def test_multislerp_two_antipodal_models_fall_back_to_the_weighted_sum() -> None:
    # Units e1 and -e1 cancel: mergekit's fallback is w1 X1 + w2 X2.
    got = multislerp([_t([1.0, 0.0]), _t([-3.0, 0.0])], [1.0, 1.0])
    _close(got, [-1.0, 0.0])
    base = _t([0.5, 0.5])
    got = multislerp([_t([1.5, 0.5]), _t([-2.5, 0.5])], [1.0, 1.0], base=base)
    _close(got, [-1.0 + 0.5, 0.5])


def test_multislerp_balanced_three_models_fall_back_to_the_weighted_sum() -> None:
    # Mergekit raises here; we take the weighted sum, as it does for two models.
    got = multislerp([_t([1.0, 0.0]), _t([-2.0, 0.0]), _t([0.0, 0.0])], [1.0, 1.0, 1.0])
    _close(got, [-1.0 / 3.0, 0.0])


def test_multislerp_a_tensor_no_model_changed_stays_the_base() -> None:
    base = _t([0.25, -4.0, 3.0])
    got = multislerp([base.clone(), base.clone(), base.clone()], [1.0, 2.0, 3.0], base=base)
    assert torch.equal(got, base)


def test_multislerp_weights_summing_to_zero_cannot_be_normalized() -> None:
    with pytest.raises(MergeError, match="sum to zero"):
        multislerp([_t([1.0, 0.0]), _t([0.0, 1.0]), _t([1.0, 1.0])], [1.0, -0.5, -0.5])
    # Without normalisation they are fine.
    got = multislerp([_t([1.0, 0.0]), _t([0.0, 1.0])], [1.0, -1.0], normalize_weights=False)
    # m = e1 - e2, length 1 - 1 = 0.
    _close(got, [0.0, 0.0])


def test_multislerp_eps_zero_and_a_zero_vector_give_no_nan() -> None:
    got = multislerp([_t([0.0, 0.0]), _t([0.0, 2.0])], [1.0, 1.0], eps=0.0)
    _close(got, [0.0, 1.0])


@pytest.mark.parametrize("normalize", [True, False])
@pytest.mark.parametrize("with_base", [False, True])
@pytest.mark.parametrize("count", [2, 3, 5])
def test_multislerp_matches_mergekits_steps_including_the_tangent_step(
    normalize: bool, with_base: bool, count: int
) -> None:
    models = [_random((6, 7), 10 + i) for i in range(count)]
    weights = [0.5, 1.0, 2.0, -0.25, 0.75][:count]
    base = _random((6, 7), 99) if with_base else None
    got = multislerp(models, weights, base=base, normalize_weights=normalize, eps=1e-3)
    _close(got, direct_multislerp(models, weights, base, normalize, 1e-3), tol=1e-5)


def test_multislerp_over_several_blocks_matches_the_direct_form() -> None:
    models = [_random((BLOCK + 17,), 20 + i) for i in range(3)]
    base = _random((BLOCK + 17,), 23)
    got = multislerp(models, [1.0, 2.0, 3.0], base=base)
    _close(got, direct_multislerp(models, [1.0, 2.0, 3.0], base), tol=1e-5)


def test_multislerp_bf16_inputs() -> None:
    models = [_random((16,), 30 + i).bfloat16() for i in range(3)]
    got = multislerp(models, [1.0, 1.0, 2.0])
    _close(got, direct_multislerp(models, [1.0, 1.0, 2.0], None), tol=1e-6)


# ---------------------------------------------------------------------------------------------
# karcher


def test_karcher_of_two_orthogonal_vectors_is_the_midpoint_times_the_mean_norm() -> None:
    _close(karcher([_t([2.0, 0.0]), _t([0.0, 4.0])]), [3 * R, 3 * R])


def test_karcher_converges_to_the_mean_angle_on_a_circle() -> None:
    # Units at 0, 0 and 90 degrees: the Karcher mean is at 30 degrees, the normalised
    # Euclidean mean (no iteration) at atan(1/2).
    models = [_t([1.0, 0.0]), _t([1.0, 0.0]), _t([0.0, 1.0])]
    converged = karcher(models, max_iter=100, tol=1e-12)
    _close(converged, [math.cos(math.pi / 6), math.sin(math.pi / 6)], tol=1e-6)
    start = karcher(models, max_iter=0)
    angle = math.atan(0.5)
    _close(start, [math.cos(angle), math.sin(angle)])
    # Each iteration moves from there towards 30 degrees.
    one = karcher(models, max_iter=1, tol=1e-12)
    reached = math.atan2(float(one[1]), float(one[0]))
    assert angle < reached <= math.pi / 6 + 1e-7


def test_karcher_stops_when_the_step_is_below_tol() -> None:
    models = [_t([1.0, 0.0]), _t([1.0, 0.0]), _t([0.0, 1.0])]
    # The first step is about 0.06 rad: tol above it stops at the Euclidean mean.
    assert torch.equal(karcher(models, max_iter=50, tol=0.1), karcher(models, max_iter=0))


def test_karcher_parallel_vectors_keep_their_direction() -> None:
    _close(karcher([_t([1.0, 1.0]), _t([2.0, 2.0])]), [1.5, 1.5])


def test_karcher_antipodal_vectors_start_from_the_first_and_stay_there() -> None:
    # The mean of e1 and -e1 is zero: the first unit vector is the start; the second input is
    # at its antipode and pulls in no direction. Length: mean norm 2.
    _close(karcher([_t([1.0, 0.0]), _t([-3.0, 0.0])]), [2.0, 0.0])


def test_karcher_an_antipodal_third_input_is_skipped() -> None:
    # Units e1, e2 and -e1: the start (0, 1/3) normalises to e2, where e1 and -e1 pull equally.
    _close(karcher([_t([2.0, 0.0]), _t([0.0, 4.0]), _t([-3.0, 0.0])], max_iter=5), [0.0, 3.0])


def test_karcher_zero_vectors_take_no_direction_but_count_in_the_length() -> None:
    got = karcher([_t([0.0, 0.0]), _t([2.0, 0.0]), _t([0.0, 2.0])])
    _close(got, [4 / 3 * R, 4 / 3 * R])
    # Norms up to tol count as zero.
    got = karcher([_t([0.0, 1e-6]), _t([3.0, 0.0])], tol=1e-5)
    _close(got, [(3.0 + 1e-6) / 2, 0.0])


def test_karcher_of_only_zero_vectors_is_zero() -> None:
    got = karcher([_t([0.0, 0.0]), _t([0.0, 0.0])])
    assert got.tolist() == [0.0, 0.0]


def test_karcher_one_model_is_returned_unchanged() -> None:
    x = _t([1.0, -2.0])
    assert torch.equal(karcher([x]), x)


def test_karcher_tol_zero_with_identical_inputs_gives_the_input_not_nan() -> None:
    x = _t([3.0, 4.0])
    _close(karcher([x, x.clone(), x.clone()], tol=0.0, max_iter=7), [3.0, 4.0])


def test_karcher_tol_zero_stops_once_the_steps_are_negligible() -> None:
    models = [_random((30,), 80 + i) for i in range(4)]
    got = karcher(models, max_iter=10_000, tol=0.0)
    # The fixed point the full-vector iteration reaches.
    _close(got, direct_karcher(models, 200, 1e-14), tol=1e-6)


@pytest.mark.parametrize("count", [2, 3, 5])
@pytest.mark.parametrize("max_iter,tol", [(0, 1e-5), (1, 1e-5), (3, 1e-9), (10, 1e-5), (50, 1e-3)])
def test_karcher_gram_iteration_equals_the_full_vector_iteration(
    count: int, max_iter: int, tol: float
) -> None:
    # Independent random vectors are far apart (wide angles), so every iteration moves.
    models = [_random((5, 6), 40 + i) + (0.5 if i % 2 else 0.0) for i in range(count)]
    got = karcher(models, max_iter=max_iter, tol=tol)
    _close(got, direct_karcher(models, max_iter, tol), tol=1e-6)


def test_karcher_coefficients_reproduce_the_direct_iteration_in_float64() -> None:
    # The coefficient form itself, without the float32 output rounding.
    models = [_random((40,), 50 + i).double() for i in range(4)]
    gram = torch.stack(models) @ torch.stack(models).T
    coefficients = karcher_module.karcher_coefficients(gram, 8, 1e-10)
    assert coefficients is not None
    rebuilt = sum(c * m for c, m in zip(coefficients, models, strict=True))
    expected = direct_karcher(models, 8, 1e-10)
    torch.testing.assert_close(rebuilt, expected, rtol=1e-12, atol=1e-12)


def test_karcher_over_several_blocks_matches_the_direct_form() -> None:
    models = [_random((BLOCK + 5,), 60 + i) for i in range(3)]
    _close(karcher(models), direct_karcher(models), tol=1e-6)


def test_karcher_bf16_inputs() -> None:
    models = [_random((12,), 70 + i).bfloat16() for i in range(3)]
    _close(karcher(models), direct_karcher(models), tol=1e-6)


def test_karcher_does_not_modify_its_inputs() -> None:
    a, b = _t([1.0, 2.0]), _t([3.0, -2.0])
    karcher([a, b])
    assert a.tolist() == [1.0, 2.0] and b.tolist() == [3.0, -2.0]


# ---------------------------------------------------------------------------------------------
# Bad recipes, through the real CLI


def _recipe(tmp_path: Path, text: str) -> Path:
    return write_recipe(tmp_path, text)


def _models(names: list[Path], params: list[str] | None = None) -> str:
    params = params or ["" for _ in names]
    lines = []
    for path, extra in zip(names, params, strict=True):
        lines.append(f"  - model: {path}")
        if extra:
            lines.append(f"    parameters: {{{extra}}}")
    return "\n".join(lines)


def test_cli_nuslerp_with_three_models_is_refused(family: Family, tmp_path: Path) -> None:
    _, tuned = family
    models = _models(tuned, ["weight: 1.0"] * 3)
    path = _recipe(tmp_path, f"merge_method: nuslerp\nmodels:\n{models}\ndtype: float32\n")
    done = run_cli("validate", path)
    assert done.returncode == 2, done.stderr
    assert "nuslerp" in done.stderr and "exactly 2" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_nuslerp_with_a_base_and_one_model_is_refused(family: Family, tmp_path: Path) -> None:
    base, tuned = family
    text = (
        f"merge_method: nuslerp\nbase_model: {base}\n"
        f"models:\n{_models(tuned[:1], ['weight: 1.0'])}\ndtype: float32\n"
    )
    done = run_cli("validate", _recipe(tmp_path, text))
    assert done.returncode == 2, done.stderr
    assert "exactly 2" in done.stderr and "besides the base" in done.stderr


def test_cli_nuslerp_without_weights_names_the_missing_parameter(
    family: Family, tmp_path: Path
) -> None:
    _, tuned = family
    text = f"merge_method: nuslerp\nmodels:\n{_models(tuned[:2])}\ndtype: float32\n"
    done = run_cli("validate", _recipe(tmp_path, text))
    assert done.returncode == 2, done.stderr
    assert "'weight'" in done.stderr


@pytest.mark.parametrize(
    "method,params,key",
    [
        ("karcher", "max_iter: 2.5", "max_iter"),
        ("karcher", "max_iter: -1", "max_iter"),
        ("karcher", "max_iter: 100000", "max_iter"),
        ("karcher", "tol: -1e-5", "tol"),
        ("multislerp", "eps: -0.1", "eps"),
        ("multislerp", "normalize_weights: 3", "normalize_weights"),
        ("nuslerp", "nuslerp_flatten: 2", "nuslerp_flatten"),
    ],
)
def test_cli_a_wrong_parameter_value_is_refused_naming_the_key(
    family: Family, tmp_path: Path, method: str, params: str, key: str
) -> None:
    _, tuned = family
    weights = ["weight: 1.0"] * 2 if method != "karcher" else None
    text = (
        f"merge_method: {method}\nmodels:\n{_models(tuned[:2], weights)}\n"
        f"parameters: {{{params}}}\ndtype: float32\n"
    )
    done = run_cli("validate", _recipe(tmp_path, text))
    assert done.returncode == 2, done.stderr
    assert f"'{key}'" in done.stderr
    assert "Traceback" not in done.stderr


def test_cli_karcher_with_a_base_is_accepted_with_a_warning_naming_it(
    family: Family, tmp_path: Path
) -> None:
    base, tuned = family
    text = (
        f"merge_method: karcher\nbase_model: {base}\nmodels:\n{_models(tuned[:2])}\n"
        "parameters:\n  max_iter: 5\n  tol: 1e-5\ndtype: float32\n"
    )
    done = run_cli("validate", _recipe(tmp_path, text))
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("warning:")]
    assert any("karcher" in w and str(base) in w for w in warnings), done.stderr


def test_cli_multislerp_weights_summing_to_zero_stop_the_run_with_a_clear_error(
    family: Family, tmp_path: Path
) -> None:
    base, tuned = family
    models = _models(tuned[:2], ["weight: 1.0", "weight: -1.0"])
    text = f"merge_method: multislerp\nbase_model: {base}\nmodels:\n{models}\ndtype: float32\n"
    done = run_cli("run", _recipe(tmp_path, text), tmp_path / "out")
    assert done.returncode == 2, done.stderr
    assert "sum to zero" in done.stderr and "normalize_weights" in done.stderr
    assert "Traceback" not in done.stderr
