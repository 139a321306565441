"""Sparsifiers: which entries of a task vector survive, and the optional L1 rescale.

Each returns a new tensor; inputs are never modified. Random ones take the key of their stream
(ops.stream): entry i draws the stream's element i, so the result depends only on the key.
"""

from __future__ import annotations

import math

import torch

from mergesmith.ops import stream
from mergesmith.ops.exact_sum import ExactSum
from mergesmith.ops.select import rank_window_mask, tie_averaged_ranks, top_k_mask

# Below this an L1 norm is treated as zero and rescaling is skipped (mergekit's tolerance).
RESCALE_EPS = 1e-7


def rescale_l1(delta: torch.Tensor, kept: torch.Tensor) -> torch.Tensor:
    """Scale `kept` so its L1 norm equals that of `delta`: by the ratio of the exact norms,
    rounded once to a double (then to float32, as torch multiplies a float32 tensor)."""
    before, after = ExactSum(), ExactSum()
    before.add(delta.abs())
    after.add(kept.abs())
    if not (before.value() >= RESCALE_EPS and after.value() >= RESCALE_EPS):
        return kept
    return kept * before.ratio(after)


def _finish(delta: torch.Tensor, keep: torch.Tensor, rescale: bool) -> torch.Tensor:
    kept = torch.where(keep.reshape(delta.shape), delta, torch.zeros((), dtype=delta.dtype))
    return rescale_l1(delta, kept) if rescale else kept


def magnitude(delta: torch.Tensor, density: float, rescale: bool = False) -> torch.Tensor:
    """TIES trim: keep exactly max(1, floor(d * n)) entries of largest |delta|; of those tied
    at the cut-off, the ones still wanted are spread evenly in flat-index order (so the kept
    share of a tie does not depend on the row it is in)."""
    if density >= 1:
        return delta
    if density <= 0 or delta.numel() == 0:
        return torch.zeros_like(delta)
    k = max(1, math.floor(density * delta.numel()))
    return _finish(delta, top_k_mask(delta.abs().reshape(-1), k), rescale)


def magnitude_outliers(
    delta: torch.Tensor, density: float, gamma: float = 0.01, rescale: bool = False
) -> torch.Tensor:
    """Breadcrumbs: drop the largest `gamma` fraction and the smallest entries, keep `density`
    (ties at either bound spread evenly, as in `magnitude`)."""
    if density >= 1:
        return delta
    n = delta.numel()
    target = math.floor(density * n)
    n_top = math.floor(gamma * n)
    n_bottom = max(0, n - target - n_top)
    keep = rank_window_mask(delta.abs().reshape(-1), n_bottom, n_bottom + target)
    return _finish(delta, keep, rescale)


def random_keep(
    delta: torch.Tensor, density: float, key: int, rescale: bool = False
) -> torch.Tensor:
    """DARE: keep each entry independently with probability `density`."""
    if density >= 1:
        return delta
    draws = stream.uniform(key, 0, delta.numel(), delta.device)
    return _finish(delta, draws < density, rescale)


def della_magprune(
    delta: torch.Tensor,
    density: float,
    epsilon: float,
    key: int,
    rescale: bool = False,
) -> torch.Tensor:
    """DELLA: per row, keep probability rises linearly with |delta| rank from d-eps to d+eps;
    equal magnitudes share the mean of their ranks, so their column does not matter."""
    if density >= 1:
        return delta
    if density <= 0:
        return torch.zeros_like(delta)
    rows = delta.reshape(1, -1) if delta.dim() < 2 else delta.reshape(delta.shape[0], -1)
    width = rows.shape[1]
    if width > 1:
        position = tie_averaged_ranks(rows.abs()) / (width - 1)
        probability = (density - epsilon) + position * (2 * epsilon)
    else:
        # One entry has no rank spread; mergekit divides 0/0 here.
        probability = torch.full(rows.shape, density, dtype=torch.float32)
    draws = stream.uniform(key, 0, delta.numel(), delta.device).reshape(rows.shape)
    return _finish(delta, draws < probability, rescale)
