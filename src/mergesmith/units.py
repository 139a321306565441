"""Byte sizes as people write them: 5GB, 500MB, 1.5GiB, 1000000."""

from __future__ import annotations

import re

from mergesmith.errors import MergeError

_UNITS = {
    "": 1,
    "b": 1,
    "kb": 10**3,
    "mb": 10**6,
    "gb": 10**9,
    "tb": 10**12,
    "kib": 2**10,
    "mib": 2**20,
    "gib": 2**30,
    "tib": 2**40,
}


def parse_size(text: str | int, what: str) -> int:
    if isinstance(text, int) and not isinstance(text, bool):
        value = text
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
        unit = match.group(2).lower() if match else None
        if not match or unit not in _UNITS:
            raise MergeError(f"{what}: '{text}' is not a size", "write it like 5GB, 500MB or 2GiB")
        value = int(float(match.group(1)) * _UNITS[unit])
    if value <= 0:
        raise MergeError(f"{what}: '{text}' must be positive", "write it like 5GB or 500MB")
    return value
