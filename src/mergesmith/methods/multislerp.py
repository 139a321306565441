"""Multi-SLERP: a weighted spherical mean of any number of models (or of their task vectors).

Each tensor is one flat vector. Let d_i = X_i - B with a base B (computed in float32, as mergekit
does), d_i = X_i without one; n_i = |d_i|; w_i the weights, divided by their sum when
`normalize_weights` (the default); eps the `eps` parameter (default 1e-8). Mergekit 0.1.5:

    u_i = d_i / (n_i + eps)                              near-unit copies
    m   = sum_i w_i u_i,  mu = m / |m|                   the weighted mean direction
    tau = sum_i w_i (u_i - <u_i, mu> mu)                 "tangent-space interpolation"
    r   = |tau| + eps
    out = (cos(r) mu + sin(r) / r * tau) * sum_i w_i n_i   (+ B)

The tangent step vanishes: sum_i w_i <u_i, mu> = <m, mu> = |m|, so
tau = m - <m, mu> mu = m - |m| mu = 0 exactly, r = eps, and

    out = cos(eps) * (sum_i w_i n_i) / |m| * sum_i (w_i / (n_i + eps)) d_i   (+ B).

Mergekit's float32 tau is rounding noise (about 1e-7 of |mu|), which moves its result by that
much; we use the exact value. So the whole method needs only the Gram matrix G_ij = <d_i, d_j>:
n_i = sqrt(G_ii) and |m|^2 = a^T G a with a_i = w_i / (n_i + eps). One blocked pass computes G
in float64, a second writes the combination: memory stays flat whatever the tensor size.

Special cases:
- one model: its tensor, unchanged (mergekit ignores the base and the weight then);
- |m| < eps (antipodal models whose weights cancel, or every d_i zero, e.g. a tensor no
  fine-tune changed): the weighted sum sum_i w_i d_i (+ B). Mergekit does this for two models
  and raises for more; we do it for any number, which for unchanged tensors gives the base;
- weights summing to zero with `normalize_weights`: an error (mergekit divides by zero and
  writes NaN);
- eps = 0 and a zero d_i: its u_i is taken as zero (the limit eps -> 0), not 0/0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated

import torch

from mergesmith.errors import MergeError
from mergesmith.methods.registry import (
    OPTIONAL,
    Param,
    PerModel,
    blocked,
    finite_non_negative,
    merge_method,
)
from mergesmith.ops.spherical import combine, gram_matrix


@merge_method(
    "multislerp",
    "weighted spherical mean of any number of models (of task vectors when a base is given)",
    base=OPTIONAL,
    models=(1, None),
    memory=blocked(float32_temps_per_input=3, float32_temps=8),
)
def multislerp(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    weight: Annotated[PerModel[float], Param("this model's weight")],
    normalize_weights: Annotated[bool, Param("divide the weights by their sum")] = True,
    eps: Annotated[float, Param("small constant added to norms", check=finite_non_negative)] = 1e-8,
    out_dtype: torch.dtype | None = None,  # None: float32
) -> torch.Tensor:
    """Weighted spherical mean of `models` (of their task vectors when `base` is given).

    >>> a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    >>> multislerp(None, [a, b], weight=[1.0, 1.0])
    tensor([2.1213, 2.1213])
    >>> multislerp(torch.tensor([1.0, 1.0]), [a + 1, b + 1], weight=[1.0, 1.0])
    tensor([3.1213, 3.1213])
    """
    out_dtype = out_dtype or torch.float32
    if len(models) == 1:
        return models[0]
    weights = [float(w) for w in weight]
    if normalize_weights:
        total = sum(weights)
        if total == 0.0:
            raise MergeError(
                f"multislerp: the weights {weights} sum to zero, so normalize_weights cannot "
                "divide by their sum",
                "change the weights, or set 'normalize_weights: false'",
            )
        weights = [w / total for w in weights]
    gram = gram_matrix(models, base)
    norms = gram.diagonal().clamp(min=0.0).sqrt().tolist()
    inverse = [1.0 / (n + eps) if n + eps > 0.0 else 0.0 for n in norms]
    a = torch.tensor([w * s for w, s in zip(weights, inverse, strict=True)], dtype=torch.float64)
    mean_norm = math.sqrt(max(float(a @ gram @ a), 0.0))
    if mean_norm < eps or mean_norm == 0.0:
        return combine(models, weights, base, out_dtype)
    length = sum(w * n for w, n in zip(weights, norms, strict=True))
    scale = math.cos(eps) * length / mean_norm
    return combine(models, (a * scale).tolist(), base, out_dtype)
