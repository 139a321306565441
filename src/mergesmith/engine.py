"""Runs the plan's jobs: read inputs, call the method, hand each result to the writer.

The only module that knows about threads, devices and memory. Each job reads its inputs when it
starts (memory-mapped, so only the pages it touches are read) and drops them when it ends; a
byte budget bounds how much working memory the jobs in flight may hold together. A read-ahead
thread asks for the next jobs' inputs while the current ones compute, so a merge from a cold
page cache reads the disk and computes at the same time.
"""

from __future__ import annotations

import ctypes
import functools
import gc
import math
import sys
import threading
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor, wait
from dataclasses import dataclass

import torch

from mergesmith.dtypes import CONFIG_NAME, ITEMSIZE, to_torch
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
    # Jobs the C kernels compute whole run without torch (kernel_route); False always takes
    # the torch code, for comparing the two.
    kernel_route: bool = True


def _glibc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None  # not glibc (musl, say): nothing to tune


_LIBC = _glibc()
# A job that touched this much memory hands its freed heap back when it ends.
TRIM_AFTER_BYTES = 64 << 20


def _return_freed_buffers_to_the_os() -> None:
    """glibc raises its mmap threshold after each large free, after which freed tensor buffers
    stay on the heap and peak memory creeps up with every job. A fixed threshold keeps large
    buffers in their own mappings, returned to the system as soon as a job frees them."""
    if _LIBC is not None:
        m_trim_threshold, m_mmap_threshold = -1, -3
        # Above the 1 MB block temporaries (reused from the heap), below whole tensors.
        _LIBC.mallopt(m_mmap_threshold, 16 << 20)
        # Fixing the mmap threshold also fixes the trim threshold at 128 KB, so every freed
        # block temporary at the top of a thread's heap would be handed back and faulted in
        # again on the next block (system time above user time for the passes of
        # model_stock or sce). Large jobs trim the heap when they end (_trim_heap).
        _LIBC.mallopt(m_trim_threshold, 64 << 20)


def _trim_heap() -> None:
    """Give free heap pages of every thread's arena back to the system."""
    if _LIBC is not None:
        _LIBC.malloc_trim(0)


class _Budget:
    """Admits jobs while their working memory fits; a job larger than the budget runs alone."""

    def __init__(self, limit: int | None) -> None:
        self.limit = limit
        self.used = 0
        self.cond = threading.Condition()

    def fits(self, amount: int) -> bool:
        return self.limit is None or not self.used or self.used + amount <= self.limit

    def take_first_fitting(self, jobs: list[TensorJob]) -> TensorJob:
        """Wait until some job fits, then reserve its memory and return it (removed from jobs)."""
        with self.cond:
            while True:
                for i, job in enumerate(jobs):
                    if self.fits(job.work_bytes):
                        self.used += job.work_bytes
                        return jobs.pop(i)
                self.cond.wait()

    def release(self, amount: int) -> None:
        with self.cond:
            self.used -= amount
            self.cond.notify_all()


class _ReadAhead:
    """Hints the inputs of the jobs about to run, in the order they will run, from a thread of
    its own.

    Jobs read through memory maps: from a cold page cache every first touch of a page waits for
    the disk, and the disk idles while the jobs compute. The hint (`ModelSource.prefetch`) has
    the kernel read a tensor's bytes in the background; it can block while it queues them, hence
    the thread. It stays at most `window` bytes of inputs ahead of the jobs that have started,
    so it never fills the page cache with pages evicted again before their job reads them. The
    pages are the page cache's, not this process's: memory within the budget is unchanged.
    """

    def __init__(
        self, order: list[TensorJob], sources: Mapping[str, ModelSource], window: int
    ) -> None:
        self.order = order
        self.sources = sources
        self.window = window
        self.ahead = 0  # input bytes hinted for jobs that have not started
        self.hinted: set[int] = set()
        self.started: set[int] = set()
        self.stopped = False
        self.cond = threading.Condition()
        self.thread = threading.Thread(target=self._run, name="mergesmith-readahead", daemon=True)
        self.thread.start()

    def job_started(self, job: TensorJob) -> None:
        with self.cond:
            self.started.add(job.index)
            if job.index in self.hinted:
                self.ahead -= _input_bytes(job, self.sources)
                self.cond.notify_all()

    def close(self) -> None:
        with self.cond:
            self.stopped = True
            self.cond.notify_all()
        self.thread.join()

    def _run(self) -> None:
        for job in self.order:
            size = _input_bytes(job, self.sources)
            with self.cond:
                # One job is always let through, however large, so a big job is never read on
                # its own page faults alone.
                while not self.stopped and self.ahead and self.ahead + size > self.window:
                    self.cond.wait()
                if self.stopped:
                    return
                if job.index not in self.started:
                    self.hinted.add(job.index)
                    self.ahead += size
            # A job already running is hinted too: the rest of its pages then arrive in the
            # background instead of one page fault at a time.
            for inp in (job.base, *job.inputs):
                if inp is not None:
                    self.sources[inp.model].prefetch(inp.name)


