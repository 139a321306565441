"""Where every output tensor goes, decided from the plan before the first byte is computed."""

from __future__ import annotations

import json
from dataclasses import dataclass

from mergesmith.dtypes import ITEMSIZE
from mergesmith.plan import TensorJob

SINGLE_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"


@dataclass(frozen=True)
class Placement:
    shard: int
    offset: int  # absolute byte offset in the shard file
    length: int


@dataclass
class ShardLayout:
    file_name: str
    header: bytes  # 8-byte length + padded JSON header
    size: int  # total file size
    tensor_names: list[str]


@dataclass
class OutputLayout:
    shards: list[ShardLayout]
    placements: dict[str, Placement]

    def index_json(self) -> str | None:
        if len(self.shards) == 1:
            return None
        weight_map = {
            name: shard.file_name for shard in self.shards for name in sorted(shard.tensor_names)
        }
        total = sum(s.size - len(s.header) for s in self.shards)
        body = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        return json.dumps(body, indent=2) + "\n"


def plan_layout(jobs: list[TensorJob], shard_size: int) -> OutputLayout:
    """Fill shards in plan order up to `shard_size` bytes; one file if everything fits."""
    groups: list[list[TensorJob]] = [[]]
    filled = 0
    for job in jobs:
        if groups[-1] and filled + job.out_bytes > shard_size:
            groups.append([])
            filled = 0
        groups[-1].append(job)
        filled += job.out_bytes
    count = len(groups)
    shards, placements = [], {}
    for number, group in enumerate(groups):
        file_name = (
            SINGLE_FILE if count == 1 else f"model-{number + 1:05d}-of-{count:05d}.safetensors"
        )
        # Wider elements first keeps every tensor aligned to its element size for zero-copy reads.
        ordered = sorted(group, key=lambda j: (-ITEMSIZE[j.dtype], j.index))
        entries: dict[str, dict] = {"__metadata__": {"format": "pt"}}
        offset = 0
        spans = []
        for job in ordered:
            entries[job.name] = {
                "dtype": job.dtype,
                "shape": list(job.shape),
                "data_offsets": [offset, offset + job.out_bytes],
            }
            spans.append((job.name, offset, job.out_bytes))
            offset += job.out_bytes
        header = json.dumps(entries, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)
        prefix = len(header).to_bytes(8, "little") + header
        for tensor_name, start, length in spans:
            placements[tensor_name] = Placement(number, len(prefix) + start, length)
        shards.append(
            ShardLayout(file_name, prefix, len(prefix) + offset, [j.name for j in ordered])
        )
    return OutputLayout(shards, placements)
