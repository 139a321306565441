"""mergekit's `modules:` form: one module (a single-tower model's `default`) is the recipe's
models or slices, with the module's parameters between the slices' and the top level's; a
model of several towers (a text decoder, a vision tower, a projector) merges each module with
its own models or slices."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergesmith import merge
from mergesmith.api import prepare
from mergesmith.errors import MergeError, MergeErrors
from tests.conftest import run_cli, write_recipe

# -- tiny multimodal checkpoints -------------------------------------------------------------

HIDDEN, VOCAB, TEXT_LAYERS, VISION_LAYERS = 8, 32, 3, 2


@dataclass(frozen=True)
class Towers:
    """A multimodal architecture: config.json and each tower's tensor names ({i}: a layer),
    as its checkpoints on the hub have them."""

    config: dict[str, Any]
    text: tuple[str, ...]
    vision: tuple[str, ...]
    projector: tuple[str, ...]


def _weights(prefix: str, *parts: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{part}.weight" for part in parts)


def _with_bias(prefix: str, *parts: str) -> tuple[str, ...]:
    return tuple(f"{prefix}{part}.{kind}" for part in parts for kind in ("weight", "bias"))


_TEXT_CONFIG = {
    "hidden_size": HIDDEN,
    "intermediate_size": 16,
    "num_hidden_layers": TEXT_LAYERS,
    "num_attention_heads": 2,
    "num_key_value_heads": 1,
    "head_dim": 4,
    "vocab_size": VOCAB,
}
_VISION_CONFIG = {
    "hidden_size": HIDDEN,
    "intermediate_size": 16,
    "num_hidden_layers": VISION_LAYERS,
    "num_attention_heads": 2,
    "patch_size": 2,
    "image_size": 8,
}
_ATTENTION = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
_MLP_PARTS = ("up_proj", "gate_proj", "down_proj")
_MLP = tuple(f"mlp.{part}" for part in _MLP_PARTS)

TOWERS: dict[str, Towers] = {
    "mistral3": Towers(
        {
            "architectures": ["Mistral3ForConditionalGeneration"],
            "model_type": "mistral3",
            "text_config": {"model_type": "mistral", **_TEXT_CONFIG},
            "vision_config": {"model_type": "pixtral", "head_dim": 4, **_VISION_CONFIG},
        },
        (
            "language_model.model.embed_tokens.weight",
            *_weights(
                "language_model.model.layers.{i}.",
                "input_layernorm",
                *_ATTENTION,
                "post_attention_layernorm",
                *_MLP,
            ),
            "language_model.model.norm.weight",
            "language_model.lm_head.weight",
        ),
        (
            *_weights("vision_tower.", "patch_conv", "ln_pre"),
            *_weights(
                "vision_tower.transformer.layers.{i}.",
                "attention_norm",
                "attention.q_proj",
                "attention.k_proj",
                "attention.v_proj",
                "attention.o_proj",
                "ffn_norm",
                "feed_forward.gate_proj",
                "feed_forward.up_proj",
                "feed_forward.down_proj",
            ),
        ),
        _weights(
            "multi_modal_projector.", "norm", "patch_merger.merging_layer", "linear_1", "linear_2"
        ),
    ),
    # Tied embeddings: no lm_head.
    "gemma3": Towers(
        {
            "architectures": ["Gemma3ForConditionalGeneration"],
            "model_type": "gemma3",
            "text_config": {"model_type": "gemma3_text", **_TEXT_CONFIG},
            "vision_config": {"model_type": "siglip_vision_model", **_VISION_CONFIG},
        },
        (
            "language_model.model.embed_tokens.weight",
            *_weights(
                "language_model.model.layers.{i}.",
                "input_layernorm",
                *_ATTENTION,
                "self_attn.q_norm",
                "self_attn.k_norm",
                "post_attention_layernorm",
                "pre_feedforward_layernorm",
                *_MLP,
                "post_feedforward_layernorm",
            ),
            "language_model.model.norm.weight",
        ),
        (
            *_with_bias("vision_tower.vision_model.embeddings.", "patch_embedding"),
            "vision_tower.vision_model.embeddings.position_embedding.weight",
            *_with_bias(
                "vision_tower.vision_model.encoder.layers.{i}.",
                "layer_norm1",
                "layer_norm2",
                "mlp.fc1",
                "mlp.fc2",
                "self_attn.q_proj",
                "self_attn.k_proj",
                "self_attn.v_proj",
                "self_attn.out_proj",
            ),
            *_with_bias("vision_tower.vision_model.", "post_layernorm"),
        ),
        (
            "multi_modal_projector.mm_input_projection_weight",
            *_weights("multi_modal_projector.", "mm_soft_emb_norm"),
        ),
    ),
    # No prefixes: the projector lies inside the vision tower's `visual.`.
    "qwen2_5_vl": Towers(
        {
            "architectures": ["Qwen2_5_VLForConditionalGeneration"],
            "model_type": "qwen2_5_vl",
            "text_config": {"model_type": "qwen2_5_vl_text", **_TEXT_CONFIG},
            "vision_config": {"depth": VISION_LAYERS, "hidden_size": HIDDEN, "num_heads": 2},
        },
        (
            "model.embed_tokens.weight",
            *_weights("model.layers.{i}.", "input_layernorm", "post_attention_layernorm", *_MLP),
            *_with_bias("model.layers.{i}.", "self_attn.q_proj", "self_attn.k_proj"),
            *_with_bias("model.layers.{i}.", "self_attn.v_proj"),
            "model.layers.{i}.self_attn.o_proj.weight",
            "model.norm.weight",
            "lm_head.weight",
        ),
        (
            "visual.patch_embed.proj.weight",
            *_weights("visual.blocks.{i}.", "norm1", "norm2"),
            *_with_bias(
                "visual.blocks.{i}.", "attn.qkv", "attn.proj", *(f"mlp.{m}" for m in _MLP_PARTS)
            ),
        ),
        ("visual.merger.ln_q.weight", *_with_bias("visual.merger.", "mlp.0", "mlp.2")),
    ),
}


def _shape(name: str) -> tuple[int, ...]:
    if "embed_tokens" in name or "lm_head" in name:
        return (VOCAB, HIDDEN)
    if name.endswith(".bias") or "norm" in name or "ln_" in name:
        return (HIDDEN,)
    return (HIDDEN, HIDDEN)


def tower_names(towers: Towers) -> dict[str, list[str]]:
    """Each tower's tensor names, layers spelled out."""

    def spell(templates: tuple[str, ...], layers: int) -> list[str]:
        out = [t for t in templates if "{i}" not in t]
        out += [t.format(i=i) for i in range(layers) for t in templates if "{i}" in t]
        return out

    return {
        "text": spell(towers.text, TEXT_LAYERS),
        "vision": spell(towers.vision, VISION_LAYERS),
        "projector": spell(towers.projector, 0),
    }


