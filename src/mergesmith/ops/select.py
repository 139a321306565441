"""Exact rank selection in linear time, with ties broken by flat index.

A full sort costs O(n log n) and an unstable sort picks an arbitrary subset among equal values.
Here two quickselects (`kthvalue`) find the boundary values and equal values at a boundary are
taken in index order, so the chosen set is exact and the same on every machine.
"""

from __future__ import annotations

import torch


def rank_window_mask(key: torch.Tensor, start: int, stop: int) -> torch.Tensor:
    """Mask of the entries whose rank lies in [start, stop) when `key` (1-D) is sorted ascending
    stably, i.e. equal values ordered by index."""
    n = key.numel()
    start, stop = max(0, start), min(n, stop)
    if start >= stop:
        return torch.zeros(n, dtype=torch.bool, device=key.device)
    keep = torch.ones(n, dtype=torch.bool, device=key.device)
    if start > 0:
        low = torch.kthvalue(key, start + 1).values
        below = key < low
        at_low = key == low
        drop_at_low = start - int(below.sum())
        # Equal values take ranks in index order; the first `drop_at_low` of them fall below start.
        keep &= ~below & ~(at_low & (torch.cumsum(at_low, 0) <= drop_at_low))
    if stop < n:
        high = torch.kthvalue(key, stop).values
        under = key < high
        at_high = key == high
        take_at_high = stop - int(under.sum())
        keep &= under | (at_high & (torch.cumsum(at_high, 0) <= take_at_high))
    return keep


def top_k_mask(values: torch.Tensor, k: int) -> torch.Tensor:
    """Mask of the k largest entries of a 1-D tensor; among equal values the lower index wins."""
    # Negating turns "largest first, lower index first" into a stable ascending order.
    return rank_window_mask(-values, 0, k)


def stable_ranks(rows: torch.Tensor) -> torch.Tensor:
    """Rank (0-based) of each entry within its row, ascending, equal values in index order."""
    order = torch.argsort(rows, dim=-1, stable=True)
    ranks = torch.empty_like(order)
    positions = torch.arange(rows.shape[-1], device=rows.device).expand_as(order)
    ranks.scatter_(-1, order, positions)
    return ranks
