"""A merge never holds a model whole: peak memory follows the largest job, not the model size."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mergesmith.api import prepare
from mergesmith.toymodels import ToyShape, make_family
from tests.conftest import write_recipe

# 24 layers, hidden 512, float32: about 260 MB per model, over 1 GB for the four inputs.
SHAPE = ToyShape(hidden=512, layers=24, intermediate=1024, vocab=4096, heads=8, kv_heads=8)


# A child's peak RSS counts the pages it inherited at fork, so the measured process is started
# from this small launcher rather than from the (large) test process.
LAUNCHER = """
import os, subprocess, sys
proc = subprocess.Popen(sys.argv[1:], stdout=subprocess.DEVNULL)
_, status, usage = os.wait4(proc.pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss)
"""


def peak_rss_mb(args: list[str]) -> float:
    """Peak resident memory of one process, from the kernel's accounting."""
    done = subprocess.run(
        [sys.executable, "-c", LAUNCHER, *args], capture_output=True, text=True, check=True
    )
    code, max_kib = done.stdout.split()
    assert code == "0", done.stderr[-2000:]
    return int(max_kib) / 1024  # Linux reports KiB


@pytest.mark.slow
def test_peak_memory_is_bounded_by_one_job_not_by_model_size(tmp_path: Path) -> None:
    base, tuned = make_family(tmp_path / "models", 3, SHAPE, dtype=torch.float32)
    model_mb = sum(f.stat().st_size for f in base.glob("*.safetensors")) / 2**20
    recipe = write_recipe(
        tmp_path,
        f"merge_method: ties\nbase_model: {base}\nmodels:\n"
        + "".join(f"  - model: {m}\n    parameters: {{weight: 0.5, density: 0.3}}\n" for m in tuned)
        + "dtype: float32\n",
    )
    # The same interpreter with everything a merge imports, doing no work: the fixed cost.
    baseline = peak_rss_mb(
        [sys.executable, "-c", "import torch, mergesmith.api, mergesmith.engine, safetensors"]
    )
    command = ["-m", "mergesmith", "run", str(recipe), str(tmp_path / "out"), "--threads", "1"]
    merged = peak_rss_mb([sys.executable, *command])
    plan, sources = prepare(recipe)
    for source in sources.values():
        source.close()
    largest_job_mb = max(job.work_bytes for job in plan.jobs) / 2**20
    inputs_mb = 4 * model_mb
    growth = merged - baseline
    print(
        f"peak RSS growth {growth:.0f} MB, largest job {largest_job_mb:.0f} MB, "
        f"inputs {inputs_mb:.0f} MB"
    )
    assert inputs_mb > 1000, "the test needs inputs far larger than the bound it checks"
    # One job's working set (with room for the interpreter's own bookkeeping), and far below
    # what holding the inputs would cost.
    assert growth < 2 * largest_job_mb, (growth, largest_job_mb)
    assert growth < inputs_mb / 4, (growth, inputs_mb)
