"""Multi-stage recipes (mergekit-multi's format): named YAML documents, later stages reading
earlier ones by name, run in dependency order and checked before any weight is read."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergesmith import merge
from mergesmith.errors import MergeError, MergeErrors
from mergesmith.pipeline import plan_stages
from tests.conftest import run_cli, write_recipe
from tests.test_lora import Q, exact, lora_pair, write_adapter

LAYER = "model.layers.1.mlp.up_proj.weight"


def pipeline(base: Path, tuned: list[Path], first_weight: float = 0.5) -> str:
    """Stage `soup` averages two fine-tunes; the unnamed final stage adds soup's task vector
    to the base at 0.8, after the stage it reads although written first."""
    return f"""merge_method: task_arithmetic
base_model: {base}
models:
  - model: soup
    parameters: {{weight: 0.8}}
dtype: float32
---
name: soup
merge_method: linear
models:
  - model: {tuned[0]}
    parameters: {{weight: {first_weight}}}
  - model: {tuned[1]}
    parameters: {{weight: {1 - first_weight}}}
parameters: {{normalize: false}}
dtype: float32
"""


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    return load_file(folder / "model.safetensors")


def messages(exc: MergeError) -> str:
    errors = exc.errors if isinstance(exc, MergeErrors) else [exc]
    return "\n".join(f"{e.message} | {e.hint}" for e in errors)


def test_stages_run_in_dependency_order_and_the_work_folder_goes(family, tmp_path: Path):
    base, tuned = family
    out = tmp_path / "out"
    merge(write_recipe(tmp_path, pipeline(base, tuned)), out)
    b, x, y = tensors(base)[LAYER], tensors(tuned[0])[LAYER], tensors(tuned[1])[LAYER]
    expected = b + 0.8 * ((0.5 * x + 0.5 * y) - b)
    torch.testing.assert_close(tensors(out)[LAYER], expected, rtol=1e-6, atol=1e-7)
    assert not (tmp_path / ".out.stages").exists()
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()


def test_validate_checks_later_stages_against_what_earlier_ones_will_write(family, tmp_path: Path):
    """Stage `top` keeps two layers; the final stage asks for four of them. Found from the
    plan of `top`, before anything is written."""
    _base, tuned = family
    text = f"""name: top
merge_method: passthrough
slices:
  - sources: [{{model: {tuned[0]}, layer_range: [0, 2]}}]
---
name: final
merge_method: passthrough
slices:
  - sources: [{{model: top, layer_range: [0, 4]}}]
"""
    recipe = write_recipe(tmp_path, text)
    done = run_cli("validate", recipe)
    assert done.returncode == 2, done.stderr
    assert "recipe.yml:9" in done.stderr and "goes past the 2 layers of 'top'" in done.stderr
    done = run_cli("run", recipe, tmp_path / "out")
    assert done.returncode == 2
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.stages").exists()


def test_validate_reports_every_stage(family, tmp_path: Path):
    base, tuned = family
    done = run_cli("validate", write_recipe(tmp_path, pipeline(base, tuned)))
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("stage 'soup': ok: linear, 39 tensors")
    assert lines[1].startswith("the final stage: ok: task_arithmetic, 39 tensors")


def test_a_cycle_is_an_error_naming_it(tmp_path: Path):
    text = """name: a