def make_towers(root: Path, kind: str, n_tuned: int = 2) -> tuple[Path, list[Path]]:
    """A float32 base of architecture `kind` and fine-tunes of it, each a folder with
    config.json and model.safetensors."""
    towers = TOWERS[kind]
    names = [n for group in tower_names(towers).values() for n in group]
    g = torch.Generator().manual_seed(len(kind))
    base = {n: 0.1 * torch.randn(_shape(n), generator=g) for n in names}
    folders = []
    for k in range(n_tuned + 1):
        tensors = (
            base
            if k == 0
            else {n: t + 0.02 * torch.randn(t.shape, generator=g) for n, t in base.items()}
        )
        folder = root / kind / ("base" if k == 0 else f"ft{k}")
        folder.mkdir(parents=True)
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        config = {**towers.config, "torch_dtype": "float32"}
        (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
        folders.append(folder)
    return folders[0], folders[1:]


@pytest.fixture(scope="module")
def mistral3(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    return make_towers(tmp_path_factory.mktemp("towers"), "mistral3")


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


def test_several_modules_of_a_single_tower_model_are_refused_naming_them(family, tmp_path: Path):
    _base, tuned = family
    text = f"""merge_method: linear
modules:
  text_decoder:
    models: [{{model: {tuned[0]}, parameters: {{weight: 1}}}}]
  vision_tower:
    models: [{{model: {tuned[1]}, parameters: {{weight: 1}}}}]
"""
    done = run_cli("validate", write_recipe(tmp_path, text))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "recipe.yml:2: 2 modules (text_decoder, vision_tower)" in done.stderr
    assert "is a LlamaForCausalLM" in done.stderr


def test_each_module_merges_its_own_tensors_with_its_own_weights(mistral3, tmp_path: Path):
    """Hand-worked: the text decoder 0.25/0.75, the vision tower 0.9/0.1 (module parameters
    under a top-level 5.0); the projector, not in the recipe, is not written, and a warning
    says so."""
    _base, tuned = mistral3
    text = f"""merge_method: linear
modules:
  text_decoder:
    models:
      - model: {tuned[0]}
        parameters: {{weight: 0.25}}
      - model: {tuned[1]}
        parameters: {{weight: 0.75}}
  vision_tower:
    models:
      - model: {tuned[0]}
      - model: {tuned[1]}
        parameters: {{weight: 0.1}}
    parameters: {{weight: 0.9}}
parameters: {{weight: 5.0, normalize: false}}
dtype: float32
"""
    recipe = write_recipe(tmp_path, text)
    done = run_cli("validate", recipe)
    assert done.returncode == 0, done.stderr
    assert "module 'multi_modal_projector' is not in the recipe, so its 4 tensor(s)" in done.stderr
    out = tmp_path / "out"
    merge(recipe, out)
    got = load_file(out / "model.safetensors")
    x, y = (load_file(t / "model.safetensors") for t in tuned)
    names = tower_names(TOWERS["mistral3"])
    assert sorted(got) == sorted(names["text"] + names["vision"])
    for name in names["text"]:
        torch.testing.assert_close(got[name], 0.25 * x[name] + 0.75 * y[name])
    for name in names["vision"]:
        torch.testing.assert_close(got[name], 0.9 * x[name] + 0.1 * y[name])
    config = json.loads((out / "config.json").read_text(encoding="utf-8"))
    assert config["text_config"]["num_hidden_layers"] == TEXT_LAYERS


def test_a_module_the_architecture_lacks_is_named_with_the_closest(mistral3, tmp_path: Path):
    _base, tuned = mistral3
    text = f"""merge_method: linear
modules:
  text_decoder:
    models: [{{model: {tuned[0]}, parameters: {{weight: 1}}}}]
  vision_towers:
    models: [{{model: {tuned[1]}, parameters: {{weight: 1}}}}]
"""
    done = run_cli("validate", write_recipe(tmp_path, text))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "recipe.yml:5: Mistral3ForConditionalGeneration has no module 'vision_towers'" in (
        done.stderr
    )
    assert "did you mean 'vision_tower'?" in done.stderr


def test_a_module_whose_slices_change_its_layer_count_is_refused(mistral3, tmp_path: Path):
    """mergekit writes the new count into text_config.num_hidden_layers; the output config here
    is the base's as it stands, so a changed count is refused before any weight is read."""
    _base, tuned = mistral3
    text = f"""merge_method: passthrough
modules:
  text_decoder:
    slices:
      - sources: [{{model: {tuned[0]}, layer_range: [0, 3]}}]
      - sources: [{{model: {tuned[1]}, layer_range: [2, 3]}}]
  vision_tower:
    models: [{{model: {tuned[0]}}}]
"""
    done = run_cli("run", write_recipe(tmp_path, text), tmp_path / "out")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "module 'text_decoder' would have 4 layers where" in done.stderr
    assert not (tmp_path / "out").exists()


def test_plain_slices_of_a_multimodal_model_are_refused(mistral3, tmp_path: Path):
    """As mergekit refuses them: a layer range would take layer i of every tower at once."""
    _base, tuned = mistral3
    text = f"""merge_method: passthrough
slices:
  - sources: [{{model: {tuned[0]}, layer_range: [0, 2]}}]
"""
    done = run_cli("validate", write_recipe(tmp_path, text))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "recipe.yml:2: " in done.stderr
    assert "is a Mistral3ForConditionalGeneration" in done.stderr
    assert "slice each module under 'modules:" in done.stderr


def test_modules_of_models_of_two_architectures_are_refused(mistral3, tmp_path: Path):
    _base, tuned = mistral3
    gemma_base, _ = make_towers(tmp_path, "gemma3", n_tuned=0)
    text = f"""merge_method: linear
modules:
  text_decoder:
    models:
      - model: {tuned[0]}
        parameters: {{weight: 0.5}}
      - model: {gemma_base}
        parameters: {{weight: 0.5}}
  vision_tower:
    models: [{{model: {tuned[0]}, parameters: {{weight: 1}}}}]
"""
    with pytest.raises(MergeError) as info:
        prepare(write_recipe(tmp_path, text))
    found = messages(info.value)
    assert "recipe.yml:7" in found and "is a Gemma3ForConditionalGeneration" in found


def test_the_one_module_of_a_single_tower_model_is_default(family, tmp_path: Path):
    _base, tuned = family
    text = f"""merge_method: linear
modules:
  text_decoder:
    models: [{{model: {tuned[0]}, parameters: {{weight: 1}}}}]
"""
    done = run_cli("validate", write_recipe(tmp_path, text))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "recipe.yml:3: " in done.stderr and "whose one module is 'default'" in done.stderr


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
