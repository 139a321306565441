"""mergesmith: merge fine-tuned checkpoints from mergekit YAML recipes, streaming and exact.

Heavy modules (torch, the engine) load on first use so that the CLI starts instantly.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

if TYPE_CHECKING:
    from mergesmith.api import MergeResult, merge
    from mergesmith.errors import MergeError

__all__ = ["MergeError", "MergeResult", "__version__", "merge"]


def __getattr__(name: str) -> Any:
    if name in ("merge", "MergeResult"):
        from mergesmith import api

        return getattr(api, name)
    if name == "MergeError":
        from mergesmith.errors import MergeError

        return MergeError
    raise AttributeError(f"module 'mergesmith' has no attribute {name!r}")
