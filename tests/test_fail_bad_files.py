"""Damaged or unsafe model files: a clear exit-2 error naming the file (and the tensor where one
is to blame), no traceback, and never a finished-looking output folder."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergesmith import merge
from mergesmith.api import prepare
from mergesmith.errors import MergeError, MergeErrors
from mergesmith.toymodels import ToyShape, base_tensors, finetune_tensors, llama_config, save_model
from tests.conftest import run_cli, write_recipe

Family = tuple[Path, list[Path]]


class RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def names(message: str, file: Path) -> bool:
    """Whether a message points at `file`: its path, or its name and its folder's path."""
    return str(file) in message or (f"'{file.name}'" in message and str(file.parent) in message)


def messages(exc: MergeError) -> list[str]:
    return [e.message for e in (exc.errors if isinstance(exc, MergeErrors) else [exc])]


def assert_no_finished_output(out: Path) -> None:
    """OUT never appears; whatever was left beside it is hidden and holds no config or card."""
    assert not out.exists()
    for leftover in out.parent.iterdir():
        if leftover.name.startswith(f".{out.name}"):
            assert leftover.is_dir()
            assert not (leftover / "config.json").exists()
            assert not (leftover / "README.md").exists()
        else:
            assert out.name not in leftover.name, leftover


def sharded_copy(folder: Path, source: Path) -> Path:
    tensors = load_file(source / "model.safetensors")
    config = json.loads((source / "config.json").read_text())
    return save_model(folder, tensors, config, shards=3)


