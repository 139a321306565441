"""Recipe, model and output-folder problems are found before any weight is read.

`validate` and the first step of `run` report every problem of a pass at once: exit 2, one
`error:` line per problem followed by a `  hint:` line, no traceback, and nothing written.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch

from mergesmith.api import check_output, prepare
from mergesmith.config import parse_recipe
from mergesmith.errors import MergeError, MergeErrors
from mergesmith.toymodels import ToyShape, base_tensors, llama_config, save_model
from tests.conftest import run_cli, write_recipe

Family = tuple[Path, list[Path]]
Problem = tuple[str, str | None]


def reported(stderr: str) -> list[Problem]:
    """Each `error:` line with the `  hint:` line under it (None if there is none)."""
    lines = stderr.splitlines()
    problems = []
    for i, line in enumerate(lines):
        if not line.startswith("error: ") or re.fullmatch(r"error: \d+ problems found:", line):
            continue
        following = lines[i + 1] if i + 1 < len(lines) else ""
        hint = following.removeprefix("  hint: ") if following.startswith("  hint: ") else None
        problems.append((line.removeprefix("error: "), hint))
    return problems


def assert_rejected(result: subprocess.CompletedProcess, count: int) -> list[Problem]:
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    problems = reported(result.stderr)
    assert len(problems) == count, result.stderr
    return problems


def find(problems: list[Problem], *parts: str) -> Problem:
    """The one problem whose message holds every part."""
    hits = [p for p in problems if all(part in p[0] for part in parts)]
    assert len(hits) == 1, (parts, problems)
    return hits[0]


def assert_nothing_written(out: Path) -> None:
    assert not out.exists()
    assert not (out.parent / f".{out.name}.partial").exists()


def variant(folder: Path, edit: Callable[[dict[str, torch.Tensor]], object]) -> Path:
    """A model of the family's architecture with one deliberate difference in its headers."""
    shape = ToyShape()
    tensors = base_tensors(shape, 1)
    edit(tensors)
    return save_model(folder, tensors, llama_config(shape, torch.float32))


