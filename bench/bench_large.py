"""The large benchmark: base + 3 fine-tunes of about 1B parameters each (bf16, about 8 GB of
inputs), merged with TIES, linear, DARE-TIES and DELLA by mergesmith and mergekit 0.1.5 side by
side on the same files, each from a warm page cache and from a cold one, against the floor: the
time to read every input once plus writing the output once.

Cold means the inputs are not in page cache: before each cold run `sync` and
`echo 3 > /proc/sys/vm/drop_caches`, or, where that is not permitted, posix_fadvise(DONTNEED) on
every input file. Eviction is checked with fincore where it exists. The tools' own code is
loaded back into the cache right after the drop (an import or `--help`), so a cold run measures
reading the checkpoints, not re-reading torch.

Results accumulate in bench/results/large/latest.json: rerunning one method (`--only dare_ties`)
or one tool replaces just those rows. Like bench_ties.py, this driver never imports torch.

Usage: python bench/bench_large.py [--only ties,linear,dare_ties,della]
       [--tools mergesmith,mergekit] [--cache cold,warm] [--repeat 2] [--mergekit-repeat 1]
       [--no-threads-sweep]
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path

import bench_ties as bt
import measure

BENCH = Path(__file__).resolve().parent
# A rerun of one method (--only della) replaces just its rows.
METHODS = ("ties", "linear", "dare_ties", "della")
CACHES = ("cold", "warm")
# About 1.0B parameters: TinyLlama's shape (grouped-query attention) with 20 layers, in 1 GB
# shards like a Hugging Face checkpoint of that size.
MODEL_ARGS = ("--layers", "20", "--hidden", "2048", "--intermediate", "5632")
MODEL_ARGS += ("--heads", "32", "--kv-heads", "4", "--shard-mb", "1000")
GIB = 1024**3
THREADS_SWEEP_TOOL = "mergesmith --threads 1"
DROP_CACHES = Path("/proc/sys/vm/drop_caches")
# Of the inputs, at most this share may still be cached for a run to count as cold.
COLD_RESIDENT_MAX = 0.01


# --------------------------------------------------------------------------- page cache


def drop_page_cache(files: Sequence[Path]) -> str:
    """Evict `files` from page cache; return how, or "" if nothing worked."""
    os.sync()
    try:
        DROP_CACHES.write_text("3\n")
        return "sync; echo 3 > /proc/sys/vm/drop_caches"
    except OSError:
        pass
    try:
        for f in files:
            fd = os.open(f, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)
    except OSError:
        return ""
    return "sync; posix_fadvise(POSIX_FADV_DONTNEED) on every input file"


def resident_bytes(files: Sequence[Path]) -> int | None:
    """Bytes of `files` in page cache (fincore, i.e. mincore(2)); None without fincore."""
    exe = shutil.which("fincore")
    if exe is None or not files:
        return None
    cmd = [exe, "--bytes", "--noheadings", "--raw", "--output", "RES", *map(str, files)]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        return None
    return sum(int(x) for x in r.stdout.split())


def read_files(files: Sequence[Path]) -> float:
    """Seconds to read `files` once, in order, with plain read() into one reused buffer."""
    view = memoryview(bytearray(16 << 20))
    start = time.perf_counter()
    for f in files:
        with open(f, "rb", buffering=0) as fh:
            while fh.readinto(view):
                pass
    return time.perf_counter() - start


def time_cold_read(files: Sequence[Path]) -> float:
    """Seconds to read `files` once right after evicting them (the check where fincore is
    missing: a cold read far slower than a warm one shows the eviction worked)."""
    drop_page_cache(files)
    return read_files(files)


# --------------------------------------------------------------------------- floors


def write_floor(nbytes: int, where: Path) -> float:
    """Seconds to write `nbytes` to a new file and fsync it: writing the output once."""
    where.mkdir(parents=True, exist_ok=True)
    path = where / "write-floor.bin"
    # Incompressible bytes, in case the storage under us compresses or deduplicates.
    block = os.urandom(16 << 20)
    os.sync()
    start = time.perf_counter()
    with open(path, "wb", buffering=0) as fh:
        left = nbytes
        while left > 0:
            left -= fh.write(block[: min(left, len(block))])
        os.fsync(fh.fileno())
    secs = time.perf_counter() - start
    path.unlink()
    return secs


# --------------------------------------------------------------------------- runs


def threads_of(tool: bt.Tool) -> int | None:
    """mergesmith's job threads (its default is one per core); None for mergekit."""
    if not tool.name.startswith("mergesmith"):
        return None
    if "--threads" in tool.extra:
        return int(tool.extra[tool.extra.index("--threads") + 1])
    return os.cpu_count()


