"""What the planner and engine need from a model, whatever its file format."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergesmith.errors import MergeError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class TensorMeta:
    name: str
    shape: tuple[int, ...]
    dtype: str  # safetensors code: F32, BF16, ...
    file: Path

    @property
    def numel(self) -> int:
        return math.prod(self.shape)


class ModelSource:
    """A model's tensors, known from headers; `read` returns one tensor, memory-mapped if it can."""

    def __init__(self, ref: str, folder: Path, tensors: dict[str, TensorMeta]) -> None:
        self.ref = ref
        self.folder = folder
        self.tensors = tensors
        self._config: dict[str, Any] | None = None
        self._config_loaded = False

    @property
    def config(self) -> dict[str, Any] | None:
        """config.json, if the model's folder has one (None otherwise: the output then has
        no config.json either)."""
        if not self._config_loaded:
            self._config_loaded = True
            path = self.folder / "config.json"
            if path.is_file():
                try:
                    self._config = json.loads(path.read_text(encoding="utf-8"))
                except (OSError, ValueError) as exc:
                    raise MergeError(
                        f"{path}: config.json is not valid JSON ({exc})",
                        "restore the file from the model's original source",
                    ) from None
        return self._config

    @property
    def files(self) -> list[Path]:
        """The weight files this model is read from (for a model given as a file, that file;
        `folder` is then the folder it lies in, where config.json and tokenizer files are
        looked for)."""
        return sorted({meta.file for meta in self.tensors.values()})

    def read(self, name: str) -> torch.Tensor:
        raise NotImplementedError

    def prefetch(self, name: str) -> None:
        """Ask for a tensor's bytes to be read in the background, ahead of `read` (a hint: it
        may do nothing, and it holds no memory of the process)."""

    def release(self, name: str) -> None:
        """Tell the source a tensor's job is done, so mapped pages stop counting as ours."""

    def close(self) -> None:
        """Release mapped files; reading again re-opens them."""
