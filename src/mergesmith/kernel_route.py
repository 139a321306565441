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
    mask_layout,
    model_plans,
    summed_weight,
)
from mergesmith.ops.blocks import block_ranges
from mergesmith.ops.exact_sum import ExactSum
from mergesmith.ops.float32_sum import SCALAR_LIMIT, float32_sum
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
        self.has_f16 = bool(native.loaded().ms_has_f16())

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
        # Pages the kernel faults in as it writes them: a bytearray would write zeros first.
        out = mmap.mmap(-1, job.numel * ITEMSIZE[job.dtype])
        at = _Arrays(self, job, out)
        if self.plan.method.name == "linear":
            self._linear(job, at)
        else:
            self._merge(job, at)
        if not allow_nonfinite and native.count_nonfinite(at.out, job.numel):
            self._name_nonfinite_input(job, at)
            raise too_large(job)
        del at
        return memoryview(out)

    def _linear(self, job: TensorJob, at: _Arrays) -> None:
        """methods.linear's kernel path: the weighted sum, block by block."""
        settings = self._settings(job)
        weights = [float(w) for w in settings["weight"]]
        normalize = settings["normalize"]
        total = float32_sum(weights) if normalize else 1.0
        for _, start, end in block_ranges(job.numel):
            native.linear_block(
                at.models, weights, start, end, normalize=normalize, total=total, out=at.out
            )

    def _merge(self, job: TensorJob, at: _Arrays) -> None:
        """merge_task_vectors' kernel path: measure `rescale`, then combine block by block."""
        settings = self._settings(job)
        n = job.numel
        sparsifier = settings["sparsifier"]
        assert at.base is not None
        plans = model_plans(
            len(job.inputs),
            sparsifier,
            settings["density"],
            settings["gamma"],
            settings["epsilon"],
            settings["seeds"],
            settings["rescale"],
        )
        block = block_size_for(job.shape, sparsifier)
        width = as_rows(job.shape)[1]
        masks = [
            self._measure(p, at.base, model, n, block, width)
            for p, model in zip(plans, at.models, strict=True)
        ]
        weights = [float(w) for w in settings["weight"]]
        consensus, normalize = settings["consensus_method"], settings["normalize"]
        # The kernel divides by it only for a normalized plain sum (takes() bounds its count).
        plain_divisor = summed_weight(weights) if normalize and consensus is None else 1.0
        for number, start, end in block_ranges(n, block):
            trims = []
            for p, weight, mask in zip(plans, weights, masks, strict=True):
                trim = p.native_trim(start, end, weight)
                if mask is not None:
                    # What the torch path's plan does with the bits it kept from measuring.
                    assert trim.mode in (native.TRIM_GIVEN, native.TRIM_RANDOM)
                    trim.mode = native.TRIM_GIVEN_BITS
                    trim.keep = mask.block(number)
                trims.append(trim)
            native.family_block(
                at.base,
                at.models,
                trims,
                start,
                end,
                consensus=consensus,
                normalize=normalize,
                plain_divisor=plain_divisor,
                lambda_=settings["lambda_"],
                out=at.out,
            )

    def _measure(
        self, plan: ModelPlan, base: native.Flat, model: native.Flat, n: int, block: int, width: int
    ) -> _Bits | None:
        """ModelPlan.measure_rescale's fused path: sets the plan's factor and returns the mask
        drawn while measuring, or None where the plan measures nothing."""
        if not plan.measures:
            return None
        mask = _Bits(*mask_layout(n, block))
        counted_total, counted_kept = native.NativeSum(), native.NativeSum()
        threshold = keep_threshold(plan.density)
        for number, start, end in block_ranges(n, block):
            if plan.kind == "random":
                native.stream_measure(
                    base,
                    model,
                    start,
                    end,
                    plan.seed,
                    threshold,
                    mask.block(number),
                    counted_total,
                    counted_kept,
                )
            else:
                native.della_measure(
                    base,
                    model,
                    start,
                    end,
                    width,
                    plan.seed,
                    2 * plan.epsilon,
                    plan.density - plan.epsilon,
                    mask.block(number),
                    counted_total,
                    counted_kept,
                )
        total, kept = ExactSum(), ExactSum()
        counted_total.add_to(total)
        counted_kept.add_to(kept)
        plan.take_norms(total, kept)
        return mask

    def _name_nonfinite_input(self, job: TensorJob, at: _Arrays) -> None:
        """Raise naming the first input (base first) holding NaN or Inf, if any."""
        pairs = list(zip(job.inputs, at.models, strict=True))
        if job.base is not None and at.base is not None:
            pairs.insert(0, (job.base, at.base))
        for inp, array in pairs:
            if native.count_nonfinite(array, self._meta(inp).numel):
                raise nonfinite_input(inp)

    def _settings(self, job: TensorJob) -> dict[str, Any]:
        return self.plan.method.keywords(job.params, job.model_params, job.seeds, len(job.inputs))

    def _mapped(self, inp: TensorInput) -> bool:
        return isinstance(self.sources[inp.model], SafetensorsSource) and inp.crop is None

    def _meta(self, inp: TensorInput) -> TensorMeta:
        return self.sources[inp.model].tensors[inp.name]

    def _kernel_dtype(self, dtype: str) -> bool:
        return dtype in native.KERNEL_DTYPES and (dtype != "F16" or self.has_f16)

    def _buffer(self, inp: TensorInput) -> memoryview | bytearray:
        source = self.sources[inp.model]
        assert isinstance(source, SafetensorsSource)
        return source.buffer(inp.name)


class _Arrays:
    """A job's inputs and output as the kernels see them; holding this keeps their buffers
    exported (and so in place)."""

    def __init__(self, route: KernelRoute, job: TensorJob, out: mmap.mmap) -> None:
        self._views: list[ctypes.c_char] = []
        self.base = None if job.base is None else self._input(route, job.base)
        self.models = [self._input(route, inp) for inp in job.inputs]
        self.out = self._flat(out, native.KERNEL_DTYPES[job.dtype])

    def _input(self, route: KernelRoute, inp: TensorInput) -> native.Flat:
        return self._flat(route._buffer(inp), native.KERNEL_DTYPES[route._meta(inp).dtype])

    def _flat(self, buffer: memoryview | bytearray | mmap.mmap, code: int) -> native.Flat:
        self._views.append(ctypes.c_char.from_buffer(buffer))
        return native.Flat(ctypes.addressof(self._views[-1]), code)


class _Bits:
    """A drawn mask, one bit an entry, each block's at `block_bytes` times its number."""

    def __init__(self, block_bytes: int, blocks: int) -> None:
        self.block_bytes = block_bytes
        self._buffer = (ctypes.c_uint8 * (block_bytes * blocks))()

    def block(self, number: int) -> int:
        """Where block `number`'s bits start."""
        return ctypes.addressof(self._buffer) + number * self.block_bytes
