"""The float32 sum of a few weights, in the order torch's CPU kernel adds them, without torch.

Linear merges and the family's plain sum divide by the sum of their weights, which mergekit
takes as `weights.sum()` of a float32 tensor; so do we, and the last bit of that divisor can
reach the output. The kernel route needs the same number without importing torch.

Torch's kernel (aten/src/ATen/native/cpu/SumKernel.cpp) sums fewer elements than a vector of
floats holds (8 or more, whatever the CPU) with its scalar `row_sum`: elements i < 4 * (n // 4)
go to four partial sums by i % 4, the rest onto the first, and the partials are added in order;
every sum starts at +0 and the result is added to an output that starts at +0. For n < 8 that
is

    ((((0 + x0 [+ x4 + x5 + x6]) + x1) + x2) + x3)   (each partial i also starts as 0 + xi)

each addition rounded to float32. Rounding a double's exact-or-correctly-rounded sum of two
float32 numbers to float32 gives the correctly rounded float32 sum (53 >= 2 * 24 + 2, so the
double rounding is innocuous), so Python floats compute it exactly. From 8 elements on, torch's
vector path takes over, whose lanes depend on the CPU: `float32_sum` then asks torch itself.

>>> float32_sum([0.1, 0.2, 0.3])
0.6000000238418579
>>> float32_sum([1e8, 1.0, -1e8])
0.0
"""

from __future__ import annotations

import struct
from collections.abc import Sequence

# Fewer elements than this are summed by torch's scalar path on every CPU.
SCALAR_LIMIT = 8
_FLOAT32 = struct.Struct("<f")


def _f32(x: float) -> float:
    """`x` rounded to float32 (inf where it overflows, as float32 arithmetic gives)."""
    try:
        return _FLOAT32.unpack(_FLOAT32.pack(x))[0]
    except OverflowError:
        return x * float("inf")


def float32_sum(values: Sequence[float]) -> float:
    """The values rounded to float32 and summed as `torch.tensor(values).sum()` does."""
    xs = [_f32(float(v)) for v in values]
    if len(xs) >= SCALAR_LIMIT:
        import torch

        return float(torch.tensor(xs, dtype=torch.float32).sum())
    partials = [0.0, 0.0, 0.0, 0.0]
    whole = len(xs) // 4 * 4
    for i in range(whole):
        partials[i % 4] = _f32(partials[i % 4] + xs[i])
    for x in xs[whole:]:
        partials[0] = _f32(partials[0] + x)
    total = partials[0]
    for partial in partials[1:]:
        total = _f32(total + partial)
    return _f32(0.0 + total)