merge_method: linear
models: [{model: b, parameters: {weight: 1}}]
---
name: b
merge_method: linear
models: [{model: a, parameters: {weight: 1}}]
"""
    with pytest.raises(MergeError) as info:
        plan_stages(write_recipe(tmp_path, text))
    assert "cycle: a -> b -> a" in messages(info.value)


def test_a_misspelt_stage_name_is_named_with_the_closest_stage(family, tmp_path: Path):
    base, tuned = family
    text = pipeline(base, tuned).replace("- model: soup", "- model: soupp")
    with pytest.raises(MergeError) as info:
        plan_stages(write_recipe(tmp_path, text))
    found = messages(info.value)
    assert "recipe.yml:4" in found and "'soupp'" in found and "did you mean stage 'soup'" in found


def test_duplicate_names_and_two_final_stages_are_errors(family, tmp_path: Path):
    base, tuned = family
    twice = pipeline(base, tuned) + "---\n" + pipeline(base, tuned).split("---\n")[1]
    with pytest.raises(MergeError) as info:
        plan_stages(write_recipe(tmp_path, twice, "twice.yml"))
    assert "stage name 'soup' is used twice" in messages(info.value)
    both = pipeline(base, tuned).replace("model: soup", f"model: {tuned[2]}")
    both = "name: last\n" + both
    with pytest.raises(MergeError) as info:
        plan_stages(write_recipe(tmp_path, both, "both.yml"))
    assert "stages 'last', 'soup' are each used by no other stage" in messages(info.value)


def test_resume_reuses_a_finished_stage_only_for_the_same_recipe(family, tmp_path: Path):
    base, tuned = family
    recipe = write_recipe(tmp_path, pipeline(base, tuned))
    out = tmp_path / "out"
    merge(recipe, out, keep_stages=True)
    stage = tmp_path / ".out.stages" / "soup" / "model.safetensors"
    first = tensors(out)[LAYER]
    written = stage.stat().st_mtime_ns
    merge(recipe, out, resume=True, overwrite=True, keep_stages=True)
    assert stage.stat().st_mtime_ns == written, "the finished stage was merged again"
    assert torch.equal(tensors(out)[LAYER], first)
    # The stage's recipe changed: its old output must not be reused.
    changed = write_recipe(tmp_path, pipeline(base, tuned, first_weight=0.25))
    merge(changed, out, resume=True, overwrite=True, keep_stages=True)
    b, x, y = tensors(base)[LAYER], tensors(tuned[0])[LAYER], tensors(tuned[1])[LAYER]
    expected = b + 0.8 * ((0.25 * x + 0.75 * y) - b)
    torch.testing.assert_close(tensors(out)[LAYER], expected, rtol=1e-6, atol=1e-7)


def test_a_single_named_document_is_a_plain_recipe(family, tmp_path: Path):
    base, tuned = family
    text = "name: only\n" + pipeline(base, tuned).split("---\n")[1].replace("name: soup\n", "")
    out = tmp_path / "out"
    merge(write_recipe(tmp_path, text), out)
    x, y = tensors(tuned[0])[LAYER], tensors(tuned[1])[LAYER]
    torch.testing.assert_close(tensors(out)[LAYER], 0.5 * x + 0.5 * y, rtol=1e-6, atol=1e-7)


def test_a_stage_with_an_adapter_is_its_output_with_the_adapter_applied(family, tmp_path: Path):
    """`soup+ADAPTER`: the final stage reads soup's output with a LoRA applied per tensor, as
    for a model folder; expected by hand from the stage's own output (kept) and the formula."""
    base, tuned = family
    pair = lora_pair(Q, 4, 32, 32, 5)
    adapter = write_adapter(tmp_path / "lora", pair)
    text = pipeline(base, tuned).replace("- model: soup", f"- model: soup+{adapter}")
    out = tmp_path / "out"
    merge(write_recipe(tmp_path, text), out, keep_stages=True)
    soup = tensors(tmp_path / ".out.stages" / "soup")
    b, got = tensors(base), tensors(out)
    adapted = exact(soup[f"{Q}.weight"], pair[f"{Q}.lora_A.weight"], pair[f"{Q}.lora_B.weight"], 2)
    expected = b[f"{Q}.weight"].double() + 0.8 * (adapted - b[f"{Q}.weight"].double())
    torch.testing.assert_close(got[f"{Q}.weight"].double(), expected, rtol=1e-5, atol=1e-6)
    # The adapter touches q_proj only: every other tensor is the plain pipeline's.
    expected_layer = b[LAYER] + 0.8 * (soup[LAYER] - b[LAYER])
    torch.testing.assert_close(got[LAYER], expected_layer, rtol=1e-6, atol=1e-7)


def test_an_adapter_that_does_not_fit_a_stage_is_refused_before_any_stage_runs(
    family, tmp_path: Path
):
    """Checked against the stage's planned output: soup keeps two layers, the adapter names
    layer 3. Nothing is merged, not even soup."""
    _base, tuned = family
    adapter = write_adapter(
        tmp_path / "lora", lora_pair("model.layers.3.mlp.up_proj", 2, 32, 64, 1)
    )
    text = f"""merge_method: task_arithmetic
base_model: {tuned[2]}
slices:
  - sources:
      - {{model: soup+{adapter}, layer_range: [0, 2], parameters: {{weight: 1.0}}}}
      - {{model: {tuned[2]}, layer_range: [0, 2]}}
---
name: soup
merge_method: passthrough
slices:
  - sources: [{{model: {tuned[0]}, layer_range: [0, 2]}}]
"""
    recipe = write_recipe(tmp_path, text)
    done = run_cli("run", recipe, tmp_path / "out")
    assert done.returncode == 2 and "Traceback" not in done.stderr, done.stderr
    assert "recipe.yml:5" in done.stderr and f"soup+{adapter}" in done.stderr
    assert "model.layers.3.mlp.up_proj" in done.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / ".out.stages").exists()


def test_a_stage_with_a_revision_is_an_error(family, tmp_path: Path):
    base, tuned = family
    text = pipeline(base, tuned).replace("- model: soup", "- model: soup@v1")
    with pytest.raises(MergeError) as info:
        plan_stages(write_recipe(tmp_path, text))
    found = messages(info.value)
    assert "recipe.yml:4" in found and "stage 'soup' is merged by this recipe" in found
