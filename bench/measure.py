"""Run one command as a child process; report wall time, CPU time and peak memory.

Two memory figures, because they answer different questions:

* ``peak_rss_bytes`` is ``ru_maxrss`` from ``wait4``: the kernel's exact high-water mark of
  resident memory for the child (and any descendants it reaped). It counts file pages the
  process has mapped, so a tool that mmaps its inputs is charged for page-cache pages that the
  kernel could drop at any time.
* ``peak_anon_bytes`` is sampled from ``/proc/PID/status`` (RssAnon, summed over the process
  tree): memory that cannot be reclaimed without swap. Sampling can miss short spikes, so it
  is a lower bound.

``io_stall_s`` is sampled too: wall time during which no thread of the process tree could run
(none running or runnable) and at least one waited on the disk (state D: a page fault on a
file page not yet read, say). Reading that overlaps computing does not count, and neither does
waiting for a CPU that other processes hold, so it shows whether a run waits on storage even
on a busy machine.

Keep the measuring process small. Python starts children with vfork+exec, and at exec Linux
folds the high-water RSS of the address space being replaced, the parent's, into the child's
``ru_maxrss``. A launcher that once held 1 GB makes ``true`` report a 1 GB peak.
``parent_maxrss_bytes`` is recorded with every run so a polluted figure can be recognised.
"""

from __future__ import annotations

import os
import resource
import signal
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path


@dataclass
class Measurement:
    argv: list[str]
    returncode: int
    wall_s: float
    user_s: float
    sys_s: float
    peak_rss_bytes: int
    peak_anon_bytes: int
    peak_tree_rss_bytes: int
    parent_maxrss_bytes: int
    # Major faults and block reads stay near zero when the inputs really were in page cache.
    major_faults: int
    in_blocks: int
    out_blocks: int
    timed_out: bool
    io_stall_s: float = 0.0

    @property
    def cpu_s(self) -> float:
        return self.user_s + self.sys_s

    @property
    def ok(self) -> bool:
        return self.returncode == 0 and not self.timed_out


def _tree(pid: int) -> list[int]:
    pids, todo = [], [pid]
    while todo:
        p = todo.pop()
        pids.append(p)
        try:
            # Children are listed per thread, and any thread may have forked.
            for tid in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{tid}/children") as f:
                    todo.extend(int(c) for c in f.read().split())
        except OSError:
            continue
    return pids


def _thread_states(pid: int) -> str:
    """One letter per thread of pid (R running or runnable, D waiting on I/O, S sleeping...)."""
    states = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{tid}/stat") as f:
                # The command name in parentheses may hold spaces; the state follows it.
                states.append(f.read().rpartition(")")[2].split()[0])
    except (OSError, IndexError):
        pass
    return "".join(states)


def _rss_kb(pid: int) -> tuple[int, int]:
    anon = total = 0
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("RssAnon:"):
                    anon = int(line.split()[1])
                elif line.startswith("VmRSS:"):
                    total = int(line.split()[1])
    except OSError:
        pass
    return anon, total


class _Sampler(threading.Thread):
    def __init__(self, pid: int, interval: float) -> None:
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.peak_anon_kb = self.peak_total_kb = 0
        self.io_stall_s = 0.0
        self.stop = threading.Event()

    def run(self) -> None:
        last = time.perf_counter()
        while not self.stop.is_set():
            anon = total = 0
            states = ""
            for p in _tree(self.pid):
                a, t = _rss_kb(p)
                anon, total = anon + a, total + t
                states += _thread_states(p)
            self.peak_anon_kb = max(self.peak_anon_kb, anon)
            self.peak_total_kb = max(self.peak_total_kb, total)
            now = time.perf_counter()
            if "D" in states and "R" not in states:
                self.io_stall_s += now - last
            last = now
            self.stop.wait(self.interval)


def run(
    argv: Sequence[str | os.PathLike[str]],
    log: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    timeout_s: float | None = None,
    sample_interval_s: float = 0.02,
) -> Measurement:
    """Run argv to completion (stdout and stderr go to ``log``) and measure it."""
    args = [os.fspath(a) for a in argv]
    out = open(log, "wb") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    try:
        start = time.perf_counter()
        # A session of its own, so a timeout can kill the whole tree and nothing else.
        proc = subprocess.Popen(
            args,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=None if env is None else dict(env),
            cwd=cwd,
            start_new_session=True,
        )
        sampler = _Sampler(proc.pid, sample_interval_s)
        sampler.start()
        timed_out = threading.Event()

        def _kill() -> None:
            timed_out.set()
            os.killpg(proc.pid, signal.SIGKILL)

        timer = threading.Timer(timeout_s, _kill) if timeout_s else None
        if timer is not None:
            timer.start()
        # wait4 rather than Popen.wait: it hands back the child's own rusage, where
        # RUSAGE_CHILDREN deltas would also pick up anything else this process reaped.
        _, status, ru = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - start
        if timer is not None:
            timer.cancel()
        sampler.stop.set()
        sampler.join()
        proc.returncode = os.waitstatus_to_exitcode(status)
    finally:
        if log is not None:
            out.close()  # type: ignore[union-attr]
    return Measurement(
        argv=args,
        returncode=proc.returncode,
        wall_s=wall,
        user_s=ru.ru_utime,
        sys_s=ru.ru_stime,
        peak_rss_bytes=ru.ru_maxrss * 1024,  # kilobytes on Linux
        peak_anon_bytes=sampler.peak_anon_kb * 1024,
        peak_tree_rss_bytes=sampler.peak_total_kb * 1024,
        parent_maxrss_bytes=resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
        major_faults=ru.ru_majflt,
        in_blocks=ru.ru_inblock,
        out_blocks=ru.ru_oublock,
        timed_out=timed_out.is_set(),
        io_stall_s=sampler.io_stall_s,
    )
