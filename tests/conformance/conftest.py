"""Fixtures for the mergekit conformance suite: the reference venv and the toy model families.

mergekit 0.1.5 is the reference implementation (SEMANTICS.md). It lives in its own venv, never
in ours: its pins (transformers 5, peft, datasets) must not constrain the project's
dependencies, and running it as a subprocess means we compare against exactly what a user runs.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from string import Template
from typing import Any

import pytest

from mergesmith.toymodels import make_family
from tests.conformance.harness import MergekitBatch

REPO = Path(__file__).resolve().parents[2]
MERGEKIT_VERSION = "0.1.5"
# The CPU build, pinned and installed first: left to resolve it, pip pulls a multi-GB CUDA torch.
TORCH_VERSION = "2.13.0"
INSTALL_TIMEOUT_S = 45 * 60


class ReferenceUnavailable(Exception):
    """mergekit could not be installed (typically: no network)."""


def mergekit_venv_dir() -> Path:
    configured = os.environ.get("MERGESMITH_MERGEKIT_VENV")
    return Path(configured).expanduser().absolute() if configured else REPO / ".venv-mergekit"


def running_in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@contextmanager
def _exclusive(folder: Path) -> Iterator[None]:
    # Two pytest sessions starting together must not both pip-install into one venv.
    folder.mkdir(parents=True, exist_ok=True)
    with (folder / ".install.lock").open("w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def _python311() -> str:
    found = shutil.which("python3.11")
    if found:
        return found
    if sys.version_info[:2] == (3, 11):
        return sys.executable
    raise ReferenceUnavailable("python3.11 is not on PATH")


def _install(venv: Path) -> None:
    log_path = venv / "install.log"
    pip = str(venv / "bin" / "pip")
    steps = [
        [_python311(), "-m", "venv", str(venv)],
        [pip, "install", f"torch=={TORCH_VERSION}"],
        [pip, "install", f"mergekit=={MERGEKIT_VERSION}"],
    ]
    with log_path.open("w", encoding="utf-8") as log:
        for step in steps:
            log.write(f"$ {' '.join(step)}\n")
            log.flush()
            try:
                done = subprocess.run(
                    step,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    timeout=INSTALL_TIMEOUT_S,
                    check=False,
                )
            except (OSError, subprocess.TimeoutExpired) as exc:
                raise ReferenceUnavailable(f"{' '.join(step)}: {exc}") from exc
            if done.returncode != 0:
                tail = log_path.read_text(encoding="utf-8", errors="replace")[-3000:]
                raise ReferenceUnavailable(
                    f"`{' '.join(step)}` exited with {done.returncode}; log {log_path}:\n{tail}"
                )


def _installed_version(venv: Path) -> str:
    done = subprocess.run(
        [
            str(venv / "bin" / "python"),
            "-c",
            "import importlib.metadata as m; print(m.version('mergekit'))",
        ],
        capture_output=True,
        text=True,
        check=False,
    )
    return done.stdout.strip() if done.returncode == 0 else f"unknown ({done.stderr.strip()})"


@pytest.fixture(scope="session")
def mergekit_venv() -> Path:
    """A venv holding mergekit 0.1.5, built once and reused across sessions."""
    venv = mergekit_venv_dir()
    try:
        with _exclusive(venv):
            if not (venv / "bin" / "mergekit-yaml").exists():
                _install(venv)
    except ReferenceUnavailable as exc:
        message = f"cannot install the mergekit {MERGEKIT_VERSION} reference in {venv}: {exc}"
        if running_in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    version = _installed_version(venv)
    if version != MERGEKIT_VERSION:
        # A different mergekit is a different reference: passing against it would prove nothing.
        pytest.fail(
            f"{venv} holds mergekit {version}, not {MERGEKIT_VERSION}; delete it or point "
            "MERGESMITH_MERGEKIT_VENV elsewhere",
            pytrace=False,
        )
    return venv


@pytest.fixture(scope="session")
def toy_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Recipe placeholders ($base, $ft1, $bin_base, $sh_ft2, ...) mapped to model folders.

    The three families hold identical float32 tensors (same seed) in three layouts: one
    safetensors file, pytorch_model.bin, and safetensors in three shards with an index.
    """
    root = tmp_path_factory.mktemp("toys")
    paths: dict[str, str] = {}
    families: list[tuple[str, str, dict[str, Any]]] = [
        ("", "single", {}),
        ("bin_", "bin", {"fmt": "bin"}),
        ("sh_", "sharded", {"shards": 3}),
    ]
    for prefix, folder_name, options in families:
        base, tuned = make_family(root / folder_name, 3, **options)
        paths[f"{prefix}base"] = str(base)
        for i, folder in enumerate(tuned, start=1):
            paths[f"{prefix}ft{i}"] = str(folder)
    return paths


@pytest.fixture(scope="module")
def recipes(
    request: pytest.FixtureRequest,
    toy_models: dict[str, str],
    tmp_path_factory: pytest.TempPathFactory,
) -> dict[str, Path]:
    """The requesting module's RECIPES written as YAML files with the toy models' paths."""
    folder = tmp_path_factory.mktemp("recipes")
    paths = {}
    for case, text in request.module.RECIPES.items():
        path = folder / f"{case}.yml"
        path.write_text(Template(text).substitute(toy_models), encoding="utf-8")
        paths[case] = path
    return paths


@pytest.fixture(scope="module")
def reference(
    request: pytest.FixtureRequest,
    mergekit_venv: Path,
    recipes: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MergekitBatch]:
    """mergekit's outputs for the requesting module's recipes, computed in the background."""
    # Only the recipes of the tests this session will run, so `-k ties` stays quick.
    wanted = {
        item.callspec.params["case"]
        for item in request.session.items
        if getattr(item, "module", None) is request.module
        and hasattr(item, "callspec")
        and "case" in item.callspec.params
    }
    selected = {case: path for case, path in recipes.items() if case in wanted}
    batch = MergekitBatch(mergekit_venv, selected, tmp_path_factory.mktemp("mergekit"))
    yield batch
    batch.close()
