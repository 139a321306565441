"""Linear: a weighted average (or sum) of the models themselves."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from mergesmith import native
from mergesmith.methods.registry import INPUT, Param, PerModel, blocked, merge_method
from mergesmith.ops.blocks import block_ranges
from mergesmith.ops.float32_sum import float32_sum


@merge_method(
    "linear",
    "weighted average of the models (model soup)",
    base=INPUT,
    memory=blocked(float32_temps_per_input=0, float32_temps=3),
    finite_check="output",
)
def linear(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    weight: Annotated[PerModel[float], Param("this model's weight")],
    normalize: Annotated[bool, Param("divide by the sum of weights")] = True,
    out_dtype: torch.dtype | None = None,  # None: float32
) -> torch.Tensor:
    """sum_i w_i X_i, divided by sum_i w_i when `normalize`; float32 arithmetic, block by block.

    >>> linear(None, [torch.tensor([1.0, 2.0]), torch.tensor([3.0, 6.0])], weight=[1.0, 3.0])
    tensor([2.5000, 5.0000])
    """
    out_dtype = out_dtype or torch.float32
    first = models[0]
    flats = [m.reshape(-1) for m in models]
    out = torch.empty(first.numel(), dtype=out_dtype, device=first.device)
    weights = [float(w) for w in weight]
    total = float32_sum(weights)
    fused = native.handles(*flats, out)
    for _, start, end in block_ranges(first.numel()):
        if fused:
            native.linear_block(
                [native.flat(f) for f in flats],
                weights,
                start,
                end,
                normalize=normalize,
                total=total,
                out=native.flat(out),
            )
            continue
        # add(alpha=) is a fused multiply-add on FMA CPUs, as mergekit's addcmul_ is; starting
        # from +0 as mergekit does gives its signed zeros too.
        acc = torch.zeros(end - start, dtype=torch.float32, device=first.device)
        for flat, w in zip(flats, weights, strict=True):
            acc.add_(flat[start:end].float(), alpha=w)
        if normalize:
            acc.div_(total)
        out[start:end].copy_(acc)
    return out.reshape(first.shape)
