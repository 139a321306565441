"""The random stream (ops.stream) against SplitMix64 written out sequentially in plain Python,
the C kernels' copy of it against the torch one, and the statistics DARE and DELLA rely on."""

from __future__ import annotations

import math

import pytest
import torch

from mergesmith import native
from mergesmith.ops import stream
from mergesmith.plan.jobs import derive_seed

MASK64 = (1 << 64) - 1


def splitmix64_outputs(seed: int, count: int, skip: int = 0) -> list[int]:
    """SplitMix64 as published: a state advanced by the golden gamma, each output its mix."""
    state = (seed + skip * 0x9E3779B97F4A7C15) & MASK64
    outputs = []
    for _ in range(count):
        state = (state + 0x9E3779B97F4A7C15) & MASK64
        z = state
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
        outputs.append(z ^ (z >> 31))
    return outputs


KEYS = [0, 1, 0x0123456789ABCDEF, (1 << 63) - 1, derive_seed(0, "org/model", "lm_head.weight")]
STARTS = [0, 7, (1 << 32) - 3, (1 << 40) + 5]


def test_the_first_draws_of_seed_zero_are_splitmix64s() -> None:
    # SplitMix64(0) begins 0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4: their top 24 bits.
    assert stream.draws24(0, 0, 2).tolist() == [0xE220A8, 0x6E789E]


@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("start", STARTS)
def test_draws_are_the_top_bits_of_splitmix64_outputs(key: int, start: int) -> None:
    expected = [z >> 40 for z in splitmix64_outputs(key, 64, skip=start)]
    assert stream.draws24(key, start, 64).tolist() == expected


@pytest.mark.skipif(not native.available(), reason="C kernels not built")
@pytest.mark.parametrize("key", KEYS)
@pytest.mark.parametrize("start", STARTS)
def test_kernel_masks_are_the_torch_masks(key: int, start: int) -> None:
    count = 5000
    for density in (0.0, 0.1, 0.5, 0.93, 1.0):
        threshold = stream.keep_threshold(density)
        c_mask = native.stream_keep(key, start, count, threshold=threshold)
        assert torch.equal(c_mask, stream.keep_with_probability(key, start, count, density))
    probability = torch.rand(count, generator=torch.Generator().manual_seed(key % 1000))
    c_mask = native.stream_keep(key, start, count, probability=probability)
    expected = [float(z >> 40) / 2**24 < p for z, p in zip(
        splitmix64_outputs(key, count, skip=start), probability.tolist(), strict=True
    )]  # fmt: skip
    assert c_mask.tolist() == [float(e) for e in expected]


def test_threshold_is_the_exact_real_comparison() -> None:
    # u / 2^24 < d  <=>  u < ceil(d * 2^24) for integers u.
    assert stream.keep_threshold(0.5) == 1 << 23
    assert stream.keep_threshold(0.1) == math.ceil(0.1 * 2**24) == 1677722
    assert stream.keep_threshold(0.0) == 0 and stream.keep_threshold(1.0) == 1 << 24
    d = 0.1
    u = torch.arange(1677700, 1677740)
    assert torch.equal(u < stream.keep_threshold(d), u.double() / 2**24 < d)


N = 1 << 20


@pytest.mark.parametrize("density", [0.1, 0.5, 0.9])
def test_keep_rate_and_independence_of_neighbours(density: float) -> None:
    keep = stream.keep_with_probability(12345, 0, N, density)
    sigma = math.sqrt(density * (1 - density) / N)
    assert abs(float(keep.mean()) - density) < 5 * sigma
    # Neighbouring entries (and entries a row of 4096 apart) are kept independently.
    for lag in (1, 2, 4096):
        both = float((keep[lag:] * keep[:-lag]).mean())
        assert abs(both - density**2) < 5 * math.sqrt(density**2 * (1 - density**2) / N)


def test_models_and_tensors_draw_unrelated_masks() -> None:
    keys = [derive_seed(0, model, "w") for model in ("a", "b")] + [derive_seed(0, "a", "w2")]
    masks = [stream.keep_with_probability(k, 0, N, 0.5) for k in keys]
    for i in range(3):
        for j in range(i + 1, 3):
            agree = float((masks[i] == masks[j]).float().mean())
            assert abs(agree - 0.5) < 5 * math.sqrt(0.25 / N)


def test_draws_fill_all_buckets_evenly() -> None:
    # Chi-square over 256 buckets of the leading 8 bits, and of the trailing 8 of the 24.
    draws = stream.draws24(777, 1 << 33, N)
    for buckets in (draws >> 16, draws & 255):
        counts = torch.bincount(buckets, minlength=256).double()
        chi2 = float(((counts - N / 256) ** 2 / (N / 256)).sum())
        assert chi2 < 255 + 6 * math.sqrt(2 * 255)  # mean 255, sd ~22.6


@pytest.mark.parametrize("n", [1, 7, 1000, 1_000_003, (1 << 32) - 1, 1 << 32, 3 << 40])
def test_positions_are_splitmix64_outputs_scaled_to_n(n: int) -> None:
    if n < 1 << 32:
        expected = [((z >> 32) * n) >> 32 for z in splitmix64_outputs(99, 200)]
    else:
        expected = [(z >> 1) % n for z in splitmix64_outputs(99, 200)]
    got = stream.positions(99, 200, n).tolist()
    assert got == expected and all(0 <= p < n for p in got)


def test_positions_cover_the_range_evenly() -> None:
    got = stream.positions(4242, N, 1000)
    counts = torch.bincount(got, minlength=1000).double()
    chi2 = float(((counts - N / 1000) ** 2 / (N / 1000)).sum())
    assert chi2 < 999 + 6 * math.sqrt(2 * 999)
