"""PyTorch pickled checkpoints (`.bin`, `.pt`, `.pth`, `.ckpt`), loaded with `weights_only=True`
so a pickle can never run code.

Training code often saves more than the weights: a Lightning `.ckpt` keeps them under
`state_dict` beside the epoch and optimizer state, others use `model`, `module` or
`model_state_dict`. The tensors of that one dict are the model; everything else is ignored, and
the key used is said once when the model is opened, so a surprising choice is visible.
"""

from __future__ import annotations

import logging
import pickle
import threading
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergesmith.dtypes import from_torch
from mergesmith.errors import MergeError
from mergesmith.sources.base import ModelSource, TensorMeta

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mergesmith")

# Keys under which training code commonly nests a state dict, most specific first.
WRAPPER_KEYS = (
    "state_dict",
    "model_state_dict",
    "model",
    "module",
    "model_state",
    "net",
    "network",
    "weights",
    "params",
)
MAX_NESTING = 3


def load_state_dict(path: Path) -> dict[str, Any]:
    """The checkpoint's state dict: the dict of tensors, unwrapped from a training checkpoint."""
    return unwrap_state_dict(path, load_checkpoint(path))[0]


def load_checkpoint(path: Path) -> Any:
    """Whatever the file holds, unpickled with `weights_only=True` (tensors and plain data only)."""
    import torch

    try:
        # mmap keeps tensors on disk until touched; only the zip format supports it.
        use_mmap = zipfile.is_zipfile(path)
        return torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe pickle"
        raise MergeError(
            f"{path}: refused to load: the pickle asks to run code or build objects that are not "
            f"tensors ({first[:160]})",
            "get a safetensors version of this model, or if you saved it yourself, save only the "
            "weights (torch.save(model.state_dict(), path)); never load an untrusted checkpoint "
            "with weights_only=False",
        ) from None
    except FileNotFoundError:
        raise MergeError(f"{path}: file not found", "download the model again") from None
    except PermissionError:
        raise MergeError(f"{path}: permission denied", "make the file readable") from None
    except IsADirectoryError:
        raise MergeError(f"{path}: is a folder, not a checkpoint file", "fix the path") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        reason = str(exc).strip().splitlines()[0][:160] if str(exc).strip() else type(exc).__name__
        raise MergeError(
            f"{path}: not a readable PyTorch checkpoint ({reason})",
            "download or copy the file again",
        ) from None


def unwrap_state_dict(path: Path, state: Any) -> tuple[dict[str, Any], str | None]:
    """(the dict of tensors, the dotted key it was found under or None when it is the top level).

    A dict with tensors at its top level is the state dict itself (non-tensor entries are left
    out later). Otherwise a known wrapper key holding a dict is followed, and failing that the
    one entry that holds tensors; two or more such entries are an error naming them, since
    choosing between, say, a generator and a discriminator is the user's call.
    """
    import torch

    if not isinstance(state, Mapping):
        raise MergeError(
            f"{path}: holds a {type(state).__name__}, not a dict of tensors",
            "use the model's weights file (a state dict saved with torch.save)",
        )
    keys: list[str] = []
    for _ in range(MAX_NESTING + 1):
        if any(isinstance(v, torch.Tensor) for v in state.values()):
            return dict(state), ".".join(keys) or None
        nested = {str(k): v for k, v in state.items() if isinstance(v, Mapping) and _has_tensors(v)}
        chosen = next((k for k in WRAPPER_KEYS if k in nested), None)
        if chosen is None and len(nested) > 1:
            where = f" under '{'.'.join(keys)}'" if keys else ""
            raise MergeError(
                f"{path}: holds several state dicts{where} ({', '.join(sorted(nested))}), and "
                "none is under a key that names the model (state_dict, model, module, ...)",
                "save the one to merge on its own, e.g. torch.save(checkpoint['NAME'], "
                "'weights.pt'), and point the recipe at that file",
            )
        if chosen is None and len(nested) == 1:
            chosen = next(iter(nested))
        if chosen is None:
            break
        keys.append(chosen)
        state = nested[chosen]
    raise MergeError(
        f"{path}: holds no tensors"
        + (f" (top-level keys: {', '.join(map(str, list(state)[:8]))})" if state else ""),
        "use the model's weights file (a state dict saved with torch.save)",
    )


def _has_tensors(value: Mapping, depth: int = MAX_NESTING) -> bool:
    import torch

    for v in value.values():
        if isinstance(v, torch.Tensor):
            return True
        if depth > 0 and isinstance(v, Mapping) and _has_tensors(v, depth - 1):
            return True
    return False


class PickleSource(ModelSource):
    """One or more pickled checkpoint files; each is mapped on first use and kept until `close`."""

    def __init__(self, ref: str, folder: Path, files: list[Path]) -> None:
        import torch

        tensors: dict[str, TensorMeta] = {}
        self._files = files
        self._states: dict[Path, dict[str, Any]] = {}
        self._lock = threading.Lock()
        for path in files:
            state, key = unwrap_state_dict(path, load_checkpoint(path))
            self._states[path] = state
            if key is not None:
                count = sum(1 for v in state.values() if isinstance(v, torch.Tensor))
                log.warning(
                    "model '%s': %s keeps its weights under the key '%s'; merging those %d "
                    "tensors and ignoring the rest of the file",
                    ref,
                    path,
                    key,
                    count,
                )
            for name, value in state.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if name in tensors:
                    raise MergeError(
                        f"{ref}: tensor '{name}' appears in both {tensors[name].file.name} "
                        f"and {path.name}",
                        "remove the duplicate shard",
                    )
                try:
                    dtype = from_torch(value.dtype)
                except KeyError:
                    raise MergeError(
                        f"{path}: tensor '{name}' has unsupported dtype {value.dtype}",
                        "convert the model to float32, float16 or bfloat16",
                    ) from None
                tensors[name] = TensorMeta(name, tuple(value.shape), dtype, path)
        super().__init__(ref, folder, tensors)

    def _state(self, path: Path) -> dict[str, Any]:
        with self._lock:
            state = self._states.get(path)
            if state is None:
                state = load_state_dict(path)
                self._states[path] = state
            return state

    def read(self, name: str) -> torch.Tensor:
        return self._state(self.tensors[name].file)[name]

    def close(self) -> None:
        with self._lock:
            self._states = {}
