"""`MODEL+ADAPTER` against peft's own `merge_and_unload()` and against mergekit 0.1.5.

The adapters are made by peft itself (peft_driver.py, in the mergekit venv: our venv has no
peft), one per LoraConfig option we apply, with random values in every adapter parameter, and
saved with `save_pretrained`; peft then loads each saved adapter onto a fresh base and merges it.
Our model-with-adapter must read the same tensors (float32: relative error <= 1e-5 per tensor)
and change exactly the tensors peft's merge changes. The mergekit cases run recipes naming
`MODEL+ADAPTER` (as base, as a model, in slices) through mergekit-yaml with a LoRA merge cache,
which merges each adapter with peft into a copy on disk first; ours applies it on read.

fan_in_fan_out is tested on GPT-2, whose Conv1D layers store weights as (in, out): on a Llama,
peft turns fan_in_fan_out off for every nn.Linear (with a warning) and saves it off, so there
it changes nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file

from mergesmith.config import ModelRef
from mergesmith.sources import open_model
from mergesmith.toymodels import ToyShape, make_family
from tests.conformance.harness import (
    MERGEKIT_ARGS,
    MergekitBatch,
    assert_matches_mergekit,
    assert_tensors_match,
    load_folder,
    run_ours,
)

pytestmark = pytest.mark.conformance

DRIVER = Path(__file__).with_name("peft_driver.py")
PEFT_TIMEOUT_S = 10 * 60
LLAMA_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
GPT2_LINEAR = ["c_attn", "c_proj", "c_fc"]

# One adapter per option (LoraConfig keyword arguments), on a float32 toy Llama unless `arch`
# or `dtype` says otherwise.
PEFT_CASES: dict[str, dict[str, Any]] = {
    "plain": {"lora": {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_LINEAR}},
    "plain_bin": {
        "lora": {"r": 2, "lora_alpha": 16, "target_modules": ["q_proj", "down_proj"]},
        "safetensors": False,
    },
    "rslora": {
        "lora": {"r": 4, "lora_alpha": 16, "use_rslora": True, "target_modules": LLAMA_LINEAR}
    },
    # Regex keys matched at the end of the module name; the first matching key wins.
    "rank_alpha_patterns": {
        "lora": {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": LLAMA_LINEAR,
            "rank_pattern": {"q_proj": 2, "layers.1.mlp.down_proj": 6},
            "alpha_pattern": {"v_proj": 32, "^model.layers.3.self_attn.o_proj": 3},
        }
    },
    # "norm" matches every RMSNorm (peft matches module names by suffix): all are replaced.
    "modules_to_save": {
        "lora": {
            "r": 4,
            "lora_alpha": 8,
            "target_modules": ["q_proj", "v_proj"],
            "modules_to_save": ["lm_head", "norm"],
        }
    },
    # An embedding LoRA (lora_embedding_A/B); peft also saves the embeddings themselves.
    "embedding": {
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": ["embed_tokens", "q_proj", "lm_head"]}
    },
    # DoRA on Linear layers (norms per row) and on the embedding (norms per column).
    "dora": {
        "lora": {
            "r": 4,
            "lora_alpha": 8,
            "use_dora": True,
            "target_modules": ["embed_tokens", *LLAMA_LINEAR],
        }
    },
    "gpt2_fan_in_fan_out": {
        "arch": "gpt2",
        "lora": {"r": 4, "lora_alpha": 8, "fan_in_fan_out": True, "target_modules": GPT2_LINEAR},
    },
    # DoRA on Conv1D: norms per column of the stored (in, out) weight.
    "gpt2_dora": {
        "arch": "gpt2",
        "lora": {
            "r": 4,
            "lora_alpha": 8,
            "fan_in_fan_out": True,
            "use_dora": True,
            "target_modules": GPT2_LINEAR,
        },
    },
    # peft merges a bf16 model in bf16 (the delta rounded, then added); we round the float32
    # sum once, so the two agree to bf16 rounding, not to 1e-5.
    "bf16": {
        "dtype": "bfloat16",
        "lora": {"r": 4, "lora_alpha": 8, "target_modules": LLAMA_LINEAR},
    },
}


@dataclass(frozen=True)
class PeftCase:
    base: Path
    adapter: Path
    merged: Path  # peft's merge_and_unload() state dict

    @property
    def ref(self) -> str:
        return f"{self.base}+{self.adapter}"


def run_peft_driver(venv: Path, jobs: list[dict[str, Any]], work: Path) -> None:
    jobs_path = work / "peft-jobs.json"
    jobs_path.write_text(json.dumps(jobs, indent=1), encoding="utf-8")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    env["TRANSFORMERS_VERBOSITY"] = "error"
    done = subprocess.run(
        [str(venv / "bin" / "python"), str(DRIVER), str(jobs_path)],
        capture_output=True,
        text=True,
        timeout=PEFT_TIMEOUT_S,
        env=env,
        check=False,
    )
    if done.returncode != 0:
        pytest.fail(f"peft driver exited with {done.returncode}:\n{done.stderr[-4000:]}")


@pytest.fixture(scope="module")
def families(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[Path, list[Path]]]:
    """A float32 toy Llama with three fine-tunes (the mergekit cases merge them too), and a
    bf16 one."""
    root = tmp_path_factory.mktemp("lora-toys")
    return {
        "float32": make_family(root / "f32", 3, ToyShape()),
        "bfloat16": make_family(root / "bf16", 0, ToyShape(), dtype=torch.bfloat16),
    }


@pytest.fixture(scope="module")
def peft_cases(
    mergekit_venv: Path,
    families: dict[str, tuple[Path, list[Path]]],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, PeftCase]:
    """Every PEFT_CASES adapter, made and merged by peft in one driver run."""
    work = tmp_path_factory.mktemp("peft")
    cases, jobs = {}, []
    for i, (case, spec) in enumerate(PEFT_CASES.items(), start=1):
        arch = spec.get("arch", "llama")
        dtype = spec.get("dtype", "float32")
        base = work / "gpt2" if arch == "gpt2" else families[dtype][0]
        cases[case] = PeftCase(base, work / f"adapter-{case}", work / f"merged-{case}.safetensors")
        lora = {"task_type": "CAUSAL_LM", **spec["lora"]}
        jobs.append(
            {
                "id": case,
                "arch": arch,
                "base": str(base),
                "adapter": str(cases[case].adapter),
                "merged": str(cases[case].merged),
                "seed": i,
                "dtype": dtype,
                "lora": lora,
                "safetensors": spec.get("safetensors", True),
            }
        )
    run_peft_driver(mergekit_venv, jobs, work)
    return cases


def read_all(ref_text: str) -> dict[str, torch.Tensor]:
    """Every tensor of a model reference as mergesmith's source reads it."""
    ref = ModelRef.parse(ref_text)
    source = open_model(ref.text, ref.path, ref.revision, ref.adapter, ref.adapter_revision)
    try:
        return {name: source.read(name).clone() for name in source.tensors}
    finally:
        source.close()


