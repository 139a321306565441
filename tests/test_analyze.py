"""`mergesmith analyze`: its figures against values computed here another way (plain Python on
concatenated lists), on tiny hand-written models; the real command once as a subprocess."""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
import torch
from PIL import Image

from mergesmith import merge
from mergesmith.analyze import analyze
from mergesmith.analyze.stats import sign_conflicts
from mergesmith.api import prepare
from mergesmith.errors import MergeError
from mergesmith.toymodels import save_model
from tests.conftest import run_cli, write_recipe

CONFIG = {"model_type": "llama", "num_hidden_layers": 2, "vocab_size": 1000}
Q0, U0 = "model.layers.0.self_attn.q_proj.weight", "model.layers.0.mlp.up_proj.weight"
Q1, U1 = "model.layers.1.self_attn.q_proj.weight", "model.layers.1.mlp.up_proj.weight"
NORM = "model.norm.weight"
SHAPES = {Q0: (2, 2), U0: (4,), Q1: (2, 2), U1: (4,), NORM: (3,)}
# Each model's task vector, flat; multiples of 1/4 so that X - B is exact in float32, and
# distinct magnitudes within a tensor so that the top-k choice has no ties.
DELTAS = {
    Q0: [[1.0, -2.0, 3.0, 0.5], [-1.5, -1.0, 2.5, 0.25], [2.0, 0.75, -1.25, -4.0]],
    U0: [[0.5, 1.5, -2.5, 3.5], [-0.75, 2.0, 1.0, -3.0], [0.0, -1.0, 2.25, 1.75]],
    Q1: [[-1.0, 2.0, -3.0, 4.0], [1.25, -2.5, 0.5, 3.75], [-0.5, 1.5, 2.75, -3.25]],
    U1: [[3.0, -0.25, 1.5, -2.0], [2.5, 0.75, -1.75, 1.0], [-3.5, 0.5, 1.25, 2.0]],
    NORM: [[0.25, -0.5, 0.75], [0.5, 0.25, -1.0], [-0.75, 1.0, 0.5]],
}
WEIGHTS = [1.0, 0.5, 2.0]
DENSITIES = [0.5, 0.75, 1.0]


def base_of(name: str) -> list[float]:
    return [0.5 + 0.25 * i for i in range(math.prod(SHAPES[name]))]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A base and three fine-tunes whose task vectors are DELTAS."""
    root = tmp_path_factory.mktemp("tiny")
    base = {n: torch.tensor(base_of(n)).reshape(SHAPES[n]) for n in SHAPES}
    save_model(root / "base", base, CONFIG)
    for i in range(3):
        tuned = {
            n: torch.tensor([b + d for b, d in zip(base_of(n), DELTAS[n][i], strict=True)])
            for n in SHAPES
        }
        save_model(root / f"ft{i + 1}", {n: t.reshape(SHAPES[n]) for n, t in tuned.items()}, CONFIG)
    return root


def ties_recipe(root: Path, folder: Path) -> Path:
    models = "".join(
        f"  - model: {root}/ft{i + 1}\n    parameters: {{weight: {w}, density: {d}}}\n"
        for i, (w, d) in enumerate(zip(WEIGHTS, DENSITIES, strict=True))
    )
    return write_recipe(
        folder, f"merge_method: ties\nbase_model: {root}/base\nmodels:\n{models}dtype: float32\n"
    )


# The reference: per-tensor trim as SEMANTICS.md says, then every figure on concatenated lists.


def trim(delta: list[float], density: float) -> list[float]:
    if density >= 1:
        return list(delta)
    k = max(1, math.floor(density * len(delta)))
    keep = sorted(range(len(delta)), key=lambda i: (-abs(delta[i]), i))[:k]
    return [v if i in keep else 0.0 for i, v in enumerate(delta)]


def concat(parts: Iterable[list[float]]) -> list[float]:
    return list(itertools.chain.from_iterable(parts))


def sign(x: float) -> int:
    return (x > 0) - (x < 0)


def conflict_share(vectors: list[list[float]]) -> float | None:
    multi = conflicts = 0
    for entry in zip(*vectors, strict=True):
        signs = {sign(v) for v in entry if v != 0}
        if sum(v != 0 for v in entry) >= 2:
            multi += 1
            conflicts += len(signs) > 1
    return conflicts / multi if multi else None


def expected(names: list[str]) -> dict[str, Any]:
    """The figures of the group `names`, from the concatenated per-model lists."""
    d = [concat(DELTAS[n][i] for n in names) for i in range(3)]
    t = [concat(trim(DELTAS[n][i], DENSITIES[i]) for n in names) for i in range(3)]
    weighted = [[WEIGHTS[i] * v for v in d[i]] for i in range(3)]
    w_trim = [[WEIGHTS[i] * v for v in t[i]] for i in range(3)]
    elected = [0.0, 0.0, 0.0]
    for entry in zip(*w_trim, strict=True):
        s = 1 if sum(entry) >= 0 else -1
        for i, v in enumerate(entry):
            if sign(v) == s:
                elected[i] += abs(v)
    norms = [math.sqrt(sum(v * v for v in x)) for x in d]
    cos = [
        [
            sum(a * b for a, b in zip(d[i], d[j], strict=True)) / (norms[i] * norms[j])
            for j in range(3)
        ]
        for i in range(3)
    ]
    return {
        "norm": norms,
        "cosine": cos,
        "sign_conflict_before": conflict_share(weighted),
        "sign_conflict_after": conflict_share(w_trim),
        "removed_l1_share": [1 - sum(map(abs, t[i])) / sum(map(abs, d[i])) for i in range(3)],
        "elected_share": [e / sum(elected) for e in elected],
        "agreeing_share": [elected[i] / sum(map(abs, w_trim[i])) for i in range(3)],
    }


def assert_matches(got: dict[str, Any], want: dict[str, Any], where: str) -> None:
    for key, value in want.items():
        if key == "cosine":
            got_rows, value = concat(got[key]), concat(value)
        else:
            got_rows = got[key]
        assert got_rows == pytest.approx(value, rel=1e-6, abs=1e-9), f"{where}: {key}"


@pytest.fixture(scope="module")
def ties_folder(tiny: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The analysis of the TIES recipe: its output folder (read only)."""
    work = tmp_path_factory.mktemp("ties")
    result = analyze(ties_recipe(tiny, work), work / "analysis")
    assert result.report == work / "analysis" / "report.md"
    return work / "analysis"


