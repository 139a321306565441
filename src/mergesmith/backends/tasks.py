"""How a distributed run cuts the plan's jobs into tasks: plain data, no Ray, so the driver, the
tests and the cluster simulation in bench/ all use the same cut.

A task is a run of jobs of one output shard, in the shard's byte order, up to a target size of
output. Tasks are the unit a cluster schedules, retries after a failure, and journals: larger
ones cost less dispatch, smaller ones balance better and lose less to a lost node. Output bytes
never depend on the cut (each tensor has its own place in the layout).
"""

from __future__ import annotations

from dataclasses import dataclass

from mergesmith.output.layout import OutputLayout
from mergesmith.plan import TensorJob

# Default task size: about four tasks per worker slot, so one slow task leaves little tail...
TASKS_PER_SLOT = 4
# ...but not below this (dispatch and re-reading headers would dominate tiny tasks)...
MIN_TASK_BYTES = 1 << 20
# ...nor above this (a retried task repeats at most this much work).
MAX_TASK_BYTES = 1 << 30


@dataclass(frozen=True)
class Task:
    """Jobs one worker runs in turn, and what the scheduler must know to place it."""

    shard: int
    names: tuple[str, ...]
    memory: int  # working memory at its peak: the largest of its jobs (they run one at a time)
    out_bytes: int
    first_index: int  # plan index of its first job, for a stable order

    @property
    def label(self) -> str:
        """How messages name the task: its first tensor, and how many follow."""
        more = f" and {len(self.names) - 1} more" if len(self.names) > 1 else ""
        return f"'{self.names[0]}'{more}"


def default_task_bytes(total_out_bytes: int, slots: int) -> int:
    """Output bytes per task when the user gives no --task-size."""
    target = total_out_bytes // max(1, TASKS_PER_SLOT * slots)
    return max(MIN_TASK_BYTES, min(MAX_TASK_BYTES, target))


def group_jobs(layout: OutputLayout, jobs: list[TensorJob], task_bytes: int) -> list[Task]:
    """Cut `jobs` into tasks of at most `task_bytes` of output (a larger job is a task alone),
    never across shards, in the order of each shard's bytes."""
    by_name = {job.name: job for job in jobs}
    tasks: list[Task] = []
    for number, shard in enumerate(layout.shards):
        run: list[TensorJob] = []
        size = 0
        for name in shard.tensor_names:
            job = by_name.get(name)
            if job is None:
                continue  # done by an earlier, interrupted run
            if run and size + job.out_bytes > task_bytes:
                tasks.append(_task(number, run))
                run, size = [], 0
            run.append(job)
            size += job.out_bytes
        if run:
            tasks.append(_task(number, run))
    return tasks


def _task(shard: int, jobs: list[TensorJob]) -> Task:
    return Task(
        shard=shard,
        names=tuple(job.name for job in jobs),
        memory=max(job.work_bytes for job in jobs),
        out_bytes=sum(job.out_bytes for job in jobs),
        first_index=min(job.index for job in jobs),
    )


def largest_first(tasks: list[Task]) -> list[Task]:
    """Submission order: the biggest tasks start first so that none ends the merge alone, as
    the local engine orders its jobs."""
    return sorted(tasks, key=lambda t: (-t.out_bytes, -t.memory, t.first_index))
