"""Exact sums of float32 values: the L1 norms behind `rescale`.

A float32 sum rounds after every addition, so its last bits depend on the order of the
additions, and torch picks that order per CPU instruction set (its generic and AVX2 kernels
sum some blocks differently) and per device. Summed exactly, the two norms, and the rescale
factor (their ratio, rounded once to a double), are the same whatever the machine, device,
block size or thread count, and whether the C kernels or the torch code ran.

Every float32 is a whole number of units of 2^-149, so the exact sum is an integer: it is kept
here in units of 2^-201, the unit the C kernels' 128-bit counts use (native/exact_sum.h).

>>> s = ExactSum()
>>> s.add(torch.tensor([1e30, 1.0, -1e30]))  # in float32, 1e30 + 1.0 is 1e30 again
>>> s.value()
1.0
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

UNIT_EXPONENT = -201
# Per call, one int64 count per exponent adds up to n significands below 2^24.
MAX_VALUES_PER_ADD = 1 << 39


@dataclass
class ExactSum:
    """The sum of float32 values, exactly: finite ones as an integer number of 2^-201 units,
    infinities and NaNs counted apart (they make the sum inf or NaN, as in float)."""

    units: int = 0
    infinities: int = 0
    nans: int = 0

    def add(self, values: torch.Tensor) -> None:
        """Add float32 values (or 16-bit ones, widened exactly), on any device: each value's
        significand is added to a count for its exponent (integer adds, so their order changes
        nothing)."""
        flat = values.detach().reshape(-1)
        if flat.dtype in (torch.float16, torch.bfloat16):
            flat = flat.float()
        flat = flat.contiguous()
        assert flat.dtype == torch.float32 and flat.numel() < MAX_VALUES_PER_ADD
        bits = flat.view(torch.int32).to(torch.int64)
        exponent = torch.bitwise_right_shift(bits, 23).bitwise_and_(0xFF)
        finite = exponent != 0xFF
        if not bool(finite.all()):
            self.infinities += int(torch.isinf(flat).sum())
            self.nans += int(torch.isnan(flat).sum())
            bits, exponent = bits[finite], exponent[finite]
        # A subnormal (exponent 0) has no implicit bit and the scale of exponent 1.
        significand = bits.bitwise_and(0x7FFFFF).bitwise_or_((exponent != 0).long() << 23)
        significand = torch.where(bits < 0, -significand, significand)
        counts = torch.zeros(256, dtype=torch.int64, device=flat.device)
        counts.index_add_(0, exponent.clamp_(min=1), significand)
        for e, count in enumerate(counts.tolist()):
            if count:
                # significand * 2^(e - 150), in units of 2^-201
                self.units += count << (e - 150 - UNIT_EXPONENT)

    def value(self) -> float:
        """The sum rounded once to a double (inf or NaN where such values were summed)."""
        if self.nans:
            return math.nan
        if self.infinities:
            return math.inf
        return self.units / (1 << -UNIT_EXPONENT)  # int / int is correctly rounded

    def ratio(self, other: ExactSum) -> float:
        """self / other, rounded once to a double (both finite and `other` nonzero), else the
        ratio of the rounded values."""
        if self.nans or self.infinities or other.nans or other.infinities:
            return self.value() / other.value()
        return self.units / other.units
