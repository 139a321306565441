"""Running mergekit 0.1.5 and mergesmith on the same recipes, and comparing their outputs.

Mergekit runs in one batch process per test module (see mergekit_driver.py) because importing
it costs ~6 s while a toy merge costs ~0.15 s. A conformance module defines `RECIPES` (case ->
recipe text with $base, $ft1, ... placeholders) and uses the `recipes` and `reference` fixtures
of conftest.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

DRIVER = Path(__file__).with_name("mergekit_driver.py")
MERGEKIT_ARGS = ["--random-seed", "0", "--quiet"]
REL_TOL = 1e-5
BATCH_TIMEOUT_S = 20 * 60
OURS_TIMEOUT_S = 10 * 60


class MergekitBatch:
    """Every selected recipe through mergekit in one background process, started at once so
    that it overlaps with our own merges."""

    def __init__(
        self,
        venv: Path,
        recipes: Mapping[str, Path],
        work: Path,
        args: Sequence[str] = MERGEKIT_ARGS,
    ) -> None:
        self.work = work
        self.results_path = work / "results.json"
        self.log_path = work / "driver.log"
        jobs = [
            {"id": case, "config": str(path), "out": str(self.out(case)), "args": list(args)}
            for case, path in recipes.items()
        ]
        jobs_path = work / "jobs.json"
        jobs_path.write_text(json.dumps(jobs, indent=1), encoding="utf-8")
        self._log = self.log_path.open("w", encoding="utf-8")
        self._process = subprocess.Popen(
            [str(venv / "bin" / "python"), str(DRIVER), str(jobs_path), str(self.results_path)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        self._results: dict[str, dict[str, object]] | None = None

    def out(self, case: str) -> Path:
        return self.work / "out" / case

    def output(self, case: str) -> Path:
        """mergekit's output folder for `case`, waiting for the batch the first time."""
        result = self.result(case)
        if not result["ok"]:
            pytest.fail(f"mergekit 0.1.5 failed on '{case}':\n{result['error']}")
        return self.out(case)

    def result(self, case: str) -> dict[str, object]:
        """mergekit's record for `case` ({"ok", "seconds", "error"}), waiting for the batch the
        first time; for tests that expect mergekit to fail."""
        if self._results is None:
            try:
                code = self._process.wait(timeout=BATCH_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.close()
                code = None
            self._log.close()
            self._results = (
                json.loads(self.results_path.read_text(encoding="utf-8"))
                if self.results_path.exists()
                else {}
            )
            if code != 0 and not self._results:
                pytest.fail(f"mergekit batch exited with {code}:\n{self._log_tail()}")
        result = self._results.get(case)
        if result is None:
            pytest.fail(f"mergekit batch never ran '{case}':\n{self._log_tail()}")
        return result

    def _log_tail(self) -> str:
        return self.log_path.read_text(encoding="utf-8", errors="replace")[-4000:]

    def close(self) -> None:
        if self._process.poll() is None:
            self._process.kill()
            self._process.wait()
        self._log.close()


def run_ours(recipe: Path, out: Path) -> Path:
    done = subprocess.run(
        [sys.executable, "-m", "mergesmith", "run", str(recipe), str(out), "--seed", "0", "-q"],
        capture_output=True,
        text=True,
        timeout=OURS_TIMEOUT_S,
        check=False,
    )
    if done.returncode != 0:
        # pytest.fail, not assert: an xfail(raises=AssertionError) must not swallow a crash.
        pytest.fail(f"mergesmith run exited with {done.returncode}:\n{done.stderr}")
    return out


def load_folder(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, whatever its sharding."""
    tensors: dict[str, torch.Tensor] = {}
    for file in sorted(folder.glob("*.safetensors")):
        part = load_file(file)
        assert not tensors.keys() & part.keys(), f"{file.name} repeats tensors of other shards"
        tensors.update(part)
    assert tensors, f"no safetensors files in {folder}"
    return tensors


def num_layers(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))["num_hidden_layers"]


def assert_tensors_match(
    ours: Mapping[str, torch.Tensor], ref: Mapping[str, torch.Tensor], rel: float = REL_TOL
) -> None:
    """Same names, shapes and dtypes; max |ours - ref| <= rel * max |ref| for every tensor."""
    missing, extra = sorted(ref.keys() - ours.keys()), sorted(ours.keys() - ref.keys())
    assert not missing and not extra, f"missing {missing[:5]}, unexpected {extra[:5]}"
    bad = []
    for name, expected in ref.items():
        got = ours[name]
        if got.shape != expected.shape or got.dtype != expected.dtype:
            bad.append(
                (
                    float("inf"),
                    f"{name}: {got.dtype}{list(got.shape)} vs "
                    f"{expected.dtype}{list(expected.shape)}",
                )
            )
            continue
        error = (got.double() - expected.double()).abs().max().item()
        scale = expected.abs().max().item()
        if error > rel * scale:
            bad.append(
                (error / max(scale, 1e-30), f"{name}: max error {error:.3g} (scale {scale:.3g})")
            )
    bad.sort(reverse=True)
    assert not bad, f"{len(bad)}/{len(ref)} tensors differ; worst:\n" + "\n".join(
        line for _, line in bad[:8]
    )


def assert_not_a_copy(merged: Mapping[str, torch.Tensor], inputs: list[Path]) -> None:
    """Guard against vacuous recipes: a merge equal to one of its inputs would match trivially."""
    for folder in inputs:
        model = load_folder(folder)
        assert any(not torch.equal(merged[n], model[n]) for n in merged), (
            f"the merge is a copy of {folder.name}; the recipe tests nothing"
        )


TOY_LAYERS = 4  # the toy families' layer count (conftest's toy_models)
TOY_INPUTS = ("base", "ft1", "ft2", "ft3")


def assert_matches_mergekit(
    case: str,
    recipe: Path,
    reference: MergekitBatch,
    toy_models: Mapping[str, str],
    out: Path,
    layers: int = TOY_LAYERS,
    *,
    copy_allowed: bool = False,
) -> None:
    """Our merge of `recipe` against mergekit's: same tensor names, shapes, dtypes and values
    (to 1e-5 relative), both with `layers` layers; unless `copy_allowed`, mergekit's output
    must not equal one of the toy inputs (a recipe that copies an input would match trivially).
    """
    ours_dir = run_ours(recipe, out)
    ref_dir = reference.output(case)
    ref = load_folder(ref_dir)
    assert_tensors_match(load_folder(ours_dir), ref)
    assert num_layers(ref_dir) == layers
    assert num_layers(ours_dir) == layers
    if not copy_allowed:
        assert_not_a_copy(ref, [Path(toy_models[k]) for k in TOY_INPUTS])
