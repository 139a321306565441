"""Keep-masks as float32 0/1 tensors, built from exact arithmetic.

On the CPU, comparisons that produce bool tensors and `where` cost several times more than a
float multiply. These identities give the same masks with float ops only. They are exact: for
IEEE floats a - b is zero only when a == b, and has the sign of a - b otherwise (gradual
underflow), so sign() decides each comparison correctly.
"""

from __future__ import annotations

import torch


def at_most(values: torch.Tensor, limit: float) -> torch.Tensor:
    """1.0 where values <= limit, else 0.0."""
    return torch.sub(limit, values).sign_().add_(1).clamp_(max=1)


def below(values: torch.Tensor, limit: float) -> torch.Tensor:
    """1.0 where values < limit, else 0.0."""
    return torch.sub(limit, values).clamp_(min=0).sign_()


def at_least(values: torch.Tensor, limit: float) -> torch.Tensor:
    """1.0 where values >= limit, else 0.0."""
    return torch.sub(values, limit).sign_().add_(1).clamp_(max=1)


def above(values: torch.Tensor, limit: float) -> torch.Tensor:
    """1.0 where values > limit, else 0.0."""
    return torch.sub(values, limit).clamp_(min=0).sign_()


def nonzero_to_one(values: torch.Tensor) -> torch.Tensor:
    """values, with exact zeros replaced by 1 (a divisor that must not be zero)."""
    return values.add_(torch.abs(values).sign_().neg_().add_(1))


def elected_sign(total: torch.Tensor) -> torch.Tensor:
    """+1 where total >= 0, else -1: sign() maps to -1/0/1, and +0.5 moves 0 to the + side."""
    return total.sign().add_(0.5).sign_()
