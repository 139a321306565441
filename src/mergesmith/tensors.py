"""Merge tensors, state dicts and modules in memory, with the numbers a recipe would give.

    >>> import torch, mergesmith
    >>> a = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> b = torch.tensor([[3.0, 2.0], [1.0, 0.0]])
    >>> mergesmith.merge_tensors("linear", None, [a, b], weight=[1, 3])
    tensor([[2.5000, 2.0000],
            [1.5000, 1.0000]])
    >>> mergesmith.merge_tensors("task_arithmetic", a, [b], weight=0.5)
    tensor([[2., 2.],
            [2., 2.]])

Why not call a method's function directly? Because a recipe does more than call it: it coerces
and range-checks parameters, fills in defaults, applies the method's base rule, cuts larger
embeddings, copies integer buffers, looks for NaN and seeds random methods per (seed, model,
tensor). Here a call is turned into the same plan a recipe becomes (an in-memory `Recipe`, one
in-memory `ModelSource` per input, `plan.build_plan`) and run by the same engine
(`engine.run_jobs`), so the two paths cannot drift apart: `merge_state_dicts` gives the tensors
`mergesmith.merge` writes for the same state dicts saved as model folders, bit for bit.

Parameters are keywords. A per-model one is a single value for every model or a list with one
value per model, in the order of the inputs; a global one is a single value. `lambda` is a
Python keyword: pass `lambda_=0.5` (or `**{"lambda": 0.5}`). Gradients and filters are recipe
features (they need layer positions); here values are plain numbers, booleans or strings.

Naming rule (it matters for random methods, whose generators are seeded from (seed, model
name, tensor name), and for messages): model i is named `names[i]` when `names=` is given,
else `str(i)`, its position; the base is named "base". A tensor is named by its state-dict key;
`merge_tensors` names its one tensor `name` ("tensor" unless given). So a call with
`names=` equal to a recipe's model references and the same `seed` reproduces that recipe's
merge exactly, DARE and DELLA included.
"""

from __future__ import annotations

import copy
import logging
import numbers
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergesmith.config import DTYPE_NAMES, ModelInput, ModelRef, Recipe, setting_problem
from mergesmith.errors import MergeError, MergeErrors
from mergesmith.methods.registry import MergeMethod
from mergesmith.plan.method_checks import find_method
from mergesmith.plan.problems import Findings
from mergesmith.sources.base import ModelSource, TensorMeta

if TYPE_CHECKING:
    import torch

log = logging.getLogger("mergesmith")

BASE_NAME = "base"
_RECIPE_DTYPES = {"float32", "float16", "bfloat16", "float64"}

StateDict = Mapping[str, "torch.Tensor"]


def merge_tensors(
    method: str,
    base: torch.Tensor | None,
    tensors: Sequence[torch.Tensor],
    *,
    name: str = "tensor",
    seed: int = 0,
    names: Sequence[str] | None = None,
    dtype: str | torch.dtype | None = None,
    allow_nonfinite: bool = False,
    **params: Any,
) -> torch.Tensor:
    """Merge one tensor of several models with `method`, as a recipe would merge a tensor `name`.

    `base` is the base model's tensor (None for methods that take none, such as linear);
    `tensors` holds one tensor per model; `params` are the method's parameters (see the module
    docstring). `name` is the tensor's name: it seeds random methods and decides whether a
    larger input is an embedding that may be cut to the base's shape. `dtype` is the recipe's
    `dtype` (the result's dtype; default: the base's, else the first tensor's). Raises
    `MergeError` for anything a recipe would be refused for.

    >>> import torch
    >>> merge_tensors("linear", None, [torch.ones(2), torch.zeros(2)], weight=[3, 1])
    tensor([0.7500, 0.7500])
    """
    import torch

    api = "merge_tensors"
    _require(isinstance(name, str) and name != "", api, "`name` must be a non-empty string")
    _require_list(tensors, api, "tensors")
    for what, tensor in [("base", base), *((f"tensors[{i}]", t) for i, t in enumerate(tensors))]:
        if tensor is not None and not isinstance(tensor, torch.Tensor):
            raise MergeError(
                f"{api}: {what} is a {type(tensor).__name__}, not a tensor",
                "pass torch tensors (torch.as_tensor converts arrays)",
            )
    merged = _merge(
        api,
        "tensors",
        method,
        None if base is None else {name: base},
        [{name: t} for t in tensors],
        seed=seed,
        names=names,
        dtype=dtype,
        allow_nonfinite=allow_nonfinite,
        params=params,
    )
    return merged[name]


