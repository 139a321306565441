"""SLERP: spherical interpolation between the base (t = 0) and one other model (t = 1).

Each tensor is one flat vector. Two passes over blocks keep memory flat: the first sums the
norms and the dot product (in float64), the second writes c_a * base + c_b * model.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated

import torch

from mergesmith.methods.registry import REFERENCE, Param, blocked, in_unit_interval, merge_method
from mergesmith.ops.blocks import block_ranges

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp_coefficients(t: float, a: torch.Tensor, b: torch.Tensor) -> tuple[float, float]:
    """(c_a, c_b) with slerp(a, b) = c_a a + c_b b; lerp's when a and b are nearly parallel.

    The dot product is of the normalised vectors; a norm <= 1e-8 is taken as 1. Each block's
    sums are float32 (as mergekit's), added up across blocks in float64."""
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    squares_a = squares_b = dot = 0.0
    for _, start, end in block_ranges(flat_a.numel()):
        x = flat_a[start:end].float()
        y = flat_b[start:end].float()
        squares_a += float(x.dot(x))
        squares_b += float(y.dot(y))
        dot += float(x.dot(y))
    norm_a, norm_b = math.sqrt(squares_a), math.sqrt(squares_b)
    cosine = dot / ((norm_a if norm_a > NORM_EPS else 1.0) * (norm_b if norm_b > NORM_EPS else 1.0))
    cosine = min(1.0, max(-1.0, cosine))
    if abs(cosine) > DOT_THRESHOLD:
        return 1 - t, t
    theta = math.acos(cosine)
    return math.sin((1 - t) * theta) / math.sin(theta), math.sin(t * theta) / math.sin(theta)


@merge_method(
    "slerp",
    "spherical interpolation between the base (t=0) and one model (t=1)",
    base=REFERENCE,
    models=(1, 1),
    memory=blocked(float32_temps_per_input=1, float32_temps=2),
    finite_check="output",
)
def slerp(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    t: Annotated[float, Param("interpolation factor", check=in_unit_interval)],
    out_dtype: torch.dtype | None = None,  # None: float32
) -> torch.Tensor:
    """Spherical interpolation from `base` (t = 0) to `models[0]` (t = 1).

    >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    >>> slerp(a, [b], t=0.5)
    tensor([0.7071, 0.7071])
    """
    out_dtype = out_dtype or torch.float32
    assert base is not None
    model = models[0]
    c_a, c_b = slerp_coefficients(t, base, model)
    flat_a, flat_b = base.reshape(-1), model.reshape(-1)
    out = torch.empty(flat_a.numel(), dtype=out_dtype, device=base.device)
    for _, start, end in block_ranges(flat_a.numel()):
        # .float() does not copy a float32 input: the product must be a new tensor.
        mixed = flat_a[start:end].float() * c_a
        out[start:end] = mixed.add_(flat_b[start:end].float(), alpha=c_b)
    return out.reshape(base.shape)
