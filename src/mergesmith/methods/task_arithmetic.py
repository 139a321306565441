"""The task-arithmetic family: task arithmetic, TIES, DARE, breadcrumbs, DELLA.

All eight methods are one computation (sparsify each task vector, weight, optionally elect signs,
sum, optionally normalise, scale by lambda) configured by a row of FAMILY. We follow mergekit's
TIES, which votes on *weighted* deltas and divides by the sum of agreeing weights; PEFT's votes
on unweighted deltas and divides by the count of agreeing models.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from mergesmith.methods.registry import (
    MergeMethod,
    MethodInputs,
    ParamSpec,
    in_unit_interval,
    non_negative,
    register,
)
from mergesmith.ops import sparsify as sp
from mergesmith.ops.consensus import agreement_mask, elect_sign

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


def sparsify(
    delta: torch.Tensor,
    method: str | None,
    density: float = 1.0,
    *,
    rescale: bool = False,
    gamma: float = 0.01,
    epsilon: float = 0.15,
    seed: int = 0,
) -> torch.Tensor:
    """Apply one sparsifier to one task vector."""
    if method is None:
        return delta
    if method == "magnitude":
        return sp.magnitude(delta, density, rescale)
    if method == "magnitude_outliers":
        return sp.magnitude_outliers(delta, density, gamma, rescale)
    generator = torch.Generator().manual_seed(seed)
    if method == "random":
        return sp.random_keep(delta, density, generator, rescale)
    if method == "della_magprune":
        return sp.della_magprune(delta, density, epsilon, generator, rescale)
    raise ValueError(f"unknown sparsification method {method!r}")


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
) -> torch.Tensor:
    """The whole family on plain tensors: base + lambda * combine(sparsify(X_i - base) * w_i)."""
    if not models:
        return base.clone()
    k = len(models)
    densities = densities if densities is not None else [1.0] * k
    gammas = gammas if gammas is not None else [0.01] * k
    epsilons = epsilons if epsilons is not None else [0.15] * k
    seeds = seeds if seeds is not None else list(range(k))
    weighted = torch.empty((k, *base.shape), dtype=base.dtype, device=base.device)
    for i, model in enumerate(models):
        delta = sparsify(
            model - base,
            sparsifier,
            densities[i],
            rescale=rescale,
            gamma=gammas[i],
            epsilon=epsilons[i],
            seed=seeds[i],
        )
        torch.mul(delta, weights[i], out=weighted[i])
        del delta
    w = torch.tensor(list(weights), dtype=base.dtype, device=base.device).reshape(
        (k,) + (1,) * base.dim()
    )
    if consensus is not None:
        agree = agreement_mask(weighted, elect_sign(weighted, consensus))
        mixed = torch.where(agree, weighted, 0.0).sum(dim=0)
        divisor = torch.where(agree, w, 0.0).sum(dim=0)
        divisor = torch.where(divisor == 0, 1.0, divisor)
    else:
        mixed = weighted.sum(dim=0)
        total = w.sum()
        divisor = torch.where(total.abs() < 1e-8, 1.0, total)
    if normalize:
        mixed = mixed / divisor
    if lambda_ != 1:
        mixed = mixed * lambda_
    return base + mixed


def _run(row: FamilyRow):
    def run(inputs: MethodInputs) -> torch.Tensor:
        assert inputs.base is not None
        p, mp = inputs.params, inputs.model_params
        consensus = p.get("consensus_method", row.consensus)
        return merge_task_vectors(
            inputs.base,
            inputs.models,
            [m["weight"] for m in mp],
            densities=[m.get("density", 1.0) for m in mp],
            sparsifier=row.sparsifier,
            consensus=consensus,
            normalize=p["normalize"],
            rescale=p["rescale"],
            lambda_=p["lambda"],
            gammas=[m.get("gamma", 0.01) for m in mp],
            epsilons=[m.get("epsilon", 0.15) for m in mp],
            seeds=inputs.seeds,
        )

    return run


def _della_bounds(model_params: dict) -> str | None:
    d, eps = model_params.get("density", 1.0), model_params.get("epsilon", 0.15)
    if d >= 1:
        return None  # nothing is pruned, so epsilon plays no part
    if d - eps <= 0 or d + eps >= 1:
        return (
            f"density {d} +/- epsilon {eps} must stay inside (0, 1); "
            f"lower epsilon below {min(d, 1 - d):g}"
        )
    return None


def _params(name: str, row: FamilyRow) -> tuple[ParamSpec, ...]:
    params = [
        ParamSpec("weight", float, True, help="scale of this model's task vector"),
        ParamSpec("normalize", bool, False, row.normalize, "divide by the sum of weights"),
        ParamSpec("rescale", bool, False, row.rescale, "restore each pruned vector's L1 norm"),
        ParamSpec("lambda", float, False, 1.0, "scale of the merged task vector"),
        ParamSpec("int8_mask", bool, False, False, "accepted for mergekit; never changes results"),
        ParamSpec(
            "consensus_method",
            str,
            False,
            row.consensus,
            "sign election: sum, count, or null for none",
            choices=(*CONSENSUS_METHODS, None),
        ),
    ]
    if row.sparsifier:
        params.insert(
            1,
            ParamSpec(
                "density", float, True, 1.0, "fraction of entries kept", check=in_unit_interval
            ),
        )
    if row.sparsifier == "magnitude_outliers":
        params.insert(
            2,
            ParamSpec(
                "gamma",
                float,
                True,
                0.01,
                "fraction of largest entries dropped",
                check=in_unit_interval,
            ),
        )
    if row.sparsifier == "della_magprune":
        params.insert(
            2,
            ParamSpec(
                "epsilon",
                float,
                True,
                0.15,
                "spread of keep probability around density",
                check=non_negative,
            ),
        )
    return tuple(params)


for _name, _row in FAMILY.items():
    register(
        MergeMethod(
            name=_name,
            description=_row.description,
            params=_params(_name, _row),
            run=_run(_row),
            needs_base=True,
            random=_row.sparsifier in ("random", "della_magprune"),
            extra_checks=_della_bounds if _row.sparsifier == "della_magprune" else None,
        )
    )
