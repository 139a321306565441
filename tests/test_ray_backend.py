"""The Ray backend (`--backend ray`): the same plan as tasks on a real Ray cluster gives the local
backend's bytes for every method, at one and two workers and however the jobs are cut into
tasks; a killed worker, a lost node and an interrupted driver (then --resume) still end in those
bytes; a job no node can hold, or a node that sees other files, fails with a clear error.

The cluster (two nodes of one CPU on this machine) is started once per run by the `ray_cluster`
fixture; these tests are skipped, saying why, where Ray is not installed."""

from __future__ import annotations

import json
import signal
import struct
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from mergesmith import merge
from mergesmith.api import prepare
from mergesmith.backends.ray_task import WorkSpec, input_files, run_task
from mergesmith.backends.tasks import (
    MAX_TASK_BYTES,
    MIN_TASK_BYTES,
    default_task_bytes,
    group_jobs,
    largest_first,
)
from mergesmith.errors import MergeError
from mergesmith.output import journal
from mergesmith.output.layout import plan_layout
from mergesmith.output.writer import TensorWriter
from tests.conftest import assert_identical, run_cli, write_recipe
from tests.ray_support import TASK_TITLE
from tests.test_fail_interrupt import (
    SLOW_TENSORS,
    della_recipe,
    interrupt,
    journaled,
    partial_of,
    slow_family,
    start_merge,
)
from tests.test_resume import resumed_count

Family = tuple[Path, list[Path]]
SEED = 5
SMALL_SHARDS = "64KB"  # the tiny models' output spans several shards and an index


def method_recipe(method: str, base: Path, tuned: list[Path]) -> str:
    """A recipe for `method` on the family: base + three fine-tunes where the method takes
    them, with per-model weights and densities that differ."""
    one = {"slerp": "t: 0.3", "nearswap": "t: 0.01", "arcee_fusion": ""}
    if method in one:
        params = f"parameters: {{{one[method]}}}\n" if one[method] else ""
        head = f"merge_method: {method}\nbase_model: {base}\n"
        return f"{head}models:\n  - model: {tuned[0]}\n{params}"
    if method == "passthrough":
        return f"merge_method: passthrough\nmodels:\n  - model: {tuned[1]}\n"
    weighted = {"linear", "nuslerp", "multislerp"}
    family = {
        "task_arithmetic": "",
        "ties": "density",
        "dare_ties": "density",
        "dare_linear": "density",
        "breadcrumbs": "density",
        "breadcrumbs_ties": "density",
        "della": "density+epsilon",
        "della_linear": "density+epsilon",
    }
    models = tuned[:2] if method == "nuslerp" else tuned
    lines = [f"merge_method: {method}"]
    if method not in ("linear", "karcher"):
        lines.append(f"base_model: {base}")
    lines.append("models:")
    for i, model in enumerate(models):
        params = []
        if method in family or method in weighted:
            params.append(f"weight: {[1.0, 0.5, 0.7][i]}")
        if "density" in family.get(method, ""):
            params.append(f"density: {[0.5, 0.7, 0.3][i]}")
        if "epsilon" in family.get(method, ""):
            params.append("epsilon: 0.1")
        lines.append(f"  - model: {model}")
        if params:
            lines.append(f"    parameters: {{{', '.join(params)}}}")
    return "\n".join(lines) + "\n"


METHODS = [
    "arcee_fusion",
    "breadcrumbs",
    "breadcrumbs_ties",
    "dare_linear",
    "dare_ties",
    "della",
    "della_linear",
    "karcher",
    "linear",
    "model_stock",
    "multislerp",
    "nearswap",
    "nuslerp",
    "passthrough",
    "ram",
    "ramplus_tl",
    "sce",
    "slerp",
    "task_arithmetic",
    "ties",
]


def test_the_test_covers_every_registered_method() -> None:
    from mergesmith.methods.registry import all_methods

    assert sorted(m.name for m in all_methods()) == METHODS


# ------------------------------------------------------------------ cutting jobs into tasks


