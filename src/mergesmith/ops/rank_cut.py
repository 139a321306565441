"""Exact rank cuts over tensors read block by block, in about one pass.

A cut is the entry at rank r when entries are ordered by key ascending. Where the cut splits a
run of equal keys, the run's entries on the kept side are not the first ones by index: the
`need` of its T entries that the cut keeps are spread evenly over the run in flat-index order
(SEMANTICS.md 3, `ops.select.spread_mask`), so the kept set is exact, machine-independent and
fair to every row. A strided sample brackets each cut's key; one sweep counts the entries below
the bracket and at its two ends (those per block too, so that each block can later decide its
share of a split run alone) and collects the few strictly inside; a quickselect among those
gives the key. If a bracket misses (rare), it widens and the sweep reruns.

Requests whose keys the C kernels can compute themselves (`NativeKeys`) sweep there, a pass
each at memory speed; the others run the torch code below. Both count the same entries.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mergesmith import native
from mergesmith.ops.blocks import block_ranges
from mergesmith.ops.select import spread_mask

SAMPLE = 1 << 16


@dataclass(frozen=True)
class Cut:
    """A cut at a run of equal keys: every entry strictly on the kept side of `key` is kept,
    and `need` of the `tied` entries equal to it, spread evenly over them in flat-index order.

    `tied_before[b]` counts the tied entries before block b (blocks of `block` entries; one
    more item holds the total), so any block can be decided alone. Only a cut that keeps some
    but not all of its run has them."""

    key: float
    need: int
    tied: int
    block: int = 0
    tied_before: tuple[int, ...] = ()

    @property
    def keeps_all_tied(self) -> bool:
        return self.need >= self.tied

    def splits(self, start: int, end: int) -> bool:
        """Whether block [start, end) holds tied entries of which only some are kept."""
        if self.need <= 0 or self.keeps_all_tied:
            return False
        number = start // self.block
        assert start == number * self.block, "blocks must start where the cut's blocks do"
        return self.tied_before[number + 1] > self.tied_before[number]

    def phase(self, start: int) -> int:
        """The spread rule's state at the block starting at `start`: (tied entries before it *
        need) mod tied (see spread_mask); 0 when the cut keeps all or none of its run."""
        if not self.tied_before:
            return 0
        return self.tied_before[start // self.block] * self.need % self.tied

    def tied_kept(self, tied: torch.Tensor, start: int) -> torch.Tensor:
        """Which of a block's entries equal to `key` (`tied`, 1-D bool) the cut keeps."""
        return spread_mask(tied, self.need, self.tied, self.phase(start))


# (start, end, base block as float32) -> float32 keys of that block
KeyFn = Callable[[int, int, "torch.Tensor"], "torch.Tensor"]


@dataclass
class CutRequest:
    """Cuts wanted over one key function: `ranks[i]` is an upper cut (keep the ranks at or
    before it) when `upper[i]`, else a lower cut (keep those at or after it); a run of equal
    keys the rank falls in keeps its share, spread (see Cut)."""

    keys: KeyFn
    sample: torch.Tensor
    ranks: list[int]
    upper: list[bool]
    cuts: list[Cut | None] = field(default_factory=list)
    native: NativeKeys | None = None


@dataclass(frozen=True)
class NativeKeys:
    """The keys of a request in a form the C kernels compute themselves: |model - base|,
    negated when `descending` (flat, contiguous CPU tensors)."""

    base: torch.Tensor
    model: torch.Tensor
    descending: bool


