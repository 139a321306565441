"""Arcee Fusion: keep the base except where the model's change is unusually important, as
mergekit 0.1.5. With base B and model M, rows taken along the last dimension (a 1-D tensor is one
row):

    p, q = softmax(M_row) + 1e-8, softmax(B_row) + 1e-8
    kl_row = sum_k p_k log(p_k / q_k)                    one number per row
    importance = |M - B| * kl_row                        entry by entry
    q1, median, q3 = sorted importance at indices floor(f (n - 1)), f = 1/4, 1/2, 3/4
    threshold = median + 1.5 (q3 - q1)
    out = B + (M - B) * [importance >= threshold]

Tensors of more than 1e6 entries take the quartiles of 1e6 entries drawn with replacement. We
draw them from the model's random stream (ops.stream, keyed by `seeds[0]`, derived from the
run's --seed, the model and the tensor), so a run is reproducible on any device; mergekit draws
from torch's global generator, so its sampled quartiles differ from ours (and from run to run,
unless seeded).

Memory stays flat: the row divergences (one float per row) are computed once, then two passes
read the inputs block by block (the quartiles, then the combination); the divergences and the
sampled importances (at most 1e6 of them, with their indices) are the only things beyond one
block.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

import torch

from mergesmith.methods.registry import REFERENCE, JobSize, blocked, merge_method
from mergesmith.native import whole
from mergesmith.ops import stream
from mergesmith.ops.blocks import BLOCK

SAMPLE_SIZE = 1_000_000  # tensors larger than this take their quartiles from a sample this big
EPS = 1e-8  # added to both softmaxes, as mergekit does
# Per sampled entry at peak: its index (int64), the gathered inputs and their float32 copies,
# its row's divergence (float32), its importance and the selection's working copy of it (2 x
# float32), with room to spare.
SAMPLE_BYTES = 40

_blocked = blocked(float32_temps_per_input=2, float32_temps=8)


def _memory(job: JobSize) -> int:
    # Plus 4 bytes a row for the divergences: rows <= entries, and a tensor of over 1e6 rows
    # would have rows of one entry.
    return _blocked(job) + min(job.numel, SAMPLE_SIZE) * (SAMPLE_BYTES + 4)


def _as_rows(tensor: torch.Tensor) -> torch.Tensor:
    """Rows along the last dimension; a 0-D tensor is one row of one entry."""
    if tensor.dim() == 0:
        return tensor.reshape(1, 1)
    return tensor.reshape(math.prod(tensor.shape[:-1]), tensor.shape[-1])


def _row_groups(rows: int, length: int, block: int) -> Iterator[tuple[int, int]]:
    per_group = max(1, block // max(length, 1))
    for r0 in range(0, rows, per_group):
        yield r0, min(rows, r0 + per_group)


def _softmax_stats(row: torch.Tensor, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(max, sum of exp(x - max)) of one long row, read in column blocks."""
    top = torch.tensor(float("-inf"))
    for c0 in range(0, row.numel(), block):
        top = torch.maximum(top, row[c0 : c0 + block].float().max())
    total = torch.tensor(0.0)
    for c0 in range(0, row.numel(), block):
        total += (row[c0 : c0 + block].float() - top).exp_().sum()
    return top, total


def row_divergence(
    model: torch.Tensor, base: torch.Tensor, r0: int, r1: int, block: int = BLOCK
) -> torch.Tensor:
    """sum p log(p / q), p = softmax(model row) + 1e-8, q = softmax(base row) + 1e-8, for rows
    [r0, r1) of the 2-D views `model` and `base`: float32, shape (r1 - r0,)."""
    length = model.shape[1]
    if length <= block:
        p = torch.softmax(model[r0:r1].float(), dim=-1).add_(EPS)
        q = torch.softmax(base[r0:r1].float(), dim=-1).add_(EPS)
        return p.div(q).log_().mul_(p).sum(-1)
    # One row longer than a block: softmax as exp(x - max) / sum, the sums read block by block.
    assert r1 == r0 + 1
    row_m, row_b = model[r0], base[r0]
    top_m, total_m = _softmax_stats(row_m, block)
    top_b, total_b = _softmax_stats(row_b, block)
    kl = torch.zeros(1)
    for c0 in range(0, length, block):
        p = (row_m[c0 : c0 + block].float() - top_m).exp_().div_(total_m).add_(EPS)
        q = (row_b[c0 : c0 + block].float() - top_b).exp_().div_(total_b).add_(EPS)
        kl += p.div(q).log_().mul_(p).sum()
    return kl


def all_row_divergences(m2: torch.Tensor, b2: torch.Tensor, block: int = BLOCK) -> torch.Tensor:
    """`row_divergence` of every row of the 2-D views, group of rows by group of rows."""
    rows, length = m2.shape
    kl = torch.empty(rows, dtype=torch.float32)
    for r0, r1 in _row_groups(rows, length, block):
        kl[r0:r1] = row_divergence(m2, b2, r0, r1, block)
    return kl


