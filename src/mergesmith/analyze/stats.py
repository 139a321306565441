"""Statistics of task vectors as additive sums, accumulated block by block.

Every figure the analysis reports is a ratio of sums over entries (squared norms, dot products,
L1 masses, counts), so the figure of a layer or of a tensor kind is the same ratio of the summed
sums: a group of tensors is described exactly as their concatenation would be. A job keeps only
these few numbers per model, never a tensor.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from mergesmith.ops.consensus import elect_sign

Pair = tuple[str, str]


def _add(into: dict, key: Any, value: float) -> None:
    into[key] = into.get(key, 0.0) + value


@dataclass
class Sums:
    """Additive sums over the entries of one tensor or of a group of tensors, keyed by model.

    A model missing from a dict took no part in the tensors summed (slices may merge different
    models in different layers); the pair dicts hold both orders of each pair.
    """

    tensors: int = 0
    numel: int = 0
    l2sq: dict[str, float] = field(default_factory=dict)  # sum delta^2
    l1: dict[str, float] = field(default_factory=dict)  # sum |delta|
    dot: dict[Pair, float] = field(default_factory=dict)  # sum delta_a * delta_b
    pair_l2sq: dict[Pair, float] = field(default_factory=dict)  # l2sq of a where b is present
    trim_l1: dict[str, float] = field(default_factory=dict)  # l1 of tensors the method trims
    kept_l1: dict[str, float] = field(default_factory=dict)  # sum |delta| of kept entries
    weighted_l1: dict[str, float] = field(default_factory=dict)  # sum |W| (sign election)
    elected_l1: dict[str, float] = field(default_factory=dict)  # sum |W| agreeing with the sign
    sign_entries_before: int = 0  # entries where >= 2 weighted task vectors are nonzero
    sign_conflicts_before: int = 0  # ... and their nonzero signs differ
    sign_entries_after: int = 0
    sign_conflicts_after: int = 0

    def add(self, other: Sums) -> None:
        """Fold another tensor's (or group's) sums into these."""
        self.tensors += other.tensors
        self.numel += other.numel
        for name in (
            "l2sq",
            "l1",
            "dot",
            "pair_l2sq",
            "trim_l1",
            "kept_l1",
            "weighted_l1",
            "elected_l1",
        ):
            into = getattr(self, name)
            for key, value in getattr(other, name).items():
                _add(into, key, value)
        self.sign_entries_before += other.sign_entries_before
        self.sign_conflicts_before += other.sign_conflicts_before
        self.sign_entries_after += other.sign_entries_after
        self.sign_conflicts_after += other.sign_conflicts_after


def sign_conflicts(weighted: Sequence[torch.Tensor]) -> tuple[int, int]:
    """(entries where at least two tensors are nonzero, those of them whose nonzero signs do not
    all agree). Exact zeros take no part, as in sign election."""
    positive = torch.zeros(weighted[0].shape, dtype=torch.int32)
    negative = torch.zeros(weighted[0].shape, dtype=torch.int32)
    for w in weighted:
        positive += w > 0
        negative += w < 0
    entries = int(((positive + negative) >= 2).sum())
    conflicts = int(((positive > 0) & (negative > 0)).sum())
    return entries, conflicts


class TensorAccumulator:
    """Sums for one tensor, fed one block of every model's task vector at a time.

    `models` are the job's input references in order (a repeated one gets a suffix, so that it
    keeps its own numbers)."""

    def __init__(self, models: Sequence[str]) -> None:
        self.models = list(models)
        self.sums = Sums(tensors=1)
        for a in self.models:
            self.sums.l2sq[a] = 0.0
            self.sums.l1[a] = 0.0

    def add_block(
        self,
        deltas: Sequence[torch.Tensor],
        weights: Sequence[float] | None,
        trimmed: Sequence[torch.Tensor] | None = None,
        consensus: str | None = None,
    ) -> None:
        """One block: float32 task vectors `deltas`; `weights` None when signs mean nothing
        here (no base model); `trimmed` the method's sparsified (and rescaled) task vectors,
        None when the method does not sparsify; `consensus` the sign-election rule, if any."""
        s = self.sums
        s.numel += deltas[0].numel()
        squares = [float(torch.dot(d, d)) for d in deltas]
        for a, d, square in zip(self.models, deltas, squares, strict=True):
            _add(s.l2sq, a, square)
            _add(s.l1, a, float(d.abs().sum()))
        for i, a in enumerate(self.models):
            for j in range(i + 1, len(self.models)):
                b = self.models[j]
                value = float(torch.dot(deltas[i], deltas[j]))
                _add(s.dot, (a, b), value)
                _add(s.dot, (b, a), value)
        for a, square in zip(self.models, squares, strict=True):
            for b in self.models:
                if b != a:
                    _add(s.pair_l2sq, (a, b), square)
        if weights is None:
            return
        entries, conflicts = sign_conflicts([d * w for d, w in zip(deltas, weights, strict=True)])
        s.sign_entries_before += entries
        s.sign_conflicts_before += conflicts
        if trimmed is None:
            return
        for a, d, t in zip(self.models, deltas, trimmed, strict=True):
            _add(s.trim_l1, a, float(d.abs().sum()))
            _add(s.kept_l1, a, float(d.abs().mul_(t != 0).sum()))
        weighted = [t * w for t, w in zip(trimmed, weights, strict=True)]
        entries, conflicts = sign_conflicts(weighted)
        s.sign_entries_after += entries
        s.sign_conflicts_after += conflicts
        if consensus is None:
            return
        elected = elect_sign(weighted, consensus)
        for a, w in zip(self.models, weighted, strict=True):
            mass = w.abs()
            _add(s.weighted_l1, a, float(mass.sum()))
            _add(s.elected_l1, a, float(mass.mul_(torch.sign(w) == elected).sum()))


def _ratio(top: float, bottom: float) -> float | None:
    return top / bottom if bottom > 0 else None


def summarize(sums: Sums, models: Sequence[str]) -> dict[str, Any]:
    """The figures of one group, per model in `models` order (None where a model took no part
    or a figure is undefined, e.g. a cosine with a zero task vector)."""
    norm = [math.sqrt(sums.l2sq[a]) if a in sums.l2sq else None for a in models]
    cosine: list[list[float | None]] = []
    for a in models:
        row: list[float | None] = []
        for b in models:
            if a == b:
                row.append(1.0 if sums.l2sq.get(a, 0.0) > 0 else None)
                continue
            scale = sums.pair_l2sq.get((a, b), 0.0) * sums.pair_l2sq.get((b, a), 0.0)
            row.append(sums.dot[(a, b)] / math.sqrt(scale) if scale > 0 else None)
        cosine.append(row)
    removed = [
        1.0 - sums.kept_l1[a] / sums.trim_l1[a]
        if a in sums.trim_l1 and sums.trim_l1[a] > 0
        else None
        for a in models
    ]
    total_elected = sum(sums.elected_l1.values())
    elected_share = [
        _ratio(sums.elected_l1[a], total_elected) if a in sums.elected_l1 else None for a in models
    ]
    agreeing = [
        _ratio(sums.elected_l1[a], sums.weighted_l1[a]) if a in sums.elected_l1 else None
        for a in models
    ]
    return {
        "tensors": sums.tensors,
        "numel": sums.numel,
        "norm": norm,
        "l1": [sums.l1.get(a) for a in models],
        "cosine": cosine,
        "sign_conflict_before": _ratio(sums.sign_conflicts_before, sums.sign_entries_before),
        "sign_conflict_after": _ratio(sums.sign_conflicts_after, sums.sign_entries_after),
        "removed_l1_share": removed,
        "elected_share": elected_share,
        "agreeing_share": agreeing,
        "sums": raw_sums(sums, models),
    }


def raw_sums(sums: Sums, models: Sequence[str]) -> dict[str, Any]:
    """The sums themselves, per model in `models` order, so a reader can recompute any figure."""

    def per_model(values: dict[str, float]) -> list[float | None]:
        return [values.get(a) for a in models]

    def matrix(values: dict[Pair, float], diagonal: dict[str, float]) -> list[list[float | None]]:
        return [[diagonal.get(a) if a == b else values.get((a, b)) for b in models] for a in models]

    return {
        "l2sq": per_model(sums.l2sq),
        "l1": per_model(sums.l1),
        "dot": matrix(sums.dot, sums.l2sq),
        "pair_l2sq": matrix(sums.pair_l2sq, sums.l2sq),
        "trim_l1": per_model(sums.trim_l1),
        "kept_l1": per_model(sums.kept_l1),
        "weighted_l1": per_model(sums.weighted_l1),
        "elected_l1": per_model(sums.elected_l1),
        "sign_entries_before": sums.sign_entries_before,
        "sign_conflicts_before": sums.sign_conflicts_before,
        "sign_entries_after": sums.sign_entries_after,
        "sign_conflicts_after": sums.sign_conflicts_after,
    }