@pytest.fixture(scope="module")
def cli(family: Family, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Every CLI case of this module, run concurrently: each costs a process start."""
    base, tuned = family
    root = tmp_path_factory.mktemp("validation")
    lacking = variant(root / "lacking", lambda t: t.pop("model.layers.3.mlp.gate_proj.weight"))

    def widen(tensors: dict[str, torch.Tensor]) -> None:
        tensors["model.layers.1.self_attn.o_proj.weight"] = torch.zeros(32, 48)

    wide = variant(root / "wide", widen)
    ok = write_recipe(
        root,
        f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n"
        f"  - model: {tuned[0]}\n    parameters: {{weight: 1}}\n",
        "ok.yml",
    )
    # A copy, since a wrong answer to the --overwrite case would delete the input.
    victim = shutil.copytree(base, root / "victim")
    victim_recipe = write_recipe(
        root,
        f"merge_method: linear\nmodels:\n  - model: {victim}\n    parameters: {{weight: 1}}\n",
        "victim.yml",
    )
    not_empty = root / "not-empty"
    not_empty.mkdir()
    (not_empty / "notes.txt").write_text("keep me")
    recipes = {
        "schema": f"""merge_method: ties
base_model: {base}
modles:
  - model: {tuned[0]}
models:
  - model: {tuned[0]}
    parametrs: {{weight: 1}}
  - model: 42
dtype: float17
""",
        # Line 4 is indented one space short of its list item.
        "yaml": "merge_method: ties\nmodels:\n  - model: a\n   parameters: {weight: 1}\n",
        "method": f"merge_method: dare_tie\nbase_model: {base}\nmodels:\n  - model: {tuned[0]}\n",
        "parameters": f"""merge_method: della
base_model: {base}
models:
  - model: {tuned[0]}
    parameters: {{density: 0.5}}
  - model: {tuned[1]}
    parameters: {{weight: 1, density: 1.5}}
  - model: {tuned[2]}
    parameters: {{weight: 1, density: 0.9, epsilon: 0.2}}
""",
        "models": f"""merge_method: ties
base_model: {base}
models:
  - model: {root / "no-such-model"}
    parameters: {{weight: 1}}
  - model: acme/not-a-model
    parameters: {{weight: 1}}
  - model: {base / "config.json"}
    parameters: {{weight: 1}}
""",
        "architecture": f"""merge_method: ties
base_model: {base}
models:
  - model: {lacking}
    parameters: {{weight: 1}}
  - model: {wide}
    parameters: {{weight: 1}}
""",
    }
    paths = {name: write_recipe(root, text, f"{name}.yml") for name, text in recipes.items()}
    outs = {name: root / f"out-{name}" for name in recipes}
    # `run` for some cases: its first step must be the same validation, before any output.
    commands: dict[str, tuple[str | Path, ...]] = {
        "schema": ("validate", paths["schema"]),
        "yaml": ("run", paths["yaml"], outs["yaml"]),
        "method": ("validate", paths["method"]),
        "parameters": ("run", paths["parameters"], outs["parameters"]),
        "models": ("validate", paths["models"], "--out", outs["models"]),
        "architecture": ("validate", paths["architecture"]),
        "out_is_input": ("validate", ok, "--out", tuned[0]),
        "out_not_empty": ("validate", ok, "--out", not_empty),
        "overwrite_input": ("run", victim_recipe, victim, "--overwrite"),
    }
    with pytest.MonkeyPatch.context() as env:
        # Hub ids resolve against an empty cache: no network, and an answer at once.
        env.setenv("HF_HUB_OFFLINE", "1")
        env.setenv("HF_HUB_CACHE", str(root / "hub-cache"))
        with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
            futures = {name: pool.submit(run_cli, *args) for name, args in commands.items()}
            results = {name: future.result() for name, future in futures.items()}
    return {
        "results": results,
        "outs": outs,
        "lacking": lacking,
        "wide": wide,
        "root": root,
        "not_empty": not_empty,
        "victim": victim,
    }


def test_schema_problems_are_listed_together_with_lines_and_closest_keys(cli) -> None:
    problems = assert_rejected(cli["results"]["schema"], 4)
    _, hint = find(problems, "schema.yml:3:", "unknown key 'modles'")
    assert hint == "did you mean 'models'?"
    _, hint = find(problems, "schema.yml:7:", "'models.0.parametrs'")
    assert hint == "did you mean 'parameters'?"
    find(problems, "schema.yml:8:", "models.1.model", "42", "string")
    find(problems, "schema.yml:9:", "dtype", "float17")


def test_yaml_syntax_error_gives_line_and_column_and_run_writes_nothing(cli) -> None:
    (problem,) = assert_rejected(cli["results"]["yaml"], 1)
    assert re.search(r"yaml\.yml:4:4: YAML syntax error", problem[0]), problem
    assert problem[1] is not None and "indentation" in problem[1]
    assert_nothing_written(cli["outs"]["yaml"])


def test_unknown_method_suggests_the_closest_name(cli) -> None:
    (problem,) = assert_rejected(cli["results"]["method"], 1)
    assert "method.yml:1:" in problem[0] and "unknown merge_method 'dare_tie'" in problem[0]
    assert problem[1] == "did you mean 'dare_ties'?"


def test_parameter_problems_of_every_model_are_listed_before_run_writes_anything(
    cli, family: Family
) -> None:
    _, tuned = family
    problems = assert_rejected(cli["results"]["parameters"], 3)
    find(problems, "needs 'weight'", f"'{tuned[0]}'")
    find(problems, "'density'", f"'{tuned[1]}'", "1.5", "outside [0, 1]")
    find(problems, f"'{tuned[2]}'", "density 0.9", "epsilon 0.2", "(0, 1)")
    assert "resuming" not in cli["results"]["parameters"].stderr
    assert_nothing_written(cli["outs"]["parameters"])


def test_every_missing_or_unusable_model_is_named_at_once(cli, family: Family) -> None:
    base, _ = family
    problems = assert_rejected(cli["results"]["models"], 3)
    find(problems, str(cli["root"] / "no-such-model"), "no such folder")
    find(problems, "acme/not-a-model")
    find(problems, str(base / "config.json"), "not a checkpoint file")
    assert_nothing_written(cli["outs"]["models"])


def test_tensor_sets_and_shapes_must_agree_across_models(cli, family: Family) -> None:
    base, _ = family
    problems = assert_rejected(cli["results"]["architecture"], 2)
    find(problems, "model.layers.3.mlp.gate_proj.weight", str(cli["lacking"]), str(base))
    find(problems, "model.layers.1.self_attn.o_proj.weight", "[32, 48]", str(cli["wide"]))


def test_validate_out_refuses_an_input_model_folder(cli, family: Family) -> None:
    _, tuned = family
    (problem,) = assert_rejected(cli["results"]["out_is_input"], 1)
    assert "overlaps input model" in problem[0] and str(tuned[0]) in problem[0]
    assert problem[1] is not None


def test_overwrite_never_replaces_an_input_model(cli) -> None:
    victim = cli["victim"]
    (problem,) = assert_rejected(cli["results"]["overwrite_input"], 1)
    assert "overlaps input model" in problem[0] and str(victim) in problem[0]
    assert (victim / "model.safetensors").is_file() and not (victim / "README.md").exists()
    assert not (victim.parent / f".{victim.name}.partial").exists()


def test_validate_out_refuses_a_non_empty_folder_and_leaves_it_alone(cli) -> None:
    (problem,) = assert_rejected(cli["results"]["out_not_empty"], 1)
    assert str(cli["not_empty"]) in problem[0] and "not empty" in problem[0]
    assert problem[1] is not None and "--overwrite" in problem[1]
    assert (cli["not_empty"] / "notes.txt").read_text() == "keep me"


def test_every_reported_problem_carries_a_hint(cli) -> None:
    missing = [
        f"{case}: {message}"
        for case, result in cli["results"].items()
        for message, hint in reported(result.stderr)
        if hint is None
    ]
    assert not missing, "problems reported without a hint:\n" + "\n".join(missing)


# In-process checks of the same validator: cheap, so the edge values can each have a case.


def all_problems(exc: MergeError) -> list[MergeError]:
    return exc.errors if isinstance(exc, MergeErrors) else [exc]


@pytest.mark.parametrize(
    "setting", ["weight: .inf", "weight: -.inf", "weight: .nan", "weight: [0.5, .nan]"]
)
def test_non_finite_numbers_are_refused_with_key_and_line(setting: str) -> None:
    text = f"merge_method: linear\nmodels:\n  - model: a\n    parameters:\n      {setting}\n"
    with pytest.raises(MergeError) as info:
        parse_recipe(text, "r.yml")
    (problem,) = all_problems(info.value)
    assert problem.message.startswith("r.yml:5:") and "'weight'" in problem.message


@pytest.mark.parametrize(
    ("density", "epsilon", "accepted"),
    [(0.5, 0.15, True), (1.0, 0.9, True), (0.85, 0.15, False), (0.1, 0.1, False)],
)
def test_della_density_plus_or_minus_epsilon_must_stay_inside_zero_one(
    family: Family, density: float, epsilon: float, accepted: bool
) -> None:
    base, tuned = family
    text = (
        f"merge_method: della\nbase_model: {base}\nmodels:\n  - model: {tuned[0]}\n"
        f"    parameters: {{weight: 1, density: {density}, epsilon: {epsilon}}}\n"
    )
    if accepted:
        prepare(text)
        return
    with pytest.raises(MergeError) as info:
        prepare(text)
    (problem,) = all_problems(info.value)
    assert str(tuned[0]) in problem.message and "(0, 1)" in problem.message


@pytest.mark.parametrize("method", ["task_arithmetic", "ties", "dare_linear", "della", "slerp"])
def test_a_method_that_needs_a_base_model_refuses_a_recipe_without_one(
    family: Family, method: str
) -> None:
    _, tuned = family
    text = f"merge_method: {method}\nmodels:\n  - model: {tuned[0]}\n"
    text += "parameters: {t: 0.5}\n" if method == "slerp" else "    parameters: {weight: 1}\n"
    with pytest.raises(MergeError) as info:
        prepare(text)
    messages = [p.message for p in all_problems(info.value)]
    hints = [p.hint or "" for p in all_problems(info.value)]
    assert any(f"{method} needs a base model" in m for m in messages), messages
    assert any("base_model:" in h for h in hints), hints


@pytest.mark.parametrize("gamma", [-0.01, 1.5])
def test_gamma_outside_zero_one_names_the_model(family: Family, gamma: float) -> None:
    base, tuned = family
    text = (
        f"merge_method: breadcrumbs\nbase_model: {base}\nmodels:\n  - model: {tuned[1]}\n"
        f"    parameters: {{weight: 1, density: 0.9, gamma: {gamma}}}\n"
    )
    with pytest.raises(MergeError) as info:
        prepare(text)
    (problem,) = all_problems(info.value)
    assert "'gamma'" in problem.message and str(tuned[1]) in problem.message


def test_empty_and_overlong_slice_ranges_are_reported_together(family: Family) -> None:
    base, tuned = family
    text = (
        "merge_method: passthrough\nslices:\n"
        f"  - sources: [{{model: {base}, layer_range: [2, 2]}}]\n"
        f"  - sources: [{{model: {tuned[0]}, layer_range: [1, 9]}}]\n"
    )
    with pytest.raises(MergeErrors) as info:
        prepare(text)
    messages = [p.message for p in info.value.errors]
    assert len(messages) == 2
    assert any("[2, 2]" in m and "empty" in m for m in messages)
    assert any("[1, 9]" in m and str(tuned[0]) in m and "4 layers" in m for m in messages)


def test_output_that_is_a_file_is_refused(family: Family, tmp_path: Path) -> None:
    base, _ = family
    _, sources = prepare(
        f"merge_method: linear\nmodels: [{{model: {base}, parameters: {{weight: 1}}}}]\n"
    )
    target = tmp_path / "merged"
    target.write_text("not a folder")
    with pytest.raises(MergeError) as info:
        check_output(target, sources, overwrite=True)
    assert str(target) in info.value.message and "file" in info.value.message


def test_a_faulty_recipe_without_any_model_left_lists_its_own_problems() -> None:
    # Found by the fuzz test: with the faulty key left out no model remains, and planning that
    # remainder for more problems crashed (IndexError) instead of reporting the recipe's.
    text = (
        "merge_method: arcee_fusion\nslices:\n- sources: []\ntokenizer_source: base\n"
        "chat_template: ''\n"
    )
    with pytest.raises(MergeErrors) as caught:
        prepare(text)
    messages = [e.message for e in caught.value.errors]
    assert any("chat_template '' is not a built-in template" in m for m in messages)
    assert any("sources" in m for m in messages)
