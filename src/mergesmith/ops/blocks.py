"""Fixed-size blocks of a flat tensor: the unit of work of the fused kernels.

Blocks keep every temporary small enough to stay in cache and bound a job's memory by the block,
not the tensor. The block size is part of the random methods' definition (each block draws from
its own generator), so it is a constant, never a tuning knob.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch

BLOCK = 1 << 18


def block_ranges(n: int, block: int = BLOCK) -> Iterator[tuple[int, int, int]]:
    """(block number, start, end) covering [0, n)."""
    for number, start in enumerate(range(0, n, block)):
        yield number, start, min(n, start + block)


def block_generator(seed: int, number: int) -> torch.Generator:
    """The generator of one block, a pure function of (seed, block number)."""
    mixed = (seed ^ ((number + 1) * 0x9E3779B97F4A7C15)) & ((1 << 63) - 1)
    return torch.Generator().manual_seed(mixed)
