"""How far a merge has got: counted from finished jobs, shown on a terminal or in a log.

`ProgressCounter` turns the engine's "this job is done" into a `Progress` snapshot for a
callback; `ProgressReporter` is the callback the CLI uses. On a terminal it keeps one live line
(rich, imported only then, so `mergesmith --help` stays instant); anywhere else (a log file, CI)
a live line would be a mess of carriage returns, so it writes a plain line every few seconds
and one at the end. Neither starts threads of its own beyond rich's refresh: the engine calls
`on_done` one job at a time, and that drives everything here.
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import IO, TYPE_CHECKING, Any

from mergesmith.dtypes import ITEMSIZE

if TYPE_CHECKING:
    from rich.live import Live

    from mergesmith.plan import TensorJob
    from mergesmith.sources.base import ModelSource


@dataclass(frozen=True)
class Progress:
    """Where a merge stands; passed to `merge(..., progress=callback)` after each tensor.

    Counts of tensors include those a `--resume` reused; bytes and seconds cover only this run's
    work, so that rates and the ETA describe what is left to do. Bytes read are the input
    tensors' sizes as their files store them, bytes written the output tensors' sizes.
    """

    tensors_done: int
    tensors_total: int
    bytes_read: int
    bytes_written: int
    seconds: float  # since this run's first job started
    bytes_to_read: int = 0  # this run's totals (0: unknown)
    bytes_to_write: int = 0

    @property
    def finished(self) -> bool:
        return self.tensors_done >= self.tensors_total

    @property
    def rate(self) -> float | None:
        """Bytes read and written per second, or None before anything is done."""
        moved = self.bytes_read + self.bytes_written
        return moved / self.seconds if moved and self.seconds > 0 else None

    @property
    def fraction(self) -> float:
        """Share of the work done: by bytes, since one embedding can outweigh fifty norms."""
        total = self.bytes_to_read + self.bytes_to_write
        if total > 0:
            return min(1.0, (self.bytes_read + self.bytes_written) / total)
        return self.tensors_done / self.tensors_total if self.tensors_total else 1.0

    @property
    def eta(self) -> float | None:
        """Seconds left at the rate so far, or None while there is nothing to go by."""
        if self.finished:
            return 0.0
        done = self.fraction
        if done <= 0 or self.seconds <= 0:
            return None
        return self.seconds * (1 - done) / done


ProgressCallback = Callable[[Progress], None]


def job_read_bytes(job: TensorJob, sources: Mapping[str, ModelSource]) -> int:
    """Bytes of input one job reads: every input's full stored tensor (the copy of an integer
    buffer reads its first input only)."""
    inputs = (job.inputs[0],) if job.copy_only else (job.base, *job.inputs)
    total = 0
    for inp in inputs:
        if inp is not None:
            meta = sources[inp.model].tensors[inp.name]
            total += meta.numel * ITEMSIZE[meta.dtype]
    return total


def as_progress_callback(callback: Callable[..., Any]) -> ProgressCallback:
    """Callbacks written for the old `(done, total)` form keep working: a callable that takes
    two positional arguments but not one gets the two counts."""
    try:
        signature = inspect.signature(callback)
    except (TypeError, ValueError):
        return callback  # a builtin without a signature: assume the current form
    try:
        signature.bind(None)
        return callback
    except TypeError:
        pass
    try:
        signature.bind(0, 0)
    except TypeError:
        return callback  # fits neither form; let the call itself say so

    def legacy(progress: Progress) -> None:
        callback(progress.tensors_done, progress.tensors_total)

    return legacy


class ProgressCounter:
    """Counts finished jobs and bytes for one run of the engine and reports each step.

    The engine calls `job_done` one job at a time, so plain counters suffice here."""

    def __init__(
        self,
        tensors_total: int,
        todo: Iterable[TensorJob],
        sources: Mapping[str, ModelSource],
        callback: Callable[..., Any] | None,
    ) -> None:
        self.callback = None if callback is None else as_progress_callback(callback)
        todo = list(todo)
        self.tensors_total = tensors_total
        self.tensors_done = tensors_total - len(todo)
        # Reads are counted from headers up front: a job's inputs are released when it ends.
        self._reads = {job.index: job_read_bytes(job, sources) for job in todo}
        self.bytes_to_read = sum(self._reads.values())
        self.bytes_to_write = sum(job.out_bytes for job in todo)
        self.bytes_read = 0
        self.bytes_written = 0
        self._started = time.perf_counter()

    def start(self) -> None:
        """Report the state before the first job (a reporter can show its line at once)."""
        self._started = time.perf_counter()
        self._report()

    def job_done(self, job: TensorJob) -> None:
        """The engine's `on_done`: count one finished job and report."""
        self.tensors_done += 1
        self.bytes_read += self._reads.get(job.index, 0)
        self.bytes_written += job.out_bytes
        self._report()

    def snapshot(self) -> Progress:
        """The counts now, as an immutable value that callbacks may keep."""
        return Progress(
            tensors_done=self.tensors_done,
            tensors_total=self.tensors_total,
            bytes_read=self.bytes_read,
            bytes_written=self.bytes_written,
            seconds=time.perf_counter() - self._started,
            bytes_to_read=self.bytes_to_read,
            bytes_to_write=self.bytes_to_write,
        )

    def _report(self) -> None:
        if self.callback is not None:
            self.callback(self.snapshot())


