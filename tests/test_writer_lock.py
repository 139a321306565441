"""One writer per output: a second `run` into an output whose merge is still running is refused
(exit 2, naming the running process) and the first finishes intact; a merge killed with
SIGKILL leaves no lock that blocks the next run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mergesmith import merge
from mergesmith.errors import MergeError
from mergesmith.output.lock import lock_output, running_merge
from tests.conftest import run_cli, write_recipe

Family = tuple[Path, list[Path]]
PAUSE_AFTER = 3

# A real merge through the library, held still after a few tensors by its own progress
# callback until the test writes a line to its stdin: long enough for anything, and no sleeps.
PAUSED_MERGE = f"""
import sys
from mergesmith import merge

def progress(p):
    if p.tensors_done == {PAUSE_AFTER}:
        print("paused", flush=True)
        sys.stdin.readline()

merge(sys.argv[1], sys.argv[2], threads=1, progress=progress)
print("done", flush=True)
"""


def linear_recipe(tuned: list[Path]) -> str:
    return (
        f"merge_method: linear\nmodels:\n"
        f"  - model: {tuned[0]}\n    parameters: {{weight: 0.25}}\n"
        f"  - model: {tuned[1]}\n    parameters: {{weight: 0.75}}\n"
    )


@dataclass
class Paused:
    recipe: Path
    out: Path
    proc: subprocess.Popen


@pytest.fixture(scope="module")
def paused(family: Family, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Paused]]:
    """Two merges paused mid-way, one for each test below, started side by side since each
    costs a process start."""
    _, tuned = family
    merges = {}
    for name in ("finish", "kill"):
        root = tmp_path_factory.mktemp(name)
        recipe = write_recipe(root, linear_recipe(tuned))
        out = root / "work" / "merged"
        proc = subprocess.Popen(
            [sys.executable, "-c", PAUSED_MERGE, str(recipe), str(out)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        merges[name] = Paused(recipe, out, proc)
    try:
        for held in merges.values():
            assert held.proc.stdout is not None
            if held.proc.stdout.readline().strip() != "paused":
                _, err = held.proc.communicate(timeout=60)
                pytest.fail(f"a merge did not get going (exit {held.proc.returncode}):\n{err}")
        yield merges
    finally:
        for held in merges.values():
            held.proc.kill()
            held.proc.wait()


def assert_is_the_linear_merge(out: Path, tuned: list[Path]) -> None:
    """Every tensor is 0.25 a + 0.75 b of the two inputs, computed here from their files."""
    got = load_file(out / "model.safetensors")
    a = load_file(tuned[0] / "model.safetensors")
    b = load_file(tuned[1] / "model.safetensors")
    assert sorted(got) == sorted(a)
    for name, tensor in got.items():
        expected = 0.25 * a[name].float() + 0.75 * b[name].float()
        torch.testing.assert_close(tensor, expected, rtol=1e-6, atol=1e-7, msg=name)
    assert (out / "config.json").is_file()


def partial_state(out: Path) -> dict[str, bytes]:
    partial = out.parent / f".{out.name}.partial"
    return {p.name: p.read_bytes() for p in sorted(partial.iterdir())}


def test_second_run_into_a_running_merge_is_refused_and_the_first_finishes_intact(
    family: Family, paused: dict[str, Paused]
) -> None:
    _, tuned = family
    recipe, out, first = paused["finish"].recipe, paused["finish"].out, paused["finish"].proc
    before = partial_state(out)
    # The command as a user types it: exit 2, one error line naming the process, a hint.
    result = run_cli("run", recipe, out)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 2, lines
    assert lines[0].startswith("error: another merge is writing"), lines
    assert f"pid {first.pid}" in lines[0] and str(out) in lines[0], lines
    assert lines[1].strip().startswith("hint: "), lines
    # Replacing or resuming is refused the same way (a lock taken from this process is
    # another open file, refused by the kernel just as another process's would be).
    for options in ({"overwrite": True}, {"resume": True}, {"overwrite": True, "resume": True}):
        with pytest.raises(MergeError) as refused:
            merge(recipe, out, **options)
        assert f"pid {first.pid}" in refused.value.message, options
    # What `validate --out` reports.
    assert f"pid {first.pid}" in (running_merge(out) or "")
    # The refused runs touched nothing of the first merge's work.
    assert partial_state(out) == before
    assert not out.exists()
    _, err = first.communicate("go\n", timeout=120)
    assert first.returncode == 0, err
    assert_is_the_linear_merge(out, tuned)
    # No lock file left behind: the folder holds the model and nothing else.
    assert [p.name for p in out.parent.iterdir()] == ["merged"]


def test_a_merge_killed_with_sigkill_does_not_block_the_next_run(
    family: Family, paused: dict[str, Paused], caplog: pytest.LogCaptureFixture
) -> None:
    _, tuned = family
    recipe, out, killed = paused["kill"].recipe, paused["kill"].out, paused["kill"].proc
    killed.send_signal(signal.SIGKILL)
    killed.communicate(timeout=60)
    assert killed.returncode == -signal.SIGKILL
    # What the killed merge left: its partial work and its (no longer locked) lock file.
    leftovers = sorted(p.name for p in out.parent.iterdir())
    assert leftovers == [".merged.lock", ".merged.partial"], leftovers
    assert running_merge(out) is None
    merge(recipe, out, resume=True, threads=1)
    assert f"resuming: {PAUSE_AFTER} of" in caplog.text
    assert_is_the_linear_merge(out, tuned)
    assert [p.name for p in out.parent.iterdir()] == ["merged"]


def test_the_lock_names_its_holder_and_is_free_again_once_released(tmp_path: Path) -> None:
    out = tmp_path / "merged"
    with lock_output(out) as held:
        assert held.path.name == ".merged.lock"
        assert f"pid {os.getpid()}" in (running_merge(out) or "")
        # A second lock (another open file, as another merge would hold) is refused.
        with pytest.raises(MergeError) as refused:
            lock_output(out)
        assert f"pid {os.getpid()}" in refused.value.message
        assert refused.value.hint and "--resume" in refused.value.hint
    assert not held.path.exists()
    assert running_merge(out) is None
    with lock_output(out):
        pass
    assert list(tmp_path.iterdir()) == []
