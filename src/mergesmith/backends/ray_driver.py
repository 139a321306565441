"""The driver of the Ray backend: the plan's jobs as tasks on a Ray cluster.

`merge()` plans, takes the output lock and creates the shards at their final sizes exactly as
for the local backend, then hands the jobs to `run_on_ray` instead of the thread pool. Here they
are cut into tasks (backends/tasks.py), checked against the cluster's nodes (a task that no node
can hold fails now, with a MergeError, instead of waiting forever), and submitted, each declaring
one CPU and the working memory the plan gives its largest job. Workers (backends/ray_task.py)
write into the shared shards; each finished task's checksums come back here and go into the
progress journal, so `--resume` works as it does locally. Index, config, tokenizer and card, the
checks and the atomic rename stay with `merge()`.

Ray retries a task whose worker process or node died (MAX_RETRIES times); a task that raised is
not retried, since planning and computing are deterministic and would fail again.
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mergesmith.backends.ray_task import WorkSpec, input_files, run_task
from mergesmith.backends.tasks import Task, default_task_bytes, group_jobs, largest_first
from mergesmith.errors import MergeError
from mergesmith.output.layout import OutputLayout
from mergesmith.plan import Plan, TensorJob
from mergesmith.sources.base import ModelSource
from mergesmith.units import parse_size

log = logging.getLogger("mergesmith")

# Retries of a task whose worker process or node died (Ray's own count; exceptions never retry).
MAX_RETRIES = 3
# How long one wait for a finished task may block, so Ctrl-C and SIGTERM are seen promptly.
WAIT_S = 0.5
# The object store of a local instance: tasks exchange only a recipe and checksums.
LOCAL_OBJECT_STORE = 128 << 20
RESUME_HINT = "then run the same command with --resume to keep the tensors already written"


@dataclass(frozen=True)
class RayRun:
    """One merge's work for the cluster, besides its jobs."""

    plan: Plan
    layout: OutputLayout
    sources: Mapping[str, ModelSource]
    staging: Path
    fingerprint: str
    shard_bytes: int
    address: str | None  # None: start a local Ray instance for this merge
    task_size: str | int | None  # output per task, "64MB" (None: from the plan and the CPUs)
    threads: int | None  # tasks in flight at most (None: as many as the cluster places)
    max_memory: int | None  # working memory of the tasks in flight together
    allow_nonfinite: bool
    stage_outputs: Mapping[str, Path] | None = None  # a pipeline stage: the earlier ones


def run_on_ray(
    run: RayRun,
    jobs: list[TensorJob],
    record: Callable[[str, int], None],
    on_done: Callable[[TensorJob], None] | None = None,
) -> None:
    """Run `jobs` on the cluster; `record(name, crc)` and then `on_done(job)` are called here,
    in this thread, for each tensor of each task that finished."""
    if not jobs:
        return
    import ray

    started_here = _connect(ray, run.address, run.threads)
    try:
        nodes = _alive_nodes(ray)
        slots = run.threads or max(1, int(sum(n.get("CPU", 0) for n in nodes)))
        total = sum(job.out_bytes for job in jobs)
        task_bytes = (
            parse_size(run.task_size, "--task-size")
            if run.task_size is not None
            else default_task_bytes(total, slots)
        )
        tasks = largest_first(group_jobs(run.layout, jobs, task_bytes))
        _check_fits(jobs, nodes)
        log.info("ray: %d tensors in %d tasks on %d nodes", len(jobs), len(tasks), len(nodes))
        _submit_and_collect(ray, run, tasks, {job.name: job for job in jobs}, record, on_done)
    finally:
        if started_here:
            ray.shutdown()


def work_spec(run: RayRun) -> WorkSpec:
    from mergesmith import __version__

    return WorkSpec(
        recipe_text=run.plan.recipe.text,
        seed=run.plan.seed,
        shard_bytes=run.shard_bytes,
        cwd=os.getcwd(),
        staging=str(run.staging),
        fingerprint=run.fingerprint,
        inputs=input_files(run.sources),
        version=__version__,
        allow_nonfinite=run.allow_nonfinite,
        # As given: the worker resolves relative paths from the same working directory.
        stage_outputs=tuple(
            (name, str(folder)) for name, folder in sorted((run.stage_outputs or {}).items())
        ),
    )


def _connect(ray: Any, address: str | None, threads: int | None) -> bool:
    """Connect to the cluster at `address`, or start a local instance; True if this call
    connected (and so must disconnect). A caller that already called ray.init() keeps its
    connection."""
    if ray.is_initialized():
        return False
    quiet: dict[str, Any] = {"logging_level": logging.WARNING, "log_to_driver": False}
    # ray.init replaces the SIGTERM handler with one that exits at once; the CLI's own turns
    # SIGTERM into an orderly stop that keeps the partial merge for --resume.
    in_main = threading.current_thread() is threading.main_thread()
    previous = signal.getsignal(signal.SIGTERM) if in_main else None
    # Ray announces its (default, secure) token mode when it starts a local instance: noise
    # on a merge's stderr, for an instance that lives as long as the merge.
    announcer = logging.getLogger("ray._private.authentication.authentication_token_setup")
    announcer_level = announcer.level
    announcer.setLevel(logging.ERROR)
    try:
        if address is None:
            ray.init(
                address="local",
                num_cpus=threads,
                include_dashboard=False,
                object_store_memory=LOCAL_OBJECT_STORE,
                **quiet,
            )
        else:
            ray.init(address=address, **quiet)
    except Exception as exc:
        where = f"the Ray cluster at '{address}'" if address else "a local Ray instance"
        raise MergeError(
            f"--backend ray: cannot connect to {where} ({type(exc).__name__}: {_first_line(exc)})",
            "start a cluster with `ray start --head` and pass --address auto (or its address), "
            "or leave out --address to start a local instance; a cluster with token "
            "authentication also needs RAY_AUTH_MODE=token and its token (~/.ray/auth_token)",
        ) from None
    finally:
        announcer.setLevel(announcer_level)
        if in_main and previous is not None:
            signal.signal(signal.SIGTERM, previous)
    return True


