"""A pipeline (several named YAML documents) against mergekit 0.1.5's `mergekit-multi`, and a
stage read with a LoRA adapter (`STAGE+ADAPTER`) against peft's merge of that adapter into the
stage's output."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergesmith import merge
from tests.conformance.harness import assert_tensors_match, load_folder
from tests.conformance.test_conformance_lora import LLAMA_LINEAR, run_peft_driver
from tests.conftest import write_recipe
from tests.test_pipeline import pipeline

pytestmark = pytest.mark.conformance


def run_mergekit_multi(venv: Path, recipe: Path, out: Path, work: Path) -> None:
    """mergekit-multi, with a LoRA merge cache (without one it refuses every `+ADAPTER`)."""
    subprocess.run(
        [
            str(venv / "bin" / "mergekit-multi"),
            str(recipe),
            "--out-path",
            str(out),
            "-I",
            str(work / "intermediate"),
            "--random-seed",
            "0",
            "--lora-merge-cache",
            str(work / "lora-cache"),
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )


def test_pipeline_matches_mergekit_multi(family, tmp_path: Path, mergekit_venv: Path):
    base, tuned = family
    recipe = write_recipe(tmp_path, pipeline(base, tuned))
    theirs = tmp_path / "theirs"
    run_mergekit_multi(mergekit_venv, recipe, theirs, tmp_path)
    ours = tmp_path / "ours"
    merge(recipe, ours)
    assert_tensors_match(load_folder(ours), load_folder(theirs))


def test_a_stage_with_an_adapter_matches_peft_and_mergekit_multi(
    family, tmp_path: Path, mergekit_venv: Path
):
    """The final stage reads `soup+ADAPTER`: expected, base + 0.8 (peft's merge_and_unload()
    of the adapter into soup's output - base), soup's output made by the stage's own recipe
    alone; and mergekit-multi's output for the same pipeline."""
    base, tuned = family
    soup = tmp_path / "soup"
    merge(write_recipe(tmp_path, pipeline(base, tuned).split("---\n")[1], "soup.yml"), soup)
    adapter, merged = tmp_path / "adapter", tmp_path / "merged.safetensors"
    job = {
        "id": "stage",
        "arch": "llama",
        "base": str(soup),
        "adapter": str(adapter),
        "merged": str(merged),
        "seed": 7,
        "dtype": "float32",
        "lora": {"task_type": "CAUSAL_LM", "r": 4, "lora_alpha": 8, "target_modules": LLAMA_LINEAR},
        "safetensors": True,
    }
    run_peft_driver(mergekit_venv, [job], tmp_path)
    text = pipeline(base, tuned).replace("- model: soup", f"- model: soup+{adapter}")
    recipe = write_recipe(tmp_path, text, "adapted.yml")
    ours = load_folder(merge(recipe, tmp_path / "ours").out_dir)
    b, peft_merged = load_folder(base), load_file(merged)
    expected = {
        name: (b[name].double() + 0.8 * (peft_merged[name].double() - b[name].double())).float()
        for name in b
    }
    assert_tensors_match(ours, expected)
    stage = load_folder(soup)
    changed = [n for n in b if not torch.equal(peft_merged[n], stage[n])]
    assert len(changed) == 7 * 4, "the adapter should change every linear layer of soup"
    theirs = tmp_path / "theirs"
    run_mergekit_multi(mergekit_venv, recipe, theirs, tmp_path)
    assert_tensors_match(ours, load_folder(theirs))
