"""The method interface: a merge method is one typed function, its signature its parameter spec.

A method module defines a function and decorates it with `merge_method(...)`:

    @merge_method("nearswap", "move the base toward the model where they are near", base=REQUIRED,
                  models=(1, 1), memory=whole_tensor(float32_copies=3))
    def nearswap(
        base: Tensor | None,
        models: Sequence[Tensor],
        *,
        t: Annotated[float, Param("distance scale", check=positive)],
    ) -> Tensor: ...

Keyword-only parameters are the recipe's parameters. A plain type (`float`, `bool`, `int`,
`str | None`) is global: one value for the whole tensor, its Python default the method's
default. `Sequence[float]` (with `PerModel`) is per model: the method receives one value per
model, in the order of `models`, and `Param(default=...)` holds the default. `seeds` and
`out_dtype`, when declared, receive one seed per model and the output dtype.

Modules under `mergesmith.methods` are found by importing the package's modules, so adding a
method is adding one file. Checks common to every method (finite inputs, shapes, model counts,
the base rule, parameter types and ranges) run in the plan and the engine, never in a method.
"""

from __future__ import annotations

import importlib
import inspect
import math
import pkgutil
import types
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Annotated, Any, Literal, TypeAlias, TypeVar, get_args, get_origin

if TYPE_CHECKING:
    import torch

REQUIRED: Any = object()

# How a method treats `base_model:`. REFERENCE: required, the point task vectors start from;
# OPTIONAL: used as that reference when given; INPUT: no reference, a listed base is one more
# input (linear); INPUT_WARNED: as INPUT, but a method that treats the base as one more input is
# probably not what the recipe meant, so the plan warns (mergekit averages it in silently).
BaseRule = Literal["reference", "optional", "input", "input_warned"]
REFERENCE: BaseRule = "reference"
OPTIONAL: BaseRule = "optional"
INPUT: BaseRule = "input"
INPUT_WARNED: BaseRule = "input_warned"

# Where the engine looks for NaN and Inf: in the inputs before the method runs, or (for methods
# through which any non-finite input provably reaches the output) in the output only, which is
# one tensor instead of every input.
FiniteCheck = Literal["inputs", "output"]

T = TypeVar("T")
PerModel: TypeAlias = Sequence[T]

_CONTEXT = ("seeds", "out_dtype")


@dataclass(frozen=True)
class Param:
    """A parameter's metadata, attached with typing.Annotated.

    `check` returns why a value is out of range, or None. `default` is for per-model
    parameters only (a global one takes its Python default from the signature)."""

    help: str = ""
    check: Callable[[Any], str | None] | None = None
    default: Any = REQUIRED
    choices: tuple[Any, ...] | None = None
    name: str | None = None  # the recipe's name where it is no Python name (`lambda`)


@dataclass(frozen=True)
class ParamSpec:
    """One parameter as the plan sees it. `kind` is float, int, bool or str; `arg` is the
    function's argument that receives it."""

    name: str
    kind: type
    per_model: bool
    default: Any = REQUIRED
    help: str = ""
    choices: tuple[Any, ...] | None = None
    check: Callable[[Any], str | None] | None = None
    arg: str = ""

    @property
    def required(self) -> bool:
        return self.default is REQUIRED


@dataclass(frozen=True)
class JobSize:
    """What a memory model needs to know of one job."""

    numel: int
    inputs: int  # tensors read, base included
    in_itemsize: int  # the widest input dtype's bytes per entry
    out_itemsize: int


MemoryModel = Callable[[JobSize], int]


def blocked(float32_temps_per_input: int = 2, float32_temps: int = 6) -> MemoryModel:
    """A method that works block by block (ops.blocks): inputs as stored (mapped pages count
    once touched) and the output, plus float32 temporaries of one block, which never grow with
    the tensor."""
    from mergesmith.ops.blocks import BLOCK

    def peak(job: JobSize) -> int:
        temps = min(job.numel, BLOCK) * 4 * (float32_temps_per_input * job.inputs + float32_temps)
        return job.numel * (job.in_itemsize * job.inputs + job.out_itemsize) + temps

    return peak