def merge_state_dicts(
    method: str,
    base: StateDict | None,
    state_dicts: Sequence[StateDict],
    *,
    seed: int = 0,
    names: Sequence[str] | None = None,
    dtype: str | torch.dtype | None = None,
    allow_nonfinite: bool = False,
    **params: Any,
) -> dict[str, torch.Tensor]:
    """Merge whole state dicts (name -> tensor) as `mergesmith.merge` merges model folders.

    Every state dict, the base's included, must have the same keys. Integer and boolean
    tensors are copied from the base (else the first state dict), as a recipe does; an
    embedding-like tensor (`embed_tokens`, `lm_head`, ... by name) larger than the reference's
    is cut to its shape with a logged warning. Returns a new dict in the key order of the base
    (else the first state dict), tensors on that dict's devices; the inputs are not changed.

    >>> import torch
    >>> base = {"w": torch.zeros(2), "steps": torch.tensor([7])}
    >>> tuned = [{"w": torch.ones(2), "steps": torch.tensor([9])}]
    >>> merge_state_dicts("task_arithmetic", base, tuned, weight=0.5)
    {'w': tensor([0.5000, 0.5000]), 'steps': tensor([7])}
    """
    _require_list(state_dicts, "merge_state_dicts", "state_dicts")
    return _merge(
        "merge_state_dicts",
        "state_dicts",
        method,
        base,
        list(state_dicts),
        seed=seed,
        names=names,
        dtype=dtype,
        allow_nonfinite=allow_nonfinite,
        params=params,
    )


def merge_modules(
    method: str,
    base: torch.nn.Module | None,
    modules: Sequence[torch.nn.Module],
    *,
    seed: int = 0,
    names: Sequence[str] | None = None,
    allow_nonfinite: bool = False,
    **params: Any,
) -> torch.nn.Module:
    """Merge modules of one architecture into a new module; the inputs are not changed.

    The result is a deep copy of `base` (else of the first module) with the merged state dict
    loaded (parameters and persistent buffers, merged as `merge_state_dicts` does), so it keeps
    that module's class, device, dtypes and training mode.

    >>> import torch
    >>> _ = torch.manual_seed(0)
    >>> a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
    >>> soup = merge_modules("linear", None, [a, b], weight=1)
    >>> torch.allclose(soup.weight, (a.weight + b.weight) / 2)
    True
    """
    import torch

    api = "merge_modules"
    _require_list(modules, api, "modules")
    entries = [("base", base), *((f"modules[{i}]", m) for i, m in enumerate(modules))]
    for what, module in entries:
        if module is not None and not isinstance(module, torch.nn.Module):
            raise MergeError(
                f"{api}: {what} is a {type(module).__name__}, not a torch.nn.Module",
                "pass modules, or use merge_state_dicts for state dicts",
            )
    merged = _merge(
        api,
        "modules",
        method,
        None if base is None else base.state_dict(),
        [m.state_dict() for m in modules],
        seed=seed,
        names=names,
        dtype=None,
        allow_nonfinite=allow_nonfinite,
        params=params,
    )
    template = base if base is not None else modules[0]
    out = copy.deepcopy(template)
    out.load_state_dict(merged)
    return out


