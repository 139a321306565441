"""The C kernels give the same bytes as the torch code they stand in for.

The torch code is the reference (its results are checked against hand-worked tensors and
mergekit elsewhere); here every path through the kernels is run next to it on inputs built to
reach the corners: cuts that split runs of equal magnitudes (the spread rule of SEMANTICS.md 3,
whose state the kernel carries from chunk to chunk), signed zeros, NaN and infinities, every
dtype pairing, tensors spanning several blocks, and whole merges through the CLI.
"""

from __future__ import annotations

import math
import os
import zlib
from fractions import Fraction
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mergesmith import native
from mergesmith.methods.linear import linear
from mergesmith.methods.task_arithmetic import merge_task_vectors
from mergesmith.ops import stream
from mergesmith.ops.blocks import BLOCK
from mergesmith.ops.exact_sum import ExactSum
from mergesmith.ops.select import tie_averaged_ranks
from tests.conftest import assert_kernels_match_torch_code, write_recipe

needs_kernels = pytest.mark.skipif(not native.available(), reason="C kernels not built")

DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def test_kernels_are_built_where_required() -> None:
    """`make test` (and so CI) sets MERGESMITH_REQUIRE_KERNELS: a failed build must not pass
    unnoticed by testing the torch code twice."""
    if os.environ.get("MERGESMITH_REQUIRE_KERNELS"):
        assert native.available(), "the C kernels did not build: run `pip install -e .`"


def bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit patterns, with every NaN made one value (only NaN payloads may differ)."""
    t = t.clone()
    t[t.isnan()] = float("nan")
    return t.view({4: torch.int32, 2: torch.int16}[t.element_size()])


def both_paths(fn, *args, **kwargs):
    got = fn(*args, **kwargs)
    with native.torch_only():
        expected = fn(*args, **kwargs)
    return got, expected


def inputs(n: int, dtype: torch.dtype, *, seed: int, quantized: bool, k: int = 3):
    """A base and k fine-tunes; quantized deltas make long runs of equal magnitudes, so cuts
    fall inside them. Signed zeros sit in the base and in the deltas."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g)
    models = []
    for i in range(k):
        delta = torch.randn(n, generator=g) * 0.01 * (i + 1)
        if quantized:
            delta = (delta * 300).round() / 300
        models.append((base + delta).to(dtype))
    base = base.to(dtype)
    base[:7] = 0.0
    base[7:14] = -0.0
    for m in models:
        m[:4] = 0.0  # delta exactly zero where the base is zero
        m[7:9] = 0.0  # +0 - -0
    return base, models


FAMILY_CASES = [
    # sparsifier, consensus, densities, normalize, lambda, rescale
    ("magnitude", "sum", [0.5, 0.5, 0.3], True, 1.0, False),
    ("magnitude", "count", [0.2, 0.9, 1.0], True, 1.3, False),
    ("magnitude", None, [0.7, 0.1, 0.4], False, 0.5, False),
    ("magnitude", "sum", [0.5, 0.0, 0.3], True, 1.0, True),
    ("magnitude_outliers", "sum", [0.5, 0.7, 0.3], False, 0.7, False),
    ("magnitude_outliers", None, [0.9, 0.5, 0.05], False, 1.0, True),
    (None, None, None, False, 1.0, False),
    (None, "sum", None, True, 1.0, False),
    (None, "count", None, False, 2.0, False),
    ("random", "sum", [0.5, 0.7, 0.3], False, 1.0, True),
    ("random", None, [0.4, 0.4, 0.9], False, 1.0, False),
    ("della_magprune", "sum", [0.5, 0.6, 0.4], True, 1.0, True),
    ("della_magprune", None, [0.5, 0.6, 0.4], False, 0.8, False),
]