def output_digest(folder: Path) -> str:
    """A hash of every weight shard's bytes: equal digests mean byte-identical outputs."""
    h = hashlib.blake2b(digest_size=16)
    for f in sorted(folder.glob("*.safetensors")):
        h.update(f.name.encode() + b"\0")
        with open(f, "rb", buffering=0) as fh:
            while chunk := fh.read(16 << 20):
                h.update(chunk)
    return h.hexdigest()


class LargeBench:
    def __init__(self, args: argparse.Namespace, models: bt.ModelSet) -> None:
        self.args = args
        self.models = models
        self.results = args.results
        self.stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
        self.logs = self.results / "raw" / f"logs-{self.stamp}"
        self.logs.mkdir(parents=True, exist_ok=True)
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        self.env = env | bt.CHILD_ENV | {"PYTHONPYCACHEPREFIX": str(args.work / "pycache")}
        self.data: dict = {"runs": [], "notes": []}
        latest = self.results / "latest.json"
        if latest.exists() and not args.fresh:
            self.data = json.loads(latest.read_text())
        self.data["started"] = dt.datetime.now().isoformat(timespec="seconds")
        self.evict_how = ""

    def note(self, text: str) -> None:
        print(f"[large] {text}", flush=True)
        # Notes accumulate with the rows across reruns: one copy of each.
        if text not in self.data["notes"]:
            self.data["notes"].append(text)

    def forget(self, group: str, method: str, tool: str) -> None:
        """Drop stored rows that this invocation measures again (a warm-only rerun keeps the
        cold rows)."""
        self.data["runs"] = [
            r
            for r in self.data["runs"]
            if (r["group"], r["method"], r["tool"]) != (group, method, tool)
            or r["cache"] not in self.args.cache
        ]

    def warm_code(self, tool: bt.Tool) -> None:
        """Load a tool's code (Python, torch, its own modules) back into page cache after a
        drop, without touching any checkpoint."""
        if tool.name.startswith("mergesmith"):
            code = "import mergesmith.api, mergesmith.engine, mergesmith.methods.registry, torch"
            argv = [sys.executable, "-c", code]
        else:
            argv = [str(tool.exe), "--help"]
        measure.run(argv, env=self.env, timeout_s=600)

    def floor(self, cache: str, files: list[Path], out_bytes: int) -> dict[str, float]:
        """The floor measured right before a run, in the same state of the machine: reading
        every input once (cold: just evicted; warm: a second read), plus writing the output's
        size once."""
        write_s = write_floor(out_bytes, self.args.work / "out")
        if cache == "cold":
            read_s = time_cold_read(files)
        else:
            read_files(files)
            read_s = read_files(files)
        return {"floor_read_s": read_s, "floor_write_s": write_s, "floor_s": read_s + write_s}

    def prepare_cache(self, cache: str, tool: bt.Tool, files: list[Path]) -> int | None:
        if cache == "warm":
            read_files(files)
        else:
            self.evict_how = drop_page_cache(files)
            self.warm_code(tool)
        return resident_bytes(files)

    def run_once(self, group: str, case: bt.Case, tool: bt.Tool, cache: str, rep: int) -> dict:
        files = bt.files_under(case.inputs())
        input_bytes = sum(f.stat().st_size for f in files)
        out = self.args.work / "out" / case.method / tool.name.replace(" ", "")
        run: dict = {}
        for attempt in range(1 + self.args.retries):
            shutil.rmtree(out, ignore_errors=True)
            out.parent.mkdir(parents=True, exist_ok=True)
            os.sync()
            load_before = bt.wait_for_quiet(self.args.max_wait_idle)
            floor = self.floor(cache, files, self.args.output_bytes)
            resident = self.prepare_cache(cache, tool, files)
            log = self.logs / f"{case.method}-{cache}-{tool.name.replace(' ', '')}-{rep}-{attempt}"
            print(f"[large] {case.method} {cache}: {tool.name} (rep {rep + 1}) ...", flush=True)
            src = bt.source_fingerprint(bt.MERGESMITH_SRC)
            busy0 = bt.busy_cpu_s()
            m = measure.run(
                tool.argv(case, out),
                log=log.with_suffix(".log"),
                env=self.env | tool.env,
                timeout_s=self.args.timeout,
            )
            # mergesmith fsyncs its output and mergekit does not: the time a `sync` takes
            # right after the run puts both on disk.
            t0 = time.perf_counter()
            os.sync()
            sync_after = time.perf_counter() - t0
            other = max(0.0, (bt.busy_cpu_s() - busy0 - m.cpu_s) / (m.wall_s + sync_after))
            total = m.wall_s + sync_after
            run = {
                "group": group,
                "method": case.method,
                "tool": tool.name,
                "cache": cache,
                "rep": rep,
                "attempt": attempt,
                "threads": threads_of(tool),
                "input_bytes": input_bytes,
                "resident_input_bytes_before": resident,
                "evicted_by": self.evict_how if cache == "cold" else "",
                "sync_after_s": sync_after,
                "total_s": total,
                "gb_per_s": input_bytes / total / 1e9,
                **floor,
                "x_floor": total / floor["floor_s"],
                "other_load_before_cores": load_before,
                "other_load_cores": other,
                "disturbed": other > bt.DISTURBED_CORES,
                "mergesmith_src": src,
                "log": str(log.with_suffix(".log")),
                **asdict(m),
                "cpu_s": m.cpu_s,
                "ok": m.ok,
            }
            if m.ok and tool.name.startswith("mergesmith"):
                run["output_digest"] = output_digest(out)
            status = "ok" if m.ok else ("TIMEOUT" if m.timed_out else f"rc={m.returncode}")
            print(
                f"[large]   {status}: wall {m.wall_s:.1f} s + sync {sync_after:.1f} s, "
                f"{run['gb_per_s']:.2f} GB/s, cpu {m.cpu_s:.1f} s, "
                f"peak RSS {m.peak_rss_bytes / GIB:.2f} GiB, anon {m.peak_anon_bytes / GIB:.2f} "
                f"GiB, major faults {m.major_faults}, other load {other:.2f} cores"
                + (" (disturbed)" if run["disturbed"] else ""),
                flush=True,
            )
            self.data["runs"].append(run)
            self.save()
            if not m.ok or not run["disturbed"]:
                break
        shutil.rmtree(out, ignore_errors=True)
        return run

    def run_method(self, group: str, method: str, tools: list[bt.Tool]) -> None:
        case = bt.Case(method, method, self.models, 3)
        bt.write_recipe(case, self.args.work / "recipes" / f"{method}.yml")
        for tool in tools:
            self.forget(group, method, tool.name)
        for cache in self.args.cache:
            reps = max(self.args.repeat, self.args.mergekit_repeat)
            for rep in range(reps):
                # Alternate the order so slow drift (writeback, other users) favours no tool.
                order = tools if rep % 2 == 0 else tools[::-1]
                for tool in order:
                    n = self.args.mergekit_repeat if tool.name == "mergekit" else self.args.repeat
                    if rep < n:
                        self.run_once(group, case, tool, cache, rep)

    def save(self) -> None:
        self.data["finished"] = dt.datetime.now().isoformat(timespec="seconds")
        text = json.dumps(self.data, indent=2, default=str) + "\n"
        (self.results / "raw" / f"large-{self.stamp}.json").write_text(text)
        (self.results / "latest.json").write_text(text)
        (self.results / "latest.md").write_text(render(self.data))


