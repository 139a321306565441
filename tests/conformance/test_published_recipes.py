"""Published mergekit recipes, run unchanged through mergekit 0.1.5 and through mergesmith.

tests/recipes/published/ holds 65 recipes copied verbatim from model cards and repositories
(its README.md lists where each comes from and what is odd about it). Each one is run by both
tools with local stand-ins for the hub models it names, and the outcomes are compared:

- both merge: the tensors must agree (relative 1e-5), like the rest of the conformance suite;
  random methods below density 1 (DARE, DELLA) draw different masks in the two tools, so
  there only names, shapes, dtypes and the layer count are compared, and both merges must
  differ from every input;
- both refuse: mergekit's error is the expected one, and ours is a clean exit 2 (no traceback);
- mergekit merges, we refuse on purpose: unknown keys are errors here (SEMANTICS.md 1), so the
  refusal must be a clean exit 2 naming the key;
- mergekit merges, we refuse for a missing feature: xfail(strict=True) naming the feature, an
  open issue; it turns into a failure (XPASS) when the feature lands and the tensors match;
- we merge, mergekit fails: a difference, stated in the case's reason.

Stand-ins. Every model reference (`base_model:`, every `model:` of models/slices/sources, and a
tokenizer source that names a model) becomes a placeholder, in text, so that the rest of the
file stays byte for byte as published (comments, odd keys, typos, indentation): the base model
becomes the base of a toy family, every other distinct reference its own fine-tune of it, a
`+ADAPTER` a small PEFT LoRA adapter for that base. Stage names of multi-document files
(`name:`) are not model references and stay. A family is a tiny float32 Llama (hidden size 8)
with as many layers as the recipe's deepest `layer_range` (up to 80), or 16 for `models:`
recipes; all the families together take a few MB. mergekit gets a LoRA merge cache
(`--lora-merge-cache`), without which it refuses every `+ADAPTER`.

Precision. The toy models are float32. Where a recipe asks for `dtype: bfloat16` or `float16`,
mergekit computes in that dtype while we compute in float32 and round once (SEMANTICS.md 1), so
the two cannot agree to 1e-5; only for such cases (`float32=True` below) is the `dtype:` line
rewritten to float32, and nothing else is touched. An `out_dtype:` stays as published: both
tools compute in `dtype` and round to it once when saving. Pure copies (passthrough) also round
once in both tools and keep their published dtype.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save_file

from mergesmith.toymodels import ToyShape, make_family
from tests.conformance.harness import (
    MERGEKIT_ARGS,
    OURS_TIMEOUT_S,
    MergekitBatch,
    assert_not_a_copy,
    assert_tensors_match,
    load_folder,
    num_layers,
)

pytestmark = pytest.mark.conformance

PUBLISHED = Path(__file__).resolve().parents[1] / "recipes" / "published"

# -- stand-ins: model references become placeholders, in text -----------------------------------

# One key per line in every published recipe: `model:`, `base_model:`, a tokenizer source given
# as `tokenizer_source:` or `source:` under `tokenizer:`. A value is quoted, or a plain scalar
# (these hold no spaces), followed by whatever the line had after it (spaces, a comment).
_REF_LINE = re.compile(
    r"^(?P<lead>[ \t]*(?:-[ \t]+)?(?P<key>base_model|model|tokenizer_source|source):[ \t]+)"
    r"(?P<value>\"[^\"\n]*\"|'[^'\n]*'|[^\s#'\"]\S*)(?P<tail>.*)$"
)
_STAGE_NAME = re.compile(r"^[ \t]*name:[ \t]*(\S+)", re.MULTILINE)
_LAYER_RANGE = re.compile(r"layer_range:\s*\[\s*(\d+)\s*,\s*(\d+)\s*\]")
# `model:` written before a tokenizer source: the pre-0.1 mergekit spelling, kept verbatim.
_MODEL_PREFIX = "model:"
_NOT_MODELS = {"union", "base"}


@dataclass(frozen=True)
class StandIns:
    """A recipe with its model references replaced by ${...} placeholders."""

    text: str
    family: str  # the toy family the placeholders name: "L16" for 16-layer models
    models: dict[str, str]  # placeholder -> the reference it replaces
    adapters: dict[str, str]


def substitute_models(text: str, family: str) -> StandIns:
    """Replace each model reference by a placeholder of `family`: the base model's by
    ${<family>_base}, the others by ${<family>_m1}, ${<family>_m2}, ... in order of first
    mention, adapters by ${<family>_lora1}, ...; a reference named twice gets one placeholder.
    Everything else, `$` included, stays as written."""
    stages = set(_STAGE_NAME.findall(text))
    models: dict[str, str] = {}
    adapters: dict[str, str] = {}
    for line in text.splitlines():
        found = _REF_LINE.match(line)
        if found and found["key"] == "base_model":
            models[_split(_unquote(found["value"]))[0]] = f"{family}_base"

    def placeholder(ref: str) -> str:
        model, revision, adapter = _split(ref)
        if model not in models:
            models[model] = f"{family}_m{len(set(models.values()) - {f'{family}_base'}) + 1}"
        out = "${" + models[model] + "}" + revision
        if adapter is not None:
            adapters.setdefault(adapter, f"{family}_lora{len(adapters) + 1}")
            out += "+${" + adapters[adapter] + "}"
        return out

    lines = []
    for line in text.splitlines(keepends=True):
        body = line.rstrip("\r\n")
        ending = line[len(body) :]
        found = _REF_LINE.match(body)
        value = _unquote(found["value"]) if found else ""
        prefix = ""
        tokenizer = found is not None and found["key"] in ("tokenizer_source", "source")
        if tokenizer and value.startswith(_MODEL_PREFIX):
            prefix, value = _MODEL_PREFIX, value[len(_MODEL_PREFIX) :]
        if not found or value in _NOT_MODELS or value in stages:
            lines.append(line.replace("$", "$$"))
            continue
        quote = found["value"][0] if found["value"][0] in "\"'" else ""
        lines.append(
            found["lead"].replace("$", "$$")
            + quote
            + prefix
            + placeholder(value)
            + quote
            + found["tail"].replace("$", "$$")
            + ending
        )
    return StandIns(
        "".join(lines),
        family,
        {p: ref for ref, p in models.items()},
        {p: ref for ref, p in adapters.items()},
    )


def _unquote(value: str) -> str:
    return value[1:-1] if value[:1] in "\"'" else value


def _split(ref: str) -> tuple[str, str, str | None]:
    """mergekit's reading of a reference: MODEL[@REVISION][+ADAPTER]."""
    model, _, adapter = ref.partition("+")
    model, at, revision = model.partition("@")
    return model, at + revision, adapter or None