def find_cuts(
    requests: list[CutRequest],
    n: int,
    block: int,
    base_block: Callable[[int, int], torch.Tensor],
) -> None:
    """Fill each request's `cuts`, sweeping the blocks once for all requests together.

    Per bracket [lo, hi] the sweep counts entries below lo, equal to lo and equal to hi (those
    two per block too), and collects only those strictly between: low-precision deltas (bf16)
    have few distinct values, so equal keys are common and counting them is far cheaper than
    collecting them. A cut at lo or hi that splits its run has that run's per-block counts
    from the same sweep; one strictly inside has the run's indices.
    """
    brackets: dict[tuple[int, int], tuple[float, float]] = {}
    for r, req in enumerate(requests):
        req.cuts = [None] * len(req.ranks)
        for c, rank in enumerate(req.ranks):
            brackets[r, c] = _bracket(req.sample, rank / max(1, n - 1))
    while brackets:
        if all(req.native is not None for req in requests):
            tallies, found = _sweep_native(requests, brackets, block)
        else:
            tallies, found = _sweep(requests, brackets, n, block, base_block)
        for (r, c), (lo, hi) in list(brackets.items()):
            req = requests[r]
            tally = tallies[r, c]
            below, equal_lo, equal_hi = tally.below, tally.equal_lo, tally.equal_hi
            if lo == hi:
                equal_hi = equal_lo
            values = torch.cat([v for v, _ in found[r, c]]) if found[r, c] else torch.empty(0)
            offset = req.ranks[c] - below
            inside = values.numel() if lo != hi else 0
            if offset < 0:
                brackets[r, c] = (-math.inf, lo)
                continue
            if offset >= equal_lo + inside + (equal_hi if lo != hi else 0):
                brackets[r, c] = (hi, math.inf)
                continue
            del brackets[r, c]
            if offset < equal_lo:
                cut = _run_cut(req.upper[c], lo, offset, equal_lo, tally.lo_blocks, block)
            elif offset < equal_lo + inside:
                key = float(torch.kthvalue(values, offset - equal_lo + 1).values)
                less = int((values < key).sum())
                # Every entry strictly inside the bracket was collected, so these are the run.
                equal_at = torch.cat([i for _, i in found[r, c]])[values == key]
                per_block = torch.bincount(equal_at.long() // block, minlength=-(-n // block))
                among = offset - equal_lo - less
                cut = _run_cut(
                    req.upper[c], key, among, equal_at.numel(), per_block.tolist(), block
                )
            else:
                among = offset - equal_lo - inside
                cut = _run_cut(req.upper[c], hi, among, equal_hi, tally.hi_blocks, block)
            req.cuts[c] = cut


def _run_cut(
    upper: bool, key: float, among: int, equal: int, per_block: list[int], block: int
) -> Cut:
    """The cut at the `among`-th (from 0) of the `equal` entries of a run, in key order: an
    upper cut keeps the run's first among + 1 places, a lower one its last equal - among.
    `per_block` counts the run's entries in each block; kept only when the cut splits it."""
    cut = Cut(key, among + 1 if upper else equal - among, equal)
    if cut.keeps_all_tied:
        return cut
    before = (0, *itertools.accumulate(per_block))
    if before[-1] != equal:
        raise AssertionError("the run's per-block counts do not add up to its size")
    return Cut(cut.key, cut.need, cut.tied, block, before)


@dataclass
class _Tally:
    """One bracket's counts over the whole tensor."""

    below: int = 0
    equal_lo: int = 0
    equal_hi: int = 0
    lo_blocks: list[int] = field(default_factory=list)  # equal to lo, per block
    hi_blocks: list[int] = field(default_factory=list)  # equal to hi, per block


Tallies = dict[tuple[int, int], _Tally]
Found = dict[tuple[int, int], list[tuple["torch.Tensor", "torch.Tensor"]]]


def _sweep(
    requests: list[CutRequest],
    brackets: dict[tuple[int, int], tuple[float, float]],
    n: int,
    block: int,
    base_block: Callable[[int, int], torch.Tensor],
) -> tuple[Tallies, Found]:
    """Per bracket: entries below lo, equal to lo, equal to hi, and those strictly inside."""
    index_dtype = torch.int32 if n < 2**31 else torch.int64
    tallies: Tallies = {key: _Tally() for key in brackets}
    inside = {
        (r, c): _Collector(_expected_inside(requests[r].sample, lo, hi, n) + block, index_dtype)
        for (r, c), (lo, hi) in brackets.items()
    }
    for _, start, end in block_ranges(n, block):
        b = base_block(start, end)
        for r, req in enumerate(requests):
            wanted = [c for c in range(len(req.ranks)) if (r, c) in brackets]
            if not wanted:
                continue
            keys = req.keys(start, end, b)
            # Keys share one sign, so their sum is NaN only when a key is (torch.sign(NaN) is
            # 0, so the counts below would not show it).
            if math.isnan(float(keys.sum())):
                raise UnorderedKeys("NaN among the keys")
            for c in wanted:
                lo, hi = brackets[r, c]
                side_lo = torch.sub(keys, lo).sign_()  # -1 below, 0 equal, +1 above lo
                # Counts go straight to Python ints (float32 sums are exact: a block has
                # fewer than 2^24 entries). Small tensors kept per block would pin freed
                # blocks in the heap and make memory grow with the tensor.
                tally = tallies[r, c]
                tally.below += _count(side_lo.neg().clamp_(min=0).sum())
                tally.lo_blocks.append((end - start) - _count(side_lo.abs().sum()))
                tally.equal_lo += tally.lo_blocks[-1]
                if lo == hi:
                    # Low-precision deltas often bracket a single value: nothing between.
                    tally.hi_blocks.append(tally.lo_blocks[-1])
                    continue
                side_hi = torch.sub(keys, hi).sign_()
                tally.hi_blocks.append((end - start) - _count(side_hi.abs().sum()))
                tally.equal_hi += tally.hi_blocks[-1]
                strictly_inside = side_lo.sub_(side_hi).sub_(1).clamp_(min=0)
                where = strictly_inside.bool().nonzero().squeeze(1)
                if where.numel():
                    inside[r, c].add(keys[where], where.add_(start))
    found: Found = {key: collector.gathered() for key, collector in inside.items()}
    return tallies, found


def _expected_inside(sample: torch.Tensor, lo: float, hi: float, n: int) -> int:
    """About how many of n entries lie strictly between lo and hi, judged by the sample."""
    share = float(((sample > lo) & (sample < hi)).sum()) / max(1, sample.numel())
    return math.ceil(share * n * 1.25)


class _Collector:
    """The keys and indices of the entries strictly inside one bracket, gathered block by block
    into one pair of buffers (doubled when full). Kept as a small tensor per block, they pin the
    block temporaries freed around them in the heap: measured, 177 MB of heap held over one
    sweep of a 33M-entry tensor, against 13 MB this way."""

    def __init__(self, capacity: int, index_dtype: torch.dtype) -> None:
        self._capacity = capacity
        self._index_dtype = index_dtype
        # Allocated at the first add, where the keys' dtype and device are known.
        self._buffers: tuple[torch.Tensor, torch.Tensor] | None = None
        self._size = 0

    def add(self, values: torch.Tensor, indices: torch.Tensor) -> None:
        if self._buffers is None:
            self._buffers = (
                values.new_empty(self._capacity),
                indices.new_empty(self._capacity, dtype=self._index_dtype),
            )
        kept, at = self._buffers
        end = self._size + values.numel()
        if end > kept.numel():
            capacity = max(end, 2 * kept.numel())
            kept, at = _grown(kept, self._size, capacity), _grown(at, self._size, capacity)
            self._buffers = (kept, at)
        kept[self._size : end] = values
        at[self._size : end] = indices
        self._size = end

    def gathered(self) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """What was added, as Found holds it: one (values, indices) pair, or none."""
        if self._buffers is None or not self._size:
            return []
        kept, at = self._buffers
        return [(kept[: self._size].clone(), at[: self._size].clone())]


def _grown(tensor: torch.Tensor, size: int, capacity: int) -> torch.Tensor:
    grown = torch.empty(capacity, dtype=tensor.dtype, device=tensor.device)
    grown[:size] = tensor[:size]
    return grown


def _sweep_native(
    requests: list[CutRequest], brackets: dict[tuple[int, int], tuple[float, float]], block: int
) -> tuple[Tallies, Found]:
    """The same counts from the C kernel, one pass per bracket."""
    tallies: Tallies = {}
    found: Found = {}
    for (r, c), (lo, hi) in brackets.items():
        source = requests[r].native
        assert source is not None
        sweep = native.bracket_sweep(source.base, source.model, source.descending, lo, hi, block)
        if sweep is None:
            raise UnorderedKeys("NaN among the keys")
        below, equal_lo, equal_hi = sweep.tally
        tallies[r, c] = _Tally(below, equal_lo, equal_hi, sweep.lo_blocks, sweep.hi_blocks)
        found[r, c] = [(sweep.values, sweep.indices)] if sweep.values.numel() else []
    return tallies, found


class UnorderedKeys(ValueError):
    """A key is NaN, so entries have no order to cut."""


def _count(total: torch.Tensor) -> int:
    value = float(total)
    if value != value:
        raise UnorderedKeys("NaN among the keys")
    return int(value)


def _bracket(sample: torch.Tensor, p: float) -> tuple[float, float]:
    """Keys that bracket quantile p with high probability: four standard deviations of the
    sample's rank either side."""
    s = sample.numel()
    centre = p * (s - 1)
    margin = 4 * math.sqrt(s * p * (1 - p)) + 8
    lo_pos, hi_pos = math.floor(centre - margin), math.ceil(centre + margin)
    inside = [pos for pos in (lo_pos, hi_pos) if 0 <= pos < s]
    values = dict(zip(inside, _order_statistics(sample, inside), strict=True))
    return values.get(lo_pos, -math.inf), values.get(hi_pos, math.inf)


def _order_statistics(sample: torch.Tensor, positions: list[int]) -> list[float]:
    """The values at these positions of the sorted sample."""
    if not positions:
        return []
    if sample.device.type == "cpu":
        # One partial sort finds both ends (torch.kthvalue takes one per call).
        import numpy as np

        ordered = np.partition(sample.numpy(), positions)
        return [float(ordered[pos]) for pos in positions]
    return [float(torch.kthvalue(sample, pos + 1).values) for pos in positions]


def sample_positions(n: int, device: torch.device | None = None) -> torch.Tensor:
    """Evenly spaced positions: a deterministic sample, so the sweep count is reproducible."""
    count = min(n, SAMPLE)
    return torch.arange(count, dtype=torch.int64, device=device) * n // count
