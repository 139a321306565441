"""The recipe: mergekit's YAML, validated into typed data.

Every problem found here names its key and line. Unlike mergekit, unknown keys are errors (a
misspelled `paramters:` would otherwise produce a different model with no warning).
"""

from __future__ import annotations

import difflib
import math
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from mergesmith.errors import MergeError, MergeErrors
from mergesmith.schema import CHECK, Fault, check, field_names
from mergesmith.vocab.chat import chat_template_problem
from mergesmith.vocab.spec import TokenizerSpec, tokenizer_spec
from mergesmith.yamlpos import line_of, load_documents_with_positions, load_with_positions

# A parameter setting as written: a scalar, a gradient (list of numbers), or filter entries.
Setting = Any

DTYPE_NAMES = {
    "float32": "F32",
    "fp32": "F32",
    "float": "F32",
    "float16": "F16",
    "fp16": "F16",
    "half": "F16",
    "bfloat16": "BF16",
    "bf16": "BF16",
    "float64": "F64",
}


def _two_ends(value: list[int]) -> str | None:
    if len(value) != 2:
        return "layer_range needs two numbers [first, end) like [0, 16]"
    return None


def _known_dtype(value: str) -> str | None:
    if value not in DTYPE_NAMES:
        return f"unknown dtype {value!r}; use one of float32, float16, bfloat16"
    return None


# The recipe's shape, checked strictly by mergesmith.schema (no coercion, no unknown keys).
@dataclass(frozen=True)
class _SourceYaml:
    model: str
    layer_range: list[int] = field(metadata={CHECK: _two_ends})
    parameters: dict[str, Any] | None = None


@dataclass(frozen=True)
class _ModelYaml:
    model: str
    parameters: dict[str, Any] | None = None


@dataclass(frozen=True)
class _SliceYaml:
    sources: list[_SourceYaml]
    base_model: str | None = None
    parameters: dict[str, Any] | None = None


@dataclass(frozen=True)
class _ModuleYaml:
    slices: list[_SliceYaml] | None = None
    models: list[_ModelYaml] | None = None
    parameters: dict[str, Any] | None = None


@dataclass(frozen=True)
class _TokenYaml:
    # A model name, {kind: model_token, ...} or {kind: zero}: vocab.spec checks the forms.
    source: str | dict[str, Any] | None = None
    force: bool = False


@dataclass(frozen=True)
class _TokenizerYaml:
    source: str = "union"
    tokens: dict[str, _TokenYaml] | None = None
    pad_to_multiple_of: int | None = None


@dataclass(frozen=True)
class _RecipeYaml:
    merge_method: str
    name: str | None = None  # a stage of a pipeline: later stages use it as a model
    base_model: str | None = None
    models: list[_ModelYaml] | None = None
    slices: list[_SliceYaml] | None = None
    modules: dict[str, _ModuleYaml] | None = None
    parameters: dict[str, Any] | None = None
    dtype: str | None = field(default=None, metadata={CHECK: _known_dtype})
    out_dtype: str | None = field(default=None, metadata={CHECK: _known_dtype})
    tokenizer_source: str | None = None
    tokenizer: _TokenizerYaml | None = None
    chat_template: str | None = None


_FIELDS_AT: dict[str, type] = {
    "": _RecipeYaml,
    "models": _ModelYaml,
    "slices": _SliceYaml,
    "sources": _SourceYaml,
    "tokenizer": _TokenizerYaml,
    "modules": _ModuleYaml,
    "tokens": _TokenYaml,
}


