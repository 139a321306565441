"""mergekit's `modules:` form: one module (a single-tower model's `default`) is the recipe's
models or slices, with the module's parameters between the slices' and the top level's."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergesmith import merge
from mergesmith.api import prepare
from mergesmith.errors import MergeError, MergeErrors
from tests.conftest import write_recipe


def messages(exc: MergeError) -> str:
    errors = exc.errors if isinstance(exc, MergeErrors) else [exc]
    return "\n".join(f"{e.message} | {e.hint}" for e in errors)


def test_module_parameters_sit_between_the_slice_and_the_top_level(family, tmp_path: Path):
    _base, tuned = family
    # The module says weight 0.25 for the first model, a slice source 0.75 for the second; the
    # top-level 9.0 is overridden by both. Expected: a linear merge computed by hand.
    text = f"""merge_method: linear
modules:
  default:
    slices:
      - sources:
          - model: {tuned[0]}
            layer_range: [0, 4]
          - model: {tuned[1]}
            layer_range: [0, 4]
            parameters: {{weight: 0.75}}
    parameters:
      weight: 0.25
parameters:
  weight: 9.0
  normalize: false
dtype: float32
"""
    out = tmp_path / "out"
    merge(write_recipe(tmp_path, text), out)
    got = load_file(out / "model.safetensors")
    first = load_file(tuned[0] / "model.safetensors")
    second = load_file(tuned[1] / "model.safetensors")
    for name in ("model.layers.2.mlp.up_proj.weight", "model.embed_tokens.weight"):
        expected = 0.25 * first[name] + 0.75 * second[name]
        torch.testing.assert_close(got[name], expected, rtol=1e-6, atol=1e-7)


def test_a_module_error_names_the_line_inside_the_module(family, tmp_path: Path):
    base, tuned = family
    text = f"""merge_method: ties
base_model: {base}
modules:
  default:
    models:
      - model: {tuned[0]}
        parameters: {{weight: 1.0, density: 1.5}}
"""
    with pytest.raises(MergeError) as info:
        prepare(write_recipe(tmp_path, text))
    assert "recipe.yml:6" in messages(info.value) and "density" in messages(info.value)


def test_several_modules_are_refused_naming_them(family, tmp_path: Path):
    _base, tuned = family
    text = f"""merge_method: linear
modules:
  text_decoder:
    models: [{{model: {tuned[0]}, parameters: {{weight: 1}}}}]
  vision_tower:
    models: [{{model: {tuned[1]}, parameters: {{weight: 1}}}}]
"""
    with pytest.raises(MergeError) as info:
        prepare(write_recipe(tmp_path, text))
    found = messages(info.value)
    assert "recipe.yml:2" in found and "text_decoder, vision_tower" in found


def test_modules_beside_models_is_an_error(family, tmp_path: Path):
    _base, tuned = family
    text = f"""merge_method: linear
models: [{{model: {tuned[0]}, parameters: {{weight: 1}}}}]
modules:
  default:
    models: [{{model: {tuned[1]}, parameters: {{weight: 1}}}}]
"""
    with pytest.raises(MergeError) as info:
        prepare(write_recipe(tmp_path, text))
    assert "'modules:' and also 'models:'" in messages(info.value)
