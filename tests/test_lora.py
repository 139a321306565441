"""`MODEL+ADAPTER`: PEFT LoRA adapters applied as tensors are read (sources/lora.py).

The values are checked here against the formulas computed independently in float64, and in
tests/conformance/test_conformance_lora.py against peft's own merge_and_unload() and mergekit.
Here too: references parse as mergekit parses them; the job sees the model's names, shapes and
dtypes, so the plan (and its memory figures) is the plain model's; every adapter that does not
fit the model, or asks for something we do not apply, is refused before any weight is read
(exit 2, one error line naming the adapter and what is wrong, a hint, nothing written); hub
adapters are fetched like models, only their two files.
"""

from __future__ import annotations

import json
import math
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergesmith import merge
from mergesmith.api import prepare
from mergesmith.config import ModelRef
from mergesmith.errors import MergeError
from mergesmith.sources import open_model
from mergesmith.sources.lora import apply_lora, plan_patches
from mergesmith.sources.lora_config import LoraSettings
from mergesmith.sources.pickle_file import PickleSource
from mergesmith.sources.safetensors_file import SafetensorsSource
from mergesmith.toymodels import ToyShape, make_family
from tests.conftest import run_cli, write_recipe
from tests.test_hub_offline import COMMIT, FakeHub, run_hub_cli

Family = tuple[Path, list[Path]]
PREFIX = "base_model.model."
Q = "model.layers.0.self_attn.q_proj"  # (32, 32) in the default toy shape
DOWN = "model.layers.1.mlp.down_proj"  # (32, 64)


def write_adapter(
    folder: Path, tensors: dict[str, torch.Tensor], config: dict[str, Any] | None = None
) -> Path:
    """A PEFT adapter folder: tensors under peft's key prefix, and adapter_config.json."""
    folder.mkdir(parents=True)
    save_file(
        {PREFIX + k: v.contiguous() for k, v in tensors.items()},
        folder / "adapter_model.safetensors",
    )
    settings = {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "bias": "none"}
    settings.update(config or {})
    (folder / "adapter_config.json").write_text(json.dumps(settings), encoding="utf-8")
    return folder


def lora_pair(module: str, rank: int, n_in: int, n_out: int, seed: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        f"{module}.lora_A.weight": 0.3 * torch.randn(rank, n_in, generator=g),
        f"{module}.lora_B.weight": 0.3 * torch.randn(n_out, rank, generator=g),
    }


def one_model(model: str) -> str:
    return f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 1}}\n"


# -- references ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("org/model", ("org/model", None, None, None)),
        ("org/model@v1", ("org/model", "v1", None, None)),
        ("org/model+org/adapter", ("org/model", None, "org/adapter", None)),
        ("org/model@rev+org/adapter@rev2", ("org/model", "rev", "org/adapter", "rev2")),
        ("./base+../lora", ("./base", None, "../lora", None)),
    ],
)
def test_references_parse_as_mergekit_reads_them(
    text: str, expected: tuple[str | None, ...]
) -> None:
    ref = ModelRef.parse(text)
    assert (ref.path, ref.revision, ref.adapter, ref.adapter_revision) == expected
    assert ref.text == str(ref) == text


