"""Benchmark mergesmith against mergekit on the same recipes and the same synthetic models.

Measures wall time, CPU time and peak memory of each tool as a subprocess (see measure.py),
the start-up time of both CLIs, and the time to read the inputs from page cache (the floor
for any tool that has to look at every weight). Optionally a scaling table for mergesmith:
2, 4, 8 fine-tunes, and 1x vs 2x model size.

Writes bench/results/latest.md and latest.json; logs of every run go to bench/results/raw/.

This process never imports torch and never holds tensors: at exec, Linux charges the
launcher's high-water RSS to the child's ru_maxrss, so a fat driver would inflate every
figure it reports. Model generation and output comparison run as child processes.

Usage: python bench/bench_ties.py [--only ties] [--no-scaling] [--mergekit auto|install|skip]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import platform
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import measure

BENCH = Path(__file__).resolve().parent
MERGESMITH_SRC = BENCH.parent / "src" / "mergesmith"


@dataclass(frozen=True)
class RecipeSpec:
    """How the benchmark writes one method's recipe on the benchmark models."""

    fine_tunes: int = 3
    base: bool = True
    per_model: tuple[str, ...] = ("density", "weight")
    extra: tuple[str, ...] = ()  # top-level `parameters:` lines
    random: bool = False


METHODS: dict[str, RecipeSpec] = {
    "ties": RecipeSpec(extra=("normalize: true", "int8_mask: true")),
    "linear": RecipeSpec(base=False, per_model=("weight",), extra=("normalize: true",)),
    "dare_ties": RecipeSpec(extra=("normalize: true", "int8_mask: true"), random=True),
    "della": RecipeSpec(extra=("normalize: true", "int8_mask: true", "epsilon: 0.1"), random=True),
    "slerp": RecipeSpec(fine_tunes=1, per_model=(), extra=("t: 0.4",)),
    "model_stock": RecipeSpec(per_model=()),
    "nuslerp": RecipeSpec(fine_tunes=2, per_model=("weight",)),
    "multislerp": RecipeSpec(per_model=("weight",)),
    "karcher": RecipeSpec(base=False, per_model=()),
    "sce": RecipeSpec(per_model=(), extra=("select_topk: 0.5",)),
    "nearswap": RecipeSpec(fine_tunes=1, per_model=(), extra=("t: 0.001",)),
    "arcee_fusion": RecipeSpec(fine_tunes=1, per_model=(), random=True),
    "ram": RecipeSpec(per_model=()),
    "ramplus_tl": RecipeSpec(per_model=()),
}
# The methods that hold whole tensors or make passes of their own: run again under a small
# --max-memory, and on models twice the size, to show peak memory stays within the budget.
BUDGET_METHODS = ("slerp", "model_stock", "nuslerp", "multislerp", "karcher", "sce", "nearswap")
BUDGET = "256MB"
MERGEKIT_VERSION = "0.1.5"
# Installed before mergekit: left to pip, torch resolves to a multi-GB CUDA build.
MERGEKIT_TORCH = "torch==2.13.0"
DENSITIES = (0.5, 0.5, 0.3)
WEIGHTS = (1.0, 0.5, 0.7)
DARE_SEED = 1
GIB = 1024**3
# Other processes using more CPU than this during a run make its timing unreliable.
DISTURBED_CORES = 0.25
# Neither tool should wait on a network that is not there.
CHILD_ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "HF_HUB_DISABLE_TELEMETRY": "1"}


@dataclass
class ModelSet:
    label: str
    layers: int
    root: Path
    fine_tunes: int
    params: int = 0

    def base(self) -> Path:
        return self.root / "base"

    def fts(self, n: int) -> list[Path]:
        return [self.root / f"ft{i}" for i in range(1, n + 1)]


@dataclass
class Case:
    name: str
    method: str
    models: ModelSet
    n_fine_tunes: int
    recipe: Path = field(default=Path())

    def inputs(self) -> list[Path]:
        fts = self.models.fts(self.n_fine_tunes)
        return [self.models.base(), *fts] if METHODS[self.method].base else fts


# mergesmith with its C kernels switched off: the code a GPU or a machine without a C
# compiler runs. Same output bytes; the row shows what the kernels are worth.
TORCH_CODE = "mergesmith-torch"


