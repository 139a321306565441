"""Ctrl-C and SIGTERM in the middle of a merge: exit 130 / 143, nothing at OUT, and the work so
far kept in a hidden `.OUT.partial` folder for --resume."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from mergesmith.toymodels import ToyShape, make_family
from tests.conftest import write_recipe

# 219 tensors, 33 MB per model in bfloat16: DELLA on one thread needs a few seconds, long
# enough to interrupt in the middle, and the family takes about as long to build.
SLOW_SHAPE = ToyShape(hidden=256, layers=24, intermediate=512, vocab=2048, heads=8, kv_heads=8)
SLOW_TENSORS = 3 + 9 * SLOW_SHAPE.layers
JOURNAL = ".mergesmith-progress"


def slow_family(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """A bfloat16 base and one fine-tune, built once per session for every module using it."""
    root = tmp_path_factory.getbasetemp() / "slow-family"
    done = root / "complete"
    if not done.exists():
        with one_torch_thread():
            family = make_family(root, 1, SLOW_SHAPE, dtype=torch.bfloat16)
        done.write_text("")
        return family
    return root / "base", [root / "finetune1"]


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """On a busy machine, torch's spinning worker threads make elementwise work 20x slower."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)


def della_recipe(base: Path, tuned: list[Path], density: float = 0.5) -> str:
    return (
        f"merge_method: della\nbase_model: {base}\nmodels:\n  - model: {tuned[0]}\n"
        f"    parameters: {{weight: 1.0, density: {density}, epsilon: 0.1}}\n"
    )


def partial_of(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def start_merge(recipe: Path, out: Path, *extra: str) -> subprocess.Popen:
    """The CLI as a user starts it from a terminal, where SIGINT is not ignored (a test runner
    started in the background may ignore it, and children inherit that)."""
    return subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mergesmith",
            "run",
            str(recipe),
            str(out),
            "--threads",
            "1",
            *extra,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def journaled(partial: Path) -> list[str]:
    """Lines of finished tensors in the progress journal (the first line is its fingerprint)."""
    try:
        lines = (partial / JOURNAL).read_text(encoding="utf-8").splitlines()
    except FileNotFoundError:
        return []
    return lines[1:]


def interrupt(proc: subprocess.Popen, out: Path, sig: signal.Signals, after: int = 3) -> str:
    """Send `sig` once `after` tensors are journaled; returns the CLI's stderr."""
    deadline = time.monotonic() + 120
    while len(journaled(partial_of(out))) < after:
        if proc.poll() is not None:
            _, err = proc.communicate()
            pytest.fail(
                f"the merge ended (exit {proc.returncode}) before it was interrupted:\n{err}"
            )
        assert time.monotonic() < deadline, "the merge journaled nothing for two minutes"
        time.sleep(0.005)
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    return err


@pytest.mark.parametrize(
    ("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"]
)
def test_signal_mid_merge_exits_128_plus_signal_and_publishes_nothing(
    tmp_path_factory: pytest.TempPathFactory, tmp_path: Path, sig: signal.Signals, code: int
) -> None:
    base, tuned = slow_family(tmp_path_factory)
    recipe = write_recipe(tmp_path, della_recipe(base, tuned))
    out = tmp_path / "merged"
    proc = start_merge(recipe, out)
    err = interrupt(proc, out, sig)
    assert proc.returncode == code, err
    assert "Traceback" not in err
    assert f"interrupted by {sig.name}" in err and "--resume" in err
    assert not out.exists()
    partial = partial_of(out)
    assert partial.is_dir() and partial.name.startswith(".")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([partial.name, recipe.name])
    # Nothing in the partial folder passes for a finished model.
    for name in ("config.json", "README.md", "mergesmith_config.yml", "tokenizer.json"):
        assert not (partial / name).exists(), name
    assert 3 <= len(journaled(partial)) < SLOW_TENSORS
