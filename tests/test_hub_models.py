"""Hub ids resolve through huggingface_hub; tested offline against a local cache."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

from tests.conftest import write_recipe


def cache_model(
    cache: Path, repo: str, source: Path, commit: str, ref: str | None = "main"
) -> None:
    """Lay out a model the way huggingface_hub caches a download."""
    repo_dir = cache / f"models--{repo.replace('/', '--')}"
    snapshot = repo_dir / "snapshots" / commit
    shutil.copytree(source, snapshot)
    if ref:
        (repo_dir / "refs").mkdir(parents=True, exist_ok=True)
        (repo_dir / "refs" / ref).write_text(commit)


def run_offline(cache: Path, *args: str | Path) -> subprocess.CompletedProcess:
    env = {**os.environ, "HF_HUB_CACHE": str(cache), "HF_HUB_OFFLINE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mergesmith", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )


def recipe_text(base: str, tuned: str) -> str:
    return (
        f"merge_method: ties\nbase_model: {base}\nmodels:\n"
        f"  - model: {tuned}\n    parameters: {{weight: 0.8, density: 0.4}}\n"
    )


def test_hub_ids_and_revisions_merge_like_local_folders(family, tmp_path: Path) -> None:
    base, tuned = family
    cache = tmp_path / "hub"
    cache_model(cache, "acme/tiny-base", base, "a" * 40)
    # A fine-tune reachable only by its commit (no branch points at it).
    cache_model(cache, "acme/tiny-tuned", tuned[0], "b" * 40, ref=None)
    # A .bin beside the safetensors must never be read: safetensors are enough.
    snapshot = cache / "models--acme--tiny-base" / "snapshots" / ("a" * 40)
    (snapshot / "pytorch_model.bin").write_bytes(b"not a checkpoint")

    local = tmp_path / "local"
    hub = tmp_path / "hub-out"
    plain = run_offline(cache, "run", write_recipe(tmp_path, recipe_text(base, tuned[0])), local)
    assert plain.returncode == 0, plain.stderr
    done = run_offline(
        cache,
        "run",
        write_recipe(
            tmp_path, recipe_text("acme/tiny-base", f"acme/tiny-tuned@{'b' * 40}"), "h.yml"
        ),
        hub,
    )
    assert done.returncode == 0, done.stderr
    assert (hub / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()
    assert (hub / "tokenizer.json").read_bytes() == (base / "tokenizer.json").read_bytes()


def test_unknown_hub_id_offline_is_a_clear_error(tmp_path: Path, family) -> None:
    base, _ = family
    recipe = write_recipe(tmp_path, recipe_text(base, "acme/not-there"))
    done = run_offline(tmp_path / "empty-cache", "run", recipe, tmp_path / "out")
    assert done.returncode == 2
    assert "acme/not-there" in done.stderr and "Traceback" not in done.stderr
    assert not (tmp_path / "out").exists()
