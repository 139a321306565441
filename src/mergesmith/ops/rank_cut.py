"""Exact rank cuts over tensors read block by block, in about one pass.

A cut is the entry at rank r when entries are ordered by (key, flat index) ascending: equal keys
are ordered by index, so the kept set is exact and machine-independent. A strided sample
brackets each cut's key; one sweep counts the entries below the bracket and at its two ends and
collects the few strictly inside; a quickselect among those gives the key. Only a cut that
splits a run of equal keys needs its index found, by a count-then-locate rescan. If a bracket
misses (rare), it widens and the sweep reruns.

Requests whose keys the C kernels can compute themselves (`NativeKeys`) sweep and rescan there,
a pass each at memory speed; the others run the torch code below. Both count the same entries.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from mergesmith import native
from mergesmith.ops.blocks import block_ranges

SAMPLE = 1 << 16


@dataclass(frozen=True)
class Cut:
    """A position in (key, index) order: `index` may be -1 or n when every equal key counts."""

    key: float
    index: int


# (start, end, base block as float32) -> float32 keys of that block
KeyFn = Callable[[int, int, torch.Tensor], torch.Tensor]


@dataclass
class CutRequest:
    """Cuts wanted over one key function: `ranks[i]` is an upper cut (keep at or before it)
    when `upper[i]`, else a lower cut (keep at or after it)."""

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

    Per bracket [lo, hi] the sweep counts entries below lo, equal to lo and equal to hi, and
    collects only those strictly between: low-precision deltas (bf16) have few distinct values,
    so equal keys are common and counting them is far cheaper than collecting them.
    """
    brackets: dict[tuple[int, int], tuple[float, float]] = {}
    for r, req in enumerate(requests):
        req.cuts = [None] * len(req.ranks)
        for c, rank in enumerate(req.ranks):
            brackets[r, c] = _bracket(req.sample, rank / max(1, n - 1))
    while brackets:
        if all(req.native is not None for req in requests):
            tallies, found = _sweep_native(requests, brackets)
        else:
            tallies, found = _sweep(requests, brackets, n, block, base_block)
        for (r, c), (lo, hi) in list(brackets.items()):
            req = requests[r]
            below, equal_lo, equal_hi = tallies[r, c]
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
                req.cuts[c] = _tie_cut(req, c, lo, offset, equal_lo, n, block, base_block)
            elif offset < equal_lo + inside:
                key = float(torch.kthvalue(values, offset - equal_lo + 1).values)
                less = int((values < key).sum())
                # Candidates are in index order, so equal keys are too.
                equal_at = torch.cat([i for _, i in found[r, c]])[values == key]
                among = offset - equal_lo - less
                req.cuts[c] = _place(req.upper[c], key, among, equal_at.numel(), equal_at)
            else:
                among = offset - equal_lo - inside
                req.cuts[c] = _tie_cut(req, c, hi, among, equal_hi, n, block, base_block)


Tallies = dict[tuple[int, int], list[int]]
Found = dict[tuple[int, int], list[tuple[torch.Tensor, torch.Tensor]]]


def _sweep(
    requests: list[CutRequest],
    brackets: dict[tuple[int, int], tuple[float, float]],
    n: int,
    block: int,
    base_block: Callable[[int, int], torch.Tensor],
) -> tuple[Tallies, Found]:
    """Per bracket: entries below lo, equal to lo, equal to hi, and those strictly inside."""
    index_dtype = torch.int32 if n < 2**31 else torch.int64
    tallies: Tallies = {key: [0, 0, 0] for key in brackets}
    found: Found = {key: [] for key in brackets}
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
                tally[0] += _count(side_lo.neg().clamp_(min=0).sum())
                tally[1] += (end - start) - _count(side_lo.abs().sum())
                if lo == hi:
                    # Low-precision deltas often bracket a single value: nothing between.
                    continue
                side_hi = torch.sub(keys, hi).sign_()
                tally[2] += (end - start) - _count(side_hi.abs().sum())
                strictly_inside = side_lo.sub_(side_hi).sub_(1).clamp_(min=0)
                where = strictly_inside.bool().nonzero().squeeze(1)
                if where.numel():
                    found[r, c].append((keys[where], where.add_(start).to(index_dtype)))
    return tallies, found