# --------------------------------------------------------------------------- report


def summarize(runs: list[dict]) -> dict[tuple[str, str, str], dict]:
    """Medians per (method, cache, tool) over the undisturbed good runs (all good ones if
    every run was disturbed)."""
    out: dict[tuple[str, str, str], dict] = {}
    for r in runs:
        key = (r["method"], r["cache"], r["tool"])
        if key in out:
            continue
        rs = [x for x in runs if (x["method"], x["cache"], x["tool"]) == key and x["ok"]]
        if not rs:
            out[key] = {"failed": True}
            continue
        quiet = [x for x in rs if not x["disturbed"]]
        use = quiet or rs
        s = {k: statistics.median(float(x.get(k, 0.0)) for x in use) for k in _MEDIAN_KEYS}
        s["other_load_cores"] = max(float(x["other_load_cores"]) for x in use)
        s["n"], s["disturbed"] = len(use), not quiet
        s["threads"] = use[0].get("threads")
        s["digests"] = sorted({x["output_digest"] for x in use if x.get("output_digest")})
        out[key] = s
    return out


_MEDIAN_KEYS = ("wall_s", "sync_after_s", "total_s", "gb_per_s", "cpu_s", "x_floor")
_MEDIAN_KEYS += ("floor_read_s", "floor_write_s", "floor_s")
_MEDIAN_KEYS += ("peak_rss_bytes", "peak_anon_bytes", "major_faults", "input_bytes", "io_stall_s")


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    return [*lines, *("| " + " | ".join(r) + " |" for r in rows), ""]


