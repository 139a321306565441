"""PyTorch `.bin` checkpoints, loaded with `weights_only=True` so a pickle can never run code."""

from __future__ import annotations

import pickle
import threading
import zipfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergesmith.dtypes import from_torch
from mergesmith.errors import MergeError
from mergesmith.sources.base import ModelSource, TensorMeta

if TYPE_CHECKING:
    import torch


def load_state_dict(path: Path) -> dict[str, Any]:
    import torch

    try:
        # mmap keeps tensors on disk until touched; only the zip format supports it.
        use_mmap = zipfile.is_zipfile(path)
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=use_mmap)
    except pickle.UnpicklingError as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else "unsafe pickle"
        raise MergeError(
            f"{path}: refused to load: the pickle asks to run code or build objects that are not "
            f"tensors ({first[:160]})",
            "get a safetensors version of this model; never load an untrusted .bin with "
            "weights_only=False",
        ) from None
    except FileNotFoundError:
        raise MergeError(f"{path}: file not found", "download the model again") from None
    except PermissionError:
        raise MergeError(f"{path}: permission denied", "make the file readable") from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as exc:
        raise MergeError(
            f"{path}: not a readable PyTorch checkpoint ({str(exc).splitlines()[0][:160]})",
            "download or copy the file again",
        ) from None
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise MergeError(
            f"{path}: does not hold a dict of tensors",
            "use the model's weights file (a state dict)",
        )
    return state


class PickleSource(ModelSource):
    """One or more `.bin` files; each is mapped on first use and kept until `close`."""

    def __init__(self, ref: str, folder: Path, files: list[Path]) -> None:
        import torch

        tensors: dict[str, TensorMeta] = {}
        self._files = files
        self._states: dict[Path, dict[str, Any]] = {}
        self._lock = threading.Lock()
        for path in files:
            state = self._state(path)
            for name, value in state.items():
                if not isinstance(value, torch.Tensor):
                    continue
                if name in tensors:
                    raise MergeError(
                        f"{ref}: tensor '{name}' appears in both {tensors[name].file.name} "
                        f"and {path.name}",
                        "remove the duplicate shard",
                    )
                tensors[name] = TensorMeta(name, tuple(value.shape), from_torch(value.dtype), path)
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
