"""The same recipe and seed give byte-identical output folders: across processes, thread counts,
and however the inputs are stored (single file, shuffled shards, pickle), random methods
included. A different seed changes what the random methods keep."""

from __future__ import annotations

import json
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergesmith import merge
from mergesmith.toymodels import save_model
from tests.conftest import assert_identical, run_cli, write_recipe

Family = tuple[Path, list[Path]]
RANDOM_METHODS = ["dare_ties", "dare_linear", "della", "della_linear"]
MODELS = ("base", "finetune1", "finetune2")
SEED = 7


def recipe_text(method: str) -> str:
    """Model paths are relative, so that one recipe text (which the output's model card and
    mergesmith_config.yml quote) serves every storage variant: each is run from its own folder."""
    epsilon = ", epsilon: 0.1" if method.startswith("della") else ""
    return (
        f"merge_method: {method}\nbase_model: base\nmodels:\n"
        f"  - model: finetune1\n    parameters: {{weight: 0.6, density: 0.5{epsilon}}}\n"
        f"  - model: finetune2\n    parameters: {{weight: 0.4, density: [0.3, 0.8]{epsilon}}}\n"
    )


def restore(folder: Path, source: Path, fmt: str, shards: int, order_seed: int) -> None:
    """`source`'s tensors, written again with another layout and in a shuffled order."""
    tensors = load_file(source / "model.safetensors")
    names = sorted(tensors)
    random.Random(order_seed).shuffle(names)
    config = json.loads((source / "config.json").read_text())
    save_model(folder, {n: tensors[n] for n in names}, config, fmt=fmt, shards=shards)
    for side in source.iterdir():
        if side.suffix != ".safetensors" and side.name != "config.json":
            shutil.copyfile(side, folder / side.name)


@pytest.fixture(scope="module")
def stores(family: Family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Folders each holding base, finetune1 and finetune2 with the family's exact tensors."""
    base, _ = family
    root = tmp_path_factory.mktemp("stores")
    stores = {"single": base.parent}
    for name, fmt, shards in [("sharded", "safetensors", 3), ("bin", "bin", 1)]:
        for i, model in enumerate(MODELS):
            restore(root / name / model, base.parent / model, fmt, shards, order_seed=i)
        stores[name] = root / name
    return stores


@pytest.fixture(scope="module")
def expected(
    stores: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> dict[str, tuple[Path, Path]]:
    """Per method: its recipe file and its merge, in this process, on one thread."""
    root = tmp_path_factory.mktemp("expected")
    found = {}
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(stores["single"])
        for method in [*RANDOM_METHODS, "ties"]:
            recipe = write_recipe(root, recipe_text(method), f"{method}.yml")
            merge(recipe, root / method, seed=SEED, threads=1)
            found[method] = (recipe, root / method)
    return found


@pytest.fixture(scope="module")
def from_cli(
    stores: dict[str, Path],
    expected: dict[str, tuple[Path, Path]],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    """The same merges by the CLI in fresh processes, on two threads; run concurrently."""
    root = tmp_path_factory.mktemp("cli")
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        futures = {
            method: pool.submit(
                run_cli,
                "run",
                expected[method][0],
                root / method,
                "--seed",
                str(SEED),
                "--threads",
                "2",
                cwd=stores["single"],
            )
            for method in RANDOM_METHODS
        }
        for method, future in futures.items():
            result = future.result()
            assert result.returncode == 0, (method, result.stderr)
    return {method: root / method for method in RANDOM_METHODS}


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_another_process_on_two_threads_writes_identical_folders(
    expected: dict[str, tuple[Path, Path]], from_cli: dict[str, Path], method: str
) -> None:
    assert_identical(from_cli[method], expected[method][1])


@pytest.mark.parametrize("store", ["sharded", "bin"])
@pytest.mark.parametrize("method", [*RANDOM_METHODS, "ties"])
def test_input_storage_and_tensor_order_do_not_change_the_output(
    stores: dict[str, Path],
    expected: dict[str, tuple[Path, Path]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    method: str,
    store: str,
) -> None:
    monkeypatch.chdir(stores[store])
    recipe, reference = expected[method]
    merge(recipe, tmp_path / "out", seed=SEED, threads=2)
    assert_identical(tmp_path / "out", reference)


def test_a_tight_memory_budget_changes_scheduling_but_not_the_output(
    stores: dict[str, Path],
    expected: dict[str, tuple[Path, Path]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(stores["single"])
    recipe, reference = expected["della"]
    merge(recipe, tmp_path / "out", seed=SEED, threads=2, max_memory="1KB")
    assert_identical(tmp_path / "out", reference)


@pytest.mark.parametrize("method", RANDOM_METHODS)
def test_a_different_seed_changes_the_random_methods_output(
    stores: dict[str, Path],
    expected: dict[str, tuple[Path, Path]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    method: str,
) -> None:
    monkeypatch.chdir(stores["single"])
    recipe, reference = expected[method]
    merge(recipe, tmp_path / "out", seed=SEED + 1, threads=1)
    got = load_file(tmp_path / "out" / "model.safetensors")
    want = load_file(reference / "model.safetensors")
    changed = [name for name in want if not torch.equal(got[name], want[name])]
    # Every tensor that was pruned at random should come out different.
    assert len(changed) == len(want), sorted(set(want) - set(changed))


def test_the_seed_does_not_change_a_deterministic_method(
    stores: dict[str, Path],
    expected: dict[str, tuple[Path, Path]],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    monkeypatch.chdir(stores["single"])
    recipe, reference = expected["ties"]
    merge(recipe, tmp_path / "out", seed=SEED + 1, threads=1)
    got = (tmp_path / "out" / "model.safetensors").read_bytes()
    assert got == (reference / "model.safetensors").read_bytes()