@dataclass(frozen=True)
class ModelRef:
    """A model as the recipe names it: a local folder or a hub id, optionally `@revision`, and
    optionally `+ADAPTER` (a PEFT LoRA adapter, a local folder or a hub id with its own
    `@revision`), which is applied to the model's tensors as they are read (sources/lora.py)."""

    text: str
    path: str
    revision: str | None = None
    adapter: str | None = None
    adapter_revision: str | None = None

    @staticmethod
    def parse(text: str) -> ModelRef:
        """mergekit's reading: `MODEL[@REV][+ADAPTER[@REV]]`. A local path that exists is taken
        whole, so a folder whose name holds '+' or '@' still works."""
        if "+" in text and not Path(text).exists():
            parts = text.split("+")
            if len(parts) != 2 or not all(p.strip() for p in parts):
                raise MergeError(
                    f"model '{text}': expected MODEL+ADAPTER (one '+', a name on each side)",
                    "write the model, then '+', then the PEFT adapter's folder or hub id",
                )
            path, revision = _path_and_revision(parts[0])
            adapter, adapter_revision = _path_and_revision(parts[1])
            return ModelRef(text, path, revision, adapter, adapter_revision)
        path, revision = _path_and_revision(text)
        return ModelRef(text=text, path=path, revision=revision)

    def __str__(self) -> str:
        return self.text


def _path_and_revision(text: str) -> tuple[str, str | None]:
    if "@" in text and not Path(text).exists():
        path, revision = text.rsplit("@", 1)
        return path, revision
    return text, None


@dataclass(frozen=True)
class ModelInput:
    """One model of a `models:` list, or one source of a slice."""

    ref: ModelRef
    parameters: dict[str, Setting]
    layer_range: tuple[int, int] | None = None
    where: str = ""


@dataclass(frozen=True)
class SliceSpec:
    sources: tuple[ModelInput, ...]
    base_model: ModelRef | None
    parameters: dict[str, Setting]
    where: str = ""


@dataclass(frozen=True)
class ModuleSpec:
    """One module of the `modules:` form (a text decoder, a vision tower, ...): its own models
    or slices, and parameters between the slices' and the top level's."""

    name: str
    models: tuple[ModelInput, ...] | None
    slices: tuple[SliceSpec, ...] | None
    parameters: dict[str, Setting]


@dataclass(frozen=True)
class Recipe:
    """A validated recipe. `slices` is None for the `models:` form; both are None when the
    recipe has several `modules:`, each a recipe of its own through `for_module`."""

    merge_method: str
    base_model: ModelRef | None
    models: tuple[ModelInput, ...] | None
    slices: tuple[SliceSpec, ...] | None
    parameters: dict[str, Setting]
    dtype: str | None
    out_dtype: str | None
    tokenizer: TokenizerSpec | None  # from `tokenizer_source` or a `tokenizer:` block
    chat_template: str | None
    text: str
    source_name: str
    lines: dict[tuple[str | int, ...], int] = field(repr=False, default_factory=dict)
    name: str | None = None  # a pipeline stage's name, which later stages use as a model
    # `modules: {NAME: {..., parameters}}`: the module's parameters, between the slices' and the
    # top level's. A single module is also hoisted into models/slices, so that a single-tower
    # model's `default` plans like the plain form.
    module_parameters: dict[str, Setting] = field(default_factory=dict)
    module_name: str | None = None
    modules: tuple[ModuleSpec, ...] = ()

    def for_module(self, module: ModuleSpec) -> Recipe:
        """The recipe as one module sees it: the module's models or slices and parameters, its
        lines under the plain form's paths (so messages name the line inside the module)."""
        return replace(
            self,
            models=module.models,
            slices=module.slices,
            module_parameters=module.parameters,
            module_name=module.name,
            modules=(module,),
            lines={**self.lines, **_module_lines(self.lines, module.name)},
        )

    def line(self, *path: str | int) -> int | None:
        return line_of(self.lines, tuple(path))

    def where(self, *path: str | int) -> str:
        line = self.line(*path)
        return f"{self.source_name}:{line}" if line else self.source_name

    def model_where(self, text: str) -> str:
        """Where the recipe first names the model `text` (file:line)."""
        if self.base_model and self.base_model.text == text:
            return self.where("base_model")
        entries = []
        for models, slices in self._inputs():
            entries += models or ()
            for spec in slices or ():
                entries += spec.sources
        return next((e.where for e in entries if e.ref.text == text and e.where), self.source_name)

    def referenced_models(self) -> list[ModelRef]:
        """Every model once, in first-mention order (base first)."""
        seen: dict[str, ModelRef] = {}
        if self.base_model:
            seen[self.base_model.text] = self.base_model
        for models, slices in self._inputs():
            for entry in models or ():
                seen.setdefault(entry.ref.text, entry.ref)
            for spec in slices or ():
                if spec.base_model:
                    seen.setdefault(spec.base_model.text, spec.base_model)
                for src in spec.sources:
                    seen.setdefault(src.ref.text, src.ref)
        return list(seen.values())

    def _inputs(
        self,
    ) -> list[tuple[tuple[ModelInput, ...] | None, tuple[SliceSpec, ...] | None]]:
        """(models, slices) of the plain form, or of each module."""
        if self.models is None and self.slices is None:
            return [(m.models, m.slices) for m in self.modules]
        return [(self.models, self.slices)]


