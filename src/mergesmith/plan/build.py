"""Building the jobs: one per output tensor, in output order, each with its inputs, resolved
parameters, seeds and peak memory."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from pathlib import Path

from mergesmith.config import DTYPE_NAMES, ModelInput, ModelRef, Recipe
from mergesmith.dtypes import FLOATING, ITEMSIZE
from mergesmith.errors import MergeError, MergeErrors
from mergesmith.layers import is_embedding, is_input_side, layer_of
from mergesmith.methods.registry import JobSize, MergeMethod
from mergesmith.plan.jobs import Plan, TensorInput, TensorJob, derive_seed
from mergesmith.plan.layers import Group, groups_of, layer_count, layer_steps, layer_templates
from mergesmith.plan.method_checks import check_parameter_names, find_method, split_base
from mergesmith.plan.modules import module_parts
from mergesmith.plan.params import ParamResolver
from mergesmith.plan.problems import Findings
from mergesmith.sources.base import ModelSource
from mergesmith.sources.open import open_tokenizer_folder
from mergesmith.vocab.align import RowPlan, check_sources, row_plan
from mergesmith.vocab.build import OutputVocab, build_vocab
from mergesmith.vocab.chat import read_chat_template, resolve_chat_template
from mergesmith.vocab.tokenizers import load_tokenizer

NameIn = Callable[[ModelInput], str]


class _Builder:
    def __init__(
        self,
        recipe: Recipe,
        method: MergeMethod,
        sources: Mapping[str, ModelSource],
        seed: int,
        findings: Findings,
        vocab: OutputVocab | None,
        jobs: list[TensorJob],
    ) -> None:
        self.recipe = recipe
        self.vocab = vocab
        self.row_plans: dict[tuple[tuple[str, ...], str | None], RowPlan] = {}
        self.method = method
        self.sources = sources
        self.seed = seed
        self.findings = findings
        self.params = ParamResolver(recipe, method, findings)
        self.jobs = jobs  # shared by the modules' builders: one list, one numbering

    def group(self, group: Group, layer_out: int, part: str) -> int:
        """Add jobs for one group: 'pre' and 'post' non-layer tensors, or 'layers'. Returns the
        next output layer index."""
        split = split_base(
            self.method, list(group.sources), group.base, group.where, group.in_slice, self.findings
        )
        if split is None:
            return layer_out
        base_entry, members = split
        reference = base_entry or members[0]
        ref_source = self.sources.get(reference.ref.text)
        if ref_source is None or any(m.ref.text not in self.sources for m in members):
            return layer_out
        if part == "layers":
            steps = layer_steps(reference, layer_out)
            for step in steps:
                a = (reference.layer_range or (0, 0))[0]
                for template in layer_templates(ref_source, a + step.offset):
                    self.tensor(
                        group,
                        template.format(step.out),
                        step.t,
                        base_entry,
                        members,
                        lambda e, tpl=template, off=step.offset: tpl.format(
                            (e.layer_range or (0, 0))[0] + off
                        ),
                    )
            return layer_out + len(steps)
        # Sorted so that the output is the same whatever order the input files list tensors in.
        for name in sorted(ref_source.tensors):
            if layer_of(name) is None and (is_input_side(name) == (part == "pre")):
                self.tensor(group, name, 0.0, base_entry, members, lambda e, n=name: n)
        return layer_out

    def tensor(
        self,
        group: Group,
        out_name: str,
        t: float,
        base_entry: ModelInput | None,
        members: list[ModelInput],
        name_in: NameIn,
    ) -> None:
        reference = base_entry or members[0]
        ref_source = self.sources[reference.ref.text]
        ref_name = name_in(reference)
        ref_meta = ref_source.tensors.get(ref_name)
        if ref_meta is None:
            self.findings.problem(
                f"{_at(reference)}model '{reference.ref.text}' has no tensor '{ref_name}' "
                f"(needed for output tensor '{out_name}')",
                "check the slice's layer_range",
            )
            return
        vocab = (ref_source.config or {}).get("vocab_size")
        embedding = is_embedding(
            ref_name, ref_meta.shape, vocab if isinstance(vocab, int) else None
        )
        aligned = embedding and self.vocab is not None
        inputs: list[TensorInput] = []
        for entry in members:
            found = self._input(entry, name_in(entry), reference, ref_meta, embedding, aligned)
            if found is None:
                return
            inputs.append(found)
        base_input = TensorInput(base_entry.ref.text, ref_name) if base_entry else None
        read = [base_input] if base_input else []
        read += inputs
        rows = None
        shape = ref_meta.shape
        if aligned:
            rows = self._row_plan(group, out_name, read)
            if rows is None:
                return
            shape = (rows.rows, *ref_meta.shape[1:])
        out_dtype = self.recipe.out_dtype or self.recipe.dtype
        dtype = DTYPE_NAMES[out_dtype] if out_dtype else ref_meta.dtype
        in_itemsize = max(ITEMSIZE[self.sources[i.model].tensors[i.name].dtype] for i in read)
        if ref_meta.dtype not in FLOATING:
            # Integer buffers (position ids, masks) are not weights: keep the reference's values.
            first = base_input or inputs[0]
            numel = math.prod(ref_meta.shape)
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
                    work_bytes=2 * numel * ITEMSIZE[ref_meta.dtype],
                    copy_only=True,
                )
            )
            return
        params = self.params.global_params(group.parameters, group.where, out_name, t)
        model_params = tuple(
            self.params.model_params(group.parameters, group.where, entry, name_in(entry), t)
            for entry in members
        )
        seeds = tuple(derive_seed(self.seed, e.ref.text, out_name) for e in members)
        size = JobSize(math.prod(shape), len(read), in_itemsize, ITEMSIZE[dtype])
        work = self.method.memory(size)
        if rows is not None:
            work += rows.extra_bytes(math.prod(shape[1:]), in_itemsize)
        self.jobs.append(
            TensorJob(
                index=len(self.jobs),
                name=out_name,
                shape=shape,
                dtype=dtype,
                method=self.method.name,
                base=base_input,
                inputs=tuple(inputs),
                params=params,
                model_params=model_params,
                seeds=seeds,
                work_bytes=work,
                vocab=rows,
            )
        )

    def _row_plan(self, group: Group, out_name: str, read: list[TensorInput]) -> RowPlan | None:
        """The rows each input of a vocabulary tensor takes, or None after recording why a
        model's tokenizer names a row its tensor does not have."""
        assert self.vocab is not None
        models = tuple(inp.model for inp in read)
        key = (models, group.base)
        if key not in self.row_plans:
            try:
                self.row_plans[key] = row_plan(self.vocab, models, group.base, self.findings.warn)
            except MergeError as exc:
                self.findings.problem(exc.message, exc.hint)
                return None
        plan = self.row_plans[key]
        for k, inp in enumerate(read):
            # The config's vocab_size is what mergekit trusts; the tensor is what can be read.
            tensor_rows = self.sources[inp.model].tensors[inp.name].shape[0]
            have = min(tensor_rows, self.vocab.model_rows[inp.model])
            if plan.highest_row[k] >= have:
                token, token_id = self.vocab.first_token_past(inp.model, have)
                self.findings.problem(
                    f"model '{inp.model}': token {token!r} has id {token_id} in its tokenizer, "
                    f"past the {have} rows of '{inp.name}'",
                    "fix the model's tokenizer or embeddings, or give the token a source with "
                    "'force: true' under tokenizer.tokens",
                    key=f"past-rows:{inp.model}:{token}",  # embed_tokens and lm_head alike
                )
                return None
        return plan

    def _input(
        self,
        entry: ModelInput,
        name: str,
        reference: ModelInput,
        ref_meta,
        embedding: bool,
        aligned: bool,
    ) -> TensorInput | None:
        """What one model contributes to a tensor, or None after recording why it cannot."""
        meta = self.sources[entry.ref.text].tensors.get(name)
        if meta is None:
            self.findings.problem(
                f"{_at(entry)}model '{entry.ref.text}' has no tensor '{name}', which "
                f"'{reference.ref.text}' has",
                "merge only models of the same architecture, or use slices to pick layers",
            )
            return None
        crop = None
        if aligned and meta.shape[1:] == ref_meta.shape[1:]:
            pass  # rows are re-indexed to the output vocabulary, whatever their count
        elif meta.shape != ref_meta.shape:
            larger = len(meta.shape) == len(ref_meta.shape) and all(
                m >= r for m, r in zip(meta.shape, ref_meta.shape, strict=True)
            )
            if not (embedding and larger):
                self.findings.problem(
                    f"{_at(entry)}tensor '{name}' has shape {list(meta.shape)} in "
                    f"'{entry.ref.text}' but {list(ref_meta.shape)} in '{reference.ref.text}'",
                    "these models do not share an architecture; merge only matching models",
                )
                return None
            crop = ref_meta.shape
            self.findings.warn(
                f"'{entry.ref.text}': {name} {list(meta.shape)} is cut to "
                f"{list(ref_meta.shape)} to match '{reference.ref.text}'"
            )
        if meta.dtype not in FLOATING and ref_meta.dtype in FLOATING:
            self.findings.problem(
                f"{_at(entry)}tensor '{name}' is {meta.dtype} in '{entry.ref.text}' but "
                f"{ref_meta.dtype} in '{reference.ref.text}'",
                "merge only checkpoints of the same architecture",
            )
            return None
        return TensorInput(entry.ref.text, name, crop)


