"""RAM (reinforced agent merging) and RAM+ tensor-local, as mergekit 0.1.5's `ram` and
`ramplus_tl`.

With task vectors d_i = X_i - B for the K models, entry j of model i counts when
|d_ij| > epsilon (compared in float32), and c_j is the number of models counting at j. An entry
one model alone moves keeps that model's change; an entry several models move gets their mean
change; entries no model moves keep the base:

    ram:         out_j = B_j + sum_i [|d_ij| > eps] d_ij * ([c_j = 1] + [c_j > 1] / c_j)
    ramplus_tl:  out_j = B_j + sum_i [|d_ij| > eps] d_ij * ([c_j = 1] lambda_i + [c_j > 1] / c_j)

RAM+ boosts each model's unique entries by lambda_i = 1 + r * clamp(rho_i, 0, alpha), where
rho_i = S_i / max(U_i, epsilon), S_i and U_i being how many of model i's counting entries in the
tensor are shared (c_j > 1) and unique (c_j = 1). Both are elementwise across the models, one
block at a time; ramplus_tl counts S_i and U_i in a first pass.

Any NaN or Inf in an input reaches the output entry it is in (it is multiplied, never
masked out, as in mergekit), so the engine looks for them in the output only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Annotated

import torch

from mergesmith.methods.registry import REFERENCE, Param, blocked, merge_method, non_negative
from mergesmith.ops import float_masks as fm
from mergesmith.ops.blocks import block_ranges

_MEMORY = blocked(float32_temps_per_input=2, float32_temps=8)


@merge_method(
    "ram",
    "RAM: unique changes kept whole, shared changes averaged",
    base=REFERENCE,
    memory=_MEMORY,
    finite_check="output",
)
def ram(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    epsilon: Annotated[
        float, Param("a change counts when its magnitude is above this", check=non_negative)
    ] = 1e-5,
    out_dtype: torch.dtype | None = None,  # None: float32
) -> torch.Tensor:
    """B + each model's change where it alone moves an entry, the mean change where several do.

    >>> b = torch.zeros(3)
    >>> ram(b, [torch.tensor([0.5, 1.0, 0.0]), torch.tensor([0.0, 3.0, 0.0])])
    tensor([0.5000, 2.0000, 0.0000])
    """
    out_dtype = out_dtype or torch.float32
    assert base is not None
    return _merge(base, models, epsilon, None, out_dtype)


@merge_method(
    "ramplus_tl",
    "RAM+ (tensor-local): RAM with each model's unique changes boosted by its overlap",
    base=REFERENCE,
    memory=_MEMORY,
    finite_check="output",
)
def ramplus_tl(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    r: Annotated[float, Param("strength of the boost of a model's unique changes")] = 0.1,
    alpha: Annotated[
        float, Param("upper limit of the shared/unique ratio", check=non_negative)
    ] = 0.2,
    epsilon: Annotated[
        float, Param("a change counts when its magnitude is above this", check=non_negative)
    ] = 1e-5,
    out_dtype: torch.dtype | None = None,  # None: float32
) -> torch.Tensor:
    """RAM, with model i's unique changes times 1 + r * clamp(shared_i / unique_i, 0, alpha).

    Model 0 has one shared and one unique change: lambda_0 = 1 + 0.5 * min(1/1, 2) = 1.5;
    model 1 has no unique change:

    >>> b = torch.zeros(3)
    >>> ramplus_tl(b, [torch.tensor([0.5, 1.0, 0.0]), torch.tensor([0.0, 3.0, 0.0])], r=0.5,
    ...            alpha=2.0)
    tensor([0.7500, 2.0000, 0.0000])
    """
    out_dtype = out_dtype or torch.float32
    assert base is not None
    flat_base = base.reshape(-1)
    flats = [m.reshape(-1) for m in models]
    shared, unique = _overlap_counts(flat_base, flats, epsilon)
    return _merge(base, models, epsilon, _boosts(shared, unique, r, alpha, epsilon), out_dtype)


def _boosts(
    shared: list[int], unique: list[int], r: float, alpha: float, epsilon: float
) -> list[float]:
    """lambda_i = 1 + r * clamp(S_i / max(U_i, epsilon), 0, alpha), in float32 as mergekit
    computes it. **We differ:** with epsilon 0, a model with neither shared nor unique entries
    gets 0/0; mergekit's lambda is then NaN and so is its whole output tensor. Its boost
    multiplies nothing (it has no unique entry), so we take rho = 0."""
    shared_t = torch.tensor(shared, dtype=torch.int64)
    unique_t = torch.tensor(unique, dtype=torch.int64)
    rho = torch.nan_to_num(shared_t / unique_t.clamp(min=epsilon), nan=0.0)
    lambdas = 1 + r * rho.clamp(min=0, max=alpha)
    return [float(x) for x in lambdas]


def _counting(
    base: torch.Tensor, models: list[torch.Tensor], start: int, end: int, epsilon: float
) -> tuple[torch.Tensor, list[torch.Tensor], list[torch.Tensor], torch.Tensor]:
    """For [start, end): the base in float32, each task vector, whether each entry counts
    (float 0/1) and how many models count there."""
    b = base[start:end].float()
    deltas = [torch.sub(m[start:end], b) for m in models]
    counts = [fm.above(d.abs(), epsilon) for d in deltas]
    total = counts[0].clone()
    for c in counts[1:]:
        total.add_(c)
    return b, deltas, counts, total


def _only_one(total: torch.Tensor) -> torch.Tensor:
    """1.0 where exactly one model counts (total is a whole number), else 0.0."""
    return torch.sub(total, 1).abs_().sign_().neg_().add_(1)


def _overlap_counts(
    base: torch.Tensor, models: list[torch.Tensor], epsilon: float
) -> tuple[list[int], list[int]]:
    """Per model: how many of its counting entries are shared with another model, and how many
    are its alone."""
    shared = [0] * len(models)
    unique = [0] * len(models)
    for _, start, end in block_ranges(base.numel()):
        _, _, counts, total = _counting(base, models, start, end, epsilon)
        several = fm.above(total, 1)
        alone = _only_one(total)
        for i, c in enumerate(counts):
            # Float32 sums of 0/1 are exact: a block has fewer than 2^24 entries.
            shared[i] += int(torch.dot(c, several))
            unique[i] += int(torch.dot(c, alone))
    return shared, unique


def _merge(
    base: torch.Tensor,
    models: Sequence[torch.Tensor],
    epsilon: float,
    boosts: list[float] | None,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """The combine of both methods; `boosts` (lambda_i) is None for plain RAM."""
    n = base.numel()
    flat_base = base.reshape(-1)
    flats = [m.reshape(-1) for m in models]
    out = torch.empty(n, dtype=out_dtype, device=base.device)
    for _, start, end in block_ranges(n):
        b, deltas, counts, total = _counting(flat_base, flats, start, end, epsilon)
        alone = _only_one(total)
        several = fm.above(total, 1)
        divisor = total.clamp_(min=1)
        merged = None
        for i, (d, c) in enumerate(zip(deltas, counts, strict=True)):
            # mergekit's operations in its order: (z * unique [* lambda]) + (z * overlap / c),
            # z = d * counts; multiplying (never selecting) carries NaN and Inf through.
            z = d.mul_(c)
            term = torch.mul(z, alone)
            if boosts is not None:
                term.mul_(boosts[i])
            term.add_(z.mul_(several).div_(divisor))
            merged = term if merged is None else merged.add_(term)
        assert merged is not None
        out[start:end].copy_(merged.add_(b))
    return out.reshape(base.shape)