_CLEAN_DTYPE = re.compile(
    r"^(?P<lead>[ \t]*dtype:[ \t]*)(?:bfloat16|float16)(?=[ \t]*(?:#.*)?$)", re.MULTILINE
)


def as_float32(text: str) -> str:
    """The recipe with a 16-bit `dtype:` (the compute dtype) set to float32, nothing else: an
    `out_dtype:` stays, since both tools round to it once at the end."""
    out, count = _CLEAN_DTYPE.subn(r"\g<lead>float32", text)
    assert count == 1, "expected one 16-bit dtype line to rewrite"
    return out


# -- the expected outcome of each recipe ---------------------------------------------------------

MATCH = "both merge; tensors match"
BOTH_FAIL = "both refuse"
BY_DESIGN = "mergekit merges; we refuse on purpose"
MISSING = "mergekit merges; we lack a feature (open issue)"
OURS_ONLY = "we merge; mergekit fails"


@dataclass(frozen=True)
class Expect:
    outcome: str
    why: str = ""
    ours_error: str = ""  # a part of our error message, for our refusals
    mergekit_error: str = ""  # a part of mergekit's traceback, where it fails
    float32: bool = False  # 16-bit dtypes rewritten to float32 (see the module docstring)
    random: bool = False  # DARE/DELLA below density 1: names, shapes and dtypes only


