"""What the plan checks from headers alone, before any weight is read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from mergesmith.api import prepare
from mergesmith.errors import MergeError, MergeErrors
from mergesmith.toymodels import ToyShape, base_tensors, llama_config, save_model


def all_messages(exc: MergeError) -> str:
    errors = exc.errors if isinstance(exc, MergeErrors) else [exc]
    return "\n".join(f"{e.message} | {e.hint}" for e in errors)


def ties(base: Path, *models: Path, extra: str = "") -> str:
    body = "".join(
        f"  - model: {m}\n    parameters: {{weight: 1.0, density: 0.5}}\n" for m in models
    )
    return f"merge_method: ties\nbase_model: {base}\nmodels:\n{body}{extra}"


def variant(tmp_path: Path, name: str, edit) -> Path:
    shape = ToyShape()
    tensors = base_tensors(shape, 5)
    edit(tensors)
    return save_model(tmp_path / name, tensors, llama_config(shape, torch.float32))


def test_missing_tensor_in_a_non_base_model_names_both(family, tmp_path: Path) -> None:
    base, _ = family
    lacking = variant(tmp_path, "lacking", lambda t: t.pop("model.layers.2.mlp.up_proj.weight"))
    with pytest.raises(MergeError) as info:
        prepare(ties(base, lacking))
    text = all_messages(info.value)
    assert (
        "model.layers.2.mlp.up_proj.weight" in text and str(lacking) in text and str(base) in text
    )


def test_shape_mismatch_outside_embeddings_is_an_error(family, tmp_path: Path) -> None:
    base, _ = family

    def widen(t):
        t["model.layers.1.mlp.down_proj.weight"] = torch.zeros(32, 65)

    wide = variant(tmp_path, "wide", widen)
    with pytest.raises(MergeError) as info:
        prepare(ties(base, wide))
    text = all_messages(info.value)
    assert "model.layers.1.mlp.down_proj.weight" in text and "[32, 65]" in text


def test_larger_embedding_is_cut_to_the_base_with_a_warning(family, tmp_path: Path) -> None:
    base, _ = family

    def grow(t):
        t["model.embed_tokens.weight"] = torch.randn(130, 32)
        t["lm_head.weight"] = torch.randn(130, 32)

    bigger = variant(tmp_path, "bigger", grow)
    plan, _ = prepare(ties(base, bigger))
    job = next(j for j in plan.jobs if j.name == "model.embed_tokens.weight")
    assert job.inputs[0].crop == (128, 32) and job.shape == (128, 32)
    assert any("embed_tokens" in w and "cut" in w for w in plan.warnings)


def test_unknown_method_suggests_the_closest(family) -> None:
    base, tuned = family
    with pytest.raises(MergeError) as info:
        prepare(ties(base, tuned[0]).replace("merge_method: ties", "merge_method: tie"))
    assert "unknown merge_method 'tie'" in info.value.message
    assert "did you mean 'ties'" in (info.value.hint or "")


def test_parameter_of_another_method_is_a_warning_and_changes_nothing(family) -> None:
    """Published recipes carry parameters their method does not read (mergekit runs them)."""
    base, tuned = family
    plain, _ = prepare(ties(base, tuned[0]))
    recipe = ties(base, tuned[0]).replace("density: 0.5", "density: 0.5, epsilon: 0.1")
    plan, _ = prepare(recipe + "parameters: {t: 0.5}\n")
    assert any("'epsilon' is not a parameter of ties; it is ignored" in w for w in plan.warnings)
    assert any("'t' is not a parameter of ties" in w for w in plan.warnings)
    assert [j.model_params for j in plan.jobs] == [j.model_params for j in plain.jobs]
    assert [j.params for j in plan.jobs] == [j.params for j in plain.jobs]


def test_parameter_no_method_reads_is_an_error_naming_the_closest(family) -> None:
    base, tuned = family
    recipe = ties(base, tuned[0]).replace("density: 0.5", "densty: 0.5")
    with pytest.raises(MergeError) as info:
        prepare(recipe)
    assert "'densty' is not a parameter of ties" in all_messages(info.value)
    assert "did you mean 'density'" in (info.value.hint or "")


def test_global_parameter_set_per_model_is_an_error(family) -> None:
    base, tuned = family
    recipe = ties(base, tuned[0]).replace("density: 0.5", "density: 0.5, normalize: false")
    with pytest.raises(MergeError) as info:
        prepare(recipe)
    assert "'normalize' applies to the whole merge" in all_messages(info.value)


def test_required_weight_missing_is_reported_once_per_model(family) -> None:
    base, tuned = family
    recipe = ties(base, *tuned).replace("{weight: 1.0, density: 0.5}", "{density: 0.5}")
    with pytest.raises(MergeErrors) as info:
        prepare(recipe)
    missing = [e for e in info.value.errors if "needs 'weight'" in e.message]
    assert len(missing) == 3


def test_method_needing_a_base_without_one_is_an_error(family) -> None:
    _, tuned = family
    recipe = f"merge_method: ties\nmodels:\n  - model: {tuned[0]}\n    parameters: {{weight: 1}}\n"
    with pytest.raises(MergeError) as info:
        prepare(recipe)
    assert "ties needs a base model" in all_messages(info.value)


@pytest.mark.parametrize("density", [-0.1, 1.5])
def test_density_outside_unit_interval_is_an_error(family, density: float) -> None:
    base, tuned = family
    with pytest.raises(MergeError) as info:
        prepare(ties(base, tuned[0]).replace("density: 0.5", f"density: {density}"))
    assert "density" in all_messages(info.value) and "outside [0, 1]" in all_messages(info.value)


def test_della_epsilon_too_large_for_density_is_an_error(family) -> None:
    base, tuned = family
    recipe = (
        f"merge_method: della\nbase_model: {base}\nmodels:\n  - model: {tuned[0]}\n"
        "    parameters: {weight: 1, density: 0.1, epsilon: 0.2}\n"
    )
    with pytest.raises(MergeError) as info:
        prepare(recipe)
    assert "inside (0, 1)" in all_messages(info.value)


def test_slice_layer_range_past_the_model_is_an_error(family) -> None:
    base, _ = family
    recipe = (
        "merge_method: passthrough\nslices:\n  - sources:\n"
        f"      - model: {base}\n        layer_range: [2, 6]\n"
    )
    with pytest.raises(MergeError) as info:
        prepare(recipe)
    text = all_messages(info.value)
    assert "layer_range [2, 6]" in text and "4 layers" in text


def test_missing_model_folder_is_named(tmp_path: Path, family) -> None:
    base, _ = family
    ghost = tmp_path / "no-such-model"
    with pytest.raises(MergeError) as info:
        prepare(ties(base, ghost))
    assert str(ghost) in all_messages(info.value)


def test_precedence_model_then_slice_then_top_level_then_default(family) -> None:
    base, tuned = family
    recipe = f"""
