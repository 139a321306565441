"""Tokenizer merges (`tokenizer_source`, `tokenizer:`, `chat_template`) against mergekit 0.1.5.

The inputs are the models of vocab_models.py, whose vocabularies differ: the same token string
sits at different ids, some tokens exist in one model only, one model has more tokens than
embedding rows, one more rows than tokens. Each recipe is merged by mergekit (one batch process,
as the harness does) and by `mergesmith run`; for each we compare every tensor (float32, 1e-5
relative), config.json's vocab_size (and that it equals the rows we wrote), the tokenizers
transformers reads back (same vocabulary, same ids or tokens for sample strings, same added
tokens, same chat template text, or the same rendering for the built-in templates we ship our
own text of), and that transformers loads our model and gives finite logits for every token id.

mergekit's union is not deterministic: with no base_model the tokenizer it extends is the first
element of a Python set of models (PYTHONHASHSEED decides), and the tokens it appends come in the
iteration order of a Rust HashMap (`get_vocab()`), which changes from process to process. For
those cases (ORDER_FREE) we require the same token set, the same ids for the extended tokenizer's
own tokens, and, after re-indexing mergekit's rows by token string, the same tensors.

Expected values come from mergekit or from an independent computation on the input files
(`expected_linear_rows`), never from our code. Where mergekit crashes on a bad recipe (CRASHES)
we require the CLI's user error (exit 2, an `error:` line naming the model and the token, a
hint, no traceback; SEMANTICS.md 7) and no output folder. Where it crashes on a good one
(`base_added_token`), the independent expectation stands in for it.

Our runs start together in the background (OursBatch): merges through our CLI's click command,
several per interpreter as mergekit's are (each process spends seconds importing torch);
errors and `validate` as real `python -m mergesmith` subprocesses.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from string import Template
from typing import Any

import pytest
import torch

from tests.conformance.harness import (
    OURS_TIMEOUT_S,
    MergekitBatch,
    assert_not_a_copy,
    assert_tensors_match,
    load_folder,
)
from tests.conformance.vocab_models import (
    CHAT_TEMPLATE_BASE,
    CHAT_TEMPLATE_TUNED,
    MODEL_NAMES,
    VOCAB_TENSORS,
    make_vocab_models,
)

pytestmark = pytest.mark.conformance

OURS_ARGS = ("--seed", "0", "-q")

SAMPLES = (
    "the merge of two models is a model",
    "jazzy quixotic zebras join the quiz",
    # A union appends other models' BPE tokens as added tokens, matched before the base's BPE:
    # "fine" becomes "fin" + "e" and "election" ends in "ion" (mergekit's behaviour).
    "fine tuned models learn new tokens; sign election",
    "<|im_start|>user\nmergesmith vocabularies<|im_end|>",
    "<s>sign election</s> <extra_0> wide wider <|brand_new|>",
)
LITERAL_TEMPLATE = (
    "{% for message in messages %}[{{ message['role'] | upper }}] {{ message['content'] }}\n"
    "{% endfor %}{% if add_generation_prompt %}[ASSISTANT] {% endif %}"
)

RECIPES: dict[str, str] = {
    # The base's vocabulary; $vperm's rows are gathered by token string (only 12 of its 76
    # shared tokens keep their id), base tokens $vperm lacks take the base's row.
    "base_linear": """\
merge_method: linear
base_model: $vbase
models:
  - model: $vbase
    parameters: {weight: 0.2}
  - model: $vchat
    parameters: {weight: 0.3}
  - model: $vperm
    parameters: {weight: 0.5}
tokenizer_source: base
dtype: float32
""",
    # The base's tokenizer has 4 tokens past its 98 rows: mergekit strips the last two; id 96
    # is <extra_0> (only $vwide has it), while $vchat's row 96 is <|im_start|>.
    "base_stripped_ties": """\
merge_method: ties
base_model: $vwide
models:
  - model: $vsame
    parameters: {weight: 0.6, density: 0.7}
  - model: $vchat
    parameters: {weight: 0.5, density: 0.5}
tokenizer_source: base
dtype: float32
""",
    # More rows than tokens: the output keeps one row per token of the base's tokenizer.
    "base_padded_rows_chatml": """\
merge_method: task_arithmetic
base_model: $vpadded
models:
  - model: $vsame
    parameters: {weight: 0.7}
  - model: $vperm
    parameters: {weight: 0.4}
tokenizer_source: base
chat_template: chatml
dtype: float32
""",
    "union_linear": """\
merge_method: linear
base_model: $vbase
models:
  - model: $vbase
    parameters: {weight: 0.2}
  - model: $vchat
    parameters: {weight: 0.3}
  - model: $vperm
    parameters: {weight: 0.5}
tokenizer_source: union
dtype: float32
""",
    # `auto`: two of the three inputs share CHAT_TEMPLATE_TUNED, the base has another one.
    "union_task_arithmetic_auto": """\
merge_method: task_arithmetic
base_model: $vbase
models:
  - model: $vchat
    parameters: {weight: 0.6}
  - model: $vperm
    parameters: {weight: 0.8}
tokenizer_source: union
chat_template: auto
dtype: float32
""",
    # $vwide's tokens past its rows are left out of the union (mergekit warns); its added
    # tokens are the only ones appended, so the order is determined.
    "union_wide_ties_llama3": """\
merge_method: ties
base_model: $vbase
models:
  - model: $vwide
    parameters: {weight: 0.7, density: 0.6}
  - model: $vsame
    parameters: {weight: 0.5, density: 0.9}
parameters:
  normalize: false
tokenizer_source: union
chat_template: llama3
dtype: float32
""",
    # No base: mergekit extends whichever tokenizer its set yields first, and a token some
    # models lack takes the mean of its owners' rows.
    "union_no_base": """\
merge_method: linear
models:
  - model: $vchat
    parameters: {weight: 0.4}
  - model: $vperm
    parameters: {weight: 0.6}
tokenizer_source: union
dtype: float32
""",
    "model_ties": """\
