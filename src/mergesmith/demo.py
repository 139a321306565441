"""`make demo`: build a tiny base model and three fine-tunes, merge them with the TIES recipe from
the article this project started from, load the result with transformers, and show the work.

No network: the models are made here, as real safetensors folders with config and tokenizer.
"""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

SEED_RECIPE = """\
# The TIES recipe from the seed article (mergekit's TIES explained), with local models.
models:
  - model: {root}/finetune1
    parameters:
      density: [1, 0.7, 0.1] # density gradient over the layers
      weight: 1.0
  - model: {root}/finetune2
    parameters:
      density: 0.5
      weight: [0, 0.3, 0.7, 1] # weight gradient
  - model: {root}/finetune3
    parameters:
      density: 0.33
      weight:
        - filter: mlp # 0.5 for MLP tensors, 0 elsewhere
          value: 0.5
        - value: 0
merge_method: ties
base_model: {root}/base
parameters:
  normalize: true
  int8_mask: true
dtype: float16
"""


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--dir", type=Path, default=Path("demo-output"), help="work folder")
    args = parser.parse_args(argv)

    import torch

    from mergesmith.api import merge, prepare
    from mergesmith.toymodels import ToyShape, make_family

    root = args.dir.absolute()
    shutil.rmtree(root, ignore_errors=True)
    shape = ToyShape(hidden=64, layers=6, intermediate=128, vocab=256, heads=4, kv_heads=2)
    _, tuned = make_family(root / "models", 3, shape, dtype=torch.float32)
    print(f"1. built a base model and 3 fine-tunes (Llama-shaped, {shape.layers} layers, float32)")
    print(f"   in {root / 'models'}")

    recipe_path = root / "ties.yml"
    recipe_path.write_text(SEED_RECIPE.format(root=root / "models"), encoding="utf-8")
    print(f"2. wrote the seed article's TIES recipe to {recipe_path}")

    plan, sources = prepare(recipe_path)
    for source in sources.values():
        source.close()
    print(f"3. validated it against the models' headers: {len(plan.jobs)} tensors planned")
    print("   how the gradients and the mlp filter resolve, per layer (density / weight):")
    print("   layer  " + "  ".join(f"{p.name:>14}" for p in tuned))
    for layer in range(shape.layers):
        job = next(j for j in plan.jobs if j.name == f"model.layers.{layer}.mlp.up_proj.weight")
        cells = [f"{m['density']:.3f} / {m['weight']:.3f}" for m in job.model_params]
        print(f"   {layer:>5}  " + "  ".join(f"{c:>14}" for c in cells))
    attn = next(j for j in plan.jobs if j.name == "model.layers.0.self_attn.q_proj.weight")
    print(f"   (attention tensors take weight {attn.model_params[2]['weight']} for finetune3)")

    out = root / "merged"
    started = time.perf_counter()
    result = merge(recipe_path, out, seed=0)
    print(
        f"4. merged {result.tensors} tensors into {out} in {time.perf_counter() - started:.2f} s"
        f" ({result.bytes_written / 1e6:.2f} MB, float16, arithmetic in float32)"
    )
    print(f"   files: {', '.join(result.files)}")

    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    model = AutoModelForCausalLM.from_pretrained(out)
    tokenizer = AutoTokenizer.from_pretrained(out)
    ids = tokenizer("the merge model elects a sign", return_tensors="pt").input_ids
    with torch.no_grad():
        logits = model(ids).logits
    finite = bool(torch.isfinite(logits).all())
    print(
        f"5. transformers loaded it as {type(model).__name__} ({model.dtype}); "
        f"logits {list(logits.shape)}, all finite: {finite}"
    )
    _show_analysis(recipe_path, root / "analysis")
    return 0 if finite else 1


def _show_analysis(recipe_path: Path, out: Path) -> None:
    """Step 6: what the merge did to each model's task vector (`mergesmith analyze`)."""
    import json

    from mergesmith.analyze import analyze

    result = analyze(recipe_path, out, seed=0)
    data = json.loads((out / "analysis.json").read_text(encoding="utf-8"))
    overall = data["overall"]
    labels = [m["label"] for m in data["models"]]
    removed = ", ".join(
        f"{label} {100 * share:.0f} %"
        for label, share in zip(labels, overall["removed_l1_share"], strict=True)
    )
    elected = ", ".join(
        f"{label} {100 * share:.0f} %"
        for label, share in zip(labels, overall["elected_share"], strict=True)
    )
    print(
        f"6. analysed the same plan without writing a model ({result.seconds:.1f} s): "
        f"sign conflicts {100 * overall['sign_conflict_before']:.0f} % of entries before "
        f"trimming, {100 * overall['sign_conflict_after']:.0f} % after"
    )
    print(f"   L1 mass trimmed away: {removed}; share of the elected-sign mass: {elected}")
    print(f"   report and plots: {result.report}")
    print(f"   (the command: mergesmith analyze {recipe_path} --out {out})")


if __name__ == "__main__":
    raise SystemExit(main())
