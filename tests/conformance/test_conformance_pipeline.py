"""A pipeline (several named YAML documents) against mergekit 0.1.5's `mergekit-multi`."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from mergesmith import merge
from tests.conformance.harness import assert_tensors_match, load_folder
from tests.conftest import write_recipe
from tests.test_pipeline import pipeline

pytestmark = pytest.mark.conformance


def test_pipeline_matches_mergekit_multi(family, tmp_path: Path, mergekit_venv: Path):
    base, tuned = family
    recipe = write_recipe(tmp_path, pipeline(base, tuned))
    theirs = tmp_path / "theirs"
    subprocess.run(
        [
            str(mergekit_venv / "bin" / "mergekit-multi"),
            str(recipe),
            "--out-path",
            str(theirs),
            "-I",
            str(tmp_path / "intermediate"),
            "--random-seed",
            "0",
        ],
        check=True,
        capture_output=True,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        timeout=600,
    )
    ours = tmp_path / "ours"
    merge(recipe, ours)
    assert_tensors_match(load_folder(ours), load_folder(theirs))