@needs_kernels
@pytest.mark.parametrize("case", FAMILY_CASES, ids=lambda c: f"{c[0]}-{c[1]}")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("quantized", [True, False], ids=["ties", "distinct"])
def test_family_matches_torch(case, dtype: torch.dtype, quantized: bool) -> None:
    sparsifier, consensus, densities, normalize, lambda_, rescale = case
    shape = (1021, 613)  # three blocks, the last one short; DELLA's rows do not fill a block
    base, models = inputs(shape[0] * shape[1], dtype, seed=len(str(case)), quantized=quantized)
    got, expected = both_paths(
        merge_task_vectors,
        base.reshape(shape),
        [m.reshape(shape) for m in models],
        [1.0, 0.5, -0.7],
        densities=densities,
        sparsifier=sparsifier,
        consensus=consensus,
        normalize=normalize,
        rescale=rescale,
        lambda_=lambda_,
        gammas=[0.01, 0.1, 0.0],
        epsilons=[0.1, 0.2, 0.05],
        seeds=[11, 12, 13],
    )
    assert got.dtype == expected.dtype == dtype
    assert torch.equal(bits(got), bits(expected))


@needs_kernels
@pytest.mark.parametrize("out_dtype", DTYPES, ids=str)
def test_mixed_input_dtypes(out_dtype: torch.dtype) -> None:
    base, models = inputs(BLOCK + 99, torch.float32, seed=3, quantized=True)
    models = [models[0].bfloat16(), models[1].half(), models[2]]
    got, expected = both_paths(
        merge_task_vectors,
        base.bfloat16(),
        models,
        [0.3, 0.3, 0.4],
        densities=[0.4, 0.6, 0.5],
        sparsifier="magnitude",
        consensus="sum",
        normalize=True,
        out_dtype=out_dtype,
    )
    assert torch.equal(bits(got), bits(expected))


@needs_kernels
@pytest.mark.parametrize("sparsifier", ["magnitude", "magnitude_outliers", None])
def test_non_finite_values_when_allowed(sparsifier: str | None) -> None:
    """--allow-nonfinite: NaN and infinities go through both paths alike."""
    base, models = inputs(BLOCK + 500, torch.float32, seed=5, quantized=False)
    models[0][100] = float("nan")
    models[1][200] = float("inf")
    models[2][300] = float("-inf")
    base[400] = float("nan")
    got, expected = both_paths(
        merge_task_vectors,
        base,
        models,
        [1.0, 1.0, 1.0],
        densities=[0.5, 0.5, 0.5],
        sparsifier=sparsifier,
        consensus="sum",
        normalize=True,
    )
    assert got.isnan().any()
    assert torch.equal(bits(got), bits(expected))


