"""Sign election (TIES) and the disjoint merge it enables."""

from __future__ import annotations

import torch


def elect_sign(weighted: torch.Tensor, method: str) -> torch.Tensor:
    """+1 or -1 per entry, from the stacked weighted deltas [K, ...].

    `sum`: the sign of the total (TIES). `count`: the sign of the vote of signs. Zero goes to +1.
    """
    if method == "sum":
        total = weighted.sum(dim=0)
    elif method == "count":
        total = torch.sign(weighted).sum(dim=0)
    else:
        raise ValueError(f"unknown consensus method {method!r}")
    return torch.where(total >= 0, 1.0, -1.0).to(weighted.dtype)


def agreement_mask(weighted: torch.Tensor, sign: torch.Tensor) -> torch.Tensor:
    """Which entries agree with the elected sign; exact zeros never agree."""
    return torch.sign(weighted) == sign