def _at(entry: ModelInput) -> str:
    """Where the recipe names this model, as a message prefix."""
    return f"{entry.where}: " if entry.where else ""


def build_plan(recipe: Recipe, sources: Mapping[str, ModelSource], seed: int = 0) -> Plan:
    """Check everything headers allow and list one job per output tensor, in output order."""
    findings = Findings()
    method = find_method(recipe, findings)
    if method is None:
        raise MergeErrors(findings.problems)
    check_parameter_names(recipe, method, findings)
    first = recipe.base_model or (
        recipe.referenced_models()[0] if recipe.referenced_models() else None
    )
    source_model = recipe.tokenizer.source_model if recipe.tokenizer else None
    tokenizer_model = source_model or (first.text if first else None)
    vocab = None
    try:
        tokenizer_folder = _tokenizer_folder(tokenizer_model, sources)
        if recipe.tokenizer is not None:
            # Tokenizer files only: a bad tokenizer stops here, before any weight is read.
            vocab = build_vocab(recipe, sources, tokenizer_folder)
    except MergeError as exc:
        raise MergeErrors([*findings.problems, exc]) from None
    if vocab is not None:
        findings.problems.extend(check_sources(vocab))
        for warning in vocab.warnings:
            findings.warn(warning)
    jobs: list[TensorJob] = []
    num_layers = None
    parts = module_parts(recipe, sources, findings)
    for part, part_sources in parts:
        groups = groups_of(part, part_sources, findings)
        builder = _Builder(part, method, part_sources, seed, findings, vocab, jobs)
        if groups and not findings.problems:
            layer_out = 0
            builder.group(groups[0], 0, "pre")
            for group in groups:
                layer_out = builder.group(group, layer_out, "layers")
            builder.group(groups[-1], layer_out, "post")
            if part is recipe:
                num_layers = layer_out if recipe.slices is not None else None
            elif part.slices is not None:
                _check_module_layers(part, part_sources, layer_out, findings)
    names = [job.name for job in jobs]
    if len(set(names)) != len(names):
        dupes = sorted({n for n in names if names.count(n) > 1})
        findings.problem(
            f"two output tensors would both be named '{dupes[0]}'",
            "check that the slices do not produce the same tensor twice",
        )
    if findings.problems:
        raise MergeErrors(findings.problems)
    if all(part is recipe for part, _ in parts):
        # Modules warn of what they leave out themselves (plan/modules.py).
        for warning in _dropped_tensor_warnings(recipe, sources, jobs):
            findings.warn(warning)
    template = chat_template_text(recipe, sources)
    tokenizer = vocab.tokenizer if vocab is not None else None
    if tokenizer is None and recipe.chat_template and tokenizer_folder is not None:
        # Loaded now, so that a tokenizer that cannot take the template fails before merging.
        tokenizer = load_tokenizer(str(tokenizer_model), tokenizer_folder)
    return Plan(
        recipe=recipe,
        method=method,
        jobs=jobs,
        config_model=first.text if first else None,
        tokenizer_model=tokenizer_model,
        tokenizer_folder=tokenizer_folder,
        vocab=vocab,
        tokenizer=tokenizer,
        chat_template=template,
        num_layers=num_layers,
        seed=seed,
        warnings=findings.warnings,
    )


