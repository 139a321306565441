"""Linear: a weighted average (or sum) of the models themselves."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from mergesmith import native
from mergesmith.methods.registry import (
    MergeMethod,
    MethodInputs,
    ParamSpec,
    register,
    require_finite,
)
from mergesmith.ops.blocks import block_ranges


def linear(
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    normalize: bool = True,
    *,
    out_dtype: torch.dtype | None = None,
    check_finite: bool = False,
) -> torch.Tensor:
    """sum_i w_i X_i, divided by sum_i w_i when `normalize`; float32 arithmetic, block by block."""
    first = models[0]
    flats = [m.reshape(-1) for m in models]
    out = torch.empty(first.numel(), dtype=out_dtype or first.dtype, device=first.device)
    total = float(torch.tensor([float(w) for w in weights], dtype=torch.float32).sum())
    finite = True
    fused = native.handles(*flats, out)
    for _, start, end in block_ranges(first.numel()):
        if fused:
            block_finite = native.linear_block(
                flats,
                [float(w) for w in weights],
                start,
                end,
                normalize=normalize,
                total=total,
                out=out,
                check_finite=check_finite and finite,
            )
            finite = finite and block_finite
            continue
        # add(alpha=) is a fused multiply-add on FMA CPUs, as mergekit's addcmul_ is; starting
        # from +0 as mergekit does gives its signed zeros too.
        acc = torch.zeros(end - start, dtype=torch.float32, device=first.device)
        for flat, weight in zip(flats, weights, strict=True):
            acc.add_(flat[start:end].float(), alpha=float(weight))
        if check_finite:
            finite = finite and math.isfinite(float(acc.sum()))
        if normalize:
            acc.div_(total)
        out[start:end].copy_(acc)
    if not finite:
        for position, model in enumerate(models):
            require_finite(None, model, position)
    return out.reshape(first.shape)


def _run(inputs: MethodInputs) -> torch.Tensor:
    weights = [m["weight"] for m in inputs.model_params]
    return linear(
        inputs.models,
        weights,
        inputs.params["normalize"],
        out_dtype=inputs.out_dtype,
        check_finite=inputs.check_finite,
    )


register(
    MergeMethod(
        name="linear",
        description="weighted average of the models (model soup)",
        params=(
            ParamSpec("weight", float, True, help="this model's weight"),
            ParamSpec("normalize", bool, False, True, "divide by the sum of weights"),
        ),
        run=_run,
        needs_base=False,
        base_is_input=True,
    )
)
