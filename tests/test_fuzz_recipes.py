"""Generated recipes, from random YAML text to near-valid recipes with one thing wrong: the
validator either accepts them or raises MergeError, and the CLI exits 0 or 2 with an `error:`
line, never a traceback."""

from __future__ import annotations

import os
import subprocess
import tempfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from mergesmith.api import prepare
from mergesmith.config import load_recipe, parse_recipe
from mergesmith.errors import MergeError
from mergesmith.methods.registry import all_methods
from tests.conftest import run_cli

Family = tuple[Path, list[Path]]
METHODS = [m.name for m in all_methods()]
PARAMETERS = sorted({p.name for m in all_methods() for p in m.params})
KEYS = [
    "merge_method",
    "base_model",
    "models",
    "slices",
    "sources",
    "model",
    "layer_range",
    "parameters",
    "dtype",
    "out_dtype",
    "tokenizer_source",
    "tokenizer",
    "chat_template",
    "filter",
    "value",
    *PARAMETERS,
]
YAML_PIECES = [
    "merge_method:",
    " ties",
    " della",
    "\n",
    "\n  ",
    "  - ",
    "model: ",
    "models:",
    "parameters: ",
    "layer_range: [0, 2]",
    "{",
    "}",
    "[",
    "]",
    ", ",
    ": ",
    "? ",
    "&a ",
    "*a",
    "!!str ",
    "!!binary ",
    "!!python/object/apply:os.system ",
    "'",
    '"',
    "# note",
    "---",
    "...",
    "|",
    ">-",
    "\t",
    "<<: ",
    "%YAML 1.1\n",
    "0x1F",
    ".inf",
    ".nan",
    "~",
    "1e5",
    "é",
    "\u202e",
    "\x00",
]

SETTINGS = settings(
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)

# -- strategies ---------------------------------------------------------------------------

scalars = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(10**30), max_value=10**30),
    st.floats(allow_nan=True, allow_infinity=True),
    st.floats(min_value=-2, max_value=3),
    st.text(max_size=20),
    st.sampled_from(METHODS + KEYS + ["float16", "bf16", "base", "sum", "count", "*"]),
)


def nested(depth: int, leaf: Any) -> Any:
    for i in range(depth):
        leaf = [leaf] if i % 2 else {"value": leaf}
    return leaf


junk = st.one_of(
    st.recursive(
        scalars,
        lambda children: st.one_of(
            st.lists(children, max_size=5),
            st.dictionaries(
                st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), children, max_size=5
            ),
        ),
        max_leaves=25,
    ),
    # Long gradients, cheaply: drawing thousands of elements one by one would be slow.
    st.tuples(st.integers(0, 3000), st.floats(-1, 2)).map(lambda nv: [nv[1]] * nv[0]),
    st.tuples(st.integers(1, 60), scalars).map(lambda dv: nested(*dv)),
)


def model_names(family: Family, root: Path) -> st.SearchStrategy[str]:
    """Real models, and names that go wrong in every way but one: none looks like a hub id
    (org/name), which would send the validator to the network."""
    base, tuned = family
    real = [str(base), *map(str, tuned)]
    return st.one_of(
        st.sampled_from(real),
        st.sampled_from(
            [
                str(base / "model.safetensors"),
                str(root / "missing-model"),
                f"{tuned[0]}@main",
                f"{tuned[0]}+{tuned[1]}",
                "",
                "/",
            ]
        ),
        st.text(max_size=12).map(lambda t: str(root / "nowhere") + "/" + t.replace("\x00", "")),
    )


def parameter_values() -> st.SearchStrategy[Any]:
    numbers = st.one_of(st.floats(min_value=-0.5, max_value=1.5), st.sampled_from([0, 1, 0.5]))
    return st.one_of(
        numbers,
        st.lists(numbers, min_size=1, max_size=6),
        st.lists(
            st.fixed_dictionaries(
                {"value": numbers}, optional={"filter": st.sampled_from(["mlp", "self_attn", "*"])}
            ),
            min_size=1,
            max_size=3,
        ),
        junk,
    )