@pytest.mark.parametrize("case", list(PEFT_CASES))
def test_model_plus_adapter_reads_what_peft_merge_and_unload_gives(
    case: str, peft_cases: dict[str, PeftCase]
) -> None:
    """Per tensor: relative error <= 1e-5 in float32 (bf16: one rounding apart), the model's
    dtypes, and exactly the tensors peft's merge changed are changed."""
    spec = peft_cases[case]
    ours = read_all(spec.ref)
    base = read_all(str(spec.base))
    merged = load_file(spec.merged)
    # peft's state dict also holds GPT-2's tied lm_head, which the checkpoint does not.
    expected = {name: merged[name] for name in base}
    rel = 1e-5 if PEFT_CASES[case].get("dtype", "float32") == "float32" else 2**-7
    assert_tensors_match(ours, expected, rel=rel)
    changed_by_peft = {n for n in base if not torch.equal(expected[n], base[n])}
    changed_by_us = {n for n in base if not torch.equal(ours[n], base[n])}
    assert changed_by_peft, "the adapter changes nothing: the case tests nothing"
    assert changed_by_us == changed_by_peft


LINEAR_ONE = "merge_method: linear\ndtype: float32\nmodels:\n  - model: {ref}\n    parameters:\n"
PASSTHROUGH_ONE = "merge_method: passthrough\nmodels:\n  - model: {ref}\n"
CLI_CASES = {
    "dora": LINEAR_ONE + "      weight: 1.0\n",
    "gpt2_dora": PASSTHROUGH_ONE,
    "modules_to_save": PASSTHROUGH_ONE,
}


