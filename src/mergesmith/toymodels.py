"""Tiny Llama-shaped checkpoints written as real Hugging Face folders.

Used by `make demo`, the tests and the conformance suite: no hub is reachable here, so we build
a base model and fine-tunes of it ourselves. The files are exactly what a user downloads:
safetensors (single or sharded with an index) or pytorch_model.bin, config.json, a tokenizer.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch

WORDS = (
    "the a merge model weight layer task vector sign trim elect base tune data token "
    "small large fast slow good bad yes no one two three four five six seven eight nine ten"
).split()


@dataclass(frozen=True)
class ToyShape:
    hidden: int = 32
    layers: int = 4
    intermediate: int = 64
    vocab: int = 128
    heads: int = 4
    kv_heads: int = 2


def llama_names_and_shapes(shape: ToyShape) -> list[tuple[str, tuple[int, ...]]]:
    head_dim = shape.hidden // shape.heads
    kv = shape.kv_heads * head_dim
    out = [("model.embed_tokens.weight", (shape.vocab, shape.hidden))]
    for i in range(shape.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "input_layernorm.weight", (shape.hidden,)),
            (p + "self_attn.q_proj.weight", (shape.hidden, shape.hidden)),
            (p + "self_attn.k_proj.weight", (kv, shape.hidden)),
            (p + "self_attn.v_proj.weight", (kv, shape.hidden)),
            (p + "self_attn.o_proj.weight", (shape.hidden, shape.hidden)),
            (p + "post_attention_layernorm.weight", (shape.hidden,)),
            (p + "mlp.gate_proj.weight", (shape.intermediate, shape.hidden)),
            (p + "mlp.up_proj.weight", (shape.intermediate, shape.hidden)),
            (p + "mlp.down_proj.weight", (shape.hidden, shape.intermediate)),
        ]
    out += [("model.norm.weight", (shape.hidden,)), ("lm_head.weight", (shape.vocab, shape.hidden))]
    return out


def base_tensors(shape: ToyShape, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, dims in llama_names_and_shapes(shape):
        if name.endswith("norm.weight"):
            tensors[name] = 1.0 + 0.05 * torch.randn(dims, generator=g)
        else:
            tensors[name] = 0.05 * torch.randn(dims, generator=g)
    return tensors


def finetune_tensors(
    base: dict[str, torch.Tensor], seed: int, scale: float = 0.01
) -> dict[str, torch.Tensor]:
    """Base plus a heavy-tailed delta: most entries move a little, a few move a lot."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, tensor in base.items():
        small = torch.randn(tensor.shape, generator=g) * scale
        spikes = (torch.rand(tensor.shape, generator=g) < 0.05) * torch.randn(
            tensor.shape, generator=g
        )
        out[name] = tensor + small + spikes * (5 * scale)
    return out


def llama_config(shape: ToyShape, dtype: torch.dtype) -> dict:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": shape.hidden,
        "intermediate_size": shape.intermediate,
        "num_hidden_layers": shape.layers,
        "num_attention_heads": shape.heads,
        "num_key_value_heads": shape.kv_heads,
        "head_dim": shape.hidden // shape.heads,
        "vocab_size": shape.vocab,
        "max_position_embeddings": 128,
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": str(dtype).removeprefix("torch."),
    }


def write_tokenizer(folder: Path, vocab_size: int) -> None:
    """A word-level tokenizer in the `tokenizers` JSON format, loadable by AutoTokenizer."""
    specials = ["<unk>", "<s>", "</s>"]
    words = list(WORDS) + [f"w{i}" for i in range(vocab_size)]
    vocab = {tok: i for i, tok in enumerate((specials + words)[:vocab_size])}
    tokenizer = {
        "version": "1.0",
        "truncation": None,
        "padding": None,
        "added_tokens": [
            {
                "id": i,
                "content": t,
                "single_word": False,
                "lstrip": False,
                "rstrip": False,
                "normalized": False,
                "special": True,
            }
            for i, t in enumerate(specials)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "Whitespace"},
        "post_processor": None,
        "decoder": None,
        "model": {"type": "WordLevel", "vocab": vocab, "unk_token": "<unk>"},
    }
    (folder / "tokenizer.json").write_text(json.dumps(tokenizer), encoding="utf-8")
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "unk_token": "<unk>",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "model_max_length": 128,
    }
    (folder / "tokenizer_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    generation = {"bos_token_id": 1, "eos_token_id": 2}
    (folder / "generation_config.json").write_text(json.dumps(generation), encoding="utf-8")


def save_model(
    folder: Path,
    tensors: dict[str, torch.Tensor],
    config: dict | None,
    *,
    fmt: str = "safetensors",
    dtype: torch.dtype = torch.float32,
    shards: int = 1,
    tokenizer_vocab: int | None = None,
) -> Path:
    """Write a model folder. fmt: 'safetensors' (sharded when shards > 1) or 'bin'."""
    from safetensors.torch import save_file

    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.to(dtype).contiguous() for k, v in tensors.items()}
    if config is not None:
        config = {**config, "torch_dtype": str(dtype).removeprefix("torch.")}
        (folder / "config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    if tokenizer_vocab:
        write_tokenizer(folder, tokenizer_vocab)
    names = list(tensors)
    if fmt == "bin":
        torch.save(tensors, folder / "pytorch_model.bin")
        return folder
    if shards <= 1:
        save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
        return folder
    per = -(-len(names) // shards)
    weight_map = {}
    for i in range(shards):
        part = names[i * per : (i + 1) * per]
        file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, folder / file, metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    return folder


def make_family(
    root: Path,
    n_finetunes: int = 3,
    shape: ToyShape | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    fmt: str = "safetensors",
    shards: int = 1,
    seed: int = 0,
) -> tuple[Path, list[Path]]:
    """A base model and `n_finetunes` fine-tunes of it under `root`; returns their folders."""
    shape = shape or ToyShape()
    base = base_tensors(shape, seed)
    config = llama_config(shape, dtype)
    base_dir = save_model(
        root / "base",
        base,
        config,
        fmt=fmt,
        dtype=dtype,
        shards=shards,
        tokenizer_vocab=shape.vocab,
    )
    tuned = []
    for i in range(n_finetunes):
        tensors = finetune_tensors(base, seed * 1000 + i + 1)
        tuned.append(
            save_model(
                root / f"finetune{i + 1}",
                tensors,
                config,
                fmt=fmt,
                dtype=dtype,
                shards=shards,
                tokenizer_vocab=shape.vocab,
            )
        )
    return base_dir, tuned