_F32 = "computed in bf16/fp16 by mergekit, float32 rounded once by us (SEMANTICS.md 1)"
_RANDOM = "random method below density 1: masks differ, compared by structure"

EXPECTED: dict[str, Expect] = {
    "001_mergekit-example-linear": Expect(MATCH, _F32, float32=True),
    "002_mergekit-example-gradient-slerp": Expect(MATCH, _F32, float32=True),
    "003_mergekit-example-ties": Expect(MATCH, _F32, float32=True),
    "004_mergekit-example-bio-merge": Expect(MATCH, _F32, float32=True),
    # Pure copies: the published float16 rounds once in both tools.
    "005_mergekit-example-orcamini-platy-44layer": Expect(MATCH),
    # Verbatim, mergekit's arcee_fusion writes float32 whatever `dtype` says and we write the
    # recipe's bfloat16 (SEMANTICS.md 5), besides the precision difference.
    "006_mergekit-example-arcee_fusion": Expect(MATCH, _F32, float32=True),
    # mergekit rejects the model listed twice before reading weights, and so do we.
    "007_megamoon-karcher-12b": Expect(
        BOTH_FAIL,
        "a model listed twice",
        ours_error="is listed twice",
        mergekit_error="ValueError: Duplicate merge inputs",
    ),
    # mergekit is not run on it here (MERGEKIT_NOT_RUN).
    "008_lunamaid-12b-karcher-modules": Expect(
        MATCH, "not compared: mergekit is not run on it (MERGEKIT_NOT_RUN)", float32=True
    ),
    # One stage of a pipeline: a single document with `name:` is a plain recipe.
    "009_lunamaid-12b-stage1-slerp": Expect(MATCH, _F32, float32=True),
    "010_kansensakura-symbiosis-multislerp": Expect(MATCH, _F32, float32=True),
    # mergekit silently ignores the top-level `pad_to_multiple_of` and `int8_mask` (they belong
    # under `tokenizer:` and `parameters:`).
    "011_sapphira-l33-70b-multislerp": Expect(
        BY_DESIGN,
        "top-level keys mergekit ignores are errors (SEMANTICS.md 1)",
        ours_error="unknown key 'pad_to_multiple_of'",
    ),
    # `base_model: MODEL+ADAPTER`: mergekit merges the adapter into a cached copy with peft,
    # we apply it as each tensor is read (SEMANTICS.md 8).
    "012_aurora-sce-12b": Expect(MATCH, _F32, float32=True),
    # mergekit ignores the misspelled `dype` and the top-level `select_topk` (so it runs SCE
    # with select_topk 1.0, not the 0.15 the author meant).
    "013_geneticlemonade-base6v2-sce": Expect(
        BY_DESIGN,
        "`dype:` typo and top-level `select_topk:` are errors (SEMANTICS.md 1)",
        ours_error="unknown key 'dype'",
    ),
    "014_geneticlemonade-final-sce": Expect(
        BY_DESIGN,
        "`dype:` typo and top-level `select_topk:` are errors (SEMANTICS.md 1)",
        ours_error="unknown key 'dype'",
    ),
    # dtype float32 with out_dtype bfloat16: both compute in float32, so kept verbatim.
    "015_strawberrylemonade-v12-nuslerp": Expect(MATCH),
    "016_weirdcompound-v17-nuslerp-malformed": Expect(
        BOTH_FAIL,
        "not YAML as published",
        ours_error="YAML syntax error: mapping values are not allowed here",
        mergekit_error="mapping values are not allowed here",
    ),
    "017_weirdcompound-v17-model-stock": Expect(MATCH, _F32, float32=True),
    # The tokenizer source names a model that is not merged: both read its tokenizer alone.
    "018_kansensakura-erosion-multislerp-indented": Expect(MATCH, _F32, float32=True),
    # mergekit accepts the dtype "bfloat16`" and fails when it first casts a tensor.
    "019_abyssal-seraph-stage2-nearswap-backtick": Expect(
        BOTH_FAIL,
        "dtype 'bfloat16`' (stray backtick)",
        ours_error="unknown dtype 'bfloat16`'",
        mergekit_error='Unimplemented dtype "bfloat16`"',
    ),
    "020_esotericsage-12b-nearswap-gradient": Expect(MATCH, _F32, float32=True),
    "021_velvet-orchid-12b-della-linear-modules": Expect(MATCH, _RANDOM, random=True),
    "022_angelslayer-12b-v3-della-linear-filters": Expect(MATCH, _RANDOM, random=True),
    "023_fiery-lynx-24b-della-linear": Expect(MATCH, _RANDOM, random=True),
    "024_eggs-and-bread-rp-pt1-dare-ties-gradients": Expect(MATCH, _RANDOM, random=True),
    "025_eggs-and-bread-rp-pt2-breadcrumbs-ties": Expect(MATCH, _F32, float32=True),
    "026_scrambled-eggs-on-toast-1-slerp": Expect(MATCH, _F32, float32=True),
    "027_eggs-and-bread-iq-pt2-breadcrumbs-ties": Expect(MATCH, _F32, float32=True),
    "028_ice0146-rp-breadcrumbs-windows-paths": Expect(MATCH, _F32, float32=True),
    "029_lunar-abyss-12b-della-filter-gradients": Expect(MATCH, _RANDOM, random=True),
    "030_wingless-moon-maiden-8b-della": Expect(MATCH, _RANDOM, random=True),
    # No density anywhere: DARE at its default density 1 drops nothing, so it is exact.
    "031_midnight-miqu-70b-v15-dare-linear": Expect(MATCH, _F32, float32=True),
    "032_wytchen-llmservice-taide-task-arithmetic": Expect(MATCH, _F32, float32=True),
    # `MODEL+ADAPTER` as base and as the one source of a task_arithmetic slice: no task vector,
    # so both write the base with its adapter applied (ours warns that the slice has no model
    # besides its base).
    "033_smarteaz-lorablate-task-arithmetic-slices": Expect(MATCH, _F32, float32=True),
    # mergekit ignores a top-level `normalize:` (model_stock reads no such parameter anyway).
    "034_smarteaz-v1-model-stock-toplevel-normalize": Expect(
        BY_DESIGN,
        "top-level `normalize:` is an error (SEMANTICS.md 1)",
        ours_error="unknown key 'normalize'",
    ),
    "035_kansensakura-zero-multimerge-nuslerp-passthrough": Expect(
        BOTH_FAIL,
        "not YAML as published (indented `---`)",
        ours_error="YAML syntax error: could not find expected ':'",
        mergekit_error="could not find expected ':'",
    ),
    "036_neuralpipe-9b-passthrough": Expect(MATCH),
    "037_neuralpipe-7b-ties": Expect(MATCH, _F32, float32=True),
    # mergekit 0.1.5 reads `model:NAME` as a hub repo id and fails; so do we, naming it.
    "038_theprofessor-155b-linear-slices": Expect(
        BOTH_FAIL,
        "`tokenizer_source: model:NAME` (pre-0.1 spelling) names no model",
        ours_error="tokenizer source 'model:",
        mergekit_error="Repo id must be in the form",
    ),
    "039_gemma-moon-2-9b-dare-ties": Expect(MATCH, _RANDOM, random=True),
    # `tol: 1e-5` is a string in YAML 1.1; both read it as the number.
    "040_karcher-default-quoted-paths-1e-5": Expect(MATCH, _F32, float32=True),
    "041_carvalho-pt-gl-dare-linear-rescale-false": Expect(MATCH, _F32, float32=True),
    # dtype float32 with out_dtype bfloat16: both compute in float32, so kept verbatim.
    "042_phoebe-sentimental-arcee-fusion-weights": Expect(MATCH),
    "043_mn-hekate-model-stock-filtered-weights": Expect(MATCH),
    # `smooth` and `allow_negative_weights` are read by no method: mergekit ignores them.
    "044_novaciano-rp-v3-sce-extra-params": Expect(
        BY_DESIGN,
        "parameters no method reads are errors (SEMANTICS.md 1)",
        ours_error="smooth",
    ),
    # mergekit ignores `revision:` on a source, so both slices read the same revision; the
    # author meant `dpo-v0` for the first (mergekit's spelling is `MODEL@dpo-v0`).
    "045_dpopenhermes-11b-passthrough-revision": Expect(
        BY_DESIGN,
        "`revision:` key on a source is an error (SEMANTICS.md 1)",
        ours_error="unknown key 'slices.0.sources.0.revision'",
    ),
    "046_absa-linear-layer-specific-slices": Expect(MATCH),
    "047_absa-slerp-gradual-shift-multiline-gradient": Expect(MATCH, _F32, float32=True),
    "048_absa-slerp-tokenizer-source-other-input": Expect(MATCH, _F32, float32=True),
    "049_absa-task-arithmetic-lambda-05": Expect(MATCH, _F32, float32=True),
    "050_absa-della-linear-epsilon-zero": Expect(MATCH, _RANDOM, random=True),
    "051_orca2-mythalion-passthrough-interleaved-local": Expect(MATCH),
    "052_orca2flat-task-arithmetic-base-in-models": Expect(MATCH, _F32, float32=True),
    "053_caplattess-yi-34b-dare-ties-local-paths": Expect(MATCH, _RANDOM, random=True),
    # A mergekit-evolve search config (no merge_method) given to mergekit-yaml, as published.
    "054_yuisekinai-mergekit-evolve-genome": Expect(
        BOTH_FAIL,
        "a mergekit-evolve config, not a mergekit-yaml recipe",
        ours_error="this is a mergekit-evolve configuration",
        mergekit_error="merge_method\n  Field required",
    ),
    "055_1parammyl-8b-model-stock-slices": Expect(MATCH, _F32, float32=True),
    "056_athena-apollo-model-stock-name-tokenizer-base": Expect(MATCH, _F32, float32=True),
    "057_huatuo-o1-model-stock-seven-loras": Expect(MATCH, _F32, float32=True),
    "058_absa-nearswap-base-among-models": Expect(MATCH, _F32, float32=True),
    "059_absa-arcee-fusion-base-among-models": Expect(MATCH, _F32, float32=True),
    "060_absa-nuslerp-no-base-commented-blocks": Expect(MATCH, _F32, float32=True),
    "061_absa-sce-two-models-topk-025": Expect(MATCH, _F32, float32=True),
    "062_shisa-llama33-70b-nuslerp-base-flatten-rowwise": Expect(MATCH, _F32, float32=True),
    "063_shisa-unphi4-model-stock-filter-wise-false": Expect(MATCH, _F32, float32=True),
    "064_abyssal-seraph-stage1-nearswap-name-tokenizer": Expect(MATCH, _F32, float32=True),
    "065_velvet-orchid-stage1-karcher-union-1e-10": Expect(MATCH, _F32, float32=True),
}

