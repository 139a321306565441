"""The library entry point: `merge(recipe, out_dir, **options)`. The CLI is a thin layer on it."""

from __future__ import annotations

import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergesmith.config import Recipe, RecipeProblems, is_pipeline, load_recipe
from mergesmith.errors import MergeError, MergeErrors
from mergesmith.plan import Plan, build_plan
from mergesmith.sources import ModelSource, open_model
from mergesmith.units import parse_size

if TYPE_CHECKING:
    from mergesmith.progress import Progress

log = logging.getLogger("mergesmith")


@dataclass
class MergeResult:
    out_dir: Path
    tensors: int
    bytes_written: int
    seconds: float
    seed: int
    files: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


def open_sources(
    recipe: Recipe, stage_outputs: Mapping[str, Path | ModelSource] | None = None
) -> dict[str, ModelSource]:
    """Open every model the recipe names, reading headers only; report all failures together.
    `stage_outputs` maps the names of earlier pipeline stages to their output folders (or, for
    planning, to sources describing outputs not yet written); `STAGE+ADAPTER` is a stage's
    output with a LoRA adapter applied on read, as for any model."""
    from mergesmith.sources.lora import open_adapter

    sources: dict[str, ModelSource] = {}
    problems: list[MergeError] = []
    stage_outputs = stage_outputs or {}
    for ref in recipe.referenced_models():
        given = stage_outputs.get(ref.text)
        stage = stage_outputs.get(ref.path)
        try:
            if isinstance(given, ModelSource):
                sources[ref.text] = given
            elif given is not None:
                sources[ref.text] = open_model(ref.text, str(given))
            elif ref.adapter is not None and isinstance(stage, ModelSource):
                sources[ref.text] = open_adapter(
                    ref.text, stage, ref.adapter, ref.adapter_revision, owns_base=False
                )
            elif ref.adapter is not None and stage is not None:
                sources[ref.text] = open_model(
                    ref.text, str(stage), None, ref.adapter, ref.adapter_revision
                )
            else:
                sources[ref.text] = open_model(
                    ref.text, ref.path, ref.revision, ref.adapter, ref.adapter_revision
                )
        except MergeError as exc:
            problems.append(MergeError(f"{recipe.model_where(ref.text)}: {exc.message}", exc.hint))
    if problems:
        raise MergeErrors(problems)
    return sources


def prepare(
    recipe: str | Path | dict[str, Any] | Recipe,
    seed: int = 0,
    stage_outputs: Mapping[str, Path | ModelSource] | None = None,
) -> tuple[Plan, dict[str, ModelSource]]:
    """Load, open and plan: everything that needs no tensor data. `validate` stops here."""
    try:
        loaded = recipe if isinstance(recipe, Recipe) else load_recipe(recipe)
    except RecipeProblems as exc:
        raise _with_plan_problems(exc, seed, stage_outputs) from None
    sources = open_sources(loaded, stage_outputs)
    return build_plan(loaded, sources, seed), sources


def _with_plan_problems(
    found: RecipeProblems,
    seed: int,
    stage_outputs: Mapping[str, Path | ModelSource] | None,
) -> MergeErrors:
    """The recipe's own problems, and those the models and the plan show once the keys at
    fault are left out: every problem in one run, not one round trip per mistake."""
    problems = list(found.errors)
    if found.partial is None or not found.partial.referenced_models():
        return MergeErrors(problems)  # nothing left to open or plan
    sources: dict[str, ModelSource] = {}
    try:
        sources = open_sources(found.partial, stage_outputs)
        build_plan(found.partial, sources, seed)
    except MergeError as more:
        known = {p.message for p in problems}
        extra = more.errors if isinstance(more, MergeErrors) else [more]
        problems += [p for p in extra if p.message not in known]
    finally:
        for ref, source in sources.items():
            if ref not in (stage_outputs or {}):
                source.close()
    return MergeErrors(problems)