def test_tasks_cover_every_job_once_within_one_shard_and_the_size_asked(
    family: Family, tmp_path: Path
) -> None:
    base, tuned = family
    plan, sources = prepare(method_recipe("ties", base, tuned))
    layout = plan_layout(plan.jobs, 64_000)
    assert len(layout.shards) > 1
    for task_bytes in (1, 10_000, 64_000, 10**9):
        tasks = group_jobs(layout, plan.jobs, task_bytes)
        names = [name for task in tasks for name in task.names]
        assert sorted(names) == sorted(job.name for job in plan.jobs)
        for task in tasks:
            assert {layout.placements[n].shard for n in task.names} == {task.shard}
            assert len(task.names) == 1 or task.out_bytes <= task_bytes
        assert sorted(largest_first(tasks), key=lambda t: t.first_index) == sorted(
            tasks, key=lambda t: t.first_index
        )
    assert len(group_jobs(layout, plan.jobs, 1)) == len(plan.jobs)
    # Jobs an interrupted run finished are left out.
    some = {job.name for job in plan.jobs[:3]}
    in_order = [name for shard in layout.shards for name in shard.tensor_names if name in some]
    assert [name for task in group_jobs(layout, plan.jobs[:3], 10**9) for name in task.names] == (
        in_order
    )
    for source in sources.values():
        source.close()


def test_the_default_task_size_gives_several_tasks_per_worker_within_bounds() -> None:
    assert default_task_bytes(800 << 20, 2) == 100 << 20
    assert default_task_bytes(1000, 2) == MIN_TASK_BYTES
    assert default_task_bytes(10**12, 2) == MAX_TASK_BYTES


# ------------------------------------------------------------------ options


def test_ray_options_without_the_ray_backend_and_unknown_backends_are_refused(
    family: Family, tmp_path: Path
) -> None:
    base, tuned = family
    recipe = write_recipe(tmp_path, method_recipe("linear", base, tuned))
    for options, expected in [
        ({"address": "auto"}, "--address is an option of the Ray backend"),
        ({"task_size": "1GB"}, "--task-size is an option of the Ray backend"),
        ({"backend": "spark"}, "unknown backend 'spark'"),
        ({"backend": "ray", "device": "cuda"}, "runs its tasks on CPUs"),
        ({"backend": "ray", "task_size": "lots"}, "--task-size: 'lots' is not a size"),
    ]:
        with pytest.raises(MergeError) as info:
            merge(recipe, tmp_path / "out", **options)
        assert expected in info.value.message, (options, info.value.message)
    assert not (tmp_path / "out").exists()


