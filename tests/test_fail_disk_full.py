"""A full disk (or a file size limit) while writing the output: exit 2 naming the file that did
not fit, no OUT folder, and --resume finishes the merge once there is room."""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from mergesmith import merge
from tests.conftest import run_cli, write_recipe

Family = tuple[Path, list[Path]]
WEIGHTS_BYTES = 185_328  # the family's merge in float32: model.safetensors
SMALLER_THAN_WEIGHTS = 128 * 1024
ROOM_FOR_WEIGHTS_ONLY = 300 * 1024
BIG_TOKENIZER_BYTES = 600 * 1024


def run_with_file_size_limit(limit: int, *args: str | Path) -> subprocess.CompletedProcess:
    """The CLI with RLIMIT_FSIZE: writes past `limit` fail with EFBIG (Python ignores the
    SIGXFSZ that comes with them)."""

    def apply() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return subprocess.run(
        [sys.executable, "-m", "mergesmith", *map(str, args)],
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=apply,
    )


@dataclass
class SmallDisk:
    """A folder on a tmpfs of `size` bytes, or, where mounting is not allowed, a folder whose
    files may not grow past `size` bytes."""

    folder: Path
    size: int
    mounted: bool

    def run(self, *args: str | Path) -> subprocess.CompletedProcess:
        if self.mounted:
            return run_cli(*args)
        return run_with_file_size_limit(self.size, *args)

    def grow(self) -> None:
        self.size = 16 * 1024 * 1024
        if self.mounted:
            subprocess.run(
                ["mount", "-o", f"remount,size={self.size}", str(self.folder)], check=True
            )

    @property
    def out(self) -> Path:
        return self.folder / "merged"

    @property
    def partial(self) -> Path:
        return self.folder / ".merged.partial"


def mount_tmpfs(folder: Path, size: int) -> bool:
    try:
        done = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)],
            capture_output=True,
        )
    except FileNotFoundError:
        return False
    return done.returncode == 0


def unmount(folder: Path) -> None:
    if subprocess.run(["umount", str(folder)], capture_output=True).returncode != 0:
        subprocess.run(["umount", "-l", str(folder)], capture_output=True)


@pytest.fixture(scope="module")
def disks(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Callable[[str, int], SmallDisk]]:
    """Makes small disks on demand; unmounts every one at the end of the module."""
    root = tmp_path_factory.mktemp("disks")
    mounted: list[Path] = []

    def make(name: str, size: int) -> SmallDisk:
        folder = root / name
        folder.mkdir()
        ok = mount_tmpfs(folder, size)
        if ok:
            mounted.append(folder)
        return SmallDisk(folder, size, ok)

    yield make
    for folder in mounted:
        unmount(folder)


def linear(*models: Path) -> str:
    body = "".join(f"  - model: {m}\n    parameters: {{weight: 1}}\n" for m in models)
    return f"merge_method: linear\nmodels:\n{body}"


def error_lines(result: subprocess.CompletedProcess) -> list[str]:
    return [line for line in result.stderr.splitlines() if line.startswith("error: ")]


def assert_no_finished_output(disk: SmallDisk) -> None:
    assert not disk.out.exists()
    assert sorted(p.name for p in disk.folder.iterdir()) in ([], [disk.partial.name])
    if disk.partial.exists():
        assert not (disk.partial / "config.json").exists()
        assert not (disk.partial / "README.md").exists()


