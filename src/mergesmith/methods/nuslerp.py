"""NuSLERP: spherical interpolation of two models, or of their task vectors when a base is given.

With weights w1, w2 of the two models, t = w2 / (w1 + w2) (t = 1/2 when |w1 + w2| < 1e-6).
Without a base the vectors interpolated are the tensors themselves, v1 = X1 and v2 = X2; with a
base B they are the task vectors v_i = X_i - B and the result is B + (the interpolation).

For each vector pair (v1, v2), with n_i = max(|v_i|, 1e-7) and cos = clamp(<v1, v2> / (n1 n2),
-1, 1):

    colinear (1 - cos^2 <= 1e-16):  (1 - t) v1 + t v2
    otherwise, theta = arccos(cos): (sin((1 - t) theta) v1 + sin(t theta) v2) / sin(theta)

The coefficients multiply the vectors as they are, not their normalised copies. Which vectors
are paired depends on the two flags, exactly as mergekit 0.1.5 reads them:

    nuslerp_flatten (default true):   the whole tensor is one vector (the row-wise flag is ignored)
    flatten false, row_wise false:    each slice along the last axis (each row of a matrix)
    flatten false, row_wise true:     each slice along the first axis (each column of a matrix)

A zero vector has no direction: its "unit" copy is zero, so cos = 0 and the pair is treated as
orthogonal. The result is then sin((1 - t) pi/2) v1 + sin(t pi/2) v2, not the lerp; mergekit
does the same (a model equal to the base in some row shrinks the other model's task vector
there by sin(t pi/2)), and so do we.

Memory stays flat: vectors are processed in groups that fit one block (ops.blocks), or one at a
time when longer. A first pass sums the squared norms and the dot product of each vector (in
float64, in ops.spherical's fixed order), a second writes c1 v1 + c2 v2; both run in the C
kernels where they can.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Annotated

import torch

from mergesmith.methods.registry import OPTIONAL, Param, PerModel, blocked, merge_method
from mergesmith.ops.blocks import BLOCK
from mergesmith.ops.spherical import combine_rows, row_grams

NORM_FLOOR = 1e-7  # mergekit clamps a vector's norm to this before normalising it
COLINEAR_EPS = 1e-8  # colinear when 1 - cos^2 <= COLINEAR_EPS ** 2
ZERO_WEIGHTS = 1e-6  # |w1 + w2| below this: t = 1/2
# Vectors shorter than this still count as this long when sizing a group, which bounds the
# per-vector temporaries (a dozen float64 values each) by a few blocks' worth.
MIN_LENGTH = 8


def interpolation_t(weights: Sequence[float]) -> float:
    """t = w2 / (w1 + w2), or 1/2 when the weights (nearly) cancel."""
    total = weights[0] + weights[1]
    return 0.5 if abs(total) < ZERO_WEIGHTS else weights[1] / total


def nuslerp_coefficients(
    t: float, squares_1: torch.Tensor, squares_2: torch.Tensor, dots: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """(c1, c2) per vector from |v1|^2, |v2|^2 and <v1, v2> (float64): result = c1 v1 + c2 v2."""
    norm_1 = squares_1.sqrt().clamp(min=NORM_FLOOR)
    norm_2 = squares_2.sqrt().clamp(min=NORM_FLOOR)
    cosine = (dots / (norm_1 * norm_2)).clamp(-1.0, 1.0)
    colinear = (1.0 - cosine * cosine) <= COLINEAR_EPS**2
    theta = torch.acos(torch.where(colinear, 0.0, cosine))
    # sin(theta) is 0 only on the colinear branch, which the where() below discards.
    sine = torch.where(colinear, 1.0, torch.sin(theta))
    c1 = torch.where(colinear, 1.0 - t, torch.sin((1.0 - t) * theta) / sine)
    c2 = torch.where(colinear, t, torch.sin(t * theta) / sine)
    return c1, c2


def vector_layout(shape: Sequence[int], row_wise: bool, flatten: bool) -> tuple[int, int, bool]:
    """(number of vectors, their length, whether they are the columns of the tensor seen as a
    [length, count] matrix rather than the rows of a [count, length] one)."""
    numel = math.prod(shape)
    if flatten or len(shape) <= 1:
        return 1, numel, False
    if row_wise:
        return numel // shape[0], shape[0], True
    return numel // shape[-1], shape[-1], False


def groups(count: int, length: int) -> Iterator[tuple[int, int]]:
    """(first vector, end vector): groups covering every vector, each at most one block of
    entries or a single vector (with their float64 statistics, a few numbers per vector)."""
    width = max(1, min(count, BLOCK // max(length, MIN_LENGTH)))
    for v in range(0, count, width):
        yield v, min(count, v + width)


@merge_method(
    "nuslerp",
    "spherical interpolation of two models (of their task vectors when a base is given)",
    base=OPTIONAL,
    models=(2, 2),
    memory=blocked(float32_temps_per_input=4, float32_temps=12),
)
def nuslerp(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    weight: Annotated[PerModel[float], Param("this model's weight; t = w2 / (w1 + w2)")],
    nuslerp_row_wise: Annotated[
        bool, Param("interpolate slices along the first axis (columns of a matrix)")
    ] = False,
    nuslerp_flatten: Annotated[bool, Param("interpolate the whole tensor as one vector")] = True,
    out_dtype: torch.dtype | None = None,  # None: float32
) -> torch.Tensor:
    """Spherical interpolation between two models (task vectors when `base` is given).

    >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    >>> nuslerp(None, [a, b], weight=[1.0, 1.0])
    tensor([0.7071, 0.7071])
    >>> nuslerp(torch.tensor([1.0, 1.0]), [a + 1, b + 1], weight=[1.0, 3.0])
    tensor([1.3827, 1.9239])
    """
    out_dtype = out_dtype or torch.float32
    first = models[0]
    shape = first.shape
    out = torch.empty(shape, dtype=out_dtype, device=first.device)
    if first.numel() == 0:
        return out
    t = interpolation_t([float(w) for w in weight])
    count, length, columns = vector_layout(shape, nuslerp_row_wise, nuslerp_flatten)

    def vectors(tensor: torch.Tensor) -> torch.Tensor:
        # [vectors, positions], a view of the tensor (strided when the vectors are columns).
        return tensor.reshape(length, count).T if columns else tensor.reshape(count, length)

    x1, x2 = (vectors(m) for m in models)
    b = vectors(base) if base is not None else None
    result = vectors(out)
    for v0, v1 in groups(count, length):
        pair = [x1[v0:v1], x2[v0:v1]]
        ref = b[v0:v1] if b is not None else None
        sums = row_grams(pair, ref)  # |v1|^2, <v1, v2>, |v2|^2 per vector
        c1, c2 = nuslerp_coefficients(t, sums[:, 0], sums[:, 2], sums[:, 1])
        combine_rows(pair, ref, torch.stack([c1, c2], 1), result[v0:v1])
    return out
