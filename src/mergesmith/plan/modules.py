"""mergekit's `modules:` form for models of several towers (a text decoder, a vision tower, a
projector): each module merges its own tensors with its own models or slices.

mergekit 0.1.5 knows each architecture's modules from its JSON definitions (`kind: modular` in
`mergekit/_data/architectures/`): a weight prefix per module, or none where the towers share the
model's root and the names alone tell them apart (Qwen-VL, T5). Here a module is the tensors
under its name prefixes, the longest matching prefix winning, so Qwen2-VL's `visual.merger.` is
the projector and the rest of `visual.` the vision tower. Layers are found in the names as
everywhere (layers.layer_of), counted per module from 0.

As in mergekit, a module the recipe leaves out is not written (a warning names it), and a
single-tower model's one module is `default`: such a recipe plans as the plain form.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from mergesmith.config import Recipe, closest
from mergesmith.plan.problems import Findings
from mergesmith.sources.base import ModelSource

if TYPE_CHECKING:
    import torch

Modules = Mapping[str, tuple[str, ...]]  # module name -> the name prefixes of its tensors

_QWEN2_VL: Modules = {
    "text_decoder": ("model.", "lm_head."),
    "multi_modal_projector": ("visual.merger.",),
    "vision_tower": ("visual.",),
}
_QWEN3_VL: Modules = {
    "text_decoder": ("model.language_model.", "lm_head."),
    "multi_modal_projector": ("model.visual.merger.", "model.visual.deepstack_merger_list."),
    "vision_tower": ("model.visual.",),
}

# mergekit 0.1.5's modular architectures, by the `architectures` entry of config.json. Whisper
# is not here: mergekit's definition joins its decoder prefix to the names without a dot, so
# mergekit cannot merge a Whisper decoder either.
MODULAR: Mapping[str, Modules] = {
    "Mistral3ForConditionalGeneration": {
        "text_decoder": ("language_model.",),
        "multi_modal_projector": ("multi_modal_projector.",),
        "vision_tower": ("vision_tower.",),
    },
    "Gemma3ForConditionalGeneration": {
        "text_decoder": ("language_model.",),
        "multi_modal_projector": ("multi_modal_projector.",),
        "vision_tower": ("vision_tower.vision_model.",),
    },
    "Llama4ForConditionalGeneration": {
        "text_decoder": ("language_model.",),
        "multi_modal_projector": ("multi_modal_projector.",),
        "vision_model": ("vision_model.",),
    },
    "Qwen2VLForConditionalGeneration": _QWEN2_VL,
    "Qwen2_5_VLForConditionalGeneration": _QWEN2_VL,
    "Qwen3VLForConditionalGeneration": _QWEN3_VL,
    "Qwen3VLMoeForConditionalGeneration": _QWEN3_VL,
    "T5ForConditionalGeneration": {
        "decoder": ("decoder.",),
        "encoder": ("encoder.",),
        "shared": ("shared.", "lm_head."),
    },
}


def module_of(name: str, modules: Modules) -> str | None:
    """The module a tensor belongs to: the one with the longest prefix of its name."""
    best, length = None, -1
    for module, prefixes in modules.items():
        for prefix in prefixes:
            if name.startswith(prefix) and len(prefix) > length:
                best, length = module, len(prefix)
    return best


class ModuleView(ModelSource):
    """One module's tensors of a model, for planning: the jobs it yields read the whole model's
    source by the same names. Its layers are counted from the names alone, since config.json's
    `num_hidden_layers` (where there is one at the top) counts another tower's."""

    def __init__(self, whole: ModelSource, module: str, modules: Modules) -> None:
        tensors = {n: m for n, m in whole.tensors.items() if module_of(n, modules) == module}
        super().__init__(whole.ref, whole.folder, tensors)
        self.whole = whole

    @property
    def config(self) -> dict[str, Any] | None:
        return self.whole.config

    def read(self, name: str) -> torch.Tensor:
        return self.whole.read(name)

    def release(self, name: str) -> None:
        self.whole.release(name)


def module_parts(
    recipe: Recipe, sources: Mapping[str, ModelSource], findings: Findings
) -> list[tuple[Recipe, Mapping[str, ModelSource]]]:
    """What to plan: the recipe itself (the plain form, or one module of a single-tower
    model), or each module's recipe with each model seen as that module's tensors."""
    known = {ref: s for ref, s in sources.items() if s.config}
    first = recipe.base_model.text if recipe.base_model else None
    first = first if first in known else next(iter(known), None)
    arch = _architecture(sources[first]) if first else None
    modules = MODULAR.get(arch or "")
    if not recipe.modules:
        if modules is not None and recipe.slices is not None:
            # Layer i of every tower at once is no model anyone means; mergekit refuses too.
            findings.problem(
                f"{recipe.where('slices')}: '{first}' is a {arch}, whose modules "
                f"({', '.join(modules)}) each have their own layers",
                "slice each module under 'modules: {NAME: {slices: ...}}'",
            )
        return [(recipe, sources)]
    names = [m.name for m in recipe.modules]
    if modules is None:
        if len(recipe.modules) == 1:
            if arch is not None and names != ["default"]:
                # mergekit fails on it with a KeyError; a misnamed module is a typo, not a tower.
                findings.problem(
                    f"{recipe.where('modules', names[0])}: '{first}' is a {arch}, whose one "
                    f"module is 'default', not '{names[0]}'",
                    f"rename '{names[0]}' to 'default'",
                )
            return [(recipe, sources)]
        what = f"'{first}' is a {arch}" if arch else "no config.json names the architecture"
        findings.problem(
            f"{recipe.where('modules')}: {len(names)} modules ({', '.join(names)}), but {what}, "
            "which mergesmith (like mergekit) knows as one module, 'default'",
            "use 'models:' or 'slices:'; modules split "
            + ", ".join(sorted(MODULAR))
            + " into towers",
        )
        return []
    for ref, source in known.items():
        other = _architecture(source)
        if other != arch:
            findings.problem(
                f"{recipe.model_where(ref)}: model '{ref}' is a {other}, but '{first}' is a {arch}",
                "merge modules of models of one architecture",
            )
    for name in names:
        if name not in modules:
            guess = closest(name, list(modules))
            findings.problem(
                f"{recipe.where('modules', name)}: {arch} has no module '{name}'",
                f"did you mean '{guess}'?" if guess else f"its modules are {', '.join(modules)}",
            )
    if findings.problems:
        return []
    assert first is not None
    reference = sources[first]
    for name in modules:
        if name not in names:
            count = len(ModuleView(reference, name, modules).tensors)
            if count:
                findings.warn(
                    f"{recipe.where('modules')}: module '{name}' is not in the recipe, so its "
                    f"{count} tensor(s) are left out of the output, as mergekit does"
                )
    stray = sorted(n for n in reference.tensors if module_of(n, modules) is None)
    if stray:
        findings.warn(
            f"'{first}' has {len(stray)} tensor(s) in no module of {arch}, left out of the "
            f"output: {', '.join(stray[:3])}"
        )
    return [
        (
            recipe.for_module(module),
            {ref: ModuleView(s, module.name, modules) for ref, s in sources.items()},
        )
        for module in recipe.modules
    ]


def _architecture(source: ModelSource) -> str | None:
    found = (source.config or {}).get("architectures")
    return found[0] if isinstance(found, list) and found and isinstance(found[0], str) else None
