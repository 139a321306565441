"""Progress of a merge: plain lines in a log, one live line on a terminal, nothing with -q, and
the same numbers for library callers. Expected byte counts come from the files themselves."""

from __future__ import annotations

import io
import itertools
import os
import pty
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from safetensors import safe_open

from mergesmith import merge
from mergesmith.progress import Progress, ProgressReporter
from tests.conftest import run_cli, write_recipe

Family = tuple[Path, list[Path]]
# Decimal units, as a user reads them.
UNITS = {"B": 1, "kB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12}
PLAIN = re.compile(
    r"^progress: (\d+)/(\d+) tensors, ([\d.]+) (\w+) read, ([\d.]+) (\w+) written, "
    r"\S+ \S+/s, (ETA|done in) \S+$"
)
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


def linear_recipe(tuned: list[Path]) -> str:
    """Each output tensor reads one tensor from each of two models, and no base."""
    return (
        f"merge_method: linear\nmodels:\n"
        f"  - model: {tuned[0]}\n    parameters: {{weight: 0.25}}\n"
        f"  - model: {tuned[1]}\n    parameters: {{weight: 0.75}}\n"
    )


def tensor_bytes(folder: Path) -> tuple[int, int]:
    """(tensor count, bytes of all tensors) in a folder's safetensors files, read back."""
    count = total = 0
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(file, "pt") as fh:
            for key in fh.keys():  # noqa: SIM118 - safe_open is not a mapping
                tensor = fh.get_tensor(key)
                count += 1
                total += tensor.numel() * tensor.element_size()
    return count, total


def size_matches(text: str, unit: str, expected: int) -> bool:
    """A size printed with two decimals in `unit` agrees with an exact byte count."""
    return abs(float(text) * UNITS[unit] - expected) <= 0.005 * UNITS[unit]


def run_on_terminal(*args: str | Path) -> tuple[int, str, str]:
    """The CLI with stderr on a pseudo-terminal, as in an interactive shell: (exit code, what
    the terminal was sent, stdout)."""
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "mergesmith", *map(str, args)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=terminal,
        text=True,
        env={**os.environ, "COLUMNS": "160", "TERM": "xterm-256color"},
    )
    os.close(terminal)
    shown = b""
    while True:
        try:
            chunk = os.read(controller, 65536)
        except OSError:  # EIO: the merge closed its end of the terminal
            break
        if not chunk:
            break
        shown += chunk
    os.close(controller)
    stdout, _ = proc.communicate(timeout=120)
    return proc.returncode, shown.decode(), stdout