def _input_bytes(job: TensorJob, sources: Mapping[str, ModelSource]) -> int:
    total = 0
    for inp in (job.base, *job.inputs):
        if inp is not None:
            meta = sources[inp.model].tensors[inp.name]
            total += meta.numel * ITEMSIZE[meta.dtype]
    return total


def run_jobs(
    plan: Plan,
    sources: Mapping[str, ModelSource],
    write: Callable[[TensorJob, torch.Tensor | memoryview], None],
    options: EngineOptions,
    jobs: list[TensorJob] | None = None,
    on_done: Callable[[TensorJob], None] | None = None,
) -> None:
    """Run `jobs` (default: all of the plan's); `write` is called from worker threads with
    each result (a tensor, or its bytes where the kernel route computed it), and
    `on_done` after each job that succeeded, one job at a time (so a caller counting progress
    needs no lock of its own)."""
    todo = _run_order(plan.jobs if jobs is None else jobs)
    _return_freed_buffers_to_the_os()
    route = None
    if options.kernel_route:
        from mergesmith.kernel_route import route_for

        route = route_for(plan, sources, todo, options.device)
    previous_threads = None
    if route is None:
        previous_threads = torch.get_num_threads()
        # Intra-op threads change reduction order and so the last bits of sums; one per job
        # keeps the output identical whatever --threads is, and jobs run in parallel instead.
        torch.set_num_threads(1)
    budget = _Budget(options.max_memory or default_memory_budget(todo))
    failed = threading.Event()
    reporting = threading.Lock()

    def finished(future: Future, job: TensorJob) -> None:
        budget.release(job.work_bytes)
        if future.cancelled() or future.exception() is not None:
            failed.set()
        elif on_done is not None:
            with reporting:
                on_done(job)

    # Jobs allocate many short-lived objects; cyclic GC passes over the whole heap would cost
    # several percent of a merge and free nothing (tensors are freed by reference counting).
    gc_was_enabled = gc.isenabled()
    gc.disable()
    # OpenMP thread counts are per thread: each worker must set its own.
    pool = ThreadPoolExecutor(
        max_workers=max(1, options.threads),
        initializer=_one_torch_thread if route is None else None,
    )
    # The hints run as far ahead as the budget lets jobs hold memory.
    readahead = _ReadAhead(todo, sources, budget.limit or 0)

    if route is not None:
        result_of = functools.partial(route.compute, allow_nonfinite=options.allow_nonfinite)
    else:
        device = torch.device(options.device)

        def result_of(job: TensorJob) -> torch.Tensor:
            return compute(plan.method, job, sources, device, options.allow_nonfinite)

    def run_one(job: TensorJob) -> None:
        readahead.job_started(job)
        try:
            write(job, result_of(job))
        finally:
            _release(job, sources)

    futures: list[Future] = []
    try:
        try:
            for job in _in_order_within(budget, todo, failed):
                future = pool.submit(run_one, job)
                future.add_done_callback(lambda f, j=job: finished(f, j))
                futures.append(future)
            wait(futures)
        except BaseException:
            # Ctrl-C or SIGTERM: drop queued jobs, let running ones end, and leave.
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        pool.shutdown(wait=True)
        # The first failure in submission order (a fixed sort), so the same bad input gives the
        # same message on every run.
        for future in futures:
            error = future.exception()
            if error is not None:
                raise error
    finally:
        readahead.close()
        if previous_threads is not None:
            torch.set_num_threads(previous_threads)
        if gc_was_enabled:
            gc.enable()


def _run_order(jobs: list[TensorJob]) -> list[TensorJob]:
    """Largest first: big jobs start early instead of ending the merge on one busy thread.
    Output does not depend on this order."""
    return sorted(jobs, key=lambda j: (-j.work_bytes, j.index))


def _in_order_within(
    budget: _Budget, jobs: list[TensorJob], failed: threading.Event
) -> Iterator[TensorJob]:
    """Jobs in their run order, each as soon as the memory budget admits it; a job waiting for
    room never holds up later ones that fit."""
    queue = list(jobs)
    while queue and not failed.is_set():
        yield budget.take_first_fitting(queue)


