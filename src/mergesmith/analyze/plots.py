"""PNG figures of the per-layer numbers, readable at a glance: heatmaps over layers x models for
norms, removed mass and elected-sign shares; curves over layers for sign conflicts and cosines.

matplotlib is imported only here, only when plotting, and through its object interface
(Figure + the Agg canvas), so the process-wide pyplot backend of a caller is never changed.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

Cell = float | None


def plot_all(data: dict[str, Any], folder: Path) -> list[tuple[str, str]]:
    """Write the figures that apply to this analysis into `folder`; (file name, caption) each.
    Nothing is drawn without layer tensors."""
    layers = data["layers"]
    if not layers:
        return []
    labels = [m["label"] for m in data["models"]]
    rows = [str(g["layer"]) for g in layers]
    made = []

    def per_layer(key: str) -> list[list[Cell]]:
        return [list(g[key]) for g in layers]

    caption = "Task-vector norm ||delta|| per layer and model"
    norms = per_layer("norm")
    top = max((v for row in norms for v in row if v is not None), default=0.0)
    _heatmap(
        norms,
        rows,
        labels,
        caption,
        "L2 norm",
        "{:.3g}",
        folder / "norms.png",
        limits=(0.0, top or 1.0),
    )
    made.append(("norms.png", caption))
    if _any(per_layer("removed_l1_share")):
        caption = "Share of L1 mass removed by trimming"
        _heatmap(
            _percent(per_layer("removed_l1_share")),
            rows,
            labels,
            caption,
            "% removed",
            "{:.0f}",
            folder / "removed_mass.png",
            limits=(0, 100),
        )
        made.append(("removed_mass.png", caption))
    before = [g["sign_conflict_before"] for g in layers]
    if any(v is not None for v in before):
        caption = "Sign conflicts per layer, before and after trimming"
        series = {"before trimming": _percent([before])[0]}
        after = [g["sign_conflict_after"] for g in layers]
        if any(v is not None for v in after):
            series["after trimming"] = _percent([after])[0]
        _curves(
            rows,
            series,
            caption,
            "% of entries with >= 2 nonzero",
            folder / "signs.png",
            limits=(0, 100),
        )
        made.append(("signs.png", caption))
    if len(labels) > 1:
        caption = "Cosine similarity of task vectors per layer"
        series = {
            f"{labels[a]} / {labels[b]}": [g["cosine"][a][b] for g in layers]
            for a in range(len(labels))
            for b in range(a + 1, len(labels))
        }
        _curves(rows, series, caption, "cosine", folder / "cosine.png", zero_line=True)
        made.append(("cosine.png", caption))
    if _any(per_layer("elected_share")):
        caption = "Share of the elected-sign mass from each model"
        _heatmap(
            _percent(per_layer("elected_share")),
            rows,
            labels,
            caption,
            "% of elected mass",
            "{:.0f}",
            folder / "elected_share.png",
            limits=(0, 100),
        )
        made.append(("elected_share.png", caption))
    return made


def _any(values: Sequence[Sequence[Cell]]) -> bool:
    return any(v is not None for row in values for v in row)


def _percent(values: Sequence[Sequence[Cell]]) -> list[list[Cell]]:
    return [[None if v is None else 100 * v for v in row] for row in values]


def _figure(width: float, height: float) -> Any:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), dpi=100, layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def _heatmap(
    values: Sequence[Sequence[Cell]],
    rows: Sequence[str],
    columns: Sequence[str],
    title: str,
    unit: str,
    cell_format: str,
    path: Path,
    limits: tuple[float, float] | None = None,
) -> None:
    """Layers down, models across; each cell written in when the grid is small enough to read."""
    import numpy as np

    grid = np.array([[math.nan if v is None else v for v in row] for row in values], dtype=float)
    figure = _figure(max(4.5, 1.3 * len(columns) + 2.5), max(3.0, 0.32 * len(rows) + 1.6))
    axes = figure.add_subplot()
    low, high = limits or (None, None)
    image = axes.imshow(grid, aspect="auto", cmap="viridis", vmin=low, vmax=high)
    figure.colorbar(image, ax=axes, label=unit)
    axes.set_xticks(range(len(columns)), labels=columns, rotation=20, ha="right")
    axes.set_yticks(range(len(rows)), labels=rows)
    axes.set_ylabel("layer")
    axes.set_title(title, fontsize=10)
    if len(rows) * len(columns) <= 200:
        finite = grid[np.isfinite(grid)]
        middle = (low + high) / 2 if limits else (float(finite.mean()) if finite.size else 0.0)
        for r in range(len(rows)):
            for c in range(len(columns)):
                value = grid[r, c]
                if math.isfinite(value):
                    color = "black" if value > middle else "white"
                    axes.text(
                        c,
                        r,
                        cell_format.format(value),
                        ha="center",
                        va="center",
                        color=color,
                        fontsize=7,
                    )
    figure.savefig(path)


def _curves(
    xs: Sequence[str],
    series: dict[str, Sequence[Cell]],
    title: str,
    unit: str,
    path: Path,
    limits: tuple[float, float] | None = None,
    zero_line: bool = False,
) -> None:
    """One line per series over the layers; gaps where a value is undefined."""
    figure = _figure(max(5.0, 0.25 * len(xs) + 3.0), 3.4)
    axes = figure.add_subplot()
    positions = list(range(len(xs)))
    for label, values in series.items():
        axes.plot(
            positions,
            [math.nan if v is None else v for v in values],
            marker="o",
            ms=3,
            label=label,
        )
    if zero_line:
        axes.axhline(0.0, color="gray", linewidth=0.8)
    if limits is not None:
        axes.set_ylim(*limits)
    step = max(1, len(xs) // 16)
    axes.set_xticks(positions[::step], labels=list(xs)[::step])
    axes.set_xlabel("layer")
    axes.set_ylabel(unit)
    axes.set_title(title, fontsize=10)
    axes.grid(alpha=0.3)
    axes.legend(fontsize=8)
    figure.savefig(path)
