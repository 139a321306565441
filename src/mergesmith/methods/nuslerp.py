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

Memory stays flat: vectors are processed in panels that fit one block (ops.blocks). When one
vector is longer than a block, a first pass sums the squared norms and the dot product of each
vector (in float64), and a second pass writes c1 v1 + c2 v2.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Annotated

import torch

from mergesmith.methods.registry import OPTIONAL, Param, PerModel, blocked, merge_method
from mergesmith.ops.blocks import BLOCK

NORM_FLOOR = 1e-7  # mergekit clamps a vector's norm to this before normalising it
COLINEAR_EPS = 1e-8  # colinear when 1 - cos^2 <= COLINEAR_EPS ** 2
ZERO_WEIGHTS = 1e-6  # |w1 + w2| below this: t = 1/2
# Vectors shorter than this still count as this long when sizing a panel, which bounds the
# per-vector temporaries (a dozen float64 values each) by a few blocks' worth.
MIN_LENGTH = 8
# Vectors per panel when one vector is longer than a block (then read in two passes).
WIDE_PANEL = 64


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


def panels(count: int, length: int) -> Iterator[tuple[int, int, list[tuple[int, int]]]]:
    """(first vector, end vector, position ranges) covering every vector; each piece (vectors x
    one position range) holds at most one block of entries."""
    if length <= BLOCK:
        width = max(1, min(count, BLOCK // max(length, MIN_LENGTH)))
        spans = [(0, length)]
    else:
        width = min(count, WIDE_PANEL)
        step = BLOCK // width
        spans = [(p, min(length, p + step)) for p in range(0, length, step)]
    for v in range(0, count, width):
        yield v, min(count, v + width), spans


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
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Spherical interpolation between two models (task vectors when `base` is given).

    >>> a, b = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 1.0])
    >>> nuslerp(None, [a, b], weight=[1.0, 1.0])
    tensor([0.7071, 0.7071])
    >>> nuslerp(torch.tensor([1.0, 1.0]), [a + 1, b + 1], weight=[1.0, 3.0])
    tensor([1.3827, 1.9239])
    """
    first = models[0]
    shape = first.shape
    out = torch.empty(shape, dtype=out_dtype, device=first.device)
    if first.numel() == 0:
        return out
    t = interpolation_t([float(w) for w in weight])
    count, length, columns = vector_layout(shape, nuslerp_row_wise, nuslerp_flatten)
    matrix_shape = (length, count) if columns else (count, length)
    x1, x2 = (m.reshape(matrix_shape) for m in models)
    b = base.reshape(matrix_shape) if base is not None else None
    result = out.view(matrix_shape)

    def piece(matrix: torch.Tensor, v0: int, v1: int, p0: int, p1: int) -> torch.Tensor:
        # Always [vectors, positions], a view of the input.
        return matrix[p0:p1, v0:v1].T if columns else matrix[v0:v1, p0:p1]

    def deltas(v0: int, v1: int, p0: int, p1: int) -> tuple[torch.Tensor, ...]:
        # Task vectors rounded to float32 as mergekit forms them, then widened.
        if b is None:
            return tuple(piece(x, v0, v1, p0, p1).double() for x in (x1, x2))
        ref = piece(b, v0, v1, p0, p1).float()
        return tuple((piece(x, v0, v1, p0, p1).float() - ref).double() for x in (x1, x2))

    def write(
        v0: int,
        v1: int,
        p0: int,
        p1: int,
        d: tuple[torch.Tensor, ...],
        c1: torch.Tensor,
        c2: torch.Tensor,
    ) -> None:
        mixed = d[0] * c1[:, None]
        mixed.add_(d[1] * c2[:, None])
        if b is not None:
            mixed.add_(piece(b, v0, v1, p0, p1))
        target = result[p0:p1, v0:v1] if columns else result[v0:v1, p0:p1]
        target.copy_(mixed.T if columns else mixed)

    for v0, v1, spans in panels(count, length):
        sums = torch.zeros(3, v1 - v0, dtype=torch.float64, device=first.device)
        kept = None
        for p0, p1 in spans:
            d = deltas(v0, v1, p0, p1)
            sums[0] += (d[0] * d[0]).sum(dim=1)
            sums[1] += (d[1] * d[1]).sum(dim=1)
            sums[2] += (d[0] * d[1]).sum(dim=1)
            kept = d if len(spans) == 1 else None
        c1, c2 = nuslerp_coefficients(t, sums[0], sums[1], sums[2])
        for p0, p1 in spans:
            # A panel that fits one block is read once; a longer one a second time.
            d = kept if kept is not None else deltas(v0, v1, p0, p1)
            write(v0, v1, p0, p1, d, c1, c2)
    return out
