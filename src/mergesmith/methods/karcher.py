"""Karcher: the weighted Riemannian (Karcher) mean of the models' directions on the unit sphere,
scaled by their mean norm.

Each tensor is one flat vector. There is no base: a `base_model` is one more input, weighted like
the others (mergekit 0.1.5 averages it in silently; the plan warns). For N inputs X_i with norms
n_i and alpha_i = 1/N, mergekit's algorithm is:

    valid  = {i : n_i > tol};  a_i = alpha_i / sum_{j valid} alpha_j;  u_i = X_i / n_i
    mean   = sum_valid a_i u_i, normalised; the first valid u_i if its norm is < tol
    repeat max_iter times:
        d_i = clamp(<mean, u_i>, -1, 1),  theta_i = arccos(d_i)
        T   = sum_valid a_i theta_i / sin(theta_i) (u_i - d_i mean), skipping theta_i < tol
        r   = |T|;  stop if r < tol
        mean = cos(r) mean + sin(r) T / r, normalised when its norm is > tol
    out = (sum_i alpha_i n_i) mean             (the sum over every input, valid or not)

with `max_iter` (default 10, at most 10000 here) and `tol` (default 1e-5). No valid input:
zeros. One input: itself.

Everything the loop reads is fixed by the Gram matrix of the inputs. Let U_ij = <u_i, u_j> =
G_ij / (n_i n_j) over the valid inputs, where G_ij = <X_i, X_j>, and write a vector of the span
of the u_i as sum_i c_i u_i, i.e. by its coefficient vector c. Then <sum c_i u_i, sum e_j u_j> =
c^T U e. Claim: if the mean before an iteration is sum c_i u_i, every quantity mergekit computes
in that iteration equals the one below computed from U and c alone, and the new mean is again in
the span, with coefficients c':

    d = clamp(U c),  theta = arccos(d),  f_i = a_i theta_i / sin(theta_i) (0 where skipped)
    T = sum_i f_i (u_i - d_i sum_j c_j u_j) = sum_j (f_j - (f . d) c_j) u_j, so tau = f - (f . d) c
    r = |T| = sqrt(tau^T U tau);  c' = cos(r) c + sin(r) / r tau;  |mean'| = sqrt(c'^T U c')

Each line is a linear-algebra identity (the inner product is bilinear), so the branch tests
(theta_i < tol, r < tol, the norm > tol) see the same numbers and take the same branches. The
starting mean is sum a_i u_i (c = a, scaled by 1 / sqrt(a^T U a)) or the first valid u_i (c the
first unit vector), also in the span, so by induction the claim holds for every iteration, and
the output is sum_i (s c_i / n_i) X_i with s = sum_i alpha_i n_i. QED.

So one blocked pass computes G in float64, the iteration runs on N x N numbers, and a second pass
writes the combination: memory stays flat and the iteration costs nothing per entry. (Mergekit
reads every full tensor 2N times per iteration, in float32.) Results agree to float32 rounding;
our dot products are more accurate, which can only matter on a knife edge of a `tol` test.

Where mergekit divides by zero we do the sensible thing instead:
- theta_i = 0 exactly (possible with tol = 0): the term is skipped (its tangent vector is zero;
  mergekit computes 0/0 and returns NaN);
- r below 1e-12 (reached with tol below that, e.g. tol = 0): the iteration stops. Such a step
  cannot show in a float32 result; mergekit's float32 steps never get that small (rounding
  noise), and at r = 0 exactly it computes 0/0;
- an input within max(tol, 1e-6) of the antipode of the current mean (theta_i near pi, sin ~ 0):
  every direction away from it is equally short, so it pulls in no defined direction and is
  skipped. Mergekit multiplies a zero or rounding-noise vector by theta / sin(theta) there.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Annotated

import torch

from mergesmith.methods.registry import (
    INPUT_WARNED,
    Param,
    blocked,
    merge_method,
    non_negative,
)
from mergesmith.ops.spherical import combine, gram_matrix

ANTIPODE = 1e-6  # an input with pi - theta below max(tol, this) is skipped
# A step shorter than this ends the iteration whatever `tol`: it moves the mean by a relative
# 1e-12, which no float32 result can show (mergekit's float32 steps never get this small).
STEP_FLOOR = 1e-12
MAX_ITER = 10_000


def iteration_count(value: int) -> str | None:
    return None if 0 <= value <= MAX_ITER else f"{value} is outside [0, {MAX_ITER}]"


def karcher_coefficients(gram: torch.Tensor, max_iter: int, tol: float) -> list[float] | None:
    """Coefficients b with Karcher(X) = sum_i b_i X_i, from the float64 Gram matrix of the
    inputs; None when no input has a norm above `tol` (the result is zero)."""
    count = gram.shape[0]
    norms = gram.diagonal().clamp(min=0.0).sqrt().tolist()
    alphas = [1.0 / count] * count
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return None
    alpha_sum = sum(alphas[i] for i in valid)
    a = torch.tensor([alphas[i] / alpha_sum for i in valid], dtype=torch.float64)
    scaled = torch.tensor([norms[i] for i in valid], dtype=torch.float64)
    units = gram[valid][:, valid] / torch.outer(scaled, scaled)

    def norm(c: torch.Tensor) -> float:
        return math.sqrt(max(float(c @ units @ c), 0.0))

    c = a.clone()
    start = norm(c)
    if start < tol:
        c = torch.zeros_like(a)
        c[0] = 1.0
    else:
        c = c / start
    antipode = max(tol, ANTIPODE)
    for _ in range(max_iter):
        d = (units @ c).clamp(-1.0, 1.0)
        theta = torch.acos(d)
        skip = (theta < tol) | (theta == 0.0) | (math.pi - theta < antipode)
        f = torch.where(skip, 0.0, a * theta / torch.where(skip, 1.0, torch.sin(theta)))
        tau = f - (f @ d) * c
        r = norm(tau)
        if r < tol or r < STEP_FLOOR:
            break
        c = math.cos(r) * c + (math.sin(r) / r) * tau
        length = norm(c)
        if length > tol:
            c = c / length
    scale = sum(alpha * n for alpha, n in zip(alphas, norms, strict=True))
    out = [0.0] * count
    for j, i in enumerate(valid):
        out[i] = scale * float(c[j]) / norms[i]
    return out


@merge_method(
    "karcher",
    "Karcher (Riemannian) mean of the models' directions, scaled by their mean norm",
    base=INPUT_WARNED,
    models=(1, None),
    memory=blocked(float32_temps_per_input=3, float32_temps=8),
)
def karcher(
    base: torch.Tensor | None,
    models: Sequence[torch.Tensor],
    *,
    max_iter: Annotated[int, Param("most iterations", check=iteration_count)] = 10,
    tol: Annotated[float, Param("convergence and zero-norm tolerance", check=non_negative)] = 1e-5,
    out_dtype: torch.dtype | None = None,  # None: float32
) -> torch.Tensor:
    """The Karcher mean of `models` on the sphere, times their mean norm (no base).

    >>> a, b = torch.tensor([2.0, 0.0]), torch.tensor([0.0, 4.0])
    >>> karcher(None, [a, b])
    tensor([2.1213, 2.1213])
    >>> karcher(None, [a, b, torch.tensor([-3.0, 0.0])], max_iter=100)
    tensor([0., 3.])
    """
    out_dtype = out_dtype or torch.float32
    if len(models) == 1:
        return models[0]
    coefficients = karcher_coefficients(gram_matrix(models, None), max_iter, tol)
    if coefficients is None:
        return torch.zeros(models[0].shape, dtype=out_dtype, device=models[0].device)
    return combine(models, coefficients, None, out_dtype)
