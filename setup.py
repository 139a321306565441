"""Builds the optional C kernels; all other metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mergesmith.native._kernels",
            ["src/mergesmith/native/kernels.c"],
            # No contraction into fused multiply-adds: the kernels round exactly as the torch code
            # does, and fuse only where they say so (fmaf).
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"],
            libraries=["m"],  # fmaf
            # Without a C compiler the package still installs and uses its torch code.
            optional=True,
        )
    ]
)
