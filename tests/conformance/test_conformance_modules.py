"""mergekit's `modules:` form (one module, as single-tower models have) against mergekit 0.1.5:
module parameters sit between the slices' and the top level's."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conformance.harness import TOY_LAYERS, MergekitBatch, assert_matches_mergekit

pytestmark = pytest.mark.conformance

RECIPES: dict[str, str] = {
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


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_matches_mergekit(
    case: str,
    recipes: dict[str, Path],
    reference: MergekitBatch,
    toy_models: dict[str, str],
    tmp_path: Path,
) -> None:
    layers = EXPECTED_LAYERS.get(case, TOY_LAYERS)
    assert_matches_mergekit(case, recipes[case], reference, toy_models, tmp_path / "o", layers)