def whole_tensor(float32_copies_per_input: float = 1, float32_copies: float = 2) -> MemoryModel:
    """A method that holds whole float32 copies: per input, and a fixed number besides (the
    result, the largest temporaries alive together)."""

    def peak(job: JobSize) -> int:
        copies = float32_copies_per_input * job.inputs + float32_copies
        stored = job.numel * (job.in_itemsize * job.inputs + job.out_itemsize)
        return stored + int(job.numel * 4 * copies)

    return peak


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


@dataclass(frozen=True)
class MergeMethod:
    name: str
    description: str
    function: Callable[..., torch.Tensor]
    params: tuple[ParamSpec, ...]
    base: BaseRule
    min_models: int  # models besides a reference base
    max_models: int | None
    memory: MemoryModel
    finite_check: FiniteCheck = "inputs"
    random: bool = False  # draws from the seeds: `mergesmith methods` says so
    # Arguments the function receives that are no recipe parameters (a family row's sparsifier);
    # a per-model one is given one value for all models.
    fixed: Mapping[str, Any] = field(default_factory=dict)
    fixed_per_model: frozenset[str] = frozenset()
    # Which of `seeds` and `out_dtype` the function declares, read once from its signature.
    context: frozenset[str] = frozenset()
    # Cross-parameter rules of one model's resolved values: why they are invalid, or None.
    check_model: Callable[[Mapping[str, Any]], str | None] | None = field(default=None)

    @property
    def needs_base(self) -> bool:
        return self.base == REFERENCE

    @property
    def base_is_reference(self) -> bool:
        return self.base in (REFERENCE, OPTIONAL)

    def param(self, name: str) -> ParamSpec | None:
        return next((p for p in self.params if p.name == name), None)

    def run(self, inputs: MethodInputs) -> torch.Tensor:
        """Call the function with each parameter in its declared form."""
        import torch

        kwargs = self.keywords(inputs.params, inputs.model_params, inputs.seeds, len(inputs.models))
        if "out_dtype" in self.context:
            kwargs["out_dtype"] = inputs.out_dtype or torch.float32
        result = self.function(inputs.base, list(inputs.models), **kwargs)
        return result.to(inputs.out_dtype or torch.float32)

    def keywords(
        self,
        params: Mapping[str, Any],
        model_params: Sequence[Mapping[str, Any]],
        seeds: Sequence[int],
        count: int,
    ) -> dict[str, Any]:
        """The function's keyword arguments for `count` models, `out_dtype` aside: the fixed
        ones, each parameter in its declared form, and the seeds where it takes them."""
        kwargs: dict[str, Any] = {
            arg: [value] * count if arg in self.fixed_per_model else value
            for arg, value in self.fixed.items()
        }
        for spec in self.params:
            if spec.per_model:
                kwargs[spec.arg] = [m[spec.name] for m in model_params]
            else:
                kwargs[spec.arg] = params[spec.name]
        if "seeds" in self.context:
            kwargs["seeds"] = list(seeds)
        return kwargs


def merge_method(
    name: str,
    description: str,
    *,
    base: BaseRule,
    models: tuple[int, int | None] = (1, None),
    memory: MemoryModel,
    finite_check: FiniteCheck = "inputs",
    random: bool = False,
    defaults: Mapping[str, Any] | None = None,
    fixed: Mapping[str, Any] | None = None,
    check_model: Callable[[Mapping[str, Any]], str | None] | None = None,
) -> Callable[[Callable[..., torch.Tensor]], Callable[..., torch.Tensor]]:
    """Register the decorated function as a merge method; returns the function unchanged.

    `defaults` overrides signature defaults and `fixed` passes arguments that are no recipe
    parameters, so one function can serve several methods (the task-vector family's rows)."""

    def register(function: Callable[..., torch.Tensor]) -> Callable[..., torch.Tensor]:
        fixed_args = dict(fixed or {})
        specs = params_of(function, defaults or {})
        _register(
            MergeMethod(
                name=name,
                description=description,
                function=function,
                params=tuple(s for s in specs if s.arg not in fixed_args),
                base=base,
                min_models=models[0],
                max_models=models[1],
                memory=memory,
                finite_check=finite_check,
                random=random,
                fixed=fixed_args,
                fixed_per_model=frozenset(
                    s.arg for s in specs if s.per_model and s.arg in fixed_args
                ),
                check_model=check_model,
                context=frozenset(_CONTEXT) & set(inspect.signature(function).parameters),
            )
        )
        return function

    return register


