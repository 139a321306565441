"""`analyze(recipe, out_dir)`: the statistics of a recipe's merge, written as a report folder.

The folder is written beside its destination under a hidden name and renamed into place when
complete, so a failed or interrupted analysis never leaves a half-written report, and an
existing non-empty folder is replaced only with `overwrite`.
"""

from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergesmith.analyze.report import build_json, render_markdown
from mergesmith.analyze.run import collect

log = logging.getLogger("mergesmith")

REPORT = "report.md"
DATA = "analysis.json"


@dataclass
class AnalysisResult:
    out_dir: Path
    tensors: int
    models: list[str]
    seconds: float
    files: list[str] = field(default_factory=list)
    plots_skipped: str | None = None  # why there are no plots (matplotlib missing), if so

    @property
    def report(self) -> Path:
        return self.out_dir / REPORT


def analyze(
    recipe: str | Path | dict[str, Any],
    out_dir: str | Path = "analysis",
    *,
    seed: int = 0,
    overwrite: bool = False,
) -> AnalysisResult:
    """Stream the plan of `recipe` through the statistics and write report.md, analysis.json
    and PNG plots to `out_dir`. No model is written; `seed` is the seed a merge would use, so
    DARE's and DELLA's random drops are the ones `merge(..., seed=seed)` makes."""
    from mergesmith.api import check_output, prepare
    from mergesmith.output.finish import publish

    started = time.perf_counter()
    out = Path(out_dir).expanduser().absolute()
    plan, sources = prepare(recipe, seed)
    try:
        check_output(out, sources, overwrite)
        for warning in plan.warnings:
            log.warning(warning)
        analysis = collect(plan, sources)
    finally:
        for source in sources.values():
            source.close()
    name = plan.recipe.source_name  # the recipe file, or <recipe> for YAML text or a dict
    data = build_json(analysis, str(Path(name).absolute()) if Path(name).is_file() else name)
    staging = out.parent / f".{out.name}.analysis-partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    skipped = None
    try:
        try:
            from mergesmith.analyze.plots import plot_all

            plots = plot_all(data, staging)
        except ImportError:
            plots = []
            skipped = "matplotlib is not installed, so no plots were drawn (pip install matplotlib)"
            log.warning(skipped)
        (staging / DATA).write_text(json.dumps(data, indent=1) + "\n", encoding="utf-8")
        (staging / REPORT).write_text(render_markdown(data, plots), encoding="utf-8")
        publish(staging, out, overwrite)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return AnalysisResult(
        out_dir=out,
        tensors=len(analysis.records),
        models=analysis.models,
        seconds=time.perf_counter() - started,
        files=sorted(p.name for p in out.iterdir()),
        plots_skipped=skipped,
    )