@st.composite
def near_valid(draw: st.DrawFn, family: Family, root: Path) -> dict[str, Any]:
    """A recipe against the real family, mostly right, with some keys wrong or replaced."""
    names = model_names(family, root)
    method = draw(st.one_of(st.sampled_from(METHODS), st.sampled_from(["tie", "dare", ""])))
    params = st.dictionaries(
        st.sampled_from([*PARAMETERS, "densty"]), parameter_values(), max_size=4
    )
    recipe: dict[str, Any] = {"merge_method": method}
    if draw(st.booleans()):
        recipe["base_model"] = draw(names)
    if draw(st.integers(0, 3)):
        recipe["models"] = draw(
            st.lists(
                st.fixed_dictionaries({"model": names}, optional={"parameters": params}),
                max_size=4,
            )
        )
    else:
        ranges = st.lists(st.integers(-2, 7), min_size=2, max_size=2)
        source = st.fixed_dictionaries(
            {"model": names, "layer_range": ranges}, optional={"parameters": params}
        )
        recipe["slices"] = draw(
            st.lists(
                st.fixed_dictionaries(
                    {"sources": st.lists(source, max_size=3)}, optional={"parameters": params}
                ),
                max_size=3,
            )
        )
    for key, values in [
        ("parameters", params),
        ("dtype", st.sampled_from(["float16", "bfloat16", "float32", "int8"])),
        ("out_dtype", st.sampled_from(["float16", "float64"])),
        ("tokenizer_source", st.one_of(st.sampled_from(["base", "union"]), names)),
        ("chat_template", st.text(max_size=40)),
    ]:
        if draw(st.integers(0, 3)) == 0:
            recipe[key] = draw(values)
    # Then break it a little: replace or drop a few entries anywhere in the tree.
    for _ in range(draw(st.integers(0, 3))):
        replace_somewhere(draw, recipe)
    return recipe


def replace_somewhere(draw: st.DrawFn, tree: Any) -> None:
    node = tree
    while True:
        if isinstance(node, dict) and node:
            key = draw(st.sampled_from(sorted(node, key=str)))
        elif isinstance(node, list) and node:
            key = draw(st.integers(0, len(node) - 1))
        else:
            return
        child = node[key]
        if isinstance(child, dict | list) and child and draw(st.booleans()):
            node = child
            continue
        if isinstance(node, dict) and draw(st.integers(0, 3)) == 0:
            del node[key]
        else:
            node[key] = draw(junk)
        return


yaml_text = st.one_of(
    st.text(max_size=200),
    st.lists(st.sampled_from(YAML_PIECES), max_size=40).map("".join),
    st.dictionaries(st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), junk, max_size=6).map(
        lambda doc: yaml.safe_dump(doc, allow_unicode=True)
    ),
)


def as_text(recipe: dict[str, Any]) -> str:
    return yaml.safe_dump(recipe, allow_unicode=True, sort_keys=False)


# -- the validator in this process ---------------------------------------------------------


@settings(SETTINGS, max_examples=300)
@given(text=yaml_text)
def test_parse_recipe_accepts_or_raises_merge_error_for_any_text(text: str) -> None:
    try:
        parse_recipe(text, "fuzz.yml")
    except MergeError as exc:
        assert exc.message


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("fuzz")


def test_prepare_accepts_or_raises_merge_error_for_near_valid_recipes(
    family: Family, scratch: Path
) -> None:
    @settings(SETTINGS, max_examples=120)
    @given(recipe=near_valid(family, scratch), as_dict=st.booleans())
    def check(recipe: dict[str, Any], as_dict: bool) -> None:
        try:
            prepare(recipe if as_dict else as_text(recipe))
        except MergeError as exc:
            assert exc.message

    check()


HOSTILE_YAML = {
    "recursive-alias": "merge_method: ties\nmodels: &loop [*loop]\n",
    "deeply-nested-lists": "merge_method: " + "[" * 2000 + "]" * 2000 + "\n",
    "deeply-nested-mappings": "parameters: " + "{a: " * 2000 + "1" + "}" * 2000 + "\n",
    "merge-key": "x: &m {model: a}\nmerge_method: ties\nmodels: [{<<: *m}]\n",
    "unknown-tag": "merge_method: !mine ties\nmodels: [{model: a}]\n",
    "control-character-escape": 'merge_method: "ties\\x1f"\nmodels: [{model: a}]\n',
    "integer-past-the-digit-limit": "merge_method: ties\nweight: 1" + "0" * 5000 + "\n",
}


