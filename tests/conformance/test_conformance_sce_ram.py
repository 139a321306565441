"""sce, ram and ramplus_tl against mergekit 0.1.5, tensor for tensor (relative error 1e-5).

The toy float32 models' deltas are random, so equal variances at sce's selection cut (where
mergekit's torch.topk picks an unspecified subset and we spread the kept share evenly) do not
occur, and the comparison is exact for every recipe here.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.conformance.harness import (
    TOY_LAYERS,
    MergekitBatch,
    assert_matches_mergekit,
    load_folder,
    run_ours,
)

pytestmark = pytest.mark.conformance

RECIPES: dict[str, str] = {
    "sce_defaults": """\
merge_method: sce
base_model: $base
models:
  - model: $ft1
  - model: $ft2
  - model: $ft3
dtype: float32
""",
    "sce_topk": """\
merge_method: sce
base_model: $base
models:
  - model: $ft1
  - model: $ft2
  - model: $ft3
parameters:
  select_topk: 0.3
  int8_mask: true
dtype: float32
""",
    # Two models: the variance is a quarter of the squared difference, so the selection is
    # where the two fine-tunes disagree most; a small fraction keeps a handful of entries.
    "sce_two_models_sparse": """\
merge_method: sce
base_model: $base
models:
  - model: $ft1
  - model: $ft2
parameters:
  select_topk: 0.02
dtype: float32
""",
    # select_topk as a gradient over the layers, and per tensor by filters.
    "sce_topk_gradient_filters": """\
merge_method: sce
base_model: $base
models:
  - model: $ft1
  - model: $ft2
  - model: $ft3
parameters:
  select_topk:
    - filter: self_attn
      value: [0.1, 0.9]
    - filter: mlp.down_proj
      value: 0.45
    - value: [1.0, 0.6, 0.2]
dtype: float32
""",
    # As recipes are published: the base listed among the models, and `weight`, `density` and
    # `normalize`, which sce does not read (we warn; mergekit ignores them silently).
    "sce_published": """\
models:
  - model: $base
  - model: $ft1
    parameters:
      weight: 1.0
      density: 0.5
  - model: $ft2
    parameters:
      weight: 0.6
      density: [0.3, 0.7]
  - model: $ft3
    parameters:
      weight: 0.4
      density: 0.5
merge_method: sce
base_model: $base
parameters:
  select_topk: 0.6
  normalize: true
dtype: float32
""",
    # Overlapping slices (6 layers); select_topk set per slice and as a gradient restarting in
    # each slice.
    "sce_slices": """\
merge_method: sce
base_model: $base
slices:
  - sources:
      - model: $base
        layer_range: [0, 3]
      - model: $ft1
        layer_range: [0, 3]
      - model: $ft2
        layer_range: [0, 3]
    parameters:
      select_topk: 0.5
  - sources:
      - model: $base
        layer_range: [1, 4]
      - model: $ft2
        layer_range: [1, 4]
      - model: $ft3
        layer_range: [1, 4]
    parameters:
      select_topk: [0.2, 0.8]
dtype: float32
""",
    "ram_defaults": """\
merge_method: ram
base_model: $base
models:
  - model: $ft1
  - model: $ft2
  - model: $ft3
dtype: float32
""",
    # The toy deltas are mostly about 0.01: this threshold drops many entries, so unique,
    # shared and untouched entries all occur.
    "ram_epsilon": """\
merge_method: ram
base_model: $base
models:
  - model: $base
  - model: $ft1
  - model: $ft2
  - model: $ft3
parameters:
  epsilon: 0.012
dtype: float32
""",
    "ram_epsilon_gradient_filters": """\
merge_method: ram
base_model: $base
models:
  - model: $ft1
  - model: $ft2
parameters:
  epsilon:
    - filter: mlp
      value: [0.005, 0.03]
    - value: 0.01
dtype: float32
""",
    "ramplus_tl_defaults": """\
merge_method: ramplus_tl
base_model: $base
models:
  - model: $ft1
  - model: $ft2
  - model: $ft3
dtype: float32
""",
    # A high threshold makes most counting entries unique, so the shared/unique ratio is
    # small and alpha does not cap it everywhere.
    "ramplus_tl_params": """\
merge_method: ramplus_tl
base_model: $base
models:
  - model: $ft1
  - model: $ft2
  - model: $ft3
parameters:
  r: 0.7
  alpha: 1.5
  epsilon: 0.02
dtype: float32
""",
    "ramplus_tl_gradient_filters": """\
merge_method: ramplus_tl
base_model: $base
models:
  - model: $ft1
  - model: $ft2
  - model: $ft3
parameters:
  r: [0.0, 1.0]
  alpha:
    - filter: self_attn
      value: 0.05
    - value: 0.5
  epsilon: [0.002, 0.015, 0.004]
dtype: float32
""",
    "ramplus_tl_slices": """\
merge_method: ramplus_tl
base_model: $base
slices:
  - sources:
      - model: $base
        layer_range: [0, 2]
      - model: $ft1
        layer_range: [0, 2]
      - model: $ft3
        layer_range: [0, 2]
    parameters:
      r: 0.5
  - sources:
      - model: $base
        layer_range: [2, 4]
      - model: $ft2
        layer_range: [2, 4]
      - model: $ft3
        layer_range: [2, 4]
    parameters:
      epsilon: 0.01
dtype: float32
""",
}

EXPECTED_LAYERS = {"sce_slices": 6}


@pytest.mark.parametrize("case", list(RECIPES))
def test_matches_mergekit(
    case: str,
    recipes: dict[str, Path],
    reference: MergekitBatch,
    toy_models: dict[str, str],
    tmp_path: Path,
) -> None:
    """Same tensor names, shapes, dtypes and values (to 1e-5 relative), same layer count, and
    the merge is not a copy of an input."""
    layers = EXPECTED_LAYERS.get(case, TOY_LAYERS)
    assert_matches_mergekit(case, recipes[case], reference, toy_models, tmp_path / "o", layers)


@pytest.mark.parametrize("case", [c for c in RECIPES if c.startswith("ram")])
def test_ram_is_bit_identical_to_mergekit(
    case: str, recipes: dict[str, Path], reference: MergekitBatch, tmp_path: Path
) -> None:
    """For float32 models RAM agrees exactly (docs/methods/ram.md): the same float32 operations
    in the same order, every term exact but the divisions and the final sums."""
    ours = load_folder(run_ours(recipes[case], tmp_path / "ours"))
    ref = load_folder(reference.output(case))
    assert ours.keys() == ref.keys()
    differing = [name for name in ref if not torch.equal(ours[name], ref[name])]
    assert not differing, f"{len(differing)} tensors differ, e.g. {differing[0]}"