def load_recipe(recipe: str | Path | dict[str, Any]) -> Recipe:
    """Read a recipe from a YAML file path, a YAML string, or an already-parsed dict."""
    text, name = _recipe_text(recipe)
    return parse_recipe(text, name)


def load_stages(recipe: str | Path | dict[str, Any]) -> list[Recipe]:
    """Every document of a recipe file: one recipe, or the named stages of a pipeline."""
    text, name = _recipe_text(recipe)
    documents = load_documents_with_positions(text, name)
    if len(documents) == 1:
        return [parse_recipe(text, name)]
    stages: list[Recipe] = []
    problems: list[MergeError] = []
    for doc in documents:
        try:
            stages.append(_parse_document(doc.data, doc.lines, doc.text, name))
        except MergeErrors as exc:
            problems += exc.errors
        except MergeError as exc:
            problems.append(exc)
    if problems:
        raise MergeErrors(problems)
    return stages


def is_pipeline(recipe: str | Path | dict[str, Any]) -> bool:
    """Whether the recipe holds several YAML documents (the stages of a pipeline)."""
    text, name = _recipe_text(recipe)
    return len(load_documents_with_positions(text, name)) > 1


def _recipe_text(recipe: str | Path | dict[str, Any]) -> tuple[str, str]:
    """The recipe's YAML text and the name its messages use (the file, or '<recipe>')."""
    import yaml

    if isinstance(recipe, dict):
        try:
            text = yaml.safe_dump(recipe, sort_keys=False, allow_unicode=True)
        except (yaml.YAMLError, RecursionError, ValueError) as exc:
            raise MergeError(
                f"<recipe>: the recipe dict cannot be written as YAML ({exc.__class__.__name__})",
                "use plain dicts, lists, strings, numbers and booleans, nested a few levels",
            ) from None
        name = "<recipe>"
    elif isinstance(recipe, Path) or (
        isinstance(recipe, str) and "\n" not in recipe and recipe.endswith((".yml", ".yaml"))
    ):
        path = Path(recipe)
        try:
            text = path.read_text(encoding="utf-8")
        except FileNotFoundError:
            raise MergeError(
                f"recipe file '{path}' does not exist", "check the path to the YAML recipe"
            ) from None
        except (OSError, UnicodeDecodeError) as exc:
            raise MergeError(
                f"recipe file '{path}' cannot be read: {exc}",
                "the recipe must be a readable UTF-8 text file",
            ) from None
        name = str(path)
    else:
        text = str(recipe)
        name = "<recipe>"
    return text, name


# Top-level keys of configs for mergekit's other commands (none of them has `merge_method`).
_OTHER_TOOLS = {
    "genome": ("mergekit-evolve", "the search space of an evolutionary merge"),
    "experts": ("mergekit-moe", "the experts of a mixture of experts"),
}


def parse_recipe(text: str, source_name: str = "<recipe>") -> Recipe:
    data, lines = load_with_positions(text, source_name)
    return _parse_document(data, lines, text, source_name)