def bad_model(root: Path, family: Family, kind: str) -> tuple[Path, Path]:
    """Build one damaged model; returns (the folder the recipe names, the file to blame)."""
    _, tuned = family
    folder = root / kind
    if kind in ("missing_shard", "dangling_shard", "bad_index"):
        sharded_copy(folder, tuned[0])
    elif kind != "not_weights_file":
        shutil.copytree(tuned[0], folder)
    weights = folder / "model.safetensors"
    second = folder / "model-00002-of-00003.safetensors"
    index = folder / "model.safetensors.index.json"
    if kind == "truncated":
        data = weights.read_bytes()
        weights.write_bytes(data[: len(data) * 3 // 5])
        return folder, weights
    if kind == "corrupt_header":
        with open(weights, "r+b") as fh:
            fh.seek(8)
            fh.write(b"\x00\xff not json \xff\x00")
        return folder, weights
    if kind == "header_length":
        with open(weights, "r+b") as fh:
            fh.write((1 << 40).to_bytes(8, "little"))
        return folder, weights
    if kind == "missing_shard":
        second.unlink()
        return folder, second
    if kind == "dangling_shard":
        second.unlink()
        second.symlink_to(root / "nowhere" / second.name)
        return folder, second
    if kind == "dangling_single":
        weights.unlink()
        weights.symlink_to(root / "nowhere" / weights.name)
        return folder, weights
    if kind == "bad_index":
        index.write_text('{"weight_map": {"model.norm.weight": ')
        return folder, index
    if kind == "not_weights_file":
        # A weights file is a model (tests/test_checkpoint_files.py); config.json is not.
        return tuned[0] / "config.json", tuned[0] / "config.json"
    if kind == "no_weights":
        weights.unlink()
        return folder, folder
    raise AssertionError(kind)


BAD_KINDS = [
    "truncated",
    "corrupt_header",
    "header_length",
    "missing_shard",
    "dangling_shard",
    "bad_index",
    "not_weights_file",
    "no_weights",
]


def malicious_bin(folder: Path, marker: Path, zipped: bool) -> Path:
    """A real checkpoint (torch.save's zip format, or a bare legacy pickle) that would run
    `touch MARKER` if it were loaded without weights_only."""
    folder.mkdir(parents=True)
    shape = ToyShape()
    (folder / "config.json").write_text(json.dumps(llama_config(shape, torch.float32)))
    state = {**base_tensors(shape, 3), "extra": RunsCode(marker)}
    path = folder / "pytorch_model.bin"
    if zipped:
        torch.save(state, path)
    else:
        with open(path, "wb") as fh:
            pickle.dump(state, fh, protocol=2)
    return path


def ties(base: Path, *models: Path, density: float = 0.5) -> str:
    body = "".join(
        f"  - model: {m}\n    parameters: {{weight: 1.0, density: {density}}}\n" for m in models
    )
    return f"merge_method: ties\nbase_model: {base}\nmodels:\n{body}"


def poisoned(folder: Path, source: Path, tensor: str, value: float) -> Path:
    """A copy of `source` with one entry of one tensor set to `value` (NaN or Inf)."""
    shutil.copytree(source, folder)
    tensors = load_file(folder / "model.safetensors")
    tensors[tensor].view(-1)[tensors[tensor].numel() // 3] = value
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    return folder


@pytest.fixture(scope="module")
def cli(family: Family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The module's CLI runs, concurrently: each costs a process start."""
    base, tuned = family
    root = tmp_path_factory.mktemp("bad-files")
    blamed = {kind: bad_model(root / "models", family, kind) for kind in BAD_KINDS}
    marker = root / "pwned"
    evil = malicious_bin(root / "models" / "malicious", marker, zipped=True)
    all_bad = [folder for folder, _ in blamed.values()] + [evil.parent]
    nan_last = poisoned(root / "models" / "nan-last", tuned[1], "model.norm.weight", float("nan"))
    recipes = {
        "all_bad": write_recipe(root, ties(base, *all_bad), "all-bad.yml"),
        "nan_last": write_recipe(root, ties(base, tuned[0], nan_last), "nan-last.yml"),
    }
    # Each in a folder of its own, so that anything left beside OUT is this run's.
    outs = {
        name: root / name / "merged" for name in ("all_bad", "nan", "nan_allowed", "nan_overwrite")
    }
    for out in outs.values():
        out.parent.mkdir()
    # An earlier merge that --overwrite may replace only with a finished one.
    outs["nan_overwrite"].mkdir()
    (outs["nan_overwrite"] / "config.json").write_text('{"earlier": true}')
    commands: dict[str, tuple[str | Path, ...]] = {
        "all_bad": ("run", recipes["all_bad"], outs["all_bad"]),
        # One thread runs the jobs largest first, so the 1-D model.norm.weight comes last.
        "nan": ("run", recipes["nan_last"], outs["nan"], "--threads", "1"),
        "nan_allowed": ("run", recipes["nan_last"], outs["nan_allowed"], "--allow-nonfinite"),
        "nan_overwrite": ("run", recipes["nan_last"], outs["nan_overwrite"], "--overwrite"),
    }
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        futures = {name: pool.submit(run_cli, *args) for name, args in commands.items()}
        results: dict[str, subprocess.CompletedProcess] = {
            name: future.result() for name, future in futures.items()
        }
    return {
        "results": results,
        "outs": outs,
        "blamed": blamed,
        "evil": evil,
        "marker": marker,
        "nan_model": nan_last,
    }


def test_every_bad_model_file_is_named_in_one_run_and_nothing_is_written(cli) -> None:
    result = cli["results"]["all_bad"]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    for kind, (_, file) in cli["blamed"].items():
        assert any(names(line, file) for line in errors), (kind, result.stderr)
    assert any(str(cli["evil"]) in line and "refused" in line for line in errors), result.stderr
    out = cli["outs"]["all_bad"]
    assert_no_finished_output(out)
    assert not (out.parent / f".{out.name}.partial").exists()


def test_a_pickle_that_would_run_code_is_refused_and_never_runs(cli) -> None:
    assert not cli["marker"].exists()


@pytest.mark.parametrize("kind", BAD_KINDS)
def test_each_bad_model_alone_is_one_error_naming_its_file(
    family: Family, tmp_path: Path, kind: str
) -> None:
    base, _ = family
    folder, file = bad_model(tmp_path, family, kind)
    with pytest.raises(MergeError) as info:
        prepare(ties(base, folder))
    (message,) = messages(info.value)
    assert names(message, file), message


@pytest.mark.parametrize("kind", ["dangling_shard", "dangling_single"])
def test_weights_that_point_nowhere_are_reported_as_broken_links(
    family: Family, tmp_path: Path, kind: str
) -> None:
    base, _ = family
    folder, file = bad_model(tmp_path, family, kind)
    with pytest.raises(MergeError) as info:
        prepare(ties(base, folder))
    (message,) = messages(info.value)
    # "missing" or "holds no weights" sends the user to a file that `ls` shows is there.
    assert names(message, file)
    assert "link" in message.replace(str(tmp_path), "") or str(file.readlink()) in message


@pytest.mark.parametrize("zipped", [True, False], ids=["torch-save-zip", "legacy-pickle"])
def test_malicious_pickle_is_refused_in_either_format(tmp_path: Path, zipped: bool) -> None:
    marker = tmp_path / "pwned"
    path = malicious_bin(tmp_path / "evil", marker, zipped)
    with pytest.raises(MergeError) as info:
        prepare(f"merge_method: linear\nmodels:\n  - model: {path.parent}\n")
    (message,) = messages(info.value)
    assert str(path) in message and "refused" in message
    assert not marker.exists()


def test_nan_in_the_last_tensor_fails_the_merge_naming_model_and_tensor(cli) -> None:
    result = cli["results"]["nan"]
    assert result.returncode == 2 and "Traceback" not in result.stderr
    (error,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert str(cli["nan_model"]) in error and "'model.norm.weight'" in error
    assert "--allow-nonfinite" in result.stderr
    out = cli["outs"]["nan"]
    assert_no_finished_output(out)
    # The failure came late: the other tensors had been written and journaled.
    journal = out.parent / f".{out.name}.partial" / ".mergesmith-progress"
    done = journal.read_text().splitlines()[1:]
    assert len(done) == 38 and not any("model.norm.weight" in line for line in done)


def test_a_failed_overwrite_leaves_the_earlier_output_untouched(cli) -> None:
    result = cli["results"]["nan_overwrite"]
    assert result.returncode == 2 and "'model.norm.weight'" in result.stderr, result.stderr
    out = cli["outs"]["nan_overwrite"]
    assert [p.name for p in out.iterdir()] == ["config.json"]
    assert (out / "config.json").read_text() == '{"earlier": true}'


def test_allow_nonfinite_merges_inputs_holding_nan(cli) -> None:
    result = cli["results"]["nan_allowed"]
    assert result.returncode == 0, result.stderr
    out = cli["outs"]["nan_allowed"]
    assert (out / "model.safetensors").is_file() and (out / "config.json").is_file()


# Non-finite inputs, for every method: each has its own path through masks and sums, and a
# pruned or trimmed entry must not hide a NaN or Inf in what the user gave us.

METHOD_RECIPES: dict[str, Callable[[Path, Path, Path], str]] = {
    "task_arithmetic": lambda b, p, o: (
        f"merge_method: task_arithmetic\nbase_model: {b}\nmodels:\n"
        f"  - {{model: {p}, parameters: {{weight: 0.5}}}}\n"
        f"  - {{model: {o}, parameters: {{weight: 0.5}}}}\n"
    ),
    **{
        name: (
            lambda b, p, o, name=name, extra=extra: (
                f"merge_method: {name}\nbase_model: {b}\nmodels:\n"
                f"  - {{model: {p}, parameters: {{weight: 1, density: 0.2{extra}}}}}\n"
                f"  - {{model: {o}, parameters: {{weight: 1, density: 0.2{extra}}}}}\n"
            )
        )
        for name, extra in [
            ("ties", ""),
            ("dare_ties", ""),
            ("dare_linear", ""),
            ("breadcrumbs", ", gamma: 0.1"),
            ("breadcrumbs_ties", ", gamma: 0.1"),
            ("della", ", epsilon: 0.1"),
            ("della_linear", ", epsilon: 0.1"),
        ]
    },
    "linear": lambda b, p, o: (
        f"merge_method: linear\nmodels:\n  - {{model: {p}, parameters: {{weight: 1}}}}\n"
        f"  - {{model: {o}, parameters: {{weight: 1}}}}\n"
    ),
    "slerp": lambda b, p, o: (
        f"merge_method: slerp\nbase_model: {b}\nmodels:\n  - model: {p}\nparameters: {{t: 0.5}}\n"
    ),
    "passthrough": lambda b, p, o: (
        f"merge_method: passthrough\nslices:\n  - sources: [{{model: {p}, layer_range: [0, 4]}}]\n"
    ),
}
POISONED_TENSOR = "model.layers.2.mlp.up_proj.weight"


@pytest.fixture(scope="module")
def poison(family: Family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    _, tuned = family
    root = tmp_path_factory.mktemp("poisoned")
    return {
        name: poisoned(root / name, tuned[0], POISONED_TENSOR, value)
        for name, value in [("nan", float("nan")), ("inf", float("inf")), ("-inf", -float("inf"))]
    }


@pytest.mark.parametrize("value", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("method", list(METHOD_RECIPES))
def test_every_method_refuses_a_non_finite_input_naming_model_and_tensor(
    family: Family, poison: dict[str, Path], tmp_path: Path, method: str, value: str
) -> None:
    base, tuned = family
    recipe = METHOD_RECIPES[method](base, poison[value], tuned[1])
    out = tmp_path / "out"
    with pytest.raises(MergeError) as info:
        merge(recipe, out, threads=1)
    (message,) = messages(info.value)
    assert str(poison[value]) in message and f"'{POISONED_TENSOR}'" in message
    assert_no_finished_output(out)


def test_nan_in_the_base_model_names_the_base(family: Family, tmp_path: Path) -> None:
    base, tuned = family
    bad_base = poisoned(tmp_path / "base", base, POISONED_TENSOR, float("nan"))
    # The fine-tune needs this base's architecture, not its values: any family member will do.
    with pytest.raises(MergeError) as info:
        merge(ties(bad_base, tuned[0]), tmp_path / "out", threads=1)
    (message,) = messages(info.value)
    assert str(bad_base) in message and f"'{POISONED_TENSOR}'" in message


def test_a_fine_tune_stored_as_bin_with_nan_is_named_too(family: Family, tmp_path: Path) -> None:
    base, _ = family
    shape = ToyShape()
    tensors = finetune_tensors(base_tensors(shape, 0), 9)
    tensors[POISONED_TENSOR][0, 0] = float("nan")
    folder = save_model(tmp_path / "bin", tensors, llama_config(shape, torch.float32), fmt="bin")
    with pytest.raises(MergeError) as info:
        merge(ties(base, folder), tmp_path / "out", threads=1)
    (message,) = messages(info.value)
    assert str(folder) in message and f"'{POISONED_TENSOR}'" in message


def test_merged_values_past_the_output_dtype_are_an_error_not_inf(tmp_path: Path) -> None:
    """Finite inputs whose merge overflows float16 (two models near 40000 summed without
    normalising): the engine's output check names the tensor instead of writing inf."""
    shape = ToyShape()
    tensors = base_tensors(shape, 3)
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name] = torch.full_like(tensors[name], 40000.0)
    big = save_model(tmp_path / "big", tensors, llama_config(shape, torch.float32))
    twin = shutil.copytree(big, tmp_path / "twin")
    recipe = "merge_method: linear\nmodels:\n" + "".join(
        f"  - model: {m}\n    parameters: {{weight: 1.0}}\n" for m in (big, twin)
    )
    recipe += "parameters: {normalize: false}\ndtype: float16\n"
    out = tmp_path / "out"
    result = run_cli("run", write_recipe(tmp_path, recipe), out)
    assert result.returncode == 2, result.stderr
    assert f"merged tensor '{name}' has values too large for float16" in result.stderr
    assert "Traceback" not in result.stderr and not out.exists()