@dataclass
class Tool:
    name: str
    exe: Path
    extra: list[str]
    version: str = "?"
    env: dict[str, str] = field(default_factory=dict)

    def argv(self, case: Case, out: Path) -> list[str]:
        if self.name.startswith("mergesmith"):
            argv = [str(self.exe), "run", str(case.recipe), str(out), "--overwrite"]
            seed = ["--seed", str(DARE_SEED)]
        else:
            argv = [str(self.exe), str(case.recipe), str(out)]
            seed = ["--random-seed", str(DARE_SEED)]
        return argv + (seed if METHODS[case.method].random else []) + self.extra


# --------------------------------------------------------------------------- inputs


def yaml_scalar(v: object) -> str:
    # JSON scalars are valid YAML and quote paths safely.
    return json.dumps(v)


def write_recipe(case: Case, path: Path) -> None:
    spec = METHODS[case.method]
    fts = case.models.fts(case.n_fine_tunes)
    base = yaml_scalar(str(case.models.base()))
    lines = [f"merge_method: {case.method}"]
    if spec.base:
        lines += [f"base_model: {base}", "models:", f"  - model: {base}"]
    else:
        lines += ["models:"]
    for i, ft in enumerate(fts):
        lines += [f"  - model: {yaml_scalar(str(ft))}"]
        values = {"density": DENSITIES[i % len(DENSITIES)], "weight": WEIGHTS[i % len(WEIGHTS)]}
        if spec.per_model:
            lines += ["    parameters:"]
            lines += [f"      {name}: {values[name]}" for name in spec.per_model]
    if spec.extra:
        lines += ["parameters:", *(f"  {line}" for line in spec.extra)]
    lines += ["dtype: bfloat16", ""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines))
    case.recipe = path


def ensure_models(ms: ModelSet) -> None:
    cmd = [sys.executable, str(BENCH / "make_models.py"), str(ms.root)]
    cmd += ["--fine-tunes", str(ms.fine_tunes), "--layers", str(ms.layers)]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
    index = json.loads((ms.base() / "model.safetensors.index.json").read_text())
    ms.params = index["metadata"]["total_size"] // 2  # bf16


def files_under(paths: Sequence[Path]) -> list[Path]:
    return sorted(f for p in paths for f in p.rglob("*") if f.is_file())


def read_all(paths: Sequence[Path]) -> tuple[int, float]:
    """Read every file under paths once with plain read(); return (bytes, seconds).

    read() into one reused buffer, not mmap, so this process's RSS stays flat.
    """
    buf = bytearray(16 * 1024 * 1024)
    view = memoryview(buf)
    total = 0
    start = time.perf_counter()
    for f in files_under(paths):
        with open(f, "rb", buffering=0) as fh:
            while n := fh.readinto(view):
                total += n
    return total, time.perf_counter() - start


