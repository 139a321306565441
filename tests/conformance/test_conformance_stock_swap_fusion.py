"""model_stock, nearswap and arcee_fusion against mergekit 0.1.5 on the toy models.

Each recipe is merged by mergekit (its own venv, as a subprocess) and by `mergesmith run`; both
compute in float32, so the tensors must agree to 1e-5 relative. The toy tensors have fewer than
1e6 entries, so arcee_fusion takes its quartiles from every entry (no sampling) in both and is
compared exactly like the others.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conformance.harness import (
    TOY_LAYERS,
    MergekitBatch,
    assert_matches_mergekit,
)

pytestmark = pytest.mark.conformance


RECIPES: dict[str, str] = {
    "model_stock": """\
merge_method: model_stock
base_model: $base
models:
  - model: $ft1
  - model: $ft2
  - model: $ft3
dtype: float32
""",
    # The fine-tunes are independent noise, so their task vectors are nearly orthogonal and t is
    # close to 0 above. Here two models share a task vector ($bin_ft1 holds $ft1's tensors in
    # another format): cosines ~(1, 0, 0), t ~0.6, which makes t's value count.
    "model_stock_correlated": """\
merge_method: model_stock
base_model: $base
models:
  - model: $ft1
  - model: $bin_ft1
  - model: $ft2
dtype: float32
""",
    # Two models, one ratio per row; the base listed among the models is still the base.
    "model_stock_filter_wise": """\
merge_method: model_stock
base_model: $base
models:
  - model: $base
  - model: $ft1
  - model: $ft2
parameters:
  filter_wise: true
dtype: float32
""",
    # filter_wise chosen per tensor by filters; `weight` is read by other methods only (a
    # warning for us, silently ignored by mergekit).
    "model_stock_filter_wise_filtered": """\
merge_method: model_stock
base_model: $base
models:
  - model: $ft1
    parameters: {weight: 0.3}
  - model: $ft2
  - model: $ft3
parameters:
  filter_wise:
    - filter: mlp
      value: true
    - filter: embed_tokens
      value: true
    - value: false
dtype: float32
""",
    # Two slices over different layers, each merging the base with a different pair.
    "model_stock_slices": """\
merge_method: model_stock
base_model: $base
slices:
  - sources:
      - model: $base
        layer_range: [0, 2]
      - model: $ft1
        layer_range: [0, 2]
      - model: $ft2
        layer_range: [0, 2]
  - sources:
      - model: $base
        layer_range: [2, 4]
      - model: $ft2
        layer_range: [2, 4]
      - model: $ft3
        layer_range: [2, 4]
    parameters:
      filter_wise: true
dtype: float32
""",
    # Changes are ~0.01 with spikes of ~0.05: t = 0.01 blends most entries part of the way.
    "nearswap": """\
merge_method: nearswap
base_model: $base
models:
  - model: $ft1
parameters:
  t: 0.01
dtype: float32
""",
    "nearswap_gradient": """\
merge_method: nearswap
base_model: $base
models:
  - model: $base
  - model: $ft2
parameters:
  t: [0.001, 0.03, 0.005]
dtype: float32
""",
    "nearswap_filters": """\
merge_method: nearswap
base_model: $base
models:
  - model: $ft3
parameters:
  t:
    - filter: self_attn
      value: [0.002, 0.05]
    - filter: mlp.down_proj
      value: 0.0
    - filter: mlp
      value: 0.02
    - value: 0.008
dtype: float32
""",
    # Overlapping slices (6 layers), a slice-level t beating the top-level one.
    "nearswap_slices": """\
merge_method: nearswap
base_model: $base
slices:
  - sources:
      - model: $base
        layer_range: [0, 3]
      - model: $ft1
        layer_range: [0, 3]
  - sources:
      - model: $base
        layer_range: [1, 4]
      - model: $ft2
        layer_range: [1, 4]
    parameters:
      t: [0.02, 0.004]
parameters:
  t: 0.01
dtype: float32
""",
    "arcee_fusion": """\
merge_method: arcee_fusion
base_model: $base
models:
  - model: $ft1
dtype: float32
""",
    "arcee_fusion_base_listed": """\
merge_method: arcee_fusion
base_model: $base
models:
  - model: $base
  - model: $ft3
dtype: float32
""",
    "arcee_fusion_slices": """\
merge_method: arcee_fusion
base_model: $base
slices:
  - sources:
      - model: $base
        layer_range: [0, 2]
      - model: $ft2
        layer_range: [0, 2]
  - sources:
      - model: $base
        layer_range: [1, 4]
      - model: $ft1
        layer_range: [1, 4]
dtype: float32
""",
}

EXPECTED_LAYERS = {"nearswap_slices": 6, "arcee_fusion_slices": 5}


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_matches_mergekit(
    case: str,
    recipes: dict[str, Path],
    reference: MergekitBatch,
    toy_models: dict[str, str],
    tmp_path: Path,
) -> None:
    """Same tensor names, shapes, dtypes and values (to 1e-5 relative), same layer count."""
    layers = EXPECTED_LAYERS.get(case, TOY_LAYERS)
    assert_matches_mergekit(case, recipes[case], reference, toy_models, tmp_path / "o", layers)
