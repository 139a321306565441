"""NearSwap: take the other model's value where it is near the base, keep the base where the two
are far apart, with a smooth blend in between, as mergekit 0.1.5. Entry by entry, with base a
and model b:

    w   = clamp(t / max(|a - b|, 1e-6), 0, 1)
    out = w * b + (1 - w) * a

So an entry within distance t of the base becomes the model's value, and one at distance D > t
moves only t / D of the way. t = 0 gives the base.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from mergesmith.methods.registry import (
    REFERENCE,
    Param,
    blocked,
    finite_non_negative,
    merge_method,
)
from mergesmith.native import whole
from mergesmith.ops.blocks import block_ranges

DISTANCE_EPS = 1e-6  # |a - b| is taken as at least this


# Non-finite inputs reach the output, entry by entry: a NaN in a or b makes |a - b| and w NaN;
# an Inf makes |a - b| infinite or NaN, so w is 0 (then 1 * a is Inf, or 0 * b is NaN) or NaN.
@merge_method(
    "nearswap",
    "take the model's value where it is within distance t of the base, blend beyond",
    base=REFERENCE,
    models=(1, 1),
    memory=blocked(float32_temps_per_input=2, float32_temps=3),
    finite_check="output",
)
def nearswap(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    t: Annotated[
        float,
        Param("distance within which the model's value is taken", check=finite_non_negative),
    ],
    out_dtype: torch.dtype | None = None,  # None: float32
) -> torch.Tensor:
    """w * model + (1 - w) * base with w = clamp(t / |base - model|, 0, 1), entry by entry.

    >>> base = torch.tensor([0.0, 0.0, 0.0])
    >>> nearswap(base, [torch.tensor([0.05, 0.2, -0.4])], t=0.1)
    tensor([ 0.0500,  0.1000, -0.1000])
    """
    out_dtype = out_dtype or torch.float32
    assert base is not None
    flat_a, flat_b = base.reshape(-1), models[0].reshape(-1)
    out = torch.empty(flat_a.numel(), dtype=out_dtype, device=base.device)
    if whole.handles(flat_a, flat_b, out):
        whole.nearswap(flat_a, flat_b, t, DISTANCE_EPS, out)
        return out.reshape(base.shape)
    for _, start, end in block_ranges(flat_a.numel()):
        a = flat_a[start:end].float()
        b = flat_b[start:end].float()
        # mergekit writes t / x, which torch evaluates as x.reciprocal() * t: so do we.
        weight = (a - b).abs_().clamp_(min=DISTANCE_EPS).reciprocal_().mul_(t).clamp_(0, 1)
        swapped = weight * b
        out[start:end] = swapped.add_((1 - weight).mul_(a))
    return out.reshape(base.shape)
