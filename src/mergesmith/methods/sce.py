"""SCE (select, calculate, erase), as mergekit 0.1.5's `sce`.

With task vectors d_i = X_i - B for the K models, per tensor of N entries:

1. Select (only when `select_topk` < 1). v_j = (1/K) sum_i (d_ij - mean_i d_ij)^2 is the
   population variance of entry j across the models. Of the M entries with v_j != 0, the
   k = floor(M * select_topk) of largest variance are kept; every d_i is zeroed elsewhere.
   M * select_topk is computed in float32, as mergekit computes it (so 100 * 0.29 gives 29).
2. Calculate. Each model's weight is the mean square of its selected task vector,
   m_i = (1/N) sum_j d_ij^2, normalised: w_i = m_i / sum_i m_i, or 1/K when sum_i m_i < 1e-6.
3. Erase. The elected sign s_j is +1 where sum_i d_ij >= 0, else -1 (TIES' `sum` rule, on the
   unweighted deltas); model i takes part in entry j when sign(d_ij) = s_j (zeros never do).

    out_j = B_j + sum_i [agree_ij] w_i d_ij / max(sum_i [agree_ij] w_i, 1e-6)

`int8_mask` only changes mergekit's memory use, never the result.

Ties at the selection's cut. mergekit picks the k entries with torch.topk, whose order among
equal variances is unspecified. Here every entry of variance above the cut value is kept, and of
the T entries whose variance equals it, the `need` still wanted are spread evenly over them in
flat-index order (the j-th is kept when floor((j+1) need / T) > floor(j need / T)): the rule
SEMANTICS.md section 3 gives for magnitude trimming, so the kept share of a tied value does not
depend on the row it sits in.

Memory stays flat: the work goes block by block (ops.blocks), in passes over the inputs. With a
selection: one pass counts the nonzero variances, the rank cut (ops.rank_cut, which applies the
same spread rule to the task-arithmetic family's magnitude cuts) sweeps to find the cut value
and how many entries share it (and, only when the cut splits that run, one more pass counts it
per block), a pass sums each model's squared selected delta and keeps the selection as one bit
per entry, and the last pass combines. Without a selection, only the last two. Variances are
recomputed in each pass that needs them rather than stored.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Annotated

import torch

from mergesmith.methods.registry import (
    REFERENCE,
    JobSize,
    Param,
    blocked,
    in_unit_interval,
    merge_method,
)
from mergesmith.ops import float_masks as fm
from mergesmith.ops.blocks import BLOCK, block_ranges
from mergesmith.ops.consensus import elect_sign
from mergesmith.ops.rank_cut import CutRequest, find_cuts, sample_positions
from mergesmith.ops.select import spread_mask

# mergekit's constants: below this sum of mean squares the weights are uniform; the divisor of
# the erased mean never goes below this.
UNIFORM_BELOW = 1e-6
DIVISOR_FLOOR = 1e-6


def _memory(job: JobSize) -> int:
    """Block temporaries (the deltas, the variance's float64 sums, the masks and sums of the
    combine); the selection kept as bits (1/8 byte per entry); and the rank cut's candidates
    near the cut (about 1.6% of the entries at 8 bytes each, twice over while they are
    concatenated: bounded by 1/2 byte per entry)."""
    return blocked(float32_temps_per_input=2, float32_temps=8)(job) + job.numel * 5 // 8


@merge_method(
    "sce",
    "SCE: keep high-variance entries, weight models by mean square, elect signs",
    base=REFERENCE,
    models=(1, None),
    memory=_memory,
)
def sce(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    select_topk: Annotated[
        float,
        Param("fraction of the entries of nonzero variance kept", check=in_unit_interval),
    ] = 1.0,
    int8_mask: Annotated[bool, Param("accepted for mergekit; never changes results")] = False,
    out_dtype: torch.dtype | None = None,  # None: float32
) -> torch.Tensor:
    """B + the sign-erased, mean-square-weighted mean of the selected task vectors.

    Entries 0 and 1 have the largest variances (2.25 and 1), so select_topk=0.7 keeps those
    two; the weights are the mean squares 5/3 and 10/3 over their sum; model 1's delta -1
    disagrees with the elected sign at entry 0:

    >>> b, x, y = torch.zeros(3), torch.tensor([2.0, 1.0, 1.0]), torch.tensor([-1.0, 3.0, 0.0])
    >>> sce(b, [x, y], select_topk=0.7)
    tensor([2.0000, 2.3333, 0.0000])
    >>> sce(b, [x, y])
    tensor([2.0000, 2.2500, 1.0000])
    """
    out_dtype = out_dtype or torch.float32
    assert base is not None
    n = base.numel()
    flat_base = base.reshape(-1)
    flats = [m.reshape(-1) for m in models]
    cut: _VarianceCut | None = None
    if select_topk < 1:
        cut = _variance_cut(flat_base, flats, select_topk, n)
        if cut is None:  # nothing selected: every task vector is zero
            return base.to(out_dtype, copy=True)
    weights, kept = _weights(flat_base, flats, cut, n)
    out = torch.empty(n, dtype=out_dtype, device=base.device)
    for number, start, end in block_ranges(n):
        b, deltas = _deltas(flat_base, flats, start, end)
        if kept is not None:
            keep = _unpack(kept, number, end - start)
            for d in deltas:
                d.mul_(keep)
        elected = elect_sign(deltas, "sum")
        merged = divisor = None
        for d, w in zip(deltas, weights, strict=True):
            # sign(0) = 0 never equals +-1: exact zeros never agree.
            erased = torch.sign(d).eq_(elected).mul_(w)
            d.mul_(erased)
            merged = d if merged is None else merged.add_(d)
            divisor = erased if divisor is None else divisor.add_(erased)
        assert merged is not None and divisor is not None
        # b may be the base itself (a float32 input), so it is never written to.
        out[start:end].copy_(merged.div_(divisor.clamp_(min=DIVISOR_FLOOR)).add_(b))
    return out.reshape(base.shape)


def _deltas(
    base: torch.Tensor, models: list[torch.Tensor], start: int, end: int
) -> tuple[torch.Tensor, list[torch.Tensor]]:
    """The base block in float32 and each model's task vector over [start, end)."""
    b = base[start:end].float()
    return b, [torch.sub(m[start:end], b) for m in models]


