"""Whether the C kernels are in use, and if not, why: for `mergesmith --version` and the loader.

Without them every merge still gives the same bytes, only slower (TIES about 1.7x), so a
missing or stale build must be visible rather than silent. This module imports no torch:
`--version` stays instant.
"""

from __future__ import annotations

import ctypes
import hashlib
import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

ABI = 11  # must match MS_ABI in kernels.c


def source_hash(folder: Path) -> str | None:
    """A digest of the kernel sources in `folder` (its .c and .h files), which setup.py builds
    into the library; None where there are none (a wheel ships the library alone)."""
    files = sorted([*folder.glob("*.c"), *folder.glob("*.h")], key=lambda path: path.name)
    if not files:
        return None
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class KernelStatus:
    state: str  # "in use", "switched off", "not built", "stale" or "unloadable"
    detail: str
    path: str | None = None

    @property
    def in_use(self) -> bool:
        return self.state == "in use"

    def __str__(self) -> str:
        return f"C kernels {self.state}" + (f" ({self.detail})" if self.detail else "")


def kernel_status() -> KernelStatus:
    """Find, load and version-check the compiled kernels, without running any."""
    if os.environ.get("MERGESMITH_KERNELS", "").lower() == "torch":
        return KernelStatus("switched off", "MERGESMITH_KERNELS=torch; the torch code runs")
    spec = importlib.util.find_spec("mergesmith.native._kernels")
    if spec is None or spec.origin is None:
        return KernelStatus(
            "not built",
            "installed with MERGESMITH_NO_KERNELS=1, or run from source unbuilt; merges run the "
            "slower torch code: reinstall with a C compiler (pip install -e .)",
        )
    try:
        lib = ctypes.CDLL(spec.origin)
    except OSError as exc:
        return KernelStatus("unloadable", str(exc), spec.origin)
    lib.ms_abi.restype = ctypes.c_int
    built = lib.ms_abi()
    if built != ABI:
        return KernelStatus(
            "stale",
            f"built from kernels.c version {built}, the code expects {ABI}: reinstall "
            "(pip install -e .) to rebuild them",
            spec.origin,
        )
    # An editable install keeps its library when a pull or an edit changes kernels.c without
    # changing the ABI: that library would compute what the old sources said.
    sources = source_hash(Path(spec.origin).parent)
    try:
        lib.ms_source_hash.restype = ctypes.c_char_p
        built_from = lib.ms_source_hash().decode()
    except AttributeError:  # built before libraries said what they were built from
        built_from = "unknown"
    if sources is not None and built_from != sources:
        return KernelStatus(
            "stale",
            f"built from other kernel sources ({built_from}) than these ({sources}): reinstall "
            "(pip install -e .) to rebuild them",
            spec.origin,
        )
    return KernelStatus("in use", spec.origin, spec.origin)