# Recipes this suite does not give to mergekit, and why.
MERGEKIT_NOT_RUN = {
    "008_lunamaid-12b-karcher-modules": (
        "at `max_iter: 9999, tol: 1e-9` mergekit's Karcher loop does not converge on these "
        "models (its tangent norm stays at rounding noise, above 1e-9), so it runs all 9999 "
        "iterations on most of the 363 tensors: 700 s for the published bfloat16 (run once by "
        "hand: it merges), 3-7 s a tensor (~25 min) in float32"
    ),
}

# Outside the tensors: the tokenizer files and chat template of outputs both tools write.
TOKENIZER_DIFFERENCES: dict[str, str] = {}

FILES = {path.stem: path for path in sorted(PUBLISHED.glob("*.yml"))}
# Models-form recipes get 16-layer models: enough for their gradients (up to 40 points) to land
# between points; slice recipes get as many layers as their deepest layer_range. mergekit costs
# ~25 ms per tensor here, so one 80-layer family for every recipe would take 4x as long.
DEFAULT_LAYERS = 16


def layers_needed(text: str) -> int:
    return max((int(end) for _, end in _LAYER_RANGE.findall(text)), default=DEFAULT_LAYERS)


def toy_shape(layers: int) -> ToyShape:
    return ToyShape(hidden=8, layers=layers, intermediate=16, vocab=128, heads=2, kv_heads=1)


