"""The analysis as data (analysis.json) and as a page a person reads (report.md).

The markdown is rendered from the same dictionary that is written as JSON, so the two can never
disagree; the JSON also holds every per-tensor figure and the raw sums behind each figure.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from mergesmith.analyze.groups import group
from mergesmith.analyze.run import Analysis
from mergesmith.analyze.stats import summarize

FORMAT_VERSION = 1

DEFINITIONS = {
    "task_vector": "delta_i = X_i - B per tensor, in float32, after the same reads as the merge "
    "(embedding crop, vocabulary re-indexing). Without a base model there are no task vectors: "
    "delta_i is then X_i minus the mean of the models, and only norms and cosines are given.",
    "group": "A layer, a tensor kind (the name without the layer prefix and '.weight') or the "
    "whole model: its figures are those of its tensors concatenated (ratios of summed sums).",
    "norm": "||delta_i||_2 over the group's entries (the recipe's weights are not applied).",
    "cosine": "dot(delta_a, delta_b) / (||delta_a|| ||delta_b||) over the entries of the tensors "
    "both models take part in; null when a norm is 0.",
    "sign_conflict": "Among entries where at least two models have a nonzero weighted task "
    "vector w_i * delta_i, the share where those nonzero signs do not all agree (weight 0: no "
    "part; a negative weight flips the sign). 'before' uses the whole task vectors, 'after' the "
    "method's sparsified ones, which is what sign election sees; null when no entry qualifies.",
    "removed_l1_share": "1 - sum|kept delta_i| / sum|delta_i|: the share of each model's L1 "
    "mass the method's sparsifier removes (before 'rescale' restores the L1 norm), with the "
    "merge's own densities, cut rule and, for DARE and DELLA, the same random draws as "
    "'mergesmith run --seed SEED'; 0 when nothing is trimmed, null for methods without one.",
    "elected_share": "With sign election: W_i = w_i * sparsified, rescaled delta_i and s the "
    "elected sign; model i's share of sum_j sum|W_j| over entries where sign(W_j) = s, i.e. "
    "how much of what the merge sums comes from it.",
    "agreeing_share": "With sign election: the share of model i's own sum|W_i| whose sign equals "
    "the elected sign (what survives election).",
}


def model_labels(models: Sequence[str]) -> list[str]:
    """Short column names: a model's folder or repository name, made unique with its position."""
    names = []
    for ref in models:
        plain = ref.split("+", 1)[0].split("@", 1)[0].rstrip("/")
        names.append(Path(plain).name or ref)
    return [name if names.count(name) == 1 else f"{name} #{i + 1}" for i, name in enumerate(names)]


def build_json(analysis: Analysis, recipe: str) -> dict[str, Any]:
    """Every number of the analysis, grouped per layer, per kind, per tensor and overall."""
    models = analysis.models
    grouped = group(analysis.records)
    references = sorted({r.reference for r in analysis.records})
    return {
        "format_version": FORMAT_VERSION,
        "recipe": recipe,
        "method": analysis.method,
        "seed": analysis.seed,
        "sparsifier": analysis.sparsifier,
        "consensus": analysis.consensus,
        "reference": references[0] if len(references) == 1 else "mixed",
        "base_models": analysis.bases,
        "models": [
            {"label": label, "ref": ref}
            for label, ref in zip(model_labels(models), models, strict=True)
        ],
        "definitions": DEFINITIONS,
        "overall": summarize(grouped.overall, models),
        "layers": [
            {"layer": layer, **summarize(sums, models)} for layer, sums in grouped.layers.items()
        ],
        "kinds": [
            {"kind": kind, **summarize(sums, models)} for kind, sums in grouped.kinds.items()
        ],
        "tensors": [
            {
                "name": r.name,
                "layer": r.layer,
                "kind": r.kind,
                "reference": r.reference,
                **summarize(r.sums, models),
            }
            for r in analysis.records
        ],
        "skipped": analysis.skipped,
        "warnings": analysis.warnings,
    }


