"""The fused C kernels (kernels.c), loaded through ctypes, and when to use them.

They are built by `pip install` as an optional extension. Where the build was skipped (no C
compiler), is stale, or the tensors are not on the CPU in a dtype they read, the torch code runs
instead: both give the same bytes. `MERGESMITH_KERNELS=torch` forces the torch code, for
comparisons and for bisecting a suspected kernel bug.
"""

from __future__ import annotations

import ctypes
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from functools import cache
from typing import NamedTuple

import torch

from mergesmith.dtypes import to_torch
from mergesmith.native.status import kernel_status
from mergesmith.ops.exact_sum import UNIT_EXPONENT, ExactSum

# The kernels' dtype codes (DT_* in convert.h), by safetensors name.
KERNEL_DTYPES = {"F32": 0, "BF16": 1, "F16": 2}
EXACT_BINS, EXACT_LOW = 288, -201  # as in exact_sum.h

TRIM_KEEP_ALL, TRIM_TIMES_ZERO, TRIM_SHRINK, TRIM_MASK = range(4)
TRIM_GIVEN, TRIM_GIVEN_BITS, TRIM_RANDOM = range(4, 7)
SMALL_NONE, SMALL_SHRINK, SMALL_ZEROS = 0, 1, 2
CONSENSUS = {None: 0, "sum": 1, "count": 2}


class Trim(ctypes.Structure):
    """How one model's delta is cut in one block; mirrors `Trim` in kernels.c."""

    _fields_ = [
        ("mode", ctypes.c_int32),
        ("has_large", ctypes.c_int32),
        ("large", ctypes.c_float),
        ("small_mode", ctypes.c_int32),
        ("small", ctypes.c_float),
        ("descending", ctypes.c_int32),
        ("has_lower", ctypes.c_int32),
        ("lower_key", ctypes.c_float),
        ("lower_need", ctypes.c_int64),
        ("lower_tied", ctypes.c_int64),
        ("lower_phase", ctypes.c_int64),
        ("has_upper", ctypes.c_int32),
        ("upper_key", ctypes.c_float),
        ("upper_need", ctypes.c_int64),
        ("upper_tied", ctypes.c_int64),
        ("upper_phase", ctypes.c_int64),
        ("has_factor", ctypes.c_int32),
        ("factor", ctypes.c_float),
        ("weight", ctypes.c_float),
        ("keep", ctypes.c_void_p),
        ("stream_key", ctypes.c_uint64),
        ("threshold", ctypes.c_int64),
    ]


class NativeSum(ctypes.Structure):
    """An exact sum being counted by the kernels; mirrors `ExactSum` in exact_sum.h."""

    _fields_ = [
        ("count", (ctypes.c_uint64 * 2) * EXACT_BINS),
        ("infinities", ctypes.c_int64),
        ("nans", ctypes.c_int64),
    ]

    def add_to(self, total: ExactSum) -> None:
        """Fold the counts into `total`: count b is in units of 2^(b + EXACT_LOW)."""
        counts = bytes(self.count)  # each a little-endian two's-complement 128-bit integer
        for b in range(EXACT_BINS):
            count = int.from_bytes(counts[16 * b : 16 * b + 16], "little", signed=True)
            if count:
                total.units += count << (b + EXACT_LOW - UNIT_EXPONENT)
        total.infinities += self.infinities
        total.nans += self.nans


@cache
def _torch_codes() -> dict[torch.dtype, int]:
    """KERNEL_DTYPES by torch dtype, built on first use: looking torch dtypes up at import
    would load torch (deferred_torch)."""
    return {to_torch(name): code for name, code in KERNEL_DTYPES.items()}


def dtype_code(dtype: torch.dtype) -> int:
    """The kernels' code for a torch dtype they read and write."""
    return _torch_codes()[dtype]


class KernelError(RuntimeError):
    """A kernel could not run (out of memory for its scratch)."""


# Scoped to the calling thread and context, not process-wide state.
_switched_off: ContextVar[bool] = ContextVar("mergesmith_kernels_switched_off", default=False)


@contextmanager
def torch_only() -> Iterator[None]:
    """Run the torch code inside this block, in this thread (tests compare the paths)."""
    token = _switched_off.set(True)
    try:
        yield
    finally:
        _switched_off.reset(token)


def _library() -> ctypes.CDLL | None:
    return None if _switched_off.get() else _load()


