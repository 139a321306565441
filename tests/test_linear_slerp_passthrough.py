"""linear, slerp and passthrough against SEMANTICS.md section 5, with hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesmith.methods import MethodInputs, get_method
from mergesmith.methods import linear as linear_module
from mergesmith.methods import slerp as slerp_module
from tests.conftest import run_method

ROOT_HALF = 1.0 / math.sqrt(2.0)


def linear(models: list[torch.Tensor], weights: list[float], normalize: bool) -> torch.Tensor:
    return linear_module.linear(None, models, weight=weights, normalize=normalize)


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return slerp_module.slerp(a, [b], t=t)


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


def _close(got: torch.Tensor, expected: list[float] | torch.Tensor, atol: float = 1e-6) -> None:
    want = expected if isinstance(expected, torch.Tensor) else _t(expected)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=atol)


# ---------------------------------------------------------------------------------------------
# linear


def test_linear_normalized_is_the_weighted_mean() -> None:
    # (1 * [1, 2] + 3 * [3, -2]) / 4
    assert linear([_t([1.0, 2.0]), _t([3.0, -2.0])], [1.0, 3.0], True).tolist() == [2.5, -1.0]


def test_linear_unnormalized_is_the_weighted_sum() -> None:
    assert linear([_t([1.0, 2.0]), _t([3.0, -2.0])], [1.0, 3.0], False).tolist() == [10.0, -4.0]


def test_linear_normalizes_by_default_through_the_registry() -> None:
    method = get_method("linear")
    assert method is not None
    spec = method.param("normalize")
    assert spec is not None and spec.default is True and not spec.per_model
    weight = method.param("weight")
    assert weight is not None and weight.required and weight.per_model
    assert not method.needs_base
    models = [_t([1.0, 2.0]), _t([3.0, -2.0])]
    got = method.run(
        MethodInputs(None, models, {"normalize": True}, [{"weight": 1.0}, {"weight": 3.0}], [0, 0])
    )
    assert got.tolist() == [2.5, -1.0]


def test_linear_does_not_modify_its_inputs() -> None:
    a, b = _t([1.0, 2.0]), _t([3.0, -2.0])
    linear([a, b], [0.5, 0.5], True)
    assert a.tolist() == [1.0, 2.0] and b.tolist() == [3.0, -2.0]


@settings(max_examples=40, deadline=None)
@given(
    rows=st.lists(st.lists(st.integers(-8, 8), min_size=3, max_size=3), min_size=1, max_size=4),
    weights=st.lists(st.sampled_from([0.25, 0.5, 1.0, 2.0]), min_size=4, max_size=4),
)
def test_linear_matches_an_elementwise_loop(rows: list[list[int]], weights: list[float]) -> None:
    used = weights[: len(rows)]
    total = sum(used)
    expected = [sum(w * r[j] for w, r in zip(used, rows, strict=True)) / total for j in range(3)]
    got = linear([_t([float(v) for v in r]) for r in rows], used, True)
    _close(got, expected, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# slerp

A = _t([0.3, -1.2, 2.0, 0.7])
X = _t([1.5, 0.4, -0.6, 1.1])


def test_slerp_t0_is_the_base_and_t1_the_other() -> None:
    _close(slerp(0.0, A, X), A)
    _close(slerp(1.0, A, X), X)


def test_slerp_does_not_modify_its_inputs() -> None:
    a, x = A.clone(), X.clone()
    slerp(0.3, a, x)
    assert torch.equal(a, A) and torch.equal(x, X)


def test_slerp_orthogonal_unit_vectors_at_half() -> None:
    _close(slerp(0.5, _t([1.0, 0.0]), _t([0.0, 1.0])), [ROOT_HALF, ROOT_HALF])


def test_slerp_orthogonal_at_quarter_follows_the_arc() -> None:
    eighth = math.pi / 8
    _close(slerp(0.25, _t([1.0, 0.0]), _t([0.0, 1.0])), [math.cos(eighth), math.sin(eighth)])


def test_slerp_sixty_degrees_at_half_bisects_the_angle() -> None:
    # theta = pi/3: both coefficients are sin(pi/6)/sin(pi/3) = 1/sqrt(3).
    b = _t([0.5, math.sqrt(3.0) / 2.0])
    _close(slerp(0.5, _t([1.0, 0.0]), b), [math.sqrt(3.0) / 2.0, 0.5])


def test_slerp_coefficients_apply_to_unnormalized_tensors() -> None:
    _close(slerp(0.5, _t([2.0, 0.0]), _t([0.0, 3.0])), [2.0 * ROOT_HALF, 3.0 * ROOT_HALF])


def test_slerp_treats_a_matrix_as_one_flat_vector() -> None:
    # Row by row, the second row of a is zero; flattened, a and b are orthogonal unit vectors.
    a = torch.tensor([[1.0, 0.0], [0.0, 0.0]])
    b = torch.tensor([[0.0, 0.0], [0.0, 1.0]])
    _close(slerp(0.5, a, b), torch.tensor([[ROOT_HALF, 0.0], [0.0, ROOT_HALF]]))


def test_slerp_falls_back_to_lerp_for_antiparallel() -> None:
    # dot = -1: sin(theta) = 0 would blow up.
    got = slerp(0.5, _t([1.0, 2.0]), _t([-2.0, -4.0]))
    assert torch.isfinite(got).all()
    _close(got, [-0.5, -1.0])


def test_slerp_falls_back_to_lerp_just_above_threshold() -> None:
    cos_phi = 0.9996
    b = _t([cos_phi, math.sqrt(1 - cos_phi**2)])
    got = slerp(0.5, _t([1.0, 0.0]), b)
    # lerp of unit vectors is shorter than 1 by 1 - cos(phi/2) ~ 1e-4; slerp would stay on it.
    _close(got, [(1 + cos_phi) / 2, math.sqrt(1 - cos_phi**2) / 2])


def test_slerp_stays_spherical_just_below_threshold() -> None:
    cos_phi = 0.9990
    phi = math.acos(cos_phi)
    got = slerp(0.5, _t([1.0, 0.0]), _t([cos_phi, math.sin(phi)]))
    _close(got, [math.cos(phi / 2), math.sin(phi / 2)])


def test_slerp_with_a_zero_tensor_skips_normalizing_it() -> None:
    # The zero vector is not normalised; dot = 0, theta = pi/2, so out = sin(pi/4) * X.
    _close(slerp(0.5, torch.zeros(2), _t([1.0, 2.0])), [ROOT_HALF, 2.0 * ROOT_HALF])


def test_slerp_through_the_registry_puts_the_base_at_t0() -> None:
    method = get_method("slerp")
    assert method is not None and method.needs_base
    t = method.param("t")
    assert t is not None and t.required and not t.per_model
    base, other = _t([1.0, 0.0]), _t([0.0, 1.0])

    def at(value: float) -> torch.Tensor:
        return method.run(MethodInputs(base, [other], {"t": value}, [{}], [0]))

    _close(at(0.0), base)
    _close(at(1.0), other)
    _close(at(0.25), [math.cos(math.pi / 8), math.sin(math.pi / 8)])


@settings(max_examples=50, deadline=None)
@given(
    a=st.lists(st.floats(-4, 4), min_size=3, max_size=3),
    b=st.lists(st.floats(-4, 4), min_size=3, max_size=3),
    t=st.floats(0.0, 1.0),
)
def test_slerp_matches_the_formula_in_float64(a: list[float], b: list[float], t: float) -> None:
    na, nb = math.sqrt(sum(v * v for v in a)), math.sqrt(sum(v * v for v in b))
    if na < 0.1 or nb < 0.1:
        return
    dot = sum(x * y for x, y in zip(a, b, strict=True)) / (na * nb)
    if abs(abs(dot) - 0.9995) < 1e-4:
        return  # float32 and float64 could take different branches here
    if abs(dot) > 0.9995:
        expected = [(1 - t) * x + t * y for x, y in zip(a, b, strict=True)]
    else:
        theta = math.acos(dot)
        ca, cb = math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)
        expected = [ca * x + cb * y for x, y in zip(a, b, strict=True)]
    _close(slerp(t, _t(a), _t(b)), expected, atol=2e-3)


# ---------------------------------------------------------------------------------------------
# passthrough


def test_passthrough_copies_the_tensor_without_scale() -> None:
    x = torch.tensor([[1.0, -2.0], [3.5, 0.0]])
    for per_model in ({}, {"scale": None}):
        assert torch.equal(run_method("passthrough", None, [x], [per_model]), x)


@pytest.mark.parametrize("scale", [2.5, -1.0, 0.0])
def test_passthrough_multiplies_by_scale(scale: float) -> None:
    method = get_method("passthrough")
    assert method is not None
    x = torch.tensor([[1.0, -2.0], [3.5, 0.0]])
    got = method.run(MethodInputs(None, [x], {}, [{"scale": scale}], [0]))
    expected = torch.tensor([[1.0 * scale, -2.0 * scale], [3.5 * scale, 0.0 * scale]])
    assert torch.equal(got, expected)
    assert x.tolist() == [[1.0, -2.0], [3.5, 0.0]]


def test_passthrough_scale_is_optional_per_model() -> None:
    method = get_method("passthrough")
    assert method is not None
    scale = method.param("scale")
    assert scale is not None and scale.per_model and not scale.required
    assert method.max_models == 1