def render(data: dict) -> str:
    m = data.get("machine", {})
    md = data.get("models", {})
    lines = [
        "# Large benchmark: 1B-parameter models, cold and warm page cache",
        "",
        f"Run {data.get('started')} (last update {data.get('finished', '?')}).",
        "",
        f"Machine: {m.get('cpu')}, {m.get('cores_usable')} cores usable, {m.get('ram_gib')} GiB "
        f"RAM, Linux {m.get('kernel')}, Python {m.get('python')}, torch {m.get('torch')}. "
        f"Storage: {data.get('storage', '?')}.",
        f"Tools: mergesmith {m.get('mergesmith_version', '–')} (git {m.get('git_head')}, sources "
        f"{m.get('mergesmith_src')}), mergekit {m.get('mergekit_version', '–')} with torch "
        f"{m.get('mergekit_torch', '–')}. Commands: `{data.get('mergesmith_cmd', '')}`, "
        f"`{data.get('mergekit_cmd', '')}`.",
        "",
        f"Models: base + 3 fine-tunes, Llama-shaped ({md.get('shape', '?')}), "
        f"{md.get('params', 0) / 1e9:.2f}B parameters each, bf16, "
        f"{md.get('bytes_per_model', 0) / 1e9:.2f} GB per model in 1 GB safetensors shards "
        "(bench/make_models.py). TIES: densities 0.5/0.5/0.3, weights 1.0/0.5/0.7, normalize, "
        "int8_mask; linear: the fine-tunes, weights 1.0/0.5/0.7, normalize; dare_ties: as "
        "TIES, seed 1; della: as TIES with epsilon 0.1, seed 1.",
        "",
        "Method: each tool runs as a subprocess (bench/measure.py). **time** = wall time of the "
        "run plus a `sync` right after it (mergesmith fsyncs its output, mergekit does not, so "
        "this puts both on disk). **warm**: every input file read once just before the run. "
        f"**cold**: before the run {data.get('evicted_by') or 'the page cache was not dropped'}"
        "; then the tool's code (not its inputs) is loaded back by an import or `--help`, and "
        "fincore (mincore) confirms the inputs are out of the cache (`cached` column). "
        "**IO stall**: wall time in which no thread of the tool could run and one waited on "
        "the disk (sampled every 20 ms): reading that did not overlap computing. "
        "**floor** = reading every input once with plain read() (cold: right after the same "
        "drop; warm: a second read) + writing the output's size once with fsync, measured "
        "right before each run so that run and floor see the same machine; **x floor** is "
        "the median of each run's time over its own floor. "
        f"`other load` is the CPU other processes used during the run; above "
        f"{bt.DISTURBED_CORES} cores a run is repeated. Figures are medians of undisturbed "
        "runs (⚠: every run disturbed).",
        "",
    ]
    summary = summarize(data["runs"])
    if summary:
        lines += ["## Results", ""]
        header = ["method", "cache", "tool", "time s", "(wall + sync)", "input GB/s"]
        header += ["floor s (read + write)", "x floor", "vs mergekit", "CPU s", "IO stall s"]
        header += ["peak RSS GiB", "anon GiB", "cached", "other load", "n"]
        rows = []
        keys = list(summary)
        order = {m: i for i, m in enumerate(METHODS)}
        keys.sort(key=lambda k: (order.get(k[0], 99), CACHES.index(k[1]), k[2] != "mergekit"))
        for method, cache, tool in keys:
            s = summary[method, cache, tool]
            if s.get("failed"):
                rows.append([method, cache, tool, "FAILED", *[""] * (len(header) - 4)])
                continue
            mk = summary.get((method, cache, "mergekit"))
            vs_mk = (
                f"{mk['total_s'] / s['total_s']:.2f}x faster"
                if mk and not mk.get("failed") and tool != "mergekit"
                else ""
            )
            cached = [
                r["resident_input_bytes_before"]
                for r in data["runs"]
                if (r["method"], r["cache"], r["tool"]) == (method, cache, tool)
            ]
            known = [c for c in cached if c is not None]
            rows.append(
                [
                    method,
                    cache,
                    tool,
                    f"**{s['total_s']:.1f}**",
                    f"{s['wall_s']:.1f} + {s['sync_after_s']:.1f}",
                    f"{s['gb_per_s']:.2f}",
                    f"{s['floor_s']:.1f} ({s['floor_read_s']:.1f} + {s['floor_write_s']:.1f})",
                    f"**{s['x_floor']:.2f}x**",
                    vs_mk,
                    f"{s['cpu_s']:.1f}",
                    f"{s['io_stall_s']:.1f}",
                    f"{s['peak_rss_bytes'] / GIB:.2f}",
                    f"{s['peak_anon_bytes'] / GIB:.2f}",
                    f"{max(known) / s['input_bytes']:.1%}" if known else "?",
                    f"{s['other_load_cores']:.2f}" + (" ⚠" if s["disturbed"] else ""),
                    str(s["n"]),
                ]
            )
        lines += _table(header, rows)
        digests = {
            (method, cache, tool): s["digests"]
            for (method, cache, tool), s in summary.items()
            if not s.get("failed") and tool.startswith("mergesmith")
        }
        per_method: dict[str, set[str]] = {}
        for (method, _, _), ds in digests.items():
            per_method.setdefault(method, set()).update(ds)
        if per_method:
            lines += [
                "mergesmith output digests (blake2b of the shards; one per method means every "
                "mergesmith run of it, cold or warm, any --threads, wrote the same bytes): "
                + ", ".join(
                    f"{m} {len(d)} ({', '.join(sorted(d))})" for m, d in per_method.items()
                ),
                "",
            ]
    if data.get("notes"):
        lines += ["## Notes", "", *(f"- {n}" for n in data["notes"]), ""]
    return "\n".join(lines)


