"""The kernel route: a merge whose every tensor the C kernels compute, run on the bytes of the
mapped input files without torch.

Importing torch takes about a second: half of a DARE-TIES merge of 220M-parameter models, and
more of a small one. Where the kernels do all of a tensor's arithmetic, torch only carries
pointers to them. `route_for` says whether every job of a plan is such a tensor; then the
engine computes each one here, and the `mergesmith` command (which defers importing torch,
see deferred_torch) never loads it.

A tensor qualifies when its inputs are safetensors files on this machine (no adapter, no crop,
no vocabulary re-indexing) in a dtype the kernels read, and it is copied (integer buffers),
merged by `linear`, or merged by a task-vector method whose sparsifier needs no ranking by
torch: none, DARE's random drop, or DELLA's with `rescale` (the kernel ranks within rows while
measuring). A normalized plain sum also needs fewer than 8 models: its divisor is the weights'
float32 sum in torch's order (ops.float32_sum). The steps are those of the methods' C kernel
paths (methods.linear, methods.task_arithmetic.merge_task_vectors, whose ModelPlan makes each
model's decisions here too), and the bytes are the same: tests hold the two routes to each
other (tests/test_kernel_route.py).
"""

from __future__ import annotations

import ctypes
import mmap
from collections.abc import Mapping, Sequence
from typing import Any

from mergesmith import native
from mergesmith.dtypes import ITEMSIZE
from mergesmith.engine import nonfinite_input, too_large
from mergesmith.methods.task_arithmetic import (
    FAMILY,
    ModelPlan,
    as_rows,
    block_size_for,
    model_plans,
    summed_weight,
)
from mergesmith.ops.blocks import block_ranges
from mergesmith.ops.exact_sum import ExactSum
from mergesmith.ops.float32_sum import SCALAR_LIMIT, float32_sum
from mergesmith.ops.sparsify import RESCALE_EPS
from mergesmith.ops.stream import keep_threshold
from mergesmith.plan import Plan, TensorInput, TensorJob
from mergesmith.sources.base import ModelSource, TensorMeta
from mergesmith.sources.safetensors_file import SafetensorsSource

# Sparsifiers the route computes, and whether they need `rescale` to stay in the kernels.
_SPARSIFIERS = {None: False, "random": False, "della_magprune": True}


def route_for(
    plan: Plan, sources: Mapping[str, ModelSource], jobs: Sequence[TensorJob], device: str
) -> KernelRoute | None:
    """The route for `jobs`, or None where any of them needs torch (or the kernels are off)."""
    if device != "cpu" or not native.available():
        return None
    route = KernelRoute(plan, sources)
    return route if all(route.takes(job) for job in jobs) else None


