"""The plan as plain data: one job per output tensor, each naming what it reads and how."""

from __future__ import annotations

import hashlib
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergesmith.config import Recipe
from mergesmith.dtypes import ITEMSIZE
from mergesmith.methods.registry import MergeMethod

if TYPE_CHECKING:
    from mergesmith.vocab.align import RowPlan
    from mergesmith.vocab.build import OutputVocab


@dataclass(frozen=True)
class TensorInput:
    model: str  # the model's reference as the recipe wrote it
    name: str  # the tensor's name in that model
    crop: tuple[int, ...] | None = None  # cut a larger embedding to this shape


@dataclass(frozen=True)
class TensorJob:
    index: int
    name: str
    shape: tuple[int, ...]
    dtype: str
    method: str
    base: TensorInput | None
    inputs: tuple[TensorInput, ...]
    params: Mapping[str, Any]
    model_params: tuple[Mapping[str, Any], ...]
    seeds: tuple[int, ...]
    # Memory this job holds at its peak while it runs, by its method's memory model.
    work_bytes: int
    copy_only: bool = False  # integer buffers are copied from the first input, never mixed
    # A vocabulary tensor under a tokenizer setting: its inputs' rows are re-indexed to the
    # output tokens (base first, then inputs) before the method sees them.
    vocab: RowPlan | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def out_bytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]


@dataclass
class Plan:
    recipe: Recipe
    method: MergeMethod
    jobs: list[TensorJob]
    config_model: str | None
    tokenizer_model: str | None
    tokenizer_folder: Path | None  # where the tokenizer model's files are
    vocab: OutputVocab | None  # the output tokenizer and row maps, when the recipe sets one
    # The tokenizer to write (None: copy the tokenizer model's files) and its chat template.
    tokenizer: Any
    chat_template: str | None
    num_layers: int | None  # output layer count when slices change it
    seed: int
    warnings: list[str] = field(default_factory=list)

    @property
    def total_bytes(self) -> int:
        return sum(job.out_bytes for job in self.jobs)


def derive_seed(seed: int, model: str, tensor: str) -> int:
    """A 63-bit seed that depends only on (seed, model, tensor), never on order or threads."""
    digest = hashlib.sha256(f"{seed}\x00{model}\x00{tensor}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)
