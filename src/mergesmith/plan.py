"""The plan: one job per output tensor, complete before any weight is read.

Every check that names, shapes, dtypes and parameters allow is made here, and all problems are
reported together.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from mergesmith.config import DTYPE_NAMES, ModelInput, ModelRef, Recipe, closest, resolve_setting
from mergesmith.dtypes import FLOATING, ITEMSIZE
from mergesmith.errors import MergeError, MergeErrors
from mergesmith.layers import is_embedding, is_input_side, layer_of
from mergesmith.methods.registry import MergeMethod, ParamSpec, all_methods, get_method
from mergesmith.sources.base import ModelSource

EXPLICIT_NONE = object()


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
    copy_only: bool = False  # integer buffers are copied from the first input, never mixed

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def out_bytes(self) -> int:
        return self.numel * ITEMSIZE[self.dtype]

    @property
    def work_bytes(self) -> int:
        """Memory this job holds while it runs: its inputs as stored (mapped pages count once
        touched), its output, and float32 block temporaries, which never grow with the tensor."""
        from mergesmith.ops.blocks import BLOCK

        k = len(self.inputs) + (1 if self.base else 0)
        itemsize = ITEMSIZE[self.dtype]
        block_temps = min(self.numel, BLOCK) * 4 * (2 * k + 6)
        return self.numel * itemsize * (k + 1) + block_temps


@dataclass
class Plan:
    recipe: Recipe
    method: MergeMethod
    jobs: list[TensorJob]
    config_model: str | None
    tokenizer_model: str | None
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


@dataclass
class _Group:
    """Models merged together over a run of layers: a slice, or the whole `models:` list."""

    sources: list[ModelInput]
    base: ModelRef | None
    parameters: dict[str, Any]
    where: str
    slice_path: tuple[str | int, ...] | None


class _Planner:
    def __init__(self, recipe: Recipe, sources: Mapping[str, ModelSource], seed: int) -> None:
        self.recipe = recipe
        self.sources = sources
        self.seed = seed
        self.problems: list[MergeError] = []
        self._seen_problems: set[str] = set()
        self.warnings: list[str] = []
        self.jobs: list[TensorJob] = []

    def problem(self, message: str, hint: str | None = None, key: str | None = None) -> None:
        # Thousands of tensors can share one mistake; report it once.
        dedupe = key or message
        if dedupe not in self._seen_problems:
            self._seen_problems.add(dedupe)
            self.problems.append(MergeError(message, hint))

    # -- method and parameter names ---------------------------------------------------------
    def method(self) -> MergeMethod | None:
        name = self.recipe.merge_method
        method = get_method(name)
        if method is None:
            names = [m.name for m in all_methods()]
            guess = closest(name, names)
            self.problem(
                f"{self.recipe.where('merge_method')}: unknown merge_method '{name}'",
                f"did you mean '{guess}'?" if guess else f"choose one of: {', '.join(names)}",
            )
        return method

    def check_parameter_names(self, method: MergeMethod) -> None:
        r = self.recipe
        blocks: list[tuple[tuple[str | int, ...], dict[str, Any], bool]] = [
            (("parameters",), r.parameters, False)
        ]
        for i, m in enumerate(r.models or ()):
            blocks.append((("models", i, "parameters"), m.parameters, True))
        for si, s in enumerate(r.slices or ()):
            blocks.append((("slices", si, "parameters"), s.parameters, False))
            for j, src in enumerate(s.sources):
                blocks.append((("slices", si, "sources", j, "parameters"), src.parameters, True))
        names = [p.name for p in method.params]
        for path, block, per_model_only in blocks:
            for key, value in block.items():
                spec = method.param(key)
                where = r.where(*path, key)
                if spec is None:
                    guess = closest(key, names)
                    self.problem(
                        f"{where}: '{key}' is not a parameter of {method.name}",
                        f"did you mean '{guess}'?"
                        if guess
                        else f"{method.name} takes: {', '.join(names) or 'no parameters'}",
                    )
                elif per_model_only and not spec.per_model:
                    self.problem(
                        f"{where}: '{key}' applies to the whole merge, not to one model",
                        "move it to the top-level 'parameters:'",
                    )
                elif value is None and None not in (spec.choices or ()):
                    self.problem(
                        f"{where}: parameter '{key}' has no value", "give it a value or remove it"
                    )

    # -- groups ----------------------------------------------------------------------------
    def groups(self, method: MergeMethod) -> list[_Group]:
        r = self.recipe
        if r.models is not None:
            listed = [m.ref.text for m in r.models]
            for i, name in enumerate(listed):
                if name in listed[:i]:
                    self.problem(
                        f"{r.where('models', i)}: model '{name}' is listed twice",
                        "merge its entries into one",
                    )
            sources = list(r.models)
            if r.base_model and r.base_model.text not in listed:
                sources.append(ModelInput(r.base_model, {}, None, r.where("base_model")))
            sources = [
                replace(e, layer_range=(0, self.layer_count(e.ref.text) or 0)) for e in sources
            ]
            counts = {e.ref.text: e.layer_range[1] for e in sources if e.layer_range}
            if len(set(counts.values())) > 1:
                shown = ", ".join(f"{k}: {v}" for k, v in counts.items())
                self.problem(
                    f"{r.where('models')}: the models have different numbers of layers ({shown})",
                    "use 'slices:' with layer_range to choose matching layers",
                )
            return [_Group(sources, r.base_model, {}, r.where("models"), None)]
        groups = []
        for si, spec in enumerate(r.slices or ()):
            base = spec.base_model or r.base_model
            lengths = set()
            for j, src in enumerate(spec.sources):
                a, b = src.layer_range or (0, 0)
                count = self.layer_count(src.ref.text)
                where = r.where("slices", si, "sources", j, "layer_range")
                if not 0 <= a < b:
                    self.problem(
                        f"{where}: layer_range [{a}, {b}] is empty or negative",
                        "use [first, last + 1] with first < last + 1",
                    )
                elif count is not None and b > count:
                    self.problem(
                        f"{where}: layer_range [{a}, {b}] goes past the {count} layers of "
                        f"'{src.ref.text}'",
                        f"the end is exclusive; at most [{a}, {count}]",
                    )
                lengths.add(b - a)
            if len(lengths) > 1:
                self.problem(
                    f"{r.where('slices', si)}: the sources of a slice must have the same number "
                    f"of layers, got {sorted(lengths)}",
                    "give every source of the slice a layer_range of the same length",
                )
            groups.append(
                _Group(list(spec.sources), base, spec.parameters, spec.where, ("slices", si))
            )
        return groups

    def layer_count(self, model: str) -> int | None:
        source = self.sources.get(model)
        if source is None:
            return None
        indexes = [hit[1] for name in source.tensors if (hit := layer_of(name))]
        found = max(indexes) + 1 if indexes else 0
        cfg = source.config or {}
        declared = cfg.get("num_hidden_layers") or cfg.get("n_layer")
        return max(found, declared) if isinstance(declared, int) and declared > 0 else found

    # -- tensors ---------------------------------------------------------------------------
    def plan_group(self, method: MergeMethod, group: _Group, layer_out: int, part: str) -> int:
        """Add jobs for one group: 'pre' and 'post' non-layer tensors, or 'layers'. Returns the
        next output layer index."""
        base = group.base
        base_text = base.text if base else None
        if method.needs_base:
            if base is None:
                self.problem(
                    f"{group.where}: {method.name} needs a base model",
                    "add 'base_model: PATH_OR_ID' (the model the others were fine-tuned from)",
                )
                return layer_out
            if group.slice_path and base_text not in [s.ref.text for s in group.sources]:
                self.problem(
                    f"{group.where}: the base model '{base_text}' is not among this slice's "
                    "sources",
                    "add it as a source with the same layer_range",
                )
                return layer_out
        if method.base_is_input or not method.needs_base:
            members = list(group.sources)
            base_entry = None
        else:
            members = [s for s in group.sources if s.ref.text != base_text]
            base_entry = next(s for s in group.sources if s.ref.text == base_text)
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
            self.problem(
                f"{group.where}: {method.name} takes {expected} model(s){extra}, "
                f"got {len(members)}",
                "run 'mergesmith methods' to see what each method takes",
            )
            return layer_out
        reference = base_entry or members[0]
        ref_source = self.sources.get(reference.ref.text)
        if ref_source is None or any(m.ref.text not in self.sources for m in members):
            return layer_out
        if part == "layers":
            a, b = reference.layer_range or (0, 0)
            for offset in range(max(0, b - a)):
                t = offset / (b - a - 1) if b - a > 1 else 1.0
                for template in self.layer_templates(ref_source, a + offset):
                    self.plan_tensor(
                        method,
                        group,
                        template.format(layer_out),
                        t,
                        base_entry,
                        members,
                        lambda e, tpl=template, off=offset: tpl.format(
                            (e.layer_range or (0, 0))[0] + off
                        ),
                    )
                layer_out += 1
            return layer_out
        # Sorted so that the output is the same whatever order the input files list tensors in.
        for name in sorted(ref_source.tensors):
            if layer_of(name) is None and (is_input_side(name) == (part == "pre")):
                self.plan_tensor(method, group, name, 0.0, base_entry, members, lambda e, n=name: n)
        return layer_out

    def layer_templates(self, source: ModelSource, index: int) -> list[str]:
        templates = []
        for name in source.tensors:
            hit = layer_of(name)
            if hit and hit[1] == index:
                templates.append(hit[0])
        return sorted(templates)

    def plan_tensor(
        self,
        method: MergeMethod,
        group: _Group,
        out_name: str,
        t: float,
        base_entry: ModelInput | None,
        members: list[ModelInput],
        name_in,
    ) -> None:
        reference = base_entry or members[0]
        ref_source = self.sources[reference.ref.text]
        ref_name = name_in(reference)
        ref_meta = ref_source.tensors.get(ref_name)
        if ref_meta is None:
            self.problem(
                f"model '{reference.ref.text}' has no tensor '{ref_name}' "
                f"(needed for output tensor '{out_name}')",
                "check the slice's layer_range",
            )
            return
        vocab = (ref_source.config or {}).get("vocab_size")
        embedding = is_embedding(
            ref_name, ref_meta.shape, vocab if isinstance(vocab, int) else None
        )
        inputs: list[TensorInput] = []
        for entry in members:
            source = self.sources[entry.ref.text]
            name = name_in(entry)
            meta = source.tensors.get(name)
            if meta is None:
                self.problem(
                    f"model '{entry.ref.text}' has no tensor '{name}', which "
                    f"'{reference.ref.text}' has",
                    "merge only models of the same architecture, or use slices to pick layers",
                )
                return
            crop = None
            if meta.shape != ref_meta.shape:
                larger = len(meta.shape) == len(ref_meta.shape) and all(
                    m >= r for m, r in zip(meta.shape, ref_meta.shape, strict=True)
                )
                if embedding and larger:
                    crop = ref_meta.shape
                    self.warnings.append(
                        f"'{entry.ref.text}': {name} {list(meta.shape)} is cut to "
                        f"{list(ref_meta.shape)} to match '{reference.ref.text}'"
                    )
                else:
                    self.problem(
                        f"tensor '{name}' has shape {list(meta.shape)} in '{entry.ref.text}' but "
                        f"{list(ref_meta.shape)} in '{reference.ref.text}'",
                        "these models do not share an architecture; merge only matching models",
                    )
                    return
            if meta.dtype not in FLOATING and ref_meta.dtype in FLOATING:
                self.problem(
                    f"tensor '{name}' is {meta.dtype} in '{entry.ref.text}' but "
                    f"{ref_meta.dtype} in '{reference.ref.text}'",
                    "merge only checkpoints of the same architecture",
                )
                return
            inputs.append(TensorInput(entry.ref.text, name, crop))
        base_input = TensorInput(base_entry.ref.text, ref_name) if base_entry else None
        out_dtype = self.recipe.out_dtype or self.recipe.dtype
        dtype = DTYPE_NAMES[out_dtype] if out_dtype else ref_meta.dtype
        if ref_meta.dtype not in FLOATING:
            # Integer buffers (position ids, masks) are not weights: keep the reference's values.
            first = base_input or inputs[0]
            self.jobs.append(
                TensorJob(
                    len(self.jobs),
                    out_name,
                    ref_meta.shape,
                    ref_meta.dtype,
                    "copy",
                    None,
                    (first,),
                    {},
                    ({},),
                    (0,),
                    copy_only=True,
                )
            )
            return
        params = self.global_params(method, group, out_name, t)
        model_params = tuple(
            self.model_params(method, group, entry, name_in(entry), t) for entry in members
        )
        seeds = tuple(derive_seed(self.seed, e.ref.text, out_name) for e in members)
        self.jobs.append(
            TensorJob(
                index=len(self.jobs),
                name=out_name,
                shape=ref_meta.shape,
                dtype=dtype,
                method=method.name,
                base=base_input,
                inputs=tuple(inputs),
                params=params,
                model_params=model_params,
                seeds=seeds,
            )
        )

    # -- parameters ------------------------------------------------------------------------
    def global_params(self, method: MergeMethod, group: _Group, name: str, t: float) -> dict:
        blocks = [(group.slice_path, group.parameters), (None, self.recipe.parameters)]
        return {
            spec.name: self.resolve(spec, blocks, name, t, None, method)
            for spec in method.params
            if not spec.per_model
        }

    def model_params(
        self, method: MergeMethod, group: _Group, entry: ModelInput, name: str, t: float
    ) -> dict:
        blocks = [
            (None, entry.parameters),
            (group.slice_path, group.parameters),
            (None, self.recipe.parameters),
        ]
        values = {
            spec.name: self.resolve(spec, blocks, name, t, entry.ref.text, method)
            for spec in method.params
            if spec.per_model
        }
        if method.extra_checks:
            why = method.extra_checks(values)
            if why:
                self.problem(
                    f"{entry.where or self.recipe.source_name}: model '{entry.ref.text}': {why}",
                    "change density or epsilon",
                    key=f"extra:{entry.ref.text}:{why}",
                )
        return values

    def resolve(
        self,
        spec: ParamSpec,
        blocks: Iterable[tuple[Any, dict[str, Any]]],
        tensor: str,
        t: float,
        model: str | None,
        method: MergeMethod,
    ) -> Any:
        for _path, block in blocks:
            if spec.name not in block:
                continue
            setting = block[spec.name]
            if setting is None:
                return None
            value = resolve_setting(setting, tensor, t)
            if value is not None:
                return self.coerce(spec, value, model, tensor)
        if spec.required:
            whose = f"model '{model}'" if model else "the merge"
            self.problem(
                f"{self.recipe.source_name}: {method.name} needs '{spec.name}' for {whose} "
                f"(tensor '{tensor}' has none)",
                f"add '{spec.name}: VALUE' under that model's parameters (or the top-level "
                "'parameters:' to apply it to all)",
                key=f"required:{spec.name}:{model}",
            )
            return None
        return spec.default

    def coerce(self, spec: ParamSpec, value: Any, model: str | None, tensor: str) -> Any:
        whose = f" for model '{model}'" if model else ""
        bad = None
        if spec.kind is float:
            if isinstance(value, bool) or not isinstance(value, int | float):
                bad = f"must be a number, got {value!r}"
            else:
                value = float(value)
        elif spec.kind is bool:
            if isinstance(value, bool):
                pass
            elif isinstance(value, int | float) and value in (0, 1):
                value = bool(value)
            else:
                bad = f"must be true or false, got {value!r}"
        elif spec.kind is str and spec.choices and value not in spec.choices:
            shown = ", ".join("null" if c is None else str(c) for c in spec.choices)
            bad = f"must be one of {shown}, got {value!r}"
        if bad is None and spec.check is not None:
            bad = spec.check(value)
        if bad:
            self.problem(
                f"{self.recipe.source_name}: parameter '{spec.name}'{whose}: {bad} "
                f"(first at tensor '{tensor}')",
                f"change '{spec.name}' ({spec.help}); 'mergesmith methods' lists the parameters",
                key=f"value:{spec.name}:{model}:{bad}",
            )
            return spec.default if not spec.required else value
        return value


def build_plan(recipe: Recipe, sources: Mapping[str, ModelSource], seed: int = 0) -> Plan:
    """Check everything headers allow and list one job per output tensor, in output order."""
    planner = _Planner(recipe, sources, seed)
    method = planner.method()
    if method is None:
        raise MergeErrors(planner.problems)
    planner.check_parameter_names(method)
    groups = planner.groups(method)
    if groups and not planner.problems:
        layer_out = 0
        planner.plan_group(method, groups[0], 0, "pre")
        for group in groups:
            layer_out = planner.plan_group(method, group, layer_out, "layers")
        planner.plan_group(method, groups[-1], layer_out, "post")
        num_layers = layer_out if recipe.slices is not None else None
    else:
        num_layers = None
    names = [job.name for job in planner.jobs]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        planner.problem(
            f"two output tensors would both be named '{dupes[0]}'",
            "check that the slices do not produce the same tensor twice",
        )
    if planner.problems:
        raise MergeErrors(planner.problems)
    planner.warnings.extend(_dropped_tensor_warnings(recipe, sources, planner.jobs))
    first = recipe.base_model or (
        recipe.referenced_models()[0] if recipe.referenced_models() else None
    )
    tok = recipe.tokenizer_source
    tokenizer_model = (first.text if first else None) if tok in (None, "base") else tok
    return Plan(
        recipe=recipe,
        method=method,
        jobs=planner.jobs,
        config_model=first.text if first else None,
        tokenizer_model=tokenizer_model,
        num_layers=num_layers,
        seed=seed,
        warnings=planner.warnings,
    )


def _dropped_tensor_warnings(
    recipe: Recipe, sources: Mapping[str, ModelSource], jobs: list[TensorJob]
) -> list[str]:
    """Name input tensors that no job reads (outside sliced-away layers): never drop silently."""
    if recipe.slices is not None:
        return []
    used: dict[str, set[str]] = {}
    for job in jobs:
        for inp in (job.base, *job.inputs):
            if inp is not None:
                used.setdefault(inp.model, set()).add(inp.name)
    out = []
    for model, source in sources.items():
        unused = sorted(set(source.tensors) - used.get(model, set()))
        if unused and model in used:
            more = f" and {len(unused) - 3} more" if len(unused) > 3 else ""
            out.append(
                f"'{model}' has {len(unused)} tensor(s) the output will not contain: "
                f"{', '.join(unused[:3])}{more}"
            )
    return out
