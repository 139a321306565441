"""A SIMULATION (not a measurement) of the Ray backend on a cluster we do not have: a 405B merge
(Llama-3.1-405B shapes, base + 3 fine-tunes, TIES, bf16) on 1 to 64 nodes.

What is real: the plan and the task cut. The 405B models are written as headers over sparse
files (no disk used), so `prepare()` plans the actual jobs (names, shapes, working memory),
`plan_layout` the actual 5 GB shards, and `mergesmith.backends.tasks` the tasks the driver would
submit. What is replayed: each job's compute time, measured on this machine per tensor kind by
profile_jobs.py (seconds per output element, one thread) on the benchmark models, and each job's
bytes (inputs read, output written). What is modelled: the scheduler (tasks largest first, each
placed on the node with the most free CPUs that has the memory, as Ray places one-CPU tasks) and
I/O: a job reads its inputs, computes, then writes (one thread: no overlap), and the bytes in
flight share each node's network limit and the storage's aggregate bandwidth, max-min fairly.
Fixed costs (starting workers, planning from the headers, dispatching a task) are measured.

Usage: python bench/simulate_ray.py PROFILE.json OUT.json [--cores 32] [--node-memory 180GB]
       [--network 25Gbit] [--storage 20GB] [--overhead-json bench/results/ray/overheads.json]
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import statistics
import struct
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from make_models import ModelSpec, config_json, tensor_shapes

from mergesmith.api import prepare
from mergesmith.backends.tasks import default_task_bytes, group_jobs, largest_first
from mergesmith.output.layout import OutputLayout, plan_layout
from mergesmith.plan import TensorJob

# Llama-3.1-405B (config.json of meta-llama/Llama-3.1-405B).
LLAMA_405B = ModelSpec(
    hidden=16384, intermediate=53248, layers=126, heads=128, kv_heads=8, vocab=128256
)
NODES = (1, 2, 4, 8, 16, 32, 64)
SHARD_BYTES = 5 * 10**9
UNLIMITED = 1e30  # bytes/s: inputs in page cache (finite, so that 0 x rate stays 0)
TAIL_BELOW = 0.6  # no ceiling used more than this share: the largest tasks decide
DENSITIES = (0.5, 0.5, 0.3)
WEIGHTS = (1.0, 0.5, 0.7)


def sparse_model(folder: Path, spec: ModelSpec) -> None:
    """A bf16 model of these shapes: a real safetensors header over a sparse file, so planning
    (headers only) works and no disk is used."""
    folder.mkdir(parents=True)
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, shape in tensor_shapes(spec):
        size = math.prod(shape) * 2
        header[name] = {
            "dtype": "BF16",
            "shape": list(shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(folder / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        fh.truncate(8 + len(text) + offset)
    (folder / "config.json").write_text(json.dumps(config_json(spec)))


def ties_recipe(base: Path, tuned: list[Path]) -> str:
    lines = ["merge_method: ties", f"base_model: {base}", "models:", f"  - model: {base}"]
    for i, model in enumerate(tuned):
        lines += [
            f"  - model: {model}",
            f"    parameters: {{density: {DENSITIES[i]}, weight: {WEIGHTS[i]}}}",
        ]
    lines += ["parameters: {normalize: true, int8_mask: true}", "dtype: bfloat16", ""]
    return "\n".join(lines)


def kind(name: str) -> str:
    """A tensor's kind: its name without the layer number."""
    return re.sub(r"layers\.\d+\.", "", name)


def seconds_per_element(profile: dict) -> dict[str, float]:
    """Per tensor kind, the median over layers of measured seconds per output element."""
    by_kind: dict[str, list[float]] = defaultdict(list)
    for job in profile["jobs"]:
        by_kind[kind(job["name"])].append(job["seconds"] / job["numel"])
    return {k: statistics.median(v) for k, v in by_kind.items()}


@dataclass
class Cluster:
    nodes: int
    cores: int
    memory: int  # bytes of Ray `memory` resource per node
    network: float  # bytes/s per node, reads and writes together
    storage: float  # bytes/s, all nodes together
    worker_start_s: float  # a worker process imports mergesmith and plans from the headers
    task_overhead_s: float  # dispatching a task and checking the fingerprint


@dataclass
class SimTask:
    phases: list[tuple[str, float]]  # ("io", bytes) or ("cpu", seconds), in order
    memory: int
    node: int = -1
    phase: int = 0
    left: float = 0.0
    done_at: float = 0.0
    cpu_s: float = field(default=0.0)
    io_bytes: float = field(default=0.0)


def build_tasks(
    jobs: list[TensorJob],
    layout: OutputLayout,
    task_bytes: int,
    job_seconds: Callable[[TensorJob], float],
    task_s: float,
) -> list[SimTask]:
    """The driver's tasks (the same cut, in the same order), each a sequence of phases: a
    fixed cost, then per job its reads, its compute and its write."""
    by_name = {job.name: job for job in jobs}
    tasks = []
    for task in largest_first(group_jobs(layout, jobs, task_bytes)):
        phases: list[tuple[str, float]] = [("cpu", task_s)]
        for name in task.names:
            job = by_name[name]
            read = sum(1 for inp in (job.base, *job.inputs) if inp is not None) * job.out_bytes
            phases += [("io", float(read)), ("cpu", job_seconds(job)), ("io", float(job.out_bytes))]
        sim = SimTask(phases, task.memory)
        sim.cpu_s = sum(v for k, v in phases if k == "cpu")
        sim.io_bytes = sum(v for k, v in phases if k == "io")
        tasks.append(sim)
    return tasks