STAND_INS = {}
for _case, _path in FILES.items():
    _text = _path.read_text(encoding="utf-8")
    STAND_INS[_case] = substitute_models(_text, f"L{layers_needed(_text)}")
RECIPES: dict[str, str] = {
    case: as_float32(s.text) if case in EXPECTED and EXPECTED[case].float32 else s.text
    for case, s in STAND_INS.items()
}


def family_sizes() -> dict[str, tuple[int, int]]:
    """Each toy family -> (fine-tunes, adapters) the recipes using it need."""
    sizes: dict[str, tuple[int, int]] = {}
    for s in STAND_INS.values():
        tuned = len(set(s.models) - {f"{s.family}_base"})
        old = sizes.get(s.family, (0, 0))
        sizes[s.family] = (max(old[0], tuned), max(old[1], len(s.adapters)))
    return sizes


LORA_RANK, LORA_ALPHA = 2, 4


def write_lora_adapter(folder: Path, base: Path, shape: ToyShape, seed: int) -> Path:
    """A PEFT LoRA adapter (q_proj and v_proj of every layer) for a toy family's base."""
    folder.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    head_dim = shape.hidden // shape.heads
    outs = {"q_proj": shape.hidden, "v_proj": shape.kv_heads * head_dim}
    tensors = {}
    for i in range(shape.layers):
        for module, out in outs.items():
            prefix = f"base_model.model.model.layers.{i}.self_attn.{module}"
            tensors[f"{prefix}.lora_A.weight"] = 0.3 * torch.randn(
                LORA_RANK, shape.hidden, generator=g
            )
            tensors[f"{prefix}.lora_B.weight"] = 0.3 * torch.randn(out, LORA_RANK, generator=g)
    save_file(tensors, folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": str(base),
        "r": LORA_RANK,
        "lora_alpha": LORA_ALPHA,
        "lora_dropout": 0.0,
        "target_modules": sorted(outs),
        "bias": "none",
        "fan_in_fan_out": False,
        "inference_mode": True,
    }
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2), encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def toy_models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Overrides conftest's: placeholder -> folder, for one family per layer count (a base,
    its fine-tunes, LoRA adapters for the base); about 3 MB in all."""
    root = tmp_path_factory.mktemp("published-toys")
    paths = {}
    for family, (n_tuned, n_adapters) in family_sizes().items():
        shape = toy_shape(int(family.removeprefix("L")))
        base, tuned = make_family(root / family, n_tuned, shape)
        paths[f"{family}_base"] = str(base)
        for i, folder in enumerate(tuned, start=1):
            paths[f"{family}_m{i}"] = str(folder)
        for i in range(1, n_adapters + 1):
            adapter = write_lora_adapter(root / family / f"lora{i}", base, shape, seed=i)
            paths[f"{family}_lora{i}"] = str(adapter)
    return paths


@pytest.fixture(scope="module")
def reference(
    request: pytest.FixtureRequest,
    mergekit_venv: Path,
    recipes: dict[str, Path],
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[MergekitBatch]:
    """Overrides conftest's to give mergekit a LoRA merge cache (it refuses `+ADAPTER` without
    one, and the recipes' authors ran it with one)."""
    wanted = {
        item.callspec.params["case"]
        for item in request.session.items
        if getattr(item, "module", None) is request.module
        and hasattr(item, "callspec")
        and "case" in item.callspec.params
    }
    selected = {
        case: path
        for case, path in recipes.items()
        if case in wanted and case not in MERGEKIT_NOT_RUN
    }
    work = tmp_path_factory.mktemp("mergekit-published")
    args = [*MERGEKIT_ARGS, "--lora-merge-cache", str(work / "lora-cache")]
    batch = MergekitBatch(mergekit_venv, selected, work, args=args)
    yield batch
    batch.close()