merge_method: ties
base_model: $vbase
models:
  - model: $vchat
    parameters: {weight: 0.6, density: 0.8}
  - model: $vperm
    parameters: {weight: 0.5, density: 0.5}
tokenizer_source: $vchat
dtype: float32
""",
    "model_slerp_literal": Template("""\
merge_method: slerp
base_model: $$vbase
models:
  - model: $$vbase
  - model: $$vperm
parameters:
  t: 0.4
tokenizer_source: $$vperm
chat_template: $template
dtype: float32
""").substitute(template=json.dumps(LITERAL_TEMPLATE)),
    # The output tokenizer is the base's file as it is, not cut to its 98 rows: mergekit reads
    # the base's own vocabulary cut, so <extra_1> and wider are absent from every model and get
    # zero rows (while crash_source_past_rows, the same with $vwide not the base, crashes).
    "model_is_base_past_rows": """\
merge_method: linear
base_model: $vwide
models:
  - model: $vwide
    parameters: {weight: 0.5}
  - model: $vsame
    parameters: {weight: 0.5}
tokenizer_source: $vwide
dtype: float32
""",
    # The output tokenizer is a model that is not merged: its chat tokens have no owner and
    # get zero rows (mergekit warns "not found in any model").
    "model_outside_recipe": """\
merge_method: linear
models:
  - model: $vbase
    parameters: {weight: 0.5}
  - model: $vsame
    parameters: {weight: 0.5}
tokenizer_source: $vchat
dtype: float32
""",
    # Every token-source form; 134 tokens + 2 new ones, padded to 192 rows.
    "tokens_union_pad64": """\
merge_method: linear
base_model: $vbase
models:
  - model: $vbase
    parameters: {weight: 0.2}
  - model: $vchat
    parameters: {weight: 0.3}
  - model: $vperm
    parameters: {weight: 0.5}
tokenizer:
  source: union
  pad_to_multiple_of: 64
  tokens:
    ocab:
      source: $vchat
    "<|im_end|>":
      source: {kind: model_token, model: $vbase, token: "</s>"}
    "<|im_start|>":
      source: {kind: model_token, model: $vperm, token_id: 3}
    jaz:
      source: {kind: zero}
    merge:
      source: $vperm
      force: true
    the:
      source: $vchat
    "<|brand_new|>":
      source: {kind: model_token, model: $vchat, token: "<|im_start|>"}
    "<|zero_new|>":
      source: {kind: zero}
dtype: float32
""",
    # Under `source: base` only tokens the base has: a token added there crashes mergekit
    # (crash_base_added_token).
    "tokens_base_force_pad32": """\
merge_method: ties
base_model: $vbase
models:
  - model: $vchat
    parameters: {weight: 0.7, density: 0.6}
  - model: $vperm
    parameters: {weight: 0.4, density: 0.8}
tokenizer:
  source: base
  pad_to_multiple_of: 32
  tokens:
    ocab:
      source: $vchat
    the:
      source: {kind: model_token, model: $vperm, token: the}
      force: true
    model:
      source: {kind: model_token, model: $vchat, token_id: 5}
      force: true
    merge:
      source: {kind: zero}
      force: true
dtype: float32
""",
    "chat_no_source": """\
merge_method: linear
base_model: $vbase
models:
  - model: $vbase
    parameters: {weight: 0.5}
  - model: $vsame
    parameters: {weight: 0.5}
chat_template: chatml
dtype: float32
""",
    # No tokenizer merge, so rows go by id and the row counts must agree (100 each).
    "chat_auto_no_source": """\
merge_method: task_arithmetic
base_model: $vpadded
models:
  - model: $vchat
    parameters: {weight: 0.5}
chat_template: auto
dtype: float32
""",
    # The independent check of test_union_rows_are_merged_by_token_string.
    "align_union_pad64": """\
merge_method: linear
base_model: $vbase
models:
  - model: $vbase
    parameters: {weight: 0.3}
  - model: $vperm
    parameters: {weight: 0.7}
tokenizer:
  source: union
  pad_to_multiple_of: 64
dtype: float32
""",
    # mergekit crashes on the rest (CRASHES).
    "crash_source_past_rows": """\
merge_method: linear
base_model: $vbase
models:
  - model: $vbase
    parameters: {weight: 0.5}
  - model: $vwide
    parameters: {weight: 0.5}
tokenizer_source: $vwide
dtype: float32
""",
    "crash_token_id_past_rows": """\
merge_method: linear
base_model: $vbase
models:
  - model: $vbase
    parameters: {weight: 0.5}
  - model: $vchat
    parameters: {weight: 0.5}
tokenizer:
  source: union
  tokens:
    "<|im_start|>":
      source: {kind: model_token, model: $vchat, token_id: 100}
dtype: float32
""",
    "crash_token_not_in_model": """\
merge_method: linear
base_model: $vbase
models:
  - model: $vbase
    parameters: {weight: 0.5}
  - model: $vchat
    parameters: {weight: 0.5}
tokenizer:
  source: union
  tokens:
    "<|im_start|>":
      source: {kind: model_token, model: $vbase, token: zzqq}
dtype: float32
""",
    "crash_source_model_lacks_token": """\
merge_method: linear
base_model: $vbase
models:
  - model: $vbase
    parameters: {weight: 0.2}
  - model: $vchat
    parameters: {weight: 0.3}
  - model: $vperm
    parameters: {weight: 0.5}
tokenizer:
  source: union
  tokens:
    "<|im_start|>":
      source: $vperm
dtype: float32
""",
    "crash_source_not_in_recipe": """\
merge_method: linear
base_model: $vbase
models:
  - model: $vbase
    parameters: {weight: 0.5}
  - model: $vchat
    parameters: {weight: 0.5}
tokenizer:
  source: union
  tokens:
    "<|im_start|>":
      source: {kind: model_token, model: $vsame, token: the}
dtype: float32
""",
    "crash_unknown_template": """\