@cache
def _load() -> ctypes.CDLL | None:
    status = kernel_status()
    if not status.in_use:
        return None
    lib = ctypes.CDLL(status.path)
    lib.ms_has_f16.restype = ctypes.c_int
    p, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float
    lib.ms_family_block.argtypes = [
        p, i32, p, p, i32, p, i64, i64, i32, i32, f32, i32, f32, p, i32,
    ]  # fmt: skip
    lib.ms_family_block.restype = ctypes.c_int
    lib.ms_linear_block.argtypes = [p, p, p, i32, i64, i64, i32, f32, p, i32]
    lib.ms_linear_block.restype = ctypes.c_int
    lib.ms_bracket_sweep.argtypes = [
        p, i32, p, i32, i64, i32, f32, f32, p, p, p, i64, p, i64, p, p,
    ]  # fmt: skip
    lib.ms_bracket_sweep.restype = ctypes.c_int
    lib.ms_sample_keys.argtypes = [p, i32, p, i32, i64, i32, i64, p]
    lib.ms_sample_keys.restype = None
    lib.ms_stream_keep.argtypes = [ctypes.c_uint64, i64, i64, i64, p, p]
    lib.ms_stream_keep.restype = None
    lib.ms_stream_measure.argtypes = [
        p, i32, p, i32, i64, i64, ctypes.c_uint64, i64, p, p, p,
    ]  # fmt: skip
    lib.ms_stream_measure.restype = None
    lib.ms_exact_sum.argtypes = [p, i64, p]
    lib.ms_exact_sum.restype = None
    lib.ms_della_keep.argtypes = [p, i64, i64, ctypes.c_uint64, i64, f32, f32, p]
    lib.ms_della_keep.restype = ctypes.c_int
    lib.ms_della_measure.argtypes = [
        p, i32, p, i32, i64, i64, i64, ctypes.c_uint64, f32, f32, p, p, p,
    ]  # fmt: skip
    lib.ms_della_measure.restype = ctypes.c_int
    lib.ms_count_nonfinite.argtypes = [p, i32, i64]
    lib.ms_count_nonfinite.restype = ctypes.c_int64
    for crc32_kernel in (lib.ms_crc32, lib.ms_crc32_portable):
        crc32_kernel.argtypes = [ctypes.c_uint32, p, i64]
        crc32_kernel.restype = ctypes.c_uint32
    lib.ms_crc32_uses_clmul.restype = ctypes.c_int
    return lib


def loaded() -> ctypes.CDLL:
    """The library, for callers that checked `handles` (or `available`) first."""
    lib = _library()
    assert lib is not None, "a kernel was called where handles() said the torch code runs"
    return lib


def available() -> bool:
    """Whether the C kernels are built, current and not switched off."""
    return _library() is not None