# -- running and checking ------------------------------------------------------------------------


@dataclass(frozen=True)
class OursRun:
    returncode: int
    stderr: str
    out: Path


@pytest.fixture(scope="module")
def ours(
    recipes: dict[str, Path], tmp_path_factory: pytest.TempPathFactory
) -> Callable[[str], OursRun]:
    """`mergesmith run` on a case's recipe, once per case for all the tests of this module."""
    work = tmp_path_factory.mktemp("mergesmith-published")
    runs: dict[str, OursRun] = {}

    def run(case: str) -> OursRun:
        if case not in runs:
            out = work / case
            command = ["mergesmith", "run", str(recipes[case]), str(out), "--seed", "0", "-q"]
            done = subprocess.run(
                [sys.executable, "-m", *command],
                capture_output=True,
                text=True,
                timeout=OURS_TIMEOUT_S,
                check=False,
            )
            runs[case] = OursRun(done.returncode, done.stderr, out)
        return runs[case]

    return run


_CLEAN_LINE = re.compile(r"^(error: |  hint: |warning: )")


def assert_clean_refusal(run: OursRun, expected: str) -> None:
    """Exit 2 with our one-line errors (each with its hint line), no traceback, and one of
    them the expected problem. pytest.fail, not assert: an xfail must not swallow these."""
    lines = [line for line in run.stderr.splitlines() if line.strip()]
    if run.returncode != 2 or "Traceback" in run.stderr:
        pytest.fail(f"mergesmith exited with {run.returncode}, not a clean 2:\n{run.stderr}")
    unclean = [line for line in lines if not _CLEAN_LINE.match(line)]
    if unclean or not any(line.startswith("error: ") for line in lines):
        pytest.fail(f"mergesmith's refusal is not one-line errors:\n{run.stderr}")
    if expected not in run.stderr:
        pytest.fail(f"mergesmith refused, but not with {expected!r}:\n{run.stderr}")