def _variance(deltas: list[torch.Tensor]) -> torch.Tensor:
    """Population variance across models of each entry, as float32: the numbers mergekit's
    torch.var(dim=0, unbiased=False) gives on the CPU. That runs Welford's update in float64,
    one model after the other, and rounds once; these are its operations in its order (the
    first update, from zero, just copies the first model), several times faster than
    torch.var's generic reduction. NaN counts as +inf, where torch.topk places it."""
    if len(deltas) == 1:
        return torch.zeros_like(deltas[0])
    mean = deltas[0].double()
    m2 = None
    for count, delta in enumerate(deltas[1:], start=2):
        x = delta.double()
        step = torch.sub(x, mean)
        mean.add_(torch.div(step, count))
        x.sub_(mean).mul_(step)
        m2 = x if m2 is None else m2.add_(x)
    assert m2 is not None
    var = m2.div_(len(deltas)).float()
    return var.nan_to_num_(nan=math.inf, posinf=math.inf, neginf=-math.inf)


@dataclass
class _VarianceCut:
    """The selection: entries of variance above `value`, and either all entries equal to it
    (`all_tied`) or `need` of the `tied` entries equal to it, spread evenly over them in
    flat-index order."""

    value: float
    all_tied: bool = False
    need: int = 0
    tied: int = 0

    def keep(self, var: torch.Tensor, seen: int) -> tuple[torch.Tensor, int]:
        """Float 0/1 mask of one block's kept entries, given the tied entries in earlier
        blocks (`seen`); returns the mask and the tied count after this block. Blocks must come
        in order."""
        if self.all_tied:
            return fm.at_least(var, self.value), seen
        if self.need == 0:
            return fm.above(var, self.value), seen
        keep = fm.above(var, self.value)
        tied = var == self.value
        count = int(tied.sum())
        if count:
            phase = seen * self.need % self.tied
            keep.add_(spread_mask(tied, self.need, self.tied, phase).to(keep.dtype))
        return keep, seen + count


