"""What a worker of the Ray backend runs for one task. Plain Python (the driver wraps it with
`ray.remote`), so it can be tested and read without a cluster.

The driver sends only the recipe's text, the seed, the shard size and the fingerprint of what it
planned. The worker plans again from the same files through the same `prepare()`, and refuses to
write unless its fingerprint equals the driver's: a node that sees other input files, another
recipe or another mergesmith would otherwise write other bytes into the shared output. It then
computes its jobs with the local engine (the same code, so the same bytes), writes each tensor
at its final offset in the shard the driver created, fsyncs, and returns the checksums for the
driver's progress journal.
"""

from __future__ import annotations

import datetime as dt
import os
import socket
import threading
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mergesmith.errors import MergeError
from mergesmith.output.layout import OutputLayout
from mergesmith.output.writer import NO_SPACE, tensor_bytes
from mergesmith.sources.base import ModelSource

if TYPE_CHECKING:
    import torch

    from mergesmith.plan import Plan

SAME_FILES_HINT = (
    "every node must see the inputs and the output at the same paths on a shared filesystem, "
    "with the same files and the same mergesmith version"
)


@dataclass(frozen=True)
class InputFile:
    """One input file as the driver's fingerprint saw it."""

    ref: str
    path: str
    size: int
    mtime_ns: int


@dataclass(frozen=True)
class WorkSpec:
    """Everything a worker needs to plan the merge again and check it is the driver's."""

    recipe_text: str
    seed: int
    shard_bytes: int
    cwd: str  # the driver's working directory: the recipe's relative paths start there
    staging: str  # the folder the driver created the shards in
    fingerprint: str
    inputs: tuple[InputFile, ...]
    version: str
    allow_nonfinite: bool
    # A pipeline stage: the earlier stages' output folders, by stage name.
    stage_outputs: tuple[tuple[str, str], ...] = ()


def input_files(sources: Mapping[str, ModelSource]) -> tuple[InputFile, ...]:
    """The files `journal.fingerprint` hashes, with the size and time it hashes."""
    found = []
    for ref in sorted(sources):
        for file in sources[ref].files:
            stat = file.stat()
            found.append(InputFile(ref, str(file), stat.st_size, stat.st_mtime_ns))
    return tuple(found)


def run_task(spec: WorkSpec, names: tuple[str, ...]) -> list[tuple[str, int]]:
    """Compute and write the tensors `names`; returns (name, CRC-32 of its bytes) for each.

    Errors a user can fix come back as MergeError naming this node."""
    try:
        return _run(spec, names)
    except MergeError as exc:
        # A plain MergeError: it crosses the process boundary intact (MergeErrors does not).
        raise MergeError(f"on node {socket.gethostname()}: {exc.message}", exc.hint) from None


def _run(spec: WorkSpec, names: tuple[str, ...]) -> list[tuple[str, int]]:
    from mergesmith import __version__
    from mergesmith.engine import EngineOptions, run_jobs
    from mergesmith.output.journal import fingerprint

    if spec.version != __version__:
        raise MergeError(
            f"mergesmith {__version__} is installed here, the driver runs {spec.version}",
            SAME_FILES_HINT,
        )
    prepared = _prepare(spec)
    plan, sources, layout = prepared.plan, prepared.sources, prepared.layout
    if fingerprint(plan, layout, sources) != spec.fingerprint:
        raise _mismatch(spec, sources)
    by_name = {job.name: job for job in plan.jobs}
    jobs = [by_name[name] for name in names]
    written: list[tuple[str, int]] = []
    lock = threading.Lock()
    writer = ShardPatcher(Path(spec.staging), layout, {layout.placements[n].shard for n in names})
    try:

        def write(job, tensor: torch.Tensor) -> None:
            crc = writer.write(job.name, tensor)
            with lock:
                written.append((job.name, crc))

        # One job at a time: the task declared one CPU and its largest job's memory.
        options = EngineOptions(threads=1, allow_nonfinite=spec.allow_nonfinite)
        run_jobs(plan, sources, write, options, jobs=jobs)
        writer.sync()
    finally:
        writer.close()
    return written


@dataclass
class _Prepared:
    key: tuple[object, ...]
    plan: Plan
    sources: dict[str, ModelSource]
    layout: OutputLayout


# The plan of the merge this worker process serves. Ray runs many tasks of one merge in each
# worker process (and gives another merge other processes); planning once instead of per task
# saves re-reading every header of every input, which for large models on a network
# filesystem costs seconds. Keyed by everything the plan depends on; the fingerprint is still
# checked on every task, so changed input files are noticed.
_LAST: list[_Prepared] = []


