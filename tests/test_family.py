"""The task-arithmetic family against the table and rules of SEMANTICS.md section 4.

Methods are driven the way the engine drives them: get_method(name).run(MethodInputs(...)) with
every global parameter present and per-model defaults filled in, as the planner does.
"""

from __future__ import annotations

from typing import Any

import pytest
import torch

from mergesmith.methods import get_method
from mergesmith.methods.task_arithmetic import FAMILY
from tests.conftest import run_method as run

# The table of section 4: consensus, sparsifier, normalize, rescale, per-model params.
SPEC_TABLE: dict[str, tuple[str | None, str | None, bool, bool, set[str]]] = {
    "task_arithmetic": (None, None, False, False, {"weight"}),
    "ties": ("sum", "magnitude", True, False, {"weight", "density"}),
    "dare_ties": ("sum", "random", False, True, {"weight", "density"}),
    "dare_linear": (None, "random", False, True, {"weight", "density"}),
    "breadcrumbs": (None, "magnitude_outliers", False, False, {"weight", "density", "gamma"}),
    "breadcrumbs_ties": ("sum", "magnitude_outliers", False, False, {"weight", "density", "gamma"}),
    "della": ("sum", "della_magprune", True, True, {"weight", "density", "epsilon"}),
    "della_linear": (None, "della_magprune", False, True, {"weight", "density", "epsilon"}),
}
GLOBAL_PARAMS = {"normalize", "rescale", "lambda", "int8_mask", "consensus_method"}
NAMES = sorted(SPEC_TABLE)
SPARSIFYING = [n for n in NAMES if SPEC_TABLE[n][1] is not None]


def _t(values: list[float]) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32)


# Hand-worked scenario: B, X_i = B + delta_i with delta_1 = [2, -1, 0.5, -3] and
# delta_2 = [-1, -2, 1.5, 1.25]; weights 1 and 0.5, so W_1 = [2, -1, 0.5, -3] and
# W_2 = [-0.5, -1, 0.75, 0.625]. Every value is dyadic, so float32 holds it exactly.
B = _t([0.5, -1.0, 2.0, 0.0])
X1 = _t([2.5, -2.0, 2.5, -3.0])
X2 = _t([-0.5, -3.0, 3.5, 1.25])
WEIGHTS = (1.0, 0.5)

# sum W = [1.5, -2, 1.25, -2.375]
PLAIN_SUM = [2.0, -3.0, 3.25, -2.375]
# sign [+, -, +, -]: model 2 agrees only in columns 1 and 2.
# mixed = [2, -2, 1.25, -3]; agreeing weights = [1, 1.5, 1.5, 1].
TIES_NO_NORM = [2.5, -3.0, 3.25, -3.0]
TIES_NORM = [2.5, -1.0 - 2.0 / 1.5, 2.0 + 1.25 / 1.5, -3.0]


def _two(**per_model: float) -> list[dict[str, Any]]:
    return [{"weight": w, **per_model} for w in WEIGHTS]


# ---------------------------------------------------------------------------------------------
# the table itself


@pytest.mark.parametrize("name", NAMES)
def test_family_row_matches_spec_table(name: str) -> None:
    consensus, sparsifier, normalize, rescale, _ = SPEC_TABLE[name]
    row = FAMILY[name]
    assert (row.consensus, row.sparsifier, row.normalize, row.rescale) == (
        consensus,
        sparsifier,
        normalize,
        rescale,
    )


def test_family_has_exactly_the_eight_methods() -> None:
    assert set(FAMILY) == set(SPEC_TABLE)


@pytest.mark.parametrize("name", NAMES)
def test_registered_parameters_and_defaults_match_spec(name: str) -> None:
    consensus, _, normalize, rescale, per_model = SPEC_TABLE[name]
    method = get_method(name)
    assert method is not None
    assert method.needs_base
    assert {p.name for p in method.params if p.per_model} == per_model
    assert {p.name for p in method.params if not p.per_model} == GLOBAL_PARAMS
    defaults = {p.name: p.default for p in method.params if not p.required}
    assert defaults["normalize"] is normalize
    assert defaults["rescale"] is rescale
    assert defaults["lambda"] == 1.0
    assert defaults["int8_mask"] is False
    assert defaults["consensus_method"] == consensus
    weight = method.param("weight")
    assert weight is not None and weight.required
    # Section 3: density 1.0, gamma 0.01, epsilon 0.15 by default.
    expected_optional = {"density": 1.0, "gamma": 0.01, "epsilon": 0.15}
    for key in per_model - {"weight"}:
        assert defaults[key] == expected_optional[key]