merge_method: linear
base_model: $vbase
models:
  - model: $vbase
    parameters: {weight: 0.5}
  - model: $vsame
    parameters: {weight: 0.5}
tokenizer_source: base
chat_template: chatmlx
dtype: float32
""",
    # mergekit crashes (KeyError: 96): it adds the token to the base's own tokenizer object,
    # then finds it past the base's rows. Checked against an independent expectation instead.
    "base_added_token": """\
merge_method: linear
base_model: $vbase
models:
  - model: $vbase
    parameters: {weight: 0.5}
  - model: $vchat
    parameters: {weight: 0.5}
tokenizer:
  source: base
  tokens:
    "<|im_start|>":
      source: $vchat
dtype: float32
""",
    "crash_both_tokenizer_keys": """\
merge_method: linear
base_model: $vbase
models:
  - model: $vbase
    parameters: {weight: 0.5}
  - model: $vsame
    parameters: {weight: 0.5}
tokenizer_source: base
tokenizer:
  source: union
dtype: float32
""",
}

# Cases where mergekit's union order is free: case -> how many leading ids mergekit fixes
# (the extended tokenizer's own; 0 when its set picks which tokenizer is extended).
ORDER_FREE: dict[str, int] = {
    "union_linear": 96,
    "union_task_arithmetic_auto": 96,
    "union_no_base": 0,
    "tokens_union_pad64": 96,
    "align_union_pad64": 96,
}
# Cases with a template mergekit names (chatml, llama3): we ship our own text for those, so
# the templates are compared by what they render; every other template must be the same text.
NAMED_TEMPLATE = {"base_padded_rows_chatml", "union_wide_ties_llama3", "chat_no_source"}
CONVERSATION = (
    {"role": "system", "content": "Answer briefly."},
    {"role": "user", "content": "  Merge two models?  "},
    {"role": "assistant", "content": "Done."},
    {"role": "user", "content": "Thanks"},
)

# case -> (text in mergekit's traceback, texts our message must all hold, texts of which it
# must hold at least one).
CRASHES: dict[str, tuple[str, tuple[str, ...], tuple[str, ...]]] = {
    "crash_source_past_rows": ("KeyError: 9", ("vwide",), ("<extra_1>", "wider")),
    "crash_token_id_past_rows": (
        "AssertionError: Token ID 100 out of range for model",
        ("vchat", "100"),
        (),
    ),
    "crash_token_not_in_model": (
        "AssertionError: Token 'zzqq' not found in model",
        ("vbase", "zzqq"),
        (),
    ),
    "crash_source_model_lacks_token": (
        "AssertionError: Token '<|im_start|>' not found in model",
        ("vperm", "<|im_start|>"),
        (),
    ),
    "crash_source_not_in_recipe": ("requires a vocabulary weight from model", ("vsame",), ()),
    "crash_unknown_template": ("RuntimeError: Invalid chat template: chatmlx", ("chatmlx",), ()),
    "crash_both_tokenizer_keys": (
        "Cannot specify both tokenizer_source and tokenizer",
        ("tokenizer_source", "tokenizer"),
        (),
    ),
}
COMPARED = sorted(set(RECIPES) - set(CRASHES) - {"base_added_token"})


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """The vocab models, under the name conftest's `recipes` substitutes from ($vbase, ...)."""
    paths = make_vocab_models(tmp_path_factory.mktemp("vocab_models"))
    assert set(paths) == set(MODEL_NAMES)
    return {name: str(path) for name, path in paths.items()}


# ---------------------------------------------------------------------------------------------
# Our runs: every `mergesmith` invocation of the module, started together in the background


# Our CLI's click command on several recipes in one interpreter, as mergekit_driver.py does for
# mergekit: a run spends ~5 s of CPU importing torch and transformers and well under one merging
# a toy. argv: JOBS_JSON ([[key, args], ...]) RESULTS_JSON (key -> exit code, rewritten after
# every job); each job's output goes to stderr under a "=== key" line.
OURS_DRIVER = """
import json, sys, traceback
from mergesmith.cli import cli
results = {}
for key, args in json.loads(sys.argv[1]):
    print(f"=== {key}: mergesmith {' '.join(args)}", file=sys.stderr, flush=True)
    try:
        cli.main(args=args, prog_name="mergesmith", standalone_mode=False)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    except Exception:
        traceback.print_exc()
        code = 1
    results[key] = code
    with open(sys.argv[2], "w", encoding="utf-8") as handle:
        json.dump(results, handle)
"""