# --------------------------------------------------------------------------- main


def storage_info(path: Path) -> str:
    r = subprocess.run(["df", "--output=source,fstype", str(path)], capture_output=True, text=True)
    parts = r.stdout.split()
    return f"{parts[-2]} ({parts[-1]})" if len(parts) >= 2 else "?"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)

    def comma(choices: Sequence[str]):
        def parse(s: str) -> list[str]:
            items = [x.strip() for x in s.split(",") if x.strip()]
            bad = [x for x in items if x not in choices]
            if bad:
                raise argparse.ArgumentTypeError(f"unknown {bad}; choose from {list(choices)}")
            return [c for c in choices if c in items]

        return parse

    ap.add_argument("--only", type=comma(METHODS), default=list(METHODS), help="methods")
    ap.add_argument(
        "--tools", type=comma(("mergesmith", "mergekit")), default=["mergesmith", "mergekit"]
    )
    ap.add_argument("--cache", type=comma(CACHES), default=list(CACHES))
    ap.add_argument("--repeat", type=int, default=2, help="mergesmith runs per row (median)")
    ap.add_argument("--mergekit-repeat", type=int, default=1, help="mergekit runs per row")
    ap.add_argument(
        "--threads-sweep",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also run mergesmith TIES with --threads 1 (the default uses every core)",
    )
    ap.add_argument("--retries", type=int, default=2, help="extra attempts for disturbed runs")
    ap.add_argument("--timeout", type=float, default=3600.0, help="seconds per run")
    ap.add_argument("--max-wait-idle", type=float, default=300.0)
    ap.add_argument("--mergekit-bin", help="mergekit-yaml (also $MERGEKIT_YAML)")
    ap.add_argument("--fresh", action="store_true", help="forget the rows of earlier runs")
    ap.add_argument(
        "--report-only", action="store_true", help="rewrite latest.md from latest.json, run nothing"
    )
    ap.add_argument("--work", type=Path, default=BENCH / "work" / "large")
    ap.add_argument("--results", type=Path, default=BENCH / "results" / "large")
    args = ap.parse_args(argv)
    args.work = args.work.resolve()
    return args


