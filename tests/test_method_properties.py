"""Properties of the task-arithmetic family implied by SEMANTICS.md sections 3 and 4.

TIES with one model follows from section 4: W = w * delta elects s = sign(W), so the mask is
exactly W != 0, the agreeing weight there is w and elsewhere 0 (replaced by 1). Hence for w != 0
the normalised mix is trim(delta) wherever trim(delta) != 0 and 0 elsewhere, i.e.
TIES(B, X; w, d, lambda) = B + lambda * trim_d(X - B) whatever the sign or size of w, and for
w = 0 the result is B. At d = 1 that is task arithmetic with weight lambda (and without normalize).
"""

from __future__ import annotations

import math

import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesmith.methods.task_arithmetic import merge_task_vectors
from tests.conftest import run_method as run

FAMILY_NAMES = [
    "task_arithmetic",
    "ties",
    "dare_ties",
    "dare_linear",
    "breadcrumbs",
    "breadcrumbs_ties",
    "della",
    "della_linear",
]
FAST = settings(max_examples=40, deadline=None)

# Dyadic values keep float32 sums exact, so the loop reference and torch agree bit for bit on
# which sign wins and whether a divisor is zero.
DYADIC = st.sampled_from([-3.0, -1.5, -1.0, -0.5, 0.0, 0.0, 0.25, 0.5, 1.0, 2.0])
WEIGHT = st.sampled_from([-1.0, -0.5, 0.0, 0.25, 0.5, 1.0, 2.0])


def _random_tensor(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g)


def _trim_reference(delta: list[float], density: float) -> list[float]:
    n = len(delta)
    if density >= 1:
        return list(delta)
    if density <= 0:
        return [0.0] * n
    k = max(1, math.floor(density * n))
    # The k-th largest magnitude; all above it are kept, and of the T equal to it the `need`
    # still wanted go to the j-th (in index order) when floor((j+1) need / T) > floor(j need / T).
    cut = sorted((abs(v) for v in delta), reverse=True)[k - 1]
    tied = [i for i in range(n) if abs(delta[i]) == cut]
    need = k - sum(abs(v) > cut for v in delta)
    chosen = {i for j, i in enumerate(tied) if (j + 1) * need // len(tied) > j * need // len(tied)}
    return [v if abs(v) > cut or i in chosen else 0.0 for i, v in enumerate(delta)]


# ---------------------------------------------------------------------------------------------
# TIES with a single model


@FAST
@given(
    base=st.lists(DYADIC, min_size=1, max_size=12),
    data=st.data(),
    weight=WEIGHT,
    lam=st.sampled_from([1.0, 0.5, 2.0, -1.0]),
)
def test_ties_one_model_density_one_is_base_plus_lambda_delta(
    base: list[float], data: st.DataObject, weight: float, lam: float
) -> None:
    model = data.draw(st.lists(DYADIC, min_size=len(base), max_size=len(base)))
    b, x = torch.tensor(base), torch.tensor(model)
    got = run("ties", b, [x], [{"weight": weight, "density": 1.0}], {"lambda": lam})
    if weight == 0:
        assert torch.equal(got, b)
        return
    expected = [bi + lam * (xi - bi) for bi, xi in zip(base, model, strict=True)]
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-6, atol=1e-6)
    # ...which is task arithmetic with weight lambda and no normalization.
    plain = run("task_arithmetic", b, [x], [{"weight": lam}])
    torch.testing.assert_close(got, plain, rtol=1e-6, atol=1e-6)


@FAST
@given(
    delta=st.lists(DYADIC, min_size=1, max_size=16),
    weight=WEIGHT.filter(lambda w: w != 0),
    density=st.floats(0.0, 1.0),
)
def test_ties_one_model_is_base_plus_trimmed_delta(
    delta: list[float], weight: float, density: float
) -> None:
    base = torch.zeros(len(delta))
    got = run("ties", base, [torch.tensor(delta)], [{"weight": weight, "density": density}])
    expected = torch.tensor(_trim_reference(delta, density))
    torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# section 4 as a loop, without sparsification


def _family_reference(
    base: list[float],
    models: list[list[float]],
    weights: list[float],
    consensus: str | None,
    normalize: bool,
    lam: float,
) -> list[float]:
    def sgn(v: float) -> int:
        return (v > 0) - (v < 0)

    out = []
    for j, b in enumerate(base):
        weighted = [w * (m[j] - b) for w, m in zip(weights, models, strict=True)]
        if consensus is None:
            mixed = sum(weighted)
            divisor = sum(weights)
            divisor = 1.0 if abs(divisor) < 1e-8 else divisor
        else:
            vote = sum(weighted) if consensus == "sum" else sum(sgn(v) for v in weighted)
            elected = 1 if vote >= 0 else -1
            agree = [v != 0 and sgn(v) == elected for v in weighted]
            mixed = sum(v for v, a in zip(weighted, agree, strict=True) if a)
            divisor = sum(w for w, a in zip(weights, agree, strict=True) if a)
            divisor = 1.0 if divisor == 0 else divisor
        if normalize:
            mixed /= divisor
        out.append(b + lam * mixed)
    return out