class MemorySource(ModelSource):
    """An in-memory state dict as a model source: what the planner and engine read."""

    def __init__(
        self, ref: str, tensors: StateDict, what: str, api: str, device: torch.device
    ) -> None:
        from mergesmith.dtypes import from_torch

        metas = {}
        for key, tensor in tensors.items():
            try:
                code = from_torch(tensor.dtype)
            except KeyError:
                raise MergeError(
                    f"{api}: {what}: tensor '{key}' has dtype {tensor.dtype}, which a "
                    "checkpoint cannot hold",
                    "convert it to float32, float16 or bfloat16",
                ) from None
            metas[key] = TensorMeta(key, tuple(tensor.shape), code, Path("<memory>"))
        super().__init__(ref, Path("<memory>"), metas)
        self._tensors = tensors
        self.device = device

    @property
    def config(self) -> dict[str, Any] | None:
        # No config.json: embeddings are recognised by name, layers by their names.
        return None

    def read(self, name: str) -> torch.Tensor:
        # Detached, since methods run in engine threads where the caller's no_grad does not
        # reach; contiguous, as a tensor read from a safetensors file always is; on one device.
        return self._tensors[name].detach().to(self.device).contiguous()


def _merge(
    api: str,
    label: str,
    method_name: str,
    base: StateDict | None,
    state_dicts: list[StateDict],
    *,
    seed: int,
    names: Sequence[str] | None,
    dtype: str | torch.dtype | None,
    allow_nonfinite: bool,
    params: Mapping[str, Any],
) -> dict[str, torch.Tensor]:
    """The shared road: checks the plan cannot phrase for Python callers, then plan and engine."""
    import torch

    from mergesmith.engine import EngineOptions, run_jobs
    from mergesmith.plan import build_plan

    _require(isinstance(method_name, str), api, f"`method` must be a name, got {method_name!r}")
    _require(
        isinstance(seed, int) and not isinstance(seed, bool),
        api,
        f"`seed` must be a whole number, got {seed!r}",
    )
    recipe = Recipe(
        merge_method=method_name,
        base_model=None,
        models=(),
        slices=None,
        parameters={},
        dtype=_recipe_dtype(api, dtype),
        out_dtype=None,
        tokenizer=None,
        chat_template=None,
        text="",
        source_name=api,
    )
    findings = Findings()
    method = find_method(recipe, findings)
    if method is None:
        raise MergeErrors(findings.problems)
    _check_base(api, label, method, base is not None)
    model_names = _model_names(api, label, names, len(state_dicts), base is not None)
    _check_keys(api, label, base, state_dicts)
    global_block, model_blocks = _split_params(api, label, method, params, len(state_dicts))
    recipe = replace(
        recipe,
        base_model=ModelRef(BASE_NAME, BASE_NAME) if base is not None else None,
        models=tuple(
            ModelInput(ModelRef(n, n), block)
            for n, block in zip(model_names, model_blocks, strict=True)
        ),
        parameters=global_block,
    )
    # Everything runs where the reference's first tensor is (the base's, else the first model's).
    reference = base if base is not None else (state_dicts[0] if state_dicts else {})
    device = next(iter(reference.values())).device if reference else torch.device("cpu")
    sources: dict[str, ModelSource] = {}
    if base is not None:
        sources[BASE_NAME] = MemorySource(BASE_NAME, base, "base", api, device)
    for i, (n, sd) in enumerate(zip(model_names, state_dicts, strict=True)):
        sources[n] = MemorySource(n, sd, f"{label}[{i}]", api, device)

    with _prefixed(api):
        plan = build_plan(recipe, sources, seed)
    for warning in plan.warnings:
        # Keys were checked to match, so a "tensor(s) the output will not contain" warning can
        # only be an integer buffer copied from the first input: nothing is lost here.
        if "the output will not contain" not in warning:
            log.warning("%s: %s", api, warning)
    inputs = {
        t.untyped_storage().data_ptr() for sd in (base or {}, *state_dicts) for t in sd.values()
    }
    results: dict[str, torch.Tensor] = {}

    def write(job: Any, tensor: torch.Tensor) -> None:
        # A copied buffer (or passthrough's unscaled tensor) may be the caller's own tensor.
        if tensor.untyped_storage().data_ptr() in inputs:
            tensor = tensor.clone()
        results[job.name] = tensor

    options = EngineOptions(threads=1, device=str(device), allow_nonfinite=allow_nonfinite)
    with _prefixed(api):
        run_jobs(plan, sources, write, options)
    return {key: results[key].to(reference[key].device) for key in reference}


