"""Time every job of a recipe as one Ray worker runs it: the local engine on one thread, jobs one
after another, each written at its offset. The per-job seconds and bytes feed the cluster
simulation (simulate_ray.py), which replays them through the Ray backend's task cut.

Run as a child of bench_ray.py (it imports torch; the benchmark driver does not).

Usage: python bench/profile_jobs.py RECIPE OUT.json [--seed S] [--repeat N]
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

from mergesmith.api import prepare
from mergesmith.backends.tasks import default_task_bytes, group_jobs
from mergesmith.engine import EngineOptions, run_jobs
from mergesmith.output.layout import plan_layout
from mergesmith.output.writer import TensorWriter
from mergesmith.progress import job_read_bytes


def profile(recipe: Path, seed: int) -> list[dict[str, object]]:
    plan, sources = prepare(recipe, seed)
    layout = plan_layout(plan.jobs, 5 * 10**9)
    folder = Path(tempfile.mkdtemp(prefix="profile-jobs-"))
    times: dict[str, float] = {}
    try:
        writer = TensorWriter(folder, layout)
        last = time.perf_counter()

        def done(job) -> None:
            # One thread: a job ends, the next starts.
            nonlocal last
            now = time.perf_counter()
            times[job.name] = now - last
            last = now

        def write(job, tensor) -> None:
            writer.write(job.name, tensor)

        run_jobs(plan, sources, write, EngineOptions(threads=1), on_done=done)
        writer.close()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
    return [
        {
            "name": job.name,
            "shape": list(job.shape),
            "numel": job.numel,
            "dtype": job.dtype,
            "out_bytes": job.out_bytes,
            "read_bytes": job_read_bytes(job, sources),
            "work_bytes": job.work_bytes,
            "seconds": times[job.name],
        }
        for job in plan.jobs
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("recipe", type=Path)
    parser.add_argument("out", type=Path)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeat", type=int, default=3, help="keep each job's fastest time")
    args = parser.parse_args()
    runs = [profile(args.recipe, args.seed) for _ in range(args.repeat)]
    jobs = runs[0]
    for job in jobs:
        job["seconds"] = min(
            next(j["seconds"] for j in run if j["name"] == job["name"]) for run in runs
        )
    result = {"recipe": str(args.recipe), "jobs": jobs, "tasks": task_counts(args.recipe)}
    args.out.write_text(json.dumps(result, indent=1) + "\n")


def task_counts(recipe: Path) -> dict[int, int]:
    """How many tasks the Ray driver cuts this plan into by default, for 1 and 2 slots."""
    plan, sources = prepare(recipe)
    layout = plan_layout(plan.jobs, 5 * 10**9)
    total = sum(job.out_bytes for job in plan.jobs)
    for source in sources.values():
        source.close()
    return {
        slots: len(group_jobs(layout, plan.jobs, default_task_bytes(total, slots)))
        for slots in (1, 2)
    }


if __name__ == "__main__":
    main()