class MissingFeature(Exception):
    """mergesmith refused a recipe mergekit merges, for the expected missing feature."""


def _case(case: str) -> Any:
    expect = EXPECTED[case]
    if expect.outcome == MISSING:
        mark = pytest.mark.xfail(strict=True, raises=MissingFeature, reason=expect.why)
        return pytest.param(case, marks=mark)
    return case


def _is_copy_method(case: str) -> bool:
    return bool(re.search(r"^\s*merge_method:\s*passthrough\b", RECIPES[case], re.MULTILINE))


def assert_same_merge(
    case: str, ours_dir: Path, ref_dir: Path, toy_models: dict[str, str], random: bool
) -> None:
    mine, ref = load_folder(ours_dir), load_folder(ref_dir)
    assert num_layers(ours_dir) == num_layers(ref_dir)
    if random:
        assert mine.keys() == ref.keys()
        for name, tensor in ref.items():
            got = mine[name]
            assert (got.shape, got.dtype) == (tensor.shape, tensor.dtype), name
            assert torch.isfinite(got.float()).all(), name
    else:
        assert_tensors_match(mine, ref)
    if not _is_copy_method(case):
        inputs = [Path(toy_models[p]) for p in STAND_INS[case].models]
        assert_not_a_copy(mine, inputs)
        assert_not_a_copy(ref, inputs)


