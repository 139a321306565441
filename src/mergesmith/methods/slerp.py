"""SLERP: spherical interpolation between the base (t = 0) and one other model (t = 1)."""

from __future__ import annotations

import math

import torch

from mergesmith.methods.registry import (
    MergeMethod,
    MethodInputs,
    ParamSpec,
    in_unit_interval,
    register,
    require_finite,
)

DOT_THRESHOLD = 0.9995
NORM_EPS = 1e-8


def slerp(t: float, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Treat each tensor as one flat vector; fall back to lerp when they are nearly parallel."""
    flat_a, flat_b = a.reshape(-1), b.reshape(-1)
    norm_a = torch.linalg.vector_norm(flat_a)
    norm_b = torch.linalg.vector_norm(flat_b)
    unit_a = flat_a / norm_a if norm_a > NORM_EPS else flat_a
    unit_b = flat_b / norm_b if norm_b > NORM_EPS else flat_b
    dot = float(torch.clamp(torch.dot(unit_a, unit_b), -1.0, 1.0))
    if abs(dot) > DOT_THRESHOLD:
        return (1 - t) * a + t * b
    theta = math.acos(dot)
    sin_theta = math.sin(theta)
    return (math.sin((1 - t) * theta) / sin_theta) * a + (math.sin(t * theta) / sin_theta) * b


def _run(inputs: MethodInputs) -> torch.Tensor:
    assert inputs.base is not None
    if inputs.check_finite:
        require_finite(inputs.base, inputs.models[0], 0)
    result = slerp(inputs.params["t"], inputs.base.float(), inputs.models[0].float())
    return result.to(inputs.out_dtype or torch.float32)


register(
    MergeMethod(
        name="slerp",
        description="spherical interpolation between the base (t=0) and one model (t=1)",
        params=(ParamSpec("t", float, False, help="interpolation factor", check=in_unit_interval),),
        run=_run,
        needs_base=True,
        min_models=1,
        max_models=1,
    )
)
