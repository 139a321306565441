"""The language-model merge benchmark, fast: a tiny Llama, one seed, two merges through the CLI.

examples/quality_lm/run_quality_lm.py pre-trains a byte-level `LlamaForCausalLM` on a mix of
text domains found on the machine, fine-tunes one expert per domain, saves every model as a
bf16 Hugging Face folder, merges with `python -m mergesmith run` and evaluates each folder after
loading it with transformers. Here the same code runs at a size that takes seconds; what it
asserts could fail: an expert that does not beat the base on its own domain means fine-tuning or
saving is broken, and no merge beating the base on average means merging is.
"""

from __future__ import annotations

import importlib.util
import json
import sys
import time
from pathlib import Path
from types import ModuleType

import pytest
import torch

SCRIPT = Path(__file__).resolve().parents[1] / "examples" / "quality_lm" / "run_quality_lm.py"
DOMAINS = ["python", "c", "prose"]


def _load_benchmark() -> ModuleType:
    spec = importlib.util.spec_from_file_location("run_quality_lm", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    # dataclasses look the module up by name while building the classes.
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def bench() -> ModuleType:
    return _load_benchmark()


@pytest.fixture(scope="module")
def quick(bench: ModuleType, tmp_path_factory: pytest.TempPathFactory):
    config = bench.LMConfig(
        hidden_size=32,
        layers=1,
        heads=2,
        intermediate_size=64,
        context=64,
        batch_size=8,
        base_steps=60,
        expert_steps=30,
        # Far above the full run's rate, so that 30 steps make experts clearly better at home.
        expert_lr=1e-3,
        warmup=5,
        train_bytes=200_000,
        held_out_bytes=16_384,
        val_windows=8,
        test_windows=24,
    )
    work = tmp_path_factory.mktemp("quality_lm")
    started = time.perf_counter()
    result = bench.run_quality(
        [0],
        quick=True,
        config=config,
        domains=DOMAINS,
        work_dir=work,
        out_dir=work / "results",
        tie_densities=[0.5],
        threads=1,
        log=lambda _: None,
    )
    print(f"\n{bench.table(result)}\nquick LM run: {time.perf_counter() - started:.1f} s")
    return result, work


@pytest.mark.slow
def test_each_expert_beats_the_base_on_its_own_domain(quick) -> None:
    result, _ = quick
    seed = result.per_seed[0]
    for domain in DOMAINS:
        base, expert = seed.base.test[domain], seed.experts[domain].test[domain]
        assert expert < base - 0.01, f"{domain}: expert NLL {expert:.4f}, base {base:.4f}"


@pytest.mark.slow
def test_a_merge_beats_the_base_on_average(quick) -> None:
    result, _ = quick
    seed = result.per_seed[0]
    best = min(seed.methods, key=lambda label: seed.methods[label].test_mean)
    assert seed.methods[best].test_mean < seed.base.test_mean, (
        f"best merge {best}: {seed.methods[best].test_mean:.4f}, base {seed.base.test_mean:.4f}"
    )


@pytest.mark.slow
def test_models_are_bf16_hugging_face_folders_with_a_byte_tokenizer(quick) -> None:
    from safetensors import safe_open
    from transformers import AutoTokenizer

    _, work = quick
    folders = [work / "seed0" / "base", work / "seed0" / "expert_c", work / "seed0" / "merged"]
    folders[-1] = next(p for p in folders[-1].iterdir() if p.is_dir())
    for folder in folders:
        config = json.loads((folder / "config.json").read_text())
        assert config["architectures"] == ["LlamaForCausalLM"], folder
        with safe_open(folder / "model.safetensors", "pt") as f:
            dtypes = {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118
            assert dtypes == {"BF16"}, folder
        tokenizer = AutoTokenizer.from_pretrained(folder)
        text = "int main(void) { return 0; } /* ünïcode */"
        assert tokenizer(text)["input_ids"] == list(text.encode("utf-8"))


@pytest.mark.slow
def test_report_files_are_written(quick) -> None:
    result, work = quick
    out = work / "results"
    assert (out / "latest.png").stat().st_size > 0
    assert (out / "ties_rows.png").stat().st_size > 0
    stored = json.loads((out / "latest.json").read_text())
    assert stored["domains"] == DOMAINS
    assert "| ties |" in (out / "latest.md").read_text()
    assert torch.isfinite(torch.tensor(result.test_nll("ties"))).all()
