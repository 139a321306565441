"""Passthrough: one input per tensor, copied (optionally scaled); used to stack layers."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from mergesmith.methods.registry import INPUT, Param, PerModel, merge_method, whole_tensor


@merge_method(
    "passthrough",
    "copy one model's tensor (per slice), optionally times 'scale'",
    base=INPUT,
    models=(1, 1),
    memory=whole_tensor(float32_copies_per_input=0, float32_copies=1),
    finite_check="output",
)
def passthrough(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    scale: Annotated[PerModel[float | None], Param("multiply the tensor by this", default=None)],
    out_dtype: torch.dtype | None = None,  # None: float32
) -> torch.Tensor:
    """The one model's tensor, times its `scale` when one is set."""
    out_dtype = out_dtype or torch.float32
    (tensor,), (factor,) = models, scale
    if factor is None:
        return tensor.to(out_dtype)
    return (tensor.float() * factor).to(out_dtype)
