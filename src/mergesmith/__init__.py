"""mergesmith: merge fine-tuned checkpoints from mergekit YAML recipes, streaming and exact.

Heavy modules (torch, the engine) load on first use so that the CLI starts instantly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from mergesmith.api import MergeResult, merge
    from mergesmith.errors import MergeError
    from mergesmith.tensors import merge_modules, merge_state_dicts, merge_tensors

__all__ = [
    "MergeError",
    "MergeResult",
    "__version__",
    "merge",
    "merge_modules",
    "merge_state_dicts",
    "merge_tensors",
]

# The tensor-level API (mergesmith.tensors): the same methods on in-memory tensors.
_TENSOR_API = ("merge_tensors", "merge_state_dicts", "merge_modules")


def __getattr__(name: str) -> Any:
    if name in ("merge", "MergeResult"):
        from mergesmith import api

        return getattr(api, name)
    if name in _TENSOR_API:
        from mergesmith import tensors

        return getattr(tensors, name)
    if name == "MergeError":
        from mergesmith.errors import MergeError

        return MergeError
    raise AttributeError(f"module 'mergesmith' has no attribute {name!r}")
