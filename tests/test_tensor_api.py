"""The tensor-level API (merge_tensors, merge_state_dicts, merge_modules) against the YAML path
and against hand-computed values."""

from __future__ import annotations

import doctest
import logging
import re
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

import mergesmith
from mergesmith import MergeError, merge_modules, merge_state_dicts, merge_tensors
from tests.conftest import write_recipe

Family = tuple[Path, list[Path]]
README = Path(__file__).resolve().parents[1] / "README.md"


def _load(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def _yaml_value(value: Any) -> str:
    return str(value).lower() if isinstance(value, bool) else str(value)


def _recipe(
    method: str,
    base: Path | None,
    models: list[Path],
    model_params: list[dict[str, Any]],
    params: dict[str, Any],
) -> str:
    lines = [f"merge_method: {method}"]
    if base is not None:
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for folder, block in zip(models, model_params, strict=True):
        lines.append(f"  - model: {folder}")
        if block:
            inner = ", ".join(f"{k}: {_yaml_value(v)}" for k, v in block.items())
            lines.append(f"    parameters: {{{inner}}}")
    if params:
        inner = ", ".join(f"{k}: {_yaml_value(v)}" for k, v in params.items())
        lines.append(f"parameters: {{{inner}}}")
    return "\n".join(lines) + "\n"


# (method, uses the base, models used (indexes of the fine-tunes), per-model parameters as the
# recipe writes them, global parameters, the same as keyword arguments)
CASES: list[tuple[str, bool, list[int], list[dict[str, Any]], dict[str, Any], dict[str, Any]]] = [
    (
        "linear",
        False,
        [0, 1],
        [{"weight": 0.3}, {"weight": 0.7}],
        {"normalize": False},
        {"weight": [0.3, 0.7], "normalize": False},
    ),
    (
        "task_arithmetic",
        True,
        [0, 1, 2],
        [{"weight": 0.5}, {"weight": 0.8}, {"weight": -0.2}],
        {"lambda": 0.9},
        {"weight": [0.5, 0.8, -0.2], "lambda_": 0.9},
    ),
    (
        "ties",
        True,
        [0, 1, 2],
        [{"density": 0.5}, {"density": 0.7}, {"density": 0.3}],
        {"weight": 1.0},
        {"weight": 1.0, "density": [0.5, 0.7, 0.3]},
    ),
    (
        "dare_ties",
        True,
        [0, 1],
        [{"weight": 0.6, "density": 0.4}, {"weight": 0.9, "density": 0.6}],
        {},
        {"weight": [0.6, 0.9], "density": [0.4, 0.6]},
    ),
    ("slerp", True, [0], [{}], {"t": 0.3}, {"t": 0.3}),
    ("model_stock", True, [0, 1, 2], [{}, {}, {}], {}, {}),
    (
        "multislerp",
        False,
        [0, 1, 2],
        [{"weight": 1.0}, {"weight": 2.0}, {"weight": 0.5}],
        {},
        {"weight": [1, 2, 0.5]},
    ),
]


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_merge_state_dicts_gives_the_yaml_merges_tensors_bit_for_bit(
    case: tuple[Any, ...], family: Family, tmp_path: Path
) -> None:
    method, with_base, picked, model_params, params, kwargs = case
    base_dir, tuned_dirs = family
    models = [tuned_dirs[i] for i in picked]
    recipe = write_recipe(
        tmp_path, _recipe(method, base_dir if with_base else None, models, model_params, params)
    )
    seed = 7
    mergesmith.merge(recipe, tmp_path / "out", seed=seed, threads=1)
    expected = _load(tmp_path / "out")

    got = merge_state_dicts(
        method,
        _load(base_dir) if with_base else None,
        [_load(m) for m in models],
        seed=seed,
        names=[str(m) for m in models],  # the recipe's model references: the same seeds
        **kwargs,
    )
    assert list(got) == list(_load(base_dir))
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        assert got[name].dtype == tensor.dtype
        assert torch.equal(got[name], tensor), f"{method}: {name} differs from the YAML merge"


def test_random_methods_depend_on_seed_and_model_names(family: Family) -> None:
    base_dir, tuned_dirs = family
    name = "model.layers.0.mlp.up_proj.weight"
    base = _load(base_dir)[name]
    models = [_load(d)[name] for d in tuned_dirs[:2]]

    def dare(**extra: Any) -> torch.Tensor:
        return merge_tensors("dare_ties", base, models, name=name, weight=1.0, density=0.5, **extra)

    assert torch.equal(dare(seed=3), dare(seed=3))
    assert not torch.equal(dare(seed=3), dare(seed=4))
    # Positions are the default names, so naming the models "0", "1" changes nothing...
    assert torch.equal(dare(seed=3), dare(seed=3, names=["0", "1"]))
    # ...and other names draw other masks, as other folder names would in a recipe.
    assert not torch.equal(dare(seed=3), dare(seed=3, names=["a", "b"]))
    # The tensor's name seeds too, as in a recipe.
    assert not torch.equal(
        dare(seed=3), merge_tensors("dare_ties", base, models, weight=1.0, density=0.5, seed=3)
    )


# ---------------------------------------------------------------------------------------------
# hand-computed values


def test_merge_tensors_linear_on_2x2_matches_hand_arithmetic() -> None:
    a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    b = torch.tensor([[3.0, -2.0], [1.0, 0.0]])
    # (1 * a + 3 * b) / 4, entry by entry: (1 + 9) / 4, (2 - 6) / 4, (3 + 3) / 4, (4 + 0) / 4
    assert merge_tensors("linear", None, [a, b], weight=[1, 3]).tolist() == [
        [2.5, -1.0],
        [1.5, 1.0],
    ]
    # Unnormalised: the weighted sum.
    got = merge_tensors("linear", None, [a, b], weight=[1, 3], normalize=False)
    assert got.tolist() == [[10.0, -4.0], [6.0, 4.0]]


def test_merge_tensors_task_arithmetic_on_2x2_matches_hand_arithmetic() -> None:
    base = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    x = torch.tensor([[3.0, 1.0], [4.0, 2.0]])  # delta [[2, 0], [4, 0]]
    y = torch.tensor([[1.0, 5.0], [-4.0, 0.0]])  # delta [[0, 4], [-4, -2]]
    # base + lambda * (0.5 * dx + 0.25 * dy) with lambda 2:
    # [[1 + 2 * 1, 1 + 2 * 1], [0 + 2 * (2 - 1), 2 + 2 * (-0.5)]]
    got = merge_tensors("task_arithmetic", base, [x, y], weight=[0.5, 0.25], lambda_=2)
    assert got.tolist() == [[3.0, 3.0], [2.0, 1.0]]
    # `lambda` by its recipe name gives the same.
    same = merge_tensors("task_arithmetic", base, [x, y], weight=[0.5, 0.25], **{"lambda": 2})
    assert torch.equal(got, same)


def test_a_scalar_per_model_parameter_equals_the_same_value_in_a_list() -> None:
    base = torch.tensor([[1.0, 1.0], [0.0, 2.0]])
    x, y = base + 1, base * 3
    scalar = merge_tensors("ties", base, [x, y], weight=0.7, density=0.5)
    listed = merge_tensors("ties", base, [x, y], weight=[0.7, 0.7], density=[0.5, 0.5])
    assert torch.equal(scalar, listed)
    # Recipe-style values are coerced as in a recipe: a whole number, a quoted number.
    assert torch.equal(scalar, merge_tensors("ties", base, [x, y], weight="0.7", density=0.5))


# ---------------------------------------------------------------------------------------------
# errors, as a recipe would get them


def _pair() -> tuple[torch.Tensor, list[torch.Tensor]]:
    base = torch.zeros(2, 2)
    return base, [torch.ones(2, 2), torch.full((2, 2), 2.0)]


def test_a_list_of_the_wrong_length_names_the_parameter() -> None:
    base, models = _pair()
    with pytest.raises(MergeError, match="parameter 'weight' has 3 values for 2 models"):
        merge_tensors("task_arithmetic", base, models, weight=[1, 2, 3])


def test_a_list_for_a_global_parameter_is_an_error() -> None:
    base, models = _pair()
    with pytest.raises(MergeError, match="'normalize' applies to the whole merge"):
        merge_tensors("ties", base, models, weight=1, normalize=[True, False])


def test_an_unknown_parameter_names_the_closest_one() -> None:
    base, models = _pair()
    with pytest.raises(MergeError, match="'densty' is not a parameter of ties") as info:
        merge_tensors("ties", base, models, weight=1, densty=0.5)
    assert info.value.hint == "did you mean 'density'?"


def test_another_methods_parameter_is_ignored_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    base, models = _pair()
    with caplog.at_level(logging.WARNING, logger="mergesmith"):
        got = merge_tensors("model_stock", base, models, weight=0.5)
    assert torch.equal(got, merge_tensors("model_stock", base, models))
    assert "'weight' is not a parameter of model_stock" in caplog.text


def test_a_missing_required_parameter_is_named() -> None:
    _, models = _pair()
    with pytest.raises(MergeError, match="linear needs parameter 'weight'"):
        merge_tensors("linear", None, models)
    with pytest.raises(MergeError, match="slerp needs parameter 't'"):
        merge_tensors("slerp", models[0], models[1:])


def test_out_of_range_values_are_refused_as_in_a_recipe() -> None:
    base, models = _pair()
    with pytest.raises(MergeError, match=r"'density' for model '1': 1.5 is outside \[0, 1\]"):
        merge_tensors("ties", base, models, weight=1, density=[0.5, 1.5])
    with pytest.raises(MergeError, match="must be one of sum, count, null"):
        merge_tensors("ties", base, models, weight=1, consensus_method="vote")
    with pytest.raises(MergeError, match="not a finite number"):
        merge_tensors("ties", base, models, weight=float("nan"))
    with pytest.raises(MergeError, match="must stay inside"):
        merge_tensors("della", base, models, weight=1, density=0.9, epsilon=0.2)


def test_base_none_for_a_method_that_needs_one_is_an_error() -> None:
    _, models = _pair()
    with pytest.raises(MergeError, match="ties needs a base model, got base=None"):
        merge_tensors("ties", None, models, weight=1)


def test_a_base_for_a_method_without_one_is_refused() -> None:
    base, models = _pair()
    with pytest.raises(MergeError, match="linear takes no base model"):
        merge_tensors("linear", base, models, weight=1)


def test_unknown_methods_and_wrong_model_counts_are_errors() -> None:
    base, models = _pair()
    with pytest.raises(MergeError, match="unknown merge_method 'tise'") as info:
        merge_tensors("tise", base, models, weight=1)
    assert info.value.hint == "did you mean 'ties'?"
    with pytest.raises(MergeError, match="slerp takes exactly 1 model"):
        merge_tensors("slerp", base, models, t=0.5)
    with pytest.raises(MergeError, match="must be a list"):
        merge_tensors("linear", None, models[0], weight=1)  # type: ignore[arg-type]


def test_state_dict_keys_must_match_naming_key_and_index() -> None:
    base = {"a": torch.zeros(2), "b": torch.zeros(2)}
    good = {"a": torch.ones(2), "b": torch.ones(2)}
    with pytest.raises(MergeError, match=r"state_dicts\[1\] has no tensor 'b', which base has"):
        merge_state_dicts("task_arithmetic", base, [good, {"a": torch.ones(2)}], weight=1)
    extra = {**good, "c": torch.ones(2)}
    with pytest.raises(MergeError, match=r"state_dicts\[0\] has a tensor 'c' that base lacks"):
        merge_state_dicts("task_arithmetic", base, [extra], weight=1)
    with pytest.raises(MergeError, match=r"state_dicts\[1\] has no tensor 'b'"):
        merge_state_dicts("linear", None, [good, {"a": torch.ones(2)}], weight=1)


def test_a_shape_mismatch_outside_embeddings_is_an_error() -> None:
    base = {"model.norm.weight": torch.zeros(4)}
    tuned = {"model.norm.weight": torch.zeros(5)}
    with pytest.raises(MergeError, match=r"'model.norm.weight' has shape \[5\]"):
        merge_state_dicts("task_arithmetic", base, [tuned], weight=1)


def test_a_larger_embedding_is_cut_to_the_base_with_a_warning(
    caplog: pytest.LogCaptureFixture,
) -> None:
    base = {"model.embed_tokens.weight": torch.zeros(4, 3)}
    rows = torch.arange(15, dtype=torch.float32).reshape(5, 3)
    with caplog.at_level(logging.WARNING, logger="mergesmith"):
        got = merge_state_dicts(
            "task_arithmetic", base, [{"model.embed_tokens.weight": rows}], weight=0.5
        )
    assert torch.equal(got["model.embed_tokens.weight"], rows[:4] * 0.5)
    assert "is cut to [4, 3]" in caplog.text


def test_nan_inputs_are_refused_naming_the_model() -> None:
    base, models = _pair()
    bad = models[1].clone()
    bad[0, 0] = float("nan")
    with pytest.raises(MergeError, match="merge_tensors: model '1': tensor 'w' holds NaN") as info:
        merge_tensors("task_arithmetic", base, [models[0], bad], name="w", weight=1)
    assert "allow_nonfinite=True" in str(info.value.hint)
    got = merge_tensors("task_arithmetic", base, [models[0], bad], weight=1, allow_nonfinite=True)
    assert torch.isnan(got[0, 0])


# ---------------------------------------------------------------------------------------------
# state dicts: integer buffers, aliasing, dtypes


def test_integer_tensors_are_copied_from_the_first_input_never_shared() -> None:
    base = {"w": torch.zeros(2), "ids": torch.tensor([1, 2])}
    tuned = [{"w": torch.ones(2), "ids": torch.tensor([5, 6])}]
    got = merge_state_dicts("task_arithmetic", base, tuned, weight=1)
    assert torch.equal(got["ids"], base["ids"])
    got["ids"][0] = 99
    assert base["ids"].tolist() == [1, 2]  # the result is a copy
    no_base = merge_state_dicts("linear", None, [tuned[0], base], weight=1)
    assert no_base["ids"].tolist() == [5, 6]


def test_inputs_are_not_changed_and_gradients_do_not_matter() -> None:
    base = torch.tensor([1.0, -1.0], requires_grad=True)
    x = torch.tensor([2.0, 3.0], requires_grad=True)
    copies = base.detach().clone(), x.detach().clone()
    got = merge_tensors("passthrough", None, [x])
    assert not got.requires_grad and torch.equal(got, copies[1])
    got.add_(1)  # passthrough's result is no view of the input
    merge_tensors("ties", base, [x], weight=1, density=0.5)
    assert torch.equal(base, copies[0]) and torch.equal(x, copies[1])


def test_dtype_sets_the_output_dtype_as_in_a_recipe() -> None:
    base, models = _pair()
    got = merge_tensors("task_arithmetic", base, models, weight=0.3, dtype=torch.bfloat16)
    expected = merge_tensors("task_arithmetic", base, models, weight=0.3).to(torch.bfloat16)
    assert got.dtype == torch.bfloat16 and torch.equal(got, expected)
    assert merge_tensors("linear", None, models, weight=1, dtype="float16").dtype == torch.float16
    with pytest.raises(MergeError, match="unknown dtype"):
        merge_tensors("linear", None, models, weight=1, dtype="int8")


def test_names_must_fit_the_models() -> None:
    base, models = _pair()
    with pytest.raises(MergeError, match="`names` has 1 entries for 2 models"):
        merge_tensors("ties", base, models, weight=1, names=["a"])
    with pytest.raises(MergeError, match="distinct"):
        merge_tensors("ties", base, models, weight=1, names=["a", "a"])
    with pytest.raises(MergeError, match="'base' names the base model"):
        merge_tensors("ties", base, models, weight=1, names=["base", "b"])


# ---------------------------------------------------------------------------------------------
# modules


def _stack(seed: int) -> torch.nn.Sequential:
    torch.manual_seed(seed)
    return torch.nn.Sequential(
        torch.nn.Linear(3, 4), torch.nn.ReLU(), torch.nn.Linear(4, 2), torch.nn.BatchNorm1d(2)
    )


def test_merge_modules_averages_a_linear_stack_into_a_new_module() -> None:
    a, b = _stack(1), _stack(2)
    b[3].num_batches_tracked.fill_(5)  # an integer buffer: copied from the first module
    before = {k: v.clone() for k, v in a.state_dict().items()}
    soup = merge_modules("linear", None, [a, b], weight=[1, 1])
    assert isinstance(soup, torch.nn.Sequential) and soup is not a
    for key, value in soup.state_dict().items():
        if value.is_floating_point():
            # (1 * a + 1 * b) / 2, computed independently
            expected = (a.state_dict()[key] + b.state_dict()[key]) / 2
            assert torch.equal(value, expected), key
    assert soup[3].num_batches_tracked.item() == 0
    assert all(torch.equal(v, before[k]) for k, v in a.state_dict().items())
    assert soup[0].weight.requires_grad  # a working module, ready to train or run
    assert soup(torch.ones(5, 3)).shape == (5, 2)


def test_merge_modules_with_a_base_is_a_copy_of_the_base() -> None:
    base, tuned = _stack(0), _stack(3)
    merged = merge_modules("task_arithmetic", base, [tuned], weight=0.5)
    weight = base[0].weight + 0.5 * (tuned[0].weight - base[0].weight)
    torch.testing.assert_close(merged[0].weight, weight, rtol=0, atol=1e-7)
    state_dict: Any = tuned.state_dict()
    with pytest.raises(MergeError, match=r"modules\[0\] is a \w*Dict, not a torch\.nn\.Module"):
        merge_modules("task_arithmetic", base, [state_dict], weight=0.5)


# ---------------------------------------------------------------------------------------------
# documentation


def test_the_public_names_are_exported_lazily() -> None:
    for name in ("merge_tensors", "merge_state_dicts", "merge_modules"):
        assert name in mergesmith.__all__
        assert callable(getattr(mergesmith, name))


def test_the_docstring_examples_run() -> None:
    import mergesmith.tensors as module

    result = doctest.testmod(module, optionflags=doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0 and result.failed == 0


def test_the_readme_example_runs() -> None:
    text = README.read_text(encoding="utf-8")
    section = text.split("## Tensors and state dicts in Python", 1)[1].split("\n## ", 1)[0]
    (code,) = re.findall(r"```python\n(.*?)```", section, flags=re.S)
    exec(compile(code, "README example", "exec"), {})