@settings(max_examples=120, deadline=None)
@given(
    width=st.integers(1, 6),
    count=st.integers(1, 4),
    data=st.data(),
    consensus=st.sampled_from([None, "sum", "count"]),
    normalize=st.booleans(),
    lam=st.sampled_from([1.0, 0.5, 3.0]),
)
def test_merge_without_sparsifier_matches_a_loop(
    width: int,
    count: int,
    data: st.DataObject,
    consensus: str | None,
    normalize: bool,
    lam: float,
) -> None:
    row = st.lists(DYADIC, min_size=width, max_size=width)
    base = data.draw(row)
    models = [data.draw(row) for _ in range(count)]
    weights = data.draw(st.lists(WEIGHT, min_size=count, max_size=count))
    got = merge_task_vectors(
        torch.tensor(base),
        [torch.tensor(m) for m in models],
        weights,
        consensus=consensus,
        normalize=normalize,
        lambda_=lam,
    )
    expected = _family_reference(base, models, weights, consensus, normalize, lam)
    torch.testing.assert_close(got, torch.tensor(expected), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# int8_mask, rescale, seeds


def _case(seed: int, density: float) -> tuple[torch.Tensor, list[torch.Tensor], list]:
    base = _random_tensor((6, 5), seed)
    models = [base + _random_tensor((6, 5), seed + 1 + i) for i in range(3)]
    per_model = [
        {"weight": w, "density": density, "gamma": 0.1, "epsilon": min(0.1, density / 2)}
        for w in (1.0, 0.5, -0.25)
    ]
    return base, models, per_model


@FAST
@given(
    name=st.sampled_from(FAMILY_NAMES),
    seed=st.integers(0, 1000),
    density=st.sampled_from([0.3, 0.5, 0.8, 1.0]),
    rescale=st.booleans(),
)
def test_int8_mask_never_changes_the_result(
    name: str, seed: int, density: float, rescale: bool
) -> None:
    base, models, per_model = _case(seed, density)
    seeds = [seed, seed + 7, seed + 13]
    plain = run(name, base, models, per_model, {"int8_mask": False, "rescale": rescale}, seeds)
    masked = run(name, base, models, per_model, {"int8_mask": True, "rescale": rescale}, seeds)
    assert plain.numpy().tobytes() == masked.numpy().tobytes()


@FAST
@given(
    name=st.sampled_from(["ties", "dare_ties", "dare_linear", "breadcrumbs", "della_linear"]),
    seed=st.integers(0, 1000),
    density=st.sampled_from([0.2, 0.5, 0.7]),
)
def test_rescale_restores_the_l1_norm_of_a_single_task_vector(
    name: str, seed: int, density: float
) -> None:
    # One model of weight 1 on a zero base: the merged tensor is the pruned delta itself.
    delta = _random_tensor((8, 6), seed)
    per_model = [{"weight": 1.0, "density": density, "gamma": 0.05, "epsilon": density / 4}]
    got = run(name, torch.zeros_like(delta), [delta], per_model, {"rescale": True}, [seed])
    if got.abs().sum() > 0:
        torch.testing.assert_close(got.abs().sum(), delta.abs().sum(), rtol=1e-5, atol=0)


RANDOM_NAMES = ["dare_ties", "dare_linear", "della", "della_linear"]


@FAST
@given(name=st.sampled_from(RANDOM_NAMES), seed=st.integers(0, 2**31 - 1))
def test_same_seeds_give_the_same_bytes_whatever_ran_before(name: str, seed: int) -> None:
    base, models, per_model = _case(5, 0.5)
    seeds = [seed, seed ^ 1, seed ^ 2]
    first = run(name, base, models, per_model, seeds=seeds).numpy().tobytes()
    # Other merges and the global RNG must not leak into this one.
    torch.manual_seed(seed % 1000 + 1)
    torch.rand(17)
    run(name, base, models, per_model, seeds=[seed + 1, seed + 2, seed + 3])
    again = run(name, base, models, per_model, seeds=seeds).numpy().tobytes()
    assert first == again


@FAST
@given(name=st.sampled_from(RANDOM_NAMES), seed=st.integers(0, 10_000))
def test_different_seeds_give_different_results(name: str, seed: int) -> None:
    base, models, per_model = _case(3, 0.5)
    one = run(name, base, models, per_model, seeds=[seed, seed + 1, seed + 2])
    two = run(name, base, models, per_model, seeds=[seed + 3, seed + 4, seed + 5])
    assert not torch.equal(one, two)


@FAST
@given(name=st.sampled_from(["dare_linear", "della_linear"]), seed=st.integers(0, 10_000))
def test_a_models_mask_depends_only_on_its_own_seed(name: str, seed: int) -> None:
    # Without consensus, the sum is symmetric: swapping models together with their seeds must
    # give the same tensor, so no model's draw depends on its position.
    base, models, per_model = _case(11, 0.5)
    seeds = [seed, seed + 1, seed + 2]
    forward = run(name, base, models, per_model, seeds=seeds)
    order = [2, 0, 1]
    shuffled = run(
        name,
        base,
        [models[i] for i in order],
        [per_model[i] for i in order],
        seeds=[seeds[i] for i in order],
    )
    torch.testing.assert_close(forward, shuffled, rtol=1e-6, atol=1e-6)
    # A weight-0 model contributes nothing, whatever its seed.
    muted = [*per_model[:2], {**per_model[2], "weight": 0.0}]
    a = run(name, base, models, muted, seeds=seeds)
    b = run(name, base, models, muted, seeds=[seeds[0], seeds[1], seed + 99])
    assert torch.equal(a, b)