def _variance_cut(
    base: torch.Tensor, models: list[torch.Tensor], select_topk: float, n: int
) -> _VarianceCut | None:
    """The entries step 1 keeps, or None when it keeps none."""
    if select_topk <= 0 or n == 0:
        return None
    nonzero = 0
    for _, start, end in block_ranges(n):
        nonzero += int(torch.count_nonzero(_variance(_deltas(base, models, start, end)[1])))
    # mergekit multiplies the count (a tensor) by the fraction: float32 arithmetic.
    k = int(torch.tensor(nonzero, dtype=torch.int64) * select_topk)
    if k <= 0:
        return None
    if k >= nonzero:
        return _VarianceCut(0.0)  # every nonzero variance

    def keys(start: int, end: int, b: torch.Tensor) -> torch.Tensor:
        # Descending variance is ascending -variance; the k-th largest is rank k - 1.
        return _variance([torch.sub(m[start:end], b) for m in models]).neg_()

    positions = sample_positions(n, base.device)
    sample = _variance([torch.sub(m[positions], base[positions].float()) for m in models]).neg_()
    request = CutRequest(keys, sample, [k - 1], [True])
    find_cuts([request], n, BLOCK, lambda start, end: base[start:end].float())
    (found,) = request.cuts
    assert found is not None
    value = -found.key
    if found.keeps_all_tied:
        return _VarianceCut(value, all_tied=True)
    return _VarianceCut(value, need=found.need, tied=found.tied)


def _weights(
    base: torch.Tensor, models: list[torch.Tensor], cut: _VarianceCut | None, n: int
) -> tuple[list[float], torch.Tensor | None]:
    """Each model's mean square of its selected task vector, normalised to sum 1 (uniform when
    the mean squares sum below 1e-6), in float32 as mergekit computes them; and the selection
    as bits (one per entry, see _pack), so the combining pass need not compute variances
    again."""
    k = len(models)
    squares = [0.0] * k
    kept = None if cut is None else torch.empty((n + 7) // 8, dtype=torch.uint8, device=base.device)
    seen = 0
    for number, start, end in block_ranges(n):
        deltas = _deltas(base, models, start, end)[1]
        if cut is not None and kept is not None:
            keep, seen = cut.keep(_variance(deltas), seen)
            _pack(keep, kept, number)
            deltas = [d.mul_(keep) for d in deltas]
        for i, d in enumerate(deltas):
            squares[i] += float(torch.dot(d, d))
    means = torch.tensor([s / max(1, n) for s in squares], dtype=torch.float32)
    total = float(means.sum())
    if abs(total) < UNIFORM_BELOW:
        weights = torch.ones(k, dtype=torch.float32) / k
    else:
        weights = means / total
    return [float(w) for w in weights], kept


def _pack(keep: torch.Tensor, into: torch.Tensor, number: int) -> None:
    """Block `number`'s 0/1 mask as bits: entry i of the block is bit i % 8 of its byte i // 8,
    the block's bytes starting at number * BLOCK / 8."""
    size = keep.numel()
    bits = torch.zeros(-(-size // 8) * 8, dtype=torch.uint8, device=keep.device)
    bits[:size] = keep.to(torch.uint8)
    values = torch.tensor([1, 2, 4, 8, 16, 32, 64, 128], dtype=torch.uint8, device=keep.device)
    packed = bits.view(-1, 8).mul_(values).sum(dim=1, dtype=torch.uint8)
    offset = number * (BLOCK // 8)
    into[offset : offset + packed.numel()] = packed


def _unpack(kept: torch.Tensor, number: int, size: int) -> torch.Tensor:
    """Block `number`'s mask (float32 0/1, `size` entries) from its bits."""
    offset = number * (BLOCK // 8)
    packed = kept[offset : offset + -(-size // 8)]
    shifts = torch.arange(8, dtype=torch.uint8, device=kept.device)
    bits = packed.unsqueeze(1).bitwise_right_shift(shifts).bitwise_and_(1)
    return bits.reshape(-1)[:size].float()
