"""`run --resume` after an interruption: reuses the tensors that were finished and are still
intact, recomputes the rest, and publishes a folder byte-identical to an uninterrupted run."""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import struct
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mergesmith import merge
from mergesmith.errors import MergeError
from tests.conftest import assert_identical, run_cli, write_recipe
from tests.test_fail_interrupt import (
    SLOW_TENSORS,
    della_recipe,
    interrupt,
    journaled,
    partial_of,
    slow_family,
    start_merge,
)

Family = tuple[Path, list[Path]]
RESUMING = re.compile(r"resuming: (\d+) of (\d+) tensors already done and intact")


def resumed_count(stderr: str) -> int:
    found = RESUMING.search(stderr)
    assert found, stderr
    assert int(found.group(2)) == SLOW_TENSORS
    return int(found.group(1))


def tensor_span(shard: Path, name: str) -> tuple[int, int]:
    """(absolute offset, length) of one tensor's bytes, from the shard's own header."""
    with open(shard, "rb") as fh:
        (size,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(size))
    begin, end = header[name]["data_offsets"]
    return 8 + size + begin, end - begin


@pytest.fixture(scope="module")
def interrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A merge cut short by Ctrl-C, and the same merge run to the end, side by side (one
    thread each) since neither depends on the other."""
    base, tuned = slow_family(tmp_path_factory)
    root = tmp_path_factory.mktemp("resume")
    recipe = write_recipe(root, della_recipe(base, tuned))
    reference = root / "reference" / "merged"
    cut = root / "cut" / "merged"
    reference.parent.mkdir()
    cut.parent.mkdir()
    whole = start_merge(recipe, reference)
    # Late, so that each resume below has less left to do: jobs run largest first, and sixty
    # done leave about a quarter of the work (still enough to interrupt if merges get faster).
    err = interrupt(start_merge(recipe, cut), cut, signal.SIGINT, after=60)
    assert "interrupted by SIGINT" in err, err
    _, whole_err = whole.communicate(timeout=300)
    assert whole.returncode == 0, whole_err
    return {
        "recipe": recipe,
        "reference": reference,
        "partial": partial_of(cut),
        "base": base,
        "tuned": tuned[0],
    }


def copy_partial(interrupted: dict[str, Path], into: Path) -> Path:
    """A private copy of the interrupted merge, for a test to resume (or damage)."""
    out = into / "merged"
    shutil.copytree(interrupted["partial"], partial_of(out))
    return out


def test_resume_reuses_finished_tensors_and_matches_an_uninterrupted_run(
    interrupted: dict[str, Path], tmp_path: Path
) -> None:
    out = copy_partial(interrupted, tmp_path)
    done_before = {json.loads(line)["tensor"] for line in journaled(partial_of(out))}
    result = run_cli("run", interrupted["recipe"], out, "--resume")
    assert result.returncode == 0, result.stderr
    assert resumed_count(result.stderr) == len(done_before) > 0
    assert_identical(out, interrupted["reference"], "the uninterrupted run")
    assert not partial_of(out).exists()


def test_a_corrupted_journaled_tensor_is_recomputed_and_the_result_still_matches(
    interrupted: dict[str, Path], tmp_path: Path
) -> None:
    out = copy_partial(interrupted, tmp_path)
    partial = partial_of(out)
    done_before = [json.loads(line)["tensor"] for line in journaled(partial)]
    victim = done_before[0]
    offset, length = tensor_span(partial / "model.safetensors", victim)
    with open(partial / "model.safetensors", "r+b") as fh:
        fh.seek(offset + length // 2)
        byte = fh.read(1)
        fh.seek(offset + length // 2)
        fh.write(bytes([byte[0] ^ 0x5A]))
    result = run_cli("run", interrupted["recipe"], out, "--resume")
    assert result.returncode == 0, result.stderr
    assert resumed_count(result.stderr) == len(set(done_before)) - 1
    assert_identical(out, interrupted["reference"], "the uninterrupted run")


def test_a_journal_line_cut_short_by_a_kill_does_not_spoil_the_resume(
    interrupted: dict[str, Path], tmp_path: Path
) -> None:
    out = copy_partial(interrupted, tmp_path)
    journal = partial_of(out) / ".mergesmith-progress"
    done_before = {json.loads(line)["tensor"] for line in journaled(partial_of(out))}
    # What SIGKILL or a power cut in the middle of a journal write leaves behind.
    with open(journal, "a", encoding="utf-8") as fh:
        fh.write('{"tensor": "model.layers.0.mlp')
    result = run_cli("run", interrupted["recipe"], out, "--resume")
    assert result.returncode == 0, result.stderr
    assert resumed_count(result.stderr) == len(done_before)
    assert_identical(out, interrupted["reference"], "the uninterrupted run")


def test_resume_with_a_changed_recipe_or_seed_is_refused_and_keeps_the_partial(
    interrupted: dict[str, Path], tmp_path: Path
) -> None:
    changed = write_recipe(
        tmp_path,
        della_recipe(interrupted["base"], [interrupted["tuned"]], density=0.6),
        "changed.yml",
    )
    outs = {"recipe": copy_partial(interrupted, tmp_path / "recipe")}
    outs["seed"] = copy_partial(interrupted, tmp_path / "seed")
    commands = {
        "recipe": ("run", changed, outs["recipe"], "--resume"),
        "seed": ("run", interrupted["recipe"], outs["seed"], "--resume", "--seed", "1"),
    }
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        futures = {case: pool.submit(run_cli, *args) for case, args in commands.items()}
        results = {case: future.result() for case, future in futures.items()}
    journal_before = (interrupted["partial"] / ".mergesmith-progress").read_text()
    for case, result in results.items():
        assert result.returncode == 2, (case, result.stderr)
        assert "Traceback" not in result.stderr
        (error,) = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
        assert "--resume" in error and str(partial_of(outs[case])) in error, error
        assert "different recipe, seed" in error, error
        assert "  hint: run again without --resume" in result.stderr
        assert not outs[case].exists()
        assert (partial_of(outs[case]) / ".mergesmith-progress").read_text() == journal_before


def test_resume_with_no_partial_folder_just_merges(family: Family, tmp_path: Path) -> None:
    base, tuned = family
    recipe = write_recipe(
        tmp_path,
        f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n"
        f"  - {{model: {tuned[0]}, parameters: {{weight: 1, density: 0.4}}}}\n"
        f"  - {{model: {tuned[1]}, parameters: {{weight: 1, density: 0.6}}}}\n",
    )
    out = tmp_path / "merged"
    result = run_cli("run", recipe, out, "--resume", "--seed", "3")
    assert result.returncode == 0, result.stderr
    assert "resuming" not in result.stderr and "error" not in result.stderr
    merge(recipe, tmp_path / "plain", seed=3)
    assert_identical(out, tmp_path / "plain", "the uninterrupted run")
    assert not partial_of(out).exists()


def test_resume_of_a_partial_folder_without_a_journal_is_refused(
    family: Family, tmp_path: Path
) -> None:
    base, tuned = family
    recipe = write_recipe(
        tmp_path,
        f"merge_method: linear\nmodels:\n  - {{model: {base}, parameters: {{weight: 1}}}}\n"
        f"  - {{model: {tuned[0]}, parameters: {{weight: 1}}}}\n",
    )
    out = tmp_path / "merged"
    partial_of(out).mkdir()
    (partial_of(out) / "model.safetensors").write_bytes(b"leftover")
    with pytest.raises(MergeError) as info:
        merge(recipe, out, resume=True)
    assert str(partial_of(out)) in info.value.message
    assert "holds no progress journal" in info.value.message
    assert not out.exists()
