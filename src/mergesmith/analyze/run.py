"""Streaming the plan's jobs through the statistics instead of the method.

The same plan as a merge, read the same way (memory-mapped, cropped, vocabulary re-indexed), one
job at a time: each job's inputs are released when its sums are taken, so memory stays that of
one job, and nothing but a few numbers per tensor and model outlives it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from mergesmith.analyze.groups import TensorRecord, layer_and_kind
from mergesmith.analyze.stats import Sums, TensorAccumulator
from mergesmith.analyze.trim import block_size, family_trim
from mergesmith.engine import read_inputs
from mergesmith.methods.task_arithmetic import FAMILY
from mergesmith.ops.blocks import block_ranges
from mergesmith.plan import Plan, TensorJob
from mergesmith.sources.base import ModelSource


@dataclass
class Analysis:
    """Everything the report needs: per-tensor sums and what the recipe does with them."""

    method: str
    seed: int
    sparsifier: str | None
    consensus: list[str]  # the sign-election rules the jobs use (empty: none)
    models: list[str]  # every input model (a repeated input suffixed), first appearance order
    bases: list[str]
    records: list[TensorRecord]
    skipped: list[str] = field(default_factory=list)  # integer buffers: copied, never merged
    warnings: list[str] = field(default_factory=list)


def collect(
    plan: Plan,
    sources: Mapping[str, ModelSource],
    on_done: Callable[[int, int], None] | None = None,
) -> Analysis:
    """Take every job's sums, one job at a time, releasing its inputs after it."""
    row = FAMILY.get(plan.method.name)
    analysis = Analysis(
        method=plan.method.name,
        seed=plan.seed,
        sparsifier=row.sparsifier if row else None,
        consensus=[],
        models=[],
        bases=[],
        records=[],
        warnings=list(plan.warnings),
    )
    previous_threads = torch.get_num_threads()
    # One thread, as in the engine: sums then do not depend on the machine's core count.
    torch.set_num_threads(1)
    try:
        for done, job in enumerate(plan.jobs, 1):
            if job.copy_only or not job.inputs:  # nothing to compare (a base alone)
                analysis.skipped.append(job.name)
            else:
                try:
                    analysis.records.append(_record(job, sources, analysis))
                finally:
                    for inp in (job.base, *job.inputs):
                        if inp is not None:
                            sources[inp.model].release(inp.name)
            if on_done is not None:
                on_done(done, len(plan.jobs))
    finally:
        torch.set_num_threads(previous_threads)
    return analysis


def model_keys(refs: Sequence[str]) -> list[str]:
    """The job's model references, a repeated one suffixed ` (2)`, ` (3)`, ... so that it keeps
    its own numbers (a slice may take two layer ranges of one model)."""
    keys: list[str] = []
    for ref in refs:
        key, n = ref, 1
        while key in keys:
            n += 1
            key = f"{ref} ({n})"
        keys.append(key)
    return keys


def _record(job: TensorJob, sources: Mapping[str, ModelSource], analysis: Analysis) -> TensorRecord:
    # NaN or Inf would make every sum meaningless: the input holding it is named.
    base, models, _ = read_inputs(job, sources, torch.device("cpu"))
    keys = model_keys([inp.model for inp in job.inputs])
    for key in keys:
        if key not in analysis.models:
            analysis.models.append(key)
    if job.base is not None and job.base.model not in analysis.bases:
        analysis.bases.append(job.base.model)
    flats = [m.reshape(-1) for m in models]
    accumulator = TensorAccumulator(keys)
    if base is None:
        _mean_reference_sums(accumulator, flats)
        sums = accumulator.sums
        reference = "mean"
    else:
        sums = _base_reference_sums(job, accumulator, base.reshape(-1), flats, analysis)
        reference = "base"
    layer, kind = layer_and_kind(job.name)
    return TensorRecord(job.name, layer, kind, reference, sums)


def _base_reference_sums(
    job: TensorJob,
    accumulator: TensorAccumulator,
    base: torch.Tensor,
    models: list[torch.Tensor],
    analysis: Analysis,
) -> Sums:
    """Task vectors X_i - B; with a family method, also what its sparsifier and sign election
    do to them. A model without a `weight` parameter counts with weight 1 for signs."""
    weights = [float(p.get("weight", 1.0)) for p in job.model_params]
    trim = family_trim(job, base, models)
    consensus = trim.consensus if trim else None
    if consensus is not None and consensus not in analysis.consensus:
        analysis.consensus.append(consensus)
    for _, start, end in block_ranges(base.numel(), block_size(job)):
        b = base[start:end].float()
        deltas = [torch.sub(m[start:end], b) for m in models]
        trimmed = trim.trimmed(deltas, start) if trim else None
        accumulator.add_block(deltas, weights, trimmed, consensus)
    return accumulator.sums


def _mean_reference_sums(accumulator: TensorAccumulator, models: list[torch.Tensor]) -> None:
    """Without a base there are no task vectors: each model's difference from the models' mean
    gives norms and cosines; signs, trimming and election are left undefined (None)."""
    for _, start, end in block_ranges(models[0].numel()):
        blocks = [m[start:end].float() for m in models]
        mean = torch.stack(blocks).mean(dim=0)
        accumulator.add_block([x - mean for x in blocks], None)
