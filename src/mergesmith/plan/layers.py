"""Layer mapping as data: which groups of models merge which input layers into which output
layers, and at what position t of their slice (for gradients)."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, replace
from typing import Any

from mergesmith.config import ModelInput, Recipe
from mergesmith.layers import layer_of
from mergesmith.plan.modules import ModuleView
from mergesmith.plan.problems import Findings
from mergesmith.sources.base import ModelSource


@dataclass(frozen=True)
class Group:
    """Models merged together over a run of layers: a slice, or the whole `models:` list."""

    sources: tuple[ModelInput, ...]
    base: str | None
    parameters: Mapping[str, Any]
    where: str
    in_slice: bool


@dataclass(frozen=True)
class LayerStep:
    """Output layer `out` merges layer first + `offset` of each source's layer_range."""

    out: int
    offset: int
    t: float


def groups_of(
    recipe: Recipe, sources: Mapping[str, ModelSource], findings: Findings
) -> list[Group]:
    """The `models:` list as one group spanning every layer, or one group per slice."""
    if recipe.models is not None:
        return [_models_group(recipe, sources, findings)]
    groups = []
    for si, spec in enumerate(recipe.slices or ()):
        lengths = set()
        for j, src in enumerate(spec.sources):
            a, b = src.layer_range or (0, 0)
            count = layer_count(sources.get(src.ref.text))
            where = recipe.where("slices", si, "sources", j, "layer_range")
            if not 0 <= a < b:
                findings.problem(
                    f"{where}: layer_range [{a}, {b}] is empty or negative",
                    "use [first, last + 1] with first < last + 1",
                )
            elif count is not None and b > count:
                findings.problem(
                    f"{where}: layer_range [{a}, {b}] goes past the {count} layers of "
                    f"'{src.ref.text}'",
                    f"the end is exclusive; at most [{a}, {count}]",
                )
            lengths.add(b - a)
        if len(lengths) > 1:
            findings.problem(
                f"{recipe.where('slices', si)}: the sources of a slice must have the same number "
                f"of layers, got {sorted(lengths)}",
                "give every source of the slice a layer_range of the same length",
            )
        base = spec.base_model or recipe.base_model
        groups.append(
            Group(spec.sources, base.text if base else None, spec.parameters, spec.where, True)
        )
    return groups


def _models_group(recipe: Recipe, sources: Mapping[str, ModelSource], findings: Findings) -> Group:
    entries = list(recipe.models or ())
    listed = [m.ref.text for m in entries]
    for i, name in enumerate(listed):
        if name in listed[:i]:
            findings.problem(
                f"{recipe.where('models', i)}: model '{name}' is listed twice",
                "merge its entries into one",
            )
    base = recipe.base_model
    if base and base.text not in listed:
        # As mergekit does: a base not listed among the models is one more input.
        entries.append(ModelInput(base, {}, None, recipe.where("base_model")))
    entries = [
        replace(e, layer_range=(0, layer_count(sources.get(e.ref.text)) or 0)) for e in entries
    ]
    counts = {e.ref.text: e.layer_range[1] for e in entries if e.layer_range}
    if len(set(counts.values())) > 1:
        shown = ", ".join(f"{k}: {v}" for k, v in counts.items())
        findings.problem(
            f"{recipe.where('models')}: the models have different numbers of layers ({shown})",
            "use 'slices:' with layer_range to choose matching layers",
        )
    return Group(tuple(entries), base.text if base else None, {}, recipe.where("models"), False)


def layer_steps(reference: ModelInput, first_out: int) -> list[LayerStep]:
    """The output layers a group writes, from `first_out` on; t runs from 0 to 1 over the
    group's layers (t = 1 for a group of one layer)."""
    a, b = reference.layer_range or (0, 0)
    n = max(0, b - a)
    return [
        LayerStep(first_out + offset, offset, offset / (n - 1) if n > 1 else 1.0)
        for offset in range(n)
    ]


def layer_count(source: ModelSource | None) -> int | None:
    """The number of layers: the highest layer index in the tensor names, or the config's."""
    if source is None:
        return None
    indexes = [hit[1] for name in source.tensors if (hit := layer_of(name))]
    found = max(indexes) + 1 if indexes else 0
    if isinstance(source, ModuleView):
        return found
    cfg = source.config or {}
    declared = cfg.get("num_hidden_layers") or cfg.get("n_layer")
    return max(found, declared) if isinstance(declared, int) and declared > 0 else found


def layer_templates(source: ModelSource, index: int) -> list[str]:
    """Name templates (see layers.layer_of) of the tensors of one layer, sorted."""
    return sorted(hit[0] for name in source.tensors if (hit := layer_of(name)) and hit[1] == index)
