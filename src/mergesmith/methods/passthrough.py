"""Passthrough: one input per tensor, copied (optionally scaled); used to stack layers."""

from __future__ import annotations

import torch

from mergesmith.methods.registry import (
    MergeMethod,
    MethodInputs,
    ParamSpec,
    register,
    require_finite,
)


def _run(inputs: MethodInputs) -> torch.Tensor:
    scale = inputs.model_params[0].get("scale")
    tensor = inputs.models[0]
    if inputs.check_finite:
        require_finite(None, tensor, 0)
    out_dtype = inputs.out_dtype or torch.float32
    if scale is None:
        return tensor.to(out_dtype)
    return (tensor.float() * scale).to(out_dtype)


register(
    MergeMethod(
        name="passthrough",
        description="copy one model's tensor (per slice), optionally times 'scale'",
        params=(ParamSpec("scale", float, True, None, "multiply the tensor by this"),),
        run=_run,
        needs_base=False,
        base_is_input=True,
        max_models=1,
    )
)
