"""The kernel route (merges the C kernels compute whole, run without torch) against the
engine's torch-based path, and the command's deferred import of torch."""

from __future__ import annotations

import math
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergesmith import native
from mergesmith.api import prepare
from mergesmith.engine import EngineOptions, run_jobs
from mergesmith.errors import MergeError
from mergesmith.kernel_route import route_for
from mergesmith.ops.float32_sum import float32_sum
from mergesmith.output.writer import tensor_bytes
from mergesmith.toymodels import ToyShape, make_family
from tests.conftest import write_recipe

pytestmark = pytest.mark.skipif(not native.available(), reason="the C kernels are not built")

# Rows: the recipe's method, its models' parameters, its global ones, and whether the kernel
# route takes it.
RECIPES = {
    "dare_ties": ("dare_ties", "density: 0.5\n      weight: 0.7", "normalize: true", True),
    "dare_ties_no_rescale": (
        "dare_ties",
        "density: 0.4\n      weight: 1.0",
        "rescale: false\n  lambda: 0.8",
        True,
    ),
    "dare_linear": ("dare_linear", "density: 0.3\n      weight: 0.5", "lambda: 1.1", True),
    "della": (
        "della",
        "density: 0.5\n      weight: 0.6\n      epsilon: 0.1",
        "normalize: false",
        True,
    ),
    "della_linear": (
        "della_linear",
        "density: 0.6\n      weight: 0.8\n      epsilon: 0.2",
        "int8_mask: true",
        True,
    ),
    "task_arithmetic": ("task_arithmetic", "weight: 0.9", "lambda: 0.8", True),
    # The plain sum's divisor: the weights' float32 sum in torch's order (ops.float32_sum).
    "task_arithmetic_normalized": ("task_arithmetic", "weight: 0.9", "normalize: true", True),
    "dare_linear_normalized": (
        "dare_linear",
        "density: 0.7\n      weight: 0.3",
        "normalize: true",
        True,
    ),
    "linear": ("linear", "weight: 0.35", "normalize: true", True),
    "linear_sum": ("linear", "weight: 0.2", "normalize: false", True),
    # Magnitude ranks, and DELLA's masks without the measuring pass, come from torch.
    "ties": ("ties", "density: 0.5\n      weight: 0.5", "normalize: true", False),
    "della_no_rescale": ("della", "density: 0.5\n      weight: 0.6", "rescale: false", False),
    # Methods outside the family and linear.
    "model_stock": ("model_stock", "weight: 1.0", "filter_wise: false", False),
}


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, list[Path]]:
    """bfloat16 models whose embedding is 6 blocks of 2^20 entries, so that masks, factors and
    block offsets all take part."""
    shape = ToyShape(hidden=256, layers=2, intermediate=512, vocab=6 * 4096)
    return make_family(tmp_path_factory.mktemp("route"), 3, shape, dtype=torch.bfloat16)


def _recipe(folder: Path, models: tuple[Path, list[Path]], case: str) -> Path:
    method, params, settings, _ = RECIPES[case]
    base, finetunes = models
    listed = "".join(f"  - model: {m}\n    parameters:\n      {params}\n" for m in finetunes)
    # linear has no base: the base model is one more input there.
    head = f"base_model: {base}\n" if method != "linear" else ""
    if method == "linear":
        listed = f"  - model: {base}\n    parameters:\n      weight: 0.1\n" + listed
    text = (
        f"merge_method: {method}\n{head}models:\n{listed}"
        f"parameters:\n  {settings}\ndtype: bfloat16\n"
    )
    return write_recipe(folder, text, f"{case}.yml")


def _merged(recipe: Path, kernel_route: bool, seed: int = 7) -> dict[str, bytes]:
    plan, sources = prepare(recipe, seed)
    results: dict[str, bytes] = {}

    def keep(job, tensor) -> None:
        results[job.name] = bytes(tensor_bytes(tensor))

    try:
        run_jobs(plan, sources, keep, EngineOptions(threads=2, kernel_route=kernel_route))
    finally:
        for source in sources.values():
            source.close()
    return results


@pytest.mark.parametrize("case", sorted(RECIPES))
def test_the_kernel_route_takes_what_the_kernels_compute_whole(case, models, tmp_path):
    plan, sources = prepare(_recipe(tmp_path, models, case))
    assert (route_for(plan, sources, plan.jobs, "cpu") is not None) is RECIPES[case][3]


@pytest.mark.parametrize("case", sorted(c for c, row in RECIPES.items() if row[3]))
def test_the_kernel_route_gives_the_torch_paths_bytes(case, models, tmp_path):
    recipe = _recipe(tmp_path, models, case)
    direct = _merged(recipe, kernel_route=True)
    assert direct == _merged(recipe, kernel_route=False)
    # The merge did something: not the base again.
    base = load_file(str(models[0] / "model.safetensors"))
    name = "model.embed_tokens.weight"
    assert direct[name] != bytes(tensor_bytes(base[name]))


