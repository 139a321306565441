"""Linear: a weighted average (or sum) of the models themselves."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergesmith.methods.registry import MergeMethod, MethodInputs, ParamSpec, register


def linear(models: Sequence[torch.Tensor], weights: Sequence[float], normalize: bool = True):
    """sum_i w_i X_i, divided by sum_i w_i when `normalize`."""
    result = torch.zeros_like(models[0])
    for model, weight in zip(models, weights, strict=True):
        result.add_(model, alpha=weight)
    if normalize:
        result.div_(sum(weights))
    return result


def _run(inputs: MethodInputs) -> torch.Tensor:
    weights = [m["weight"] for m in inputs.model_params]
    return linear(inputs.models, weights, inputs.params["normalize"])


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