@needs_kernels
@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 3000),
    density=st.floats(0.0, 1.0),
    gamma=st.floats(0.0, 0.3),
    levels=st.integers(1, 40),
    seed=st.integers(0, 2**16),
    sparsifier=st.sampled_from(["magnitude", "magnitude_outliers"]),
    consensus=st.sampled_from(["sum", "count", None]),
)
def test_family_matches_torch_on_small_tensors(
    n, density, gamma, levels, seed, sparsifier, consensus
) -> None:
    """Few distinct magnitudes (`levels`), so ties fill whole tensors and cuts land anywhere."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(n, generator=g).bfloat16()
    models = [
        base.float() + torch.randint(-levels, levels + 1, (n,), generator=g) / 64 for _ in range(2)
    ]
    got, expected = both_paths(
        merge_task_vectors,
        base,
        models,
        [0.6, 0.4],
        densities=[density, 1 - density / 2],
        sparsifier=sparsifier,
        consensus=consensus,
        normalize=True,
        gammas=[gamma, gamma / 2],
    )
    assert torch.equal(bits(got), bits(expected))


@needs_kernels
def test_a_hand_worked_tie_through_both_paths() -> None:
    """delta = [1, 2, 2, 2, 2, 3] at density 0.5: k = 3 keeps the 3 and need = 2 of the T = 4
    twos, the j-th (from 0) when floor(2(j+1)/4) > floor(2j/4): j = 1 and 3, indices 2 and 4."""
    base = torch.zeros(6)
    delta = torch.tensor([1.0, 2.0, 2.0, 2.0, 2.0, 3.0])
    expected = torch.tensor([0.0, 0.0, 2.0, 0.0, 2.0, 3.0])
    got, torch_code = both_paths(
        merge_task_vectors, base, [delta], [1.0], densities=[0.5], sparsifier="magnitude"
    )
    assert torch.equal(got, expected)
    assert torch.equal(torch_code, expected)


def bf16_fine_tunes(n: int, k: int, *, seed: int, levels: int) -> tuple[torch.Tensor, list]:
    """A bf16 base and k bf16 fine-tunes whose deltas take only a few values (`levels` steps
    of 2^-10 either way, on a base of magnitude below 1): the runs of equal magnitudes span
    every block and chunk, as in real bf16 checkpoints, so every cut splits one."""
    g = torch.Generator().manual_seed(seed)
    base = (torch.rand(n, generator=g) * 0.5 + 0.25).bfloat16()
    models = []
    for _ in range(k):
        steps = torch.randint(-levels, levels + 1, (n,), generator=g).float()
        models.append((base.float() + steps * 2**-10).bfloat16())
    return base, models


TIE_CASES = [
    # sparsifier, densities, gammas, consensus, rescale
    ("magnitude", [0.2, 0.5, 0.8], [0.0] * 3, "sum", False),
    ("magnitude", [0.35, 0.05, 0.65], [0.0] * 3, None, True),
    ("magnitude_outliers", [0.5, 0.3, 0.7], [0.01, 0.2, 0.05], "sum", False),
    # gamma 0.3 and density 0.1 put both ends of the window inside one run of equal values.
    ("magnitude_outliers", [0.1, 0.6, 0.2], [0.3, 0.0, 0.1], None, True),
]


@needs_kernels
@pytest.mark.parametrize("case", TIE_CASES, ids=lambda c: f"{c[0]}-{c[1][0]}")
@pytest.mark.parametrize("levels", [1, 3])
def test_tie_heavy_bf16_cuts_match_torch(case, levels: int) -> None:
    """Cuts inside runs of equal magnitudes that fill several blocks: the spread rule's state
    carried from chunk to chunk in the kernel gives the torch code's bytes."""
    sparsifier, densities, gammas, consensus, rescale = case
    base, models = bf16_fine_tunes(2 * BLOCK + 4097, 3, seed=levels, levels=levels)
    got, expected = both_paths(
        merge_task_vectors,
        base,
        models,
        [0.5, 0.8, -0.3],
        densities=densities,
        sparsifier=sparsifier,
        consensus=consensus,
        normalize=consensus is not None,
        rescale=rescale,
        gammas=gammas,
    )
    assert torch.equal(bits(got), bits(expected))
    # The data does what it is for: a bound of model 0's window (in ascending |delta| order)
    # falls between two equal values, i.e. inside a run.
    ascending = (models[0].float() - base.float()).abs().sort().values
    n = ascending.numel()
    if sparsifier == "magnitude":
        bounds = [n - max(1, math.floor(densities[0] * n))]
    else:
        target, top = math.floor(densities[0] * n), math.floor(gammas[0] * n)
        bounds = [max(0, n - target - top), max(0, n - target - top) + target]
    assert any(0 < b < n and ascending[b - 1] == ascending[b] for b in bounds)


@needs_kernels
@settings(max_examples=40, deadline=None)
@given(
    n=st.integers(1, 5000),
    density=st.floats(0.0, 1.0),
    gamma=st.floats(0.0, 0.5),
    levels=st.integers(1, 3),
    seed=st.integers(0, 2**16),
    sparsifier=st.sampled_from(["magnitude", "magnitude_outliers"]),
)
def test_one_or_two_magnitudes_match_torch(n, density, gamma, levels, seed, sparsifier) -> None:
    """At most three magnitudes in a tensor (zero among them): every cut splits a run, and
    chunks of 1024 cut through the runs anywhere."""
    base, models = bf16_fine_tunes(n, 2, seed=seed, levels=levels)
    got, expected = both_paths(
        merge_task_vectors,
        base,
        models,
        [1.0, 0.5],
        densities=[density, 1 - density / 3],
        sparsifier=sparsifier,
        consensus="sum",
        normalize=True,
        gammas=[gamma, gamma / 3],
    )
    assert torch.equal(bits(got), bits(expected))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_matches_torch(dtype: torch.dtype, normalize: bool) -> None:
    _, models = inputs(BLOCK + 777, dtype, seed=8, quantized=False)
    got, expected = both_paths(
        linear, None, models, weight=[0.3, 0.5, 0.21], normalize=normalize, out_dtype=dtype
    )
    assert torch.equal(bits(got), bits(expected))