# ---------------------------------------------------------------------------------------------
# results on the hand-worked scenario, with table defaults


@pytest.mark.parametrize(
    ("name", "per_model", "expected"),
    [
        ("task_arithmetic", {}, PLAIN_SUM),
        ("ties", {}, TIES_NORM),
        # k = 2: delta_1 keeps [2, 0, 0, -3], delta_2 keeps [0, -2, 1.5, 0]; the agreeing
        # weight is 0.5 in columns 1 and 2, so those are divided by 0.5.
        ("ties", {"density": 0.5}, [2.5, -3.0, 3.5, -3.0]),
        ("dare_ties", {}, TIES_NO_NORM),
        ("dare_linear", {}, PLAIN_SUM),
        ("della", {}, TIES_NORM),
        ("della_linear", {}, PLAIN_SUM),
        ("breadcrumbs", {}, PLAIN_SUM),
        # target 3, n_top 1, n_bot 0: each drops its largest. W_1 = [2, -1, 0.5, 0],
        # W_2 = [-0.5, 0, 0.75, 0.625]; sum elects [+, -, +, +].
        ("breadcrumbs", {"density": 0.75, "gamma": 0.25}, [2.0, -2.0, 3.25, 0.625]),
        ("breadcrumbs_ties", {"density": 0.75, "gamma": 0.25}, [2.5, -2.0, 3.25, 0.625]),
    ],
)
def test_hand_worked_merge_with_table_defaults(
    name: str, per_model: dict[str, float], expected: list[float]
) -> None:
    got = run(name, B, [X1, X2], _two(**per_model))
    torch.testing.assert_close(got, _t(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", NAMES)
def test_normalize_default_shows_in_the_result(name: str) -> None:
    # Agreeing positive deltas: the sum is [4, 4, 4], the weighted mean [2, 2, 2].
    base = torch.zeros(3)
    got = run(name, base, [_t([1.0, 2.0, 3.0]), _t([3.0, 2.0, 1.0])], [{"weight": 1.0}] * 2)
    expected = 2.0 if SPEC_TABLE[name][2] else 4.0
    assert torch.equal(got, torch.full((3,), expected))


@pytest.mark.parametrize("name", NAMES)
def test_consensus_default_shows_in_the_result(name: str) -> None:
    # Column sums [2, 1] elect +; with consensus the negative entries are dropped.
    base = torch.zeros(2)
    got = run(name, base, [_t([3.0, -1.0]), _t([-1.0, 2.0])], [{"weight": 1.0}] * 2)
    consensus, _, normalize, _, _ = SPEC_TABLE[name]
    plain = [1.0, 0.5] if normalize else [2.0, 1.0]
    expected = [3.0, 2.0] if consensus is not None else plain
    assert got.tolist() == expected


def _distinct_delta(rows: int, width: int, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    magnitudes = torch.randperm(rows * width, generator=g).float().add(1.0) / (rows * width)
    signs = torch.where(torch.rand(rows * width, generator=g) < 0.5, -1.0, 1.0)
    return (magnitudes * signs).reshape(rows, width)


@pytest.mark.parametrize("name", SPARSIFYING)
def test_rescale_default_shows_in_the_result(name: str) -> None:
    # One model of weight 1: consensus keeps every surviving entry and the divisor is 1, so
    # the merged task vector is the pruned delta itself.
    delta = _distinct_delta(40, 10, seed=1)
    got = run(name, torch.zeros_like(delta), [delta], [{"weight": 1.0, "density": 0.5}], seeds=[3])
    l1, l1_in = float(got.abs().sum()), float(delta.abs().sum())
    if SPEC_TABLE[name][3]:
        assert l1 == pytest.approx(l1_in, rel=1e-5)
    else:
        assert l1 < 0.9 * l1_in


@pytest.mark.parametrize("name", SPARSIFYING)
def test_sparsifier_default_shows_in_the_result(name: str) -> None:
    rows, width = 2000, 5
    delta = _distinct_delta(rows, width, seed=2)
    got = run(
        name,
        torch.zeros_like(delta),
        [delta],
        [{"weight": 1.0, "density": 0.5}],
        params={"rescale": False},
        seeds=[4],
    )
    kept = got != 0
    assert torch.equal(got[kept], delta[kept])
    flat = delta.abs().reshape(-1).tolist()
    ascending = sorted(range(len(flat)), key=lambda i: flat[i])
    kept_flat = kept.reshape(-1)
    row_rank = delta.abs().argsort(dim=1).argsort(dim=1)
    low = float(kept[row_rank == 0].float().mean())
    high = float(kept[row_rank == width - 1].float().mean())
    sparsifier = SPEC_TABLE[name][1]
    n = rows * width
    if sparsifier == "magnitude":
        assert set(torch.nonzero(kept_flat).reshape(-1).tolist()) == set(ascending[n // 2 :])
    elif sparsifier == "magnitude_outliers":
        # Default gamma 0.01: n_top = 100, target = 5000, n_bot = 4900.
        assert set(torch.nonzero(kept_flat).reshape(-1).tolist()) == set(ascending[4900:9900])
    elif sparsifier == "random":
        assert abs(low - 0.5) < 0.05 and abs(high - 0.5) < 0.05
    else:
        # Default epsilon 0.15: rank 0 keeps with 0.35, the top rank with 0.65.
        assert abs(low - 0.35) < 0.05 and abs(high - 0.65) < 0.05


# ---------------------------------------------------------------------------------------------
# consensus override, divisors, lambda, weights


def test_consensus_method_null_turns_ties_into_a_weighted_mean() -> None:
    got = run("ties", B, [X1, X2], _two(), params={"consensus_method": None})
    expected = [0.5 + 1.0, -1.0 - 2.0 / 1.5, 2.0 + 1.25 / 1.5, -2.375 / 1.5]
    torch.testing.assert_close(got, _t(expected), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("name", "method", "expected"),
    [
        # Sum 2 elects +: only the 4 agrees (divisor 1).
        ("ties", "sum", 4.0),
        # Vote -1 elects -: the two -1s agree, mixed -2, divisor 2.
        ("ties", "count", -1.0),
        ("task_arithmetic", "sum", 4.0),
        ("task_arithmetic", "count", -2.0),
    ],
)
def test_consensus_method_override(name: str, method: str, expected: float) -> None:
    models = [_t([4.0]), _t([-1.0]), _t([-1.0])]
    got = run(name, torch.zeros(1), models, [{"weight": 1.0}] * 3, {"consensus_method": method})
    assert got.item() == expected


def test_disjoint_divisor_of_zero_becomes_one() -> None:
    # W = [2, 3] both agree with +; agreeing weights 1 + (-1) = 0, replaced by 1.
    got = run("ties", torch.zeros(1), [_t([2.0]), _t([-3.0])], [{"weight": 1.0}, {"weight": -1.0}])
    assert got.item() == 5.0


def test_disjoint_divisor_counts_only_agreeing_weights() -> None:
    # Column 0: both agree (weights 1, 3). Column 1: only model 1 agrees (weight 1).
    models = [_t([1.0, 2.0]), _t([1.0, -0.5])]
    got = run("ties", torch.zeros(2), models, [{"weight": 1.0}, {"weight": 3.0}])
    assert got.tolist() == [1.0, 2.0]


def test_disjoint_divisor_tiny_but_nonzero_is_kept() -> None:
    # Only an exact 0 is replaced under consensus; 1e-9 still divides.
    got = run("ties", torch.zeros(1), [_t([1.0])], [{"weight": 1e-9}])
    assert got.item() == pytest.approx(1.0, rel=1e-6)


def test_plain_divisor_of_zero_becomes_one() -> None:
    models = [_t([2.0]), _t([-3.0])]
    got = run(
        "task_arithmetic",
        torch.zeros(1),
        models,
        [{"weight": 1.0}, {"weight": -1.0}],
        {"normalize": True},
    )
    assert got.item() == 5.0


def test_plain_divisor_below_1e_8_becomes_one() -> None:
    models = [_t([1e8]), _t([1e8])]
    got = run(
        "task_arithmetic",
        torch.zeros(1),
        models,
        [{"weight": 3e-9}, {"weight": 4e-9}],
        {"normalize": True},
    )
    assert got.item() == pytest.approx(0.7, rel=1e-5)


def test_plain_divisor_above_1e_8_divides() -> None:
    got = run(
        "task_arithmetic", torch.zeros(1), [_t([1.0])], [{"weight": 2e-8}], {"normalize": True}
    )
    assert got.item() == pytest.approx(1.0, rel=1e-5)


def test_lambda_scales_the_merged_task_vector() -> None:
    got = run("task_arithmetic", B, [X1, X2], _two(), {"lambda": 2.0})
    assert got.tolist() == [3.5, -5.0, 4.5, -4.75]


def test_lambda_applies_after_normalizing() -> None:
    got = run("ties", B, [X1, X2], _two(), {"lambda": 0.5})
    expected = [0.5 + 1.0, -1.0 - 2.0 / 3.0, 2.0 + 1.25 / 3.0, -1.5]
    torch.testing.assert_close(got, _t(expected), rtol=1e-6, atol=1e-6)


def test_negative_weight_subtracts_the_task_vector() -> None:
    got = run("task_arithmetic", B, [X1], [{"weight": -1.0}])
    assert got.tolist() == [-1.5, 0.0, 1.5, 3.0]


def test_mixed_sign_weights_vote_on_weighted_deltas() -> None:
    # W_1 = [1, 1], W_2 = [-1, 1]: column 0 ties at 0 and elects +, so only model 1 agrees;
    # in column 1 both agree and their weights 1 + (-1) = 0 become 1.
    models = [_t([1.0, 1.0]), _t([1.0, -1.0])]
    got = run("ties", torch.zeros(2), models, [{"weight": 1.0}, {"weight": -1.0}])
    assert got.tolist() == [1.0, 2.0]


@pytest.mark.parametrize("name", ["task_arithmetic", "dare_linear", "della_linear", "breadcrumbs"])
def test_one_model_without_consensus_adds_the_weighted_delta(name: str) -> None:
    got = run(name, B, [X1], [{"weight": 0.5}])
    assert got.tolist() == [1.5, -1.5, 2.25, -1.5]


def test_merge_does_not_modify_its_inputs() -> None:
    base, a, b = B.clone(), X1.clone(), X2.clone()
    for name in NAMES:
        run(name, base, [a, b], _two(density=0.5), seeds=[1, 2])
    assert torch.equal(base, B) and torch.equal(a, X1) and torch.equal(b, X2)


# ---------------------------------------------------------------------------------------------
# DELLA's density/epsilon bounds (section 3: a config error before any weight is read)


@pytest.mark.parametrize("name", ["della", "della_linear"])
@pytest.mark.parametrize(
    "values",
    [
        {"density": 0.5, "epsilon": 0.5},  # d - eps = 0
        {"density": 0.85, "epsilon": 0.15},  # d + eps = 1
        {"density": 0.1},  # default epsilon 0.15 > d
        {"density": 0.9},  # default epsilon: 1.05
    ],
)
def test_della_out_of_range_density_epsilon_is_a_config_error(
    name: str, values: dict[str, float]
) -> None:
    method = get_method(name)
    assert method is not None and method.check_model is not None
    assert method.check_model({"weight": 1.0, **values})


@pytest.mark.parametrize("values", [{"density": 0.5, "epsilon": 0.15}, {"density": 0.5}])
def test_della_in_range_density_epsilon_is_accepted(values: dict[str, float]) -> None:
    method = get_method("della")
    assert method is not None and method.check_model is not None
    assert method.check_model({"weight": 1.0, **values}) is None


def test_della_density_zero_is_a_config_error() -> None:
    # d - eps = -0.15 <= 0. The spec states the bound without exception for d <= 0.
    method = get_method("della")
    assert method is not None and method.check_model is not None
    assert method.check_model({"weight": 1.0, "density": 0.0, "epsilon": 0.15})