def find_mergekit(args: argparse.Namespace) -> Path | None:
    beside = BENCH.parent / ".venv-mergekit" / "bin" / "mergekit-yaml"
    found = bt.find_mergekit("auto", args.mergekit_bin, BENCH / "work")
    return found or (beside if beside.exists() else None)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    args.results.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        data = json.loads((args.results / "latest.json").read_text())
        (args.results / "latest.md").write_text(render(data))
        return 0
    models = bt.ModelSet("large", 20, args.work / "models", 3)
    cmd = [sys.executable, str(BENCH / "make_models.py"), str(models.root), "--fine-tunes", "3"]
    subprocess.run([*cmd, *MODEL_ARGS], check=True)
    index = json.loads((models.base() / "model.safetensors.index.json").read_text())
    models.params = index["metadata"]["total_size"] // 2

    tools: list[bt.Tool] = []
    ms_exe = bt.find_mergesmith(None)
    if ms_exe is None:
        print("mergesmith executable not found", file=sys.stderr)
        return 2
    ms = bt.Tool("mergesmith", ms_exe, [])
    ms.version = bt.tool_version(Path(sys.executable), "mergesmith")
    sweep = bt.Tool(THREADS_SWEEP_TOOL, ms_exe, ["--threads", "1"], ms.version)
    mk = None
    if "mergekit" in args.tools:
        mk_exe = find_mergekit(args)
        if mk_exe is None:
            print("mergekit-yaml not found: give --mergekit-bin", file=sys.stderr)
            return 2
        mk = bt.Tool("mergekit", mk_exe, [])
        mk.version = bt.tool_version(mk_exe.parent / "python", "mergekit")
    tools = [t for t in (mk, ms) if t is not None and t.name in args.tools]

    bench = LargeBench(args, models)
    bench.data["machine"] = bt.machine_info([t for t in (mk, ms) if t is not None])
    bench.data["storage"] = storage_info(args.work)
    bench.data["mergesmith_cmd"] = "mergesmith run RECIPE OUT --overwrite [--seed 1]"
    bench.data["mergekit_cmd"] = "mergekit-yaml RECIPE OUT [--random-seed 1]"
    base_bytes = sum(f.stat().st_size for f in bt.files_under([models.base()]))
    # Every method writes one model's size.
    args.output_bytes = base_bytes
    bench.data["models"] = {
        "shape": "20 layers, hidden 2048, intermediate 5632, 32 heads, 4 KV heads, vocab 32000",
        "params": models.params,
        "bytes_per_model": base_bytes,
        "root": str(models.root),
    }

    if "cold" in args.cache:
        files = bt.files_under(models.fts(3))
        bt.read_all(models.fts(3))
        how = drop_page_cache(files)
        left = resident_bytes(files)
        total = sum(f.stat().st_size for f in files)
        if not how or (left is not None and left > COLD_RESIDENT_MAX * total):
            bench.note(
                f"the page cache could not be dropped ({how or 'not permitted'}, "
                f"{left} bytes still cached): cold runs skipped"
            )
            args.cache = [c for c in args.cache if c != "cold"]
        else:
            bench.data["evicted_by"] = how
            check = "fincore" if left is not None else "a timed read"
            bench.note(f"cold cache: {how}; eviction checked with {check}")

    plan: list[tuple[str, str, list[bt.Tool]]] = []
    for method in args.only:
        if method == "dare_ties" and args.threads_sweep and "mergesmith" in args.tools:
            plan.append(("threads", "ties", [sweep]))
        plan.append(("methods", method, tools))
    if args.threads_sweep and "mergesmith" in args.tools and "dare_ties" not in args.only:
        plan.append(("threads", "ties", [sweep]))
    for group, method, group_tools in plan:
        bench.run_method(group, method, group_tools)
    bench.save()
    print()
    print((args.results / "latest.md").read_text())
    return 0 if all(r["ok"] for r in bench.data["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