def test_the_command_never_imports_torch_for_a_kernel_route_merge(models, tmp_path):
    """The deferred import as the command sets it up: a DARE-TIES merge leaves torch unloaded
    and gives the bytes of an in-process merge that has it, with 3 fine-tunes and with 9 (more
    weights than ops.float32_sum adds without torch, which only a plain sum needs); TIES needs
    torch, which is then loaded on first use, submodules and all."""
    script = (
        "import sys\n"
        "from mergesmith import deferred_torch\n"
        "deferred_torch.defer()\n"
        "from mergesmith.api import merge\n"
        "merge(sys.argv[1], sys.argv[2])\n"
        "print(deferred_torch.loaded())\n"
    )
    nine = make_family(tmp_path / "nine", 9, ToyShape(), dtype=torch.bfloat16)
    for case, family, loads in (
        ("dare_ties", models, "False"),
        ("dare_ties", nine, "False"),
        ("ties", models, "True"),
    ):
        out = tmp_path / f"out-{case}-{len(family[1])}"
        recipe = _recipe(tmp_path, family, case)
        done = subprocess.run(
            [sys.executable, "-c", script, str(recipe), str(out)],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert done.returncode == 0, done.stderr
        assert done.stdout.strip() == loads
        merged = load_file(str(out / "model.safetensors"))
        expected = _merged(recipe, kernel_route=False, seed=0)
        assert {k: bytes(tensor_bytes(v)) for k, v in merged.items()} == expected


def test_an_input_holding_nan_is_named_on_the_kernel_route(models, tmp_path):
    base, finetunes = models
    broken = tmp_path / "broken"
    broken.mkdir()
    for item in finetunes[1].iterdir():
        (broken / item.name).write_bytes(item.read_bytes())
    tensors = load_file(str(broken / "model.safetensors"))
    name = "model.layers.1.mlp.up_proj.weight"
    tensors[name][3, 5] = float("nan")
    save_file(tensors, str(broken / "model.safetensors"), metadata={"format": "pt"})
    recipe = _recipe(tmp_path, (base, [finetunes[0], broken]), "dare_ties")
    plan, sources = prepare(recipe)
    assert route_for(plan, sources, plan.jobs, "cpu") is not None
    messages = []
    for kernel_route in (True, False):
        with pytest.raises(MergeError) as caught:
            _merged(recipe, kernel_route)
        messages.append(caught.value.message)
    assert messages[0] == messages[1]
    assert f"model '{broken}': tensor '{name}' holds NaN" in messages[0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_count_nonfinite_agrees_with_torch(dtype):
    info = torch.finfo(dtype)
    values = torch.tensor(
        [0.0, -0.0, 1.0, -2.5, info.max, -info.max, info.tiny, info.tiny / 4, info.eps],
        dtype=dtype,
    )
    specials = torch.tensor([float("nan"), float("inf"), -float("inf")], dtype=dtype)
    generator = torch.Generator().manual_seed(3)
    mixed = torch.randn(5000, generator=generator).to(dtype)
    where = torch.randperm(5000, generator=generator)[:37]
    mixed[where] = specials[torch.arange(37) % 3]
    for tensor in (values, specials, mixed, torch.cat([values, mixed, specials])):
        lib = native.loaded()
        found = lib.ms_count_nonfinite(
            tensor.data_ptr(), native.dtype_code(tensor.dtype), tensor.numel()
        )
        assert found == int((~torch.isfinite(tensor)).sum())


def test_the_route_copies_integer_buffers(tmp_path):
    """A copied buffer (int64) goes through the route unchanged."""
    base, finetunes = make_family(tmp_path / "m", 2, ToyShape(), dtype=torch.bfloat16)
    for folder in (base, *finetunes):
        tensors = load_file(str(folder / "model.safetensors"))
        tensors["model.rotary.positions"] = torch.arange(40, dtype=torch.int64) * 3
        save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    recipe = _recipe(tmp_path, (base, finetunes), "dare_linear")
    plan, sources = prepare(recipe)
    assert any(job.copy_only for job in plan.jobs)
    assert route_for(plan, sources, plan.jobs, "cpu") is not None
    direct = _merged(recipe, kernel_route=True)
    assert direct == _merged(recipe, kernel_route=False)
    assert direct["model.rotary.positions"] == bytes(tensor_bytes(torch.arange(40) * 3))


@pytest.mark.parametrize("out_dtype", ["float32", "float16", "bfloat16"])
def test_the_kernel_route_converts_as_the_torch_path_does(out_dtype, family, tmp_path):
    """float32 inputs (the shared family) merged into each dtype the kernels write."""
    base, finetunes = family
    listed = "".join(
        f"  - model: {m}\n    parameters:\n      density: 0.6\n      weight: 0.4\n"
        for m in finetunes
    )
    recipe = write_recipe(
        tmp_path,
        f"merge_method: dare_ties\nbase_model: {base}\nmodels:\n{listed}dtype: {out_dtype}\n",
    )
    plan, sources = prepare(recipe)
    assert route_for(plan, sources, plan.jobs, "cpu") is not None
    assert _merged(recipe, kernel_route=True) == _merged(recipe, kernel_route=False)


def test_float32_sum_adds_in_torchs_order():
    """Against torch itself: values of every scale, signed zeros, infinities and NaN, from 0 to
    12 of them (8 and more are torch's own sum)."""
    rng = random.Random(5)
    specials = [0.0, -0.0, 1e-45, -1e-45, 3.4e38, -3.4e38, 3.4028235e38, math.inf, -math.inf]
    scales = [1, 1e-8, 1e8, 3.3, 1e-3, 7e5, 1e30, 1e-38]
    for _ in range(20000):
        values = [
            rng.choice(specials) if rng.random() < 0.1 else rng.choice(scales) * rng.uniform(-1, 1)
            for _ in range(rng.randint(0, 12))
        ]
        if rng.random() < 0.01:
            values.append(math.nan)
        expected = float(torch.tensor(values, dtype=torch.float32).sum())
        got = float32_sum(values)
        if math.isnan(expected):
            assert math.isnan(got), values
        else:
            assert (got, math.copysign(1, got)) == (expected, math.copysign(1, expected)), values
