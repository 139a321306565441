"""Fixed-size blocks of a flat tensor: the unit of work of the fused kernels.

Blocks keep every temporary small enough to stay in cache and bound a job's memory by the block,
not the tensor. No result depends on the block size: the random methods draw element i of their
stream (ops.stream) for entry i, whichever block it falls in.
"""

from __future__ import annotations

from collections.abc import Iterator

BLOCK = 1 << 18


def block_ranges(n: int, block: int = BLOCK) -> Iterator[tuple[int, int, int]]:
    """(block number, start, end) covering [0, n)."""
    for number, start in enumerate(range(0, n, block)):
        yield number, start, min(n, start + block)