merge_method: ties
slices:
  - sources:
      - model: {base}
        layer_range: [0, 4]
      - model: {tuned[0]}
        layer_range: [0, 4]
        parameters: {{weight: 0.9}}
      - model: {tuned[1]}
        layer_range: [0, 4]
    parameters: {{density: 0.6, weight: [{{filter: mlp, value: 0.2}}]}}
base_model: {base}
parameters: {{weight: 0.4, lambda: 2.0}}
"""
    plan, _ = prepare(recipe)
    mlp = next(j for j in plan.jobs if j.name == "model.layers.1.mlp.up_proj.weight")
    attn = next(j for j in plan.jobs if j.name == "model.layers.1.self_attn.q_proj.weight")
    assert [m["weight"] for m in mlp.model_params] == [0.9, 0.2]  # model's own, then slice filter
    assert [m["weight"] for m in attn.model_params] == [0.9, 0.4]  # no filter match: top level
    assert [m["density"] for m in mlp.model_params] == [0.6, 0.6]  # slice level
    assert mlp.params["lambda"] == 2.0 and mlp.params["normalize"] is True  # top level, default


def test_gradient_position_is_the_layer_index_over_layer_count(family) -> None:
    base, tuned = family
    recipe = ties(base, tuned[0]).replace("density: 0.5", "density: [0.1, 0.7]")
    plan, _ = prepare(recipe)
    for layer, t in enumerate([0, 1 / 3, 2 / 3, 1]):
        job = next(j for j in plan.jobs if j.name == f"model.layers.{layer}.mlp.up_proj.weight")
        assert job.model_params[0]["density"] == pytest.approx(0.1 + 0.6 * t)
    embed = next(j for j in plan.jobs if j.name == "model.embed_tokens.weight")
    assert embed.model_params[0]["density"] == pytest.approx(0.1)  # outside layers: t = 0


def test_slices_renumber_layers_and_read_the_right_source_layers(family) -> None:
    base, tuned = family
    recipe = f"""
merge_method: passthrough
slices:
  - sources: [{{model: {base}, layer_range: [0, 2]}}]
  - sources: [{{model: {tuned[0]}, layer_range: [1, 4]}}]
"""
    plan, _ = prepare(recipe)
    assert plan.num_layers == 5
    by_name = {j.name: j for j in plan.jobs}
    assert by_name["model.layers.1.mlp.up_proj.weight"].inputs[0].model == str(base)
    fourth = by_name["model.layers.4.mlp.up_proj.weight"].inputs[0]
    assert fourth.model == str(tuned[0]) and fourth.name == "model.layers.3.mlp.up_proj.weight"
    assert by_name["model.embed_tokens.weight"].inputs[0].model == str(base)
    assert by_name["lm_head.weight"].inputs[0].model == str(tuned[0])


def test_tokenizer_source_outside_the_recipe_is_read_for_its_tokenizer_only(
    family, tmp_path: Path
) -> None:
    """As mergekit does, a tokenizer source need not be merged: only its tokenizer is read. One
    that does not exist is an error naming it (it once left the output without a tokenizer)."""
    base, tuned = family
    stray = tmp_path / "elsewhere"
    with pytest.raises(MergeError) as info:
        prepare(ties(base, tuned[0]) + f"tokenizer_source: {stray}\n")
    assert f"tokenizer source '{stray}': no such folder" in all_messages(info.value)
    plan, _ = prepare(ties(base, tuned[0]) + f"tokenizer_source: {tuned[1]}\n")
    assert plan.tokenizer_folder == tuned[1]
    assert plan.vocab is not None and len(plan.vocab.tokens) == 128
    assert all(job.inputs[0].model != str(tuned[1]) for job in plan.jobs)


def test_unknown_chat_template_name_is_refused_naming_the_closest(family) -> None:
    """Written as the template itself, a misspelt name would give a tokenizer that cannot chat."""
    base, tuned = family
    with pytest.raises(MergeError) as info:
        prepare(ties(base, tuned[0]) + "chat_template: chatlm\n")
    message = all_messages(info.value)
    assert "'chatlm'" in message and "chatml" in message


def test_literal_chat_template_is_accepted(family) -> None:
    base, tuned = family
    template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    plan, _ = prepare(ties(base, tuned[0]) + f'chat_template: "{template}"\n')
    assert plan.recipe.chat_template == template