def busy_cpu_s() -> float:
    """CPU seconds spent by the whole machine (all cores, all processes) since boot."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    # user nice system idle iowait irq softirq steal: everything but idle and iowait.
    busy = sum(fields[:8]) - fields[3] - fields[4]
    return busy / os.sysconf("SC_CLK_TCK")


def wait_for_quiet(
    max_wait_s: float, threshold: float = DISTURBED_CORES, window_s: float = 2.0
) -> float:
    """Wait until other processes use < threshold cores; return the load seen last.

    Two cores shared with a test suite or a training job make every figure meaningless, so
    give them a chance to finish, and report the load either way.
    """
    deadline = time.monotonic() + max_wait_s
    while True:
        before = busy_cpu_s()
        time.sleep(window_s)
        load = (busy_cpu_s() - before) / window_s
        if load < threshold or time.monotonic() >= deadline:
            return load


def page_cache_floor(paths: Sequence[Path], repeat: int = 3) -> dict[str, float]:
    read_all(paths)
    times = []
    for _ in range(repeat):
        nbytes, secs = read_all(paths)
        times.append(secs)
    best = min(times)
    return {"bytes": nbytes, "seconds": best, "gb_per_s": nbytes / best / 1e9}


# --------------------------------------------------------------------------- tools


def tool_version(python: Path, dist: str) -> str:
    code = f"import importlib.metadata as m; print(m.version({dist!r}))"
    r = subprocess.run([str(python), "-c", code], capture_output=True, text=True)
    return r.stdout.strip() if r.returncode == 0 else "?"


def source_fingerprint(package: Path) -> str:
    """Hash of a package's Python sources.

    mergesmith is an editable install under active development: a run that straddles an edit
    would silently mix two versions, so every run records what it ran.
    """
    h = hashlib.sha256()
    for f in sorted(package.rglob("*.py")):
        h.update(str(f.relative_to(package)).encode() + b"\0" + f.read_bytes() + b"\0")
    return h.hexdigest()[:12]


def find_mergesmith(explicit: str | None) -> Path | None:
    if explicit:
        return Path(explicit)
    # Not .resolve(): a venv's python is a symlink, and the venv is what we want.
    beside = Path(sys.executable).parent / "mergesmith"
    if beside.exists():
        return beside
    found = shutil.which("mergesmith")
    return Path(found) if found else None


def install_mergekit(venv: Path) -> Path:
    exe = venv / "bin" / "mergekit-yaml"
    if exe.exists():
        return exe
    print(f"[bench] installing mergekit {MERGEKIT_VERSION} into {venv} ...", flush=True)
    subprocess.run([sys.executable, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "pip"), "install", "-q"]
    subprocess.run([*pip, MERGEKIT_TORCH], check=True)
    subprocess.run([*pip, f"mergekit=={MERGEKIT_VERSION}"], check=True)
    return exe


def find_mergekit(mode: str, explicit: str | None, work: Path) -> Path | None:
    if mode == "skip":
        return None
    local = work / "mkvenv"
    for cand in (explicit, os.environ.get("MERGEKIT_YAML"), local / "bin" / "mergekit-yaml"):
        if cand and Path(cand).exists():
            return Path(cand)
    if mode == "install":
        return install_mergekit(local)
    found = shutil.which("mergekit-yaml")
    return Path(found) if found else None


def machine_info(tools: Sequence[Tool]) -> dict[str, object]:
    cpu = "?"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    mem_kb = 0
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    code = "import torch; print(torch.__version__, torch.get_num_threads())"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    torch_version, torch_threads = [*r.stdout.split(), "?", "?"][:2]
    info: dict[str, object] = {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "cores_usable": len(os.sched_getaffinity(0)),
        "ram_gib": round(mem_kb / 1024**2, 1),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "torch": torch_version,
        "torch_default_threads": torch_threads,
    }
    for t in tools:
        info[f"{t.name}_version"] = t.version
    r = subprocess.run(
        ["git", "-C", str(BENCH.parent), "rev-parse", "--short", "HEAD"],
        capture_output=True,
        text=True,
    )
    info["git_head"] = r.stdout.strip() or "?"
    info["mergesmith_src"] = source_fingerprint(MERGESMITH_SRC)
    if any(t.name == "mergekit" for t in tools):
        mk = next(t for t in tools if t.name == "mergekit")
        info["mergekit_torch"] = tool_version(mk.exe.parent / "python", "torch")
    return info


# --------------------------------------------------------------------------- running


class Bench:
    def __init__(self, args: argparse.Namespace, tools: list[Tool], results_dir: Path) -> None:
        self.args = args
        self.tools = tools
        self.results_dir = results_dir
        self.stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.logs = results_dir / "raw" / f"logs-{self.stamp}"
        self.logs.mkdir(parents=True, exist_ok=True)
        # Measure the steady state a user sees, with bytecode cached. This sandbox sets
        # PYTHONDONTWRITEBYTECODE, which would make every run recompile mergesmith (an
        # editable install has no .pyc); the prefix keeps the cache inside bench/work.
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        self.env = env | CHILD_ENV | {"PYTHONPYCACHEPREFIX": str(args.work / "pycache")}
        self.data: dict[str, object] = {
            "started": dt.datetime.now().isoformat(timespec="seconds"),
            "settings": {},
            "machine": {},
            "models": {},
            "startup": {},
            "floor": {},
            "runs": [],
            "comparisons": {},
            "notes": [],
        }

    def note(self, text: str) -> None:
        print(f"[bench] {text}", flush=True)
        self.data["notes"].append(text)  # type: ignore[attr-defined]

    def startup(self, repeat: int) -> None:
        for tool in self.tools:
            if tool.env:
                continue  # the same command as another tool's
            # The first call fills the bytecode cache; it is not what start-up costs.
            measure.run([str(tool.exe), "--help"], env=self.env, timeout_s=600)
            wait_for_quiet(self.args.max_wait_idle)
            ms = [
                measure.run([str(tool.exe), "--help"], env=self.env, timeout_s=120)
                for _ in range(repeat)
            ]
            self.data["startup"][tool.name] = {  # type: ignore[index]
                "ok": all(m.ok for m in ms),
                "wall_s": [m.wall_s for m in ms],
                "median_wall_s": statistics.median(m.wall_s for m in ms),
                "peak_rss_bytes": max(m.peak_rss_bytes for m in ms),
            }
            median = statistics.median(m.wall_s for m in ms)
            print(f"[bench] {tool.name} --help: median {median:.2f} s", flush=True)

    def run_case(self, case: Case, tools: Sequence[Tool], repeat: int, group: str) -> None:
        inputs = case.inputs()
        wait_for_quiet(self.args.max_wait_idle)
        self.data["floor"][case.name] = page_cache_floor(inputs)  # type: ignore[index]
        for rep in range(repeat):
            # Alternate the order so slow drift (thermal, writeback) does not favour one tool.
            order = list(tools) if rep % 2 == 0 else list(reversed(tools))
            for tool in order:
                # A run disturbed by other processes stays in the JSON but is measured again:
                # on two cores one busy neighbour can double a wall time.
                for attempt in range(1 + self.args.retries):
                    run = self.run_once(case, tool, rep, attempt, inputs, group)
                    if not run["ok"] or not run["disturbed"]:
                        break

    def run_once(
        self, case: Case, tool: Tool, rep: int, attempt: int, inputs: list[Path], group: str
    ) -> dict[str, object]:
        out = self.args.work / "out" / case.name / tool.name
        shutil.rmtree(out, ignore_errors=True)
        out.parent.mkdir(parents=True, exist_ok=True)
        load_before = wait_for_quiet(self.args.max_wait_idle)
        # Flush the previous run's output so its writeback does not land in this run, then
        # pull every input into page cache: both tools start from the same state.
        os.sync()
        read_all(inputs)
        log = self.logs / f"{case.name}-{tool.name}-{rep}-{attempt}.log"
        label = f"rep {rep + 1}" + (f", retry {attempt}" if attempt else "")
        print(f"[bench] {case.name}: {tool.name} ({label}) ...", flush=True)
        src = source_fingerprint(MERGESMITH_SRC)
        busy0 = busy_cpu_s()
        m = measure.run(
            tool.argv(case, out), log=log, env=self.env | tool.env, timeout_s=self.args.timeout
        )
        other_cores = max(0.0, (busy_cpu_s() - busy0 - m.cpu_s) / m.wall_s)
        t0 = time.perf_counter()
        os.sync()
        sync_after = time.perf_counter() - t0
        disturbed = other_cores > DISTURBED_CORES
        status = "ok" if m.ok else ("TIMEOUT" if m.timed_out else f"rc={m.returncode}")
        print(
            f"[bench]   {status}: wall {m.wall_s:.1f} s, cpu {m.cpu_s:.1f} s, "
            f"peak RSS {m.peak_rss_bytes / GIB:.2f} GiB, anon {m.peak_anon_bytes / GIB:.2f} GiB, "
            f"other load {other_cores:.2f} cores" + (" (disturbed)" if disturbed else ""),
            flush=True,
        )
        if not m.ok:
            print(f"[bench]   see {log}", flush=True)
        run: dict[str, object] = {
            "group": group,
            "case": case.name,
            "method": case.method,
            "models": case.models.label,
            "n_fine_tunes": case.n_fine_tunes,
            "params_per_model": case.models.params,
            "tool": tool.name,
            "rep": rep,
            "attempt": attempt,
            "log": str(log),
            "sync_after_s": sync_after,
            "other_load_before_cores": load_before,
            "other_load_cores": other_cores,
            "disturbed": disturbed,
            "mergesmith_src": src,
            **asdict(m),
            "cpu_s": m.cpu_s,
            "ok": m.ok,
        }
        self.data["runs"].append(run)  # type: ignore[attr-defined]
        self.save()
        return run

    def compare(self, case: Case, other: str = "mergekit") -> None:
        a, b = (self.args.work / "out" / case.name / t for t in ("mergesmith", other))
        ok = {
            r["tool"]
            for r in self.data["runs"]  # type: ignore[attr-defined]
            if r["case"] == case.name and r["ok"]
        }
        if not {"mergesmith", other} <= ok:
            return
        cmd = [sys.executable, str(BENCH / "compare_outputs.py"), str(a), str(b)]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode != 0:
            self.note(f"comparing {case.name} outputs failed: {r.stderr.strip()[-500:]}")
            return
        key = case.name if other == "mergekit" else f"{case.name} vs {other}"
        self.data["comparisons"][key] = json.loads(r.stdout)  # type: ignore[index]
        self.save()

    def save(self) -> None:
        self.data["finished"] = dt.datetime.now().isoformat(timespec="seconds")
        text = json.dumps(self.data, indent=2, default=str) + "\n"
        (self.results_dir / "raw" / f"bench-{self.stamp}.json").write_text(text)
        (self.results_dir / "latest.json").write_text(text)
        (self.results_dir / "latest.md").write_text(render(self.data))


# --------------------------------------------------------------------------- report


def _median(runs: list[dict], key: str) -> float:
    return statistics.median(float(r[key]) for r in runs)


def summarize(runs: list[dict], group: str) -> dict[tuple[str, str], dict[str, float]]:
    out: dict[tuple[str, str], dict[str, float]] = {}
    keys = {(r["case"], r["tool"]) for r in runs if r["group"] == group}
    for case, tool in keys:
        rs = [r for r in runs if r["group"] == group and r["case"] == case and r["tool"] == tool]
        good = [r for r in rs if r["ok"]]
        if not good:
            out[case, tool] = {"failed": 1.0, "n": float(len(rs))}
            continue
        quiet = [r for r in good if not r.get("disturbed")]
        disturbed = not quiet
        good = quiet or good
        out[case, tool] = {
            "wall_s": _median(good, "wall_s"),
            "cpu_s": _median(good, "cpu_s"),
            "peak_rss_bytes": _median(good, "peak_rss_bytes"),
            "peak_anon_bytes": _median(good, "peak_anon_bytes"),
            "sync_after_s": _median(good, "sync_after_s"),
            "other_load_cores": max(float(r["other_load_cores"]) for r in good),
            "n": float(len(good)),
            "disturbed": float(disturbed),
        }
    return out


def _ratio(a: float | None, b: float | None) -> str:
    return f"{a / b:.2f}x" if a and b else "–"


ROW_HEADER = ["wall s", "CPU s", "CPU/wall", "peak RSS GiB", "anon GiB", "sync after s"]
ROW_HEADER += ["other load (cores)", "n"]


def _fmt_row(s: dict[str, float] | None) -> list[str]:
    if s is None:
        return ["not run"] + [""] * (len(ROW_HEADER) - 1)
    if "failed" in s:
        return ["FAILED"] + [""] * (len(ROW_HEADER) - 1)
    return [
        f"{s['wall_s']:.1f}",
        f"{s['cpu_s']:.1f}",
        f"{s['cpu_s'] / s['wall_s']:.2f}",
        f"{s['peak_rss_bytes'] / GIB:.2f}",
        f"{s['peak_anon_bytes'] / GIB:.2f}",
        f"{s['sync_after_s']:.2f}",
        f"{s['other_load_cores']:.2f}" + (" ⚠" if s["disturbed"] else ""),
        f"{s['n']:.0f}",
    ]


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return [*lines, *("| " + " | ".join(r) + " |" for r in rows), ""]


def render(data: dict) -> str:
    m, st = data["machine"], data["settings"]
    lines = [
        "# mergesmith vs mergekit benchmark",
        "",
        f"Run {data['started']} (last update {data.get('finished', '?')}).",
        "",
        f"Machine: {m.get('cpu')}, {m.get('cores_usable')} cores usable,"
        f" {m.get('ram_gib')} GiB RAM, Linux {m.get('kernel')}, Python {m.get('python')},"
        f" torch {m.get('torch')}"
        f" ({m.get('torch_default_threads')} threads by default).",
        f"Tools: mergesmith {m.get('mergesmith_version', '–')} (git {m.get('git_head')},"
        f" sources {m.get('mergesmith_src')})"
        f" (`{st.get('mergesmith_cmd', '–')}`), mergekit {m.get('mergekit_version', '–')}"
        f" with torch {m.get('mergekit_torch', '–')} (`{st.get('mergekit_cmd', '–')}`).",
        "",
    ]
    for label, md in data["models"].items():
        lines.append(
            f"Models ({label}): Llama-shaped, {md['layers']} layers, hidden 1024, "
            f"{md['params'] / 1e6:.1f}M parameters each, bf16, sharded safetensors "
            f"({md['bytes_per_model'] / 1e9:.2f} GB per model)."
        )
    lines += [
        "",
        "Method: each tool runs as a subprocess; wall = elapsed, CPU = user+sys of the child "
        "(wait4), peak RSS = ru_maxrss of the child (counts mmapped file pages), anon = peak "
        "RssAnon summed over the process tree, sampled every 20 ms (memory that cannot be "
        "reclaimed). Before every run the previous output is deleted, `sync` is called and "
        "all input files are read once so they sit in page cache for both tools. Writeback "
        "of the output is outside the timing unless the tool fsyncs: `sync after` is how "
        "long a `sync` right after the run took. `other load` is the most CPU (in cores) that "
        f"other processes on the machine used during a run; above {DISTURBED_CORES} a run "
        f"counts as disturbed and is repeated (up to {st.get('retries', '?')} times). Figures "
        "are medians of the n undisturbed runs; ⚠ marks a row where every run was disturbed.",
        "",
    ]
    runs = data["runs"]
    cmp_rows = summarize(runs, "methods")
    if cmp_rows:
        lines += ["## mergesmith vs mergekit", ""]
        header = ["case", "tool", *ROW_HEADER]
        rows: list[list[str]] = []
        for case in dict.fromkeys(r["case"] for r in runs if r["group"] == "methods"):
            ms, mk = cmp_rows.get((case, "mergesmith")), cmp_rows.get((case, "mergekit"))
            rows.append([case, "mergekit", *_fmt_row(mk)])
            rows.append([case, "mergesmith", *_fmt_row(ms)])
            torch_code = cmp_rows.get((case, TORCH_CODE))
            if torch_code:
                rows.append([case, f"{TORCH_CODE} (kernels off)", *_fmt_row(torch_code)])
            if ms and mk and "failed" not in ms and "failed" not in mk:
                rows.append(
                    [
                        case,
                        "**mergekit / mergesmith**",
                        f"**{_ratio(mk['wall_s'], ms['wall_s'])}**",
                        _ratio(mk["cpu_s"], ms["cpu_s"]),
                        "",
                        f"**{_ratio(mk['peak_rss_bytes'], ms['peak_rss_bytes'])}**",
                        _ratio(mk["peak_anon_bytes"], ms["peak_anon_bytes"]),
                        "",
                        "",
                        "",
                    ]
                )
        lines += _table(header, rows)
    floor = data["floor"]
    if floor:
        lines += ["## Floors", ""]
        rows = [
            [
                case,
                f"{f['bytes'] / 1e9:.2f}",
                f"{f['seconds']:.2f}",
                f"{f['gb_per_s']:.1f}",
            ]
            for case, f in floor.items()
        ]
        lines += ["Reading every input once from page cache (plain read(), best of 3):", ""]
        lines += _table(["case", "input GB", "read s", "GB/s"], rows)
    if data["startup"]:
        rows = [
            [
                f"`{name} --help`" if name == "mergesmith" else "`mergekit-yaml --help`",
                f"{s['median_wall_s']:.2f}" if s["ok"] else "FAILED",
                f"{s['peak_rss_bytes'] / GIB:.2f}",
            ]
            for name, s in data["startup"].items()
        ]
        lines += ["Start-up (median of runs):", ""]
        lines += _table(["command", "wall s", "peak RSS GiB"], rows)
    scale = summarize(runs, "scaling")
    if scale:
        lines += ["## Scaling (TIES)", ""]
        header = ["models", "size", "params/model", "tool", "input GB", "read floor s"]
        header += ROW_HEADER
        rows = []
        seen = dict.fromkeys((r["case"], r["tool"]) for r in runs if r["group"] == "scaling")
        for case, tool in seen:
            r0 = next(r for r in runs if r["case"] == case and r["tool"] == tool)
            f = floor.get(case, {})
            rows.append(
                [
                    f"base + {r0['n_fine_tunes']}",
                    r0["models"],
                    f"{r0['params_per_model'] / 1e6:.0f}M",
                    tool,
                    f"{f.get('bytes', 0) / 1e9:.2f}",
                    f"{f.get('seconds', 0):.2f}",
                    *_fmt_row(scale[case, tool]),
                ]
            )
        lines += _table(header, rows)
    budget = summarize(runs, "budget")
    if budget:
        lines += [f"## Memory within the budget (--max-memory {BUDGET})", ""]
        header = ["case", "params/model", "tool", *ROW_HEADER]
        rows = []
        seen = dict.fromkeys((r["case"], r["tool"]) for r in runs if r["group"] == "budget")
        for case, tool in seen:
            r0 = next(r for r in runs if r["case"] == case and r["tool"] == tool)
            rows.append(
                [case, f"{r0['params_per_model'] / 1e6:.0f}M", tool, *_fmt_row(budget[case, tool])]
            )
        lines += _table(header, rows)
        lines += [
            "Peak RSS counts the memory-mapped input pages a job touches; anon is the memory "
            "the merge itself holds.",
            "",
        ]
    if data["comparisons"]:
        lines += ["## Output agreement (mergesmith vs mergekit, and vs its own torch code)", ""]
        rows = []
        for case, c in data["comparisons"].items():
            frac = c["differing_elements"] / c["elements"] if c["elements"] else 0.0
            missing = len(c["only_in_a"]) + len(c["only_in_b"]) + len(c["mismatched"])
            rows.append(
                [
                    case,
                    str(c["tensors_compared"]),
                    str(missing),
                    f"{c['max_abs_diff']:.3g}",
                    f"{c['max_diff_in_bf16_ulps']:.2f}",
                    f"{c['mean_abs_diff']:.3g}",
                    f"{100 * frac:.4f}%",
                ]
            )
        header = ["case", "tensors", "missing/mismatched", "max abs diff", "max diff (bf16 ulps)"]
        header += ["mean abs diff", "elements differing"]
        lines += _table(header, rows)
        lines += [
            "ulps are relative to the bf16 spacing at the larger of the two values: "
            "≤ 1 is rounding. dare_ties draws random masks, so it only agrees if both tools "
            "consume the same random stream. ties can differ legitimately too: the difference "
            "of two bf16 tensors takes few distinct values, so a large share of a task vector "
            "(13-20% on these models) has exactly the magnitude at the density cutoff, and "
            "mergekit picks among those with an unstable argsort where mergesmith takes them "
            "in index order. Rows `vs mergesmith-torch` compare the C kernels with the torch "
            "code: they must agree to the bit.",
            "",
        ]
    if data["notes"]:
        lines += ["## Notes", ""] + [f"- {n}" for n in data["notes"]] + [""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument(
        "--only",
        type=lambda s: [m.strip() for m in s.split(",") if m.strip()],
        help=f"comma-separated methods out of {','.join(METHODS)}; turns scaling off unless "
        "--scaling is given",
    )
    ap.add_argument("--scaling", action=argparse.BooleanOptionalAction, default=None)
    ap.add_argument(
        "--budget",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"run {', '.join(BUDGET_METHODS)} under --max-memory {BUDGET} on 1x and 2x models",
    )
    ap.add_argument("--scale-models", default="2,4,8", help="fine-tune counts for scaling")
    ap.add_argument(
        "--scaling-mergekit",
        action="store_true",
        help="run mergekit in the scaling table too",
    )
    ap.add_argument("--mergekit", choices=("auto", "install", "skip"), default="auto")
    ap.add_argument("--mergekit-bin", help="mergekit-yaml to use (also $MERGEKIT_YAML)")
    ap.add_argument("--mergekit-args", default="", help="extra mergekit-yaml arguments")
    ap.add_argument("--mergesmith", help="mergesmith executable (default: beside this python)")
    ap.add_argument("--mergesmith-args", default="", help='extra "mergesmith run" arguments')
    ap.add_argument(
        "--torch-code",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run mergesmith with its C kernels off (MERGESMITH_KERNELS=torch)",
    )
    ap.add_argument("--repeat", type=int, default=3, help="runs per tool and case (median)")
    ap.add_argument(
        "--retries",
        type=int,
        default=2,
        help="extra attempts for a run that other processes disturbed",
    )
    ap.add_argument("--startup-repeat", type=int, default=5)
    ap.add_argument("--timeout", type=float, default=1800.0, help="seconds per run")
    ap.add_argument(
        "--max-wait-idle",
        type=float,
        default=300.0,
        help="seconds to wait for other processes to go quiet before each run",
    )
    ap.add_argument("--no-compare", dest="compare", action="store_false")
    ap.add_argument("--work", type=Path, default=BENCH / "work")
    ap.add_argument("--results", type=Path, default=BENCH / "results")
    args = ap.parse_args(argv)
    for m in args.only or []:
        if m not in METHODS:
            ap.error(f"--only: unknown method {m!r}")
    if args.scaling is None:
        args.scaling = args.only is None
    args.work = args.work.resolve()
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    methods = args.only or list(METHODS)
    scale_counts = [int(x) for x in args.scale_models.split(",")] if args.scaling else []
    args.results.mkdir(parents=True, exist_ok=True)

    tools: list[Tool] = []
    notes: list[str] = []
    mk_exe = find_mergekit(args.mergekit, args.mergekit_bin, args.work)
    if mk_exe is not None:
        mk = Tool("mergekit", mk_exe, shlex.split(args.mergekit_args))
        mk.version = tool_version(mk_exe.parent / "python", "mergekit")
        if mk.version != MERGEKIT_VERSION:
            notes.append(f"mergekit is {mk.version}, not the reference {MERGEKIT_VERSION}")
        tools.append(mk)
    elif args.mergekit != "skip":
        notes.append("mergekit not found: run with --mergekit install (or --mergekit-bin)")
    ms_exe = find_mergesmith(args.mergesmith)
    if ms_exe is not None:
        ms = Tool("mergesmith", ms_exe, shlex.split(args.mergesmith_args))
        ms.version = tool_version(Path(sys.executable), "mergesmith")
        tools.append(ms)
        if args.torch_code:
            torch_code = Tool(TORCH_CODE, ms_exe, ms.extra, ms.version)
            torch_code.env = {"MERGESMITH_KERNELS": "torch"}
            tools.append(torch_code)
    else:
        notes.append("mergesmith executable not found")

    bench = Bench(args, tools, args.results)
    for n in notes:
        bench.note(n)
    bench.data["settings"] = {
        "methods": methods,
        "scaling": scale_counts,
        "repeat": args.repeat,
        "retries": args.retries,
        "mergesmith_cmd": "mergesmith run RECIPE OUT --overwrite " + args.mergesmith_args,
        "mergekit_cmd": "mergekit-yaml RECIPE OUT " + args.mergekit_args,
        "densities": DENSITIES,
        "weights": WEIGHTS,
        "dare_seed": DARE_SEED,
        "argv": sys.argv,
    }
    bench.data["machine"] = machine_info(tools)

    one_x = ModelSet("1x", 12, args.work / "models", max([3, *scale_counts]))
    two_x = ModelSet("2x", 24, args.work / "models-2x", 3)
    sets = [one_x, two_x] if scale_counts else [one_x]
    for s in sets:
        ensure_models(s)
        size = sum(f.stat().st_size for f in files_under([s.base()]))
        bench.data["models"][s.label] = {  # type: ignore[index]
            "layers": s.layers,
            "params": s.params,
            "bytes_per_model": size,
            "root": str(s.root),
        }

    bench.startup(args.startup_repeat)
    for tool in list(tools):
        if tool.name not in bench.data["startup"]:  # type: ignore[operator]
            continue
        if not bench.data["startup"][tool.name]["ok"]:  # type: ignore[index]
            bench.note(f"`{tool.exe} --help` failed; {tool.name} is left out")
            tools.remove(tool)

    recipes = args.work / "recipes"
    for method in methods:
        case = Case(method, method, one_x, METHODS[method].fine_tunes)
        write_recipe(case, recipes / f"{method}.yml")
        bench.run_case(case, tools, args.repeat, "methods")
        if args.compare:
            bench.compare(case)
            bench.compare(case, TORCH_CODE)

    scale_tools = [
        t
        for t in tools
        if t.name == "mergesmith" or (args.scaling_mergekit and t.name == "mergekit")
    ]
    if scale_counts and scale_tools:
        cases = [Case(f"ties-{n}ft-1x", "ties", one_x, n) for n in scale_counts]
        cases += [Case(f"ties-3ft-{s.label}", "ties", s, 3) for s in (one_x, two_x)]
        for case in cases:
            write_recipe(case, recipes / f"{case.name}.yml")
            bench.run_case(case, scale_tools, args.repeat, "scaling")

    budget_methods = [m for m in BUDGET_METHODS if m in methods] if args.budget else []
    ms_tool = next((t for t in tools if t.name == "mergesmith"), None)
    if budget_methods and ms_tool is not None:
        if two_x not in sets:
            ensure_models(two_x)
        bounded = Tool(f"mergesmith --max-memory {BUDGET}", ms_tool.exe, [*ms_tool.extra])
        bounded.extra += ["--max-memory", BUDGET]
        for method in budget_methods:
            for s in (one_x, two_x):
                case = Case(f"{method}-{s.label}", method, s, METHODS[method].fine_tunes)
                write_recipe(case, recipes / f"{case.name}.yml")
                bench.run_case(case, [bounded], args.repeat, "budget")

    runs: list[dict] = bench.data["runs"]  # type: ignore[assignment]
    versions = {r["mergesmith_src"] for r in runs if r["tool"] == "mergesmith"}
    if len(versions) > 1:
        bench.note(
            f"src/mergesmith changed during the benchmark ({len(versions)} versions: "
            f"{', '.join(sorted(versions))}); mergesmith figures mix them"
        )
    bench.save()
    print()
    print((args.results / "latest.md").read_text())
    failed = [r for r in runs if not r["ok"]]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