class OursBatch:
    """Our runs, started together in the background with the mergekit batch.

    Merges that must succeed go through OURS_DRIVER, in two processes (PYTHONHASHSEED 1 and 2,
    which test_union_order_does_not_depend_on_hash_seed uses); runs whose exit code, stderr or
    separate process matter (errors, validate) are real `python -m mergesmith` subprocesses,
    one at a time beside them.
    """

    def __init__(
        self,
        batched: Mapping[str, tuple[list[str], str]],
        single: Mapping[str, list[str]],
        work: Path,
    ) -> None:
        self._work = work
        self._group_of = {key: seed for key, (_, seed) in batched.items()}
        self._drivers: dict[str, subprocess.Popen] = {}
        self._codes: dict[str, dict[str, int]] = {}
        for seed in sorted(set(self._group_of.values())):
            jobs = [[key, args] for key, (args, s) in batched.items() if s == seed]
            with (work / f"driver{seed}.log").open("w", encoding="utf-8") as log:
                self._drivers[seed] = subprocess.Popen(
                    [sys.executable, "-c", OURS_DRIVER, json.dumps(jobs), str(self._results(seed))],
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "PYTHONHASHSEED": seed},
                )
        self._pool = ThreadPoolExecutor(max_workers=1)
        self._single = {key: self._pool.submit(run_cli, *args) for key, args in single.items()}

    def _results(self, seed: str) -> Path:
        return self._work / f"driver{seed}.json"

    def result(self, key: str) -> subprocess.CompletedProcess:
        """A single run's exit code and output."""
        return self._single[key].result()

    def output(self, key: str, out: Path) -> Path:
        """`out` after a batched run that must have succeeded."""
        seed = self._group_of[key]
        if seed not in self._codes:
            try:
                self._drivers[seed].wait(timeout=OURS_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self._drivers[seed].kill()
            path = self._results(seed)
            self._codes[seed] = json.loads(path.read_text("utf-8")) if path.exists() else {}
        code = self._codes[seed].get(key)
        if code != 0:
            log = (self._work / f"driver{seed}.log").read_text("utf-8", errors="replace")
            start = log.find(f"=== {key}:")
            end = log.find("\n=== ", start + 1) if start >= 0 else -1
            section = log[max(start, 0) : end if end >= 0 else None]
            pytest.fail(f"mergesmith exited with {code} on {key}:\n{section[-4000:]}")
        return out

    def close(self) -> None:
        for driver in self._drivers.values():
            if driver.poll() is None:
                driver.kill()
                driver.wait()
        self._pool.shutdown(wait=True, cancel_futures=True)


@pytest.fixture(scope="module")
def ours_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("ours")


@pytest.fixture(scope="module")
def broken_recipe(toy_models: dict[str, str], ours_dir: Path) -> Path:
    """A union of $vbase and a copy of $vperm whose tokenizer.json is cut short."""
    broken = ours_dir / "vbroken"
    shutil.copytree(toy_models["vperm"], broken)
    (broken / "tokenizer.json").write_text('{"version": "1.0", "model": {"type": "BPE"', "utf-8")
    recipe = ours_dir / "broken.yml"
    recipe.write_text(
        f"""\
merge_method: linear
base_model: {toy_models["vbase"]}
models:
  - model: {toy_models["vbase"]}
    parameters: {{weight: 0.5}}
  - model: {broken}
    parameters: {{weight: 0.5}}
tokenizer_source: union
dtype: float32
""",
        encoding="utf-8",
    )
    return recipe


# Our runs a test reads besides its `case` (tests without `ours` read none).
EXTRA_RUNS: dict[str, tuple[str, ...]] = {
    "test_unloadable_tokenizer_is_an_error": ("broken",),
    "test_validate_reports_union_vocabulary": ("validate",),
    "test_union_order_does_not_depend_on_hash_seed": ("union_no_base", "union_no_base_seed2"),
}


def _wanted_runs(request: pytest.FixtureRequest) -> list[str]:
    """The runs of the tests this session will run from this module, in their order, so that
    `-k` stays quick and the first tests wait least."""
    wanted: list[str] = []
    for item in request.session.items:
        if getattr(item, "module", None) is not request.module:
            continue
        if "ours" not in getattr(item, "fixturenames", ()):
            continue
        callspec = getattr(item, "callspec", None)
        keys = [callspec.params["case"]] if callspec and "case" in callspec.params else []
        keys += EXTRA_RUNS.get(getattr(item, "originalname", ""), ())
        wanted += [key for key in keys if key not in wanted]
    return wanted


@pytest.fixture(scope="module")
def ours(
    request: pytest.FixtureRequest, recipes: dict[str, Path], broken_recipe: Path, ours_dir: Path
) -> Iterator[OursBatch]:
    """Our runs, keyed by case (output folder ours_dir/case); `union_no_base` runs under two
    hash seeds, `broken` merges broken_recipe, `validate` validates union_linear. Tests ask
    for `reference` before `ours`, so that mergekit starts first; tests of ours alone run
    without mergekit."""
    batched: dict[str, tuple[list[str], str]] = {}
    single: dict[str, list[str]] = {}
    for key in _wanted_runs(request):
        out = str(ours_dir / key)
        if key == "broken":
            single[key] = ["run", str(broken_recipe), out, *OURS_ARGS]
        elif key == "validate":
            single[key] = ["validate", str(recipes["union_linear"])]
        elif key in CRASHES:
            single[key] = ["run", str(recipes[key]), out, *OURS_ARGS]
        elif key.startswith("union_no_base"):
            seed = "2" if key.endswith("seed2") else "1"
            batched[key] = (["run", str(recipes["union_no_base"]), out, *OURS_ARGS], seed)
        else:
            batched[key] = (["run", str(recipes[key]), out, *OURS_ARGS], str(1 + len(batched) % 2))
    batch = OursBatch(batched, single, ours_dir)
    yield batch
    batch.close()


def run_cli(*args: str, env: Mapping[str, str] | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "mergesmith", *args],
        capture_output=True,
        text=True,
        timeout=OURS_TIMEOUT_S,
        check=False,
        env=None if env is None else {**os.environ, **env},
    )


# ---------------------------------------------------------------------------------------------
# Reading outputs


@cache
def _tokenizer(folder: str) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(folder)


def tokenizer_of(folder: Path) -> Any:
    """transformers' tokenizer for a folder, loaded once per folder and test session."""
    return _tokenizer(str(folder))


def config_vocab_size(folder: Path) -> int:
    return json.loads((folder / "config.json").read_text(encoding="utf-8"))["vocab_size"]


def own_rows(folder: Path) -> tuple[dict[str, int], dict[str, torch.Tensor]]:
    """A model's tokens that have embedding rows (id < config vocab_size, as mergekit reads
    them) and its embedding-like tensors."""
    rows = config_vocab_size(folder)
    vocab = {t: i for t, i in tokenizer_of(folder).get_vocab().items() if i < rows}
    tensors = load_folder(folder)
    return vocab, {name: tensors[name] for name in VOCAB_TENSORS}


def added_tokens(folder: Path) -> dict[str, bool]:
    """Added token -> special, as transformers reads them."""
    return {t.content: t.special for t in tokenizer_of(folder).added_tokens_decoder.values()}


def rendered(folder: Path) -> list[str] | None:
    """CONVERSATION through the folder's chat template, with and without a generation prompt."""
    tokenizer = tokenizer_of(folder)
    if tokenizer.chat_template is None:
        return None
    return [
        tokenizer.apply_chat_template(list(CONVERSATION[:n]), tokenize=False, **prompt)
        for n in (1, 2, 4)
        for prompt in ({"add_generation_prompt": True}, {"add_generation_prompt": False})
    ]


