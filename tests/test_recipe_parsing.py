"""Reading mergekit YAML: strict keys with line numbers, gradients, filters."""

from __future__ import annotations

import pytest

from mergesmith.config import parse_recipe, resolve_setting
from mergesmith.errors import MergeError, MergeErrors


def messages(exc: MergeError) -> list[str]:
    errors = exc.errors if isinstance(exc, MergeErrors) else [exc]
    return [f"{e.message} | {e.hint}" for e in errors]


def test_misspelled_top_level_key_names_line_and_closest_key() -> None:
    text = "merge_method: ties\nbase_model: b\nmodels:\n  - model: a\nparamters:\n  x: 1\n"
    with pytest.raises(MergeError) as info:
        parse_recipe(text, "r.yml")
    (msg,) = messages(info.value)
    assert "r.yml:5" in msg and "paramters" in msg and "did you mean 'parameters'" in msg


def test_misspelled_model_key_is_reported_at_its_line() -> None:
    text = "merge_method: linear\nmodels:\n  - model: a\n    parametrs: {weight: 1}\n"
    with pytest.raises(MergeError) as info:
        parse_recipe(text, "r.yml")
    (msg,) = messages(info.value)
    assert "r.yml:4" in msg and "models.0.parametrs" in msg and "'parameters'" in msg


def test_all_problems_are_listed_at_once() -> None:
    text = "merge_method: ties\nmodles: []\nbase_modle: x\ndtype: float17\n"
    with pytest.raises(MergeErrors) as info:
        parse_recipe(text, "r.yml")
    text_all = "\n".join(messages(info.value))
    assert "modles" in text_all and "base_modle" in text_all and "float17" in text_all


@pytest.mark.parametrize(
    ("text", "tool", "line"),
    [
        (
            "model_name: m\ngenome:\n  models: [a, b]\n  merge_method: ties\ntasks:\n  - name: t\n",
            "mergekit-evolve",
            2,
        ),
        (
            "base_model: a\ngate_mode: hidden\nexperts:\n  - source_model: b\n",
            "mergekit-moe",
            3,
        ),
    ],
)
def test_config_of_another_mergekit_tool_is_named_in_one_error(
    text: str, tool: str, line: int
) -> None:
    with pytest.raises(MergeError) as info:
        parse_recipe(text, "r.yml")
    (msg,) = messages(info.value)
    assert f"r.yml:{line}" in msg and f"this is a {tool} configuration" in msg
    assert info.value.hint is not None and f"run it with {tool}" in info.value.hint


def test_recipe_with_merge_method_and_a_stray_experts_key_gets_the_unknown_key_error() -> None:
    text = "merge_method: linear\nmodels: [{model: a}]\nexperts: []\n"
    with pytest.raises(MergeError) as info:
        parse_recipe(text, "r.yml")
    (msg,) = messages(info.value)
    assert "unknown key 'experts'" in msg


def test_yaml_syntax_error_gives_line_and_column() -> None:
    with pytest.raises(MergeError) as info:
        parse_recipe("merge_method: ties\nmodels:\n  - model: [a\n", "r.yml")
    assert "r.yml:" in info.value.message and "YAML syntax error" in info.value.message


def test_duplicate_key_is_an_error_not_a_silent_override() -> None:
    with pytest.raises(MergeError) as info:
        parse_recipe("merge_method: ties\nmerge_method: linear\nmodels: [{model: a}]\n", "r.yml")
    assert "r.yml:2" in info.value.message and "twice" in info.value.message


def test_wrong_type_names_the_key() -> None:
    with pytest.raises(MergeError) as info:
        parse_recipe("merge_method: ties\nmodels:\n  - model: [1, 2]\n", "r.yml")
    assert "models.0.model" in info.value.message and "r.yml:3" in info.value.message


def test_models_and_slices_together_are_refused() -> None:
    text = (
        "merge_method: passthrough\nmodels: [{model: a}]\n"
        "slices:\n  - sources: [{model: a, layer_range: [0, 1]}]\n"
    )
    with pytest.raises(MergeError, match="exactly one of 'models:', 'slices:' or 'modules:'"):
        parse_recipe(text)


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("[]", "empty list"),
        ("[1, {filter: a, value: 2}]", "only numbers"),
        ("{filter: mlp}", "needs a 'value'"),
        ("[{filter: mlp, value: 1, extra: 2}]", "unknown key 'extra'"),
        ("[{filter: 3, value: 1}]", "must be a string"),
        ("[{value: [{filter: a, value: 1}]}]", "cannot be nested"),
        (".nan", "not a finite number"),
    ],
)
def test_malformed_parameter_values_are_rejected(value: str, problem: str) -> None:
    text = f"merge_method: ties\nmodels:\n  - model: a\n    parameters:\n      weight: {value}\n"
    with pytest.raises(MergeError) as info:
        parse_recipe(text, "r.yml")
    assert problem in info.value.message and "r.yml:5" in info.value.message


@pytest.mark.parametrize(
    ("t", "expected"),
    [(0.0, 1.0), (0.25, 0.85), (0.5, 0.7), (0.75, 0.4), (1.0, 0.1)],
)
def test_gradient_interpolates_between_neighbouring_items(t: float, expected: float) -> None:
    # [1, 0.7, 0.1] over t: s = 2t; between item floor(s) and the next.
    assert resolve_setting([1, 0.7, 0.1], "x", t) == pytest.approx(expected)


def test_filter_list_first_match_wins_and_no_match_falls_through() -> None:
    setting = [{"filter": "mlp", "value": 0.5}, {"filter": "attn", "value": [0, 1]}]
    assert resolve_setting(setting, "model.layers.0.mlp.up_proj.weight", 0.3) == 0.5
    assert resolve_setting(setting, "model.layers.0.self_attn.q_proj", 0.5) == pytest.approx(0.5)
    assert resolve_setting(setting, "model.norm.weight", 0.0) is None
    catch_all = [*setting, {"value": 7}]
    assert resolve_setting(catch_all, "model.norm.weight", 0.0) == 7


def test_filter_is_a_plain_substring_not_a_regex() -> None:
    assert resolve_setting([{"filter": "up.proj", "value": 1}], "mlp.up_proj.weight", 0) is None
    assert resolve_setting([{"filter": "up_proj", "value": 1}], "mlp.up_proj.weight", 0) == 1


def test_lora_references_parse_into_model_and_adapter() -> None:
    recipe = parse_recipe(
        "merge_method: linear\nmodels:\n  - model: org/m@v1+org/adapter\n", "r.yml"
    )
    assert recipe.models is not None
    ref = recipe.models[0].ref
    assert (ref.text, ref.path, ref.revision, ref.adapter) == (
        "org/m@v1+org/adapter",
        "org/m",
        "v1",
        "org/adapter",
    )