def default_memory_budget(jobs: list[TensorJob]) -> int:
    """Room for the largest job plus a quarter more, so two giant jobs (embeddings and lm_head,
    say) never run together while small ones fill the other threads."""
    largest = max((job.work_bytes for job in jobs), default=0)
    return largest + largest // 4


def _one_torch_thread() -> None:
    torch.set_num_threads(1)


def _release(job: TensorJob, sources: Mapping[str, ModelSource]) -> None:
    """A job's end: its inputs' pages stop counting as ours, and a large job's freed heap
    goes back to the system."""
    for inp in (job.base, *job.inputs):
        if inp is not None:
            sources[inp.model].release(inp.name)
    if job.work_bytes > TRIM_AFTER_BYTES:
        _trim_heap()


def compute(
    method: MergeMethod,
    job: TensorJob,
    sources: Mapping[str, ModelSource],
    device: torch.device,
    allow_nonfinite: bool = False,
) -> torch.Tensor:
    """One output tensor, in its output dtype, on the CPU.

    Unless `allow_nonfinite`, NaN and Inf are looked for here, once for every method: in the
    inputs before the method runs, or, for a method through which they always reach the output,
    in the output (one tensor rather than all inputs), and the input holding them is named."""
    if job.copy_only:
        return _load(sources, job.inputs[0], device)
    base, models, loaded = read_inputs(
        job, sources, device, check_finite=not allow_nonfinite and method.finite_check == "inputs"
    )
    inputs = MethodInputs(
        base, models, job.params, job.model_params, job.seeds, out_dtype=to_torch(job.dtype)
    )
    try:
        result = method.run(inputs).to(dtype=to_torch(job.dtype))
    except MergeError as exc:
        # A method's own refusal (weights that cancel, say) names the tensor it happened at.
        raise MergeError(f"tensor '{job.name}': {exc.message}", exc.hint) from None
    if not allow_nonfinite and not _all_finite(result):
        _require_finite(loaded)
        raise too_large(job)
    del base, models, loaded
    return result.cpu()


def read_inputs(
    job: TensorJob,
    sources: Mapping[str, ModelSource],
    device: torch.device,
    check_finite: bool = True,
) -> tuple[torch.Tensor | None, list[torch.Tensor], list[tuple[TensorInput, torch.Tensor]]]:
    """A job's read: its base and models as the method sees them (cropped, and re-indexed to the
    output vocabulary), and the tensors as read, each with its input. With `check_finite`, an
    input holding NaN or Inf is an error naming it (checked before re-indexing, so it names the
    model's own tensor)."""
    base = _load(sources, job.base, device) if job.base else None
    models = [_load(sources, inp, device) for inp in job.inputs]
    loaded = [(job.base, base)] if job.base else []
    loaded += list(zip(job.inputs, models, strict=True))
    if check_finite:
        _require_finite(loaded)
    if job.vocab is not None:
        # Rows by token string, as the output tokenizer numbers them (the base comes first).
        aligned = job.vocab.align([base, *models] if base is not None else models)
        if base is not None:
            base, *models = aligned
        else:
            models = aligned
    return base, models, loaded


def _all_finite(tensor: torch.Tensor) -> bool:
    """NaN propagates through min and max, and an infinity is one of them: one reduction that
    runs about 30x faster on the CPU than isfinite(tensor).all()."""
    if tensor.numel() == 0:
        return True
    low, high = torch.aminmax(tensor)
    return math.isfinite(float(low)) and math.isfinite(float(high))


def _require_finite(loaded: list[tuple[TensorInput, torch.Tensor]]) -> None:
    """Raise naming the first input (base first) that holds NaN or Inf, if any."""
    for inp, tensor in loaded:
        if tensor.is_floating_point() and not _all_finite(tensor):
            raise nonfinite_input(inp)


def nonfinite_input(inp: TensorInput) -> MergeError:
    return MergeError(
        f"model '{inp.model}': tensor '{inp.name}' holds NaN or infinite values",
        "the checkpoint is damaged or diverged; use --allow-nonfinite to merge it anyway",
    )


def too_large(job: TensorJob) -> MergeError:
    """A merged tensor with NaN or Inf where no input holds any."""
    dtype = CONFIG_NAME.get(job.dtype, job.dtype)
    return MergeError(
        f"merged tensor '{job.name}' has values too large for {dtype}",
        "the weights scale the models up too far; lower them, or set a wider 'dtype'",
    )


def _load(
    sources: Mapping[str, ModelSource], inp: TensorInput, device: torch.device
) -> torch.Tensor:
    tensor = sources[inp.model].read(inp.name)
    if inp.crop is not None:
        tensor = tensor[tuple(slice(0, n) for n in inp.crop)].contiguous()
    return tensor if device.type == "cpu" else tensor.to(device)