def fixture_vocabularies(toy_models: Mapping[str, str], *names: str) -> set[str]:
    """The distinct tokens `names` have embedding rows for."""
    return set().union(*(own_rows(Path(toy_models[n]))[0] for n in names))


# ---------------------------------------------------------------------------------------------
# The fixture


def test_fixture_vocabularies(toy_models: dict[str, str]) -> None:
    """The vocab models differ the way the cases need: shared tokens at other ids, tokens in
    one model only, more tokens than rows ($vwide) and more rows than tokens ($vpadded)."""
    vocab = {n: tokenizer_of(Path(p)).get_vocab() for n, p in toy_models.items()}
    rows = {n: config_vocab_size(Path(p)) for n, p in toy_models.items()}
    sizes = {"vbase": 96, "vsame": 96, "vchat": 100, "vperm": 111, "vpadded": 96, "vwide": 100}
    assert {n: len(v) for n, v in vocab.items()} == sizes
    assert rows == {**sizes, "vpadded": 100, "vwide": 98}
    assert vocab["vsame"] == vocab["vbase"] == vocab["vpadded"]
    shared = vocab["vbase"].keys() & vocab["vperm"].keys()
    assert len(shared) == 76
    assert sum(vocab["vbase"][t] != vocab["vperm"][t] for t in shared) == 64
    assert len(fixture_vocabularies(toy_models, "vbase", "vchat", "vperm")) == 134
    assert vocab["vchat"]["<|im_end|>"] != vocab["vperm"]["<|im_end|>"]
    assert "<|im_end|>" not in vocab["vbase"]
    for name, path in toy_models.items():
        tensors = load_folder(Path(path))
        assert all(tensors[t].shape == (rows[name], 32) for t in VOCAB_TENSORS), name
        assert all(t.dtype == torch.float32 for t in tensors.values()), name


# ---------------------------------------------------------------------------------------------
# The comparison


def assert_same_vocabulary(ours: Path, ref: Path, fixed: int | None) -> dict[str, int]:
    """Same token set with ids 0..n-1; all ids equal, or (`fixed` set: mergekit's order is
    free past it) the first `fixed` ids equal. Returns our vocabulary."""
    ours_vocab = dict(tokenizer_of(ours).get_vocab())
    ref_vocab = dict(tokenizer_of(ref).get_vocab())
    only_ref = sorted(ref_vocab.keys() - ours_vocab.keys())
    only_ours = sorted(ours_vocab.keys() - ref_vocab.keys())
    assert not only_ref and not only_ours, f"missing {only_ref[:8]}, unexpected {only_ours[:8]}"
    assert sorted(ours_vocab.values()) == list(range(len(ours_vocab))), "ids are not 0..n-1"
    limit = len(ref_vocab) if fixed is None else fixed
    moved = sorted(
        (t, ours_vocab[t], i) for t, i in ref_vocab.items() if i < limit and ours_vocab[t] != i
    )
    assert not moved, (
        f"{len(moved)} of the first {limit} ids differ (token, ours, ref): {moved[:8]}"
    )
    return ours_vocab


def reindexed_reference(
    ref: Mapping[str, torch.Tensor], ref_vocab: Mapping[str, int], ours_vocab: Mapping[str, int]
) -> dict[str, torch.Tensor]:
    """mergekit's tensors with embedding rows moved to our ids (padding rows stay)."""
    out = dict(ref)
    for name in VOCAB_TENSORS:
        index = torch.arange(ref[name].shape[0])
        for token, i in ours_vocab.items():
            index[i] = ref_vocab[token]
        out[name] = ref[name][index]
    return out


def assert_logits_finite(folder: Path) -> None:
    """transformers loads the model; one forward over every token id gives finite logits."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(folder), dtype=torch.float32)
    rows = model.get_input_embeddings().weight.shape[0]
    assert rows == config_vocab_size(folder)
    with torch.no_grad():
        logits = model(torch.arange(rows).unsqueeze(0)).logits
    assert logits.shape == (1, rows, rows)
    assert torch.isfinite(logits).all(), "non-finite logits"


def assert_outputs_match(ours: Path, ref: Path, fixed: int | None, named_template: bool) -> None:
    """Everything a user gets from the two folders agrees (see the module docstring)."""
    ours_vocab = assert_same_vocabulary(ours, ref, fixed)
    ours_tensors, ref_tensors = load_folder(ours), load_folder(ref)
    if fixed is not None:
        ref_vocab = dict(tokenizer_of(ref).get_vocab())
        ref_tensors = reindexed_reference(ref_tensors, ref_vocab, ours_vocab)
    assert_tensors_match(ours_tensors, ref_tensors)

    rows = ours_tensors["model.embed_tokens.weight"].shape[0]
    assert ours_tensors["lm_head.weight"].shape[0] == rows
    assert config_vocab_size(ours) == rows, "config.json vocab_size != embedding rows"
    assert config_vocab_size(ours) == config_vocab_size(ref)

    ours_tok, ref_tok = tokenizer_of(ours), tokenizer_of(ref)
    if fixed == 0:  # which tokenizer is extended is free: only the special ones must agree
        specials = [{t for t, s in added_tokens(f).items() if s} for f in (ours, ref)]
        assert specials[0] == specials[1]
    else:
        assert added_tokens(ours) == added_tokens(ref)
    for text in SAMPLES:
        if fixed is None:
            assert ours_tok.encode(text) == ref_tok.encode(text), text
        elif fixed:  # the same tokens; ids past `fixed` may differ
            assert ours_tok.convert_ids_to_tokens(ours_tok.encode(text)) == (
                ref_tok.convert_ids_to_tokens(ref_tok.encode(text))
            ), text
    if not named_template:
        assert ours_tok.chat_template == ref_tok.chat_template
    assert rendered(ours) == rendered(ref)
    assert_logits_finite(ours)


@pytest.mark.parametrize("case", COMPARED)
def test_matches_mergekit(
    case: str, reference: MergekitBatch, ours: OursBatch, ours_dir: Path, toy_models: dict[str, str]
) -> None:
    """Our merge of the case is mergekit's: tensors, vocabulary, tokenizer, template, config."""
    ref = reference.output(case)
    mine = ours.output(case, ours_dir / case)
    assert_outputs_match(mine, ref, ORDER_FREE.get(case), case in NAMED_TEMPLATE)
    assert_not_a_copy(load_folder(ref), [Path(p) for p in toy_models.values()])