def io_rates(active: list[SimTask], cluster: Cluster) -> dict[int, float]:
    """Max-min fair bandwidth of each task in an I/O phase, under each node's network limit
    and the storage's aggregate one (water-filling: the busiest nodes saturate first)."""
    per_node = Counter(t.node for t in active)
    share = math.inf
    if len(per_node) * cluster.network > cluster.storage:
        left, rest = cluster.storage, sum(per_node.values())
        for n in sorted(per_node.values(), reverse=True):
            if cluster.network / n <= left / rest:
                left, rest = left - cluster.network, rest - n
            else:
                share = left / rest
                break
    return {id(t): min(cluster.network / per_node[t.node], share) for t in active}


@dataclass
class Outcome:
    wall_s: float
    # Share of each ceiling's capacity used over the whole run.
    utilization: dict[str, float]

    @property
    def binding(self) -> str:
        """The ceiling used most; when none is used much, the run waits on its largest tasks
        (a tail no added node shortens)."""
        name = max(self.utilization, key=self.utilization.__getitem__)
        return name if self.utilization[name] >= TAIL_BELOW else "largest tasks (tail)"


def simulate(tasks: list[SimTask], cluster: Cluster) -> Outcome:
    """The merge's wall time and what it used: event-driven, fluid I/O sharing."""
    free_cpu = [cluster.cores] * cluster.nodes
    free_mem = [cluster.memory] * cluster.nodes
    queue = list(tasks)
    running: list[SimTask] = []
    now = cluster.worker_start_s
    for t in queue:
        t.phase, t.left = 0, t.phases[0][1]

    def place() -> None:
        i = 0
        while i < len(queue):
            t = queue[i]
            fits = [n for n in range(cluster.nodes) if free_cpu[n] and free_mem[n] >= t.memory]
            if not fits:
                i += 1
                if not any(free_cpu):
                    return
                continue
            node = max(fits, key=lambda n: (free_cpu[n], -n))
            free_cpu[node] -= 1
            free_mem[node] -= t.memory
            t.node = node
            running.append(queue.pop(i))

    place()
    computing = moved = 0.0  # core-seconds of compute, bytes moved
    while running:
        io = [t for t in running if t.phases[t.phase][0] == "io"]
        rates = io_rates(io, cluster) if io else {}
        speed = {id(t): rates.get(id(t), 1.0) for t in running}  # a compute phase holds a core
        ends = {id(t): t.left / speed[id(t)] for t in running}
        step = min(ends.values())
        now += step
        computing += step * (len(running) - len(io))
        moved += step * sum(rates.values())
        finished = []
        for t in running:
            if ends[id(t)] <= step * (1 + 1e-9):
                t.phase += 1
                # Zero-length phases (a tiny tensor's I/O at the end of a step) end with it.
                while t.phase < len(t.phases) and t.phases[t.phase][1] == 0:
                    t.phase += 1
                if t.phase == len(t.phases):
                    finished.append(t)
                else:
                    t.left = t.phases[t.phase][1]
            else:
                t.left -= step * speed[id(t)]
        for t in finished:
            running.remove(t)
            t.done_at = now
            free_cpu[t.node] += 1
            free_mem[t.node] += t.memory
        if finished:
            place()
    if queue:
        raise SystemExit("a task fits on no node: raise --node-memory")
    busy = max(now - cluster.worker_start_s, 1e-9)
    return Outcome(
        now,
        {
            "compute (cores)": computing / (busy * cluster.nodes * cluster.cores),
            "node network": moved / (busy * cluster.nodes * cluster.network),
            "storage bandwidth": moved / (busy * cluster.storage),
        },
    )


def bounds(tasks: list[SimTask], cluster: Cluster) -> dict[str, float]:
    """Lower bounds on the wall time: each ceiling alone."""
    total_cpu = sum(t.cpu_s for t in tasks)
    total_io = sum(t.io_bytes for t in tasks)
    longest = max(t.cpu_s + t.io_bytes / min(cluster.network, cluster.storage) for t in tasks)
    return {
        "compute (cores)": total_cpu / (cluster.nodes * cluster.cores),
        "node network": total_io / (cluster.nodes * cluster.network),
        "storage bandwidth": total_io / cluster.storage,
        "largest task": longest,
    }