@contextmanager
def _prefixed(api: str) -> Iterator[None]:
    """Plan and engine errors name models and tensors; say which call they come from too."""
    try:
        yield
    except MergeErrors as exc:
        raise MergeErrors([_with_prefix(api, e) for e in exc.errors]) from None
    except MergeError as exc:
        raise _with_prefix(api, exc) from None


def _with_prefix(api: str, error: MergeError) -> MergeError:
    if error.message.startswith(f"{api}:"):
        return error
    # The engine's hints speak to the command line; a caller has keywords.
    hint = error.hint.replace("--allow-nonfinite", "allow_nonfinite=True") if error.hint else None
    return MergeError(f"{api}: {error.message}", hint)


def _require(ok: bool, api: str, message: str, hint: str | None = None) -> None:
    if not ok:
        raise MergeError(f"{api}: {message}", hint)


def _require_list(value: Any, api: str, label: str) -> None:
    """A dict or a lone tensor where a list belongs is a common slip: say so, not KeyError."""
    import torch

    if isinstance(value, Mapping | torch.Tensor | torch.nn.Module | str) or not isinstance(
        value, Sequence
    ):
        raise MergeError(
            f"{api}: `{label}` must be a list with one entry per model, "
            f"got a {type(value).__name__}",
            f"wrap a single model in a list: [{label[:-1]}]",
        )


def _recipe_dtype(api: str, dtype: str | torch.dtype | None) -> str | None:
    """The recipe's `dtype` name for a torch dtype or a name a recipe accepts."""
    if dtype is None:
        return None
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("torch.")
    if name not in DTYPE_NAMES:
        raise MergeError(
            f"{api}: unknown dtype {dtype!r}",
            f"use one of {', '.join(sorted(_RECIPE_DTYPES))} (or the torch dtype)",
        )
    return name


def _check_base(api: str, label: str, method: MergeMethod, has_base: bool) -> None:
    """The method's base rule, phrased for a call rather than a recipe key."""
    if method.needs_base and not has_base:
        raise MergeError(
            f"{api}: {method.name} needs a base model, got base=None",
            "pass the model the others were fine-tuned from as `base`",
        )
    if has_base and not method.base_is_reference:
        # A recipe's base_model is one more input for these methods; a call has the list for it.
        raise MergeError(
            f"{api}: {method.name} takes no base model",
            f"pass base=None and put every model in `{label}`",
        )


def _model_names(
    api: str, label: str, names: Sequence[str] | None, count: int, has_base: bool
) -> list[str]:
    """The naming rule: `names` when given, else each model's position."""
    if names is None:
        return [str(i) for i in range(count)]
    _require_list(names, api, "names")
    given = list(names)
    _require(
        len(given) == count,
        api,
        f"`names` has {len(given)} entries for {count} models",
        f"give one name per entry of `{label}`, in the same order",
    )
    _require(
        all(isinstance(n, str) and n for n in given) and len(set(given)) == count,
        api,
        f"`names` must be distinct non-empty strings, got {given!r}",
    )
    _require(
        not (has_base and BASE_NAME in given),
        api,
        f"'{BASE_NAME}' names the base model; no other model may be named so",
        "rename that model",
    )
    return given