class KernelRoute:
    def __init__(self, plan: Plan, sources: Mapping[str, ModelSource]) -> None:
        self.plan = plan
        self.sources = sources
        self.lib = native.loaded()

    def takes(self, job: TensorJob) -> bool:
        """Whether this route computes `job`."""
        inputs = [inp for inp in (job.base, *job.inputs) if inp is not None]
        if job.vocab is not None or job.numel == 0 or not all(map(self._mapped, inputs)):
            return False
        if job.copy_only:
            return True
        name = self.plan.method.name
        row = FAMILY.get(name)
        if name != "linear" and (row is None or row.sparsifier not in _SPARSIFIERS):
            return False
        kernel_dtypes = [self._meta(inp).dtype for inp in inputs] + [job.dtype]
        if not job.inputs or not all(map(self._kernel_dtype, kernel_dtypes)):
            return False
        settings = self._settings(job)
        # A normalized plain sum divides by the weights' float32 sum, which float32_sum takes
        # from torch from SCALAR_LIMIT weights on.
        plain_divisor = settings["normalize"] and settings.get("consensus_method") is None
        if plain_divisor and len(job.inputs) >= SCALAR_LIMIT:
            return False
        if row is None:
            return job.base is None  # linear: a base is one more input
        if job.base is None or (_SPARSIFIERS[row.sparsifier] and not settings["rescale"]):
            return False
        # One entry a row has no rank: the torch code handles it.
        return row.sparsifier != "della_magprune" or 1 < as_rows(job.shape)[1] < 1 << 31

    def compute(self, job: TensorJob, allow_nonfinite: bool = False) -> memoryview:
        """The job's output tensor as bytes. Unless `allow_nonfinite`, NaN or Inf in it is a
        MergeError naming the input that holds them, as engine.compute says it."""
        if job.copy_only:
            return memoryview(self._buffer(job.inputs[0]))
        base = None if job.base is None else self._buffer(job.base)
        models = [self._buffer(inp) for inp in job.inputs]
        # Pages the kernel faults in as it writes them: a bytearray would write zeros first.
        out = mmap.mmap(-1, job.numel * ITEMSIZE[job.dtype])
        addresses = _Addresses(base, models, out)
        if self.plan.method.name == "linear":
            self._linear(job, addresses)
        else:
            self._merge(job, addresses)
        code = native.KERNEL_DTYPES[job.dtype]
        if not allow_nonfinite and self.lib.ms_count_nonfinite(addresses.out, code, job.numel):
            self._name_nonfinite_input(job, addresses)
            raise too_large(job)
        del addresses
        return memoryview(out)

    def _linear(self, job: TensorJob, at: _Addresses) -> None:
        """methods.linear's kernel path: the weighted sum, block by block."""
        settings = self._settings(job)
        weights = [float(w) for w in settings["weight"]]
        k = len(weights)
        pointers = (ctypes.c_void_p * k)(*at.models)
        dtypes = (ctypes.c_int32 * k)(*(self._code(inp) for inp in job.inputs))
        floats = (ctypes.c_float * k)(*weights)
        total = float32_sum(weights) if settings["normalize"] else 1.0
        for _, start, end in block_ranges(job.numel):
            status = self.lib.ms_linear_block(
                pointers,
                dtypes,
                floats,
                k,
                start,
                end - start,
                int(settings["normalize"]),
                total,
                at.out,
                native.KERNEL_DTYPES[job.dtype],
            )
            if status != 0:
                raise native.KernelError("no memory for the kernel's scratch buffers")

    def _merge(self, job: TensorJob, at: _Addresses) -> None:
        """merge_task_vectors' kernel path: measure `rescale`, then combine block by block."""
        settings = self._settings(job)
        k, n = len(job.inputs), job.numel
        sparsifier = settings["sparsifier"]
        assert at.base is not None
        plans = model_plans(
            k,
            sparsifier,
            settings["density"],
            settings["gamma"],
            settings["epsilon"],
            settings["seeds"],
            settings["rescale"],
        )
        block = block_size_for(job.shape, sparsifier)
        width = as_rows(job.shape)[1]
        base_code = self._code(job.base)
        codes = [self._code(inp) for inp in job.inputs]
        masks = [
            self._measure(p, at.base, base_code, at.models[i], codes[i], n, block, width)
            for i, p in enumerate(plans)
        ]
        weights = [float(w) for w in settings["weight"]]
        lambda_ = settings["lambda_"]
        pointers = (ctypes.c_void_p * k)(*at.models)
        dtypes = (ctypes.c_int32 * k)(*codes)
        for number, start, end in block_ranges(n, block):
            trims = (native.Trim * k)()
            for i, (p, weight, mask) in enumerate(zip(plans, weights, masks, strict=True)):
                trims[i] = p.native_trim(start, end, weight)
                if mask is not None:
                    # What the torch path's plan does with the bits it kept from measuring.
                    assert trims[i].mode in (native.TRIM_GIVEN, native.TRIM_RANDOM)
                    trims[i].mode = native.TRIM_GIVEN_BITS
                    trims[i].keep = mask.address + number * mask.block_bytes
            status = self.lib.ms_family_block(
                at.base,
                base_code,
                pointers,
                dtypes,
                k,
                trims,
                start,
                end - start,
                native.CONSENSUS[settings["consensus_method"]],
                int(settings["normalize"]),
                summed_weight(weights),
                int(lambda_ != 1),
                lambda_,
                at.out,
                native.KERNEL_DTYPES[job.dtype],
            )
            if status != 0:
                raise native.KernelError("no memory for the kernel's scratch buffers")

    def _measure(
        self,
        plan: ModelPlan,
        base: int,
        base_code: int,
        model: int,
        model_code: int,
        n: int,
        block: int,
        width: int,
    ) -> _Bits | None:
        """ModelPlan.measure_rescale's fused path: sets the plan's factor and returns the mask
        drawn while measuring, or None where the plan measures nothing."""
        if not plan.rescale or plan.kind is None or plan.keep_none:
            return None
        mask = _Bits((min(block, n) + 7) // 8, -(-n // block))
        counted_total, counted_kept = native.NativeSum(), native.NativeSum()
        threshold = keep_threshold(plan.density)
        for number, start, end in block_ranges(n, block):
            bits = mask.address + number * mask.block_bytes
            if plan.kind == "random":
                self.lib.ms_stream_measure(
                    base,
                    base_code,
                    model,
                    model_code,
                    start,
                    end - start,
                    plan.seed,
                    threshold,
                    ctypes.byref(counted_total),
                    ctypes.byref(counted_kept),
                    bits,
                )
                continue
            status = self.lib.ms_della_measure(
                base,
                base_code,
                model,
                model_code,
                start,
                (end - start) // width,
                width,
                plan.seed,
                2 * plan.epsilon,
                plan.density - plan.epsilon,
                ctypes.byref(counted_total),
                ctypes.byref(counted_kept),
                bits,
            )
            if status != 0:
                raise native.KernelError("no memory for the kernel's scratch buffers")
        total, kept = ExactSum(), ExactSum()
        counted_total.add_to(total)
        counted_kept.add_to(kept)
        if total.value() >= RESCALE_EPS and kept.value() >= RESCALE_EPS:
            plan.factor = total.ratio(kept)
        return mask

    def _name_nonfinite_input(self, job: TensorJob, at: _Addresses) -> None:
        """Raise naming the first input (base first) holding NaN or Inf, if any."""
        pairs = list(zip(job.inputs, at.models, strict=True))
        if job.base is not None and at.base is not None:
            pairs.insert(0, (job.base, at.base))
        for inp, address in pairs:
            if self.lib.ms_count_nonfinite(address, self._code(inp), self._meta(inp).numel):
                raise nonfinite_input(inp)

    def _settings(self, job: TensorJob) -> dict[str, Any]:
        return self.plan.method.keywords(job.params, job.model_params, job.seeds, len(job.inputs))

    def _mapped(self, inp: TensorInput) -> bool:
        return isinstance(self.sources[inp.model], SafetensorsSource) and inp.crop is None

    def _meta(self, inp: TensorInput) -> TensorMeta:
        return self.sources[inp.model].tensors[inp.name]

    def _kernel_dtype(self, dtype: str) -> bool:
        return dtype in native.KERNEL_DTYPES and (dtype != "F16" or bool(self.lib.ms_has_f16()))

    def _code(self, inp: TensorInput | None) -> int:
        assert inp is not None
        return native.KERNEL_DTYPES[self._meta(inp).dtype]

    def _buffer(self, inp: TensorInput) -> memoryview | bytearray:
        source = self.sources[inp.model]
        assert isinstance(source, SafetensorsSource)
        return source.buffer(inp.name)


class _Addresses:
    """Where a job's buffers start in memory; holding this keeps them exported."""

    def __init__(
        self,
        base: memoryview | bytearray | None,
        models: list[memoryview | bytearray],
        out: mmap.mmap,
    ) -> None:
        self._views = [ctypes.c_char.from_buffer(b) for b in (*models, out)]
        *self.models, self.out = (ctypes.addressof(v) for v in self._views)
        self.base: int | None = None
        if base is not None:
            self._views.append(ctypes.c_char.from_buffer(base))
            self.base = ctypes.addressof(self._views[-1])


class _Bits:
    """A drawn mask, one bit an entry, each block's at `block_bytes` times its number."""

    def __init__(self, block_bytes: int, blocks: int) -> None:
        self.block_bytes = block_bytes
        self._buffer = (ctypes.c_uint8 * (block_bytes * blocks))()
        self.address = ctypes.addressof(self._buffer)
