"""Staging beside the output folder, checking what was written, and the final rename.

Until the rename, nothing at the output path looks like a model: a crash, a full disk or Ctrl-C
leaves only a hidden `.NAME.partial` folder that `--resume` can pick up.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

from mergesmith.errors import MergeError
from mergesmith.output.layout import OutputLayout
from mergesmith.sources.safetensors_file import read_header


def staging_folder(out: Path) -> Path:
    return out.parent / f".{out.name}.partial"


def check_output_target(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise MergeError(f"output '{out}' is a file", "choose a folder path for the output")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise MergeError(
            f"output folder '{out}' exists and is not empty",
            "choose a new folder, or pass --overwrite to replace it",
        )


def verify(folder: Path, layout: OutputLayout) -> None:
    """Re-read every written header and check each file's size against the plan."""
    for shard in layout.shards:
        path = folder / shard.file_name
        if path.stat().st_size != shard.size:
            raise MergeError(
                f"{path}: written size differs from the plan", "run again with --resume"
            )
        header, _ = read_header(path)
        if sorted(header) != sorted(shard.tensor_names):
            raise MergeError(
                f"{path}: header does not list the planned tensors", "run again with --resume"
            )


def strip_to_resumable(staging: Path, layout: OutputLayout, journal_name: str) -> None:
    """After a failure keep only what --resume uses (shards and journal): no config.json or
    model card, so even the hidden folder cannot pass for a model."""
    keep = {shard.file_name for shard in layout.shards} | {journal_name}
    if staging.is_dir():
        for path in staging.iterdir():
            if path.name not in keep and path.is_file():
                path.unlink(missing_ok=True)


def publish(staging: Path, out: Path, overwrite: bool) -> None:
    """Move the finished staging folder to `out`, replacing an old one only if allowed."""
    _fsync_tree(staging)
    if out.exists():
        if any(out.iterdir()) and not overwrite:
            raise MergeError(f"output folder '{out}' appeared while merging", "choose another")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(out)
    _fsync_dir(out.parent)


def _fsync_tree(folder: Path) -> None:
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    _fsync_dir(folder)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