def _alive_nodes(ray: Any) -> list[dict[str, float]]:
    """The total resources of each live node."""
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


def _check_fits(jobs: list[TensorJob], nodes: list[dict[str, float]]) -> None:
    """Fail now, not by waiting forever, when some job fits on no node of the cluster."""
    usable = [node for node in nodes if node.get("CPU", 0) >= 1]
    if not usable:
        raise MergeError(
            "--backend ray: the Ray cluster has no node with a CPU to run tasks on",
            "add worker nodes (`ray start --address ...` on each), or check `ray status`",
        )
    room = max(int(node.get("memory", 0)) for node in usable)
    largest = max(jobs, key=lambda job: (job.work_bytes, -job.index))
    if largest.work_bytes > room:
        raise MergeError(
            f"tensor '{largest.name}' needs {_gb(largest.work_bytes)} of working memory, more "
            f"than any node of the Ray cluster offers (at most {_gb(room)})",
            "add a node with more memory (Ray's `memory` resource: `ray start --memory`), or "
            "merge with the local backend on a machine that has it",
        )


def _submit_and_collect(
    ray: Any,
    run: RayRun,
    tasks: list[Task],
    jobs: dict[str, TensorJob],
    record: Callable[[str, int], None],
    on_done: Callable[[TensorJob], None] | None,
) -> None:
    """Keep tasks in flight within --threads and --max-memory (no limit without them: Ray
    places them by their CPUs and memory), and journal each as it finishes."""
    spec = ray.put(work_spec(run))
    remote = ray.remote(run_task)
    queue = list(tasks)
    pending: dict[Any, Task] = {}
    used = 0

    def admits(task: Task) -> bool:
        if run.threads is not None and len(pending) >= run.threads:
            return False
        # As locally: a task larger than the budget runs alone.
        return run.max_memory is None or not pending or used + task.memory <= run.max_memory

    try:
        while queue or pending:
            while queue and admits(queue[0]):
                task = queue.pop(0)
                ref = remote.options(
                    num_cpus=1,
                    memory=task.memory or None,
                    max_retries=MAX_RETRIES,
                    retry_exceptions=False,
                    # Ray's default fills the driver's node first; a merge is bound by reads,
                    # so spreading uses every node's network and disks from the start.
                    scheduling_strategy="SPREAD",
                    name=f"mergesmith {task.label}",
                ).remote(spec, task.names)
                pending[ref] = task
                used += task.memory
            ready, _ = ray.wait(list(pending), num_returns=1, timeout=WAIT_S)
            for ref in ready:
                task = pending.pop(ref)
                used -= task.memory
                for name, crc in _result(ray, ref, task):
                    record(name, crc)
                    if on_done is not None:
                        on_done(jobs[name])
    except BaseException:
        # Ctrl-C, SIGTERM or a failed task: stop the others. Their tensors were not journaled,
        # so --resume computes them again.
        for ref in pending:
            try:
                ray.cancel(ref, force=True)
            except Exception:  # already finished, or the cluster is gone
                log.debug("ray: could not cancel a task", exc_info=True)
        raise


def _result(ray: Any, ref: Any, task: Task) -> list[tuple[str, int]]:
    """A finished task's checksums, or its failure as a MergeError (or, for a bug in
    mergesmith, an internal error with the worker's traceback)."""
    errors = ray.exceptions
    try:
        return ray.get(ref)
    except errors.RayTaskError as exc:
        cause = exc.cause
        if isinstance(cause, MergeError):
            raise MergeError(cause.message, cause.hint) from None
        if isinstance(cause, ImportError):
            raise MergeError(
                f"tensors {task.label}: a worker cannot import mergesmith ({cause})",
                "pip install 'mergesmith[ray]' (the driver's version) on every node",
            ) from None
        raise RuntimeError(
            f"tensors {task.label} failed on a worker:\n{exc.traceback_str}"
        ) from None
    except errors.OutOfMemoryError:
        raise MergeError(
            f"tensors {task.label}: Ray stopped the task, its node ran out of memory",
            "give the nodes more memory or run fewer tasks at once (--threads); " + RESUME_HINT,
        ) from None
    except errors.RayError as exc:
        raise MergeError(
            f"tensors {task.label}: the task was lost {MAX_RETRIES + 1} times "
            f"({type(exc).__name__}: {_first_line(exc)})",
            "check the cluster (`ray status`, the logs in /tmp/ray/session_latest/logs on its "
            "nodes); " + RESUME_HINT,
        ) from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else "no message"


def _gb(size: int) -> str:
    return f"{size / 1e9:.2f} GB" if size >= 10**7 else f"{size / 1e6:.2f} MB"
