"""Which files of a folder (or of a hub repository's listing) hold a model's weights.

One rule for local folders, cached hub snapshots and hub listings, so a model is read the same
way wherever it lies: the Hugging Face names first (safetensors before pickles, so a `.bin` kept
beside safetensors is never unpickled), then any one checkpoint file under any name, or one
complete sharded set. Several unrelated candidates are never guessed between.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

CHECKPOINT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt")
# A model's tokenizer and generation settings: fetched beside its weights, copied to an output.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
STANDARD_LAYOUTS = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
INDEX_SUFFIXES = (".safetensors.index.json", ".bin.index.json")
# Files a Hugging Face Trainer checkpoint keeps beside the model: pickles, but not weights. A
# PEFT adapter (adapter_model.*) is not a whole model either (see _NOT_WEIGHTS_PATTERN).
NOT_WEIGHTS = frozenset(
    {
        "training_args.bin",
        "optimizer.pt",
        "optimizer.bin",
        "scheduler.pt",
        "scheduler.bin",
        "scaler.pt",
    }
)
_NOT_WEIGHTS_PATTERN = re.compile(r"rng_state(_\d+)?\.pth|adapter_model\.(safetensors|bin)")
_SHARD = re.compile(r"(?P<stem>.+)-(?P<index>\d+)-of-(?P<total>\d+)(?P<suffix>\.[A-Za-z]+)")

LOOKED_FOR = (
    "model.safetensors, a sharded safetensors index (model.safetensors.index.json), "
    "pytorch_model.bin, or one *.safetensors, *.bin, *.pt, *.pth or *.ckpt file"
)


@dataclass(frozen=True)
class WeightsChoice:
    """What `choose_weights` found.

    `picked`: the file(s) to open: one weights file, one index (its shards come from it), or
    the shards of one complete set that has no index. Empty when nothing can be chosen:
    `candidates` then lists the rival files (more than one), `missing` the absent shards of an
    incomplete set, and `ignored` the checkpoint-looking files that are not weights.
    """

    picked: tuple[str, ...]
    candidates: tuple[str, ...] = ()
    missing: tuple[str, ...] = ()
    ignored: tuple[str, ...] = ()


def is_checkpoint_name(name: str) -> bool:
    """Whether a file name has one of the checkpoint suffixes we read."""
    return name.lower().endswith(CHECKPOINT_SUFFIXES)


def is_index_name(name: str) -> bool:
    """Whether a file name is a sharded checkpoint's index (tensor name -> shard file)."""
    return name.lower().endswith(INDEX_SUFFIXES)


def is_safetensors_name(name: str) -> bool:
    return name.lower().endswith((".safetensors", ".safetensors.index.json"))


def choose_weights(names: Iterable[str]) -> WeightsChoice:
    """Choose the weights among the file names of one folder (no paths, no subfolders)."""
    present = sorted({n for n in names if "/" not in n and not n.startswith(".")})
    for name in STANDARD_LAYOUTS:
        if name in present:
            return WeightsChoice((name,))
    indexes = [n for n in present if is_index_name(n)]
    if len(indexes) == 1:
        return WeightsChoice((indexes[0],))
    ignored = tuple(n for n in present if is_checkpoint_name(n) and _not_weights(n))
    candidates = [n for n in present if is_checkpoint_name(n) and not _not_weights(n)]
    if indexes:
        return WeightsChoice((), candidates=tuple(indexes), ignored=ignored)
    if len(candidates) == 1:
        return WeightsChoice((candidates[0],), ignored=ignored)
    if len(candidates) > 1:
        shards, missing = _shard_set(candidates)
        if shards:
            return WeightsChoice(tuple(shards), ignored=ignored)
        return WeightsChoice((), candidates=tuple(candidates), missing=missing, ignored=ignored)
    return WeightsChoice((), ignored=ignored)


def _not_weights(name: str) -> bool:
    return name in NOT_WEIGHTS or _NOT_WEIGHTS_PATTERN.fullmatch(name) is not None


def _shard_set(names: list[str]) -> tuple[list[str], tuple[str, ...]]:
    """(the shards in order, ()) when `names` are exactly one set STEM-0000i-of-0000n.EXT;
    ([], the absent shards) when they are one such set with gaps; ([], ()) otherwise."""
    matches = [_SHARD.fullmatch(n) for n in names]
    if not all(matches):
        return [], ()
    keys = {(m["stem"], m["total"], m["suffix"]) for m in matches if m}
    if len(keys) != 1:
        return [], ()
    stem, total, suffix = keys.pop()
    width = len(total)
    expected = [f"{stem}-{i:0{width}d}-of-{total}{suffix}" for i in range(1, int(total) + 1)]
    if sorted(names) == expected:
        return expected, ()
    return [], tuple(n for n in expected if n not in names)
