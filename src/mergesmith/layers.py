"""Find a tensor's layer by its name, for any architecture.

`model.layers.7.mlp.up_proj.weight`, `transformer.h.7.attn.c_attn.weight` and
`gpt_neox.layers.7.attention.dense.weight` all belong to layer 7; their template (the name with
the index replaced) lets a slice take layer 7 of one model and write it as layer 2 of the output.
"""

from __future__ import annotations

import re

_LAYER = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks|block)\.(\d+)(?=\.|$)")
_EMBEDDING_PARTS = ("embed_tokens", "lm_head", "wte", "embed_out", "word_embeddings", "embed_in")


def layer_of(name: str) -> tuple[str, int] | None:
    """(template, index) for a layer tensor, where template.format(i) rebuilds the name."""
    match = _LAYER.search(name)
    if not match:
        return None
    start, end = match.span(1)
    template = name[:start].replace("{", "{{").replace("}", "}}") + "{}"
    template += name[end:].replace("{", "{{").replace("}", "}}")
    return template, int(match.group(1))


def is_embedding(name: str, shape: tuple[int, ...], vocab_size: int | None) -> bool:
    """Embedding-like: its first axis is the vocabulary (by name, or by the config's vocab size)."""
    if any(part in name for part in _EMBEDDING_PARTS):
        return True
    return vocab_size is not None and len(shape) >= 1 and shape[0] == vocab_size


def is_input_side(name: str) -> bool:
    """Non-layer tensors that sit before the layers (embeddings) rather than after them."""
    return any(part in name for part in ("embed", "wte", "wpe", "word_embeddings"))