def to_float32(exact: Fraction) -> float:
    """`exact` rounded to the nearest float32, ties to even: one rounding, done by hand."""
    near = torch.tensor(float(exact), dtype=torch.float32)
    candidates = [
        torch.nextafter(near, torch.tensor(-math.inf)),
        near,
        torch.nextafter(near, torch.tensor(math.inf)),
    ]

    def rank(c: torch.Tensor) -> tuple[Fraction, int]:
        return abs(Fraction(float(c)) - exact), int(c.view(torch.int32)) & 1

    return float(min(candidates, key=rank))


def test_linear_is_a_chain_of_fused_multiply_adds() -> None:
    """Both paths, by hand: acc = fma(x_i, w_i, acc) from +0 (mergekit's addcmul_ on FMA CPUs),
    then / sum(w), each step rounded once to float32, with exact rational arithmetic."""
    x = [
        torch.tensor([1.1, -2.5, 3.0e-3, 0.0, 1.0 + 2**-23]),
        torch.tensor([0.7, 4.25, -1.0, -0.0, -1.0]),
        torch.tensor([1e-8, 1.0 / 3, 5.0, -0.0, 2**-24]),
    ]
    w = [0.3, 0.9, -0.45]
    w32 = [Fraction(float(torch.tensor(v, dtype=torch.float32))) for v in w]
    total = float(torch.tensor(w, dtype=torch.float32).sum())
    expected = []
    for column in zip(*(t.tolist() for t in x), strict=True):
        acc = Fraction(0)
        for value, weight in zip(column, w32, strict=True):
            acc = Fraction(to_float32(Fraction(value) * weight + acc))
        expected.append(to_float32(acc / Fraction(total)))
    for use_kernels in (True, False):
        if use_kernels:
            got = linear(None, x, weight=w)
        else:
            with native.torch_only():
                got = linear(None, x, weight=w)
        assert got.tolist() == expected, "kernels" if use_kernels else "torch code"
    # +0, never -0, where every term is a signed zero (mergekit's sum starts at +0).
    assert not torch.signbit(linear(None, x, weight=w)[3])


@needs_kernels
@pytest.mark.parametrize("method", ["ties", "breadcrumbs_ties", "task_arithmetic", "linear"])
def test_cli_output_is_byte_identical_without_kernels(
    method: str, family: tuple[Path, list[Path]], tmp_path: Path
) -> None:
    """A whole merge, as a user runs it, with MERGESMITH_KERNELS=torch and without."""
    base, tuned = family
    density = "" if method in ("task_arithmetic", "linear") else "density: 0.4, "
    gamma = "gamma: 0.05, " if method.startswith("breadcrumbs") else ""
    models = "".join(
        f"  - model: {p}\n    parameters: {{{density}{gamma}weight: {w}}}\n"
        for p, w in zip(tuned, (0.5, 0.3, 0.2), strict=True)
    )
    base_line = "" if method == "linear" else f"base_model: {base}\n"
    recipe = write_recipe(
        tmp_path, f"merge_method: {method}\n{base_line}models:\n{models}dtype: bfloat16\n"
    )
    assert_kernels_match_torch_code(recipe, tmp_path)


def della_keep_by_torch(magnitude: torch.Tensor, key: int, start: int, scale: float, offset):
    """DELLA's keep mask as the torch path draws it: full tie-averaged ranks of every row."""
    width = magnitude.shape[1]
    probability = tie_averaged_ranks(magnitude).div_(width - 1).mul_(scale).add_(offset)
    draws = stream.uniform(key, start, magnitude.numel())
    return (draws < probability.reshape(-1)).float()