@pytest.fixture(scope="module")
def cli_runs(family: Family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same merge run by the CLI into a log, with -q, and on a terminal, side by side:
    each costs a process start."""
    _, tuned = family
    root = tmp_path_factory.mktemp("progress")
    recipe = write_recipe(root, linear_recipe(tuned))
    outs = {name: root / name / "merged" for name in ("log", "quiet", "terminal")}
    with ThreadPoolExecutor(3) as pool:
        log = pool.submit(run_cli, "run", recipe, outs["log"], "--threads", "2")
        quiet = pool.submit(run_cli, "run", recipe, outs["quiet"], "-q")
        terminal = pool.submit(run_on_terminal, "run", recipe, outs["terminal"])
        return {
            "outs": outs,
            "log": log.result(),
            "quiet": quiet.result(),
            "terminal": terminal.result(),
        }


def test_log_gets_plain_progress_lines_ending_with_every_tensor_and_byte(
    family: Family, cli_runs: dict[str, Any]
) -> None:
    _, tuned = family
    result, out = cli_runs["log"], cli_runs["outs"]["log"]
    assert result.returncode == 0, result.stderr
    # Not a terminal: no carriage returns or escape codes, only whole lines.
    assert "\r" not in result.stderr and "\x1b" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.startswith("progress: ")]
    assert lines, result.stderr
    parsed = [PLAIN.match(line) for line in lines]
    assert all(parsed), lines
    counts = [int(m.group(1)) for m in parsed if m]
    assert counts == sorted(counts)
    final = parsed[-1]
    assert final is not None
    tensors, written = tensor_bytes(out)
    _, read_a = tensor_bytes(tuned[0])
    _, read_b = tensor_bytes(tuned[1])
    assert (int(final.group(1)), int(final.group(2))) == (tensors, tensors)
    assert final.group(7) == "done in"
    assert size_matches(final.group(5), final.group(6), written), lines[-1]
    assert size_matches(final.group(3), final.group(4), read_a + read_b), lines[-1]
    # The summary still goes to stdout, after the progress.
    assert result.stdout.startswith(f"merged {tensors} tensors")


def test_quiet_prints_nothing(cli_runs: dict[str, Any]) -> None:
    result = cli_runs["quiet"]
    assert result.returncode == 0, result.stderr
    assert result.stderr == "" and result.stdout == ""
    assert (cli_runs["outs"]["quiet"] / "config.json").is_file()


def test_terminal_gets_one_live_line_then_the_summary(cli_runs: dict[str, Any]) -> None:
    code, screen, stdout = cli_runs["terminal"]
    assert code == 0, screen
    tensors, _ = tensor_bytes(cli_runs["outs"]["terminal"])
    assert "\x1b[" in screen and "progress: " not in screen
    last = ANSI.sub("", screen).replace("\r\n", "\n").split("\r")[-1].strip()
    assert f"{tensors}/{tensors} tensors" in last and "/s" in last and "done in" in last, last
    assert stdout.startswith(f"merged {tensors} tensors")


def test_library_callback_counts_every_tensor_and_the_bytes_of_the_files(
    family: Family, tmp_path: Path
) -> None:
    _, tuned = family
    out = tmp_path / "merged"
    seen: list[Progress] = []
    merge(linear_recipe(tuned), out, threads=3, progress=seen.append)
    tensors, written = tensor_bytes(out)
    _, read_a = tensor_bytes(tuned[0])
    _, read_b = tensor_bytes(tuned[1])
    # Once before the first tensor, then once per tensor, one at a time.
    assert [p.tensors_done for p in seen] == list(range(tensors + 1))
    assert {p.tensors_total for p in seen} == {tensors}
    for before, after in itertools.pairwise(seen):
        assert after.bytes_written > before.bytes_written
        assert after.bytes_read > before.bytes_read
        assert after.seconds >= before.seconds
    assert (seen[0].bytes_read, seen[0].bytes_written) == (0, 0)
    assert seen[-1].bytes_written == written
    assert seen[-1].bytes_read == read_a + read_b
    assert seen[-1].eta == 0.0


def test_a_two_argument_callback_still_gets_done_and_total(family: Family, tmp_path: Path) -> None:
    _, tuned = family
    out = tmp_path / "merged"
    calls: list[tuple[int, int]] = []
    merge(
        linear_recipe(tuned),
        out,
        threads=1,
        progress=lambda done, total: calls.append((done, total)),
    )
    tensors, _ = tensor_bytes(out)
    assert calls[0] == (0, tensors) and calls[-1] == (tensors, tensors)
    assert [done for done, _ in calls] == list(range(tensors + 1))


# Half the bytes moved in 2 s: 3 GB in 2 s is 1.50 GB/s, and the other half takes 2 s more.
HALFWAY = Progress(5, 10, 2 * 10**9, 10**9, 2.0, bytes_to_read=4 * 10**9, bytes_to_write=2 * 10**9)


def test_live_line_shows_tensors_sizes_rate_and_eta() -> None:
    screen = io.StringIO()
    with ProgressReporter(screen, force_terminal=True) as reporter:
        reporter(HALFWAY)
    shown = screen.getvalue()
    assert shown.count("\n") == 1  # one line, redrawn in place, ended once
    last = ANSI.sub("", shown).split("\r")[-1].strip()
    for part in ("5/10 tensors", "2.00 GB read", "1.00 GB written", "1.50 GB/s", "ETA 0:02"):
        assert part in last, last


def test_log_lines_come_every_interval_and_once_at_the_end() -> None:
    log = io.StringIO()
    reporter = ProgressReporter(log, interval=5.0)
    assert not reporter.terminal
    for done, seconds in [(0, 0.0), (1, 1.0), (2, 4.9), (3, 5.0), (4, 6.0), (5, 10.5), (6, 11.0)]:
        reporter(Progress(done, 6, done, done, seconds))
    reporter(Progress(6, 6, 6, 6, 11.0))  # a repeated final report prints nothing more
    reporter.close()
    lines = log.getvalue().splitlines()
    assert [line.split()[1] for line in lines] == ["3/6", "5/6", "6/6"]
    assert lines[-1].endswith("done in 0:11")
