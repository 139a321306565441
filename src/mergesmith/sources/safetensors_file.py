"""safetensors files read from their headers, tensors mapped straight from the page cache."""

from __future__ import annotations

import contextlib
import json
import mmap
import os
import struct
import threading
from pathlib import Path
from typing import TYPE_CHECKING

from mergesmith.dtypes import ITEMSIZE, to_torch
from mergesmith.errors import MergeError
from mergesmith.sources.base import ModelSource, TensorMeta

if TYPE_CHECKING:
    import torch

MAX_HEADER = 100 * 1024 * 1024


def read_header(path: Path) -> tuple[dict[str, dict], int]:
    """Return (tensor entries, data start offset); every tensor must lie inside the file."""
    try:
        size = path.stat().st_size
        with open(path, "rb") as fh:
            head = fh.read(8)
            if len(head) < 8:
                raise _corrupt(path, "the file is shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > MAX_HEADER or n + 8 > size:
                raise _corrupt(path, f"its header claims {n} bytes but the file has {size}")
            raw = fh.read(n)
    except PermissionError:
        raise MergeError(f"{path}: permission denied", "make the file readable") from None
    except IsADirectoryError:
        raise MergeError(
            f"{path}: is a folder, not a safetensors file", "remove the folder or fix the index"
        ) from None
    except OSError as exc:
        raise MergeError(
            f"{path}: cannot be read ({exc.strerror})", "check the disk and the file's permissions"
        ) from None
    try:
        header = json.loads(raw)
    except ValueError:
        raise _corrupt(path, "its header is not valid JSON") from None
    if not isinstance(header, dict):
        raise _corrupt(path, "its header is not a JSON object")
    header.pop("__metadata__", None)
    data_start = 8 + n
    data_len = size - data_start
    for name, entry in header.items():
        try:
            dtype, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            numel = 1
            for d in shape:
                numel *= int(d)
        except (KeyError, TypeError, ValueError):
            raise _corrupt(path, f"tensor '{name}' has a malformed header entry") from None
        if dtype not in ITEMSIZE:
            raise MergeError(
                f"{path}: tensor '{name}' has unsupported dtype {dtype}",
                "convert the model to float32, float16 or bfloat16",
            )
        if end - begin != numel * ITEMSIZE[dtype] or begin < 0:
            raise _corrupt(path, f"tensor '{name}' has a size that does not match its shape")
        if end > data_len:
            raise _corrupt(
                path,
                f"tensor '{name}' ends at byte {data_start + end} but the file has {size} bytes "
                "(truncated download?)",
            )
    return header, data_start


def _corrupt(path: Path, why: str) -> MergeError:
    return MergeError(
        f"{path}: not a valid safetensors file: {why}",
        "download or copy the file again; its size should match the original",
    )


class SafetensorsSource(ModelSource):
    """One or more safetensors files (a sharded model lists them in its index)."""

    def __init__(self, ref: str, folder: Path, files: list[Path]) -> None:
        tensors: dict[str, TensorMeta] = {}
        self._entries: dict[str, tuple[Path, int, int]] = {}
        for path in files:
            header, start = read_header(path)
            for name, entry in header.items():
                if name in tensors:
                    raise MergeError(
                        f"{ref}: tensor '{name}' appears in both {tensors[name].file.name} "
                        f"and {path.name}",
                        "remove the duplicate shard",
                    )
                begin, end = entry["data_offsets"]
                tensors[name] = TensorMeta(name, tuple(entry["shape"]), entry["dtype"], path)
                self._entries[name] = (path, start + begin, end - begin)
        super().__init__(ref, folder, tensors)
        self._maps: dict[Path, mmap.mmap] = {}
        self._lock = threading.Lock()

    def _map(self, path: Path) -> mmap.mmap:
        with self._lock:
            mapped = self._maps.get(path)
            if mapped is None:
                fd = os.open(path, os.O_RDONLY)
                try:
                    # ACCESS_COPY gives torch a writable buffer without ever touching the file.
                    mapped = mmap.mmap(fd, 0, access=mmap.ACCESS_COPY)
                finally:
                    os.close(fd)
                self._maps[path] = mapped
            return mapped

    def read(self, name: str) -> torch.Tensor:
        import torch

        meta = self.tensors[name]
        dtype = to_torch(meta.dtype)
        if meta.numel == 0:
            return torch.empty(meta.shape, dtype=dtype)
        return torch.frombuffer(self.buffer(name), dtype=dtype).reshape(meta.shape)

    def buffer(self, name: str) -> memoryview | bytearray:
        """A tensor's bytes without torch: a writable view of the mapped file (private, so
        writes never reach it), or a copy where the tensor is not aligned to its item size."""
        meta = self.tensors[name]
        path, offset, length = self._entries[name]
        if length == 0:
            return bytearray()
        mapped = self._map(path)
        if offset % ITEMSIZE[meta.dtype]:
            # An unaligned tensor cannot be viewed in place; its bytes are copied once.
            return bytearray(mapped[offset : offset + length])
        return memoryview(mapped)[offset : offset + length]

    def prefetch(self, name: str) -> None:
        path, offset, length = self._entries[name]
        if not length or not hasattr(mmap, "MADV_WILLNEED"):
            return
        # Every page the tensor touches. The kernel queues the reads and returns: the pages land
        # in the page cache, and enter this process only when `read`'s tensor touches them.
        start = offset // mmap.PAGESIZE * mmap.PAGESIZE
        with contextlib.suppress(OSError, ValueError):
            self._map(path).madvise(mmap.MADV_WILLNEED, start, offset + length - start)

    def release(self, name: str) -> None:
        path, offset, length = self._entries[name]
        mapped = self._maps.get(path)
        if mapped is None or not hasattr(mmap, "MADV_DONTNEED"):
            return
        # Only whole pages inside this tensor. The mapping is private and never written, so
        # dropped pages are re-read from the file if anyone touches them again.
        start = -(-offset // mmap.PAGESIZE) * mmap.PAGESIZE
        end = (offset + length) // mmap.PAGESIZE * mmap.PAGESIZE
        if end > start:
            with contextlib.suppress(OSError, ValueError):
                mapped.madvise(mmap.MADV_DONTNEED, start, end - start)

    def close(self) -> None:
        with self._lock:
            maps, self._maps = self._maps, {}
        for mapped in maps.values():
            # A tensor may still view this map; it is then released when that tensor is freed.
            with contextlib.suppress(BufferError):
                mapped.close()
