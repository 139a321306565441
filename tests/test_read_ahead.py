"""The engine's read-ahead hints each job's inputs in run order, never more than its window of
input bytes ahead of the jobs that have started. (That hints change no byte of a merge is held
by the determinism tests: every merge runs with them.)"""

from __future__ import annotations

import threading
from pathlib import Path

import torch

from mergesmith.api import prepare
from mergesmith.dtypes import ITEMSIZE
from mergesmith.engine import _ReadAhead, _run_order
from mergesmith.toymodels import save_model
from tests.conftest import write_recipe

SHAPES = {f"model.layers.{i}.mlp.up_proj.weight": (64, 32) for i in range(6)}
CONFIG = {"architectures": ["LlamaForCausalLM"], "num_hidden_layers": 6}


def models(root: Path) -> Path:
    g = torch.Generator().manual_seed(0)
    for name in ("base", "ft1", "ft2"):
        tensors = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
        save_model(root / name, tensors, CONFIG)
    return write_recipe(
        root,
        f"merge_method: ties\nbase_model: {root}/base\nmodels:\n"
        f"  - model: {root}/ft1\n    parameters: {{weight: 1, density: 0.5}}\n"
        f"  - model: {root}/ft2\n    parameters: {{weight: 1, density: 0.5}}\ndtype: float32\n",
    )


def test_hints_follow_the_run_order_within_the_window(tmp_path: Path) -> None:
    plan, sources = prepare(models(tmp_path))
    hinted: list[str] = []
    lock = threading.Lock()
    for source in sources.values():

        def record(name: str, _real=source.prefetch) -> None:
            with lock:
                hinted.append(name)
            _real(name)

        source.prefetch = record  # type: ignore[method-assign]
    order = _run_order(plan.jobs)
    job_bytes = 3 * 64 * 32 * ITEMSIZE["F32"]
    # A window of two jobs' inputs: the third waits until the first starts.
    ahead = _ReadAhead(order, sources, window=2 * job_bytes)
    try:
        for _ in range(100):
            if len(hinted) >= 6:
                break
            threading.Event().wait(0.01)
        assert len(hinted) == 6  # base, ft1, ft2 of the first two jobs, nothing more
        ahead.job_started(order[0])
        for _ in range(100):
            if len(hinted) >= 9:
                break
            threading.Event().wait(0.01)
        assert len(hinted) == 9
    finally:
        ahead.close()
    expected = [inp.name for job in order[:3] for inp in (job.base, *job.inputs)]
    assert hinted == expected
    for source in sources.values():
        source.close()
