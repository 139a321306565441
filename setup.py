"""Builds the optional C kernels; all other metadata lives in pyproject.toml."""

from setuptools import Extension, setup

setup(
    ext_modules=[
        Extension(
            "mergesmith.native._kernels",
            ["src/mergesmith/native/kernels.c"],
            # No fused multiply-add: the kernels must round exactly as the torch code does.
            extra_compile_args=["-O3", "-std=c11", "-ffp-contract=off", "-fno-math-errno", "-fno-trapping-math"],
            # Without a C compiler the package still installs and uses its torch code.
            optional=True,
        )
    ]
)
