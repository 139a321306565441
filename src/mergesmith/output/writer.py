"""Tensors written straight to their final offsets, in any order, from any thread."""

from __future__ import annotations

import ctypes
import errno
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from mergesmith.errors import MergeError
from mergesmith.output.direct import DirectWrites, aligned_middle
from mergesmith.output.layout import OutputLayout

if TYPE_CHECKING:
    import torch

# Out of space, out of quota, or over the file size limit: all mean "this output does not fit".
NO_SPACE = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
SYNC_FILE_RANGE_WRITE = 2  # start writeback of the range, do not wait for it


def _sync_file_range() -> Callable[[int, int, int, int], int] | None:
    """Linux's sync_file_range, or None where there is none."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        call = ctypes.CDLL(None, use_errno=True).sync_file_range
    except (OSError, AttributeError):
        return None
    call.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
    call.restype = ctypes.c_int
    return call


_SYNC_FILE_RANGE = _sync_file_range()


class TensorWriter:
    """Creates every shard at its full size up front (so a full disk fails before any work),
    then places each finished tensor with pwrite: its bytes are copied out (into the page cache,
    or for a large tensor's aligned middle into a staging buffer on its way to the disk, see
    output.direct) before `write` returns, so nothing waits in memory for its turn."""

    def __init__(self, folder: Path, layout: OutputLayout, keep_existing: bool = False) -> None:
        """`keep_existing`: reopen shards of an interrupted attempt without clearing them."""
        self.folder = folder
        self.layout = layout
        self._fds: list[int] = []
        self._direct: DirectWrites | None = None
        try:
            paths = [folder / shard.file_name for shard in layout.shards]
            for shard, path in zip(layout.shards, paths, strict=True):
                flags = os.O_RDWR | os.O_CREAT | (0 if keep_existing else os.O_TRUNC)
                fd = os.open(path, flags, 0o644)
                self._fds.append(fd)
                _reserve(fd, shard.size, path)
                _write_all(fd, shard.header, 0, path)
            self._direct = DirectWrites(paths, self._fds, _write_all)
        except BaseException:
            self.close()
            raise

    def write(self, name: str, tensor: torch.Tensor | memoryview | bytearray) -> int:
        """Place one tensor (or its bytes); returns the CRC-32 of its bytes for the progress
        journal."""
        place = self.layout.placements[name]
        data = tensor_bytes(tensor)
        if data.nbytes != place.length:
            raise RuntimeError(f"{name}: {data.nbytes} bytes computed, {place.length} planned")
        path = self.folder / self.layout.shards[place.shard].file_name
        fd = self._fds[place.shard]
        start, size = aligned_middle(place.offset, place.length)
        assert self._direct is not None, "write after close"
        if self._direct.takes(place.shard, size):
            # The unaligned ends through the page cache, the middle around it (output.direct).
            _write_all(fd, data[:start], place.offset, path)
            _write_all(fd, data[start + size :], place.offset + start + size, path)
            self._direct.put(place.shard, data[start : start + size], place.offset + start)
        else:
            _write_all(fd, data, place.offset, path)
            if _SYNC_FILE_RANGE is not None:
                # Dirty pages are otherwise flushed only past the kernel's dirty threshold (10%
                # of RAM), so a merge would compute, then wait for the whole output at the final
                # fsync; started now, writing the disk overlaps computing the next tensors.
                _SYNC_FILE_RANGE(fd, place.offset, place.length, SYNC_FILE_RANGE_WRITE)
        from mergesmith.native import crc32

        return crc32(data)

    def wait(self) -> None:
        """Return once every tensor handed to `write` is in its shard (not yet fsynced); raise
        the first error any of those writes met."""
        if self._direct is not None:
            self._direct.wait()

    def close(self) -> None:
        """Finish the writes under way, then close the shards; call `wait` first to learn of
        errors."""
        direct, self._direct = self._direct, None
        if direct is not None:
            direct.close()
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


def tensor_bytes(tensor: torch.Tensor | memoryview | bytearray) -> memoryview:
    """A tensor's bytes, in order; bytes (the kernel route's results) as they are."""
    if isinstance(tensor, (memoryview, bytearray)):
        return memoryview(tensor).cast("B")
    import torch

    return memoryview(tensor.contiguous().reshape(-1).view(torch.uint8).numpy())


def _reserve(fd: int, size: int, path: Path) -> None:
    try:
        os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise MergeError(
                f"{path}: no room for this {size / 1e6:.1f} MB shard ({os.strerror(exc.errno)})",
                "free disk space or choose an output folder on another disk",
            ) from None
        # Filesystems without fallocate: fall back to a sparse file of the right size.
        os.ftruncate(fd, size)


def _write_all(fd: int, data, offset: int, path: Path) -> None:
    view = memoryview(data).cast("B")
    try:
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written
    except OSError as exc:
        if exc.errno in NO_SPACE:
            raise MergeError(
                f"{path}: {os.strerror(exc.errno)} while writing",
                "free disk space, then run again with --resume",
            ) from None
        raise
