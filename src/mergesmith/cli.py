"""The `mergesmith` command. A thin layer on `mergesmith.api`; imports stay lazy so that
`mergesmith --help` answers at once."""

from __future__ import annotations

import gc
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable
from typing import Any

import click

EXIT_USER_ERROR = 2
EXIT_INTERNAL = 1


def _tune_process_for_one_merge() -> None:
    """Settings for a process that imports torch, merges once and exits."""
    # Importing torch alone triggers dozens of full cyclic-GC passes; the merge frees its
    # memory by reference counting, so the collector only costs time here.
    gc.disable()
    # numpy's OpenBLAS starts a spinning thread per core at import; a merge never calls BLAS,
    # and those threads would compete with the merge's own workers.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def _fail(error: BaseException, debug: bool) -> None:
    from mergesmith.errors import MergeError, MergeErrors

    if debug:
        traceback.print_exception(error)
    if isinstance(error, MergeErrors) and len(error.errors) > 1:
        click.echo(f"error: {len(error.errors)} problems found:", err=True)
        for problem in error.errors:
            click.echo(f"error: {problem.message}", err=True)
            if problem.hint:
                click.echo(f"  hint: {problem.hint}", err=True)
        sys.exit(EXIT_USER_ERROR)
    if isinstance(error, MergeError):
        click.echo(f"error: {error.message}", err=True)
        if error.hint:
            click.echo(f"  hint: {error.hint}", err=True)
        sys.exit(EXIT_USER_ERROR)
    click.echo(
        f"internal error: {error.__class__.__name__}: {error} (run with --debug for the "
        "traceback and report it)",
        err=True,
    )
    sys.exit(EXIT_INTERNAL)


def _guarded(debug: bool, work: Callable[[], Any]) -> Any:
    def winding_down(_signum: int, _frame: Any) -> None:
        # Running jobs are finishing; a second signal must not tear the process down
        # mid-cleanup (torch's threads crash if the interpreter exits under them).
        return

    def interrupted(signum: int, _frame: Any) -> None:
        signal.signal(signal.SIGINT, winding_down)
        signal.signal(signal.SIGTERM, winding_down)
        raise KeyboardInterrupt(signal.Signals(signum).name)

    if signal.getsignal(signal.SIGINT) is not signal.SIG_IGN:
        signal.signal(signal.SIGINT, interrupted)
    signal.signal(signal.SIGTERM, interrupted)
    try:
        return work()
    except KeyboardInterrupt as exc:
        name = str(exc) or "SIGINT"
        click.echo(
            f"interrupted by {name}: nothing was published; run the same command with --resume "
            "to continue",
            err=True,
        )
        sys.exit(128 + signal.Signals[name].value)
    except SystemExit:
        raise
    except Exception as exc:
        _fail(exc, debug)


def _show_version(ctx: click.Context, _param: click.Parameter, value: bool) -> None:
    """The version, and whether merges run the C kernels (and if not, why and how to fix it)."""
    if not value or ctx.resilient_parsing:
        return
    from mergesmith import __version__
    from mergesmith.native.status import kernel_status

    click.echo(f"mergesmith {__version__}; {kernel_status()}")
    ctx.exit()


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--version",
    is_flag=True,
    expose_value=False,
    is_eager=True,
    callback=_show_version,
    help="Show the version and whether the C kernels are in use.",
)
def cli() -> None:
    """Merge fine-tuned checkpoints from mergekit YAML recipes."""


def main() -> None:
    """The `mergesmith` command: run it, then leave without tearing the interpreter down."""
    from mergesmith import deferred_torch

    # Imported on first use: a merge that the C kernels compute whole never needs it.
    deferred_torch.defer()
    try:
        cli()
        code: int | str | None = 0
    except SystemExit as done:
        code = done.code
    # With torch loaded, an orderly interpreter shutdown (a full cyclic GC and module teardown)
    # takes about 0.4 s, over a tenth of a small merge. Everything that matters is already on
    # disk (outputs are fsynced before publishing), so flush what is buffered and exit.
    if isinstance(code, str):
        click.echo(code, err=True)
        code = 1
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code or 0)