def della_rows(rows: int, width: int, *, levels: int | None, zeros: float, outlier: bool, seed):
    """Magnitudes as task vectors have them: continuous or few distinct values (bf16 deltas),
    a share of exact zeros, and optionally one huge entry per row that squeezes every other
    key into few of the kernel's buckets (the rows it has to sort)."""
    g = torch.Generator().manual_seed(seed)
    m = torch.randn(rows, width, generator=g).abs_().mul_(1e-3)
    if levels is not None:
        m = torch.randint(1, levels + 1, (rows, width), generator=g).float().mul_(2.0**-12)
    m[torch.rand(rows, width, generator=g) < zeros] = 0.0
    if outlier:
        m[:, width // 3] = 1e30
    return m


@needs_kernels
@settings(max_examples=120, deadline=None)
@given(
    rows=st.integers(1, 3),
    width=st.integers(2, 3000),
    levels=st.sampled_from([None, None, 1, 2, 7, 300]),
    zeros=st.sampled_from([0.0, 0.1, 1.0]),
    outlier=st.booleans(),
    density=st.floats(0.05, 0.95),
    epsilon=st.floats(0.0, 0.05),
    negative=st.booleans(),
    seed=st.integers(0, 2**16),
)
def test_della_keep_matches_full_ranking(
    rows, width, levels, zeros, outlier, density, epsilon, negative, seed
) -> None:
    """The kernel settles most entries from bucket bounds on their rank; it must decide every
    entry as the full tie-averaged ranking does, whichever way each is settled."""
    m = della_rows(rows, width, levels=levels, zeros=zeros, outlier=outlier, seed=seed)
    scale = (-2 if negative else 2) * epsilon
    start = seed * 7
    got = native.della_keep(m, seed, start, scale, density - epsilon)
    assert torch.equal(got, della_keep_by_torch(m, seed, start, scale, density - epsilon))


@needs_kernels
@pytest.mark.parametrize(
    "shape, levels, zeros, outlier",
    [
        ((40, 4096), None, 0.05, False),  # wide continuous rows: bucket bounds, then counting
        ((40, 1024), None, 0.0, True),  # an outlier squeezes the rest: rows sorted
        ((40, 1024), 3, 0.3, False),  # few values: buckets of one run each, exact ranks
        ((4, 1024), None, 1.0, False),  # an unchanged row: every rank ties
    ],
)
def test_della_keep_on_wide_rows(shape, levels, zeros, outlier) -> None:
    m = della_rows(*shape, levels=levels, zeros=zeros, outlier=outlier, seed=1)
    got = native.della_keep(m, 5, 1000, 0.3, 0.35)
    assert torch.equal(got, della_keep_by_torch(m, 5, 1000, 0.3, 0.35))


def exact_sums(total: native.NativeSum, kept: native.NativeSum) -> tuple[ExactSum, ExactSum]:
    folded = ExactSum(), ExactSum()
    total.add_to(folded[0])
    kept.add_to(folded[1])
    return folded


def torch_sums(magnitude: torch.Tensor, keep: torch.Tensor) -> tuple[ExactSum, ExactSum]:
    """The two norms of the torch steps the fused passes replace, summed by the torch code."""
    total, kept = ExactSum(), ExactSum()
    total.add(magnitude)
    kept.add(magnitude * keep)
    return total, kept


def spread_exponents(model: torch.Tensor, base: torch.Tensor, seed: int) -> torch.Tensor:
    """Deltas of float32 inputs from 1e-30 to 1e3: their sums need the split's later rounds."""
    g = torch.Generator().manual_seed(seed)
    scale = torch.exp(torch.empty(model.numel()).uniform_(-69, 7, generator=g))
    return (base.float() + torch.randn(model.numel(), generator=g) * scale).to(model.dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spread", [False, True], ids=["quantized", "spread"])
def test_stream_measure_matches_its_torch_steps(dtype: torch.dtype, spread: bool) -> None:
    """DARE's fused measuring pass: the exact norms of |model - base| and of the part the
    stream keeps, and that mask as bits, over a range that starts off a byte and ends inside a
    byte of its last chunk. Inf and NaN deltas are counted apart, as the torch code counts the
    values its product gives."""
    base, models = inputs(5000, dtype, seed=6, quantized=True, k=1)
    model = spread_exponents(models[0], base, 3) if spread else models[0].clone()
    model[20], model[21] = math.inf, math.nan
    start, end = 13, 13 + 2 * 1024 + 1001
    threshold = stream.keep_threshold(0.3)
    packed = torch.full(((end - start + 7) // 8,), 0xAA, dtype=torch.uint8)
    total, kept = native.NativeSum(), native.NativeSum()
    bits = native.bits_at(packed, end - start)
    flats = native.flat(base), native.flat(model)
    native.stream_measure(*flats, start, end, 99, threshold, bits, total, kept)
    magnitude = torch.sub(model[start:end], base[start:end].float()).abs_()
    keep = stream.keep_with_probability(99, start, end - start, 0.3)
    expected_bits = torch.empty_like(packed)
    native.pack_mask(keep, expected_bits)
    assert exact_sums(total, kept) == torch_sums(magnitude, keep)
    assert torch.equal(packed, expected_bits)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("spread", [False, True], ids=["quantized", "spread"])
def test_della_measure_matches_its_torch_steps(dtype: torch.dtype, spread: bool) -> None:
    """The fused measuring pass: the exact norms of |model - base| and of its kept part, and
    the mask as bits, each as the torch steps it replaces compute them; rows wider than a
    split span (1024) and bits of a row straddling bytes."""
    rows, width = 9, 1301
    base, models = inputs((rows + 2) * width, dtype, seed=9, quantized=True, k=1)
    model = spread_exponents(models[0], base, 4) if spread else models[0]
    start, end = 2 * width, (rows + 2) * width  # a block after the first two rows
    bits = torch.full(((rows * width + 7) // 8,), 0xAA, dtype=torch.uint8)
    total, kept = native.NativeSum(), native.NativeSum()
    flats = native.flat(base), native.flat(model)
    at = native.bits_at(bits, end - start)
    native.della_measure(*flats, start, end, width, 21, 0.2, 0.4, at, total, kept)
    magnitude = torch.sub(model[start:], base[start:].float()).abs_()
    keep = della_keep_by_torch(magnitude.reshape(rows, width), 21, start, 0.2, 0.4)
    expected_bits = torch.empty_like(bits)
    native.pack_mask(keep, expected_bits)
    assert exact_sums(total, kept) == torch_sums(magnitude, keep)
    assert torch.equal(bits, expected_bits)


def random_bytes(n: int, seed: int) -> bytes:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n,), dtype=torch.uint8, generator=g).numpy().tobytes()


# Both sides of every block size the folds work in (16-byte lanes, 64-byte steps) and of the
# length from which ms_crc32 folds at all (64 + 15).
CRC_LENGTHS = [*range(301), *(n + d for n in (64, 79, 128, 256, 512, 4096) for d in range(-17, 18))]


@needs_kernels
@pytest.mark.parametrize("portable", [False, True], ids=["ms_crc32", "tables"])
def test_crc32_kernel_equals_zlib_at_every_short_length_and_alignment(portable: bool) -> None:
    """Every length to 300 and around the folds' block sizes, starting at each of 16 byte
    offsets (so every alignment the 16-byte head meets), from zlib's start and from another
    register value, read in place from read-only (bytes) and writable buffers."""
    data = random_bytes(5000, seed=1)
    writable = memoryview(bytearray(data))
    for offset in range(16):
        for n in sorted(set(CRC_LENGTHS)):
            piece = data[offset : offset + n]
            for start in (0, 0x9E3779B9):
                expected = zlib.crc32(piece, start)
                got = native.kernel_crc32(
                    memoryview(data)[offset : offset + n], start, portable=portable
                )
                assert got == expected, (offset, n, start)
                got = native.kernel_crc32(writable[offset : offset + n], start, portable=portable)
                assert got == expected, (offset, n, start)


@needs_kernels
@pytest.mark.parametrize("portable", [False, True], ids=["ms_crc32", "tables"])
@pytest.mark.parametrize("fill", ["random", "zeros", "ones"])
@pytest.mark.parametrize("size", [1 << 20, 10_000_019])
def test_crc32_kernel_equals_zlib_on_large_inputs(portable: bool, fill: str, size: int) -> None:
    """Megabytes of random bytes, of 0x00 and of 0xFF (the register's inversion matters most
    where the data is constant), one of them an odd length that leaves a tail after the folds."""
    data = {
        "random": lambda: random_bytes(size, seed=2),
        "zeros": lambda: bytes(size),
        "ones": lambda: b"\xff" * size,
    }[fill]()
    assert native.kernel_crc32(data, portable=portable) == zlib.crc32(data)
    assert native.kernel_crc32(data, 12345, portable=portable) == zlib.crc32(data, 12345)


@needs_kernels
@pytest.mark.parametrize("portable", [False, True], ids=["ms_crc32", "tables"])
def test_crc32_kernel_calls_chain_like_zlib(portable: bool) -> None:
    """crc32(b, crc32(a, start)) is the CRC of a then b, wherever the split falls: in a fold's
    lane, between steps, in the tail; the start not zero."""
    data = random_bytes(70_001, seed=3)
    view = memoryview(data)
    for split in (0, 1, 15, 16, 63, 64, 65, 79, 80, 1000, 4096 + 7, 65_536, 70_000, 70_001):
        first = native.kernel_crc32(view[:split], 0xDEADBEEF, portable=portable)
        assert native.kernel_crc32(view[split:], first, portable=portable) == zlib.crc32(
            data, 0xDEADBEEF
        ), split


@needs_kernels
@settings(max_examples=200, deadline=None)
@given(data=st.binary(max_size=3000), start=st.integers(0, 2**32 - 1), offset=st.integers(0, 15))
def test_crc32_kernel_equals_zlib_on_any_bytes(data: bytes, start: int, offset: int) -> None:
    padded = memoryview(bytes(offset) + data)[offset:]
    for portable in (False, True):
        assert native.kernel_crc32(padded, start, portable=portable) == zlib.crc32(data, start)


def test_crc32_is_zlibs_with_and_without_kernels() -> None:
    """native.crc32, which the writer and the progress journal use, gives zlib's values on both
    sides of the length from which it calls the kernel, and with the kernels switched off: a
    journal written by either path (or by a mergesmith before the kernel) reads the same."""
    from mergesmith.output.journal import checksum

    sizes = [0, 100, native.CRC32_KERNEL_FROM - 1, native.CRC32_KERNEL_FROM, 3_000_017]
    for size in sizes:
        data = random_bytes(size, seed=size)
        writable = memoryview(bytearray(data))
        assert native.crc32(data) == zlib.crc32(data)
        assert native.crc32(writable, 77) == zlib.crc32(data, 77)
        assert checksum(data) == zlib.crc32(data)
        with native.torch_only():
            assert native.crc32(writable, 77) == zlib.crc32(data, 77)


@needs_kernels
def test_crc32_kernel_folds_where_the_cpu_can() -> None:
    """The tests above hold the carry-less path to zlib only where ms_crc32 takes it: on an
    x86-64 Linux CPU with PCLMULQDQ and SSE4.1 it must."""
    cpuinfo = Path("/proc/cpuinfo")
    if os.uname().machine != "x86_64" or not cpuinfo.exists():
        pytest.skip("the carry-less path is x86-64 only")
    flags = set(cpuinfo.read_text().split())
    expected = {"pclmulqdq", "sse4_1"} <= flags
    assert bool(native.loaded().ms_crc32_uses_clmul()) == expected