def format_size(count: float) -> str:
    """Decimal units, as disks and model cards count them."""
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if count >= scale:
            return f"{count / scale:.2f} {unit}"
    return f"{count:.0f} B"


def format_clock(seconds: float) -> str:
    """`m:ss`, or `h:mm:ss` for long merges: an ETA is read at a glance, not computed."""
    whole = round(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def describe(progress: Progress) -> str:
    """One line: `45/219 tensors, 1.20 GB read, 0.40 GB written, 0.81 GB/s, ETA 0:03`."""
    rate = progress.rate
    parts = [
        f"{progress.tensors_done}/{progress.tensors_total} tensors",
        f"{format_size(progress.bytes_read)} read",
        f"{format_size(progress.bytes_written)} written",
        f"{format_size(rate)}/s" if rate is not None else "-- /s",
    ]
    if progress.finished:
        parts.append(f"done in {format_clock(progress.seconds)}")
    else:
        eta = progress.eta
        parts.append(f"ETA {format_clock(eta)}" if eta is not None else "ETA --")
    return ", ".join(parts)


class ProgressReporter:
    """A progress callback that shows the merge on `stream` (stderr for the CLI).

    On a terminal: one live line, redrawn a few times a second. Elsewhere: `progress: ...`
    lines at most every `interval` seconds, and one when the last tensor is done. Use it as a
    context manager (or call `close`) so the live line is gone before anything else is printed.
    """

    def __init__(
        self,
        stream: IO[str],
        *,
        interval: float = 5.0,
        force_terminal: bool | None = None,
    ) -> None:
        self.stream = stream
        self.interval = interval
        is_tty = getattr(stream, "isatty", None)
        self.terminal = force_terminal if force_terminal is not None else bool(is_tty and is_tty())
        self.latest: Progress | None = None
        self._live: Live | None = None
        self._closed = False
        self._last_printed: float | None = None

    def __call__(self, progress: Progress) -> None:
        self.latest = progress
        if self._closed:
            return
        if self.terminal:
            if self._live is None:
                self._live = self._start_live()
        else:
            self._maybe_print(progress)

    def close(self) -> None:
        """Stop the live line, leaving its last state on screen; idempotent."""
        self._closed = True
        live, self._live = self._live, None
        if live is not None:
            live.stop()

    def __enter__(self) -> ProgressReporter:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _maybe_print(self, progress: Progress) -> None:
        if progress.finished:
            if self._last_printed == float("inf"):
                return
            self._last_printed = float("inf")  # the final line is written once
        elif progress.seconds - (self._last_printed or 0.0) < self.interval:
            return
        else:
            self._last_printed = progress.seconds
        try:
            self.stream.write(f"progress: {describe(progress)}\n")
            self.stream.flush()
        except (OSError, ValueError):
            pass  # a closed or broken log stream must not fail the merge

    def _start_live(self) -> Live:
        from rich.console import Console
        from rich.live import Live

        console = Console(file=self.stream, force_terminal=True)
        # stderr writes made while the line is up (click, warnings) are printed above it;
        # stdout is left alone: it may be a pipe that must get only the summary.
        live = Live(
            _LiveLine(self),
            console=console,
            refresh_per_second=4,
            redirect_stdout=False,
            redirect_stderr=True,
        )
        live.start()
        return live


class _LiveLine:
    """Rendered by rich on each refresh, from the reporter's latest snapshot: the numbers, and
    a bar in front of them where the terminal is wide enough (never a second line)."""

    def __init__(self, reporter: ProgressReporter) -> None:
        self.reporter = reporter

    def __rich_console__(self, console: Any, options: Any) -> Any:
        from rich.progress_bar import ProgressBar
        from rich.table import Table
        from rich.text import Text

        progress = self.reporter.latest
        if progress is None:
            return
        text = Text(describe(progress), no_wrap=True, overflow="ellipsis")
        room = options.max_width - len(text) - 1
        if room < 10:
            yield text
            return
        width = min(30, room)
        grid = Table.grid(padding=(0, 1))
        grid.add_column(width=width, no_wrap=True)
        grid.add_column(no_wrap=True, overflow="ellipsis")
        bar = ProgressBar(
            total=1.0,
            completed=progress.fraction,
            width=width,
            complete_style="cyan",
            finished_style="green",
        )
        grid.add_row(bar, text)
        yield grid