@pytest.fixture(scope="module")
def ties_analysis(ties_folder: Path) -> dict[str, Any]:
    return json.loads((ties_folder / "analysis.json").read_text())


def test_hand_computed_figures_of_one_tensor(ties_analysis: dict[str, Any]) -> None:
    q0 = next(t for t in ties_analysis["tensors"] if t["name"] == Q0)
    # ft1's delta [1, -2, 3, 0.5]: norm sqrt(14.25); density 0.5 keeps 3 and -2, so 1.5 of
    # its L1 mass 6.5 goes.
    assert q0["norm"][0] == pytest.approx(math.sqrt(14.25))
    assert q0["removed_l1_share"][0] == pytest.approx(1.5 / 6.5)
    assert q0["removed_l1_share"][2] == 0.0  # density 1: nothing trimmed
    # Weighted and trimmed: ft1 [0, -2, 3, 0], ft2 [-0.75, -0.5, 1.25, 0], ft3 [4, 1.5, -2.5, -8]:
    # the last entry has one nonzero value only; the other three each mix signs.
    assert q0["sign_conflict_after"] == pytest.approx(1.0)
    assert q0["layer"] == 0 and q0["kind"] == "self_attn.q_proj"


@pytest.mark.parametrize(
    ("where", "names"),
    [
        ("tensor", [Q0]),
        ("tensor", [U0]),
        ("tensor", [NORM]),
        ("layer 0", [Q0, U0]),
        ("layer 1", [Q1, U1]),
        ("kind self_attn.q_proj", [Q0, Q1]),
        ("kind mlp.up_proj", [U0, U1]),
        ("overall", [Q0, U0, Q1, U1, NORM]),
    ],
)
def test_figures_match_an_independent_computation(
    ties_analysis: dict[str, Any], where: str, names: list[str]
) -> None:
    if where == "tensor":
        got = next(t for t in ties_analysis["tensors"] if t["name"] == names[0])
    elif where.startswith("layer"):
        got = next(g for g in ties_analysis["layers"] if g["layer"] == int(where.split()[1]))
    elif where.startswith("kind"):
        got = next(g for g in ties_analysis["kinds"] if g["kind"] == where.split()[1])
    else:
        got = ties_analysis["overall"]
    assert got["tensors"] == len(names)
    assert_matches(got, expected(names), where)


