"""Builds the C kernels; all other metadata lives in pyproject.toml.

Without the kernels every merge gives the same bytes, only slower (TIES about 1.7x), so a failed
build stops the install with its reason instead of passing unnoticed. MERGESMITH_NO_KERNELS=1
installs without them (the torch code runs; `mergesmith --version` says so).
"""

import importlib.util
import os
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

SKIP = os.environ.get("MERGESMITH_NO_KERNELS", "").strip() not in ("", "0")
NATIVE = Path("src/mergesmith/native")


def kernel_source_hash() -> str:
    """native.status.source_hash of the sources built here: the loader compares the two."""
    spec = importlib.util.spec_from_file_location("kernel_status", NATIVE / "status.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # for its dataclass
    spec.loader.exec_module(module)
    return module.source_hash(NATIVE)


class BuildKernels(build_ext):
    def build_extension(self, ext: Extension) -> None:
        try:
            super().build_extension(ext)
        except Exception as exc:  # compiler missing, or kernels.c does not compile here
            if SKIP:
                print(f"mergesmith: C kernels not built ({exc}); the torch code will run")
                return
            raise SystemExit(
                f"mergesmith: the C kernels failed to build: {exc}\n"
                "Install a C compiler (gcc or clang) and install again, or set "
                "MERGESMITH_NO_KERNELS=1 to install without them (merges run the slower torch "
                "code, with the same results)."
            ) from None


setup(
    cmdclass={"build_ext": BuildKernels},
    ext_modules=[
        Extension(
            "mergesmith.native._kernels",
            ["src/mergesmith/native/kernels.c", "src/mergesmith/native/whole.c"],
            depends=["src/mergesmith/native/convert.h", "src/mergesmith/native/exact_sum.h"],
            define_macros=[("MS_SOURCE_HASH", f'"{kernel_source_hash()}"')],
            # No contraction into fused multiply-adds: the kernels round exactly as the torch code
            # does, and fuse only where they say so (fmaf).
            extra_compile_args=[
                "-O3",
                "-std=c11",
                "-ffp-contract=off",
                "-fno-math-errno",
                "-fno-trapping-math",
            ],
            libraries=["m"],  # fmaf
        )
    ],
)