def _num(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _pct(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f} %"


def _cos(value: float | None) -> str:
    return "n/a" if value is None else f"{value:+.3f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return [*lines, ""]


def _pairs(labels: Sequence[str]) -> list[tuple[int, int]]:
    return [(a, b) for a in range(len(labels)) for b in range(a + 1, len(labels))]


def _has(groups: Sequence[dict[str, Any]], key: str) -> bool:
    """Whether any group has a value for a per-model (list) or scalar figure."""
    for g in groups:
        value = g[key]
        if any(v is not None for v in value) if isinstance(value, list) else value is not None:
            return True
    return False


def render_markdown(data: dict[str, Any], plots: Sequence[tuple[str, str]]) -> str:
    """report.md from the JSON dictionary; `plots` are (file name, caption) pairs."""
    labels = [m["label"] for m in data["models"]]
    overall = data["overall"]
    everything = [overall, *data["layers"], *data["kinds"]]
    trims = _has(everything, "removed_l1_share")
    signs = _has(everything, "sign_conflict_before")
    elects = _has(everything, "elected_share")
    out = ["# Merge analysis", ""]
    method = f"`{data['method']}`"
    extras = []
    if data["sparsifier"]:
        extras.append(f"sparsifier {data['sparsifier']}")
    if data["consensus"]:
        extras.append(f"sign election {', '.join(data['consensus'])}")
    if extras:
        method += f" ({'; '.join(extras)})"
    out.append(f"- recipe: `{data['recipe']}`")
    out.append(f"- method: {method}; seed {data['seed']}")
    if data["reference"] == "base":
        bases = ", ".join(f"`{b}`" for b in data["base_models"])
        out.append(f"- task vectors: each model minus the base model {bases}")
    else:
        out.append(
            "- **no base model** as reference (the method merges without one), so no task "
            "vectors: each model's difference from the mean of the models is described instead "
            "(norms and cosines only; sign conflicts, trimming and sign election need a base)"
        )
    out.append(
        f"- {overall['tensors']} tensors analysed, {overall['numel']:,} entries per model"
        + (f"; {len(data['skipped'])} integer buffers skipped" if data["skipped"] else "")
    )
    out += ["- every number, per tensor too: `analysis.json`", ""]
    out += _table(
        ["model", "reference"],
        [[f"**{lab}**", f"`{m['ref']}`"] for lab, m in zip(labels, data["models"], strict=True)],
    )

    out += ["## Whole model", ""]
    headers = ["model", "L2 norm of delta", "L1 norm"]
    if trims:
        headers.append("L1 mass removed by trimming")
    if elects:
        headers += ["share of elected-sign mass", "own mass agreeing"]
    rows = []
    for i, label in enumerate(labels):
        row = [label, _num(overall["norm"][i]), _num(overall["l1"][i])]
        if trims:
            row.append(_pct(overall["removed_l1_share"][i]))
        if elects:
            row += [_pct(overall["elected_share"][i]), _pct(overall["agreeing_share"][i])]
        rows.append(row)
    out += _table(headers, rows)
    if signs:
        line = f"Sign conflicts: {_pct(overall['sign_conflict_before'])} of entries before trimming"
        if trims:
            line += f", {_pct(overall['sign_conflict_after'])} after"
        out += [line + ".", ""]
    if len(labels) > 1:
        out += ["Cosine similarity of the task vectors:", ""]
        out += _table(
            ["", *labels],
            [[lab, *map(_cos, overall["cosine"][i])] for i, lab in enumerate(labels)],
        )

    layers = data["layers"]
    if layers:
        out += ["## Per layer", ""]
        for name, caption in plots:
            out += [f"![{caption}]({name})", ""]
        headers = ["layer", *[f"norm {lab}" for lab in labels]]
        if trims:
            headers += [f"removed {lab}" for lab in labels]
        rows = []
        for g in layers:
            row = [str(g["layer"]), *map(_num, g["norm"])]
            if trims:
                row += list(map(_pct, g["removed_l1_share"]))
            rows.append(row)
        out += _table(headers, rows)
        pairs = _pairs(labels)
        headers = ["layer"]
        if signs:
            headers += ["sign conflict before"] + (["after"] if trims else [])
        headers += [f"cos {labels[a]}/{labels[b]}" for a, b in pairs]
        if len(headers) > 1:
            rows = []
            for g in layers:
                row = [str(g["layer"])]
                if signs:
                    row.append(_pct(g["sign_conflict_before"]))
                    if trims:
                        row.append(_pct(g["sign_conflict_after"]))
                row += [_cos(g["cosine"][a][b]) for a, b in pairs]
                rows.append(row)
            out += _table(headers, rows)
        if elects:
            out += ["Share of the elected-sign mass from each model:", ""]
            out += _table(
                ["layer", *labels],
                [[str(g["layer"]), *map(_pct, g["elected_share"])] for g in layers],
            )

    out += ["## Per tensor kind", ""]
    headers = ["kind", "tensors", *[f"norm {lab}" for lab in labels]]
    if trims:
        headers += [f"removed {lab}" for lab in labels]
    if signs:
        headers += ["conflict before"] + (["after"] if trims else [])
    if elects:
        headers += [f"elected {lab}" for lab in labels]
    rows = []
    for g in data["kinds"]:
        row = [f"`{g['kind']}`", str(g["tensors"]), *map(_num, g["norm"])]
        if trims:
            row += list(map(_pct, g["removed_l1_share"]))
        if signs:
            row.append(_pct(g["sign_conflict_before"]))
            if trims:
                row.append(_pct(g["sign_conflict_after"]))
        if elects:
            row += list(map(_pct, g["elected_share"]))
        rows.append(row)
    out += _table(headers, rows)

    out += ["## Definitions", ""]
    out += [f"- **{key}**: {text}" for key, text in data["definitions"].items()]
    if data["warnings"]:
        out += ["", "## Warnings from planning", ""]
        out += [f"- {w}" for w in data["warnings"]]
    return "\n".join(out) + "\n"