# ---------------------------------------------------------------------------------------------
# mergekit's outputs, checked without our code

# case -> (tokens, embedding rows, config vocab_size) of mergekit's output. 134: the distinct
# tokens of $vbase, $vchat and $vperm (test_fixture_vocabularies); 131: of $vbase and $vperm.
REF_SIZES: dict[str, tuple[int, int, int]] = {
    "base_linear": (96, 96, 96),
    "base_stripped_ties": (98, 98, 98),  # <extra_1> and wider are stripped
    "base_padded_rows_chatml": (96, 96, 96),  # the 4 spare rows are dropped
    "union_linear": (134, 134, 134),
    "union_wide_ties_llama3": (98, 98, 98),  # $vwide's tokens past its rows are left out
    "tokens_union_pad64": (136, 192, 192),  # 134 + <|brand_new|> + <|zero_new|>
    "tokens_base_force_pad32": (96, 96, 96),  # already a multiple of 32
    "model_slerp_literal": (111, 111, 111),
    "model_outside_recipe": (100, 100, 100),
    "model_is_base_past_rows": (100, 100, 100),
    "chat_no_source": (96, 96, 96),
    "chat_auto_no_source": (96, 100, 100),  # the base's tokenizer, rows merged by id
    "align_union_pad64": (131, 192, 192),
}
# case -> tokens whose rows mergekit zeroes (no model has them), in both embedding tensors.
REF_ZERO_ROWS: dict[str, tuple[str, ...]] = {
    "model_is_base_past_rows": ("<extra_1>", "wider"),
    "model_outside_recipe": ("<|im_start|>", "<|im_end|>", "mergesmith", "vocabularies"),
    "tokens_union_pad64": ("<|zero_new|>",),
    "tokens_base_force_pad32": ("merge",),  # forced to zero for every model
}


@dataclass(frozen=True)
class BuiltIn:
    """A chat template mergekit ships (mergekit/_data/chat_templates/NAME.jinja)."""

    name: str

    def text(self, venv: Path) -> str:
        found = sorted(
            venv.glob(f"lib/python*/site-packages/mergekit/_data/chat_templates/{self.name}.jinja")
        )
        assert found, f"mergekit's {self.name}.jinja not found in {venv}"
        return found[0].read_text(encoding="utf-8")


# case -> the chat template transformers reads from mergekit's output.
REF_TEMPLATES: dict[str, str | BuiltIn] = {
    "base_linear": CHAT_TEMPLATE_BASE,  # the base's own, untouched
    "union_linear": CHAT_TEMPLATE_BASE,
    "model_ties": CHAT_TEMPLATE_TUNED,
    "base_padded_rows_chatml": BuiltIn("chatml"),
    "chat_no_source": BuiltIn("chatml"),
    "union_wide_ties_llama3": BuiltIn("llama3"),
    "union_task_arithmetic_auto": CHAT_TEMPLATE_TUNED.strip(),  # 2 of 3 inputs; stripped
    "chat_auto_no_source": CHAT_TEMPLATE_TUNED.strip(),
    "model_slerp_literal": LITERAL_TEMPLATE,
}


# After test_matches_mergekit, whose first test starts our runs beside mergekit's batch.
@pytest.mark.parametrize("case", sorted(REF_SIZES.keys() | REF_TEMPLATES.keys()))
def test_mergekit_output_is_as_documented(
    case: str, reference: MergekitBatch, mergekit_venv: Path
) -> None:
    """The cases test what they claim (sizes, stripping, padding, templates), checked on
    mergekit's output alone, so that a change of fixture cannot make a case vacuous."""
    out = reference.output(case)
    if case in REF_SIZES:
        rows = load_folder(out)["model.embed_tokens.weight"].shape[0]
        got = (len(tokenizer_of(out).get_vocab()), rows, config_vocab_size(out))
        assert got == REF_SIZES[case]
    if case in REF_TEMPLATES:
        expected = REF_TEMPLATES[case]
        text = expected.text(mergekit_venv) if isinstance(expected, BuiltIn) else expected
        assert tokenizer_of(out).chat_template == text
    vocab, tensors = tokenizer_of(out).get_vocab(), load_folder(out)
    for token in REF_ZERO_ROWS.get(case, ()):
        assert all(not tensors[n][vocab[token]].any() for n in VOCAB_TENSORS), token
    nonzero = [t for t in vocab if t not in REF_ZERO_ROWS.get(case, ())]
    assert all(tensors[n][[vocab[t] for t in nonzero]].abs().sum(1).all() for n in VOCAB_TENSORS)


# ---------------------------------------------------------------------------------------------
# Rows computed from the inputs


def aligned_tables(
    out_vocab: Mapping[str, int],
    rows: int,
    models: Sequence[Path],
    base: Path | None,
    name: str,
    sources: Mapping[str, torch.Tensor] | None = None,
) -> list[torch.Tensor]:
    """Each model's `name` table rebuilt over the output vocabulary, from the input files.

    A model's row for a token is its own row for that token string wherever it keeps it; a
    token it lacks gets the row `sources` gives, else the single owner's row, else the base's,
    else the mean of the owners' rows, else zero; padding rows are the mean of the model's
    rebuilt vocabulary rows (SEMANTICS.md 7; mergekit's tokenizer/embed.py).
    """
    owned = {folder: own_rows(folder) for folder in models}
    hidden = next(iter(owned.values()))[1][name].shape[1]
    tables = []
    for folder in models:
        table = torch.zeros((rows, hidden), dtype=torch.float64)
        for token, i in out_vocab.items():
            owners = [f for f in models if token in owned[f][0]]
            if folder in owners:
                source = [folder]
            elif sources is not None and token in sources:
                table[i] = sources[token].double()
                continue
            elif len(owners) == 1:
                source = owners
            elif base is not None and base in owners:
                source = [base]
            else:
                source = owners
            for f in source:
                table[i] += owned[f][1][name][owned[f][0][token]].double() / len(source)
        table[len(out_vocab) :] = table[: len(out_vocab)].mean(dim=0)
        tables.append(table)
    return tables