@pytest.mark.parametrize("case", list(CLI_CASES))
def test_a_merge_of_model_plus_adapter_writes_peft_merged_model(
    case: str, peft_cases: dict[str, PeftCase], tmp_path: Path
) -> None:
    """Through the CLI (linear with weight 1, passthrough): the output holds peft's merged
    tensors."""
    spec = peft_cases[case]
    path = tmp_path / "recipe.yml"
    path.write_text(CLI_CASES[case].format(ref=spec.ref), encoding="utf-8")
    ours = load_folder(run_ours(path, tmp_path / "out"))
    merged = load_file(spec.merged)
    assert_tensors_match(ours, {name: merged[name] for name in ours})
    assert ours.keys() <= merged.keys()


# -- against mergekit 0.1.5 ---------------------------------------------------------------------

RECIPES: dict[str, str] = {
    "linear_model_plus_adapter": """\
merge_method: linear
models:
  - model: $base+$lora_plain
    parameters: {weight: 0.6}
  - model: $ft1
    parameters: {weight: 0.4}
dtype: float32
""",
    # An adapted base with modules_to_save (the norms and lm_head replaced).
    "ties_adapted_base": """\
merge_method: ties
base_model: $base+$lora_modules_to_save
models:
  - model: $ft1
    parameters: {weight: 0.5, density: 0.5}
  - model: $ft2
    parameters: {weight: 0.7, density: 0.6}
dtype: float32
""",
    "task_arithmetic_dora_and_rslora": """\
merge_method: task_arithmetic
base_model: $base
models:
  - model: $base+$lora_dora
    parameters: {weight: 1.0}
  - model: $ft1+$lora_rslora
    parameters: {weight: 0.5}
dtype: float32
""",
    "passthrough_slices_with_adapters": """\
merge_method: passthrough
slices:
  - sources:
      - model: $base+$lora_rank_alpha_patterns
        layer_range: [0, 2]
  - sources:
      - model: $ft2+$lora_embedding
        layer_range: [2, 4]
dtype: float32
""",
    "slerp_embedding_adapter": """\
merge_method: slerp
base_model: $base
models:
  - model: $base
  - model: $base+$lora_embedding
parameters:
  t: 0.3
dtype: float32
""",
}


@pytest.fixture(scope="module")
def toy_models(
    families: dict[str, tuple[Path, list[Path]]], peft_cases: dict[str, PeftCase]
) -> dict[str, str]:
    """Overrides conftest's: the float32 family and the peft-made adapters for its base."""
    base, tuned = families["float32"]
    paths = {"base": str(base)} | {f"ft{i}": str(p) for i, p in enumerate(tuned, start=1)}
    for case, spec in peft_cases.items():
        if spec.base == base:
            paths[f"lora_{case}"] = str(spec.adapter)
    return paths


@pytest.fixture(scope="module")
def reference(
    request: pytest.FixtureRequest,
    mergekit_venv: Path,
    recipes: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MergekitBatch]:
    """Overrides conftest's to give mergekit a LoRA merge cache: without one it refuses every
    `+ADAPTER`."""
    wanted = {
        item.callspec.params["case"]
        for item in request.session.items
        if getattr(item, "module", None) is request.module
        and hasattr(item, "callspec")
        and "case" in item.callspec.params
    }
    selected = {case: path for case, path in recipes.items() if case in wanted}
    work = tmp_path_factory.mktemp("mergekit-lora")
    args = [*MERGEKIT_ARGS, "--lora-merge-cache", str(work / "lora-cache")]
    batch = MergekitBatch(mergekit_venv, selected, work, args=args)
    yield batch
    batch.close()


@pytest.mark.parametrize("case", list(RECIPES))
def test_matches_mergekit(
    case: str,
    recipes: dict[str, Path],
    reference: MergekitBatch,
    toy_models: dict[str, str],
    tmp_path: Path,
) -> None:
    """Same tensor names, shapes, dtypes and values (to 1e-5 relative) as mergekit-yaml with
    --lora-merge-cache, same layer count, and not a copy of an input."""
    assert_matches_mergekit(case, recipes[case], reference, toy_models, tmp_path / "o")