@pytest.mark.parametrize("case", [_case(case) for case in EXPECTED])
def test_published_recipe(
    case: str,
    ours: Callable[[str], OursRun],
    reference: MergekitBatch,
    toy_models: dict[str, str],
) -> None:
    """The recipe's outcome in both tools is the one EXPECTED names (see the module docstring)."""
    expect = EXPECTED[case]
    run = ours(case)
    if case in MERGEKIT_NOT_RUN:
        if expect.outcome == MISSING and run.returncode != 0:
            assert_clean_refusal(run, expect.ours_error)
            raise MissingFeature(run.stderr.strip())
        if run.returncode != 0:
            pytest.fail(f"mergesmith exited with {run.returncode}:\n{run.stderr}")
        assert load_folder(run.out), "no reference to compare with, and no tensors written"
        return
    theirs = reference.result(case)
    if expect.outcome in (BOTH_FAIL, OURS_ONLY):
        assert not theirs["ok"], f"mergekit 0.1.5 now merges '{case}'; reclassify it"
        assert expect.mergekit_error in str(theirs["error"]), theirs["error"]
    elif not theirs["ok"]:
        pytest.fail(f"mergekit 0.1.5 failed on '{case}':\n{theirs['error']}")

    if expect.outcome in (BOTH_FAIL, BY_DESIGN):
        assert_clean_refusal(run, expect.ours_error)
        return
    if expect.outcome == MISSING and run.returncode != 0:
        assert_clean_refusal(run, expect.ours_error)
        raise MissingFeature(run.stderr.strip())
    if run.returncode != 0:
        pytest.fail(f"mergesmith exited with {run.returncode}:\n{run.stderr}")
    if expect.outcome == OURS_ONLY:
        assert load_folder(run.out)
        return
    assert_same_merge(case, run.out, reference.out(case), toy_models, expect.random)


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "merge two models"},
    {"role": "assistant", "content": "done"},
    {"role": "user", "content": "again"},
]


def tokenizer_view(folder: Path) -> tuple[dict[str, int], str | None]:
    """The output tokenizer's vocabulary and how its chat template renders a conversation: our
    built-in templates are our own text, so they are compared by what they produce."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    rendered = None
    if tokenizer.chat_template:
        rendered = tokenizer.apply_chat_template(
            CONVERSATION, tokenize=False, add_generation_prompt=True
        )
    return tokenizer.get_vocab(), rendered


@pytest.mark.parametrize(
    "case",
    [
        pytest.param(
            case,
            marks=[pytest.mark.xfail(strict=True, raises=AssertionError, reason=why)]
            if (why := TOKENIZER_DIFFERENCES.get(case))
            else [],
        )
        for case, expect in EXPECTED.items()
        if expect.outcome in (MATCH, OURS_ONLY)
    ],
)
def test_published_recipe_tokenizer(
    case: str, ours: Callable[[str], OursRun], reference: MergekitBatch
) -> None:
    """Where we merge, the output has a tokenizer and chat template as mergekit's does; where
    mergekit fails but the recipe names a tokenizer source, we still write a tokenizer."""
    run = ours(case)
    if run.returncode != 0:
        pytest.fail(f"mergesmith exited with {run.returncode}:\n{run.stderr}")
    if case in MERGEKIT_NOT_RUN:
        assert tokenizer_view(run.out)[0], "no tokenizer written"
        return
    theirs = reference.result(case)
    if theirs["ok"]:
        assert tokenizer_view(run.out) == tokenizer_view(reference.out(case))
    else:
        assert tokenizer_view(run.out)[0], "the recipe names a tokenizer source; none written"


def test_every_published_recipe_is_classified() -> None:
    assert sorted(EXPECTED) == sorted(FILES)