def merge(
    recipe: str | Path | dict[str, Any] | Recipe,
    out_dir: str | Path,
    *,
    seed: int = 0,
    threads: int | None = None,
    max_memory: str | int | None = None,
    shard_size: str | int = "5GB",
    device: str = "cpu",
    overwrite: bool = False,
    allow_nonfinite: bool = False,
    resume: bool = False,
    progress: Callable[[Progress], None] | Callable[[int, int], None] | None = None,
    keep_stages: bool = False,
    stage_outputs: Mapping[str, Path] | None = None,
    backend: str = "local",
    address: str | None = None,
    task_size: str | int | None = None,
) -> MergeResult:
    """Merge the models a mergekit-style recipe names into a Hugging Face folder at `out_dir`.

    `recipe` is a YAML file path, YAML text, or a parsed dict. Work happens in a hidden
    `.NAME.partial` folder beside `out_dir`, renamed into place only when every tensor is
    journaled as written and every shard's header and size match the plan. After an
    interruption that folder keeps its shards and journal, and `resume=True` reuses the tensors
    whose checksums still match; the result is byte-identical to an uninterrupted run.

    Only one merge at a time may write `out`: while one runs (in any process on this machine,
    or on any host sharing the folder, where the file system supports locks), another raises
    MergeError naming its pid. `progress`, if given, is called with a `Progress` (tensors done
    and total, bytes read and written, seconds) once before the first tensor and after each
    one, never from two threads at once; a callable taking `(done, total)` still works.

    A recipe file of several YAML documents, each with a `name:`, is a pipeline (mergekit's
    multimerge format): see `mergesmith.pipeline`. Its stages run in dependency order, each but
    the last into `.NAME.stages/` beside `out_dir` (kept with `keep_stages=True`);
    `stage_outputs` (stage name -> folder) is how each stage finds the earlier ones.

    `backend="ray"` runs the same jobs as tasks on a Ray cluster (`address`, else a local
    instance; `task_size` output bytes per task) with byte-identical output: see
    `mergesmith.backends.ray_driver`. Inputs and output must be at the same paths on every node.
    """
    from mergesmith.backends import check_backend_options

    check_backend_options(backend, address, task_size, device)
    if stage_outputs is None and not isinstance(recipe, Recipe) and is_pipeline(recipe):
        from mergesmith.pipeline import run_pipeline

        return run_pipeline(
            recipe,
            out_dir,
            keep_stages=keep_stages,
            seed=seed,
            threads=threads,
            max_memory=max_memory,
            shard_size=shard_size,
            device=device,
            overwrite=overwrite,
            allow_nonfinite=allow_nonfinite,
            resume=resume,
            progress=progress,
            backend=backend,
            address=address,
            task_size=task_size,
        )
    from mergesmith.engine import EngineOptions, run_jobs
    from mergesmith.output import finish, journal, metadata
    from mergesmith.output.layout import plan_layout
    from mergesmith.output.lock import lock_output
    from mergesmith.output.writer import NO_SPACE, TensorWriter
    from mergesmith.progress import ProgressCounter

    started = time.perf_counter()
    out = Path(out_dir).expanduser().absolute()
    shard_bytes = parse_size(shard_size, "--shard-size")
    memory_bytes = parse_size(max_memory, "--max-memory") if max_memory is not None else None
    device = _resolve_device(device)
    plan, sources = prepare(recipe, seed, stage_outputs)
    check_output(out, sources, overwrite)
    for warning in plan.warnings:
        log.warning(warning)
    layout = plan_layout(plan.jobs, shard_bytes)
    staging = finish.staging_folder(out)
    stamp = journal.fingerprint(plan, layout, sources)
    # One writer per output: a second merge into `out` must neither discard nor resume the
    # staging folder of one still running, so the lock comes before the folder is touched.
    writer_lock = lock_output(out)
    try:
        # The merge that held the lock until now may have just published `out`.
        finish.check_output_target(out, overwrite)
        reused: set[str] = set()
        resuming = resume and staging.is_dir()
        if resuming:
            reused = journal.reusable_tensors(staging, stamp, layout)
            log.warning(
                "resuming: %d of %d tensors already done and intact", len(reused), len(plan.jobs)
            )
        elif staging.exists():
            log.warning("discarding the partial merge in %s (use --resume to continue it)", staging)
            shutil.rmtree(staging)
        staging.mkdir(parents=True, exist_ok=True)
        progress_log = journal.Journal(staging, stamp)
        try:
            if resuming:
                progress_log.reopen()
            else:
                progress_log.start()
            writer = TensorWriter(staging, layout, keep_existing=resuming)
            try:
                todo = [job for job in plan.jobs if job.name not in reused]
                counter = ProgressCounter(len(plan.jobs), todo, sources, progress)

                def write(job, tensor) -> None:
                    progress_log.record(job.name, writer.write(job.name, tensor))

                options = EngineOptions(
                    threads=threads or os.cpu_count() or 1,
                    max_memory=memory_bytes,
                    device=device,
                    allow_nonfinite=allow_nonfinite,
                )
                counter.start()
                if backend == "ray":
                    from mergesmith.backends.ray_driver import RayRun, run_on_ray

                    # The driver created the shards (TensorWriter above); workers fill them.
                    ray_run = RayRun(
                        plan=plan,
                        layout=layout,
                        sources=sources,
                        staging=staging,
                        fingerprint=stamp,
                        shard_bytes=shard_bytes,
                        address=address,
                        task_size=task_size,
                        threads=threads,
                        max_memory=memory_bytes,
                        allow_nonfinite=allow_nonfinite,
                        stage_outputs=stage_outputs,
                    )
                    run_on_ray(ray_run, todo, progress_log.record, on_done=counter.job_done)
                else:
                    run_jobs(plan, sources, write, options, jobs=todo, on_done=counter.job_done)
                writer.wait()
            finally:
                writer.close()
                progress_log.close()
            index = layout.index_json()
            if index is not None:
                metadata.write_text(staging / "model.safetensors.index.json", index)
            metadata.write_config(plan, sources, staging)
            metadata.write_tokenizer(plan, staging)
            metadata.write_card(plan, staging)
            finish.verify(staging, layout)
            missing = sorted({job.name for job in plan.jobs} - journal.recorded(staging))
            if missing:
                raise MergeError(
                    f"{staging}: {len(missing)} tensor(s) were never written, e.g. '{missing[0]}'",
                    "run again with --resume",
                )
            progress_log.remove()
            finish.publish(staging, out, overwrite)
        except BaseException as exc:
            finish.strip_to_resumable(staging, layout, journal.JOURNAL_FILE)
            if not isinstance(exc, OSError) or exc.errno not in NO_SPACE:
                raise
            raise MergeError(
                f"{exc.filename or staging}: {os.strerror(exc.errno)} while writing the output",
                "free disk space, then run again with --resume",
            ) from None
        finally:
            for source in sources.values():
                source.close()
    finally:
        writer_lock.release()

    return MergeResult(
        out_dir=out,
        tensors=len(plan.jobs),
        bytes_written=plan.total_bytes,
        seconds=time.perf_counter() - started,
        seed=seed,
        files=sorted(p.name for p in out.iterdir()),
        warnings=list(plan.warnings),
    )