def fusion_threshold(
    model: torch.Tensor,
    base: torch.Tensor,
    seed: int,
    block: int = BLOCK,
    kl: torch.Tensor | None = None,
) -> torch.Tensor:
    """median + 1.5 IQR of the importances (of a seeded sample of them for a large tensor);
    `kl`: the row divergences, if already computed."""
    m2, b2 = _as_rows(model), _as_rows(base)
    rows, length = m2.shape
    if kl is None:
        kl = all_row_divergences(m2, b2, block)
    n = rows * length
    drawn = None
    if n > SAMPLE_SIZE:
        drawn = stream.positions(seed, SAMPLE_SIZE, n)
    # mergekit's positions floor(f * (count - 1)) for f = 1/4, 1/2, 3/4 of the sorted
    # importances, computed in float32; exact for count <= 1e6, hence equal to these integer
    # divisions.
    count = n if drawn is None else drawn.numel()
    at = ((count - 1) // 4, (count - 1) // 2, 3 * (count - 1) // 4)
    # The kernel keeps sampled indices in 32 bits.
    if whole.handles(m2, b2) and n < 1 << 32:
        q1, median, q3 = (torch.tensor(v) for v in whole.fusion_quartiles(m2, b2, kl, drawn, at))
        return median + 1.5 * (q3 - q1)
    flat_m, flat_b = m2.reshape(-1), b2.reshape(-1)
    if drawn is not None:
        importance = (flat_m[drawn].float() - flat_b[drawn].float()).abs_()
        importance.mul_(kl[drawn.div_(length, rounding_mode="floor")])
    else:
        importance = (m2.float() - b2.float()).abs_().mul_(kl[:, None]).reshape(-1)
    # Order statistics need no sort: a selection finds each (NaN last, as a sort puts it).
    q1, median, q3 = (importance.kthvalue(k + 1).values for k in at)
    return median + 1.5 * (q3 - q1)


def fusion_merge(
    base: torch.Tensor,
    model: torch.Tensor,
    seed: int,
    out_dtype: torch.dtype | None = None,  # None: float32
    block: int = BLOCK,
) -> torch.Tensor:
    """The method's work, with the block size open for tests."""
    out_dtype = out_dtype or torch.float32
    if base.numel() == 0:  # no quartiles to take (mergekit fails here): nothing to merge
        return torch.empty(base.shape, dtype=out_dtype, device=base.device)
    m2, b2 = _as_rows(model), _as_rows(base)
    rows, length = m2.shape
    kl_rows = all_row_divergences(m2, b2, block)
    threshold = fusion_threshold(model, base, seed, block, kl_rows)
    out = torch.empty(rows, length, dtype=out_dtype, device=base.device)
    if whole.handles(m2, b2, out):
        whole.fusion_apply(m2, b2, kl_rows, float(threshold), out)
        return out.reshape(base.shape)
    for r0, r1 in _row_groups(rows, length, block):
        kl = kl_rows[r0:r1].unsqueeze(-1)
        for c0 in range(0, max(length, 1), block):
            c1 = min(length, c0 + block)
            b = b2[r0:r1, c0:c1].float()
            change = m2[r0:r1, c0:c1].float() - b
            keep = (change.abs() * kl >= threshold).float()
            out[r0:r1, c0:c1] = change.mul_(keep).add_(b)
    return out.reshape(base.shape)


# Non-finite inputs reach the output, entry by entry: out = B + (M - B) * mask, and a NaN or
# Inf in B or M makes M - B non-finite, so (M - B) * mask is Inf or NaN (Inf * 0) whatever the
# mask, and adding B keeps it non-finite.
@merge_method(
    "arcee_fusion",
    "keep the base except where the model's change is unusually important",
    base=REFERENCE,
    models=(1, 1),
    memory=_memory,
    finite_check="output",
    random=True,
)
def arcee_fusion(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    seeds: Sequence[int] = (),
    out_dtype: torch.dtype | None = None,  # None: float32
) -> torch.Tensor:
    """base + (model - base) where the importance |model - base| * KL(row) is an outlier.

    Of eight changes, only the large one passes median + 1.5 IQR of the importances:

    >>> base = torch.zeros(8)
    >>> model = torch.tensor([0.1, -0.1, 0.2, 0.1, -0.2, 0.1, 3.0, 0.1])
    >>> arcee_fusion(base, [model])
    tensor([0., 0., 0., 0., 0., 0., 3., 0.])
    """
    out_dtype = out_dtype or torch.float32
    assert base is not None
    return fusion_merge(base, models[0], seeds[0] if seeds else 0, out_dtype)