def _parse_document(
    data: Any, lines: dict[tuple[str | int, ...], int], text: str, source_name: str
) -> Recipe:
    if not isinstance(data, dict):
        raise MergeError(
            f"{source_name}: the recipe must be a mapping of keys, got {type(data).__name__}",
            "start with 'merge_method: ties'",
        )

    def where(path: tuple[str | int, ...]) -> str:
        line = line_of(lines, path)
        return f"{source_name}:{line}" if line else source_name

    if "merge_method" not in data:
        # Configs of mergekit's other tools get published beside recipes; one line naming the
        # tool beats a list of every key it uses that a recipe does not have.
        for key, (tool, what) in _OTHER_TOOLS.items():
            if key in data:
                raise MergeError(
                    f"{where((key,))}: this is a {tool} configuration ('{key}:' describes "
                    f"{what}), not a merge recipe",
                    f"run it with {tool}; mergesmith runs mergekit-yaml recipes "
                    "(merge_method with models: or slices:)",
                )

    # A faulty key is left out of `raw`, so the rest can still be checked (schema.check).
    checked, faults = check(data, _RecipeYaml)
    problems = [_describe(fault, where, data) for fault in faults]
    if checked is None:
        raise MergeErrors(problems)
    raw = checked

    module_problems = _module_problems(raw, where) if raw.modules is not None else []
    problems += module_problems
    hoisted = None
    if raw.modules is not None and not module_problems and len(raw.modules) == 1:
        raw, hoisted = _hoist_module(raw, lines)
    elif raw.modules is None and (raw.models is None) == (raw.slices is None):
        problems.append(
            MergeError(
                f"{source_name}: the recipe needs exactly one of 'models:', 'slices:' or "
                "'modules:'",
                "list the models to merge under 'models:'",
            )
        )
    for key in ("models", "slices"):
        value = getattr(raw, key)
        if value is not None and not value:
            problems.append(
                MergeError(f"{where((key,))}: '{key}' is empty", "list at least one entry")
            )
    tokenizer, tokenizer_problems = tokenizer_spec(
        raw.tokenizer_source,
        asdict(raw.tokenizer) if raw.tokenizer else None,
        where,
    )
    problems.extend(tokenizer_problems)
    chat_template = raw.chat_template
    if raw.chat_template is not None:
        problem = chat_template_problem(raw.chat_template)
        if problem:
            chat_template = None
            problems.append(
                MergeError(
                    f"{where(('chat_template',))}: {problem}",
                    "use a built-in name, 'auto' (the models' most common template), or the "
                    "Jinja template itself",
                )
            )
    # Before the inputs copy their blocks: a malformed setting is left out of the partial recipe.
    problems.extend(_check_settings(raw, where, hoisted))

    def ref(text: str, path: tuple[str | int, ...]) -> ModelRef | None:
        try:
            return ModelRef.parse(text)
        except MergeError as exc:
            problems.append(MergeError(f"{where(path)}: {exc.message}", exc.hint))
            return None

    base = ref(raw.base_model, ("base_model",)) if raw.base_model else None
    models, slices = _inputs(raw.models, raw.slices, (), ref, where, problems)
    modules: tuple[ModuleSpec, ...] = ()
    if hoisted is not None:
        name = next(iter(raw.modules or {}))
        modules = (ModuleSpec(name, models, slices, dict(hoisted.parameters or {})),)
    elif raw.modules and not module_problems:
        modules = tuple(
            ModuleSpec(
                name,
                *_inputs(module.models, module.slices, ("modules", name), ref, where, problems),
                dict(module.parameters or {}),
            )
            for name, module in raw.modules.items()
        )
    recipe = Recipe(
        name=raw.name,
        merge_method=raw.merge_method,
        base_model=base,
        models=models,
        slices=slices,
        parameters=dict(raw.parameters or {}),
        module_parameters=modules[0].parameters if hoisted else {},
        module_name=modules[0].name if hoisted else None,
        modules=modules,
        dtype=raw.dtype,
        out_dtype=raw.out_dtype,
        tokenizer=None if tokenizer_problems else tokenizer,
        chat_template=chat_template,
        text=text,
        source_name=source_name,
        lines=lines,
    )
    if problems:
        plannable = (models is None) != (slices is None) and bool(models or slices)
        raise RecipeProblems(problems, recipe if plannable or len(modules) > 1 else None)
    return recipe