def expected_linear_rows(
    out_vocab: Mapping[str, int],
    rows: int,
    models: Sequence[tuple[Path, float]],
    base: Path | None,
    name: str,
    sources: Mapping[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """The merged `name` table of a linear merge under a tokenizer merge: the weighted mean of
    the models' aligned_tables."""
    folders = [folder for folder, _ in models]
    tables = aligned_tables(out_vocab, rows, folders, base, name, sources)
    total = sum(w for _, w in models)
    return sum(w / total * t for (_, w), t in zip(models, tables, strict=True))


def assert_rows_close(got: torch.Tensor, expected: torch.Tensor, what: str) -> None:
    assert got.shape == expected.shape, (what, got.shape, expected.shape)
    error = (got.double() - expected).abs().max().item()
    assert error <= 1e-5 * expected.abs().max().item(), f"{what}: max error {error:.3g}"


@pytest.mark.parametrize("case", ["align_union_pad64"])
def test_union_rows_are_merged_by_token_string(
    case: str, reference: MergekitBatch, ours: OursBatch, ours_dir: Path, toy_models: dict[str, str]
) -> None:
    """Linear 0.3/0.7 of $vbase and $vperm under a union padded to 64: every row of both
    outputs is the independent expectation, read through that output's own tokenizer (a
    shared token merges its rows wherever each model keeps it, a token one model has takes
    that model's row, padding rows merge each model's mean row)."""
    base, perm = Path(toy_models["vbase"]), Path(toy_models["vperm"])
    (base_vocab, base_rows), (perm_vocab, perm_rows) = own_rows(base), own_rows(perm)
    moved = sorted(
        t for t in base_vocab.keys() & perm_vocab.keys() if base_vocab[t] != perm_vocab[t]
    )
    assert len(moved) >= 50, "the fixture must put shared tokens at different ids"

    outputs = {"mergekit": reference.output(case), "mergesmith": ours.output(case, ours_dir / case)}
    for who, folder in outputs.items():
        vocab = dict(tokenizer_of(folder).get_vocab())
        assert set(vocab) == base_vocab.keys() | perm_vocab.keys(), who
        tensors = load_folder(folder)
        for name in VOCAB_TENSORS:
            assert tensors[name].shape[0] == 192, (who, name)
            models = [(base, 0.3), (perm, 0.7)]
            expected = expected_linear_rows(vocab, 192, models, base, name)
            assert_rows_close(tensors[name], expected, f"{who} {name}")
            # Spelled out: single owners' rows pass through; the padding row merges means.
            for token in perm_vocab.keys() - base_vocab.keys():
                row = perm_rows[name][perm_vocab[token]].double()
                assert_rows_close(tensors[name][vocab[token]], row, f"{who} {token!r}")
            for token in base_vocab.keys() - perm_vocab.keys():
                row = base_rows[name][base_vocab[token]].double()
                assert_rows_close(tensors[name][vocab[token]], row, f"{who} {token!r}")
            base_table, perm_table = aligned_tables(vocab, 131, [base, perm], base, name)
            pad = 0.3 * base_table.mean(0) + 0.7 * perm_table.mean(0)
            assert_rows_close(tensors[name][131:], pad.expand(61, -1), f"{who} padding")
            # The expectation is not what a merge by id would give, for any moved token.
            for token in moved:
                by_id = (
                    0.3 * base_rows[name][base_vocab[token]]
                    + 0.7 * (perm_rows[name][base_vocab[token]])
                )
                assert (by_id.double() - expected[vocab[token]]).abs().max() > 1e-3, token


@pytest.mark.parametrize("case", ["union_linear"])
def test_union_defaults_for_missing_tokens(
    case: str, reference: MergekitBatch, ours: OursBatch, ours_dir: Path, toy_models: dict[str, str]
) -> None:
    """Three models: a token only $vchat has takes its row everywhere, one only $vperm lacks
    takes the base's, <|im_end|> (in $vchat and $vperm, not the base) the mean of the two."""
    names = (("vbase", 0.2), ("vchat", 0.3), ("vperm", 0.5))
    models = [(Path(toy_models[n]), w) for n, w in names]
    outputs = {"mergekit": reference.output(case), "mergesmith": ours.output(case, ours_dir / case)}
    for who, folder in outputs.items():
        vocab = dict(tokenizer_of(folder).get_vocab())
        tensors = load_folder(folder)
        for name in VOCAB_TENSORS:
            expected = expected_linear_rows(vocab, len(vocab), models, models[0][0], name)
            assert_rows_close(tensors[name], expected, f"{who} {name}")


@pytest.mark.parametrize("case", ["tokens_union_pad64"])
def test_token_overrides_rows(
    case: str, reference: MergekitBatch, ours: OursBatch, ours_dir: Path, toy_models: dict[str, str]
) -> None:
    """Rows the `tokens:` entries decide, spelled out from the inputs (weights 0.2/0.3/0.5)."""
    base, chat, perm = (Path(toy_models[n]) for n in ("vbase", "vchat", "vperm"))
    (bv, bt), (cv, ct), (pv, pt) = own_rows(base), own_rows(chat), own_rows(perm)
    name = "model.embed_tokens.weight"
    b, c, p = bt[name], ct[name], pt[name]
    expected = {
        # only $vperm lacks it; source $vchat instead of the base
        "ocab": 0.2 * b[bv["ocab"]] + 0.3 * c[cv["ocab"]] + 0.5 * c[cv["ocab"]],
        # the base lacks it: the base's </s> row instead of the owners' mean
        "<|im_end|>": 0.2 * b[bv["</s>"]] + 0.3 * c[cv["<|im_end|>"]] + 0.5 * p[pv["<|im_end|>"]],
        "<|im_start|>": 0.2 * p[3] + 0.3 * c[cv["<|im_start|>"]] + 0.5 * p[3],
        "jaz": 0.5 * p[pv["jaz"]],
        "merge": p[pv["merge"]],  # forced: every model takes $vperm's row
        "the": 0.2 * b[bv["the"]] + 0.3 * c[cv["the"]] + 0.5 * p[pv["the"]],  # not forced
        "<|brand_new|>": c[cv["<|im_start|>"]],
        "<|zero_new|>": torch.zeros_like(b[0]),
    }
    outputs = {"mergekit": reference.output(case), "mergesmith": ours.output(case, ours_dir / case)}
    for who, folder in outputs.items():
        vocab = tokenizer_of(folder).get_vocab()
        got = load_folder(folder)[name]
        for token, row in expected.items():
            error = (got[vocab[token]] - row).abs().max().item()
            assert error <= 1e-6, f"{who}: row of {token!r} off by {error:.3g}"


@pytest.mark.parametrize("case", ["base_added_token"])
def test_token_added_to_base_vocabulary(
    case: str, reference: MergekitBatch, ours: OursBatch, ours_dir: Path, toy_models: dict[str, str]
) -> None:
    """`tokens:` names a token the base lacks under `source: base`: it is appended at the
    next id and every model takes its source's row. mergekit means this (it works under a
    union) but crashes, having added the token to the base's own vocabulary first; so the
    expectation is computed from the inputs."""
    result = reference.result(case)
    assert not result["ok"] and "KeyError: 96" in str(result["error"]), result["error"]
    base, chat = Path(toy_models["vbase"]), Path(toy_models["vchat"])
    base_vocab = tokenizer_of(base).get_vocab()
    out = ours.output(case, ours_dir / case)
    vocab = dict(tokenizer_of(out).get_vocab())
    assert vocab == {**base_vocab, "<|im_start|>": 96}
    assert config_vocab_size(out) == 97
    tensors = load_folder(out)
    chat_vocab, chat_rows = own_rows(chat)
    for name in VOCAB_TENSORS:
        start = {"<|im_start|>": chat_rows[name][chat_vocab["<|im_start|>"]]}
        expected = expected_linear_rows(vocab, 97, [(base, 0.5), (chat, 0.5)], base, name, start)
        assert_rows_close(tensors[name], expected, name)
    assert_logits_finite(out)


# ---------------------------------------------------------------------------------------------
# Errors and reports


def assert_user_error(done: subprocess.CompletedProcess, *names: str) -> list[str]:
    """Exit 2 with the CLI's user-error form (cli.py: an `error:` line per problem, each
    followed by an optional `  hint:` line; a count line first when there are several), every
    problem naming each of `names`; no traceback. Returns the problem lines."""
    assert done.returncode == 2, f"exit {done.returncode}:\n{done.stderr[-3000:]}"
    assert "Traceback" not in done.stderr, done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert all(line.startswith(("error: ", "  hint: ")) for line in lines), done.stderr
    problems = [
        line
        for line in lines
        if line.startswith("error: ") and not re.fullmatch(r"error: \d+ problems found:", line)
    ]
    assert problems, done.stderr
    for line in problems:
        for name in names:
            assert name in line, f"{name!r} not named in: {line}"
    return problems


@pytest.mark.parametrize("case", sorted(CRASHES))
def test_mergekit_crash_is_our_user_error(
    case: str, reference: MergekitBatch, ours: OursBatch, ours_dir: Path
) -> None:
    """Where mergekit dies with a traceback (sometimes after writing the model), we refuse the
    recipe before writing anything, with an error naming the model and the token."""
    fragment, names, any_of = CRASHES[case]
    result = reference.result(case)
    assert not result["ok"], f"mergekit accepted {case}"
    assert fragment in str(result["error"]), result["error"]

    for line in assert_user_error(ours.result(case), *names):
        assert not any_of or any(n in line for n in any_of), f"none of {any_of} in: {line}"
    assert not (ours_dir / case).exists(), "an output folder was created"


def test_unloadable_tokenizer_is_an_error(ours: OursBatch, ours_dir: Path) -> None:
    """A union needs every tokenizer; mergekit logs the failure and silently treats the model
    as having the base's vocabulary, which misplaces all its rows. We stop instead."""
    assert_user_error(ours.result("broken"), "vbroken")
    assert not (ours_dir / "broken").exists(), "an output folder was created"


def test_validate_reports_union_vocabulary(ours: OursBatch, toy_models: dict[str, str]) -> None:
    """`validate` on a union recipe tells the output vocabulary's size (from tokenizer files,
    no weights); the number is computed here from the three tokenizers."""
    size = len(fixture_vocabularies(toy_models, "vbase", "vchat", "vperm"))
    done = ours.result("validate")
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if "vocabulary" in line.lower()]
    assert lines, f"no line about the vocabulary:\n{done.stdout}"
    assert any(re.search(rf"\b{size}\b", line) for line in lines), lines


def test_union_order_does_not_depend_on_hash_seed(ours: OursBatch, ours_dir: Path) -> None:
    """Unlike mergekit's, our union's ids are the same in every process (DESIGN.md: no
    set-ordered iteration that changes results between runs)."""
    folders = [ours.output(k, ours_dir / k) for k in ("union_no_base", "union_no_base_seed2")]
    assert tokenizer_of(folders[0]).get_vocab() == tokenizer_of(folders[1]).get_vocab()
    first, second = (load_folder(f) for f in folders)
    assert all(torch.equal(first[n], second[n]) for n in first)
