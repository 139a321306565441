"""The random stream of DARE, DELLA and arcee_fusion's sample: a keyed hash of the element
index, not a sequential generator, so any block of any tensor draws its numbers directly, in any
order, on any thread.

Element i of a stream with key K draws SplitMix64's output number i + 1 for seed K (Steele,
Lea and Flood 2014; it passes BigCrush):

    z = K + (i + 1) * 0x9E3779B97F4A7C15             (mod 2^64)
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9
    z = (z ^ (z >> 27)) * 0x94D049BB133111EB
    u = z >> 40                                       (its top 24 bits; SplitMix64's last
                                                       step, z ^ (z >> 31), leaves them alone)

K is the 63-bit seed of (--seed, model, tensor) (plan.jobs.derive_seed). The C kernels compute
the same numbers (draw24 in native/kernels.c). Here the arithmetic runs on int64 tensors
(torch has no shifts for uint64), and is still exact: add and multiply wrap mod 2^64 in two's
complement, which is the uint64 result's bit pattern; `>>` is arithmetic on int64, so each
shift is followed by a mask that clears the copied sign bits, making it the logical shift.

A uniform draw u / 2^24 has 24 bits, so it is exact in float32. DARE keeps entry i when
u < ceil(d * 2^24) (the same as u / 2^24 < d for the real d); DELLA keeps it when
u / 2^24 < p_i in float32.
"""

from __future__ import annotations

import math

import torch

UNIT_BITS = 24
_GOLDEN = 0x9E3779B97F4A7C15
_MIX1 = 0xBF58476D1CE4E5B9
_MIX2 = 0x94D049BB133111EB


def _signed(value: int) -> int:
    """The int64 with the bit pattern of this uint64."""
    value &= (1 << 64) - 1
    return value - (1 << 64) if value >= 1 << 63 else value


def _shift_right(z: torch.Tensor, bits: int) -> torch.Tensor:
    """Logical z >> bits on an int64 holding a uint64 bit pattern."""
    return torch.bitwise_right_shift(z, bits).bitwise_and_((1 << (64 - bits)) - 1)


def _mixed(key: int, start: int, count: int, device: torch.device | str) -> torch.Tensor:
    """z for elements [start, start + count), before SplitMix64's last step."""
    z = torch.arange(start + 1, start + count + 1, dtype=torch.int64, device=device)
    z.mul_(_signed(_GOLDEN)).add_(_signed(key))
    z.bitwise_xor_(_shift_right(z, 30)).mul_(_signed(_MIX1))
    return z.bitwise_xor_(_shift_right(z, 27)).mul_(_signed(_MIX2))


def draws24(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The stream's 24-bit draws for elements [start, start + count), as int64.

    >>> draws24(0, 0, 2).tolist()  # SplitMix64(0): 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4
    [14819496, 7239838]
    """
    return _shift_right(_mixed(key, start, count, device), 64 - UNIT_BITS)


def positions(key: int, count: int, n: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """`count` indices in [0, n) drawn with replacement, from SplitMix64's outputs z_j: below
    2^32 entries, z_j's top 32 bits times n over 2^32 (a multiply-shift; the product is under
    2^64, so its int64 bit pattern is exact); from 2^32 entries on, (z_j >> 1) mod n. Either
    bias (at most n / 2^32, n / 2^63) is far below the sampling noise.

    >>> positions(0, 2, 1000).tolist()  # 0xE220A839 * 1000 >> 32, 0x6E789E6A * 1000 >> 32
    [883, 431]
    """
    if not 0 < n < 1 << 63:
        raise ValueError(f"positions draws from 1 to 2^63 - 1 entries, not {n}")
    z = _mixed(key, 0, count, device)
    z.bitwise_xor_(_shift_right(z, 31))  # SplitMix64's last step: the whole output
    if n >= 1 << 32:
        return _shift_right(z, 1).remainder_(n)
    return _shift_right(_shift_right(z, 32).mul_(n), 32)


def uniform(key: int, start: int, count: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The draws of elements [start, start + count) as float32 in [0, 1), each exact."""
    return draws24(key, start, count, device).to(torch.float32).mul_(2.0**-UNIT_BITS)


def keep_threshold(density: float) -> int:
    """The draws below this integer are kept with probability `density`: ceil(d * 2^24),
    computed exactly (scaling by a power of two is exact in a double)."""
    return min(1 << UNIT_BITS, max(0, math.ceil(density * (1 << UNIT_BITS))))


def keep_with_probability(
    key: int, start: int, count: int, density: float, device: torch.device | str = "cpu"
) -> torch.Tensor:
    """DARE's float 0/1 mask for elements [start, start + count)."""
    return draws24(key, start, count, device).lt_(keep_threshold(density)).to(torch.float32)
