"""Synthetic Llama-shaped checkpoints for the benchmark: a base model and fine-tunes of it.

Every tensor is a pure function of (spec, model name, tensor name), so models can be added
later (more fine-tunes for the scaling table) without touching the ones already on disk, and
two machines produce bit-identical inputs. Tensors are generated and streamed to disk one at
a time: peak memory is a few copies of the largest tensor (the embedding), not a model.

Usage: python bench/make_models.py OUT_DIR [--fine-tunes 3] [--layers 12]
       [--hidden 1024 --intermediate 2816 --heads 16 --kv-heads 16 --shard-mb 200]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import struct
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import BinaryIO

import torch

SPEC_FILE = "bench-spec.json"


@dataclass(frozen=True)
class ModelSpec:
    hidden: int = 1024
    layers: int = 12
    intermediate: int = 2816
    vocab: int = 32000
    heads: int = 16
    kv_heads: int = 16
    shard_bytes: int = 200_000_000
    init_std: float = 0.02
    # Fine-tune delta RMS relative to the base tensor's RMS.
    delta_scale: float = 0.01
    seed: int = 20240605
    # Bumped whenever the generation recipe changes, so stale caches are rebuilt.
    version: int = 1


def tensor_shapes(spec: ModelSpec) -> list[tuple[str, tuple[int, ...]]]:
    """Tensor names and shapes in the order Hugging Face writes a LlamaForCausalLM."""
    h, inter = spec.hidden, spec.intermediate
    kv = spec.kv_heads * (h // spec.heads)
    out: list[tuple[str, tuple[int, ...]]] = [("model.embed_tokens.weight", (spec.vocab, h))]
    for i in range(spec.layers):
        p = f"model.layers.{i}."
        out += [
            (p + "self_attn.q_proj.weight", (h, h)),
            (p + "self_attn.k_proj.weight", (kv, h)),
            (p + "self_attn.v_proj.weight", (kv, h)),
            (p + "self_attn.o_proj.weight", (h, h)),
            (p + "mlp.gate_proj.weight", (inter, h)),
            (p + "mlp.up_proj.weight", (inter, h)),
            (p + "mlp.down_proj.weight", (h, inter)),
            (p + "input_layernorm.weight", (h,)),
            (p + "post_attention_layernorm.weight", (h,)),
        ]
    out += [("model.norm.weight", (h,)), ("lm_head.weight", (spec.vocab, h))]
    return out


def param_count(spec: ModelSpec) -> int:
    total = 0
    for _, shape in tensor_shapes(spec):
        n = 1
        for d in shape:
            n *= d
        total += n
    return total


def config_json(spec: ModelSpec) -> dict[str, object]:
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "hidden_size": spec.hidden,
        "intermediate_size": spec.intermediate,
        "num_hidden_layers": spec.layers,
        "num_attention_heads": spec.heads,
        "num_key_value_heads": spec.kv_heads,
        "vocab_size": spec.vocab,
        "max_position_embeddings": 4096,
        "rms_norm_eps": 1e-5,
        "rope_theta": 10000.0,
        "hidden_act": "silu",
        "initializer_range": spec.init_std,
        "attention_bias": False,
        "mlp_bias": False,
        "tie_word_embeddings": False,
        "bos_token_id": 1,
        "eos_token_id": 2,
        "torch_dtype": "bfloat16",
        "use_cache": True,
    }


def write_tokenizer(model_dir: Path, vocab: int) -> None:
    """A word-level tokenizer.json covering the vocabulary, written as plain JSON.

    Real checkpoints ship one and both tools copy it; without it mergekit falls back to
    rebuilding a tokenizer through transformers, fails, and spends seconds on it.
    """
    special = ["<unk>", "<s>", "</s>"]
    tokens = special + [f"t{i}" for i in range(vocab - len(special))]
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
            for i, t in enumerate(special)
        ],
        "normalizer": None,
        "pre_tokenizer": {"type": "WhitespaceSplit"},
        "post_processor": None,
        "decoder": None,
        "model": {
            "type": "WordLevel",
            "vocab": {t: i for i, t in enumerate(tokens)},
            "unk_token": "<unk>",
        },
    }
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "model_max_length": 4096,
    }
    (model_dir / "tokenizer.json").write_text(json.dumps(tokenizer))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n")


def _generator(spec: ModelSpec, *parts: str) -> torch.Generator:
    # Python's hash() is salted per process; a cryptographic digest keeps seeds stable.
    digest = hashlib.blake2b(":".join((str(spec.seed), *parts)).encode(), digest_size=8)
    gen = torch.Generator()
    gen.manual_seed(int.from_bytes(digest.digest(), "little") & ((1 << 63) - 1))
    return gen


def base_tensor(spec: ModelSpec, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    gen = _generator(spec, "base", name)
    if len(shape) == 1:
        # RMSNorm gains sit around 1, so fine-tune deltas must be measured against ~1, not ~0.
        t = 1.0 + 0.1 * torch.randn(shape, generator=gen)
    else:
        t = spec.init_std * torch.randn(shape, generator=gen)
    return t.to(torch.bfloat16)


def fine_tune_tensor(
    spec: ModelSpec, model: str, name: str, base: torch.Tensor, base_rms: float
) -> torch.Tensor:
    shape = tuple(base.shape)
    # A direction shared by all fine-tunes plus an independent one: without the shared part
    # every TIES sign election would be a coin toss, which real fine-tunes of one base are not.
    shared = torch.randn(shape, generator=_generator(spec, "shared", name))
    gen = _generator(spec, model, name)
    own = torch.randn(shape, generator=gen)
    # Log-normal scale mixture: heavy tails, so magnitude pruning has outliers to keep.
    own *= torch.exp(0.75 * torch.randn(shape, generator=gen))
    if len(shape) == 2:
        # Some rows (neurons) move much more than others, as in real fine-tunes.
        own *= torch.exp(0.5 * torch.randn((shape[0], 1), generator=gen))
    delta = shared.mul_(0.6).add_(own, alpha=0.8)
    del own
    delta *= spec.delta_scale * base_rms / float(delta.square().mean().sqrt())
    return (base.float() + delta).to(torch.bfloat16)


class _ShardedWriter:
    """Writes one model's safetensors shards while tensors arrive one at a time, in order.

    Shapes are known up front, so every shard header can be written before its data and no
    tensor has to be held back until its shard is complete.
    """

    def __init__(
        self, out_dir: Path, plan: list[list[tuple[str, tuple[int, ...]]]], itemsize: int
    ) -> None:
        self.out_dir = out_dir
        self.itemsize = itemsize
        self.shards: list[tuple[str, bytes, list[str]]] = []
        self.weight_map: dict[str, str] = {}
        self.total_size = 0
        n = len(plan)
        for i, entries in enumerate(plan):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            header: dict[str, object] = {"__metadata__": {"format": "pt"}}
            offset = 0
            for name, shape in entries:
                nbytes = itemsize
                for d in shape:
                    nbytes *= d
                header[name] = {
                    "dtype": "BF16",
                    "shape": list(shape),
                    "data_offsets": [offset, offset + nbytes],
                }
                offset += nbytes
                self.weight_map[name] = fname
            self.total_size += offset
            raw = json.dumps(header, separators=(",", ":")).encode()
            # The reference writer pads the header to 8 bytes so tensor data stays aligned.
            raw += b" " * (-len(raw) % 8)
            self.shards.append((fname, raw, [name for name, _ in entries]))
        self._pending: Iterator[str] = iter(())
        self._next_shard = 0
        self._fh: BinaryIO | None = None

    def write(self, name: str, tensor: torch.Tensor) -> None:
        expected = next(self._pending, None)
        if expected is None:
            self._open_next_shard()
            expected = next(self._pending)
        if expected != name:
            raise RuntimeError(f"tensor {name!r} arrived out of order (expected {expected!r})")
        assert self._fh is not None
        self._fh.write(tensor.contiguous().view(torch.int16).numpy().data)

    def _open_next_shard(self) -> None:
        if self._fh is not None:
            self._fh.close()
        fname, header, names = self.shards[self._next_shard]
        self._next_shard += 1
        self._fh = open(self.out_dir / fname, "wb")  # noqa: SIM115 - spans many write() calls
        self._fh.write(struct.pack("<Q", len(header)))
        self._fh.write(header)
        self._pending = iter(names)

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None
        if self._next_shard != len(self.shards) or next(self._pending, None) is not None:
            raise RuntimeError(f"{self.out_dir}: closed before every tensor was written")
        index = {"metadata": {"total_size": self.total_size}, "weight_map": self.weight_map}
        (self.out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def _shard_plan(spec: ModelSpec, itemsize: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    plan: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    used = 0
    for name, shape in tensor_shapes(spec):
        nbytes = itemsize
        for d in shape:
            nbytes *= d
        if plan[-1] and used + nbytes > spec.shard_bytes:
            plan.append([])
            used = 0
        plan[-1].append((name, shape))
        used += nbytes
    return plan


def is_complete(model_dir: Path, spec: ModelSpec) -> bool:
    try:
        return json.loads((model_dir / SPEC_FILE).read_text()) == asdict(spec)
    except (OSError, ValueError):
        return False


def generate(root: Path, names: list[str], spec: ModelSpec, log: bool = True) -> list[Path]:
    """Make sure root/NAME exists for every name ("base", "ft1", "ft2", ...); return the dirs.

    Models already present with the same spec are kept. Missing ones are written in one pass
    over the tensors so the base tensor is computed once for all of them. Each model is built
    in a .partial folder and renamed when complete, so an interrupted run leaves no half model.
    """
    root.mkdir(parents=True, exist_ok=True)
    dirs = [root / n for n in names]
    todo = [n for n, d in zip(names, dirs, strict=True) if not is_complete(d, spec)]
    for d in dirs:
        # Tokenizers were added after the first models were cached; no need to rebuild those.
        if d.name not in todo and not (d / "tokenizer.json").exists():
            write_tokenizer(d, spec.vocab)
    if not todo:
        return dirs
    if log:
        print(f"[make_models] generating {', '.join(todo)} in {root} ...", flush=True)
    start = time.perf_counter()
    plan = _shard_plan(spec, itemsize=2)
    writers: dict[str, _ShardedWriter] = {}
    for n in todo:
        tmp = root / f"{n}.partial"
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(root / n, ignore_errors=True)
        tmp.mkdir()
        writers[n] = _ShardedWriter(tmp, plan, itemsize=2)
    for name, shape in tensor_shapes(spec):
        base = base_tensor(spec, name, shape)
        base_rms = float(base.float().square().mean().sqrt())
        for n, w in writers.items():
            w.write(name, base if n == "base" else fine_tune_tensor(spec, n, name, base, base_rms))
    for n, w in writers.items():
        w.close()
        tmp = root / f"{n}.partial"
        (tmp / "config.json").write_text(json.dumps(config_json(spec), indent=2) + "\n")
        write_tokenizer(tmp, spec.vocab)
        (tmp / SPEC_FILE).write_text(json.dumps(asdict(spec), indent=2) + "\n")
        tmp.rename(root / n)
    if log:
        print(f"[make_models] done in {time.perf_counter() - start:.1f} s", flush=True)
    return dirs


def model_names(fine_tunes: int) -> list[str]:
    return ["base", *(f"ft{i}" for i in range(1, fine_tunes + 1))]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("out", type=Path)
    ap.add_argument("--fine-tunes", type=int, default=3)
    ap.add_argument("--layers", type=int, default=ModelSpec.layers)
    ap.add_argument("--hidden", type=int, default=ModelSpec.hidden)
    ap.add_argument("--intermediate", type=int, default=ModelSpec.intermediate)
    ap.add_argument("--heads", type=int, default=ModelSpec.heads)
    ap.add_argument("--kv-heads", type=int, default=ModelSpec.kv_heads)
    ap.add_argument("--shard-mb", type=int, default=ModelSpec.shard_bytes // 1_000_000)
    args = ap.parse_args(argv)
    if args.hidden % args.heads or args.heads % args.kv_heads:
        ap.error("--hidden must be a multiple of --heads, and --heads of --kv-heads")
    spec = ModelSpec(
        hidden=args.hidden,
        layers=args.layers,
        intermediate=args.intermediate,
        heads=args.heads,
        kv_heads=args.kv_heads,
        shard_bytes=args.shard_mb * 1_000_000,
    )
    print(f"{param_count(spec) / 1e6:.1f}M parameters per model")
    for d in generate(args.out, model_names(args.fine_tunes), spec):
        print(d)
    return 0


if __name__ == "__main__":
    sys.exit(main())
