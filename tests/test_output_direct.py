"""Output writes around the page cache (output.direct): a large tensor's aligned middle goes
straight to the disk and its ends through the page cache, and the shard holds exactly the bytes
a plain write would have put there, whatever the offsets and whichever threads write."""

from __future__ import annotations

import ctypes
import errno
import mmap
import os
import random
import resource
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

from mergesmith.errors import MergeError
from mergesmith.output.direct import ALIGN, CHUNK, DirectWrites, aligned_middle
from mergesmith.output.layout import OutputLayout, Placement, ShardLayout
from mergesmith.output.writer import TensorWriter, _write_all


def test_aligned_middle_is_the_largest_aligned_run_inside_the_range() -> None:
    for offset in [0, 1, 2, 100, ALIGN - 2, ALIGN, ALIGN + 6, 3 * ALIGN - 1]:
        for length in [0, 2, ALIGN - 1, ALIGN, ALIGN + 2, 2 * ALIGN, 5 * ALIGN + 10]:
            boundaries = [b for b in range(0, offset + length + 1, ALIGN) if b >= offset]
            if len(boundaries) >= 2:
                expected = (boundaries[0] - offset, boundaries[-1] - boundaries[0])
            else:
                expected = (0, 0)
            assert aligned_middle(offset, length) == expected, (offset, length)


def _layout(header: bytes, lengths: list[int]) -> OutputLayout:
    placements, offset = {}, len(header)
    for i, length in enumerate(lengths):
        placements[f"t{i}"] = Placement(0, offset, length)
        offset += length
    return OutputLayout(
        [ShardLayout("model.safetensors", header, offset, list(placements))], placements
    )


def _resident_pages(path: Path, start: int, end: int) -> int:
    """Pages of [start, end) of the file that sit in the page cache (mincore)."""
    libc = ctypes.CDLL(None, use_errno=True)
    size = os.path.getsize(path)
    with open(path, "rb") as f, mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY) as mm:
        pages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
        vec = (ctypes.c_ubyte * pages)()
        address = ctypes.addressof(ctypes.c_char.from_buffer(mm))
        assert libc.mincore(ctypes.c_void_p(address), ctypes.c_size_t(size), vec) == 0
        first, last = start // mmap.PAGESIZE, (end - 1) // mmap.PAGESIZE
        return sum(vec[i] & 1 for i in range(first, last + 1))


def _direct_supported(folder: Path) -> bool:
    probe = folder / "probe"
    probe.touch()
    try:
        os.close(os.open(probe, os.O_WRONLY | os.O_DIRECT))
        return True
    except OSError:
        return False
    finally:
        probe.unlink()


def test_large_tensors_at_odd_offsets_land_byte_for_byte_from_several_threads(
    tmp_path: Path,
) -> None:
    rng = random.Random(7)
    header = b"H" * 1003  # every tensor starts off an aligned boundary
    # Several chunks, exactly one chunk, a middle just big enough, and small ones between.
    lengths = [
        2 * CHUNK + 3 * ALIGN + 6,
        100,
        CHUNK,
        (1 << 20) + 2 * ALIGN + 2,
        4094,
        3 * CHUNK + 2,
    ]
    layout = _layout(header, lengths)
    contents = [rng.randbytes(n) for n in lengths]
    writer = TensorWriter(tmp_path, layout)
    try:
        order = list(range(len(lengths)))
        rng.shuffle(order)
        with ThreadPoolExecutor(max_workers=3) as pool:
            crcs = list(
                pool.map(
                    lambda i: writer.write(
                        f"t{i}", torch.frombuffer(bytearray(contents[i]), dtype=torch.uint8)
                    ),
                    order,
                )
            )
        writer.wait()
    finally:
        writer.close()
    path = tmp_path / "model.safetensors"
    assert path.read_bytes() == header + b"".join(contents)
    assert crcs == [zlib.crc32(contents[i]) for i in order]


def test_the_middle_of_a_large_tensor_does_not_pass_through_the_page_cache(tmp_path: Path) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip(f"{tmp_path}: this file system refuses O_DIRECT (the page cache path runs)")
    header = b"H" * 1003
    layout = _layout(header, [4 * CHUNK + 10])
    writer = TensorWriter(tmp_path, layout)
    try:
        writer.write("t0", torch.ones(4 * CHUNK + 10, dtype=torch.uint8))
        writer.wait()
    finally:
        writer.close()
    path = tmp_path / "model.safetensors"
    place = layout.placements["t0"]
    start, size = aligned_middle(place.offset, place.length)
    middle = (place.offset + start, place.offset + start + size)
    # Written through the page cache, all of its pages would be resident until evicted.
    assert _resident_pages(path, *middle) == 0
    assert path.read_bytes() == header + b"\x01" * (4 * CHUNK + 10)


def test_a_direct_write_the_kernel_refuses_goes_through_the_page_cache(tmp_path: Path) -> None:
    if not _direct_supported(tmp_path):
        pytest.skip(f"{tmp_path}: this file system refuses O_DIRECT at open")
    path = tmp_path / "shard"
    path.write_bytes(bytes(3 * CHUNK))
    fd = os.open(path, os.O_RDWR)
    writes = DirectWrites([path], [fd], _write_all)
    try:
        # An offset off every block boundary: O_DIRECT refuses it with EINVAL, as it refuses
        # writes on devices whose blocks are larger than ALIGN.
        data = os.urandom(CHUNK + ALIGN)
        writes.put(0, memoryview(data), 100)
        writes.wait()
        assert not writes.takes(0, CHUNK)  # later tensors go through the page cache at once
    finally:
        writes.close()
        os.close(fd)
    assert path.read_bytes() == bytes(100) + data + bytes(3 * CHUNK - 100 - len(data))


def test_an_error_of_a_background_write_reaches_the_caller_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "shard"
    path.touch()
    fd = os.open(path, os.O_RDWR)
    writes = DirectWrites([path], [fd], _write_all)
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    try:
        # Past the file size limit a write fails with EFBIG (Python ignores SIGXFSZ), as it
        # fails with ENOSPC on a full disk.
        resource.setrlimit(resource.RLIMIT_FSIZE, (CHUNK, hard))
        writes.put(0, memoryview(bytes(2 * CHUNK)), 0)
        with pytest.raises(MergeError) as caught:
            writes.wait()
        # The next write hears of it too, rather than queueing more work behind a failed one.
        with pytest.raises(MergeError):
            writes.put(0, memoryview(bytes(ALIGN)), 0)
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        writes.close()
        os.close(fd)
    assert str(path) in caught.value.message
    assert os.strerror(errno.EFBIG) in caught.value.message