def test_an_existing_folder_with_a_plus_in_its_name_is_a_model(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a+b").mkdir()
    monkeypatch.chdir(tmp_path)
    ref = ModelRef.parse("a+b")
    assert (ref.path, ref.adapter) == ("a+b", None)


@pytest.mark.parametrize("text", ["a+b+c", "org/model+", "+org/adapter"])
def test_a_malformed_adapter_reference_is_an_error_with_a_hint(text: str) -> None:
    with pytest.raises(MergeError) as info:
        ModelRef.parse(text)
    assert "MODEL+ADAPTER" in info.value.message and info.value.hint


# -- the arithmetic, against float64 formulas ----------------------------------------------------


def exact(
    weight: torch.Tensor,
    a: torch.Tensor,
    b: torch.Tensor,
    scale: float,
    transposed: bool = False,
    magnitude: torch.Tensor | None = None,
) -> torch.Tensor:
    """peft's merge in float64: W + s B A (its transpose for (in, out) weights), and with DoRA
    m / ||W + dW|| (W + dW), the norm over each output unit's inputs."""
    delta = (b.double() @ a.double()) * scale
    if transposed:
        delta = delta.T
    summed = weight.double() + delta
    if magnitude is None:
        return summed
    if transposed:
        return summed * (magnitude.double() / summed.norm(dim=0)).view(1, -1)
    return summed * (magnitude.double() / summed.norm(dim=1)).view(-1, 1)


@pytest.mark.parametrize("transposed", [False, True], ids=["out-in", "in-out"])
@pytest.mark.parametrize("dora", [False, True], ids=["lora", "dora"])
@pytest.mark.parametrize("rows", [48, 1500], ids=["one-block", "three-blocks"])
def test_the_merged_weight_is_peft_formula_in_float32(
    transposed: bool, dora: bool, rows: int
) -> None:
    """1500 rows of 2048 are three blocks of 512 rows: blocks change nothing."""
    g = torch.Generator().manual_seed(rows)
    cols, rank = 2048 if rows > 1000 else 24, 6
    n_out, n_in = (cols, rows) if transposed else (rows, cols)
    weight = 0.05 * torch.randn(rows, cols, generator=g)
    a = 0.3 * torch.randn(rank, n_in, generator=g)
    b = 0.3 * torch.randn(n_out, rank, generator=g)
    magnitude = 1 + 0.2 * torch.randn(n_out, generator=g) if dora else None
    got = apply_lora(weight, a, b, 1.5, transposed=transposed, magnitude=magnitude)
    expected = exact(weight, a, b, 1.5, transposed, magnitude)
    assert got.dtype == torch.float32 and got.shape == weight.shape
    assert (got.double() - expected).abs().max() <= 1e-6 * expected.abs().max()


def test_a_bf16_weight_gets_the_float32_sum_rounded_once() -> None:
    g = torch.Generator().manual_seed(0)
    weight = (0.05 * torch.randn(64, 40, generator=g)).to(torch.bfloat16)
    a, b = torch.randn(4, 40, generator=g), torch.randn(64, 4, generator=g)
    got = apply_lora(weight, a, b, 0.01)
    assert got.dtype == torch.bfloat16
    expected = exact(weight, a, b, 0.01)
    # Rounded once from the float32 sum: the bf16 value nearest the exact sum, but where the
    # float32 rounding lands on a bf16 tie (about one entry in 65536), never a whole step off.
    nearest = expected.to(torch.bfloat16)
    assert (got != nearest).float().mean() <= 1e-3
    assert ((got.double() - expected).abs() <= expected.abs() * 2**-8).all()


# -- the model with its adapter, as the plan sees it ---------------------------------------------


@pytest.fixture(scope="module")
def bf16_family(tmp_path_factory: pytest.TempPathFactory) -> Family:
    return make_family(tmp_path_factory.mktemp("bf16"), 1, ToyShape(), dtype=torch.bfloat16)


def test_the_adapted_model_has_the_models_names_shapes_and_dtypes(
    bf16_family: Family, tmp_path: Path
) -> None:
    base, _ = bf16_family
    adapter = write_adapter(tmp_path / "lora", lora_pair(Q, 4, 32, 32, 1))
    plain = open_model(str(base), str(base))
    adapted = open_model(f"{base}+{adapter}", str(base), None, str(adapter))
    assert adapted.tensors == plain.tensors
    assert adapted.config == plain.config
    assert adapted.folder == plain.folder
    assert (adapter / "adapter_model.safetensors") in adapted.files
    assert (adapter / "adapter_config.json") in adapted.files
    got = adapted.read(f"{Q}.weight")
    assert got.dtype == torch.bfloat16
    assert not torch.equal(got, plain.read(f"{Q}.weight"))
    assert torch.equal(adapted.read(f"{DOWN}.weight"), plain.read(f"{DOWN}.weight"))
    adapted.close()
    plain.close()


def test_the_plan_and_its_memory_figures_are_the_plain_models(
    bf16_family: Family, tmp_path: Path
) -> None:
    """The job reads the model's dtype, so its work_bytes are the plain model's; only the
    read differs."""
    base, tuned = bf16_family
    adapter = write_adapter(tmp_path / "lora", lora_pair(Q, 4, 32, 32, 1))

    def recipe(first: str) -> str:
        return (
            "merge_method: ties\nbase_model: " + str(base) + "\nmodels:\n"
            f"  - model: {first}\n    parameters: {{weight: 0.5, density: 0.5}}\n"
        )

    plain, _ = prepare(recipe(str(tuned[0])))
    adapted, _ = prepare(recipe(f"{tuned[0]}+{adapter}"))
    assert [(j.name, j.shape, j.dtype, j.work_bytes) for j in adapted.jobs] == [
        (j.name, j.shape, j.dtype, j.work_bytes) for j in plain.jobs
    ]


def test_a_merge_applies_the_adapter_to_that_model_only(family: Family, tmp_path: Path) -> None:
    """Linear of (fine-tune + adapter) and the base, against the same merge of a copy of the
    fine-tune with the formula's tensors written in."""
    base, tuned = family
    pair = lora_pair(Q, 4, 32, 32, 3) | lora_pair(DOWN, 2, 64, 32, 4)
    patterns = {"rank_pattern": {"down_proj": 2}, "alpha_pattern": {"down_proj": 3}}
    adapter = write_adapter(tmp_path / "lora", pair, patterns)
    weights = load_file(tuned[0] / "model.safetensors")
    for module, scale in ((Q, 8 / 4), (DOWN, 3 / 2)):
        a, b = pair[f"{module}.lora_A.weight"], pair[f"{module}.lora_B.weight"]
        weights[f"{module}.weight"] = exact(weights[f"{module}.weight"], a, b, scale).float()
    merged_by_hand = tmp_path / "by-hand"
    merged_by_hand.mkdir()
    save_file(weights, merged_by_hand / "model.safetensors")
    (merged_by_hand / "config.json").write_bytes((tuned[0] / "config.json").read_bytes())

    def recipe(model: str) -> str:
        return (
            f"merge_method: linear\nmodels:\n  - model: {model}\n    parameters: {{weight: 0.7}}\n"
            f"  - model: {base}\n    parameters: {{weight: 0.3}}\n"
        )

    merge(recipe(f"{tuned[0]}+{adapter}"), tmp_path / "ours")
    merge(recipe(str(merged_by_hand)), tmp_path / "expected")
    ours = load_file(tmp_path / "ours" / "model.safetensors")
    expected = load_file(tmp_path / "expected" / "model.safetensors")
    assert ours.keys() == expected.keys()
    for name, tensor in expected.items():
        assert (ours[name] - tensor).abs().max() <= 1e-6 * tensor.abs().max(), name


def test_task_arithmetic_of_the_base_alone_writes_the_base_with_its_adapter(
    family: Family, tmp_path: Path
) -> None:
    """Published recipe 033's form: `MODEL+LORA` as base and as the one source of a slice. No
    task vector: mergekit writes the base, adapter applied, and so do we, with a warning."""
    base, _ = family
    pair = lora_pair(Q, 4, 32, 32, 6)
    adapter = write_adapter(tmp_path / "lora", pair)
    text = f"""merge_method: task_arithmetic
base_model: {base}+{adapter}
slices:
  - sources:
      - model: {base}+{adapter}
        layer_range: [0, 4]
        parameters: {{weight: 1.0}}
dtype: float32
"""
    recipe = write_recipe(tmp_path, text)
    done = run_cli("run", recipe, tmp_path / "out")
    assert done.returncode == 0, done.stderr
    assert "task_arithmetic has no model besides the base" in done.stderr
    got = load_file(tmp_path / "out" / "model.safetensors")
    plain = load_file(base / "model.safetensors")
    a, b = pair[f"{Q}.lora_A.weight"], pair[f"{Q}.lora_B.weight"]
    expected = exact(plain[f"{Q}.weight"], a, b, 8 / 4)
    assert (got[f"{Q}.weight"].double() - expected).abs().max() <= 1e-6 * expected.abs().max()
    assert got.keys() == plain.keys()
    assert all(torch.equal(got[n], t) for n, t in plain.items() if n != f"{Q}.weight")


@pytest.mark.parametrize("fan_in_fan_out", [False, True])
def test_a_square_weights_orientation_comes_from_fan_in_fan_out(fan_in_fan_out: bool) -> None:
    """Non-square weights show their orientation by their shape; for a square one, the
    adapter's fan_in_fan_out (which peft sets from the layer type) decides."""
    from mergesmith.sources.base import TensorMeta

    model = {
        "h.0.c_proj.weight": TensorMeta("h.0.c_proj.weight", (16, 16), "F32", Path("m")),
        "h.0.c_attn.weight": TensorMeta("h.0.c_attn.weight", (16, 48), "F32", Path("m")),
    }
    adapter = {
        f"{PREFIX}h.0.{m}.lora_{p}.weight": TensorMeta("", shape, "F32", Path("a"))
        for m, shapes in (("c_proj", ((2, 16), (16, 2))), ("c_attn", ((2, 16), (48, 2))))
        for p, shape in zip("AB", shapes, strict=True)
    }
    settings = LoraSettings(r=2, alpha=4, fan_in_fan_out=fan_in_fan_out)
    patches = plan_patches("adapter", model, adapter, settings)
    assert patches["h.0.c_proj.weight"].transposed is fan_in_fan_out
    assert patches["h.0.c_attn.weight"].transposed is True  # (in, out): a Conv1D whatever it says


@pytest.mark.parametrize(
    ("settings", "module", "rank", "scale"),
    [
        (LoraSettings(r=8, alpha=16), Q, 8, 2.0),
        (LoraSettings(r=8, alpha=16, use_rslora=True), Q, 8, 16 / math.sqrt(8)),
        (LoraSettings(r=8, alpha=16, rank_pattern={"q_proj": 2}), Q, 2, 8.0),
        (LoraSettings(r=8, alpha=16, alpha_pattern={"q_proj": 4}), Q, 8, 0.5),
        # Keys are regexes matched at a dot boundary at the end of the name; first match wins.
        (
            LoraSettings(r=8, alpha=16, rank_pattern={"layers.1.mlp.*": 4, "down_proj": 2}),
            DOWN,
            4,
            4,
        ),
        (
            LoraSettings(r=8, alpha=16, rank_pattern={"^model.layers.0.self_attn.q_proj": 4}),
            Q,
            4,
            4,
        ),
        (LoraSettings(r=8, alpha=16, rank_pattern={"proj": 4}), Q, 8, 2.0),
    ],
)
def test_rank_and_scale_follow_peft_rules(
    settings: LoraSettings, module: str, rank: int, scale: float
) -> None:
    assert settings.rank(module) == rank
    assert settings.scale(module) == pytest.approx(scale, rel=1e-15)


# -- refusals, before any weight is read ---------------------------------------------------------


@pytest.fixture
def no_weight_reads(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(self: Any, name: str) -> torch.Tensor:
        raise AssertionError(f"tensor '{name}' was read before the adapter was checked")

    monkeypatch.setattr(SafetensorsSource, "read", refuse)
    monkeypatch.setattr(PickleSource, "read", refuse)


def _pair(module: str = Q, rank: int = 4, n_in: int = 32, n_out: int = 32) -> dict:
    return lora_pair(module, rank, n_in, n_out, 0)


# Each: how to make the bad adapter folder, the words its one error must hold, and a word of its
# hint.
BadAdapter = Callable[[Path], Path]
BAD_ADAPTERS: dict[str, tuple[BadAdapter, tuple[str, ...], str]] = {
    "shapes_do_not_fit": (
        lambda d: write_adapter(d, _pair(n_in=16)),
        (Q, "A [4, 16], B [32, 4]", "[32, 32]", "do not fit"),
        "model it was trained on",
    ),
    "module_not_in_model": (
        lambda d: write_adapter(d, _pair("model.layers.7.self_attn.q_proj")),
        ("model.layers.7.self_attn.q_proj", "matches no tensor"),
        "trained on",
    ),
    "missing_weights": (
        lambda d: write_adapter(d, _pair()).joinpath("adapter_model.safetensors").unlink() or d,
        ("no adapter weights", "adapter_model.safetensors"),
        "copy",
    ),
    "missing_config": (
        lambda d: write_adapter(d, _pair()).joinpath("adapter_config.json").unlink() or d,
        ("adapter_config.json", "not a PEFT adapter"),
        "save_pretrained",
    ),
    "no_such_folder": (lambda d: d / "not-there", ("no such folder",), "path"),
    "rank_differs_from_config": (
        lambda d: write_adapter(d, _pair(), {"r": 8}),
        (Q, "rank 4", "rank 8"),
        "rank_pattern",
    ),
    "dora_without_magnitude": (
        lambda d: write_adapter(d, _pair(), {"use_dora": True}),
        (Q, "use_dora", "lora_magnitude_vector"),
        "save it again",
    ),
    "resized_vocabulary": (
        lambda d: write_adapter(d, {"lm_head.weight": torch.zeros(64, 32)}),
        ("lm_head.weight", "[64, 32]", "[128, 32]"),
        "resized vocabulary",
    ),
    "lora_bias_tensor": (
        lambda d: write_adapter(d, _pair() | {f"{Q}.lora_B.bias": torch.zeros(32)}),
        (f"{Q}.lora_B.bias", "not one mergesmith knows"),
        "save_pretrained",
    ),
    "not_lora": (
        lambda d: write_adapter(d, _pair(), {"peft_type": "IA3"}),
        ("peft_type 'IA3'", "only LoRA"),
        "merge_and_unload",
    ),
    "bias_all": (
        lambda d: write_adapter(d, _pair(), {"bias": "all"}),
        ("bias = 'all'",),
        "merge_and_unload",
    ),
    "pissa": (
        lambda d: write_adapter(d, _pair(), {"init_lora_weights": "pissa_niter_4"}),
        ("init_lora_weights = 'pissa_niter_4'", "changed the base weights"),
        "path_initial_model_for_weight_conversion",
    ),
    "unknown_option_set": (
        lambda d: write_adapter(d, _pair(), {"merge_rule_of_the_future": "cubic"}),
        ("merge_rule_of_the_future", "does not know"),
        "merge_and_unload",
    ),
}
for _option, _value in {
    "layer_replication": [[0, 2], [1, 4]],
    "use_qalora": True,
    "lora_bias": True,
    "target_parameters": ["mlp.experts.gate_up_proj"],
    "trainable_token_indices": [1, 2],
    "alora_invocation_tokens": [5],
    "use_bdlora": {"nblocks": 2},
}.items():
    BAD_ADAPTERS[_option] = (
        lambda d, o=_option, v=_value: write_adapter(d, _pair(), {o: v}),
        (f"sets {_option} =", "does not apply"),
        "merge_and_unload",
    )


@pytest.mark.parametrize("case", list(BAD_ADAPTERS))
def test_an_adapter_that_cannot_be_applied_is_refused_before_any_read(
    case: str, family: Family, tmp_path: Path, no_weight_reads: None
) -> None:
    base, _ = family
    make, words, hint = BAD_ADAPTERS[case]
    adapter = make(tmp_path / "adapter")
    recipe = one_model(f"{base}+{adapter}")
    with pytest.raises(MergeError) as info:
        prepare(recipe)
    message = info.value.message
    assert f"adapter '{adapter}'" in message, message
    for word in words:
        assert word in message, (word, message)
    assert info.value.hint and hint in info.value.hint, info.value.hint
    assert "\n" not in message


@pytest.mark.parametrize(
    "case", ["shapes_do_not_fit", "module_not_in_model", "use_qalora", "no_such_folder"]
)
def test_the_cli_refuses_a_bad_adapter_with_one_error_and_writes_nothing(
    case: str, family: Family, tmp_path: Path
) -> None:
    base, _ = family
    make, words, _ = BAD_ADAPTERS[case]
    adapter = make(tmp_path / "adapter")
    body = one_model(f"{base}+{adapter}")
    out = tmp_path / "out"
    done = run_cli("run", write_recipe(tmp_path, body), out)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 2, done.stderr
    assert lines[0].startswith("error: ") and lines[1].startswith("  hint: "), done.stderr
    assert f"adapter '{adapter}'" in lines[0] and all(w in lines[0] for w in words), lines[0]
    assert not out.exists()
    assert not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_a_malformed_reference_is_refused_at_its_line(tmp_path: Path) -> None:
    body = "merge_method: linear\nmodels:\n  - model: a+b+c\n    parameters: {weight: 1}\n"
    done = run_cli("validate", write_recipe(tmp_path, body))
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "recipe.yml:3: model 'a+b+c': expected MODEL+ADAPTER" in done.stderr, done.stderr


# -- adapters on the hub -------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hub() -> Iterator[FakeHub]:
    server = FakeHub()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


def test_a_hub_adapter_is_fetched_like_a_model_and_then_used_from_the_cache(
    family: Family, hub: FakeHub, tmp_path: Path
) -> None:
    base, _ = family
    adapter = write_adapter(tmp_path / "lora", _pair() | lora_pair(DOWN, 4, 64, 32, 9))
    hub.add("acme/lora-base", base)
    hub.add("acme/tiny-lora", adapter, {"README.md": b"# lora", "adapter_model.bin": b"never"})
    hub.add("acme/just-a-model", base)

    home = tmp_path / "home"
    out = tmp_path / "hub-out"
    recipe = write_recipe(tmp_path, one_model("acme/lora-base+acme/tiny-lora@main"), "hub.yml")
    done, _ = run_hub_cli(home, "run", recipe, out, HF_ENDPOINT=hub.url)
    assert done.returncode == 0, done.stderr
    assert hub.fetched("acme/tiny-lora") == {"adapter_config.json", "adapter_model.safetensors"}
    local = tmp_path / "local-out"
    merge(one_model(f"{base}+{adapter}"), local)
    assert (out / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()

    # Offline, pinned to the commit: the cache alone answers.
    pinned = f"acme/lora-base@{COMMIT}+acme/tiny-lora@{COMMIT}"
    again = tmp_path / "offline-out"
    recipe = write_recipe(tmp_path, one_model(pinned), "pinned.yml")
    done, _ = run_hub_cli(home, "run", recipe, again, HF_HUB_OFFLINE="1")
    assert done.returncode == 0, done.stderr
    assert (again / "model.safetensors").read_bytes() == (local / "model.safetensors").read_bytes()

    # A model repository after '+' is not an adapter.
    recipe = write_recipe(tmp_path, one_model("acme/lora-base+acme/just-a-model"), "model.yml")
    done, _ = run_hub_cli(home, "validate", recipe, HF_ENDPOINT=hub.url)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert "adapter 'acme/just-a-model'" in done.stderr
    assert "has no adapter_config.json, so it is not a PEFT adapter" in done.stderr