def params_of(function: Callable[..., Any], defaults: Mapping[str, Any]) -> list[ParamSpec]:
    """The parameter specs a function's keyword-only arguments declare."""
    specs = []
    for pname, arg in inspect.signature(function).parameters.items():
        if arg.kind is not inspect.Parameter.KEYWORD_ONLY or pname in _CONTEXT:
            continue
        hint = _evaluated(arg.annotation, function)
        meta = Param()
        if get_origin(hint) is Annotated:
            hint, *extras = get_args(hint)
            meta = next((e for e in extras if isinstance(e, Param)), meta)
        per_model = get_origin(hint) in (Sequence, list, tuple)
        if per_model:
            (hint,) = get_args(hint)[:1]
            default = meta.default
        else:
            default = REQUIRED if arg.default is inspect.Parameter.empty else arg.default
        name = meta.name or pname
        default = defaults.get(name, default)
        kind, nullable = _kind(hint, function, pname)
        choices = meta.choices
        if choices is not None and nullable and None not in choices:
            choices = (*choices, None)
        specs.append(
            ParamSpec(name, kind, per_model, default, meta.help, choices, meta.check, pname)
        )
    return specs


def _evaluated(annotation: Any, function: Callable[..., Any]) -> Any:
    """One parameter's annotation as an object. typing.get_type_hints would evaluate every
    annotation of the function, the tensors' too, and looking up torch.Tensor loads torch
    (mergesmith.deferred_torch)."""
    if isinstance(annotation, str):
        return eval(annotation, function.__globals__)
    return annotation


def _kind(hint: Any, function: Callable[..., Any], name: str) -> tuple[type, bool]:
    """(float | int | bool | str, whether None is allowed) of a parameter's annotation."""
    args = get_args(hint) if isinstance(hint, types.UnionType) else (hint,)
    nullable = type(None) in args
    kinds = [a for a in args if a is not type(None)]
    if len(kinds) != 1 or kinds[0] not in (float, int, bool, str):
        raise TypeError(f"{function.__qualname__}: parameter '{name}' has an unsupported type")
    return kinds[0], nullable


_METHODS: dict[str, MergeMethod] = {}


def _register(method: MergeMethod) -> None:
    if method.name in _METHODS:
        raise ValueError(f"merge method {method.name!r} is registered twice")
    _METHODS[method.name] = method


def get_method(name: str) -> MergeMethod | None:
    _load_all()
    return _METHODS.get(name)


def all_methods() -> list[MergeMethod]:
    _load_all()
    return sorted(_METHODS.values(), key=lambda m: m.name)


def parameter_names() -> set[str]:
    """Every parameter name some method reads."""
    return {p.name for m in all_methods() for p in m.params}


def _load_all() -> None:
    # Importing a module registers its methods; every module of the package is a method module.
    import mergesmith.methods as package

    for info in pkgutil.iter_modules(package.__path__):
        if info.name != "registry":
            importlib.import_module(f"{package.__name__}.{info.name}")


def in_unit_interval(value: float) -> str | None:
    return None if 0 <= value <= 1 else f"{value} is outside [0, 1]"


def non_negative(value: float) -> str | None:
    return None if value >= 0 else f"{value} is negative"


def finite_non_negative(value: float) -> str | None:
    return None if 0 <= value < math.inf else f"{value} is not a finite number >= 0"


def positive(value: float) -> str | None:
    return None if value > 0 else f"{value} is not positive"