def test_json_names_models_method_and_kinds(ties_analysis: dict[str, Any], tiny: Path) -> None:
    assert [m["label"] for m in ties_analysis["models"]] == ["ft1", "ft2", "ft3"]
    assert ties_analysis["method"] == "ties" and ties_analysis["consensus"] == ["sum"]
    assert ties_analysis["sparsifier"] == "magnitude"
    assert ties_analysis["reference"] == "base"
    assert ties_analysis["base_models"] == [str(tiny / "base")]
    assert [g["kind"] for g in ties_analysis["kinds"]] == [
        "mlp.up_proj",
        "self_attn.q_proj",
        "model.norm",
    ]
    assert set(ties_analysis["definitions"]) >= {"sign_conflict", "removed_l1_share"}


def test_report_and_plots_are_written_and_readable(ties_folder: Path) -> None:
    out = ties_folder
    text = (out / "report.md").read_text()
    assert "## Per layer" in text and "## Definitions" in text and "sign election sum" in text
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["cosine.png", "elected_share.png", "norms.png", "removed_mass.png", "signs.png"]
    for name in pngs:
        assert f"]({name})" in text
        with Image.open(out / name) as image:
            assert image.format == "PNG" and image.size[0] > 100 and image.size[1] > 100
            image.verify()


def test_a_non_empty_folder_is_replaced_only_with_overwrite(tiny: Path, tmp_path: Path) -> None:
    out = tmp_path / "analysis"
    out.mkdir()
    (out / "stale.txt").write_text("old")
    with pytest.raises(MergeError, match="not empty"):
        analyze(ties_recipe(tiny, tmp_path), out)
    assert (out / "stale.txt").exists()
    analyze(ties_recipe(tiny, tmp_path), out, overwrite=True)
    assert not (out / "stale.txt").exists() and (out / "analysis.json").exists()


@pytest.mark.parametrize("method", ["dare_linear", "della_linear"])
def test_random_drop_shares_are_those_of_the_actual_merge(tmp_path: Path, method: str) -> None:
    """The entries the merge keeps, read back from its output, give the analysis's figure."""
    g = torch.Generator().manual_seed(5)
    base = {Q0: torch.zeros(48, 40)}
    delta = torch.randn(48, 40, generator=g)
    save_model(tmp_path / "base", base, CONFIG)
    save_model(tmp_path / "ft", {Q0: delta}, CONFIG)
    recipe = write_recipe(
        tmp_path,
        f"merge_method: {method}\nbase_model: {tmp_path}/base\n"
        f"models:\n  - model: {tmp_path}/ft\n    parameters: {{weight: 1, density: 0.4}}\n",
    )
    merge(recipe, tmp_path / "merged", seed=3)
    from safetensors.torch import load_file

    merged = load_file(tmp_path / "merged" / "model.safetensors")[Q0]
    kept = merged != 0
    want = 1 - float(delta.abs()[kept].sum()) / float(delta.abs().sum())
    analyze(recipe, tmp_path / "analysis", seed=3)
    data = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert data["overall"]["removed_l1_share"][0] == pytest.approx(want, rel=1e-5)
    analyze(recipe, tmp_path / "other-seed", seed=4)
    other = json.loads((tmp_path / "other-seed" / "analysis.json").read_text())
    assert other["overall"]["removed_l1_share"][0] != pytest.approx(want, rel=1e-5)


def test_without_a_base_models_are_compared_with_their_mean(tiny: Path, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        f"merge_method: linear\nmodels:\n  - model: {tiny}/ft1\n    parameters: {{weight: 1}}\n"
        f"  - model: {tiny}/ft2\n    parameters: {{weight: 1}}\n",
    )
    analyze(recipe, tmp_path / "analysis")
    data = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    overall = data["overall"]
    assert data["reference"] == "mean"
    # X1 - mean = (d1 - d2) / 2 = -(X2 - mean): equal norms, cosine -1.
    d1 = concat(DELTAS[n][0] for n in SHAPES)
    d2 = concat(DELTAS[n][1] for n in SHAPES)
    half = math.sqrt(sum((a - b) ** 2 for a, b in zip(d1, d2, strict=True))) / 2
    assert overall["norm"] == pytest.approx([half, half], rel=1e-6)
    assert overall["cosine"][0][1] == pytest.approx(-1.0, abs=1e-6)
    assert overall["sign_conflict_before"] is None and overall["removed_l1_share"] == [None, None]
    text = (tmp_path / "analysis" / "report.md").read_text()
    assert "no base model" in text
    assert (tmp_path / "analysis" / "norms.png").exists()