@pytest.mark.parametrize("case", list(HOSTILE_YAML))
def test_hostile_yaml_is_refused_as_a_merge_error(case: str) -> None:
    try:
        parse_recipe(HOSTILE_YAML[case], "hostile.yml")
    except MergeError as exc:
        assert exc.message
    except BaseException as exc:  # the point: nothing but MergeError may come out
        pytest.fail(f"{case}: {exc.__class__.__name__}: {str(exc)[:200]}")


def test_a_recipe_dict_nested_too_deeply_is_a_merge_error() -> None:
    try:
        load_recipe({"merge_method": "ties", "parameters": nested(3000, 1)})
    except MergeError as exc:
        assert exc.message
    except BaseException as exc:
        pytest.fail(f"{exc.__class__.__name__}: {str(exc)[:200]}")


# -- the CLI as a subprocess ---------------------------------------------------------------


def billion_laughs(levels: int) -> str:
    lines = ["a0: &a0 [lol, lol, lol, lol, lol, lol, lol, lol, lol, lol]"]
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * 10) + "]")
    return "\n".join(lines) + "\n"


def test_an_alias_bomb_is_refused_promptly(tmp_path: Path) -> None:
    recipe = tmp_path / "bomb.yml"
    # Ten levels of ten: 10^10 strings if expanded. A few small aliases are all it takes.
    recipe.write_text(billion_laughs(10), encoding="utf-8")
    try:
        result = run_cli("validate", recipe, timeout=15)
    except subprocess.TimeoutExpired:
        pytest.fail("validate was still expanding YAML aliases after 15 s")
    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    assert result.stderr.startswith("error: ")


def check_cli_answer(command: list[str], result: subprocess.CompletedProcess) -> None:
    context = f"{command}\n--- stderr ---\n{result.stderr}"
    assert result.returncode in (0, 2), context
    assert "Traceback" not in result.stderr and "internal error" not in result.stderr, context
    if result.returncode == 2:
        assert any(line.startswith("error: ") for line in result.stderr.splitlines()), context
    elif command[0] == "validate":
        assert result.stdout.startswith("ok: "), context
    else:
        assert (Path(command[2]) / "config.json").is_file(), context


def test_cli_exits_0_or_2_with_an_error_line_for_generated_recipes(
    family: Family, scratch: Path
) -> None:
    # Each example is a batch of recipes run concurrently: a process start costs a second or
    # two, so examples one by one would be too slow for the number worth trying.
    recipes = st.one_of(near_valid(family, scratch).map(as_text), yaml_text)
    commands = st.sampled_from(["validate", "validate --out", "run"])

    @settings(SETTINGS, max_examples=2, phases=[Phase.explicit, Phase.generate])
    @given(batch=st.lists(st.tuples(recipes, commands), min_size=8, max_size=8))
    def check(batch: list[tuple[str, str]]) -> None:
        with tempfile.TemporaryDirectory(dir=scratch) as tmp, pytest.MonkeyPatch.context() as env:
            env.setenv("HF_HUB_OFFLINE", "1")
            env.setenv("HF_HUB_CACHE", str(Path(tmp) / "hub-cache"))
            runs = []
            for i, (text, how) in enumerate(batch):
                recipe = Path(tmp) / f"recipe-{i}.yml"
                recipe.write_bytes(text.encode("utf-8", "surrogatepass"))
                out = str(Path(tmp) / f"out-{i}")
                command = {
                    "validate": ["validate", str(recipe)],
                    "validate --out": ["validate", str(recipe), "--out", out],
                    "run": ["run", str(recipe), out, "--threads", "1"],
                }[how]
                runs.append(command)
            with ThreadPoolExecutor(os.cpu_count() or 2) as pool:
                results = list(pool.map(lambda c: run_cli(*c), runs))
            for command, result in zip(runs, results, strict=True):
                check_cli_answer(command, result)

    check()
