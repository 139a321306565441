"""Shared fixtures: tiny real model folders and a way to run the real CLI."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergesmith.toymodels import ToyShape, make_family


@pytest.fixture(scope="session")
def family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A float32 base and three fine-tunes (4 layers, hidden 32), single-file safetensors."""
    return make_family(tmp_path_factory.mktemp("family"), 3, ToyShape(), dtype=torch.float32)


def run_cli(
    *args: str | Path, cwd: Path | None = None, timeout: float = 300
) -> subprocess.CompletedProcess:
    """Run `mergesmith ARGS` as a real subprocess with this interpreter."""
    return subprocess.run(
        [sys.executable, "-m", "mergesmith", *map(str, args)],
        capture_output=True,
        text=True,
        cwd=cwd,
        timeout=timeout,
    )


def write_recipe(folder: Path, text: str, name: str = "recipe.yml") -> Path:
    path = folder / name
    path.write_text(text, encoding="utf-8")
    return path
