"""The output folder: loadable by transformers, sharded or single, with its side files."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from mergesmith import merge
from mergesmith.toymodels import ToyShape, make_family
from tests.conftest import write_recipe


def seed_ties(base: Path, tuned: list[Path], dtype: str = "float16") -> str:
    return f"""
models:
  - model: {tuned[0]}
    parameters: {{density: [1, 0.7, 0.1], weight: 1.0}}
  - model: {tuned[1]}
    parameters: {{density: 0.5, weight: [0, 0.3, 0.7, 1]}}
  - model: {tuned[2]}
    parameters:
      density: 0.33
      weight: [{{filter: mlp, value: 0.5}}, {{value: 0}}]
merge_method: ties
base_model: {base}
parameters: {{normalize: true, int8_mask: true}}
dtype: {dtype}
"""


def load_all(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        tensors.update(load_file(file))
    return tensors


def test_transformers_loads_the_merge_and_gives_finite_logits(family, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    base, tuned = family
    out = tmp_path / "merged"
    merge(write_recipe(tmp_path, seed_ties(base, tuned)), out)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.dtype == torch.float16
    ids = AutoTokenizer.from_pretrained(out)("the merge model", return_tensors="pt").input_ids
    logits = model(ids).logits
    assert logits.shape == (1, 3, 128) and torch.isfinite(logits).all()
    # Every merged tensor made it into the model that transformers built.
    merged = load_all(out)
    state = model.state_dict()
    for name, tensor in merged.items():
        assert torch.equal(state[name], tensor), name


def test_small_shard_size_gives_an_index_and_loadable_shards(family, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base, tuned = family
    single, sharded = tmp_path / "single", tmp_path / "sharded"
    recipe = write_recipe(tmp_path, seed_ties(base, tuned, "float32"))
    merge(recipe, single)
    merge(recipe, sharded, shard_size="40KB")
    shards = sorted(p.name for p in sharded.glob("*.safetensors"))
    assert len(shards) > 2 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert not (single / "model.safetensors.index.json").exists()
    index = json.loads((sharded / "model.safetensors.index.json").read_text())
    got = load_all(sharded)
    assert set(index["weight_map"]) == set(got)
    assert index["metadata"]["total_size"] == sum(t.numel() * 4 for t in got.values())
    for name, file in index["weight_map"].items():
        with safe_open(sharded / file, "pt") as fh:
            assert name in fh.keys()  # noqa: SIM118 - safe_open has no __contains__
    expected = load_all(single)
    assert all(torch.equal(expected[n], got[n]) for n in expected)
    for file in sharded.glob("*.safetensors"):
        assert file.stat().st_size <= 40_000 + 4096  # shard limit plus its header
    AutoModelForCausalLM.from_pretrained(sharded)


def test_config_card_recipe_and_tokenizer_files(family, tmp_path: Path) -> None:
    base, tuned = family
    text = seed_ties(base, tuned, "bfloat16") + f"tokenizer_source: {tuned[1]}\n"
    recipe = write_recipe(tmp_path, text)
    out = tmp_path / "out"
    merge(recipe, out)
    config = json.loads((out / "config.json").read_text())
    assert config["torch_dtype"] == "bfloat16" and config["num_hidden_layers"] == 4
    assert (out / "mergesmith_config.yml").read_text() == text
    card = (out / "README.md").read_text()
    assert "ties" in card and "density: [1, 0.7, 0.1]" in card and str(base) in card
    # A tokenizer setting rebuilds the tokenizer (as mergekit does): same tokens, same ids.
    from transformers import AutoTokenizer

    assert AutoTokenizer.from_pretrained(out).get_vocab() == (
        AutoTokenizer.from_pretrained(tuned[1]).get_vocab()
    )
    assert (out / "generation_config.json").read_bytes() == (
        tuned[1] / "generation_config.json"
    ).read_bytes()
    assert all(t.dtype == torch.bfloat16 for t in load_all(out).values())


def test_without_a_tokenizer_setting_the_base_tokenizer_files_are_copied_as_they_are(
    family, tmp_path: Path
) -> None:
    base, tuned = family
    out = tmp_path / "out"
    merge(write_recipe(tmp_path, seed_ties(base, tuned, "float32")), out)
    for name in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        assert (out / name).read_bytes() == (base / name).read_bytes()


def test_slices_update_the_layer_count(family, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    base, tuned = family
    recipe = f"""
merge_method: passthrough
slices:
  - sources: [{{model: {base}, layer_range: [0, 3]}}]
  - sources: [{{model: {tuned[0]}, layer_range: [1, 4]}}]
"""
    out = tmp_path / "stacked"
    merge(write_recipe(tmp_path, recipe), out)
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 6
    merged = load_all(out)
    source = load_file(tuned[0] / "model.safetensors")
    name = "mlp.down_proj.weight"
    assert torch.equal(merged[f"model.layers.5.{name}"], source[f"model.layers.3.{name}"])
    model = AutoModelForCausalLM.from_pretrained(out)
    assert len(model.model.layers) == 6


@pytest.mark.parametrize(("fmt", "shards"), [("bin", 1), ("safetensors", 3)])
def test_bin_and_sharded_inputs_merge_to_the_same_bytes(
    family, tmp_path: Path, fmt: str, shards: int
) -> None:
    base, tuned = family
    other_base, other_tuned = make_family(
        tmp_path / fmt, 3, ToyShape(), dtype=torch.float32, fmt=fmt, shards=shards
    )
    reference, candidate = tmp_path / "ref", tmp_path / "cand"
    merge(write_recipe(tmp_path, seed_ties(base, tuned), "a.yml"), reference)
    merge(write_recipe(tmp_path, seed_ties(other_base, other_tuned), "b.yml"), candidate)
    assert (reference / "model.safetensors").read_bytes() == (
        candidate / "model.safetensors"
    ).read_bytes()
