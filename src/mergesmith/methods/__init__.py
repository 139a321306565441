"""Merge methods: pure functions on tensors, registered by name."""

from mergesmith.methods.registry import (
    MergeMethod,
    MethodInputs,
    ParamSpec,
    all_methods,
    get_method,
)

__all__ = ["MergeMethod", "MethodInputs", "ParamSpec", "all_methods", "get_method"]
