"""Sign election (TIES) and the disjoint merge it enables.

The fused kernel works on blocks, one tensor per model; `weighted` may be a list of those or a
stacked [K, ...] tensor. Masks are float 0/1 (see ops.float_masks): the same values as bool
masks, several times cheaper on the CPU.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from mergesmith.ops import float_masks as fm


def elect_sign(weighted: torch.Tensor | Sequence[torch.Tensor], method: str) -> torch.Tensor:
    """+1 or -1 per entry. `sum`: the sign of the total (TIES). `count`: the sign of the vote
    of signs. A zero total goes to +1."""
    if method not in ("sum", "count"):
        raise ValueError(f"unknown consensus method {method!r}")
    parts = list(weighted.unbind(0)) if isinstance(weighted, torch.Tensor) else list(weighted)
    take = (lambda w: w) if method == "sum" else torch.sign
    total = take(parts[0]).clone()
    for w in parts[1:]:
        total.add_(take(w))
    return fm.elected_sign(total)


def agreement_mask(weighted: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Which entries agree with the elected sign (bool); exact zeros never agree."""
    return torch.sign(weighted) == sign


def disjoint_merge(
    weighted: list[torch.Tensor], weights: Sequence[float], method: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum of the agreeing weighted deltas, and the sum of the agreeing weights (0 becomes 1).

    Reuses the tensors in `weighted` for its result.
    """
    elected = elect_sign(weighted, method)
    mixed = divisor = None
    for w, weight in zip(weighted, weights, strict=True):
        # sign(0) = 0 never equals +-1, so exact zeros never agree.
        agree = torch.sign(w).eq_(elected)
        w.mul_(agree)
        if mixed is None or divisor is None:
            mixed, divisor = w, agree.mul_(weight)
        else:
            mixed.add_(w)
            divisor.add_(agree.mul_(weight))
    assert mixed is not None and divisor is not None
    return mixed, fm.nonzero_to_one(divisor)