def validate(profile: dict, start_s: float, task_s: float) -> dict[str, dict[str, float]]:
    """The simulator on what was measured: the benchmark merge on this machine (one node, 1
    or 2 cores, inputs in page cache: no bandwidth limit), with each job's measured time."""
    plan, sources = prepare(Path(profile["recipe"]))
    layout = plan_layout(plan.jobs, SHARD_BYTES)
    for source in sources.values():
        source.close()
    measured = {job["name"]: job["seconds"] for job in profile["jobs"]}
    total = sum(job.out_bytes for job in plan.jobs)
    found = {}
    for cores in (1, 2):
        tasks = build_tasks(
            plan.jobs, layout, default_task_bytes(total, cores), lambda j: measured[j.name], task_s
        )
        cluster = Cluster(1, cores, 1 << 60, UNLIMITED, UNLIMITED, start_s, task_s)
        label = "ray, 1 worker" if cores == 1 else "ray, 2 workers"
        found[label] = {"simulated_s": simulate(tasks, cluster).wall_s}
    return found


def parse_rate(text: str) -> float:
    """25Gbit -> bytes/s; 20GB -> bytes/s."""
    match = re.fullmatch(r"([0-9.]+)\s*(gbit|gb|mb)", text.strip().lower())
    if not match:
        raise SystemExit(f"not a rate: {text} (write 25Gbit or 20GB)")
    value, unit = float(match.group(1)), match.group(2)
    return value * {"gbit": 1e9 / 8, "gb": 1e9, "mb": 1e6}[unit]


def main() -> None:
    parser = argparse.ArgumentParser(description="Simulated 405B merge on 1-64 Ray nodes.")
    parser.add_argument("profile", type=Path, help="profile_jobs.py output (measured)")
    parser.add_argument("out", type=Path)
    parser.add_argument("--cores", type=int, default=32)
    parser.add_argument("--node-memory", default="180GB", help="Ray memory resource per node")
    parser.add_argument("--network", default="25Gbit", help="per node")
    parser.add_argument("--storage", default="20GB", help="aggregate, all nodes")
    parser.add_argument("--also-storage", default="100GB", help="a second run: faster storage")
    parser.add_argument("--overheads", type=Path, help="measured fixed costs (bench_ray.py)")
    args = parser.parse_args()

    profile = json.loads(args.profile.read_text())
    rate = seconds_per_element(profile)
    overheads = json.loads(args.overheads.read_text()) if args.overheads else {}
    root = Path(tempfile.mkdtemp(prefix="sim405b-"))
    try:
        for name in ("base", "ft1", "ft2", "ft3"):
            sparse_model(root / name, LLAMA_405B)
        recipe = ties_recipe(root / "base", [root / f"ft{i}" for i in (1, 2, 3)])
        started = time.perf_counter()
        plan, sources = prepare(recipe)
        plan_s = time.perf_counter() - started
        layout = plan_layout(plan.jobs, SHARD_BYTES)
        for source in sources.values():
            source.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)

    memory = int(float(re.sub("[^0-9.]", "", args.node_memory)) * 1e9)
    start_s = overheads.get("worker_start_s", 3.0) + plan_s
    task_s = overheads.get("task_overhead_s", 0.01)
    results = {"rates_s_per_element": rate, "plan_s": plan_s, "rows": {}}
    rows = []
    for storage in (parse_rate(args.storage), parse_rate(args.also_storage)):
        for n in NODES:
            cluster = Cluster(
                nodes=n,
                cores=args.cores,
                memory=memory,
                network=parse_rate(args.network),
                storage=storage,
                worker_start_s=start_s,
                task_overhead_s=task_s,
            )
            total = sum(job.out_bytes for job in plan.jobs)
            task_bytes = default_task_bytes(total, n * args.cores)
            tasks = build_tasks(
                plan.jobs, layout, task_bytes, lambda j: rate[kind(j.name)] * j.numel, task_s
            )
            outcome = simulate(tasks, cluster)
            rows.append(
                {
                    "nodes": n,
                    "storage_gb_s": storage / 1e9,
                    "tasks": len(tasks),
                    "task_bytes": task_bytes,
                    "wall_s": outcome.wall_s,
                    "utilization": outcome.utilization,
                    "lower_bounds_s": bounds(tasks, cluster),
                    "binding": outcome.binding,
                }
            )
            used = ", ".join(f"{k} {v:.0%}" for k, v in outcome.utilization.items())
            print(
                f"[sim] storage {storage / 1e9:.0f} GB/s, {n:2d} nodes: {outcome.wall_s:6.0f} s, "
                f"{len(tasks)} tasks; {used}; binds: {outcome.binding}",
                flush=True,
            )
    results["rows"] = rows
    results["validation"] = validate(profile, start_s - plan_s, task_s)
    results["cluster"] = {
        "cores_per_node": args.cores,
        "node_memory": args.node_memory,
        "network_per_node": args.network,
        "storage": [args.storage, args.also_storage],
        "worker_start_s": start_s,
        "task_overhead_s": task_s,
        "jobs": len(plan.jobs),
        "output_bytes": sum(job.out_bytes for job in plan.jobs),
        "largest_job_work_bytes": max(job.work_bytes for job in plan.jobs),
        "shards": len(layout.shards),
    }
    args.out.write_text(json.dumps(results, indent=1) + "\n")


if __name__ == "__main__":
    main()
