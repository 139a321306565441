"""Exact rank selection in linear time, with ties at a boundary spread evenly (SEMANTICS.md 3).

A full sort costs O(n log n) and an unstable sort picks an arbitrary subset among equal values.
Here two quickselects (`kthvalue`) find the boundary values. A run of equal values that a
boundary splits gives up only part of its entries: of its T entries in flat-index order, the
`need` that fall inside the window are spread evenly over them (the j-th is kept when
floor((j+1) need / T) > floor(j need / T)). So the chosen set is exact, the same on every
machine, and does not favour the first rows of a matrix, as taking the lowest indices did.
"""

from __future__ import annotations

import torch


def spread_mask(tied: torch.Tensor, need: int, total: int, phase: int = 0) -> torch.Tensor:
    """Which of the entries marked in `tied` (1-D bool) the spread rule keeps, `need` of
    `total` tied entries in all. A block of a longer tensor passes `phase`, (tied entries before
    it * need) mod total: the rule's state there, so blocks are decided independently.

    With j the 0-based rank of a tied entry among all tied entries, floor((j+1) need / T) >
    floor(j need / T) exactly when (j need mod T) + need >= T (as 0 <= need <= T), which needs no
    product of two large counts."""
    if need >= total:
        return tied.clone()
    if need <= 0:
        return torch.zeros_like(tied)
    rank = torch.cumsum(tied, 0, dtype=torch.int64).sub_(1)  # among this block's tied entries
    remainder = rank.mul_(need).add_(phase).remainder_(total)
    return tied & remainder.add_(need).ge(total)


def rank_window_mask(key: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Mask of the entries whose rank lies in [start, stop) when `key` (1-D) is sorted
    ascending, a run of equal keys that a bound splits contributing the share of its entries
    that falls inside, spread evenly over the run (`spread_mask`)."""
    n = key.numel()
    start, stop = max(0, start), min(n, stop)
    if start >= stop:
        return torch.zeros(n, dtype=torch.bool, device=key.device)
    low = float(torch.kthvalue(key, start + 1).values) if start > 0 else None
    high = float(torch.kthvalue(key, stop).values) if stop < n else None
    keep = torch.ones(n, dtype=torch.bool, device=key.device)
    if low is not None:
        keep &= key > low
    if high is not None:
        keep &= key < high
    if low is not None and low == high:
        # Both bounds split one run: it keeps stop - start entries.
        run = key == low
        return keep | spread_mask(run, stop - start, int(run.sum()))
    if low is not None:
        run = key == low
        total = int(run.sum())
        # The run takes ranks [below, below + total); those from `start` on are inside.
        below = int((key < low).sum())
        keep |= spread_mask(run, below + total - start, total)
    if high is not None:
        run = key == high
        keep |= spread_mask(run, stop - int((key < high).sum()), int(run.sum()))
    return keep


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest entries of a 1-D tensor; of the entries equal to the k-th largest,
    as many as are still wanted, spread evenly in flat-index order."""
    return rank_window_mask(-values, 0, k)


def tie_averaged_ranks(rows: torch.Tensor) -> torch.Tensor:
    """Rank (0-based, ascending, float32) of each entry within its row; equal values share the
    mean of the ranks they span, so a tied entry's rank does not depend on its column (what
    DELLA's keep probability is linear in). A run spanning ranks P..P+T-1 gets P + (T-1)/2,
    exact in float32 for rows shorter than 2^23."""
    width = rows.shape[-1]
    flat = rows.reshape(-1, width)
    ordered, order = torch.sort(flat, dim=-1, stable=True)
    positions = torch.arange(width, device=rows.device).expand_as(order)
    # A run starts where the sorted value changes; each entry takes its run's first and last
    # position (the last as the next run's first, minus one).
    starts = torch.ones_like(ordered, dtype=torch.bool)
    starts[:, 1:] = ordered[:, 1:] != ordered[:, :-1]
    first = torch.where(starts, positions, torch.zeros_like(positions)).cummax(dim=-1).values
    ends = torch.ones_like(starts)
    ends[:, :-1] = starts[:, 1:]
    last_or_big = torch.where(ends, positions, torch.full_like(positions, width))
    last = last_or_big.flip(-1).cummin(dim=-1).values.flip(-1)
    mean_rank = (first + last).to(torch.float32).div_(2)
    ranks = torch.empty_like(mean_rank)
    ranks.scatter_(-1, order, mean_rank)
    return ranks.reshape(rows.shape)