def test_the_local_backend_never_imports_ray(family: Family, tmp_path: Path) -> None:
    base, tuned = family
    recipe = write_recipe(tmp_path, method_recipe("ties", base, tuned))
    code = (
        "import sys; from mergesmith import merge; "
        f"merge({str(recipe)!r}, {str(tmp_path / 'out')!r}); "
        "assert 'ray' not in sys.modules, 'ray was imported'"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr


# ------------------------------------------------------------------ byte-identical


@pytest.mark.parametrize("method", METHODS)
def test_every_method_gives_the_local_bytes_at_one_and_two_workers_and_any_task_cut(
    ray_cluster, family: Family, tmp_path: Path, method: str
) -> None:
    base, tuned = family
    recipe = write_recipe(tmp_path, method_recipe(method, base, tuned))
    local = tmp_path / "local"
    merge(recipe, local, seed=SEED, threads=1, shard_size=SMALL_SHARDS)
    # One worker, one tensor per task; then both nodes, several tensors per task.
    for name, options in {
        "one worker": {"threads": 1, "task_size": 1},
        "two workers": {"task_size": "20KB"},
    }.items():
        out = tmp_path / name.replace(" ", "-")
        merge(recipe, out, seed=SEED, shard_size=SMALL_SHARDS, backend="ray", **options)
        assert_identical(out, local, f"the local backend's output ({name})")
    assert (local / "model.safetensors.index.json").is_file()


def test_a_pipeline_gives_the_local_bytes_with_every_stage_on_the_cluster(
    ray_cluster, family: Family, tmp_path: Path
) -> None:
    """Workers of a later stage find the earlier stage's output where the driver does."""
    base, tuned = family
    first = "name: first\n" + method_recipe("ties", base, tuned)
    second = method_recipe("dare_linear", base, tuned).replace(str(tuned[0]), "first")
    recipe = write_recipe(tmp_path, f"{first}---\n{second}")
    merge(recipe, tmp_path / "local", seed=SEED)
    merge(recipe, tmp_path / "ray", seed=SEED, backend="ray", task_size="20KB")
    assert_identical(tmp_path / "ray", tmp_path / "local", "the local backend's output")


# ------------------------------------------------------------------ faults


@pytest.fixture(scope="module")
def slow_merge(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """DELLA on a larger bfloat16 pair (219 tensors, a few seconds of work), and its output
    from the local backend."""
    base, tuned = slow_family(tmp_path_factory)
    root = tmp_path_factory.mktemp("ray-slow")
    recipe = write_recipe(root, della_recipe(base, tuned))
    merge(recipe, root / "local", seed=SEED)
    return {"recipe": recipe, "local": root / "local"}


def test_a_worker_killed_mid_task_is_retried_and_the_output_is_identical(
    ray_cluster, slow_merge: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    with ThreadPoolExecutor(1) as pool:
        running = pool.submit(
            merge, slow_merge["recipe"], out, seed=SEED, backend="ray", task_size="2MB"
        )
        victim = ray_cluster.wait_for_running_task()
        assert " ".join(victim.cmdline()).startswith(TASK_TITLE)  # still in the task
        victim.send_signal(signal.SIGKILL)
        done_when_killed = len(journaled(partial_of(out)))
        running.result(timeout=300)
    assert done_when_killed < SLOW_TENSORS
    assert_identical(out, slow_merge["local"], "the local backend's output")


def test_a_node_lost_mid_merge_still_ends_in_identical_output(
    ray_cluster, slow_merge: dict[str, Path], tmp_path: Path
) -> None:
    out = tmp_path / "merged"
    assert ray_cluster.cluster.worker_nodes, "the test cluster has a second node"
    node = next(iter(ray_cluster.cluster.worker_nodes))
    try:
        with ThreadPoolExecutor(1) as pool:
            running = pool.submit(
                merge, slow_merge["recipe"], out, seed=SEED, backend="ray", task_size="2MB"
            )
            ray_cluster.wait_for_running_task(node)
            ray_cluster.remove_node(node)
            done_when_lost = len(journaled(partial_of(out)))
            running.result(timeout=300)
    finally:
        if not ray_cluster.cluster.worker_nodes:
            ray_cluster.add_node()  # for the tests after this one
    assert done_when_lost < SLOW_TENSORS
    assert_identical(out, slow_merge["local"], "the local backend's output")


RAY_PENDING_TASK_BUG = "Tried to complete task that was not pending"


def test_an_interrupted_driver_then_resume_gives_identical_output(
    ray_cluster, slow_merge: dict[str, Path], tmp_path: Path
) -> None:
    ray = ("--backend", "ray", "--address", ray_cluster.address, "--seed", str(SEED))
    for attempt in range(3):
        out = tmp_path / f"merged{attempt}"
        # start_merge runs one task at a time (--threads 1), so there is time to interrupt.
        proc = start_merge(slow_merge["recipe"], out, *ray, "--task-size", "1MB")
        err = interrupt(proc, out, signal.SIGINT, after=20)
        # Ray 2.x's core worker in the driver now and then aborts on an early task's reply with
        # this check failure (with or without an interrupt pending; rare alone, more often late
        # in the whole suite, where it once hit two attempts in a row); it is Ray's bug, not
        # ours, so that one signature earns another attempt.
        if RAY_PENDING_TASK_BUG not in err:
            break
    assert proc.returncode == 130, err
    assert "interrupted by SIGINT" in err and "Traceback" not in err
    assert not out.exists() and partial_of(out).is_dir()
    done_before = {json.loads(line)["tensor"] for line in journaled(partial_of(out))}
    assert 20 <= len(done_before) < SLOW_TENSORS
    result = run_cli("run", slow_merge["recipe"], out, *ray, "--resume")
    assert result.returncode == 0, result.stderr
    assert resumed_count(result.stderr) >= len(done_before)
    assert_identical(out, slow_merge["local"], "the local backend's output")


def sparse_model(folder: Path, rows: int, cols: int) -> Path:
    """A float32 model whose one tensor takes rows x cols x 4 bytes without using the disk:
    planning reads only the header."""
    folder.mkdir(parents=True)
    header = {"w.weight": {"dtype": "F32", "shape": [rows, cols], "data_offsets": [0, 0]}}
    header["w.weight"]["data_offsets"][1] = rows * cols * 4
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(folder / "model.safetensors", "wb") as fh:
        fh.write(struct.pack("<Q", len(text)) + text)
        fh.truncate(8 + len(text) + rows * cols * 4)
    return folder


def test_a_job_larger_than_any_node_fails_before_submission_with_exit_2(
    ray_cluster, tmp_path: Path
) -> None:
    a = sparse_model(tmp_path / "a", 16384, 16384)  # 1 GiB per input, far more to merge
    b = sparse_model(tmp_path / "b", 16384, 16384)
    recipe = write_recipe(
        tmp_path,
        f"merge_method: linear\nmodels:\n  - {{model: {a}, parameters: {{weight: 1}}}}\n"
        f"  - {{model: {b}, parameters: {{weight: 1}}}}\n",
    )
    out = tmp_path / "merged"
    result = run_cli(
        "run", recipe, out, "--backend", "ray", "--address", ray_cluster.address, timeout=120
    )
    assert result.returncode == 2, result.stderr
    error = next(line for line in result.stderr.splitlines() if line.startswith("error: "))
    assert "tensor 'w.weight' needs" in error and "more than any node" in error, error
    assert "  hint: add a node with more memory" in result.stderr
    assert not out.exists()


def test_a_node_that_sees_other_files_refuses_to_write_and_says_which(
    family: Family, tmp_path: Path
) -> None:
    """The worker's side, run here as a node would: one input file changed after the driver
    planned, then the driver's shards missing."""
    base, tuned = family
    recipe = method_recipe("ties", base, tuned)
    plan, sources = prepare(recipe, SEED)
    layout = plan_layout(plan.jobs, 5 * 10**9)
    staging = tmp_path / ".merged.partial"
    staging.mkdir()
    TensorWriter(staging, layout).close()
    seen = input_files(sources)
    changed = seen[1]
    spec = WorkSpec(
        recipe_text=plan.recipe.text,
        seed=SEED,
        shard_bytes=5 * 10**9,
        cwd=str(Path.cwd()),
        staging=str(staging),
        fingerprint=journal.fingerprint(plan, layout, sources),
        inputs=(seen[0], type(changed)(**{**vars(changed), "mtime_ns": changed.mtime_ns - 10**9})),
        version=__import__("mergesmith").__version__,
        allow_nonfinite=False,
    )
    for source in sources.values():
        source.close()
    names = (plan.jobs[0].name,)
    assert run_task(WorkSpec(**{**vars(spec), "inputs": seen}), names)[0][0] == names[0]
    with pytest.raises(MergeError) as info:
        run_task(WorkSpec(**{**vars(spec), "fingerprint": "0" * 64}), names)
    assert changed.path in info.value.message and "on this node but" in info.value.message
    assert "same paths on a shared filesystem" in (info.value.hint or "")
    (staging / layout.shards[0].file_name).unlink()
    with pytest.raises(MergeError) as info:
        run_task(WorkSpec(**{**vars(spec), "inputs": seen}), names)
    assert "the output shard the driver created is not there" in info.value.message


def test_a_worker_whose_plan_differs_from_the_drivers_fails_the_merge_with_its_reason(
    ray_cluster, family: Family, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base, tuned = family
    recipe = write_recipe(tmp_path, method_recipe("ties", base, tuned))
    # The driver's fingerprint no longer matches what every worker derives.
    monkeypatch.setattr(journal, "fingerprint", lambda *args: "f" * 64)
    with pytest.raises(MergeError) as info:
        merge(recipe, tmp_path / "merged", backend="ray")
    assert "on node" in info.value.message and "differs from the driver's" in info.value.message
    assert not (tmp_path / "merged").exists()


# ------------------------------------------------------------------ the command


def test_run_with_backend_ray_and_no_address_starts_a_local_instance(
    family: Family, tmp_path: Path
) -> None:
    pytest.importorskip("ray", reason="Ray is not installed (pip install 'mergesmith[ray]')")
    base, tuned = family
    recipe = write_recipe(tmp_path, method_recipe("dare_ties", base, tuned))
    local = tmp_path / "local"
    merge(recipe, local, seed=SEED)
    result = run_cli("run", recipe, tmp_path / "ray", "--backend", "ray", "--seed", str(SEED))
    assert result.returncode == 0, result.stderr
    assert "merged 39 tensors" in result.stdout
    assert_identical(tmp_path / "ray", local, "the local backend's output")
