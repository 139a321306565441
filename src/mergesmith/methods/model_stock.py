"""Model Stock: move from the base toward the fine-tunes' average by an amount set by how much
their task vectors agree (Jang et al., https://arxiv.org/abs/2403.19522), as mergekit 0.1.5.

With base W0, N >= 2 fine-tunes W1..WN and offsets d_i = W_i - W0:

    cos_ij = clamp(<d_i, d_j> / max(|d_i| |d_j|, 1e-6), -1, 1)   for every pair i < j
    c      = mean of the cos_ij
    t      = N c / (1 + (N - 1) c),  or 0 when |1 + (N - 1) c| < 1e-6 (keep the base)
    out    = t * (W1 + ... + WN) / N + (1 - t) * W0

Without `filter_wise` each tensor is one flat vector and gets one t. With `filter_wise` every
row along the last dimension gets its own t (a 1-D tensor is one row, as in mergekit).

Memory stays flat: a group of rows that fits in a block (the whole tensor is one row unless
`filter_wise`) is read twice, first to sum the dot products of its offsets (float64 sums of
float32 products, in ops.spherical's fixed order) and find its t, then to write the combination
in float32. Both passes run in the C kernels where they can, reading each input once per pass.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Annotated

import torch

from mergesmith.methods.registry import REFERENCE, Param, blocked, merge_method
from mergesmith.native import whole
from mergesmith.ops.blocks import BLOCK
from mergesmith.ops.spherical import pairs, row_grams

NORM_PRODUCT_EPS = 1e-6  # mergekit clamps |d_i| |d_j| to at least this before dividing
SINGULAR_EPS = 1e-6  # |1 + (N - 1) c| below this: no finite t, the base is kept


def _as_rows(tensor: torch.Tensor, filter_wise: bool) -> torch.Tensor:
    """The 2-D view the method works on: one row (flat), or one row per last-dimension vector."""
    if filter_wise and tensor.dim() >= 2:
        return tensor.reshape(math.prod(tensor.shape[:-1]), tensor.shape[-1])
    return tensor.reshape(1, -1)


def _tiles(rows: int, length: int, count: int, block: int) -> Iterator[tuple[int, int]]:
    """(first row, end row): groups of whole rows that fit in a block with their statistics
    (count^2 float64 sums per row); one row at a time when a row is longer than a block."""
    per_group = max(1, block // (length + 2 * count * count + 8))
    for r0 in range(0, rows, per_group):
        yield r0, min(rows, r0 + per_group)


def _ratios(sums: torch.Tensor, n: int) -> torch.Tensor:
    """t of every row from its pair sums (ops.spherical.row_grams' columns), float32, shape
    (rows, 1)."""
    index = {pair: p for p, pair in enumerate(pairs(n))}
    norms = [sums[:, index[i, i]].sqrt() for i in range(n)]
    cos = torch.zeros(sums.shape[0], dtype=torch.float64)
    for i in range(n):
        for j in range(i + 1, n):
            product = (norms[i] * norms[j]).clamp(min=NORM_PRODUCT_EPS)
            cos += (sums[:, index[i, j]] / product).clamp(-1, 1)
    cos /= n * (n - 1) // 2
    denominator = 1 + (n - 1) * cos
    singular = denominator.abs() < SINGULAR_EPS
    safe = torch.where(singular, torch.ones_like(denominator), denominator)
    t = torch.where(singular, torch.zeros_like(cos), n * cos / safe)
    return t.float().unsqueeze(-1)


def _combine(
    group: Sequence[torch.Tensor], base: torch.Tensor, ratio: torch.Tensor, out: torch.Tensor
) -> None:
    """out = t * average + (1 - t) * base for the 2-D views of one group of rows."""
    if whole.handles(*group, base, out):
        whole.stock_combine(group, base, ratio, out)
        return
    length = out.shape[1]
    for c0 in range(0, length, BLOCK):
        c1 = min(length, c0 + BLOCK)
        # mergekit's order: sum(ws) / N, then t * average + (1 - t) * w0. `.float()` does
        # not copy a float32 input, so the first operation of each must make a new tensor.
        average = group[0][:, c0:c1].float() + group[1][:, c0:c1].float()
        for f in group[2:]:
            average += f[:, c0:c1].float()
        average.div_(len(group)).mul_(ratio)
        kept = base[:, c0:c1].float() * (1 - ratio)
        out[:, c0:c1] = average.add_(kept)


def stock_merge(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    filter_wise: bool,
    out_dtype: torch.dtype | None = None,  # None: float32
    block: int = BLOCK,
) -> torch.Tensor:
    """The method's work, with the row grouping's block size open for tests."""
    out_dtype = out_dtype or torch.float32
    base2 = _as_rows(base, filter_wise)
    flats = [_as_rows(m, filter_wise) for m in models]
    rows, length = base2.shape
    out = torch.empty(rows, length, dtype=out_dtype, device=base.device)
    for r0, r1 in _tiles(rows, length, len(flats), block):
        group = [f[r0:r1] for f in flats]
        ratio = _ratios(row_grams(group, base2[r0:r1]), len(group)).to(base.device)
        _combine(group, base2[r0:r1], ratio, out[r0:r1])
    return out.reshape(base.shape)


# Non-finite inputs reach the output: a NaN or Inf in a row makes an offset non-finite, so that
# row's dot products and norms are, and cos = dot / (norm * norm) is NaN (inf/inf, inf*0, NaN),
# hence t and the whole row of the output are NaN.
@merge_method(
    "model_stock",
    "move from the base toward the models' average by how much their task vectors agree",
    base=REFERENCE,
    models=(2, None),
    memory=blocked(float32_temps_per_input=3, float32_temps=6),
    finite_check="output",
)
def model_stock(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    filter_wise: Annotated[bool, Param("one ratio per row (last dimension), not per tensor")] = (
        False
    ),
    out_dtype: torch.dtype | None = None,  # None: float32
) -> torch.Tensor:
    """t * mean(models) + (1 - t) * base, t from the mean cosine of the task vectors.

    Two task vectors at 60 degrees (cos 1/2) give t = 2 * 0.5 / 1.5 = 2/3:

    >>> base = torch.zeros(2)
    >>> model_stock(base, [torch.tensor([1.0, 0.0]), torch.tensor([0.5, 0.75**0.5])])
    tensor([0.5000, 0.2887])
    """
    out_dtype = out_dtype or torch.float32
    assert base is not None
    return stock_merge(base, models, filter_wise, out_dtype)