def _inputs(
    raw_models: list[_ModelYaml] | None,
    raw_slices: list[_SliceYaml] | None,
    at: tuple[str, ...],
    ref: Any,
    where: Any,
    problems: list[MergeError],
) -> tuple[tuple[ModelInput, ...] | None, tuple[SliceSpec, ...] | None]:
    """The models or slices of the recipe, or of the module at `at` (the path of its key)."""
    models = None
    if raw_models:
        entries = []
        for i, m in enumerate(raw_models):
            r = ref(m.model, (*at, "models", i, "model"))
            if r is not None:
                entries.append(
                    ModelInput(r, dict(m.parameters or {}), None, where((*at, "models", i)))
                )
        models = tuple(entries)
    slices = None
    if raw_slices:
        specs = []
        for si, s in enumerate(raw_slices):
            sources = []
            for j, src in enumerate(s.sources):
                r = ref(src.model, (*at, "slices", si, "sources", j, "model"))
                if r is not None:
                    sources.append(
                        ModelInput(
                            r,
                            dict(src.parameters or {}),
                            (src.layer_range[0], src.layer_range[1]),
                            where((*at, "slices", si, "sources", j)),
                        )
                    )
            if not s.sources:
                problems.append(
                    MergeError(
                        f"{where((*at, 'slices', si))}: slice has no sources",
                        "add '- model: PATH' with a layer_range under 'sources:'",
                    )
                )
            slice_base = (
                ref(s.base_model, (*at, "slices", si, "base_model")) if s.base_model else None
            )
            specs.append(
                SliceSpec(
                    tuple(sources),
                    slice_base,
                    dict(s.parameters or {}),
                    where((*at, "slices", si)),
                )
            )
        slices = tuple(specs)
    return models, slices


class RecipeProblems(MergeErrors):
    """Problems in the recipe itself. `partial` is the recipe without the keys and settings at
    fault (None if too little is left), so that the models and the plan can still be checked
    and every problem reported in one run."""

    def __init__(self, errors: list[MergeError], partial: Recipe | None) -> None:
        super().__init__(errors)
        self.partial = partial


def _describe(fault: Fault, where: Any, data: Any) -> MergeError:
    loc = fault.path
    dotted = ".".join(str(p) for p in loc) or "(top level)"
    kind = fault.kind
    if kind == "unknown_key":
        key = str(loc[-1])
        parent = next((p for p in reversed(loc[:-1]) if isinstance(p, str)), "")
        if loc[:2] == ("tokenizer", "tokens") and len(loc) == 4:
            parent = "tokens"  # loc[2] is the token itself
        valid = field_names(_FIELDS_AT.get(parent, _RecipeYaml))
        guess = closest(key, valid)
        hint = f"did you mean '{guess}'?" if guess else f"valid keys here: {', '.join(valid)}"
        return MergeError(f"{where(loc)}: unknown key '{dotted}'", hint)
    if kind == "missing":
        return MergeError(
            f"{where(loc[:-1])}: missing required key '{dotted}'",
            _TYPE_HINTS.get(str(loc[-1]), "see the recipe format in the README"),
        )
    value = _lookup(data, loc)
    shown = repr(value)
    if len(shown) > 60:
        shown = shown[:57] + "..."
    field = str(next((p for p in reversed(loc) if isinstance(p, str)), ""))
    return MergeError(
        f"{where(loc)}: '{dotted}' = {shown}: {fault.message}",
        _TYPE_HINTS.get(field, "see the recipe format in the README (mergekit's YAML)"),
    )