debug_option = click.option("--debug", is_flag=True, help="Show tracebacks.")
seed_option = click.option(
    "--seed", type=int, default=0, show_default=True, help="Seed for random methods."
)


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.argument("out_dir", type=click.Path(file_okay=False))
@seed_option
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Jobs in parallel (Ray: tasks in flight; default all the cluster runs).",
)
@click.option("--max-memory", default=None, help="Working memory for jobs in flight, e.g. 4GB.")
@click.option("--shard-size", default="5GB", show_default=True, help="Largest output shard.")
@click.option("--device", default="cpu", show_default=True, help="cpu, cuda or auto.")
@click.option("--overwrite", is_flag=True, help="Replace OUT_DIR if it exists.")
@click.option("--allow-nonfinite", is_flag=True, help="Merge inputs holding NaN or Inf.")
@click.option("--resume", is_flag=True, help="Continue an interrupted merge into OUT_DIR.")
@click.option(
    "--keep-stages", is_flag=True, help="Pipelines: keep the stages' outputs (.OUT.stages/)."
)
@click.option(
    "--backend",
    type=click.Choice(["local", "ray"]),
    default="local",
    show_default=True,
    help="Where jobs run: this machine's threads, or a Ray cluster (mergesmith[ray]).",
)
@click.option(
    "--address",
    default=None,
    help="Ray cluster: auto, HOST:PORT or ray://HOST:PORT (default: start a local one).",
)
@click.option("--task-size", default=None, help="Ray: output per task, e.g. 1GB.")
@click.option("--quiet", "-q", is_flag=True, help="Print only errors.")
@debug_option
def run(
    recipe: str,
    out_dir: str,
    seed: int,
    threads: int | None,
    max_memory: str | None,
    shard_size: str,
    device: str,
    overwrite: bool,
    allow_nonfinite: bool,
    resume: bool,
    keep_stages: bool,
    backend: str,
    address: str | None,
    task_size: str | None,
    quiet: bool,
    debug: bool,
) -> None:
    """Merge the models RECIPE names into OUT_DIR (a file of several named YAML documents is a
    pipeline: its stages run in order, the last into OUT_DIR)."""
    _setup_logging(quiet)
    _tune_process_for_one_merge()

    def work() -> None:
        from contextlib import nullcontext

        from mergesmith.api import merge
        from mergesmith.progress import ProgressReporter

        # Closed on every way out of the merge, so the live line never runs into the summary,
        # an error or the interruption notice.
        with nullcontext() if quiet else ProgressReporter(sys.stderr) as progress:
            result = merge(
                recipe,
                out_dir,
                seed=seed,
                threads=threads,
                max_memory=max_memory,
                shard_size=shard_size,
                device=device,
                overwrite=overwrite,
                allow_nonfinite=allow_nonfinite,
                resume=resume,
                progress=progress,
                keep_stages=keep_stages,
                backend=backend,
                address=address,
                task_size=task_size,
            )
        if not quiet:
            click.echo(
                f"merged {result.tensors} tensors ({result.bytes_written / 1e6:.1f} MB) into "
                f"{result.out_dir} in {result.seconds:.1f} s (seed {result.seed})"
            )

    _guarded(debug, work)


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@seed_option
@click.option("--plan", "show_plan", is_flag=True, help="List every output tensor's job.")
@click.option("--out", "out_dir", default=None, help="Also check this output folder.")
@debug_option
def validate(recipe: str, seed: int, show_plan: bool, out_dir: str | None, debug: bool) -> None:
    """Check RECIPE and the models' headers without reading any weights."""
    _setup_logging(False)

    def work() -> None:
        from pathlib import Path

        from mergesmith.api import check_output, prepare
        from mergesmith.config import is_pipeline

        if is_pipeline(recipe):
            from mergesmith.output.finish import check_output_target
            from mergesmith.pipeline import plan_stages

            if out_dir is not None:
                check_output_target(Path(out_dir).expanduser().absolute(), overwrite=False)
            for stage, plan in plan_stages(recipe, seed):
                _report_plan(plan, show_plan, f"{stage.label}: ")
            return
        plan, sources = prepare(recipe, seed)
        if out_dir is not None:
            check_output(out_dir, sources, overwrite=False)
            from mergesmith.output.lock import running_merge

            holder = running_merge(Path(out_dir).expanduser().absolute())
            if holder is not None:
                click.echo(
                    f"warning: a merge into '{out_dir}' is running ({holder}); "
                    "`run` into it is refused until that merge ends",
                    err=True,
                )
        _report_plan(plan, show_plan)

    _guarded(debug, work)


