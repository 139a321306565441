"""Scaling figures for the README, from measured JSON: mergesmith's TIES time and peak memory
against model size, number of models and --threads, with the read floor drawn in.

Inputs (run these first):
  bench/results/scaling/latest.json  python bench/bench_ties.py --only ties --scaling
                                     --mergekit skip --no-torch-code --no-budget
                                     --results bench/results/scaling
  bench/results/large/latest.json    python bench/bench_large.py (the 1B point, cold and warm,
                                     and the --threads sweep)

Writes bench/results/scaling.png and bench/results/scaling.json (every plotted point).

Usage: python bench/plot_scaling.py [--small PATH] [--large PATH] [--out PATH.png]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: no display on a build machine
import matplotlib.pyplot as plt

BENCH = Path(__file__).resolve().parent
RESULTS = BENCH / "results"
GIB = 1024**3


def _median_runs(runs: list[dict]) -> dict[str, float]:
    """Medians of the undisturbed good runs (of all good ones if every run was disturbed)."""
    good = [r for r in runs if r["ok"]]
    use = [r for r in good if not r.get("disturbed")] or good
    if not use:
        raise ValueError("no successful run")
    keys = ("wall_s", "sync_after_s", "peak_rss_bytes", "peak_anon_bytes")
    medians = {k: statistics.median(float(r[k]) for r in use) for k in keys}
    other = max(float(r["other_load_cores"]) for r in use)
    return medians | {"n": len(use), "other_load_cores": other}


def small_points(data: dict) -> list[dict]:
    """bench_ties.py's scaling group: one point per case (models x size), mergesmith only."""
    points = []
    cases = dict.fromkeys(r["case"] for r in data["runs"] if r["group"] == "scaling")
    for case in cases:
        runs = [
            r
            for r in data["runs"]
            if r["group"] == "scaling" and r["case"] == case and r["tool"] == "mergesmith"
        ]
        if not runs:
            continue
        floor = data["floor"][case]
        points.append(
            {
                "source": "bench_ties.py scaling",
                "fine_tunes": runs[0]["n_fine_tunes"],
                "params_per_model": runs[0]["params_per_model"],
                "threads": None,
                "cache": "warm",
                "input_bytes": floor["bytes"],
                "read_floor_s": floor["seconds"],
                **_median_runs(runs),
            }
        )
    return points


def large_points(data: dict) -> list[dict]:
    """bench_large.py's mergesmith TIES rows: 1B parameters, cold and warm, per --threads."""
    params = data["models"]["params"]
    points = []
    keys = dict.fromkeys(
        (r["tool"], r["cache"])
        for r in data["runs"]
        if r["method"] == "ties" and r["tool"].startswith("mergesmith")
    )
    for tool, cache in keys:
        runs = [
            r
            for r in data["runs"]
            if (r["method"], r["tool"], r["cache"]) == ("ties", tool, cache) and r["ok"]
        ]
        if not runs:
            continue
        points.append(
            {
                "source": "bench_large.py",
                "fine_tunes": 3,
                "params_per_model": params,
                "threads": runs[0]["threads"],
                "cache": cache,
                "input_bytes": runs[0]["input_bytes"],
                # Each run's floor was measured right before it (bench_large.py).
                "read_floor_s": statistics.median(r["floor_read_s"] for r in runs),
                **_median_runs(runs),
            }
        )
    return points