_TYPE_HINTS = {
    "model": "a model is a folder path or a hub id such as org/name; quote it if it looks "
    "like a number",
    "base_model": "a folder path or a hub id such as org/name",
    "dtype": "use float32, float16 or bfloat16",
    "out_dtype": "use float32, float16 or bfloat16",
    "layer_range": "two layer numbers [first, end) such as [0, 16]",
    "merge_method": "run 'mergesmith methods' for the list",
    "parameters": "a mapping of parameter names to values",
    "models": "a list of '- model: PATH' entries",
    "slices": "a list of '- sources: [...]' entries",
    "sources": "a list of '- model: PATH, layer_range: [a, b]' entries",
}


def _lookup(data: Any, loc: tuple[Any, ...]) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data


def _module_problems(raw: _RecipeYaml, where: Any) -> list[MergeError]:
    """What is wrong with mergekit's `modules: {NAME: {slices | models, parameters}}` form as
    written; which names an architecture has is checked against the models in the plan."""
    modules = raw.modules or {}
    if raw.models is not None or raw.slices is not None:
        return [
            MergeError(
                f"{where(('modules',))}: the recipe has 'modules:' and also 'models:' or 'slices:'",
                "keep one of them",
            )
        ]
    if not modules:
        return [
            MergeError(
                f"{where(('modules',))}: 'modules' is empty",
                "name a module (a single-tower model's is 'default') with its models or slices",
            )
        ]
    problems = []
    for name, module in modules.items():
        if (module.models is None) == (module.slices is None):
            problems.append(
                MergeError(
                    f"{where(('modules', name))}: module '{name}' needs exactly one of "
                    "'models:' or 'slices:'",
                    "list its models under 'models:', or its slices under 'slices:'",
                )
            )
        for key in ("models", "slices"):
            if getattr(module, key) == []:
                problems.append(
                    MergeError(
                        f"{where(('modules', name, key))}: module '{name}': '{key}' is empty",
                        "list at least one entry",
                    )
                )
    return problems


def _hoist_module(
    raw: _RecipeYaml, lines: dict[tuple[str | int, ...], int]
) -> tuple[_RecipeYaml, _ModuleYaml]:
    """One module (a single-tower model's `default`) read as the recipe's models or slices, its
    parameters one level between the slices' and the top level's; its lines are mapped to those
    paths."""
    name, module = next(iter((raw.modules or {}).items()))
    lines.update(_module_lines(lines, name))
    return replace(raw, models=module.models, slices=module.slices), module


def _module_lines(
    lines: dict[tuple[str | int, ...], int], name: str
) -> dict[tuple[str | int, ...], int]:
    """The lines of module `name`'s models and slices under the plain form's paths."""
    return {
        path[2:]: line
        for path, line in lines.items()
        if path[:2] == ("modules", name) and len(path) > 2 and path[2] in ("models", "slices")
    }


def _check_settings(
    raw: _RecipeYaml, where: Any, hoisted: _ModuleYaml | None = None
) -> list[MergeError]:
    """Shape checks on parameter values; method-specific checks come with the plan."""
    problems: list[MergeError] = []
    blocks: list[tuple[tuple[str | int, ...], dict[str, Any] | None]] = [
        (("parameters",), raw.parameters)
    ]
    inputs: list[tuple[tuple[str, ...], list[_ModelYaml] | None, list[_SliceYaml] | None]] = [
        ((), raw.models, raw.slices)
    ]
    if hoisted is not None:
        blocks.append(
            (("modules", next(iter(raw.modules or {})), "parameters"), hoisted.parameters)
        )
    elif raw.modules:
        for name, module in raw.modules.items():
            blocks.append((("modules", name, "parameters"), module.parameters))
            inputs.append((("modules", name), module.models, module.slices))
    for at, models, slices in inputs:
        for i, m in enumerate(models or []):
            blocks.append(((*at, "models", i, "parameters"), m.parameters))
        for si, s in enumerate(slices or []):
            blocks.append(((*at, "slices", si, "parameters"), s.parameters))
            for j, src in enumerate(s.sources):
                blocks.append(((*at, "slices", si, "sources", j, "parameters"), src.parameters))
    for path, block in blocks:
        for name, value in list((block or {}).items()):
            problem = setting_problem(value)
            if problem:
                del block[name]  # the rest of the recipe is still checked without it
                problems.append(
                    MergeError(
                        f"{where((*path, name))}: parameter '{name}': {problem}",
                        "use a number, a list of numbers (a gradient) or "
                        "a list of {filter: NAME_PART, value: ...} entries",
                    )
                )
    return problems


