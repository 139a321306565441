"""Multi-stage recipes: several YAML documents, each a merge with a `name:`, where a later stage
names an earlier one as a model (mergekit-multimerge's format).

The stages run in dependency order; each stage but the last writes into a work folder beside
the output. Every stage is planned before the first weight is read: a stage's output is known
from its plan (tensor names, shapes and dtypes, config.json and tokenizer files), so the stages
after it are checked against what it will write.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergesmith.config import Recipe, load_stages
from mergesmith.errors import MergeError, MergeErrors
from mergesmith.plan import Plan
from mergesmith.sources.base import ModelSource, TensorMeta

if TYPE_CHECKING:
    import torch

    from mergesmith.api import MergeResult

log = logging.getLogger("mergesmith")


@dataclass(frozen=True)
class Stage:
    recipe: Recipe
    needs: tuple[str, ...]  # the earlier stages it reads, by name

    @property
    def name(self) -> str | None:
        return self.recipe.name

    @property
    def label(self) -> str:
        return f"stage '{self.name}'" if self.name else "the final stage"


def order_stages(recipes: list[Recipe]) -> list[Stage]:
    """The stages in the order they run; the last one writes the output. A single recipe is one
    stage, named or not."""
    if len(recipes) == 1:
        return [Stage(recipes[0], ())]
    problems: list[MergeError] = []
    names = [r.name for r in recipes if r.name]
    unnamed = [r for r in recipes if not r.name]
    if len(unnamed) > 1:
        problems.append(
            MergeError(
                f"{unnamed[1].where('merge_method')}: more than one document has no 'name:'",
                "name every stage; at most one (the final merge) may be unnamed",
            )
        )
    for name in {n for n in names if names.count(n) > 1}:
        second = [r for r in recipes if r.name == name][1]
        problems.append(
            MergeError(
                f"{second.where('name')}: stage name '{name}' is used twice",
                "give each stage its own name",
            )
        )
    stages = [Stage(r, _stage_references(r, names, problems)) for r in recipes]
    if problems:
        raise MergeErrors(problems)
    ordered = _dependency_order(stages)
    read = {need for stage in stages for need in stage.needs}
    final = [s for s in stages if not s.name] or [s for s in stages if s.name not in read]
    if len(final) != 1:
        shown = ", ".join(f"'{s.name}'" for s in final)
        raise MergeError(
            f"{recipes[0].source_name}: stages {shown} are each used by no other stage; only "
            "one can be the output",
            "remove the stages nothing uses, or leave the final merge unnamed",
        )
    if ordered[-1] is not final[0]:
        # The final stage runs last; the others keep their relative order.
        ordered.remove(final[0])
        ordered.append(final[0])
    return ordered


def _stage_references(
    recipe: Recipe, names: list[str], problems: list[MergeError]
) -> tuple[str, ...]:
    """The stage names this recipe reads (`STAGE`, or `STAGE+ADAPTER`: the stage's output with
    a LoRA adapter applied, as mergekit-multi reads it); a model that is not a folder but is
    spelled almost like a stage is taken for a misspelled stage (a hub lookup would fail far
    less clearly)."""
    needs = []
    for ref in recipe.referenced_models():
        stage = ref.text if ref.text in names else ref.path if ref.path in names else None
        if stage is not None:
            where = recipe.model_where(ref.text)
            if stage == recipe.name:
                problems.append(
                    MergeError(
                        f"{where}: stage '{stage}' reads its own output",
                        "a stage can use only the stages before it",
                    )
                )
            if ref.revision is not None:
                problems.append(
                    MergeError(
                        f"{where}: model '{ref.text}': stage '{stage}' is merged by this recipe, "
                        "so it has no revisions",
                        f"drop '@{ref.revision}'",
                    )
                )
            needs.append(stage)
        elif not Path(ref.path).expanduser().exists():
            close = difflib.get_close_matches(ref.path, names, n=1, cutoff=0.8)
            if close:
                problems.append(
                    MergeError(
                        f"{recipe.model_where(ref.text)}: model '{ref.text}' is no stage and no "
                        "folder",
                        f"did you mean stage '{close[0]}'?",
                    )
                )
    return tuple(dict.fromkeys(needs))


def _dependency_order(stages: list[Stage]) -> list[Stage]:
    """Depth first in document order; a cycle is an error naming it."""
    by_name = {s.name: s for s in stages if s.name}
    done: list[Stage] = []
    visiting: list[Stage] = []

    def visit(stage: Stage) -> None:
        if stage in done:
            return
        if stage in visiting:
            cycle = [*visiting[visiting.index(stage) :], stage]
            raise MergeError(
                f"{stage.recipe.source_name}: the stages depend on each other in a cycle: "
                + " -> ".join(str(s.name) for s in cycle),
                "a stage can use only stages that do not use it",
            )
        visiting.append(stage)
        for need in stage.needs:
            visit(by_name[need])
        visiting.pop()
        done.append(stage)

    for stage in stages:
        visit(stage)
    return done


class PlannedSource(ModelSource):
    """A stage's output as its plan describes it, before it exists: tensor names, shapes and
    dtypes from the jobs; config.json and tokenizer files written into a scratch folder from the
    plan, exactly as the stage will write them. It holds no weights."""

    def __init__(self, ref: str, plan: Plan, sources: Mapping[str, ModelSource]) -> None:
        from mergesmith.output import metadata

        self._scratch = tempfile.TemporaryDirectory(prefix="mergesmith-stage-")
        folder = Path(self._scratch.name)
        metadata.write_config(plan, dict(sources), folder)
        metadata.write_tokenizer(plan, folder)
        weights = folder / "model.safetensors"
        tensors = {
            job.name: TensorMeta(job.name, tuple(job.shape), job.dtype, weights)
            for job in plan.jobs
        }
        super().__init__(ref, folder, tensors)

    def read(self, name: str) -> torch.Tensor:
        raise MergeError(
            f"stage '{self.ref}' has not run yet, so its tensor '{name}' cannot be read",
            "this is a bug: planned stages are only checked, never merged from",
        )

    def close(self) -> None:
        self._scratch.cleanup()


def plan_stages(recipe: str | Path | dict[str, Any], seed: int = 0) -> list[tuple[Stage, Plan]]:
    """Plan every stage from headers alone, each against what the stages before it will write;
    all problems of all stages are reported together."""
    from mergesmith.api import prepare

    stages = order_stages(load_stages(recipe))
    planned: dict[str, ModelSource] = {}
    opened: list[ModelSource] = []
    plans: list[tuple[Stage, Plan]] = []
    problems: list[MergeError] = []
    try:
        for stage in stages:
            if any(need not in planned for need in stage.needs):
                continue  # a stage it reads failed to plan: already reported
            try:
                plan, sources = prepare(stage.recipe, seed, planned)
            except MergeErrors as exc:
                problems += exc.errors
                continue
            except MergeError as exc:
                problems.append(exc)
                continue
            opened += [s for ref, s in sources.items() if ref not in planned]
            plans.append((stage, plan))
            if stage.name:
                planned[stage.name] = PlannedSource(stage.name, plan, sources)
    finally:
        for source in [*opened, *planned.values()]:
            source.close()
    if problems:
        raise MergeErrors(problems)
    return plans


def run_pipeline(
    recipe: str | Path | dict[str, Any],
    out_dir: str | Path,
    *,
    seed: int = 0,
    resume: bool = False,
    overwrite: bool = False,
    keep_stages: bool = False,
    **options: Any,
) -> MergeResult:
    """Run the stages in order: each but the last into `.NAME.stages/STAGE` beside the output,
    the last into `out_dir`. Every stage is planned first. With `resume`, a stage whose output
    was finished for the same recipe, seed and inputs is reused, and an interrupted one
    continues; without it, the work folder of an earlier run is discarded."""
    from mergesmith.api import merge

    plans = plan_stages(recipe, seed)
    out = Path(out_dir).expanduser().absolute()
    work = out.parent / f".{out.name}.stages"
    if work.exists() and not resume:
        log.warning("discarding the stages of an earlier run in %s (use --resume)", work)
        shutil.rmtree(work)
    done: dict[str, Path] = {}
    stamps: dict[str, str] = {}
    result = None
    for stage, _plan in plans:
        if stage is plans[-1][0]:
            result = merge(
                stage.recipe,
                out,
                seed=seed,
                resume=resume,
                overwrite=overwrite,
                stage_outputs=done,
                **options,
            )
            break
        assert stage.name is not None
        stamp = _stage_stamp(stage, seed, done, stamps)
        folder = work / stage.name
        stamp_file = work / f"{stage.name}.stamp"
        if resume and folder.is_dir() and _read(stamp_file) == stamp:
            log.warning("stage '%s': reusing its finished output in %s", stage.name, folder)
        else:
            log.warning("stage '%s': merging into %s", stage.name, folder)
            stamp_file.unlink(missing_ok=True)
            merge(
                stage.recipe,
                folder,
                seed=seed,
                resume=resume,
                overwrite=True,
                stage_outputs=done,
                **options,
            )
            stamp_file.write_text(stamp, encoding="utf-8")
        done[stage.name] = folder
        stamps[stage.name] = stamp
    assert result is not None
    if not keep_stages:
        shutil.rmtree(work, ignore_errors=True)
    return result


def _stage_stamp(
    stage: Stage, seed: int, done: Mapping[str, Path], stamps: Mapping[str, str]
) -> str:
    """What a finished stage output was made from: its recipe, the seed, the stamps of the
    stages it reads, and the size and time of every other input file."""
    from mergesmith.api import open_sources
    from mergesmith.output.journal import add_input_files

    digest = hashlib.sha256(f"{seed}\0{stage.recipe.text}".encode())
    for need in stage.needs:
        digest.update(f"\0{need}\0{stamps[need]}".encode())
    sources = open_sources(stage.recipe, done)
    try:
        add_input_files(digest, sources, sorted(set(sources) - set(stage.needs)))
    finally:
        for source in sources.values():
            source.close()
    return digest.hexdigest()


def _read(path: Path) -> str | None:
    try:
        return path.read_text(encoding="utf-8")
    except OSError:
        return None
