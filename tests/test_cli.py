"""The command line, run as a real subprocess: messages, exit codes, listings."""

from __future__ import annotations

from pathlib import Path

from tests.conftest import run_cli, write_recipe

# SEMANTICS.md section 4 and 5: the methods and their per-model parameters.
EXPECTED_METHODS = {
    "task_arithmetic": {"weight"},
    "ties": {"weight", "density"},
    "dare_ties": {"weight", "density"},
    "dare_linear": {"weight", "density"},
    "breadcrumbs": {"weight", "density", "gamma"},
    "breadcrumbs_ties": {"weight", "density", "gamma"},
    "della": {"weight", "density", "epsilon"},
    "della_linear": {"weight", "density", "epsilon"},
    "linear": {"weight"},
    "slerp": set(),
    "passthrough": {"scale"},
    "model_stock": set(),
    "nuslerp": {"weight"},
    "multislerp": {"weight"},
    "karcher": set(),
    "sce": set(),
    "nearswap": set(),
    "arcee_fusion": set(),
    "ram": set(),
    "ramplus_tl": set(),
}


def parse_methods(output: str) -> dict[str, dict[str, str]]:
    methods: dict[str, dict[str, str]] = {}
    current = None
    for line in output.splitlines():
        if not line.startswith(" "):
            current = line.split(":")[0]
            methods[current] = {}
        elif current:
            parts = line.split()
            methods[current][parts[0]] = line
    return methods


def test_methods_lists_every_method_with_per_model_parameters_and_defaults() -> None:
    result = run_cli("methods")
    assert result.returncode == 0
    listed = parse_methods(result.stdout)
    assert set(listed) == set(EXPECTED_METHODS)
    for name, per_model in EXPECTED_METHODS.items():
        got = {p for p, line in listed[name].items() if "per model" in line}
        assert got == per_model, name
    assert "default true" in listed["ties"]["normalize"]
    assert "default false" in listed["dare_ties"]["normalize"]
    assert "default true" in listed["della"]["rescale"]
    assert "default sum" in listed["breadcrumbs_ties"]["consensus_method"]
    assert "default 0.15" in listed["della"]["epsilon"]
    assert "default 0.01" in listed["breadcrumbs"]["gamma"]
    assert "required" in listed["slerp"]["t"]


def test_user_error_is_one_line_plus_hint_exit_2_without_traceback(family, tmp_path: Path) -> None:
    base, tuned = family
    recipe = write_recipe(
        tmp_path,
        f"merge_method: linear\nmodels:\n  - model: {base}\n  - model: {tuned[0]}\n"
        "paramters: {}\nparameters: {weight: 1.0}\n",
    )
    result = run_cli("run", recipe, tmp_path / "out")
    assert result.returncode == 2
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("error: ") and "recipe.yml:5" in lines[0] and "paramters" in lines[0]
    assert lines[1].strip().startswith("hint: ")
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    recipe = write_recipe(tmp_path, "merge_method: nope\nmodels: [{model: a}]\n")
    result = run_cli("validate", recipe, "--debug")
    assert result.returncode == 2 and "Traceback" in result.stderr


def test_validate_reports_the_plan_without_writing(family, tmp_path: Path) -> None:
    base, tuned = family
    recipe = write_recipe(
        tmp_path,
        f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n"
        f"  - model: {tuned[0]}\n    parameters: {{weight: 3}}\n",
    )
    result = run_cli("validate", recipe, "--plan")
    assert result.returncode == 0, result.stderr
    assert "ok: linear, 39 tensors" in result.stdout
    assert f"model.norm.weight [32] F32 <- {base}:model.norm.weight" in result.stdout


def test_run_refuses_a_non_empty_output_unless_overwrite(family, tmp_path: Path) -> None:
    base, tuned = family
    recipe = write_recipe(
        tmp_path,
        f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n"
        f"  - model: {tuned[0]}\n    parameters: {{weight: 1}}\n",
    )
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    refused = run_cli("run", recipe, out)
    assert (
        refused.returncode == 2
        and "not empty" in refused.stderr
        and "--overwrite" in refused.stderr
    )
    assert (out / "keep.txt").exists()
    done = run_cli("run", recipe, out, "--overwrite")
    assert done.returncode == 0, done.stderr
    assert (out / "model.safetensors").exists() and not (out / "keep.txt").exists()
    assert "merged 39 tensors" in done.stdout


def test_output_inside_an_input_model_is_refused(family, tmp_path: Path) -> None:
    base, _ = family
    recipe = write_recipe(
        tmp_path,
        f"merge_method: linear\nmodels:\n  - model: {base}\n    parameters: {{weight: 1}}\n",
    )
    result = run_cli("run", recipe, base / "merged")
    assert result.returncode == 2 and "overlaps input model" in result.stderr
    assert not (base / "merged").exists()


def test_validate_lists_recipe_model_and_plan_problems_together(family, tmp_path: Path) -> None:
    """A misspelt key used to stop the check before the models and the plan were looked at:
    fixing it showed the next problem, one round trip per mistake."""
    base, tuned = family
    missing = tmp_path / "no-such-model"
    recipe = write_recipe(
        tmp_path,
        f"""merge_method: ties
base_model: {base}
models:
  - model: {tuned[0]}
    parameters: {{weight: 0.5, density: 1.5}}
  - model: {missing}
    parameters: {{weight: 0.5}}
parameters: {{normalize: true}}
dtpye: bfloat16
""",
    )
    result = run_cli("validate", recipe)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0] == "error: 2 problems found:", errors
    assert any("recipe.yml:9" in e and "dtpye" in e for e in errors), errors
    assert any("recipe.yml:6" in e and str(missing) in e for e in errors), errors
    # With the missing model left out of the plan there is nothing else to say, so a third
    # problem (density) needs the models: fix the path and it shows, with its line.
    fixed = write_recipe(
        tmp_path, recipe.read_text().replace(str(missing), str(tuned[1])), name="fixed.yml"
    )
    result = run_cli("validate", fixed)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert errors[0] == "error: 2 problems found:", errors
    assert any("fixed.yml:9" in e and "dtpye" in e for e in errors), errors
    assert any("fixed.yml:4" in e and "density" in e for e in errors), errors
