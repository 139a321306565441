"""The whole-tensor kernels (whole.c), loaded through ctypes with the other kernels.

Each wrapper is called only where `handles` says the kernels can run; elsewhere the torch code
beside each call runs, and both give the same bytes (tests/test_whole_kernels.py). A build that
predates whole.c lacks its symbols: then `handles` is false and the torch code runs.
"""

from __future__ import annotations

import ctypes
from collections.abc import Sequence
from functools import cache

import torch

from mergesmith import native
from mergesmith.native import KernelError


@cache
def _declared(lib: ctypes.CDLL) -> ctypes.CDLL | None:
    """`lib` with the whole-tensor kernels' signatures set, or None if it was built without
    them."""
    if not hasattr(lib, "msw_gram"):
        return None
    p, i32, i64, f32 = ctypes.c_void_p, ctypes.c_int32, ctypes.c_int64, ctypes.c_float
    lib.msw_gram.argtypes = [p, p, i32, p, i32, i64, i64, p]
    lib.msw_gram.restype = ctypes.c_int
    lib.msw_combine.argtypes = [p, p, i32, p, i32, i64, i64, p, p, i32]
    lib.msw_combine.restype = None
    lib.msw_stock_combine.argtypes = [p, p, i32, p, i32, i64, i64, p, p, i32]
    lib.msw_stock_combine.restype = None
    lib.msw_nearswap.argtypes = [p, i32, p, i32, i64, f32, f32, p, i32]
    lib.msw_nearswap.restype = None
    lib.msw_fusion_apply.argtypes = [p, i32, p, i32, i64, i64, p, f32, p, i32]
    lib.msw_fusion_apply.restype = None
    lib.msw_fusion_quartiles.argtypes = [p, i32, p, i32, i64, p, p, i64, p, p]
    lib.msw_fusion_quartiles.restype = ctypes.c_int
    return lib


def _kernels() -> ctypes.CDLL | None:
    lib = native._library()
    return None if lib is None else _declared(lib)


def handles(*tensors: torch.Tensor | None) -> bool:
    """Whether the kernels can read (and write) these tensors: built with whole.c, not switched
    off, and every tensor contiguous, on the CPU, in a dtype they know."""
    return _kernels() is not None and native.handles(*tensors)


def _lib() -> ctypes.CDLL:
    lib = _kernels()
    assert lib is not None, "a kernel was called where handles() said the torch code runs"
    return lib


def _inputs(
    tensors: Sequence[torch.Tensor], base: torch.Tensor | None
) -> tuple[ctypes.Array, ctypes.Array, int | None, int]:
    pointers = (ctypes.c_void_p * len(tensors))(*(t.data_ptr() for t in tensors))
    dtypes = (ctypes.c_int32 * len(tensors))(*(native.dtype_code(t.dtype) for t in tensors))
    if base is None:
        return pointers, dtypes, None, 0
    return pointers, dtypes, base.data_ptr(), native.dtype_code(base.dtype)


def gram(
    models: Sequence[torch.Tensor], base: torch.Tensor | None, rows: int, length: int
) -> torch.Tensor:
    """The (rows, n (n + 1) / 2) float64 pair sums of ops.spherical.row_grams, for inputs laid out
    as `rows` contiguous rows of `length`."""
    n = len(models)
    out = torch.empty(rows, n * (n + 1) // 2, dtype=torch.float64)
    pointers, dtypes, base_pointer, base_dtype = _inputs(models, base)
    status = _lib().msw_gram(
        pointers, dtypes, n, base_pointer, base_dtype, rows, length, out.data_ptr()
    )
    if status != 0:
        raise KernelError("no memory for the kernel's scratch buffers")
    return out


def combine(
    models: Sequence[torch.Tensor],
    base: torch.Tensor | None,
    coefficients: torch.Tensor,
    out: torch.Tensor,
) -> None:
    """ops.spherical.combine_rows into `out`: `coefficients` is (rows, n) float64."""
    rows, n = coefficients.shape
    coefficients = coefficients.contiguous()
    pointers, dtypes, base_pointer, base_dtype = _inputs(models, base)
    _lib().msw_combine(
        pointers,
        dtypes,
        n,
        base_pointer,
        base_dtype,
        rows,
        out.numel() // max(rows, 1),
        coefficients.data_ptr(),
        out.data_ptr(),
        native.dtype_code(out.dtype),
    )


def stock_combine(
    models: Sequence[torch.Tensor], base: torch.Tensor, ratio: torch.Tensor, out: torch.Tensor
) -> None:
    """model_stock's combination into `out`, with one float32 ratio per row."""
    ratio = ratio.reshape(-1).contiguous()
    rows = ratio.numel()
    pointers, dtypes, base_pointer, base_dtype = _inputs(models, base)
    _lib().msw_stock_combine(
        pointers,
        dtypes,
        len(models),
        base_pointer,
        base_dtype,
        rows,
        out.numel() // max(rows, 1),
        ratio.data_ptr(),
        out.data_ptr(),
        native.dtype_code(out.dtype),
    )


def nearswap(a: torch.Tensor, b: torch.Tensor, t: float, eps: float, out: torch.Tensor) -> None:
    """methods.nearswap's blend of every entry into `out`."""
    _lib().msw_nearswap(
        a.data_ptr(),
        native.dtype_code(a.dtype),
        b.data_ptr(),
        native.dtype_code(b.dtype),
        a.numel(),
        t,
        eps,
        out.data_ptr(),
        native.dtype_code(out.dtype),
    )


def fusion_apply(
    model: torch.Tensor,
    base: torch.Tensor,
    kl: torch.Tensor,
    threshold: float,
    out: torch.Tensor,
) -> None:
    """methods.arcee_fusion's combination into `out`, with one float32 divergence per row."""
    kl = kl.reshape(-1).contiguous()
    rows = kl.numel()
    _lib().msw_fusion_apply(
        model.data_ptr(),
        native.dtype_code(model.dtype),
        base.data_ptr(),
        native.dtype_code(base.dtype),
        rows,
        out.numel() // max(rows, 1),
        kl.data_ptr(),
        threshold,
        out.data_ptr(),
        native.dtype_code(out.dtype),
    )


def fusion_quartiles(
    model: torch.Tensor,
    base: torch.Tensor,
    kl: torch.Tensor,
    drawn: torch.Tensor | None,
    at: Sequence[int],
) -> list[float]:
    """The importances |model - base| * kl[row] of the entries at the flat indices `drawn`
    (every entry when None), sorted: the values at the three positions `at`."""
    kl = kl.reshape(-1).contiguous()
    length = model.numel() // max(kl.numel(), 1)
    count = model.numel() if drawn is None else drawn.numel()
    positions = (ctypes.c_int64 * 3)(*at)
    values = (ctypes.c_float * 3)()
    status = _lib().msw_fusion_quartiles(
        model.data_ptr(),
        native.dtype_code(model.dtype),
        base.data_ptr(),
        native.dtype_code(base.dtype),
        length,
        kl.data_ptr(),
        None if drawn is None else drawn.contiguous().data_ptr(),
        count,
        positions,
        values,
    )
    if status != 0:
        raise KernelError("no memory for the kernel's scratch buffers")
    return list(values)
