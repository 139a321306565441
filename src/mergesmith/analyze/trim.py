"""The task-arithmetic family's own sparsification, block by block, for the statistics.

Reuses the merge's per-model plans (`methods.task_arithmetic`): the same magnitude cuts with the
same tie rule, the same per-block generators for DARE and DELLA (seeded per seed, model and
tensor), the same block size and the same rescale factors. So the removed mass, the signs after
trimming and the elected-sign shares describe the merge `mergesmith run --seed S` writes, not a
re-implementation of it that could drift.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergesmith.methods.task_arithmetic import (
    FAMILY,
    ModelPlan,
    as_rows,
    block_size_for,
    select_kept,
)
from mergesmith.ops.blocks import BLOCK
from mergesmith.plan import TensorJob


@dataclass
class FamilyTrim:
    """What one job of a family method keeps of each model's task vector."""

    sparsifier: str | None
    consensus: str | None
    shape2d: tuple[int, int]
    plans: list[ModelPlan]

    def trimmed(self, deltas: Sequence[torch.Tensor], start: int) -> list[torch.Tensor]:
        """The block starting at flat index `start` of each sparsified, rescaled task vector:
        what the merge weights and sums. `deltas` are left unchanged."""
        return [
            plan.sparsify(delta.clone(), start, self.shape2d)
            for plan, delta in zip(self.plans, deltas, strict=True)
        ]


def block_size(job: TensorJob) -> int:
    """The block size the merge uses for this job (DELLA's blocks hold whole rows)."""
    row = FAMILY.get(job.method)
    return block_size_for(torch.Size(job.shape), row.sparsifier) if row else BLOCK


def family_trim(
    job: TensorJob, base: torch.Tensor, models: Sequence[torch.Tensor]
) -> FamilyTrim | None:
    """Decide each model's cuts and rescale factor as the merge does (one sweep over the flat
    `base` and `models`), or None when the job's method is no member of the family."""
    row = FAMILY.get(job.method)
    if row is None:
        return None
    rescale = bool(job.params.get("rescale", row.rescale))
    plans = [
        ModelPlan(
            row.sparsifier,
            float(params.get("density", 1.0)),
            float(params.get("gamma", 0.01)),
            float(params.get("epsilon", 0.15)),
            seed,
            rescale,
        )
        for params, seed in zip(job.model_params, job.seeds, strict=True)
    ]
    n = base.numel()
    shape = torch.Size(job.shape)
    block = block_size_for(shape, row.sparsifier)
    shape2d = as_rows(shape)
    select_kept(plans, base, list(models), n, block)
    for plan, model in zip(plans, models, strict=True):
        plan.measure_rescale(base, model, n, block, shape2d)
    consensus = job.params.get("consensus_method", row.consensus)
    return FamilyTrim(row.sparsifier, consensus, shape2d, plans)
