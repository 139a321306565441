"""Merge methods by name: a function on tensors plus a small spec of its parameters."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

REQUIRED = object()


@dataclass(frozen=True)
class ParamSpec:
    """One parameter. `per_model` ones may vary by model; the others apply to the whole tensor."""

    name: str
    kind: type
    per_model: bool
    default: Any = REQUIRED
    help: str = ""
    choices: tuple[Any, ...] | None = None
    # Returns why a resolved value is out of range, or None.
    check: Callable[[Any], str | None] | None = None

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class MethodInputs:
    """What a method sees for one output tensor, as stored (bf16, say); methods compute in
    float32 and return the result in `out_dtype`."""

    base: torch.Tensor | None
    models: Sequence[torch.Tensor]  # every non-base input, in recipe order
    params: Mapping[str, Any]  # global parameters, resolved for this tensor
    model_params: Sequence[Mapping[str, Any]]  # per-model parameters, one dict per input
    seeds: Sequence[int]  # one per input, derived from (seed, model, tensor)
    out_dtype: torch.dtype | None = None  # None: float32
    check_finite: bool = False  # raise NonFiniteInput on NaN or Inf in any input


class NonFiniteInput(ValueError):
    """An input holds NaN or Inf; `model` is its position among the models (-1: the base)."""

    def __init__(self, model: int) -> None:
        super().__init__(f"input {model} holds NaN or Inf")
        self.model = model


def require_finite(base: torch.Tensor | None, model: torch.Tensor, position: int) -> None:
    """Raise NonFiniteInput naming the model (or the base) that holds NaN or Inf, if any."""
    import torch

    if not bool(torch.isfinite(model).all()):
        raise NonFiniteInput(position)
    if base is not None and not bool(torch.isfinite(base).all()):
        raise NonFiniteInput(-1)


@dataclass(frozen=True)
class MergeMethod:
    name: str
    description: str
    params: tuple[ParamSpec, ...]
    run: Callable[[MethodInputs], torch.Tensor]
    needs_base: bool
    min_models: int = 1
    max_models: int | None = None
    # Whether a base model given in the recipe is one of the inputs (linear) or the reference point.
    base_is_input: bool = False
    random: bool = False
    extra_checks: Callable[[dict[str, Any]], str | None] | None = field(default=None)

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)


_METHODS: dict[str, MergeMethod] = {}


def register(method: MergeMethod) -> MergeMethod:
    if method.name in _METHODS:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    _METHODS[method.name] = method
    return method


def get_method(name: str) -> MergeMethod | None:
    _load_all()
    return _METHODS.get(name)


def all_methods() -> list[MergeMethod]:
    _load_all()
    return list(_METHODS.values())


def _load_all() -> None:
    # Importing the modules registers their methods.
    from mergesmith.methods import linear, passthrough, slerp, task_arithmetic  # noqa: F401


def in_unit_interval(value: float) -> str | None:
    return None if 0 <= value <= 1 else f"{value} is outside [0, 1]"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else f"{value} is negative"
