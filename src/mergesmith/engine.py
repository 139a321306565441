"""Runs the plan's jobs: read inputs, call the method, hand each result to the writer.

The only module that knows about threads, devices and memory. Each job reads its inputs when it
starts (memory-mapped, so only the pages it touches are read) and drops them when it ends; a
byte budget bounds how much working memory the jobs in flight may hold together.
"""

from __future__ import annotations

import ctypes
import sys
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from mergesmith.dtypes import to_torch
from mergesmith.errors import MergeError
from mergesmith.methods.registry import MergeMethod, MethodInputs
from mergesmith.plan import Plan, TensorInput, TensorJob
from mergesmith.sources.base import ModelSource


@dataclass(frozen=True)
class EngineOptions:
    threads: int = 1
    max_memory: int | None = None  # bytes of working memory for jobs in flight
    device: str = "cpu"
    allow_nonfinite: bool = False


def _return_freed_buffers_to_the_os() -> None:
    """glibc raises its mmap threshold after each large free, after which freed tensor buffers
    stay on the heap and peak memory creeps up with every job. A fixed threshold keeps large
    buffers in their own mappings, returned to the system as soon as a job frees them."""
    if not sys.platform.startswith("linux"):
        return
    try:
        libc = ctypes.CDLL("libc.so.6")
    except OSError:
        return  # not glibc (musl, say): nothing to tune
    m_mmap_threshold = -3
    libc.mallopt(m_mmap_threshold, 1 << 20)


class _Budget:
    """Admits jobs while their working memory fits; a job larger than the budget runs alone."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0
        self.cond = threading.Condition()

    def acquire(self, amount: int) -> None:
        with self.cond:
            while self.limit is not None and self.used and self.used + amount > self.limit:
                self.cond.wait()
            self.used += amount

    def release(self, amount: int) -> None:
        with self.cond:
            self.used -= amount
            self.cond.notify_all()


def run_jobs(
    plan: Plan,
    sources: Mapping[str, ModelSource],
    write: Callable[[TensorJob, torch.Tensor], None],
    options: EngineOptions,
    jobs: list[TensorJob] | None = None,
    on_done: Callable[[TensorJob], None] | None = None,
) -> None:
    """Run `jobs` (default: all of the plan's); `write` is called from worker threads."""
    todo = plan.jobs if jobs is None else jobs
    _return_freed_buffers_to_the_os()
    device = torch.device(options.device)
    previous_threads = torch.get_num_threads()
    # Intra-op threads change reduction order and so the last bits of sums; one per job keeps
    # the output identical whatever --threads is, and jobs run in parallel instead.
    torch.set_num_threads(1)
    budget = _Budget(options.max_memory)
    failed = threading.Event()

    def finished(future: Future, job: TensorJob) -> None:
        budget.release(job.work_bytes)
        if future.cancelled() or future.exception() is not None:
            failed.set()
        elif on_done is not None:
            on_done(job)

    pool = ThreadPoolExecutor(max_workers=max(1, options.threads))
    futures: list[Future] = []
    try:
        try:
            for job in todo:
                if failed.is_set():
                    break
                budget.acquire(job.work_bytes)
                future = pool.submit(_run_one, plan.method, job, sources, write, device, options)
                future.add_done_callback(lambda f, j=job: finished(f, j))
                futures.append(future)
            wait(futures)
        except BaseException:
            # Ctrl-C or SIGTERM: drop queued jobs, let running ones end, and leave.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        # The first failure in plan order, so the same bad input gives the same message.
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error
    finally:
        torch.set_num_threads(previous_threads)


def _run_one(
    method: MergeMethod,
    job: TensorJob,
    sources: Mapping[str, ModelSource],
    write: Callable[[TensorJob, torch.Tensor], None],
    device: torch.device,
    options: EngineOptions,
) -> None:
    try:
        write(job, compute(method, job, sources, device, options.allow_nonfinite))
    finally:
        for inp in (job.base, *job.inputs):
            if inp is not None:
                sources[inp.model].release(inp.name)


def compute(
    method: MergeMethod,
    job: TensorJob,
    sources: Mapping[str, ModelSource],
    device: torch.device,
    allow_nonfinite: bool = False,
) -> torch.Tensor:
    """One output tensor, in its output dtype, on the CPU."""
    if job.copy_only:
        return _load(sources, job.inputs[0])
    base = _as_float(sources, job.base, device, allow_nonfinite) if job.base else None
    models = [_as_float(sources, inp, device, allow_nonfinite) for inp in job.inputs]
    result = method.run(MethodInputs(base, models, job.params, job.model_params, job.seeds))
    del base, models
    return result.to(dtype=to_torch(job.dtype)).cpu()


def _load(sources: Mapping[str, ModelSource], inp: TensorInput) -> torch.Tensor:
    tensor = sources[inp.model].read(inp.name)
    if inp.crop is not None:
        tensor = tensor[tuple(slice(0, n) for n in inp.crop)]
    return tensor


def _as_float(
    sources: Mapping[str, ModelSource],
    inp: TensorInput,
    device: torch.device,
    allow_nonfinite: bool,
) -> torch.Tensor:
    # Arithmetic is float32 whatever the storage type; the result is rounded once at the end.
    tensor = _load(sources, inp).to(device=device, dtype=torch.float32)
    if not allow_nonfinite and not bool(torch.isfinite(tensor).all()):
        bad = int((~torch.isfinite(tensor)).sum())
        raise MergeError(
            f"model '{inp.model}': tensor '{inp.name}' has {bad} NaN or infinite value(s)",
            "the checkpoint is damaged or diverged; use --allow-nonfinite to merge it anyway",
        )
    return tensor