def _check_keys(api: str, label: str, base: StateDict | None, state_dicts: list[StateDict]) -> None:
    """Every input a mapping of names to tensors, all with the reference's keys: the plan would
    name models by `names`, but a caller thinks in positions."""
    import torch

    entries = [("base", base)] if base is not None else []
    entries += [(f"{label}[{i}]", sd) for i, sd in enumerate(state_dicts)]
    for what, sd in entries:
        if not isinstance(sd, Mapping):
            raise MergeError(
                f"{api}: {what} is a {type(sd).__name__}, not a state dict",
                "pass mappings of tensor names to tensors (module.state_dict())",
            )
        for key, value in sd.items():
            if not isinstance(key, str) or not isinstance(value, torch.Tensor):
                raise MergeError(
                    f"{api}: {what}[{key!r}] is a {type(value).__name__}, not a tensor",
                    "a state dict maps tensor names (strings) to tensors",
                )
    if not entries:
        return
    ref_what, reference = entries[0]
    for what, sd in entries[1:]:
        missing = next((key for key in reference if key not in sd), None)
        if missing is not None:
            raise MergeError(
                f"{api}: {what} has no tensor '{missing}', which {ref_what} has",
                "merge only models of the same architecture, with the same keys",
            )
        extra = next((key for key in sd if key not in reference), None)
        if extra is not None:
            raise MergeError(
                f"{api}: {what} has a tensor '{extra}' that {ref_what} lacks",
                "merge only models of the same architecture, with the same keys",
            )


def _split_params(
    api: str, label: str, method: MergeMethod, params: Mapping[str, Any], count: int
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the recipe's top-level parameters, each model's parameters) from keyword arguments.

    A list goes to the models, one value each; anything else to the top level, where a
    per-model parameter applies to every model, as in a recipe. Names are checked, coerced and
    range-checked by the plan, exactly as a recipe's are; only what a recipe cannot get wrong
    in the same way (a list's length, a Python object that is no value) is checked here."""
    by_arg = {spec.arg: spec for spec in method.params}
    global_block: dict[str, Any] = {}
    model_blocks: list[dict[str, Any]] = [{} for _ in range(count)]
    given: dict[str, str] = {}  # recipe name -> the keyword it came as
    for key, value in params.items():
        spec = method.param(key) or by_arg.get(key)
        name = spec.name if spec is not None else key
        if name in given:
            raise MergeError(
                f"{api}: parameter '{name}' is given twice",
                f"pass only one of {given[name]}=, {key}=",
            )
        given[name] = key
        if spec is None:
            # Another method's parameter (a warning) or a typo (an error naming the closest
            # name): the plan's check_parameter_names says which.
            global_block[name] = value
            continue
        if isinstance(value, list | tuple):
            if not spec.per_model:
                raise MergeError(
                    f"{api}: parameter '{name}' applies to the whole merge; got a list",
                    f"pass one value for '{name}'",
                )
            if len(value) != count:
                raise MergeError(
                    f"{api}: parameter '{name}' has {len(value)} values for {count} models",
                    f"give one value per entry of `{label}`, in its order, or one value for all",
                )
            for i, (block, item) in enumerate(zip(model_blocks, value, strict=True)):
                block[name] = _plain(api, f"{name}[{i}]", item)
        else:
            global_block[name] = _plain(api, name, value)
    for spec in method.params:
        if spec.required and spec.name not in given:
            form = "one value, or a list with one per model" if spec.per_model else "one value"
            raise MergeError(
                f"{api}: {method.name} needs parameter '{spec.name}' ({spec.help})",
                f"pass {spec.arg}=... ({form})",
            )
    return global_block, model_blocks


def _plain(api: str, what: str, value: Any) -> Any:
    """A value as a recipe could hold it (numpy numbers become Python ones)."""
    if isinstance(value, numbers.Integral) and not isinstance(value, bool):
        value = int(value)
    elif isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = float(value)
    if value is None or isinstance(value, bool | int | float | str):
        problem = setting_problem(value)
    else:
        problem = f"a {type(value).__name__} is not a value"
    if problem:
        raise MergeError(
            f"{api}: parameter '{what}': {problem}",
            "give a number, true/false or a string (a list: one per model)",
        )
    return value
