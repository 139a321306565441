"""The Ray backend's cost on one machine, and a simulation of what it buys on a cluster.

Measured: `mergesmith run` on the benchmark models (make_models.py: base + 3 fine-tunes, 220M
parameters each, bf16; TIES as in bench_ties.py) with the local backend at 1 and 2 threads and
the Ray backend at 1 and 2 workers, on a Ray head this script starts (`ray start --head`, in a
session of its own, stopped at the end by its process id); once with one tensor per task (the
cost of a task), once starting its own local Ray instance (the cost of starting Ray). Every
output must equal the local one byte for byte.

Simulated (labelled as such): simulate_ray.py replays the per-job times measured here
(profile_jobs.py) and the fixed costs measured above through the backend's task cut, for a
405B merge on 1 to 64 nodes.

Writes bench/results/ray/latest.md and latest.json (raw logs under bench/results/ray/raw/).

Usage: python bench/bench_ray.py [--repeat 3] [--no-sim] [--max-wait-idle 30]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import re
import signal
import statistics
import subprocess
import sys
from pathlib import Path

import measure
from bench_ties import (
    CHILD_ENV,
    Case,
    ModelSet,
    busy_cpu_s,
    ensure_models,
    find_mergesmith,
    machine_info,
    read_all,
    wait_for_quiet,
    write_recipe,
)

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results" / "ray"


def start_ray_head(cpus: int, log: Path, env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    """A Ray head in a session of its own; returns it and its address."""
    ray = Path(sys.executable).parent / "ray"
    proc = subprocess.Popen(
        [
            *(str(ray), "start", "--head", "--port=0", f"--num-cpus={cpus}"),
            *("--include-dashboard=false", "--disable-usage-stats", "--block"),
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
        env=env,
    )
    address = None
    assert proc.stdout is not None
    with open(log, "w") as out:
        for line in proc.stdout:
            out.write(line)
            found = re.search(r"ray start --address='([^']+)'", line)
            address = found.group(1) if found else address
            if "block forever" in line:
                break
    if address is None:
        stop_ray_head(proc)
        raise SystemExit(f"ray start failed: see {log}")
    return proc, address


def stop_ray_head(proc: subprocess.Popen) -> None:
    """`ray start --block` stops what it started on SIGTERM; its session is ours alone."""
    proc.send_signal(signal.SIGTERM)
    try:
        proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()


def folder_digest(folder: Path) -> str:
    digest = hashlib.sha256()
    for path in sorted(folder.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=BENCH / "work")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--max-wait-idle", type=float, default=30)
    parser.add_argument("--no-sim", action="store_true")
    parser.add_argument(
        "--render", action="store_true", help="only write latest.md again from latest.json"
    )
    args = parser.parse_args()
    if args.render:
        data = json.loads((RESULTS / "latest.json").read_text())
        (RESULTS / "latest.md").write_text(render(data))
        return

    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    logs = RESULTS / "raw" / f"logs-{stamp}"
    logs.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env |= CHILD_ENV | {"PYTHONPYCACHEPREFIX": str(args.work / "pycache")}
    # Ray's token authentication (its default when ~/.ray/auth_token exists): the head and
    # every client must agree on it.
    env.setdefault("RAY_AUTH_MODE", "token")
    models = ModelSet("12 layers", 12, args.work / "models", 3)
    ensure_models(models)
    case = Case("ties", "ties", models, 3)
    write_recipe(case, args.work / "recipes" / "ray-ties.yml")
    exe = find_mergesmith(None)
    assert exe is not None, "mergesmith is not installed in this environment"
    inputs = case.inputs()
    data: dict[str, object] = {
        "started": dt.datetime.now().isoformat(timespec="seconds"),
        "machine": machine_info([]),
        "params_per_model": models.params,
        "runs": [],
    }
    data["machine"]["ray"] = subprocess.run(  # type: ignore[index]
        [sys.executable, "-c", "import ray; print(ray.__version__)"], capture_output=True, text=True
    ).stdout.strip()

    # Per-job times on one thread, as a worker runs them: the simulation's input.
    profile = RESULTS / "profile-ties-220m.json"
    read_all(inputs)
    subprocess.run(
        [sys.executable, str(BENCH / "profile_jobs.py"), str(case.recipe), str(profile)],
        check=True,
        env=env,
    )
    jobs = json.loads(profile.read_text())

    head, address = start_ray_head(2, logs / "ray-head.log", env)
    on_head = ["--backend", "ray", "--address", address]
    configs = {
        "local, 1 thread": ["--threads", "1"],
        "local, 2 threads": ["--threads", "2"],
        "ray, 1 worker": [*on_head, "--threads", "1"],
        "ray, 2 workers": [*on_head, "--threads", "2"],
        "ray, 1 worker, one tensor per task": [*on_head, "--threads", "1", "--task-size", "1"],
    }
    reference: str | None = None
    try:
        for rep in range(args.repeat):
            names = list(configs) if rep % 2 == 0 else list(reversed(configs))
            for name in names:
                run = run_one(case, exe, configs[name], name, rep, logs, env, args)
                data["runs"].append(run)  # type: ignore[attr-defined]
                reference = check_same(run, reference, args.work / "out" / "ray-bench")
    finally:
        stop_ray_head(head)
    # Starting Ray is paid by a run without --address: once.
    name = "ray, 2 workers, starting its own Ray"
    run = run_one(case, exe, ["--backend", "ray", "--threads", "2"], name, 0, logs, env, args)
    data["runs"].append(run)  # type: ignore[attr-defined]
    check_same(run, reference, args.work / "out" / "ray-bench")

    summary = summarize(data["runs"], jobs)  # type: ignore[arg-type]
    data["summary"] = summary
    overheads = RESULTS / "overheads.json"
    overheads.write_text(json.dumps(summary["overheads"], indent=1) + "\n")
    if not args.no_sim:
        sim = RESULTS / "simulation.json"
        subprocess.run(
            [
                *(sys.executable, str(BENCH / "simulate_ray.py"), str(profile), str(sim)),
                *("--overheads", str(overheads)),
            ],
            check=True,
            env=env,
        )
        data["simulation"] = json.loads(sim.read_text())
    data["finished"] = dt.datetime.now().isoformat(timespec="seconds")
    text = json.dumps(data, indent=1, default=str) + "\n"
    (RESULTS / "latest.json").write_text(text)
    (RESULTS / "raw" / f"bench-ray-{stamp}.json").write_text(text)
    (RESULTS / "latest.md").write_text(render(data))
    print((RESULTS / "latest.md").read_text())


def run_one(
    case: Case,
    exe: Path,
    extra: list[str],
    name: str,
    rep: int,
    logs: Path,
    env: dict[str, str],
    args: argparse.Namespace,
) -> dict[str, object]:
    out = args.work / "out" / "ray-bench"
    subprocess.run(["rm", "-rf", str(out)], check=True)
    load_before = wait_for_quiet(args.max_wait_idle)
    os.sync()
    read_all(case.inputs())
    log = logs / f"{re.sub('[^a-z0-9]+', '-', name)}-{rep}.log"
    busy0 = busy_cpu_s()
    m = measure.run(
        [str(exe), "run", str(case.recipe), str(out), *extra], log=log, env=env, timeout_s=900
    )
    # Ray's workers are not children of the command: count the whole machine's CPU.
    machine_cpu = busy_cpu_s() - busy0
    print(f"[bench-ray] {name} (rep {rep + 1}): wall {m.wall_s:.2f} s, ok={m.ok}", flush=True)
    return {
        "name": name,
        "rep": rep,
        "ok": m.ok,
        "wall_s": m.wall_s,
        "driver_cpu_s": m.cpu_s,
        "machine_cpu_s": machine_cpu,
        "other_load_before_cores": load_before,
        "log": str(log),
        "digest": folder_digest(out) if m.ok else None,
    }


def check_same(run: dict[str, object], reference: str | None, out: Path) -> str | None:
    if not run["ok"]:
        raise SystemExit(f"{run['name']} failed: see {run['log']}")
    if reference is not None and run["digest"] != reference:
        raise SystemExit(f"{run['name']}: output differs from the local backend's ({out})")
    return reference or str(run["digest"])


def summarize(runs: list[dict[str, object]], profile: dict) -> dict[str, object]:
    medians = {}
    for name in dict.fromkeys(str(r["name"]) for r in runs):
        walls = [float(r["wall_s"]) for r in runs if r["name"] == name]  # type: ignore[arg-type]
        medians[name] = statistics.median(walls)
    tasks = profile.get("tasks", {})
    jobs = len(profile["jobs"])
    default_tasks = int(tasks.get("1", jobs))
    per_task = (medians["ray, 1 worker, one tensor per task"] - medians["ray, 1 worker"]) / max(
        1, jobs - default_tasks
    )
    fixed = (
        medians["ray, 1 worker"] - medians["local, 1 thread"] - default_tasks * max(0.0, per_task)
    )
    return {
        "median_wall_s": medians,
        "tasks": tasks,
        "jobs": jobs,
        "overheads": {
            "task_overhead_s": max(0.0, per_task),
            "worker_start_s": max(0.0, fixed),
        },
    }


def render(data: dict) -> str:
    machine = data["machine"]
    summary = data["summary"]
    medians = summary["median_wall_s"]
    base = medians["local, 1 thread"]
    lines = [
        "# Ray backend: local vs Ray on one machine, and a simulated cluster",
        "",
        f"Measured {data['started']} on {machine['cpu']} ({machine['cores']} cores, "
        f"{machine['ram_gib']} GiB RAM), Python {machine['python']}, torch {machine['torch']}, "
        f"Ray {machine.get('ray', '?')}, mergesmith sources {machine['mergesmith_src']}. "
        f"TIES, base + 3 fine-tunes of {data['params_per_model'] / 1e6:.0f}M parameters, bf16, "
        "inputs in page cache; medians of every repeat; all outputs byte-identical to the "
        "local backend's.",
        "",
        "| run | wall | vs local 1 thread |",
        "|---|---|---|",
    ]
    for name, wall in medians.items():
        lines.append(f"| {name} | {wall:.2f} s | {wall / base:.2f}x |")
    others = statistics.median(float(r["other_load_before_cores"]) for r in data["runs"])
    lines += [
        "",
        f"Other processes used a median {others:.2f} cores of the 2 just before each run (this "
        "machine is shared): absolute times are inflated, and a second worker has little or "
        "no free core to use. Ray's two workers also start two processes that import torch "
        "at once.",
    ]
    over = summary["overheads"]
    lines += [
        "",
        f"Tasks by default: {summary['tasks']} (slots -> tasks) for {summary['jobs']} tensors. "
        f"Derived: about {over['task_overhead_s'] * 1000:.0f} ms per task, and "
        f"{over['worker_start_s']:.1f} s fixed per merge on a running cluster (connecting, "
        "starting worker processes that import torch and plan from the headers).",
    ]
    sim = data.get("simulation")
    if sim:
        lines += render_simulation(sim, medians)
    return "\n".join(lines) + "\n"


def render_simulation(sim: dict, medians: dict[str, float]) -> list[str]:
    cluster = sim["cluster"]
    lines = [
        "",
        "## SIMULATION: 405B merge (base + 3, TIES, bf16) on 1-64 nodes",
        "",
        "Not measured on a cluster: simulate_ray.py replays the per-job times measured above "
        "(per tensor kind, seconds per element, one core) and the measured fixed costs "
        "through the backend's real plan and task cut for Llama-3.1-405B shapes "
        f"({cluster['jobs']} tensors, {cluster['output_bytes'] / 1e9:.0f} GB out, "
        f"{cluster['shards']} shards). Nodes of {cluster['cores_per_node']} cores, "
        f"{cluster['node_memory']} of task memory, {cluster['network_per_node']} network each; "
        "a job reads its inputs, computes, writes, without overlap. `binds`: the ceiling used "
        "most over the run (share of its capacity); when none is used over 60%, the largest "
        "tasks (embeddings, lm_head) decide.",
        "",
    ]
    caps = sorted({row["storage_gb_s"] for row in sim["rows"]})
    lines.append(
        "| nodes | " + " | ".join(f"storage {c:.0f} GB/s: wall | binds" for c in caps) + " |"
    )
    lines.append("|---|" + "---|---|" * len(caps))
    for n in sorted({row["nodes"] for row in sim["rows"]}):
        cells = []
        for c in caps:
            row = next(r for r in sim["rows"] if r["nodes"] == n and r["storage_gb_s"] == c)
            used = row["utilization"].get(row["binding"])
            binds = row["binding"] + (f" ({used:.0%} used)" if used is not None else "")
            cells += [f"{row['wall_s'] / 60:.1f} min", binds]
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    if "validation" in sim:
        lines += ["", "The simulator on this machine, against the measured runs above:", ""]
        for name, values in sim["validation"].items():
            measured = medians.get(name)
            seen = f", measured {measured:.2f} s" if measured is not None else ""
            lines.append(f"- {name}: simulated {values['simulated_s']:.2f} s{seen}")
    return lines


if __name__ == "__main__":
    main()