@pytest.fixture(scope="module")
def full(disks, family: Family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The module's failing merges, run concurrently: each costs a process start."""
    base, tuned = family
    root = tmp_path_factory.mktemp("full-disk-recipes")
    big_tokenizer = shutil.copytree(base, root / "base-big-tokenizer")
    (big_tokenizer / "tokenizer.json").write_text(
        '{"padding": "' + "x" * BIG_TOKENIZER_BYTES + '"}', encoding="utf-8"
    )
    plain = write_recipe(root, linear(base, tuned[0]), "plain.yml")
    with_big_tokenizer = write_recipe(root, linear(big_tokenizer, tuned[0]), "big-tok.yml")
    cases = {
        "weights": (disks("weights", SMALLER_THAN_WEIGHTS), plain, ()),
        # Five shards of up to 40 KB: the first ones fit, a later one does not.
        "later_shard": (
            disks("later-shard", SMALLER_THAN_WEIGHTS),
            plain,
            ("--shard-size", "40KB"),
        ),
        # The weights fit, in shards under the size limit too; the copied tokenizer does not.
        "side_file": (
            disks("side-file", ROOM_FOR_WEIGHTS_ONLY),
            with_big_tokenizer,
            ("--shard-size", "40KB"),
        ),
    }
    # Fails like "weights"; a test then makes room and resumes it.
    cases["resume"] = (disks("resume", SMALLER_THAN_WEIGHTS), plain, ())
    assert WEIGHTS_BYTES < ROOM_FOR_WEIGHTS_ONLY < BIG_TOKENIZER_BYTES
    size_limited = root / "size-limited"
    size_limited.mkdir()
    with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
        futures = {
            name: pool.submit(disk.run, "run", recipe, disk.out, *extra)
            for name, (disk, recipe, extra) in cases.items()
        }
        # RLIMIT_FSIZE always gets a case of its own: EFBIG must read like a full disk.
        futures["file_size_limit"] = pool.submit(
            run_with_file_size_limit,
            SMALLER_THAN_WEIGHTS,
            "run",
            plain,
            size_limited / "merged",
        )
        results = {name: future.result() for name, future in futures.items()}
    limited = SmallDisk(size_limited, SMALLER_THAN_WEIGHTS, mounted=False)
    return {
        "results": results,
        "disks": {name: disk for name, (disk, _, _) in cases.items()}
        | {"file_size_limit": limited},
        "plain": plain,
    }


@pytest.mark.parametrize("case", ["weights", "file_size_limit"])
def test_output_that_cannot_fit_fails_at_once_naming_the_shard(full, case: str) -> None:
    result = full["results"][case]
    disk = full["disks"][case]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (error,) = error_lines(result)
    assert str(disk.partial / "model.safetensors") in error, error
    assert "  hint: free disk space" in result.stderr
    assert_no_finished_output(disk)


def test_a_later_shard_that_does_not_fit_is_the_one_named(full) -> None:
    result = full["results"]["later_shard"]
    disk = full["disks"]["later_shard"]
    if not disk.mounted:
        pytest.skip("needs a real small disk: under a file size limit every shard fits")
    assert result.returncode == 2, result.stderr
    (error,) = error_lines(result)
    fitted = [p.name for p in sorted(disk.partial.glob("model-*.safetensors"))]
    assert fitted and f"model-{len(fitted):05d}-of-00005.safetensors" in error, (fitted, error)
    assert_no_finished_output(disk)


def test_a_side_file_that_does_not_fit_is_named(full) -> None:
    result = full["results"]["side_file"]
    disk = full["disks"]["side_file"]
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    (error,) = error_lines(result)
    assert str(disk.partial / "tokenizer.json") in error, error
    assert_no_finished_output(disk)


def test_resume_after_freeing_space_finishes_an_identical_merge(full, tmp_path: Path) -> None:
    disk = full["disks"]["resume"]
    assert full["results"]["resume"].returncode == 2, full["results"]["resume"].stderr
    disk.grow()
    done = disk.run("run", full["plain"], disk.out, "--resume")
    assert done.returncode == 0, done.stderr
    assert "resuming: 0 of 39 tensors" in done.stderr
    merge(full["plain"], tmp_path / "expected")
    expected = sorted(p.name for p in (tmp_path / "expected").iterdir())
    assert sorted(p.name for p in disk.out.iterdir()) == expected
    for name in expected:
        assert (disk.out / name).read_bytes() == (tmp_path / "expected" / name).read_bytes(), name
    assert not disk.partial.exists()
