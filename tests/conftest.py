"""Shared fixtures: tiny real model folders and a way to run the real CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from mergesmith.methods import MethodInputs, get_method
from mergesmith.toymodels import ToyShape, make_family


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A float32 base and three fine-tunes (4 layers, hidden 32), single-file safetensors."""
    return make_family(tmp_path_factory.mktemp("family"), 3, ToyShape(), dtype=torch.float32)


def run_cli(
    *args: str | Path,
    cwd: Path | None = None,
    timeout: float = 300,
    env: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    """Run `mergesmith ARGS` as a real subprocess with this interpreter (`env`: variables
    added to this process's environment)."""
    return subprocess.run(
        [sys.executable, "-m", "mergesmith", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
        env=None if env is None else {**os.environ, **env},
    )


def write_recipe(folder: Path, text: str, name: str = "recipe.yml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path


def run_method(
    name: str,
    base: torch.Tensor,
    models: list[torch.Tensor],
    model_params: list[dict[str, Any]],
    params: dict[str, Any] | None = None,
    seeds: list[int] | None = None,
) -> torch.Tensor:
    """Call a registered method as the engine does: defaults filled in, unknown names dropped."""
    method = get_method(name)
    assert method is not None
    names = {p.name for p in method.params}
    full = {p.name: p.default for p in method.params if not p.per_model}
    full.update({k: v for k, v in (params or {}).items() if k in names})
    defaults = {p.name: p.default for p in method.params if p.per_model and not p.required}
    filled = [defaults | {k: v for k, v in m.items() if k in names} for m in model_params]
    return method.run(
        MethodInputs(base, models, full, filled, seeds if seeds is not None else [0] * len(models))
    )


def folder_bytes(folder: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())}


def assert_identical(got: Path, expected: Path, what: str = "the expected output") -> None:
    """Same file names and the same bytes in every file."""
    got_files, expected_files = folder_bytes(got), folder_bytes(expected)
    assert sorted(got_files) == sorted(expected_files)
    for name, data in expected_files.items():
        assert got_files[name] == data, f"{name} differs from {what}"


def assert_kernels_match_torch_code(recipe: Path, folder: Path) -> None:
    """`mergesmith run` writes the same bytes with its C kernels as with the torch code."""
    fast = run_cli("run", recipe, folder / "fast")
    assert fast.returncode == 0, fast.stderr
    slow = run_cli("run", recipe, folder / "slow", env={"MERGESMITH_KERNELS": "torch"})
    assert slow.returncode == 0, slow.stderr
    assert_identical(folder / "fast", folder / "slow", "the torch path's output")


@pytest.fixture(scope="session")
def ray_cluster():
    """One local Ray cluster (two nodes, one CPU each) for the whole run, this process its
    driver; skipped, with the reason shown, where Ray is not installed."""
    from tests.ray_support import start_test_cluster

    yield from start_test_cluster()