def _report_plan(plan: Any, show_plan: bool, label: str = "") -> None:
    """What `validate` says about one plan: warnings, the jobs if asked, the vocabulary, and
    a summary line."""
    for warning in plan.warnings:
        click.echo(f"warning: {label}{warning}", err=True)
    if show_plan:
        for job in plan.jobs:
            inputs = ", ".join(f"{i.model}:{i.name}" for i in job.inputs)
            click.echo(f"{label}{job.name} {list(job.shape)} {job.dtype} <- {inputs}")
    if plan.vocab is not None:
        vocab = plan.vocab
        padding = vocab.rows - vocab.real_rows
        click.echo(
            f"{label}vocabulary: {vocab.real_rows} tokens ({vocab.described})"
            + (f", padded to {vocab.rows} rows" if padding else "")
        )
    click.echo(
        f"{label}ok: {plan.method.name}, {len(plan.jobs)} tensors, "
        f"{plan.total_bytes / 1e6:.1f} MB to write"
    )


@cli.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "--out",
    "out_dir",
    default="analysis",
    show_default=True,
    type=click.Path(file_okay=False),
    help="Folder for report.md, analysis.json and the plots.",
)
@seed_option
@click.option("--overwrite", is_flag=True, help="Replace the --out folder if it is not empty.")
@click.option("--quiet", "-q", is_flag=True, help="Print only errors.")
@debug_option
def analyze(
    recipe: str, out_dir: str, seed: int, overwrite: bool, quiet: bool, debug: bool
) -> None:
    """Report task-vector norms, cosines, sign conflicts and trimming of RECIPE's merge, per
    layer and tensor kind, without writing a model."""
    _setup_logging(quiet)
    _tune_process_for_one_merge()

    def work() -> None:
        from mergesmith.analyze import analyze as analyze_recipe

        result = analyze_recipe(recipe, out_dir, seed=seed, overwrite=overwrite)
        if not quiet:
            click.echo(
                f"analysed {result.tensors} tensors of {len(result.models)} models in "
                f"{result.seconds:.1f} s (seed {seed}); report: {result.report}"
            )

    _guarded(debug, work)


@cli.command()
def methods() -> None:
    """List the merge methods and their parameters."""
    from mergesmith.methods.registry import all_methods

    for method in all_methods():
        random = "; draws from --seed" if method.random else ""
        click.echo(f"{method.name}: {method.description} ({_BASE_RULES[method.base]}{random})")
        for p in method.params:
            scope = "per model" if p.per_model else "global"
            default = "required" if p.required else f"default {_show(p.default)}"
            click.echo(f"    {p.name:<17} {p.kind.__name__:<6} {scope:<9} {default:<16} {p.help}")


_BASE_RULES = {
    "reference": "needs base_model",
    "optional": "base_model optional",
    "input": "no base needed",
    "input_warned": "no base: a base_model is merged as one more model",
}


def _show(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


def _setup_logging(quiet: bool) -> None:
    logging.basicConfig(
        level=logging.ERROR if quiet else logging.WARNING,
        format="warning: %(message)s",
        stream=sys.stderr,
    )


if __name__ == "__main__":
    main()