def plot(small: list[dict], large: list[dict], machine: dict, out: Path) -> None:
    default_threads = max((p["threads"] for p in large), default=None)
    fig, axes = plt.subplots(2, 3, figsize=(13, 7.5), constrained_layout=True)

    def panel(col: int, pts: list[dict], x: str, xlabel: str, title: str) -> None:
        pts = sorted(pts, key=lambda p: p[x])
        xs = [p[x] / 1e9 if x == "params_per_model" else p[x] for p in pts]
        t_ax, m_ax = axes[0][col], axes[1][col]
        t_ax.plot(xs, [p["wall_s"] for p in pts], "o-", label="mergesmith TIES")
        t_ax.plot(xs, [p["read_floor_s"] for p in pts], "s--", color="gray", label="read floor")
        m_ax.plot(xs, [p["peak_rss_bytes"] / GIB for p in pts], "o-", label="peak RSS")
        m_ax.plot(xs, [p["peak_anon_bytes"] / GIB for p in pts], "^-", label="peak anon")
        t_ax.set_title(title)
        for ax in (t_ax, m_ax):
            ax.set_xlabel(xlabel)
            ax.set_ylim(bottom=0)
            ax.grid(alpha=0.3)
        t_ax.set_ylabel("wall time (s)")
        m_ax.set_ylabel("GiB")

    size_pts = [p for p in small if p["fine_tunes"] == 3]
    size_pts += [p for p in large if p["cache"] == "warm" and p["threads"] == default_threads]
    panel(0, size_pts, "params_per_model", "parameters per model (B)", "base + 3, warm cache")
    count_pts = [
        p for p in small if p["params_per_model"] == min(q["params_per_model"] for q in small)
    ]
    panel(1, count_pts, "fine_tunes", "fine-tunes (plus the base)", "220M models, warm cache")

    t_ax, m_ax = axes[0][2], axes[1][2]
    for cache, style in (("warm", "o-"), ("cold", "D-")):
        pts = sorted((p for p in large if p["cache"] == cache), key=lambda p: p["threads"])
        if not pts:
            continue
        xs = [p["threads"] for p in pts]
        line = t_ax.plot(xs, [p["wall_s"] for p in pts], style, label=f"{cache} cache")[0]
        t_ax.axhline(
            pts[0]["read_floor_s"],
            ls="--",
            color=line.get_color(),
            alpha=0.7,
            label=f"read floor, {cache}",
        )
        m_ax.plot(xs, [p["peak_rss_bytes"] / GIB for p in pts], style, label=f"peak RSS, {cache}")
        m_ax.plot(
            xs,
            [p["peak_anon_bytes"] / GIB for p in pts],
            style.replace("-", ":"),
            color=m_ax.lines[-1].get_color(),
            label=f"peak anon, {cache}",
        )
    t_ax.set_title("1B models, base + 3")
    for ax in (t_ax, m_ax):
        ax.set_xlabel("--threads")
        ax.set_xticks([1, 2])
        ax.set_ylim(bottom=0)
        ax.grid(alpha=0.3)
    t_ax.set_ylabel("wall time (s)")
    m_ax.set_ylabel("GiB")
    for ax in axes.flat:
        ax.legend(fontsize=8)
    fig.suptitle("mergesmith TIES (bf16): time and peak memory", fontsize=12)
    busiest = max(p["other_load_cores"] for p in small + large)
    fig.text(
        0.5,
        -0.01,
        f"{machine.get('cpu')}, {machine.get('cores_usable')} cores, {machine.get('ram_gib')} "
        f"GiB RAM; medians of runs; other processes used up to {busiest:.1f} cores during them",
        ha="center",
        fontsize=8,
    )
    fig.savefig(out, dpi=110, bbox_inches="tight")


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--small", type=Path, default=RESULTS / "scaling" / "latest.json")
    ap.add_argument("--large", type=Path, default=RESULTS / "large" / "latest.json")
    ap.add_argument("--out", type=Path, default=RESULTS / "scaling.png")
    args = ap.parse_args(argv)
    small_data = json.loads(args.small.read_text())
    large_data = json.loads(args.large.read_text())
    small, large = small_points(small_data), large_points(large_data)
    machine = large_data.get("machine", {})
    plot(small, large, machine, args.out)
    summary = {
        "machine": {k: machine.get(k) for k in ("cpu", "cores_usable", "ram_gib", "kernel")},
        "small_run": small_data.get("started"),
        "large_run": large_data.get("started"),
        "points": small + large,
    }
    args.out.with_suffix(".json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"wrote {args.out} and {args.out.with_suffix('.json')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