def handles(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels can read (and write) these tensors: contiguous, on the CPU, in a
    dtype they know."""
    lib = _library()
    if lib is None:
        return False
    for t in tensors:
        if t is None:
            continue
        if t.device.type != "cpu" or not t.is_contiguous() or t.dtype not in _torch_codes():
            return False
        if t.dtype == torch.float16 and not lib.ms_has_f16():
            return False
    return True


class Flat(NamedTuple):
    """A flat array as the kernels see it: where it starts, and its dtype's code."""

    address: int
    code: int


def flat(tensor: torch.Tensor) -> Flat:
    """A contiguous CPU tensor (one `handles` accepts) as a Flat."""
    return Flat(tensor.data_ptr(), dtype_code(tensor.dtype))


def bits_at(bits: torch.Tensor, count: int) -> int:
    """The address of a uint8 tensor with room for `count` entries' bits."""
    assert bits.dtype == torch.uint8 and bits.numel() >= (count + 7) // 8
    return bits.data_ptr()


def _arrays(arrays: Sequence[Flat]) -> tuple[ctypes.Array, ctypes.Array]:
    pointers = (ctypes.c_void_p * len(arrays))(*(a.address for a in arrays))
    codes = (ctypes.c_int32 * len(arrays))(*(a.code for a in arrays))
    return pointers, codes


def family_block(
    base: Flat,
    models: Sequence[Flat],
    trims: Sequence[Trim],
    start: int,
    end: int,
    *,
    consensus: str | None,
    normalize: bool,
    plain_divisor: float,
    lambda_: float,
    out: Flat,
) -> None:
    """One block of the task-vector family into `out` (flat)."""
    pointers, codes = _arrays(models)
    status = loaded().ms_family_block(
        base.address,
        base.code,
        pointers,
        codes,
        len(models),
        (Trim * len(trims))(*trims),
        start,
        end - start,
        CONSENSUS[consensus],
        int(normalize),
        plain_divisor,
        int(lambda_ != 1),
        lambda_,
        out.address,
        out.code,
    )
    if status != 0:
        raise KernelError("no memory for the kernel's scratch buffers")


def linear_block(
    models: Sequence[Flat],
    weights: Sequence[float],
    start: int,
    end: int,
    *,
    normalize: bool,
    total: float,
    out: Flat,
) -> None:
    """One block of the weighted sum into `out` (flat)."""
    pointers, codes = _arrays(models)
    status = loaded().ms_linear_block(
        pointers,
        codes,
        (ctypes.c_float * len(weights))(*weights),
        len(models),
        start,
        end - start,
        int(normalize),
        total,
        out.address,
        out.code,
    )
    if status != 0:
        raise KernelError("no memory for the kernel's scratch buffers")


def count_nonfinite(array: Flat, count: int) -> int:
    """How many of the `count` values of `array` are NaN or infinite."""
    return loaded().ms_count_nonfinite(array.address, array.code, count)


@dataclass(frozen=True)
class Sweep:
    """One bracket's counts over all of the keys (see bracket_sweep)."""

    tally: list[int]  # keys below lo, equal to lo, equal to hi
    values: torch.Tensor  # the keys strictly between lo and hi, in index order...
    indices: torch.Tensor  # ...and their flat indices
    lo_blocks: list[int]  # keys equal to lo in each block
    hi_blocks: list[int]  # keys equal to hi in each block


def bracket_sweep(
    base: torch.Tensor,
    model: torch.Tensor,
    descending: bool,
    lo: float,
    hi: float,
    block: int,
) -> Sweep | None:
    """Over all of |model - base| (negated when descending): counts below lo, equal to lo and
    equal to hi (those two also per block of `block` entries), and the keys strictly between
    with their flat indices, in index order. None when a key is NaN (the keys have no order)."""
    lib = loaded()
    n = base.numel()
    blocks = max(1, -(-n // block))
    capacity = min(n, max(4096, n // 32))
    tally = (ctypes.c_int64 * 3)()
    found = ctypes.c_int64(0)
    while True:
        values = torch.empty(capacity + 1, dtype=torch.float32)
        indices = torch.empty(capacity + 1, dtype=torch.int64)
        lo_blocks = torch.zeros(blocks, dtype=torch.int64)
        hi_blocks = torch.zeros(blocks, dtype=torch.int64)
        status = lib.ms_bracket_sweep(
            base.data_ptr(),
            dtype_code(base.dtype),
            model.data_ptr(),
            dtype_code(model.dtype),
            n,
            int(descending),
            lo,
            hi,
            tally,
            values.data_ptr(),
            indices.data_ptr(),
            capacity,
            ctypes.byref(found),
            block,
            lo_blocks.data_ptr(),
            hi_blocks.data_ptr(),
        )
        if status != 0:
            return None
        if found.value <= capacity:
            return Sweep(
                list(tally),
                values[: found.value],
                indices[: found.value],
                lo_blocks.tolist(),
                hi_blocks.tolist(),
            )
        capacity = found.value


def sample_keys(
    base: torch.Tensor, model: torch.Tensor, descending: bool, size: int
) -> torch.Tensor:
    """The keys at min(n, size) evenly spaced positions (those of rank_cut.sample_positions)."""
    lib = loaded()
    count = min(base.numel(), size)
    sample = torch.empty(count, dtype=torch.float32)
    lib.ms_sample_keys(
        base.data_ptr(),
        dtype_code(base.dtype),
        model.data_ptr(),
        dtype_code(model.dtype),
        base.numel(),
        int(descending),
        count,
        sample.data_ptr(),
    )
    return sample


def stream_keep(
    key: int, start: int, count: int, *, threshold: int = 0, probability: torch.Tensor | None = None
) -> torch.Tensor:
    """ops.stream's keep mask for elements [start, start + count) as float 0/1: below
    `threshold` (DARE), or with each entry's float32 `probability` (DELLA)."""
    keep = torch.empty(count, dtype=torch.float32)
    if probability is not None:
        probability = probability.reshape(-1).contiguous()
        assert probability.dtype == torch.float32 and probability.numel() == count
    pointer = None if probability is None else probability.data_ptr()
    loaded().ms_stream_keep(key, start, count, threshold, pointer, keep.data_ptr())
    return keep


def stream_measure(
    base: Flat,
    model: Flat,
    start: int,
    end: int,
    key: int,
    threshold: int,
    bits: int,
    total: NativeSum,
    kept: NativeSum,
) -> None:
    """DARE's measuring pass over [start, end) of the flat inputs: adds |model - base| (float32)
    to `total` and the same with the entries ops.stream drops (draw >= threshold) zeroed to
    `kept`, exactly, and packs that keep mask into the (end - start + 7) // 8 bytes at `bits`
    (as pack_mask packs it)."""
    loaded().ms_stream_measure(
        base.address,
        base.code,
        model.address,
        model.code,
        start,
        end - start,
        key,
        threshold,
        ctypes.byref(total),
        ctypes.byref(kept),
        bits,
    )


def exact_sum(values: torch.Tensor) -> ExactSum:
    """The exact sum of float32 values on the CPU, counted by the kernels' general rounds."""
    values = values.reshape(-1).contiguous()
    assert values.dtype == torch.float32 and values.device.type == "cpu"
    counts = NativeSum()
    loaded().ms_exact_sum(values.data_ptr(), values.numel(), ctypes.byref(counts))
    total = ExactSum()
    counts.add_to(total)
    return total


def della_keep(
    magnitude: torch.Tensor, key: int, start: int, scale: float, offset: float
) -> torch.Tensor:
    """DELLA's float 0/1 mask for rows of float32 magnitudes (2-D, rows wider than one entry)
    starting at flat index `start`: each entry kept when its ops.stream draw is below
    tie_averaged_rank / (width - 1) * scale + offset, in float32."""
    rows, width = magnitude.shape
    assert magnitude.dtype == torch.float32 and 1 < width < 1 << 31
    magnitude = magnitude.contiguous()
    keep = torch.empty(rows * width, dtype=torch.float32)
    kernel = loaded().ms_della_keep
    if kernel(magnitude.data_ptr(), rows, width, key, start, scale, offset, keep.data_ptr()):
        raise KernelError("no memory for the kernel's scratch buffers")
    return keep


def della_measure(
    base: Flat,
    model: Flat,
    start: int,
    end: int,
    width: int,
    key: int,
    scale: float,
    offset: float,
    bits: int,
    total: NativeSum,
    kept: NativeSum,
) -> None:
    """DELLA's measuring pass over the rows [start, end) of flat inputs (`width` > 1 entries
    each): adds |model - base| (float32) to `total` and the same with the entries della_keep
    drops zeroed to `kept`, exactly, and packs that keep mask into the (end - start + 7) // 8
    bytes at `bits` (as pack_mask packs it)."""
    assert 1 < width < 1 << 31 and (end - start) % width == 0
    failed = loaded().ms_della_measure(
        base.address,
        base.code,
        model.address,
        model.code,
        start,
        (end - start) // width,
        width,
        key,
        scale,
        offset,
        ctypes.byref(total),
        ctypes.byref(kept),
        bits,
    )
    if failed:
        raise KernelError("no memory for the kernel's scratch buffers")


def pack_mask(keep: torch.Tensor, into: torch.Tensor) -> None:
    """A float 0/1 mask as bits into `into` (uint8): entry i is bit i % 8 of byte i // 8, as
    TRIM_GIVEN_BITS reads them."""
    import numpy as np

    bits = np.packbits(keep.numpy() != 0, bitorder="little")
    into[: bits.size].copy_(torch.from_numpy(bits))


# Below this many bytes zlib.crc32 is done before a ctypes call is set up (a few microseconds).
CRC32_KERNEL_FROM = 1 << 16


def crc32(data: memoryview | bytes, crc: int = 0) -> int:
    """zlib.crc32(data, crc), the same value, computed by the kernels' carry-less multiplies
    (several times zlib's speed) where the CPU has them and `data` is long enough to gain."""
    if memoryview(data).nbytes < CRC32_KERNEL_FROM or not available() or not _crc32_folds():
        return zlib.crc32(data, crc)
    return kernel_crc32(data, crc)


@cache
def _crc32_folds() -> bool:
    """Whether ms_crc32 folds with PCLMULQDQ here; without it its tables are slower than zlib's."""
    lib = _load()
    return lib is not None and bool(lib.ms_crc32_uses_clmul())


def kernel_crc32(data: memoryview | bytes, crc: int = 0, *, portable: bool = False) -> int:
    """zlib.crc32(data, crc) by ms_crc32, or by its tables alone (`portable`, for the tests), on
    any length, reading `data` in place."""
    import numpy as np

    lib = loaded()
    kernel = lib.ms_crc32_portable if portable else lib.ms_crc32
    view = memoryview(data)
    if view.nbytes == 0:
        return crc & 0xFFFFFFFF
    # ctypes takes the address of writable buffers only; numpy takes read-only ones (bytes) too.
    if view.readonly:
        held = np.frombuffer(view, np.uint8)
        address = held.ctypes.data
    else:
        held = ctypes.c_char.from_buffer(view)
        address = ctypes.addressof(held)
    return kernel(crc & 0xFFFFFFFF, address, view.nbytes)