def _is_scalar(value: Any) -> bool:
    if isinstance(value, bool | str):
        return True
    if isinstance(value, int | float):
        return math.isfinite(value)
    return False


def setting_problem(value: Any, nested: bool = False) -> str | None:
    """Why a parameter setting is malformed, or None. `nested`: inside a filter entry."""
    if _is_scalar(value):
        return None
    if isinstance(value, float):
        return f"{value} is not a finite number"
    if value is None:
        # null is meaningful for some parameters (consensus_method: null); the plan decides.
        return None if not nested else "no value given"
    entries = [value] if isinstance(value, dict) else value
    if isinstance(entries, list) and entries and all(isinstance(v, dict) for v in entries):
        if nested:
            return "filter entries cannot be nested"
        for entry in entries:
            problem = _filter_entry_problem(entry)
            if problem:
                return problem
        return None
    if isinstance(value, list):
        if not value:
            return "an empty list has no value"
        if all(_is_scalar(v) and not isinstance(v, str) for v in value):
            return None
        return "a list must hold only numbers (a gradient) or only {filter, value} entries"
    return f"{type(value).__name__} is not a valid value"


def _filter_entry_problem(entry: dict[str, Any]) -> str | None:
    extra = set(entry) - {"filter", "value"}
    if extra:
        return (
            f"unknown key '{sorted(map(str, extra))[0]}' in a filter entry (allowed: filter, value)"
        )
    if "value" not in entry:
        return "a filter entry needs a 'value'"
    flt = entry.get("filter")
    if flt is not None and not isinstance(flt, str):
        return f"filter {flt!r} must be a string (a part of the tensor name)"
    return setting_problem(entry["value"], nested=True)


def resolve_setting(setting: Setting, tensor_name: str, t: float) -> Any:
    """The value of one setting for a tensor at layer position t, or None if no filter matched.

    Gradients interpolate linearly: with L items, s = t (L - 1) and the value lies between items
    floor(s) and floor(s) + 1. Filters are plain substrings; the first match wins.
    """
    if isinstance(setting, dict):
        setting = [setting]
    if isinstance(setting, list):
        if setting and all(isinstance(e, dict) for e in setting):
            for entry in setting:
                flt = entry.get("filter")
                if flt is None or flt == "*" or flt in tensor_name:
                    return resolve_setting(entry["value"], tensor_name, t)
            return None
        return _interpolate(setting, t)
    return setting


def _interpolate(values: list[Any], t: float) -> Any:
    if any(isinstance(v, bool) for v in values):
        return values[int(t * (len(values) - 1))]
    scaled = t * (len(values) - 1)
    low = math.floor(scaled)
    high = min(len(values) - 1, low + 1)
    frac = scaled - low
    return (1 - frac) * values[low] + frac * values[high]


def closest(word: str, choices: list[str]) -> str | None:
    """The likeliest meant choice: a swap of letters first (`modles` is `models`, not
    `modules`), else the closest by difflib's ratio."""
    found = difflib.get_close_matches(word, choices, n=3, cutoff=0.5)
    swapped = [c for c in found if sorted(c) == sorted(word)]
    return (swapped or found or [None])[0]
