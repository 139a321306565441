"""mergekit's `modules:` form against mergekit 0.1.5: one module (as single-tower models have),
whose parameters sit between the slices' and the top level's; and the modules of multimodal
models (Mistral 3, Gemma 3, Qwen2.5-VL), each merged with its own models or slices, a module
the recipe leaves out not written."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from tests.conformance.harness import (
    TOY_LAYERS,
    MergekitBatch,
    assert_matches_mergekit,
    assert_not_a_copy,
    assert_tensors_match,
    load_folder,
    run_ours,
)
from tests.test_modules_form import TEXT_LAYERS, VISION_LAYERS, make_towers

pytestmark = pytest.mark.conformance

# Placeholder prefix -> the architecture of tests/test_modules_form.py's TOWERS.
TOWER_FAMILIES = {"m3": "mistral3", "g3": "gemma3", "q25": "qwen2_5_vl"}


@pytest.fixture(scope="module")
def toy_models(
    toy_models: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, str]:
    """conftest's Llama families, and a base and two fine-tunes of each multimodal one
    ($m3_base, $m3_ft1, ...)."""
    root = tmp_path_factory.mktemp("towers")
    paths = dict(toy_models)
    for prefix, kind in TOWER_FAMILIES.items():
        base, tuned = make_towers(root, kind)
        paths[f"{prefix}_base"] = str(base)
        for i, folder in enumerate(tuned, start=1):
            paths[f"{prefix}_ft{i}"] = str(folder)
    return paths


ONE_MODULE: dict[str, str] = {
    "modules_models": """\
merge_method: ties
base_model: $base
modules:
  default:
    models:
      - model: $ft1
        parameters: {weight: 0.6}
      - model: $ft2
    parameters:
      weight: 0.3
      density: [1.0, 0.4]
parameters:
  density: 0.9
  normalize: true
dtype: float32
""",
    "modules_slices": """\
merge_method: linear
modules:
  default:
    slices:
      - sources:
          - model: $ft1
            layer_range: [0, 2]
          - model: $ft2
            layer_range: [0, 2]
            parameters: {weight: 0.7}
      - sources:
          - model: $ft3
            layer_range: [1, 4]
          - model: $base
            layer_range: [1, 4]
        parameters:
          weight: [0.2, 0.8]
    parameters:
      weight: 0.25
parameters:
  weight: 9.0
dtype: float32
""",
}

EXPECTED_LAYERS = {"modules_slices": 5}

TOWER_RECIPES: dict[str, str] = {
    # Every module: the text decoder in two slices (its three layers from two fine-tunes, with a
    # gradient), the vision tower and the projector as models, each level of parameters used.
    "towers_mistral3_slices": """\
merge_method: task_arithmetic
base_model: $m3_base
modules:
  text_decoder:
    slices:
      - sources:
          - model: $m3_ft1
            layer_range: [0, 2]
            parameters: {weight: [0.2, 0.9]}
          - model: $m3_base
            layer_range: [0, 2]
      - sources:
          - model: $m3_ft2
            layer_range: [2, 3]
          - model: $m3_base
            layer_range: [2, 3]
        parameters: {weight: 0.6}
  vision_tower:
    models:
      - model: $m3_ft1
        parameters: {weight: 1.0}
      - model: $m3_ft2
    parameters: {weight: 0.3}
  multi_modal_projector:
    models:
      - model: $m3_ft2
parameters:
  weight: 0.7
dtype: float32
""",
    # The projector is left out: neither tool writes it.
    "towers_gemma3_no_projector": """\
merge_method: ties
base_model: $g3_base
modules:
  text_decoder:
    models:
      - model: $g3_ft1
        parameters: {weight: 0.6, density: 0.5}
      - model: $g3_ft2
        parameters: {weight: 0.4, density: 0.7}
  vision_tower:
    models:
      - model: $g3_ft1
        parameters: {weight: 1.0, density: 0.3}
      - model: $g3_ft2
        parameters: {weight: 1.0, density: 0.9}
dtype: float32
""",
    # No prefixes: `visual.merger.` is the projector, the rest of `visual.` the vision tower.
    "towers_qwen2_5_vl_linear": """\
merge_method: linear
modules:
  text_decoder:
    models:
      - model: $q25_ft1
        parameters: {weight: 0.3}
      - model: $q25_ft2
        parameters: {weight: 0.7}
  vision_tower:
    models:
      - model: $q25_ft1
        parameters: {weight: 0.9}
      - model: $q25_ft2
        parameters: {weight: 0.1}
  multi_modal_projector:
    models:
      - model: $q25_ft1
      - model: $q25_base
    parameters: {weight: 0.5}
dtype: float32
""",
    # One module of a multimodal model: only its tensors are merged and written.
    "towers_mistral3_text_only": """\
merge_method: linear
modules:
  text_decoder:
    models:
      - model: $m3_ft1
        parameters: {weight: 0.25}
      - model: $m3_ft2
        parameters: {weight: 0.75}
dtype: float32
""",
}
RECIPES = {**ONE_MODULE, **TOWER_RECIPES}


@pytest.mark.parametrize("case", sorted(ONE_MODULE))
def test_matches_mergekit(
    case: str,
    recipes: dict[str, Path],
    reference: MergekitBatch,
    toy_models: dict[str, str],
    tmp_path: Path,
) -> None:
    layers = EXPECTED_LAYERS.get(case, TOY_LAYERS)
    assert_matches_mergekit(case, recipes[case], reference, toy_models, tmp_path / "o", layers)


def _layers(folder: Path) -> tuple[int, int]:
    config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    vision = config["vision_config"]
    return config["text_config"]["num_hidden_layers"], vision.get(
        "depth", vision.get("num_hidden_layers")
    )


@pytest.mark.parametrize("case", sorted(TOWER_RECIPES))
def test_modules_of_a_multimodal_model_match_mergekit(
    case: str,
    recipes: dict[str, Path],
    reference: MergekitBatch,
    toy_models: dict[str, str],
    tmp_path: Path,
) -> None:
    ours_dir = run_ours(recipes[case], tmp_path / "o")
    ref_dir = reference.output(case)
    ours, ref = load_folder(ours_dir), load_folder(ref_dir)
    assert_tensors_match(ours, ref)
    prefix = next(p for p in TOWER_FAMILIES if f"${p}_" in TOWER_RECIPES[case])
    assert_not_a_copy(ref, [Path(toy_models[f"{prefix}_{m}"]) for m in ("base", "ft1", "ft2")])
    assert _layers(ours_dir) == _layers(ref_dir) == (TEXT_LAYERS, VISION_LAYERS)
