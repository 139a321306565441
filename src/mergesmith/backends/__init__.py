"""Where a plan's jobs run. `local` (the default) is the engine's thread pool on this machine;
`ray` spreads the same jobs over a Ray cluster (the optional `mergesmith[ray]` extra) and writes
the same bytes.

This module checks the options alone and never imports Ray, so the local backend, `--help` and
`validate` stay as fast as before and work where Ray is not installed.
"""

from __future__ import annotations

import importlib.util

from mergesmith.errors import MergeError
from mergesmith.units import parse_size

BACKENDS = ("local", "ray")


def check_backend_options(
    backend: str, address: str | None, task_size: str | int | None, device: str
) -> None:
    """Refuse a backend option that would be ignored or cannot work, before any planning."""
    if backend not in BACKENDS:
        raise MergeError(
            f"--backend: unknown backend '{backend}'", f"use one of {', '.join(BACKENDS)}"
        )
    if backend == "local":
        for name, value in (("--address", address), ("--task-size", task_size)):
            if value is not None:
                raise MergeError(
                    f"{name} is an option of the Ray backend", f"add --backend ray, or drop {name}"
                )
        return
    if task_size is not None:
        parse_size(task_size, "--task-size")
    if device != "cpu":
        raise MergeError(
            f"--device {device}: the Ray backend runs its tasks on CPUs",
            "drop --device, or use the local backend for a GPU merge",
        )
    if importlib.util.find_spec("ray") is None:
        raise MergeError(
            "--backend ray: Ray is not installed", "pip install 'mergesmith[ray]' on every node"
        )
