"""Where a tensor's numbers are reported: its layer, its kind, and the whole model.

A tensor's kind is its name without the layer prefix and without `.weight`
(`model.layers.3.self_attn.q_proj.weight` -> `self_attn.q_proj`), so one kind gathers the same
projection across every layer; tensors outside the layers keep their full name
(`model.embed_tokens`). Groups are sums of their tensors' sums (see stats), so a layer's norm is
the norm of all its tensors together, not an average of per-tensor norms.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from mergesmith.analyze.stats import Sums
from mergesmith.layers import layer_of


def layer_and_kind(name: str) -> tuple[int | None, str]:
    """(output layer index or None, kind) of an output tensor name."""
    found = layer_of(name)
    if found is None:
        layer, kind = None, name
    else:
        template, layer = found
        kind = template.split("{}", 1)[1].lstrip(".") or name
    return layer, kind.removesuffix(".weight")


@dataclass
class TensorRecord:
    """One output tensor's sums and where it belongs."""

    name: str
    layer: int | None
    kind: str
    reference: str  # "base" (task vectors against the base model) or "mean" (no base)
    sums: Sums


@dataclass
class Grouped:
    overall: Sums
    layers: dict[int, Sums]  # in layer order
    kinds: dict[str, Sums]  # in order of first appearance


def group(records: Iterable[TensorRecord]) -> Grouped:
    """Sum the tensors' sums per layer, per kind and over the whole model."""
    overall = Sums()
    layers: dict[int, Sums] = {}
    kinds: dict[str, Sums] = {}
    for record in records:
        overall.add(record.sums)
        if record.layer is not None:
            layers.setdefault(record.layer, Sums()).add(record.sums)
        kinds.setdefault(record.kind, Sums()).add(record.sums)
    return Grouped(overall, dict(sorted(layers.items())), kinds)
