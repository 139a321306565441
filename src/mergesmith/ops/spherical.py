"""Sums over a few vectors that the spherical methods (multislerp, karcher) are built from:
their Gram matrix in one blocked pass, and a weighted combination in another. Together they make
a method whose arithmetic lives in N x N numbers run in flat memory."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergesmith.ops.blocks import block_ranges


def gram_matrix(models: Sequence[torch.Tensor], base: torch.Tensor | None) -> torch.Tensor:
    """G[i, j] = <d_i, d_j> in float64, d_i = models[i] - base rounded to float32 (models[i]
    itself without a base), accumulated block by block on the inputs' device; returned on the
    CPU (it is only N x N)."""
    flats = [m.reshape(-1) for m in models]
    flat_base = base.reshape(-1) if base is not None else None
    device = flats[0].device
    gram = torch.zeros(len(flats), len(flats), dtype=torch.float64, device=device)
    for _, start, end in block_ranges(flats[0].numel()):
        rows = torch.empty(len(flats), end - start, dtype=torch.float64, device=device)
        ref = flat_base[start:end].float() if flat_base is not None else None
        for row, flat in zip(rows, flats, strict=True):
            row.copy_(flat[start:end] if ref is None else flat[start:end].float() - ref)
        gram.addmm_(rows, rows.T)
    return gram.cpu()


def combine(
    models: Sequence[torch.Tensor],
    coefficients: Sequence[float],
    base: torch.Tensor | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """sum_i c_i d_i (+ base), with d_i as in `gram_matrix`; float64 sums, one rounding."""
    first = models[0]
    flats = [m.reshape(-1) for m in models]
    flat_base = base.reshape(-1) if base is not None else None
    out = torch.empty(first.numel(), dtype=out_dtype, device=first.device)
    for _, start, end in block_ranges(first.numel()):
        acc = torch.zeros(end - start, dtype=torch.float64, device=first.device)
        ref = flat_base[start:end].float() if flat_base is not None else None
        for flat, c in zip(flats, coefficients, strict=True):
            if c == 0.0:
                continue
            x = flat[start:end].float()
            acc.add_(x if ref is None else x - ref, alpha=c)
        if ref is not None:
            acc.add_(ref)
        out[start:end] = acc
    return out.reshape(first.shape)
