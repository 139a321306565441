"""The task-arithmetic family: task arithmetic, TIES, DARE, breadcrumbs, DELLA.

All eight methods are one computation (sparsify each task vector, weight, optionally elect signs,
sum, optionally normalise, scale by lambda) configured by a row of FAMILY. We follow mergekit's
TIES, which votes on *weighted* deltas and divides by the sum of agreeing weights; PEFT's votes
on unweighted deltas and divides by the count of agreeing models.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Annotated, Any

import torch

from mergesmith import native
from mergesmith.methods.registry import (
    REFERENCE,
    JobSize,
    Param,
    PerModel,
    blocked,
    in_unit_interval,
    merge_method,
    non_negative,
)
from mergesmith.ops import float_masks as fm
from mergesmith.ops import stream
from mergesmith.ops.blocks import BLOCK, block_ranges
from mergesmith.ops.consensus import disjoint_merge
from mergesmith.ops.exact_sum import ExactSum
from mergesmith.ops.float32_sum import float32_sum
from mergesmith.ops.rank_cut import (
    SAMPLE,
    Cut,
    CutRequest,
    NativeKeys,
    UnorderedKeys,
    find_cuts,
    sample_positions,
)
from mergesmith.ops.select import tie_averaged_ranks
from mergesmith.ops.sparsify import RESCALE_EPS

CONSENSUS_METHODS = ("sum", "count")
SPARSIFIERS = ("magnitude", "random", "magnitude_outliers", "della_magprune")


@dataclass(frozen=True)
class FamilyRow:
    consensus: str | None
    sparsifier: str | None
    normalize: bool
    rescale: bool
    description: str


FAMILY: dict[str, FamilyRow] = {
    "task_arithmetic": FamilyRow(None, None, False, False, "sum of weighted task vectors"),
    "ties": FamilyRow("sum", "magnitude", True, False, "TIES: trim, elect sign, disjoint mean"),
    "dare_ties": FamilyRow("sum", "random", False, True, "DARE random drop + TIES sign election"),
    "dare_linear": FamilyRow(None, "random", False, True, "DARE random drop, plain sum"),
    "breadcrumbs": FamilyRow(
        None, "magnitude_outliers", False, False, "drop outliers and small entries, plain sum"
    ),
    "breadcrumbs_ties": FamilyRow(
        "sum", "magnitude_outliers", False, False, "breadcrumbs + TIES sign election"
    ),
    "della": FamilyRow(
        "sum", "della_magprune", True, True, "DELLA rank-based drop + sign election"
    ),
    "della_linear": FamilyRow(None, "della_magprune", False, True, "DELLA drop, plain sum"),
}


def merge_task_vectors(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    weights: Sequence[float],
    *,
    densities: Sequence[float] | None = None,
    sparsifier: str | None = None,
    consensus: str | None = None,
    normalize: bool = False,
    rescale: bool = False,
    lambda_: float = 1.0,
    gammas: Sequence[float] | None = None,
    epsilons: Sequence[float] | None = None,
    seeds: Sequence[int] | None = None,
    out_dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """The whole family on plain tensors: base + lambda * combine(sparsify(X_i - base) * w_i).

    Inputs may be any float dtype (memory-mapped bf16, say); arithmetic is float32 and the
    result is rounded once to `out_dtype` (default: the base's dtype). The work goes block by
    block (see ops.blocks), so memory is bounded by a block, not by the tensor.
    """
    k = len(models)
    out_dtype = out_dtype or base.dtype
    if k == 0:
        return base.to(out_dtype, copy=True)
    n = base.numel()
    flat_base = base.reshape(-1)
    flats = [m.reshape(-1) for m in models]
    specs = model_plans(k, sparsifier, densities, gammas, epsilons, seeds, rescale)
    block = block_size_for(base.shape, sparsifier)
    shape2d = as_rows(base.shape)
    try:
        select_kept(specs, flat_base, flats, n, block)
    except UnorderedKeys:
        # NaN deltas are trimmed as if they were zero; the combining pass keeps them, so the
        # output still holds NaN wherever a kept entry did, for the engine's check to find.
        # Selection sees deltas only: a NaN base entry counts as a zero delta too.
        zeros = torch.zeros(n, dtype=torch.float32, device=flat_base.device)
        clean = [torch.nan_to_num(torch.sub(f, flat_base), nan=0.0) for f in flats]
        select_kept(specs, zeros, clean, n, block)
    for plan, flat in zip(specs, flats, strict=True):
        plan.measure_rescale(flat_base, flat, n, block, shape2d)
    weight_list = [float(w) for w in weights]
    combine = _Combine(
        flat_base,
        flats,
        specs,
        weight_list,
        consensus,
        normalize,
        summed_weight(weight_list),
        lambda_,
        shape2d,
        torch.empty(n, dtype=out_dtype),
    )
    fused = native.handles(flat_base, *flats, combine.out)
    run_block = combine.with_kernels if fused else combine.with_torch
    for number, start, end in block_ranges(n, block):
        run_block(number, start, end)
    return combine.out.reshape(base.shape)


def model_plans(
    k: int,
    sparsifier: str | None,
    densities: Sequence[float] | None,
    gammas: Sequence[float] | None,
    epsilons: Sequence[float] | None,
    seeds: Sequence[int] | None,
    rescale: bool,
) -> list[ModelPlan]:
    """Each of `k` models' sparsification, with merge_task_vectors' defaults."""
    return [
        ModelPlan(
            sparsifier,
            (densities or [1.0] * k)[i],
            (gammas or [0.01] * k)[i],
            (epsilons or [0.15] * k)[i],
            (seeds or list(range(k)))[i],
            rescale,
        )
        for i in range(k)
    ]


def mask_layout(n: int, block: int) -> tuple[int, int]:
    """(bytes a block, blocks) of a mask kept as one bit an entry, each block's bits starting
    on a byte of their own (a small tensor is one short block)."""
    return (min(block, n) + 7) // 8, -(-n // block)


def summed_weight(weights: Sequence[float]) -> float:
    """The weights' sum as the plain (no consensus) combination divides by it: in float32,
    as mergekit sums them, and 1 where that is nearly 0."""
    total = float32_sum(weights)
    return 1.0 if abs(total) < 1e-8 else total


@dataclass
class _Combine:
    """The combining pass over one tensor, one block at a time, into `out`. The C kernel and
    the torch code compute the same float32 operations in the same order."""

    base: torch.Tensor
    models: list[torch.Tensor]
    plans: list[ModelPlan]
    weights: list[float]
    consensus: str | None
    normalize: bool
    plain_divisor: float
    lambda_: float
    shape2d: tuple[int, int]
    out: torch.Tensor

    def with_kernels(self, number: int, start: int, end: int) -> None:
        """One block through the C kernel."""
        trims, masks = [], []  # masks must outlive the call
        for plan, model, weight in zip(self.plans, self.models, self.weights, strict=True):
            trim = plan.native_trim(start, end, weight)
            if trim.mode == native.TRIM_GIVEN:
                masks.append(plan.drawn_keep(self.base, model, number, start, end, self.shape2d))
                trim.keep = masks[-1].data_ptr()
                if masks[-1].dtype == torch.uint8:
                    trim.mode = native.TRIM_GIVEN_BITS
            trims.append(trim)
        native.family_block(
            native.flat(self.base),
            [native.flat(m) for m in self.models],
            trims,
            start,
            end,
            consensus=self.consensus,
            normalize=self.normalize,
            plain_divisor=self.plain_divisor,
            lambda_=self.lambda_,
            out=native.flat(self.out),
        )

    def with_torch(self, number: int, start: int, end: int) -> None:
        """One block with torch ops (any device)."""
        b = self.base[start:end].float()
        weighted = []
        for plan, model, weight in zip(self.plans, self.models, self.weights, strict=True):
            d = plan.sparsify(torch.sub(model[start:end], b), start, self.shape2d)
            weighted.append(d.mul_(weight))
        if self.consensus is not None:
            mixed, divisor = disjoint_merge(weighted, self.weights, self.consensus)
        else:
            mixed = weighted[0]
            for w in weighted[1:]:
                mixed.add_(w)
            divisor = self.plain_divisor
        if self.normalize:
            mixed.div_(divisor)
        if self.lambda_ != 1:
            mixed.mul_(self.lambda_)
        self.out[start:end].copy_(mixed.add_(b))


def select_kept(
    specs: list[ModelPlan], base: torch.Tensor, flats: list[torch.Tensor], n: int, block: int
) -> None:
    """Find every model's magnitude cuts in one shared sweep over the blocks."""
    wanted = []
    for plan, flat in zip(specs, flats, strict=True):
        request = plan.cut_request(base, flat, n)
        if request is not None:
            wanted.append((plan, request))
    if wanted:
        find_cuts([r for _, r in wanted], n, block, lambda s, e: base[s:e].float())
        for plan, request in wanted:
            plan.take_cuts(request, n)


def _below_in_float32(value: float) -> float:
    """The largest float32 below `value` (>= 0): turns a strict test into an inclusive one."""
    return float(torch.nextafter(torch.tensor(value), torch.tensor(0.0)))


def _large_limit(limit: float, *, inclusive: bool) -> float | None:
    """The hardshrink threshold that keeps |delta| > limit (>= when inclusive); None: keep all."""
    if inclusive:
        if limit <= 0:
            return None
        return _below_in_float32(limit)
    return limit


def _small_limit(limit: float, *, inclusive: bool) -> float | None:
    """The hardshrink threshold whose complement keeps |delta| <= limit (< when not inclusive);
    None: keep nothing."""
    if not inclusive:
        if limit <= 0:
            return None
        return _below_in_float32(limit)
    return limit


def _keep_large(delta: torch.Tensor, limit: float, *, inclusive: bool) -> torch.Tensor:
    """delta where |delta| > limit (>= when inclusive), else 0."""
    threshold = _large_limit(limit, inclusive=inclusive)
    return delta if threshold is None else torch.nn.functional.hardshrink(delta, threshold)


def _keep_small(delta: torch.Tensor, limit: float, *, inclusive: bool) -> torch.Tensor:
    """delta where |delta| <= limit (< when not inclusive), else 0."""
    threshold = _small_limit(limit, inclusive=inclusive)
    if threshold is None:
        return torch.zeros_like(delta)
    return delta - torch.nn.functional.hardshrink(delta, threshold)


def _cut_mask(
    magnitude: torch.Tensor, start: int, cut: Cut, *, upper: bool, descending: bool
) -> torch.Tensor:
    """Float mask of the entries on the kept side of a cut, where the key is |delta| (or
    -|delta| when `descending`): those strictly inside, and the cut's share of those equal to
    its key (spread over the whole tensor, see ops.rank_cut.Cut)."""
    limit = -cut.key if descending else cut.key  # the cut as a magnitude
    # The kept side in magnitudes: key <= v is |delta| >= -v when descending.
    larger_kept = descending == upper
    end = start + magnitude.numel()
    if cut.splits(start, end):
        tied = magnitude == limit
        strict = magnitude > limit if larger_kept else magnitude < limit
        return (strict | cut.tied_kept(tied, start)).to(magnitude.dtype)
    if larger_kept:
        return fm.at_least(magnitude, limit) if cut.keeps_all_tied else fm.above(magnitude, limit)
    return fm.at_most(magnitude, limit) if cut.keeps_all_tied else fm.below(magnitude, limit)


# Sparsifiers whose masks are drawn from the random stream, not cut by magnitude.
_DRAWN_KINDS = ("random", "della_magprune")


def block_size_for(shape: torch.Size, sparsifier: str | None) -> int:
    if sparsifier != "della_magprune":
        return BLOCK
    # DELLA ranks within rows, so its blocks hold whole rows.
    width = as_rows(shape)[1]
    return width * max(1, BLOCK // width)


def as_rows(shape: torch.Size) -> tuple[int, int]:
    """DELLA's rows: the first axis; a 1-D tensor is one row."""
    if len(shape) < 2:
        n = 1
        for d in shape:
            n *= d
        return 1, n
    rows = shape[0]
    n = 1
    for d in shape:
        n *= d
    return rows, n // max(1, rows)


class ModelPlan:
    """One model's sparsification, decided before the combining pass."""

    def __init__(
        self,
        kind: str | None,
        density: float,
        gamma: float,
        epsilon: float,
        seed: int,
        rescale: bool,
    ) -> None:
        self.kind = kind if kind is not None and density < 1 else None
        self.density, self.gamma, self.epsilon, self.seed = density, gamma, epsilon, seed
        self.rescale = rescale
        self.lower: Cut | None = None  # keep entries at or after this cut...
        self.upper: Cut | None = None  # ...and at or before this one
        # Magnitude cuts that keep nothing are found with the cuts (cut_request).
        self.keep_none = self.kind == "della_magprune" and density <= 0
        self.factor = 1.0
        # DARE's and DELLA's masks drawn while measuring for `rescale`, one bit per entry,
        # each block's at `block_bytes` * its number: the combining pass reads them back
        # instead of drawing again (DARE: several times dearer than reading a bit) or ranking
        # every row again (DELLA). Only the C kernel reads these. One buffer, not one per
        # block: small long-lived allocations pin freed memory in the heap.
        self.drawn_bits: torch.Tensor | None = None
        self.block_bytes = 0

    def cut_request(self, base: torch.Tensor, model: torch.Tensor, n: int) -> CutRequest | None:
        """What this model needs from the shared selection sweep, if anything."""
        if self.kind not in ("magnitude", "magnitude_outliers"):
            return None
        descending = self.kind == "magnitude"
        if n == 0 or (descending and self.density <= 0):
            self.keep_none = True
            return None

        def keys_of(start: int, end: int, b: torch.Tensor) -> torch.Tensor:
            a = torch.sub(model[start:end], b).abs_()
            return a.neg_() if descending else a

        source = NativeKeys(base, model, descending) if native.handles(base, model) else None
        if source is not None:
            sample = native.sample_keys(base, model, descending, SAMPLE)
        else:
            positions = sample_positions(n, base.device)
            sample = (model[positions].float() - base[positions].float()).abs_()
            if descending:
                sample.neg_()
        if descending:
            k = max(1, math.floor(self.density * n))
            return CutRequest(keys_of, sample, [k - 1], [True], native=source)
        target = math.floor(self.density * n)
        n_top = math.floor(self.gamma * n)
        n_bottom = max(0, n - target - n_top)
        if target <= 0:
            self.keep_none = True
            return None
        return CutRequest(
            keys_of, sample, [n_bottom, n_bottom + target - 1], [False, True], native=source
        )

    def take_cuts(self, request: CutRequest, n: int) -> None:
        if self.kind == "magnitude":
            (self.upper,) = request.cuts
            return
        lower, upper = request.cuts
        first, last = request.ranks
        self.lower = lower if first > 0 else None
        self.upper = upper if last < n - 1 else None
        if self.lower is not None and self.upper is not None and self.lower.key == self.upper.key:
            # Both ends of the window in one run: it keeps last - first + 1 of its entries
            # (lower.need + upper.need - tied), spread over the whole run. The lower cut carries
            # that share; the upper one keeps every tied entry and still drops larger keys.
            both = self.lower.need + self.upper.need - self.lower.tied
            cut = self.lower if self.lower.tied_before else self.upper
            self.lower = Cut(cut.key, both, cut.tied, cut.block, cut.tied_before)
            self.upper = Cut(cut.key, cut.tied, cut.tied)

    def measure_rescale(
        self, base: torch.Tensor, model: torch.Tensor, n: int, block: int, shape2d: tuple[int, int]
    ) -> None:
        """L1 norms of the whole and of the kept delta, for `rescale`."""
        if not self.measures:
            return
        if self.kind in _DRAWN_KINDS and native.handles(base, model):
            self.block_bytes, blocks = mask_layout(n, block)
            self.drawn_bits = torch.empty(self.block_bytes * blocks, dtype=torch.uint8)
        fused_dare = self.kind == "random" and self.drawn_bits is not None
        # Rows of one entry have no rank spread: those go the general way.
        fused_della = (
            self.kind == "della_magprune" and self.drawn_bits is not None and shape2d[1] > 1
        )
        # Exact sums (ops.exact_sum): the factor does not depend on how the work is cut.
        total, kept = ExactSum(), ExactSum()
        counted_total, counted_kept = native.NativeSum(), native.NativeSum()
        threshold = stream.keep_threshold(self.density)
        for number, start, end in block_ranges(n, block):
            if fused_dare:
                native.stream_measure(
                    native.flat(base),
                    native.flat(model),
                    start,
                    end,
                    self.seed,
                    threshold,
                    native.bits_at(self._drawn_block(number), end - start),
                    counted_total,
                    counted_kept,
                )
                continue
            if fused_della:
                native.della_measure(
                    native.flat(base),
                    native.flat(model),
                    start,
                    end,
                    shape2d[1],
                    self.seed,
                    2 * self.epsilon,
                    self.density - self.epsilon,
                    native.bits_at(self._drawn_block(number), end - start),
                    counted_total,
                    counted_kept,
                )
                continue
            d = torch.sub(model[start:end], base[start:end].float())
            total.add(d.abs())
            if self.drawn_bits is not None:
                # What sparsify does for these kinds (the factor is still 1), keeping the mask.
                keep = self.keep(d, start, shape2d)
                assert keep is not None
                native.pack_mask(keep, self._drawn_block(number))
                kept.add(d.mul_(keep).abs_())
            else:
                kept.add(self.sparsify(d, start, shape2d).abs_())
        counted_total.add_to(total)
        counted_kept.add_to(kept)
        self.take_norms(total, kept)

    @property
    def measures(self) -> bool:
        """Whether `rescale` needs this model's norms (a pass before the combining one)."""
        return self.rescale and self.kind is not None and not self.keep_none

    def take_norms(self, total: ExactSum, kept: ExactSum) -> None:
        """The rescale factor from the L1 norms of the whole and of the kept delta (1 where
        either is about 0)."""
        if total.value() >= RESCALE_EPS and kept.value() >= RESCALE_EPS:
            self.factor = total.ratio(kept)

    def keep(
        self, delta: torch.Tensor, start: int, shape2d: tuple[int, int]
    ) -> torch.Tensor | None:
        """Which entries of one block of the delta survive, as a float 0/1 mask (None: all)."""
        if self.kind is None:
            return None
        if self.keep_none:
            return torch.zeros_like(delta)
        if self.kind == "random":
            return self._random_keep(start, delta.numel(), delta.device)
        if self.kind == "della_magprune":
            return self._della_keep(delta.abs(), start, shape2d)
        magnitude = delta.abs()
        keep = None
        if self.lower is not None:
            keep = _cut_mask(magnitude, start, self.lower, upper=False, descending=False)
        if self.upper is not None:
            descending = self.kind == "magnitude"
            upper = _cut_mask(magnitude, start, self.upper, upper=True, descending=descending)
            keep = upper if keep is None else keep.mul_(upper)
        return keep

    def drawn_keep(
        self,
        base: torch.Tensor,
        model: torch.Tensor,
        number: int,
        start: int,
        end: int,
        shape2d: tuple[int, int],
    ) -> torch.Tensor:
        """DARE's or DELLA's `keep` for block [start, end) of flat inputs: the bits kept from
        measuring (uint8), or DELLA's float 0/1 mask."""
        if self.drawn_bits is not None:
            return self._drawn_block(number)
        delta = torch.sub(model[start:end], base[start:end].float())
        return self._della_keep(delta.abs_(), start, shape2d)

    def _drawn_block(self, number: int) -> torch.Tensor:
        assert self.drawn_bits is not None
        return self.drawn_bits[number * self.block_bytes : (number + 1) * self.block_bytes]

    def _random_keep(self, start: int, size: int, device: torch.device) -> torch.Tensor:
        if device.type == "cpu" and native.available():
            threshold = stream.keep_threshold(self.density)
            return native.stream_keep(self.seed, start, size, threshold=threshold)
        return stream.keep_with_probability(self.seed, start, size, self.density, device)

    def _della_keep(
        self, magnitude: torch.Tensor, start: int, shape2d: tuple[int, int]
    ) -> torch.Tensor:
        width = shape2d[1]
        rows = magnitude.reshape(-1, width)
        on_kernels = rows.device.type == "cpu" and native.available()
        if width > 1 and on_kernels:
            scale, offset = 2 * self.epsilon, self.density - self.epsilon
            return native.della_keep(rows.float(), self.seed, start, scale, offset)
        if width > 1:
            position = tie_averaged_ranks(rows).div_(width - 1)
            probability = position.mul_(2 * self.epsilon).add_(self.density - self.epsilon)
        else:
            # One entry has no rank spread; mergekit divides 0/0 here.
            probability = torch.full(rows.shape, self.density)
        if on_kernels:
            return native.stream_keep(self.seed, start, rows.numel(), probability=probability)
        draws = stream.uniform(self.seed, start, rows.numel(), rows.device)
        return torch.sub(probability.reshape(-1), draws).clamp_(min=0).sign_()

    def sparsify(self, delta: torch.Tensor, start: int, shape2d: tuple[int, int]) -> torch.Tensor:
        """One block of this model's delta, sparsified and rescaled (`delta` may be reused)."""
        if self.kind is None:
            return delta
        trimmed = self._trim_by_cuts(delta, start)
        if trimmed is None:
            keep = self.keep(delta, start, shape2d)
            trimmed = delta if keep is None else delta.mul_(keep)
        if self.factor != 1.0:
            trimmed.mul_(self.factor)
        return trimmed

    def native_trim(self, start: int, end: int, weight: float) -> native.Trim:
        """What `sparsify` then `* weight` do to the block [start, end), for the C kernel."""
        trim = native.Trim(mode=native.TRIM_KEEP_ALL, weight=weight)
        if self.kind is not None and self.factor != 1.0:
            trim.has_factor, trim.factor = 1, self.factor
        if self.kind is None:
            return trim
        if self.keep_none:
            trim.mode = native.TRIM_TIMES_ZERO
            return trim
        if self.kind == "della_magprune" or self.drawn_bits is not None:
            trim.mode = native.TRIM_GIVEN  # the caller supplies drawn_keep's mask
            return trim
        if self.kind == "random":
            trim.mode, trim.stream_key = native.TRIM_RANDOM, self.seed
            trim.threshold = stream.keep_threshold(self.density)
            return trim
        cuts = [c for c in (self.lower, self.upper) if c is not None]
        if any(c.splits(start, end) for c in cuts):
            trim.mode, trim.descending = native.TRIM_MASK, int(self.kind == "magnitude")
            if self.lower is not None:
                trim.has_lower, trim.lower_key = 1, self.lower.key
                trim.lower_need, trim.lower_tied = self.lower.need, self.lower.tied
                trim.lower_phase = self.lower.phase(start)
            if self.upper is not None:
                trim.has_upper, trim.upper_key = 1, self.upper.key
                trim.upper_need, trim.upper_tied = self.upper.need, self.upper.tied
                trim.upper_phase = self.upper.phase(start)
            return trim
        # The same limits as _trim_by_cuts, as hardshrink thresholds.
        trim.mode = native.TRIM_SHRINK
        if self.kind == "magnitude":
            assert self.upper is not None
            large = _large_limit(-self.upper.key, inclusive=self.upper.keeps_all_tied)
            if large is not None:
                trim.has_large, trim.large = 1, large
            return trim
        if self.lower is not None:
            large = _large_limit(self.lower.key, inclusive=self.lower.keeps_all_tied)
            if large is not None:
                trim.has_large, trim.large = 1, large
        if self.upper is not None:
            small = _small_limit(self.upper.key, inclusive=self.upper.keeps_all_tied)
            if small is None:
                trim.small_mode = native.SMALL_ZEROS
            else:
                trim.small_mode, trim.small = native.SMALL_SHRINK, small
        return trim

    def _trim_by_cuts(self, delta: torch.Tensor, start: int) -> torch.Tensor | None:
        """Magnitude cuts as hardshrink, one fused op, in every block holding no part of a tie
        run that a cut splits (there, equal keys are all kept or all dropped)."""
        if self.kind not in ("magnitude", "magnitude_outliers") or self.keep_none:
            return None
        end = start + delta.numel()
        cuts = [c for c in (self.lower, self.upper) if c is not None]
        if any(c.splits(start, end) for c in cuts):
            return None
        if self.kind == "magnitude":
            assert self.upper is not None
            # key = -|delta| <= v  <=>  |delta| >= -v.
            return _keep_large(delta, -self.upper.key, inclusive=self.upper.keeps_all_tied)
        kept = delta
        if self.lower is not None:
            kept = _keep_large(kept, self.lower.key, inclusive=self.lower.keeps_all_tied)
        if self.upper is not None:
            kept = _keep_small(kept, self.upper.key, inclusive=self.upper.keeps_all_tied)
        return kept


def _della_bounds(model_params: Mapping[str, Any]) -> str | None:
    d, eps = model_params.get("density", 1.0), model_params.get("epsilon", 0.15)
    if d >= 1:
        return None  # nothing is pruned, so epsilon plays no part
    if d - eps <= 0 or d + eps >= 1:
        return (
            f"density {d} +/- epsilon {eps} must stay inside (0, 1); "
            f"lower epsilon below {min(d, 1 - d):g}"
        )
    return None


def task_vector_merge(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    weight: Annotated[PerModel[float], Param("scale of this model's task vector")],
    density: Annotated[
        PerModel[float], Param("fraction of entries kept", in_unit_interval, default=1.0)
    ],
    gamma: Annotated[
        PerModel[float], Param("fraction of largest entries dropped", in_unit_interval, 0.01)
    ],
    epsilon: Annotated[
        PerModel[float], Param("spread of keep probability around density", non_negative, 0.15)
    ],
    normalize: Annotated[bool, Param("divide by the sum of weights")] = False,
    rescale: Annotated[bool, Param("restore each pruned vector's L1 norm")] = False,
    lambda_: Annotated[float, Param("scale of the merged task vector", name="lambda")] = 1.0,
    int8_mask: Annotated[bool, Param("accepted for mergekit; never changes results")] = False,
    consensus_method: Annotated[
        str | None,
        Param("sign election: sum, count, or null for none", choices=CONSENSUS_METHODS),
    ] = None,
    sparsifier: str | None = None,
    seeds: Sequence[int] = (),
    out_dtype: torch.dtype | None = None,  # None: float32
) -> torch.Tensor:
    """One row of the family, as a method: see merge_task_vectors."""
    out_dtype = out_dtype or torch.float32
    assert base is not None
    return merge_task_vectors(
        base,
        models,
        weight,
        densities=density,
        sparsifier=sparsifier,
        consensus=consensus_method,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        gammas=gamma,
        epsilons=epsilon,
        seeds=seeds,
        out_dtype=out_dtype,
    )


_BLOCKED = blocked()


def _drawn_memory(job: JobSize) -> int:
    """Blocked, plus the masks that DARE and DELLA keep from measuring `rescale` to combining:
    a bit per entry per input (the base counted too, an upper bound)."""
    return _BLOCKED(job) + job.inputs * -(-job.numel // 8)


# Parameters of the family function that a row without that sparsifier does not take.
_SPARSIFIER_PARAMS = {"density": None, "gamma": "magnitude_outliers", "epsilon": "della_magprune"}

for _name, _row in FAMILY.items():
    _unused = {
        name: 1.0 if name == "density" else 0.0
        for name, needs in _SPARSIFIER_PARAMS.items()
        if _row.sparsifier is None or (needs is not None and needs != _row.sparsifier)
    }
    merge_method(
        _name,
        _row.description,
        base=REFERENCE,
        memory=_drawn_memory if _row.sparsifier in _DRAWN_KINDS else _BLOCKED,
        # NaN and Inf survive every mask, weight and sum (x * 0 is NaN for them).
        finite_check="output",
        random=_row.sparsifier in _DRAWN_KINDS,
        defaults={
            "normalize": _row.normalize,
            "rescale": _row.rescale,
            "consensus_method": _row.consensus,
        },
        fixed={"sparsifier": _row.sparsifier, **_unused},
        check_model=_della_bounds if _row.sparsifier == "della_magprune" else None,
    )(task_vector_merge)
