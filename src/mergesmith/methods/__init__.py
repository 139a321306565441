"""Merge methods: one module each, a typed function registered by name (see registry)."""

from mergesmith.methods.registry import (
    MergeMethod,
    MethodInputs,
    Param,
    ParamSpec,
    PerModel,
    all_methods,
    get_method,
)

__all__ = [
    "MergeMethod",
    "MethodInputs",
    "Param",
    "ParamSpec",
    "PerModel",
    "all_methods",
    "get_method",
]