def _resolve_device(device: str) -> str:
    if device not in ("cpu", "cuda", "auto") and not device.startswith("cuda:"):
        raise MergeError(f"--device: unknown device '{device}'", "use cpu, cuda or auto")
    if device == "cpu":
        return device
    import torch

    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available():
        raise MergeError(f"--device {device}: no CUDA GPU is available", "use --device cpu")
    return device


def check_output(out_dir: str | Path, sources: dict[str, ModelSource], overwrite: bool) -> None:
    """The output folder must be new (or replaceable) and must not overlap any input model."""
    from mergesmith.output.finish import check_output_target

    out = Path(out_dir).expanduser().absolute()
    # Overlap first: for an input folder, "not empty, use --overwrite" would be a harmful hint.
    for ref, source in sources.items():
        folder = source.folder.absolute()
        if Path(ref).expanduser().is_file():
            # A model given as a file: only that file (and any folder holding it) is off limits;
            # a sibling output folder is fine.
            overlaps = any(out == f.absolute() or out in f.absolute().parents for f in source.files)
        else:
            overlaps = out == folder or out in folder.parents or folder in out.parents
        if overlaps:
            raise MergeError(
                f"output folder '{out}' overlaps input model '{ref}' ({folder})",
                "write the merge to a new folder",
            )
    check_output_target(out, overwrite)
