"""The progress journal of a merge in progress, so an interrupted merge can resume.

Each finished tensor appends a line with a checksum of its bytes. On resume, a journaled tensor
is reused only if its bytes in the shard still match; anything else is computed again. The first
line fingerprints the plan and the input files, so a resume never mixes two different merges.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mergesmith.errors import MergeError
from mergesmith.output.layout import OutputLayout
from mergesmith.plan import Plan
from mergesmith.sources.base import ModelSource

JOURNAL_FILE = ".mergesmith-progress"


def fingerprint(plan: Plan, layout: OutputLayout, sources: dict[str, ModelSource]) -> str:
    """Identifies the work: recipe, seed, output layout, the output vocabulary and the exact
    input files."""
    digest = hashlib.sha256()
    digest.update(plan.recipe.text.encode())
    digest.update(str(plan.seed).encode())
    for shard in layout.shards:
        digest.update(shard.file_name.encode() + shard.header)
    if plan.vocab is not None:
        # Tokenizer files decide which rows each model's embeddings take.
        for token, token_id in sorted(plan.vocab.tokens.items(), key=lambda item: item[1]):
            digest.update(f"{token_id}\0{token}\0".encode())
        for ref in sorted(plan.vocab.row_of):
            digest.update(ref.encode() + repr(plan.vocab.row_of[ref]).encode())
    add_input_files(digest, sources, sorted(sources))
    return digest.hexdigest()


def add_input_files(digest: Any, sources: Mapping[str, ModelSource], refs: list[str]) -> None:
    """Each file the models `refs` are read from (adapters included), by path, size and time:
    a file replaced since the work began changes the digest."""
    for ref in refs:
        for file in sources[ref].files:
            stat = file.stat()
            digest.update(f"{ref}\0{file}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())


def checksum(data: memoryview | bytes) -> int:
    """zlib's CRC-32 of `data`, as the writer journals it (the kernels' where they are faster)."""
    from mergesmith.native import crc32

    return crc32(data)


class Journal:
    def __init__(self, folder: Path, print_: str) -> None:
        self.path = folder / JOURNAL_FILE
        self.fingerprint = print_
        self._lock = threading.Lock()
        self._fh = None

    def start(self) -> None:
        self._fh = open(self.path, "w", encoding="utf-8")  # noqa: SIM115 - held open for appends
        self._fh.write(json.dumps({"fingerprint": self.fingerprint}) + "\n")
        self._fh.flush()

    def reopen(self) -> None:
        # A kill can cut the last line short; drop that fragment so new lines start clean.
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            with open(self.path, "r+b") as fh:
                fh.truncate(data.rfind(b"\n") + 1)
        self._fh = open(self.path, "a", encoding="utf-8")  # noqa: SIM115

    def record(self, name: str, crc: int) -> None:
        with self._lock:
            assert self._fh is not None
            self._fh.write(json.dumps({"tensor": name, "crc32": crc}) + "\n")
            self._fh.flush()

    def close(self) -> None:
        if self._fh is not None:
            self._fh.close()
            self._fh = None

    def remove(self) -> None:
        self.close()
        self.path.unlink(missing_ok=True)


def recorded(folder: Path) -> set[str]:
    """Names of the tensors the journal says were written."""
    names = set()
    for line in (folder / JOURNAL_FILE).read_text(encoding="utf-8").splitlines()[1:]:
        try:
            names.add(json.loads(line)["tensor"])
        except (ValueError, KeyError, TypeError):
            continue
    return names


def reusable_tensors(folder: Path, print_: str, layout: OutputLayout) -> set[str]:
    """Names of tensors a previous attempt finished whose bytes are still intact."""
    path = folder / JOURNAL_FILE
    if not path.is_file():
        raise MergeError(
            f"--resume: {folder} holds no progress journal",
            "run again without --resume to start over",
        )
    lines = path.read_text(encoding="utf-8").splitlines()
    try:
        header = json.loads(lines[0]) if lines else {}
    except ValueError:
        header = {}
    if header.get("fingerprint") != print_:
        raise MergeError(
            f"--resume: the partial merge in {folder} was made from a different recipe, seed, "
            "shard size or input files",
            "run again without --resume to start over",
        )
    recorded: dict[str, int] = {}
    for line in lines[1:]:
        try:
            entry = json.loads(line)
            recorded[entry["tensor"]] = int(entry["crc32"])
        except (ValueError, KeyError, TypeError):
            continue  # a line cut short by the interruption
    intact = set()
    fds: dict[int, int] = {}
    try:
        for name, crc in recorded.items():
            place = layout.placements.get(name)
            if place is None:
                continue
            if place.shard not in fds:
                file = folder / layout.shards[place.shard].file_name
                if not file.is_file() or file.stat().st_size != layout.shards[place.shard].size:
                    continue
                fds[place.shard] = os.open(file, os.O_RDONLY)
            data = os.pread(fds[place.shard], place.length, place.offset)
            if len(data) == place.length and checksum(data) == crc:
                intact.add(name)
    finally:
        for fd in fds.values():
            os.close(fd)
    return intact
