"""Run several `mergekit-yaml` invocations in one interpreter (run with the mergekit venv's python).

Importing mergekit costs ~6 s and a toy merge ~0.15 s, so one process per recipe would make the
suite ten times slower. This calls the very click command behind the `mergekit-yaml` script with
the same arguments, so each merge is what the CLI would produce; `--random-seed` reseeds torch's
global RNG at the start of every run, so random methods do not depend on the order of the jobs.
The conformance suite also checks this against the real executable on the seed recipe.

Usage: python mergekit_driver.py JOBS_JSON RESULTS_JSON
JOBS_JSON is a list of {"id", "config", "out", "args"}; RESULTS_JSON maps each id to
{"ok": bool, "seconds": float, "error": str | None}, rewritten after every job so that a crash
part-way still tells which recipes ran.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback

from mergekit.scripts.run_yaml import main as mergekit_yaml


def _save(results: dict[str, dict[str, object]], path: str) -> None:
    partial = path + ".partial"
    with open(partial, "w", encoding="utf-8") as handle:
        json.dump(results, handle, indent=1)
    os.replace(partial, path)


def run(jobs_path: str, results_path: str) -> None:
    with open(jobs_path, encoding="utf-8") as handle:
        jobs = json.load(handle)
    results: dict[str, dict[str, object]] = {}
    for job in jobs:
        started = time.perf_counter()
        error = None
        try:
            mergekit_yaml.main(
                args=[job["config"], job["out"], *job["args"]],
                prog_name="mergekit-yaml",
                standalone_mode=False,
            )
        except (Exception, SystemExit):  # a failing recipe must not stop the others
            error = traceback.format_exc()
        results[job["id"]] = {
            "ok": error is None,
            "seconds": time.perf_counter() - started,
            "error": error,
        }
        _save(results, results_path)


if __name__ == "__main__":
    run(sys.argv[1], sys.argv[2])
