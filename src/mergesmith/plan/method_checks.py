"""Checks of the recipe against its method: the method's name, the parameter names each block
uses, and each group's base model and number of models."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from mergesmith.config import ModelInput, Recipe, closest
from mergesmith.methods.registry import (
    INPUT_WARNED,
    MergeMethod,
    all_methods,
    get_method,
    parameter_names,
)
from mergesmith.methods.task_arithmetic import FAMILY
from mergesmith.plan.problems import Findings


def find_method(recipe: Recipe, findings: Findings) -> MergeMethod | None:
    name = recipe.merge_method
    method = get_method(name)
    if method is None:
        names = [m.name for m in all_methods()]
        guess = closest(name, names)
        findings.problem(
            f"{recipe.where('merge_method')}: unknown merge_method '{name}'",
            f"did you mean '{guess}'?" if guess else f"choose one of: {', '.join(names)}",
        )
    return method


def parameter_blocks(
    recipe: Recipe,
) -> Iterator[tuple[tuple[str | int, ...], dict[str, Any], bool]]:
    """(path, block, whether the block belongs to one model) for every `parameters:` block."""
    yield ("parameters",), recipe.parameters, False
    for module in recipe.modules:
        yield ("modules", module.name, "parameters"), module.parameters, False
    parts: list[tuple[tuple[str, ...], Any, Any]] = [((), recipe.models, recipe.slices)]
    if recipe.models is None and recipe.slices is None:
        parts = [(("modules", m.name), m.models, m.slices) for m in recipe.modules]
    for at, models, slices in parts:
        for i, m in enumerate(models or ()):
            yield (*at, "models", i, "parameters"), m.parameters, True
        for si, s in enumerate(slices or ()):
            yield (*at, "slices", si, "parameters"), s.parameters, False
            for j, src in enumerate(s.sources):
                yield (*at, "slices", si, "sources", j, "parameters"), src.parameters, True


def check_parameter_names(recipe: Recipe, method: MergeMethod, findings: Findings) -> set[str]:
    """Report names no method reads (a typo: an error) and names another method reads but this
    one does not (common in published recipes, which mergekit runs: a warning). Returns the
    names that are ignored."""
    own = [p.name for p in method.params]
    known = parameter_names()
    ignored: set[str] = set()
    for path, block, per_model_only in parameter_blocks(recipe):
        for key, value in block.items():
            spec = method.param(key)
            where = recipe.where(*path, key)
            if spec is None and key in known:
                ignored.add(key)
                findings.warn(
                    f"{where}: '{key}' is not a parameter of {method.name}; it is ignored"
                )
            elif spec is None:
                guess = closest(key, sorted(set(own) | known))
                findings.problem(
                    f"{where}: '{key}' is not a parameter of {method.name}",
                    f"did you mean '{guess}'?"
                    if guess
                    else f"{method.name} takes: {', '.join(own) or 'no parameters'}",
                )
            elif per_model_only and not spec.per_model:
                findings.problem(
                    f"{where}: '{key}' applies to the whole merge, not to one model",
                    "move it to the top-level 'parameters:'",
                )
            elif value is None and None not in (spec.choices or ()):
                findings.problem(
                    f"{where}: parameter '{key}' has no value", "give it a value or remove it"
                )
    return ignored


def split_base(
    method: MergeMethod,
    sources: list[ModelInput],
    base_text: str | None,
    where: str,
    in_slice: bool,
    findings: Findings,
) -> tuple[ModelInput | None, list[ModelInput]] | None:
    """(reference base or None, the models merged) for one group by the method's base rule, or
    None when the group cannot be merged (the problem is recorded)."""
    listed = [s.ref.text for s in sources]
    if method.needs_base and base_text is None:
        findings.problem(
            f"{where}: {method.name} needs a base model",
            "add 'base_model: PATH_OR_ID' (the model the others were fine-tuned from)",
        )
        return None
    if method.base_is_reference and base_text is not None:
        if in_slice and base_text not in listed:
            findings.problem(
                f"{where}: the base model '{base_text}' is not among this slice's sources",
                "add it as a source with the same layer_range",
            )
            return None
        base_entry = next((s for s in sources if s.ref.text == base_text), None)
        members = [s for s in sources if s.ref.text != base_text]
    else:
        base_entry, members = None, list(sources)
        if method.base == INPUT_WARNED and base_text is not None and base_text in listed:
            findings.warn(
                f"{where}: {method.name} has no base model; '{base_text}' is merged as one more "
                "input, as mergekit does"
            )
    if not members and base_entry is not None and method.name in FAMILY:
        # mergekit's task arithmetic takes the base alone and writes it; published recipes use
        # this to bake an adapter into a model (`MODEL+LORA` as base and only source).
        findings.warn(
            f"{where}: {method.name} has no model besides the base '{base_entry.ref.text}', so "
            "these tensors are the base's (with its adapter, if it has one), as mergekit "
            "writes them"
        )
        return base_entry, members
    if len(members) < method.min_models or (
        method.max_models is not None and len(members) > method.max_models
    ):
        expected = (
            f"exactly {method.min_models}"
            if method.max_models == method.min_models
            else f"at least {method.min_models}"
            if method.max_models is None
            else f"{method.min_models} to {method.max_models}"
        )
        extra = " besides the base" if base_entry is not None else ""
        findings.problem(
            f"{where}: {method.name} takes {expected} model(s){extra}, got {len(members)}",
            "run 'mergesmith methods' to see what each method takes",
        )
        return None
    return base_entry, members