def _sweep_native(
    requests: list[CutRequest], brackets: dict[tuple[int, int], tuple[float, float]]
) -> tuple[Tallies, Found]:
    """The same counts from the C kernel, one pass per bracket."""
    tallies: Tallies = {}
    found: Found = {}
    for (r, c), (lo, hi) in brackets.items():
        source = requests[r].native
        assert source is not None
        result = native.bracket_sweep(source.base, source.model, source.descending, lo, hi)
        if result is None:
            raise UnorderedKeys("NaN among the keys")
        tallies[r, c], values, indices = result
        found[r, c] = [(values, indices)] if values.numel() else []
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


def _place(
    upper: bool, key: float, among_equal: int, equal: int, equal_at: torch.Tensor | None
) -> Cut:
    """A cut at the `among_equal`-th of `equal` entries with this key (in index order)."""
    if upper and among_equal == equal - 1:
        return Cut(key, 2**62)  # every equal key is at or before the cut
    if not upper and among_equal == 0:
        return Cut(key, -1)  # every equal key is at or after the cut
    assert equal_at is not None
    return Cut(key, int(equal_at[among_equal]))


def _tie_cut(
    req: CutRequest,
    c: int,
    key: float,
    among_equal: int,
    equal: int,
    n: int,
    block: int,
    base_block: Callable[[int, int], torch.Tensor],
) -> Cut:
    """A cut inside a run of equal keys; finds the index only when the cut splits the run."""
    whole_run = (
        _place(req.upper[c], key, among_equal, equal, None)
        if ((req.upper[c] and among_equal == equal - 1) or (not req.upper[c] and among_equal == 0))
        else None
    )
    if whole_run is not None:
        return whole_run
    if req.native is not None:
        source = req.native
        index = native.locate_equal(source.base, source.model, source.descending, key, among_equal)
        if index < 0:
            raise AssertionError("a key counted in the sweep vanished in the rescan")
        return Cut(key, index)
    # Count equal keys block by block and locate positions only in the block that passes the
    # wanted one.
    seen = 0
    for _, start, end in block_ranges(n, block):
        keys = req.keys(start, end, base_block(start, end))
        count = (end - start) - int(torch.sub(keys, key).sign_().abs_().sum())
        if seen + count > among_equal:
            hits = (keys == key).nonzero().squeeze(1)
            return Cut(key, start + int(hits[among_equal - seen]))
        seen += count
    raise AssertionError("a key counted in the sweep vanished in the rescan")


def at_or_after(keys: torch.Tensor, start: int, cut: Cut) -> torch.Tensor:
    """Entries of a block at positions >= the cut in (key, index) order."""
    end = start + keys.numel()
    if cut.index < start:
        return keys >= cut.key
    if cut.index >= end:
        return keys > cut.key
    index = torch.arange(start, end, device=keys.device)
    return (keys > cut.key) | ((keys == cut.key) & (index >= cut.index))


def at_or_before(keys: torch.Tensor, start: int, cut: Cut) -> torch.Tensor:
    """Entries of a block at positions <= the cut in (key, index) order."""
    end = start + keys.numel()
    if cut.index < start:
        return keys < cut.key
    if cut.index >= end:
        return keys <= cut.key
    index = torch.arange(start, end, device=keys.device)
    return (keys < cut.key) | ((keys == cut.key) & (index <= cut.index))


def sample_positions(n: int, device: torch.device | None = None) -> torch.Tensor:
    """Evenly spaced positions: a deterministic sample, so the sweep count is reproducible."""
    count = min(n, SAMPLE)
    return torch.arange(count, dtype=torch.int64, device=device) * n // count