def _check_module_layers(
    module: Recipe, sources: Mapping[str, ModelSource], layers: int, findings: Findings
) -> None:
    """A module's slices must keep its layer count: mergekit writes the new count into the
    module's own config key (text_config.num_hidden_layers, vision_config.depth, ...), and the
    output config here is the reference model's as it stands."""
    reference = module.base_model or module.referenced_models()[0]
    have = layer_count(sources.get(reference.text))
    if have is not None and have != layers:
        findings.problem(
            f"{module.where('modules', str(module.module_name), 'slices')}: module "
            f"'{module.module_name}' would have {layers} layers where '{reference.text}' has "
            f"{have}; a module's changed layer count is not written into config.json yet",
            f"give the module's slices {have} layers in all",
        )


def _tokenizer_folder(model: str | None, sources: Mapping[str, ModelSource]) -> Path | None:
    """Where the output tokenizer's model keeps its files; a tokenizer source that is not merged
    is opened for its tokenizer alone, as mergekit does."""
    if model is None:
        return None
    if model in sources:
        return sources[model].folder
    ref = ModelRef.parse(model)
    return open_tokenizer_folder(model, ref.path, ref.revision)


def chat_template_text(recipe: Recipe, sources: Mapping[str, ModelSource]) -> str | None:
    """The recipe's chat_template as the text to write (None: leave the tokenizer's own)."""
    setting = recipe.chat_template
    if not setting:
        return None
    found = []
    if setting == "auto":
        found = [read_chat_template(sources[r.text].folder) for r in recipe.referenced_models()]
    return resolve_chat_template(setting, found)


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
