"""Sums over a few vectors that the spherical methods (model_stock, nuslerp, multislerp, karcher)
are built from: their pairwise dot products in one pass, and a weighted combination in another.
Together they make a method whose arithmetic lives in N x N numbers run in flat memory.

Both passes run in the C kernels (native.whole) where they can, else in the torch code here;
both give the same bytes. That is why a sum has one fixed order, expressible with elementwise
operations alone (no reduction of torch's or of a BLAS, whose order varies with the build, the
CPU and the device): a vector is cut into chunks of `sum_width(length)` entries, the last padded
with zeros; each chunk is summed as a halving tree (x[k] + x[k + w/2], then again on the first
half, down to one value), and the chunk sums, padded with zeros to a power of two, the same way.
The products summed are exact (float32 values multiplied in float64), and a tree's rounding error
grows only with the logarithm of the length.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergesmith.native import whole
from mergesmith.ops.blocks import BLOCK

SUM_CHUNK = 1024  # the longest run summed as one tree; SUM_CHUNK in whole.c


def sum_width(length: int) -> int:
    """The chunk length of a vector of `length` entries: a power of two."""
    width = 1
    while width < min(length, SUM_CHUNK):
        width *= 2
    return width


def _halving_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum over the last axis (a power of two long) as a halving tree."""
    while x.shape[-1] > 1:
        half = x.shape[-1] // 2
        x = x[..., :half] + x[..., half:]
    return x[..., 0]


def _chunk_sums(products: torch.Tensor, width: int) -> torch.Tensor:
    """(rows, m) -> (rows, ceil(m / width)): each chunk's tree sum, the last chunk zero-padded."""
    rows, m = products.shape
    chunks = -(-m // width)
    padded = torch.nn.functional.pad(products, (0, chunks * width - m))
    return _halving_sum(padded.reshape(rows, chunks, width))


def _total(chunk_sums: torch.Tensor) -> torch.Tensor:
    """(rows, k) -> (rows,): the chunk sums, zero-padded to a power of two, as a tree."""
    slots = 1
    while slots < chunk_sums.shape[1]:
        slots *= 2
    return _halving_sum(torch.nn.functional.pad(chunk_sums, (0, slots - chunk_sums.shape[1])))


def pairs(n: int) -> list[tuple[int, int]]:
    """The (i, j), i <= j, of `row_grams`' columns, in their order."""
    return [(i, j) for i in range(n) for j in range(i, n)]


def _differences(
    models: Sequence[torch.Tensor], base: torch.Tensor | None, c0: int, c1: int
) -> list[torch.Tensor]:
    """d_i of columns [c0, c1) in float64: models[i] - base rounded to float32, or models[i]."""
    if base is None:
        return [m[:, c0:c1].double() for m in models]
    ref = base[:, c0:c1].float()
    return [(m[:, c0:c1].float() - ref).double() for m in models]


def row_grams(models: Sequence[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    """<d_i, d_j> of every row of the 2-D views `models` (and `base`), for each pair of `pairs`:
    (rows, n (n + 1) / 2) float64 on the CPU. d_i = models[i] - base, the difference rounded to
    float32 as mergekit forms it (models[i] itself without a base); products are exact in float64.
    The caller bounds rows x length: the torch code holds a few float64 copies of that much (or
    of one block, for rows longer than one)."""
    rows, length = models[0].shape
    if whole.handles(*models, base):
        return whole.gram(models, base, rows, length)
    width = sum_width(length)
    # Column spans of whole chunks, so that no chunk straddles two spans.
    span = max(width, BLOCK // max(rows, 1) // width * width)
    index = pairs(len(models))
    parts: list[list[torch.Tensor]] = [[] for _ in index]
    for c0 in range(0, length, span):
        d = _differences(models, base, c0, min(length, c0 + span))
        for p, (i, j) in enumerate(index):
            parts[p].append(_chunk_sums(d[i] * d[j], width))
    device = models[0].device
    empty = torch.zeros(rows, 0, dtype=torch.float64, device=device)
    return torch.stack([_total(torch.cat(part, 1) if part else empty) for part in parts], 1).cpu()


def gram_matrix(models: Sequence[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    """G[i, j] = <d_i, d_j> of the flat tensors (as in `row_grams`), float64, on the CPU."""
    flats = [m.reshape(1, -1) for m in models]
    sums = row_grams(flats, base.reshape(1, -1) if base is not None else None)[0]
    gram = torch.empty(len(models), len(models), dtype=torch.float64)
    for p, (i, j) in enumerate(pairs(len(models))):
        gram[i, j] = gram[j, i] = sums[p]
    return gram


def combine_rows(
    models: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    coefficients: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """out[r] = sum_i coefficients[r, i] d_i[r] (+ base[r]) for the 2-D views, d_i as in
    `row_grams`: float64 products, added term after term, then the base; one rounding to
    out's dtype (through float32, as torch converts float64 to 16-bit types)."""
    coefficients = coefficients.to(torch.float64)
    if whole.handles(*models, base, out):
        whole.combine(models, base, coefficients.cpu(), out)
        return
    rows, length = out.shape
    coefficients = coefficients.to(out.device)
    per_group = max(1, BLOCK // max(length, 1))
    for r0 in range(0, rows, per_group):
        r1 = min(rows, r0 + per_group)
        for c0 in range(0, length, BLOCK):
            c1 = min(length, c0 + BLOCK)
            group = [m[r0:r1] for m in models]
            ref = base[r0:r1] if base is not None else None
            d = _differences(group, ref, c0, c1)
            mixed = d[0] * coefficients[r0:r1, :1]
            for i in range(1, len(d)):
                mixed.add_(d[i] * coefficients[r0:r1, i : i + 1])
            if ref is not None:
                mixed.add_(ref[:, c0:c1].float())
            out[r0:r1, c0:c1] = mixed


def combine(
    models: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    base: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """sum_i c_i d_i (+ base) of the flat tensors, d_i as in `row_grams`, terms with c_i = 0
    left out; float64 sums, one rounding."""
    first = models[0]
    terms = [(m.reshape(1, -1), c) for m, c in zip(models, coefficients, strict=True) if c != 0.0]
    flat_base = base.reshape(1, -1) if base is not None else None
    out = torch.empty(1, first.numel(), dtype=out_dtype, device=first.device)
    if not terms:
        zero = torch.zeros(out.shape, dtype=torch.float64, device=first.device)
        out.copy_(zero if flat_base is None else zero.add_(flat_base.float()))
        return out.reshape(first.shape)
    weights = torch.tensor([[c for _, c in terms]], dtype=torch.float64)
    combine_rows([m for m, _ in terms], flat_base, weights, out)
    return out.reshape(first.shape)