def test_slices_with_different_models_per_layer_do_not_crash(tiny: Path, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        "merge_method: passthrough\nslices:\n"
        f"  - sources: [{{model: {tiny}/ft1, layer_range: [0, 1]}}]\n"
        f"  - sources: [{{model: {tiny}/ft2, layer_range: [1, 2]}}]\n",
    )
    analyze(recipe, tmp_path / "analysis")
    data = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert len(data["models"]) == 2
    layer0 = data["layers"][0]
    assert layer0["norm"][1] is None and layer0["cosine"][0][1] is None


def test_a_group_of_the_base_alone_is_skipped(tiny: Path, tmp_path: Path) -> None:
    # task_arithmetic with only its base writes the base: no task vector to describe.
    recipe = write_recipe(
        tmp_path,
        f"merge_method: task_arithmetic\nbase_model: {tiny}/base\n"
        f"slices:\n  - sources: [{{model: {tiny}/base, layer_range: [0, 2]}}]\n",
    )
    analyze(recipe, tmp_path / "analysis")
    data = json.loads((tmp_path / "analysis" / "analysis.json").read_text())
    assert data["models"] == [] and data["overall"]["tensors"] == 0
    assert set(data["skipped"]) == set(SHAPES)


def test_every_input_is_released_after_its_job(tiny: Path, tmp_path: Path, monkeypatch) -> None:
    from mergesmith.analyze.run import collect
    from mergesmith.sources.base import ModelSource

    plan, sources = prepare(ties_recipe(tiny, tmp_path))
    released: list[tuple[str, str]] = []
    for source in sources.values():
        monkeypatch.setattr(
            source, "release", lambda name, ref=source.ref: released.append((ref, name))
        )
    assert all(isinstance(s, ModelSource) for s in sources.values())
    collect(plan, sources)
    wanted = [(inp.model, inp.name) for job in plan.jobs for inp in (job.base, *job.inputs) if inp]
    assert sorted(released) == sorted(wanted)
    for source in sources.values():
        source.close()


def test_sign_conflicts_count_only_entries_with_two_nonzero_signs() -> None:
    weighted = [
        torch.tensor([1.0, -1.0, 0.0, 2.0, 0.0, 1.0]),
        torch.tensor([2.0, 0.0, 0.0, -1.0, 0.0, -3.0]),
        torch.tensor([0.0, 0.0, 3.0, 1.0, 0.0, 0.0]),
    ]
    # entries 0, 3 and 5 have two or more nonzero values; 3 and 5 disagree.
    assert sign_conflicts(weighted) == (3, 2)


def test_cli_writes_the_report_and_no_model(tiny: Path, tmp_path: Path) -> None:
    recipe = ties_recipe(tiny, tmp_path)
    out = tmp_path / "report"
    done = run_cli("analyze", recipe, "--out", out)
    assert done.returncode == 0, done.stderr
    assert str(out / "report.md") in done.stdout
    files = {p.name for p in out.iterdir()}
    assert {"report.md", "analysis.json", "norms.png"} <= files
    assert not any(n.endswith((".safetensors", ".bin")) or n == "config.json" for n in files)
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())  # no staging left


def test_cli_bad_recipe_is_one_error_line_and_exit_2(tiny: Path, tmp_path: Path) -> None:
    recipe = write_recipe(
        tmp_path,
        f"merge_method: ties\nbase_model: {tiny}/base\nmodels:\n  - model: {tiny}/ft1\n"
        "    parameters: {weight: 1}\nparamters: {}\n",
    )
    result = run_cli("analyze", recipe, "--out", tmp_path / "out")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and "paramters" in lines[0]
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_without_matplotlib_the_report_and_json_are_still_written(
    tiny: Path, tmp_path: Path, monkeypatch
) -> None:
    import sys

    for name in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    result = analyze(ties_recipe(tiny, tmp_path), tmp_path / "analysis")
    assert result.plots_skipped and "matplotlib" in result.plots_skipped
    assert sorted(result.files) == ["analysis.json", "report.md"]