def _prepare(spec: WorkSpec) -> _Prepared:
    from mergesmith.api import prepare
    from mergesmith.output.layout import plan_layout

    key = (spec.recipe_text, spec.seed, spec.shard_bytes, spec.cwd, spec.stage_outputs)
    # Relative paths in the recipe name files from the driver's working directory, and model
    # sources re-open their files by those paths.
    missing_cwd = not _enter(spec.cwd)
    if _LAST and _LAST[0].key == key:
        return _LAST[0]
    while _LAST:
        for source in _LAST.pop().sources.values():
            source.close()
    try:
        stages = {name: Path(folder) for name, folder in spec.stage_outputs}
        plan, sources = prepare(spec.recipe_text, spec.seed, stages or None)
    except MergeError as exc:
        if missing_cwd:
            raise MergeError(
                f"{exc.message} (the driver's working directory {spec.cwd} does not exist on "
                "this node, so relative paths cannot be resolved)",
                SAME_FILES_HINT,
            ) from None
        raise
    prepared = _Prepared(key, plan, sources, plan_layout(plan.jobs, spec.shard_bytes))
    _LAST.append(prepared)
    return prepared


def _enter(folder: str) -> bool:
    try:
        os.chdir(folder)
    except OSError:
        return False
    return True


def _mismatch(spec: WorkSpec, sources: Mapping[str, ModelSource]) -> MergeError:
    """Name the first input file this node sees differently from the driver, if any."""
    here = {(f.ref, f.path): f for f in input_files(sources)}
    for want in spec.inputs:
        got = here.get((want.ref, want.path))
        if got is None:
            return MergeError(
                f"model '{want.ref}': this node does not read {want.path}, the driver does",
                SAME_FILES_HINT,
            )
        if (got.size, got.mtime_ns) != (want.size, want.mtime_ns):
            return MergeError(
                f"model '{want.ref}': {want.path} is {_describe(got)} on this node but "
                f"{_describe(want)} on the driver",
                SAME_FILES_HINT,
            )
    extra = sorted(set(here) - {(f.ref, f.path) for f in spec.inputs})
    if extra:
        ref, path = extra[0]
        return MergeError(
            f"model '{ref}': this node reads {path}, the driver does not", SAME_FILES_HINT
        )
    return MergeError(
        "the plan this node derives from the recipe differs from the driver's (its tokenizer "
        "files, the output layout or the recipe differ)",
        SAME_FILES_HINT,
    )


def _describe(file: InputFile) -> str:
    when = dt.datetime.fromtimestamp(file.mtime_ns / 1e9, dt.UTC).isoformat(timespec="seconds")
    return f"{file.size} bytes, modified {when}"


class ShardPatcher:
    """Writes tensors into shards the driver already created at their final size.

    Never creates or resizes a file: a shard missing here, or of another size or header, means
    this node does not see the driver's output folder, and writing would be lost or harmful."""

    def __init__(self, folder: Path, layout: OutputLayout, shards: Iterable[int]) -> None:
        self.folder = folder
        self.layout = layout
        self._fds: dict[int, int] = {}
        try:
            for number in sorted(shards):
                self._fds[number] = self._open(number)
        except BaseException:
            self.close()
            raise

    def _open(self, number: int) -> int:
        shard = self.layout.shards[number]
        path = self.folder / shard.file_name
        try:
            fd = os.open(path, os.O_RDWR)
        except FileNotFoundError:
            raise MergeError(
                f"{path}: the output shard the driver created is not there", SAME_FILES_HINT
            ) from None
        if os.fstat(fd).st_size != shard.size or os.pread(fd, len(shard.header), 0) != bytes(
            shard.header
        ):
            os.close(fd)
            raise MergeError(
                f"{path}: this node sees another file than the shard the driver created",
                SAME_FILES_HINT,
            )
        return fd

    def write(self, name: str, tensor: torch.Tensor | memoryview | bytearray) -> int:
        """Place one tensor (or its bytes); returns the CRC-32 of its bytes, as the local
        writer does."""
        place = self.layout.placements[name]
        data = tensor_bytes(tensor)
        if data.nbytes != place.length:
            raise RuntimeError(f"{name}: {data.nbytes} bytes computed, {place.length} planned")
        view, offset = data.cast("B"), place.offset
        fd = self._fds[place.shard]
        try:
            while view:
                done = os.pwrite(fd, view, offset)
                view, offset = view[done:], offset + done
        except OSError as exc:
            if exc.errno not in NO_SPACE:
                raise
            path = self.folder / self.layout.shards[place.shard].file_name
            raise MergeError(
                f"{path}: {os.strerror(exc.errno)} while writing",
                "free space on the shared filesystem, then run again with --resume",
            ) from None
        from mergesmith.native import crc32

        return crc32(data)

    def sync(self) -> None:
        """Make the bytes durable before the driver journals their checksums."""
        for fd in self._fds.values():
            os.fsync(fd)

    def close(self) -> None:
        fds, self._fds = self._fds, {}
        for fd in fds.values():
            os.close(fd)
