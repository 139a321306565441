"""Loading torch on first use instead of at import, for the `mergesmith` command.

Importing torch takes about a second, half of a DARE-TIES merge of 220M-parameter models, and
a merge that runs entirely in the C kernels (the kernel route, `mergesmith.kernel_route`) never
needs it. Every module of the package still writes a plain `import torch`: `defer()` puts a
placeholder module in `sys.modules` that the import statement binds, and the first attribute
looked up on it (`torch.float32`, `torch.Tensor`) imports the real torch, then copies its
namespace into the placeholder so that later lookups cost what they cost on torch itself.

Only the command calls `defer()`, before anything imports torch: a program that imports
mergesmith as a library gets torch as it always does. Module-level code of the package must
not look anything up on torch (a default argument `torch.float32`, a constant tensor), or
every run loads it at import; tests/test_kernel_route.py runs a merge and checks that it
did not.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import threading
import types
from typing import Any

_lock = threading.RLock()


class _Placeholder(types.ModuleType):
    """Stands for torch in `sys.modules` until an attribute is looked up on it."""

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not (yet) in the placeholder's own namespace.
        return getattr(_load(self), name)


def defer() -> None:
    """Put the placeholder in place of torch, unless torch is imported already or missing."""
    with _lock:
        if "torch" in sys.modules:
            return
        spec = importlib.util.find_spec("torch")
        if spec is None:
            return  # the import statements then fail as they would have
        placeholder = _Placeholder("torch")
        # What the import machinery reads off a module in sys.modules: never a lookup that
        # reaches __getattr__ (a submodule import finds its parent by __path__, and the
        # submodule then loads torch itself).
        placeholder.__spec__ = spec
        placeholder.__path__ = list(spec.submodule_search_locations or [])
        placeholder.__file__ = spec.origin
        sys.modules["torch"] = placeholder


def loaded() -> bool:
    """Whether torch has been imported in this process (through the placeholder or not)."""
    return "torch" in sys.modules and not isinstance(sys.modules["torch"], _Placeholder)


def _load(placeholder: _Placeholder) -> types.ModuleType:
    with _lock:
        current = sys.modules.get("torch")
        if current is placeholder:
            del sys.modules["torch"]
            try:
                current = importlib.import_module("torch")
            except BaseException:
                sys.modules["torch"] = placeholder
                raise
        assert current is not None and not isinstance(current, _Placeholder)
        placeholder.__dict__.update(current.__dict__)
        return current
