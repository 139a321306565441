"""Models given as checkpoint files (.safetensors, .bin, .pt, .pth, .ckpt) or as folders holding
one under any name, including training checkpoints that nest the weights in a dict: real files,
merged through the CLI or `merge`, checked against merges computed here by hand."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from mergesmith import merge
from mergesmith.api import prepare
from mergesmith.errors import MergeError, MergeErrors
from mergesmith.sources import open_model
from mergesmith.sources.safetensors_file import SafetensorsSource
from mergesmith.toymodels import ToyShape, base_tensors, finetune_tensors, llama_config
from tests.conftest import run_cli, write_recipe

Tensors = dict[str, torch.Tensor]
BASE = base_tensors(ToyShape(), 0)


def tuned(seed: int) -> Tensors:
    return finetune_tensors(BASE, seed)


def save(path: Path, obj: object, *, legacy: bool = False) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".safetensors":
        save_file(obj, path)  # type: ignore[arg-type]
    else:
        torch.save(obj, path, _use_new_zipfile_serialization=not legacy)
    return path


def linear_recipe(models: list[tuple[str | Path, float]]) -> str:
    body = "".join(f"  - model: {m}\n    parameters: {{weight: {w}}}\n" for m, w in models)
    return f"merge_method: linear\nmodels:\n{body}"


def by_hand(models: list[tuple[Tensors, float]]) -> Tensors:
    """mergekit's linear merge: the weighted sum divided by the sum of the weights."""
    total = sum(w for _, w in models)
    return {
        name: sum(t[name] * w for t, w in models) / total  # type: ignore[misc]
        for name in models[0][0]
    }


def assert_tensors(got: Tensors, expected: Tensors) -> None:
    assert sorted(got) == sorted(expected)
    for name, tensor in expected.items():
        torch.testing.assert_close(got[name], tensor, msg=name)


def problems(exc: MergeError) -> list[MergeError]:
    return exc.errors if isinstance(exc, MergeErrors) else [exc]


class RunsCode:
    """Unpickling this runs a shell command: what a malicious checkpoint does."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_checkpoint_files_of_every_kind_merge_through_the_cli(tmp_path: Path) -> None:
    config = llama_config(ToyShape(), torch.float32)
    weights = {"pt": 1.0, "pth": 2.0, "ckpt": 3.0, "bin": 1.5, "st": 0.5}
    tensors = {kind: tuned(i + 1) for i, kind in enumerate(weights)}
    models = tmp_path / "models"
    # A file, with the config.json of its model beside it (the first model's is the output's).
    pt = save(models / "pt" / "model.pt", tensors["pt"])
    (pt.parent / "config.json").write_text(json.dumps(config))
    # Folders holding one checkpoint under a name of their own.
    save(models / "pth" / "weights.pth", tensors["pth"])
    lightning = {
        "state_dict": tensors["ckpt"],
        "epoch": 3,
        "global_step": 30,
        "optimizer_states": [{"state": {}, "param_groups": [{"lr": 1e-3}]}],
        "pytorch-lightning_version": "2.4.0",
    }
    ckpt = save(models / "lightning" / "epoch=3-step=30.ckpt", lightning)
    # Files given directly: a legacy (non-zip) pickle and a safetensors file of any name.
    bin_file = save(models / "bin" / "my_weights.bin", tensors["bin"], legacy=True)
    st = save(models / "st" / "finetuned.safetensors", tensors["st"])
    refs = [pt, pt.parent.parent / "pth", ckpt.parent, bin_file, st]
    recipe = write_recipe(tmp_path, linear_recipe(list(zip(refs, weights.values(), strict=True))))
    out = tmp_path / "merged"

    result = run_cli("run", recipe, out)

    assert result.returncode == 0, result.stderr
    expected = by_hand([(tensors[k], w) for k, w in weights.items()])
    assert_tensors(load_file(out / "model.safetensors"), expected)
    notes = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert len(notes) == 1, result.stderr
    assert str(ckpt.relative_to(tmp_path)) in notes[0] or str(ckpt) in notes[0]
    assert "'state_dict'" in notes[0]
    written = json.loads((out / "config.json").read_text())
    assert written == {**config, "torch_dtype": "float32"}


def test_a_model_file_without_config_merges_and_the_output_has_none(tmp_path: Path) -> None:
    first, second = tuned(1), tuned(2)
    a = save(tmp_path / "a" / "a.pt", first)
    b = save(tmp_path / "b" / "b.safetensors", second)
    out = tmp_path / "merged"

    merge(linear_recipe([(a, 1.0), (b, 3.0)]), out)

    assert_tensors(load_file(out / "model.safetensors"), by_hand([(first, 1.0), (second, 3.0)]))
    assert not (out / "config.json").exists()
    assert (out / "README.md").is_file()


@pytest.mark.parametrize(
    "wrap, key",
    [
        (lambda sd: {"model": sd}, "model"),
        (lambda sd: {"module": sd}, "module"),
        (
            lambda sd: {
                "model_state_dict": sd,
                "optimizer_state_dict": {"state": {0: {"step": torch.tensor(3.0)}}},
                "epoch": 1,
            },
            "model_state_dict",
        ),
        (lambda sd: {"state_dict": {"model": sd}, "epoch": 2}, "state_dict.model"),
        # Non-tensor entries inside the chosen dict are not weights either.
        (lambda sd: {"state_dict": {**sd, "best_epoch": 4, "names": ["a"]}}, "state_dict"),
        # No known key, but only one entry holds tensors.
        (lambda sd: {"ema_weights": sd, "step": 7}, "ema_weights"),
    ],
    ids=["model", "module", "model_state_dict", "nested", "non_tensor_entries", "only_one"],
)
def test_nested_state_dicts_are_unwrapped_naming_the_key(
    tmp_path: Path, caplog: pytest.LogCaptureFixture, wrap, key: str
) -> None:
    sd = tuned(5)
    path = save(tmp_path / "ckpt" / "training.pt", wrap(sd))
    with caplog.at_level(logging.WARNING, logger="mergesmith"):
        merge(linear_recipe([(path, 1.0)]), tmp_path / "out")
    assert_tensors(load_file(tmp_path / "out" / "model.safetensors"), sd)
    notes = [r.getMessage() for r in caplog.records if str(path) in r.getMessage()]
    assert len(notes) == 1 and f"'{key}'" in notes[0], notes


def test_folders_and_files_that_cannot_be_a_model_are_each_one_clear_error(
    tmp_path: Path,
) -> None:
    models = tmp_path / "models"
    two = models / "two"
    save(two / "first.pt", tuned(1))
    save(two / "second.safetensors", tuned(2))
    empty = models / "empty"
    save(empty / "optimizer.pt", {"state": {}})
    (empty / "config.json").write_text("{}")
    gan = save(models / "gan.pt", {"generator": tuned(1), "discriminator": tuned(2)})
    marker = tmp_path / "pwned"
    evil = save(models / "evil.pth", {**tuned(3), "extra": RunsCode(marker)})
    not_weights = models / "notes.txt"
    not_weights.write_text("hello")
    missing = models / "nothere.pt"
    refs = [two, empty, gan, evil, not_weights, missing]
    recipe = write_recipe(tmp_path, linear_recipe([(r, 1.0) for r in refs]))

    result = run_cli("validate", recipe)

    assert result.returncode == 2 and "Traceback" not in result.stderr, result.stderr
    errors = [x for x in result.stderr.splitlines() if x.startswith("error: ") and "model" in x]
    hints = [x for x in result.stderr.splitlines() if x.startswith("  hint: ")]
    assert len(errors) == len(refs) == len(hints), result.stderr
    line = {ref: next(e for e in errors if str(ref) in e) for ref in refs}
    assert "several checkpoint files" in line[two]
    assert "first.pt" in line[two] and "second.safetensors" in line[two]
    assert "model.safetensors" in line[empty] and "*.ckpt" in line[empty]
    assert "optimizer.pt" in line[empty]
    assert "discriminator" in line[gan] and "generator" in line[gan]
    assert "refused" in line[evil] and not marker.exists()
    assert "not a checkpoint file" in line[not_weights]
    assert "no such file" in line[missing]
    assert f"e.g. {two / 'first.pt'}" in result.stderr


def test_shards_without_an_index_open_and_trainer_leftovers_are_ignored(
    tmp_path: Path,
) -> None:
    sd = tuned(4)
    names = sorted(sd)
    folder = tmp_path / "checkpoint-500"
    save(folder / "model-00001-of-00002.safetensors", {n: sd[n] for n in names[:20]})
    save(folder / "model-00002-of-00002.safetensors", {n: sd[n] for n in names[20:]})
    for leftover in ("optimizer.pt", "scheduler.pt", "rng_state.pth", "training_args.bin"):
        (folder / leftover).write_bytes(b"not read")  # unpickling any of these would fail
    source = open_model(str(folder), str(folder))
    assert len(source.files) == 2
    assert_tensors({n: source.read(n) for n in source.tensors}, sd)

    (folder / "model-00002-of-00002.safetensors").rename(folder / "model-00002-of-00003.x")
    save(folder / "model-00001-of-00003.safetensors", {n: sd[n] for n in names[:10]})
    save(folder / "model-00003-of-00003.safetensors", {n: sd[n] for n in names[10:20]})
    (folder / "model-00001-of-00002.safetensors").unlink()
    with pytest.raises(MergeError) as info:
        prepare(linear_recipe([(folder, 1.0)]))
    (problem,) = problems(info.value)
    assert str(folder) in problem.message
    assert "model-00002-of-00003.safetensors missing" in problem.message


def test_a_safetensors_file_is_mapped_and_takes_its_folders_config(tmp_path: Path) -> None:
    sd = tuned(6)
    path = save(tmp_path / "m" / "custom.safetensors", sd)
    (tmp_path / "m" / "config.json").write_text(json.dumps({"model_type": "llama"}))
    source = open_model("m", str(path))
    assert isinstance(source, SafetensorsSource)
    assert source.folder == path.parent and source.files == [path]
    assert source.config == {"model_type": "llama"}
    assert_tensors({n: source.read(n) for n in source.tensors}, sd)


def test_a_checkpoint_of_one_bare_tensor_is_not_a_model(tmp_path: Path) -> None:
    path = save(tmp_path / "t.pt", torch.zeros(3))
    with pytest.raises(MergeError) as info:
        prepare(linear_recipe([(path, 1.0)]))
    (problem,) = problems(info.value)
    assert str(path) in problem.message and "not a dict of tensors" in problem.message


def test_the_output_may_sit_beside_model_files_but_not_replace_their_folder(
    tmp_path: Path,
) -> None:
    """Checkpoints often share one folder: writing the merge into a new folder beside them is
    safe; writing over the folder that holds them would replace the inputs."""
    first, second = tuned(1), tuned(2)
    a = save(tmp_path / "ckpts" / "a.pt", first)
    b = save(tmp_path / "ckpts" / "b.pt", second)
    recipe = linear_recipe([(a, 1.0), (b, 1.0)])
    merge(recipe, tmp_path / "ckpts" / "merged")
    assert_tensors(
        load_file(tmp_path / "ckpts" / "merged" / "model.safetensors"),
        by_hand([(first, 1.0), (second, 1.0)]),
    )
    with pytest.raises(MergeError, match="overlaps input model"):
        merge(recipe, tmp_path / "ckpts", overwrite=True)
    assert a.is_file() and b.is_file()


def test_a_tensor_off_its_item_alignment_is_read_from_a_copy(tmp_path: Path) -> None:
    """A hand-made file whose data starts at an odd offset: both the torch read and the raw
    bytes the kernel route takes come from a copy, with the values written."""
    values = torch.tensor([1.5, -2.25, 3.0], dtype=torch.bfloat16)
    header = json.dumps(
        {"w": {"dtype": "BF16", "shape": [3], "data_offsets": [1, 7]}}, separators=(",", ":")
    ).encode()
    header += b" " * ((-len(header)) % 8)  # data starts on 8 bytes; the tensor one past it
    raw = values.view(torch.uint8).numpy().tobytes()
    path = tmp_path / "odd.safetensors"
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\0" + raw)
    source = SafetensorsSource("odd", tmp_path, [path])
    assert torch.equal(source.read("w"), values)
    buffer = source.buffer("w")
    assert isinstance(buffer, bytearray) and bytes(buffer) == raw
    source.close()
