"""`MODEL+ADAPTER`: a PEFT LoRA adapter applied to a model's tensors as a job reads them.

The model with its adapter is a ModelSource like any other, with the base model's tensor names,
shapes and dtypes; what differs is its `read`. Everything the adapter does is worked out when it
is opened, from headers and adapter_config.json alone (which tensor each adapter tensor changes,
with which rank, scale and orientation), and every mismatch with the model is an error then,
before any weight is read. No merged copy is ever written: the delta of one tensor is computed
when its job reads it, in row blocks, so memory stays flat however large the model.

What a read returns is what peft's `merge_and_unload()` gives for that tensor:

- a LoRA module: W + scale * B @ A (transposed for `fan_in_fan_out` layers, i.e. GPT-2's
  Conv1D, and for embeddings, whose adapter is `lora_embedding_A/B`), scale = alpha / r, or
  alpha / sqrt(r) with rsLoRA, rank and alpha per module from `rank_pattern`/`alpha_pattern`;
- DoRA (`use_dora`): m / ||W + dW|| * (W + dW), the norm taken over each output unit's inputs
  (a row of a Linear weight, a column of a Conv1D weight or of an embedding);
- a whole tensor in the adapter file (`modules_to_save`, or the embedding peft saves beside an
  embedding LoRA) takes the model's tensor's place, before any LoRA delta is added to it.

The sum is formed in float32 and rounded once to the tensor's stored dtype: the job sees the
model's dtype, as it would reading the merged checkpoint peft would save, so the plan's memory
figures (made from the model's dtypes) stay true. peft rounds the delta to a 16-bit dtype before
adding it; in bfloat16 the two can differ by one unit in the last place, in float32 not at all.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mergesmith.dtypes import FLOATING, to_torch
from mergesmith.errors import MergeError
from mergesmith.sources.base import ModelSource, TensorMeta
from mergesmith.sources.lora_config import CONFIG_FILE, LoraSettings, read_settings

if TYPE_CHECKING:
    import torch

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")
# peft saves every key under the PeftModel's name for the wrapped model.
PEFT_PREFIX = "base_model.model."
# Float32 elements of W + dW formed at once: one 4 MB block beside the output tensor per job,
# whatever the size of the tensor (the plan's memory figures count the output tensor, in the
# model's dtype, as the input it is). Blocks change no result: each element is the same dot
# product either way.
BLOCK_ELEMENTS = 1 << 20

_LORA_KEY = re.compile(
    r"(?P<module>.+)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B"
    r"|lora_magnitude_vector)$"
)
_FIX_IT = "use the adapter with the model it was trained on"


@dataclass(frozen=True)
class TensorPatch:
    """What the adapter does to one tensor of the model (adapter tensor names, not data)."""

    replace: str | None = None  # a whole tensor taking the model's place
    lora_a: str | None = None
    lora_b: str | None = None
    scale: float = 1.0
    transposed: bool = False  # the tensor is stored (in, out): its delta is (B @ A).T
    magnitude: str | None = None  # DoRA's magnitude vector


class LoraSource(ModelSource):
    """A model with an adapter applied on read; names, shapes and dtypes are the model's."""

    def __init__(
        self,
        ref: str,
        base: ModelSource,
        adapter: ModelSource,
        patches: dict[str, TensorPatch],
        adapter_files: list[Path],
        owns_base: bool = True,
    ) -> None:
        super().__init__(ref, base.folder, base.tensors)
        self.base = base
        self.adapter = adapter
        self.patches = patches
        self._adapter_files = adapter_files
        self._owns_base = owns_base

    @property
    def config(self) -> dict[str, Any] | None:
        return self.base.config

    @property
    def files(self) -> list[Path]:
        """The model's weight files, the adapter's weights and its adapter_config.json: every
        file the tensors read depend on."""
        return sorted({*self.base.files, *self._adapter_files})

    def read(self, name: str) -> torch.Tensor:
        patch = self.patches.get(name)
        if patch is None:
            return self.base.read(name)
        dtype = to_torch(self.tensors[name].dtype)
        weight = self.adapter.read(patch.replace) if patch.replace else self.base.read(name)
        if patch.lora_a is None or patch.lora_b is None:
            return weight.to(dtype)  # a saved module: in the model's dtype, as peft loads it
        magnitude = self.adapter.read(patch.magnitude) if patch.magnitude else None
        return apply_lora(
            weight,
            self.adapter.read(patch.lora_a),
            self.adapter.read(patch.lora_b),
            patch.scale,
            transposed=patch.transposed,
            magnitude=magnitude,
            dtype=dtype,
        )

    def prefetch(self, name: str) -> None:
        # The tensor that `read` starts from; adapter matrices are small next to it.
        patch = self.patches.get(name)
        if patch is not None and patch.replace:
            self.adapter.prefetch(patch.replace)
        else:
            self.base.prefetch(name)

    def release(self, name: str) -> None:
        self.base.release(name)
        patch = self.patches.get(name)
        if patch is not None:
            for key in (patch.replace, patch.lora_a, patch.lora_b, patch.magnitude):
                if key is not None:
                    self.adapter.release(key)

    def close(self) -> None:
        if self._owns_base:
            self.base.close()
        self.adapter.close()


def apply_lora(
    weight: torch.Tensor,
    lora_a: torch.Tensor,
    lora_b: torch.Tensor,
    scale: float,
    *,
    transposed: bool = False,
    magnitude: torch.Tensor | None = None,
    dtype: torch.dtype | None = None,
) -> torch.Tensor:
    """peft's merged weight, in `dtype` (default: the weight's), formed in float32 a block of
    rows at a time.

    `weight` is (rows, cols) as stored; A is (r, in) and B (out, r). Stored (out, in), the
    delta is (B @ A) * scale; stored (in, out) (`transposed`), it is (B @ A).T * scale. With a
    DoRA `magnitude` (one value per output unit) the result is
    magnitude / ||W + delta|| * (W + delta), the norm over each unit's inputs: per row, or per
    column when transposed (then in a first pass over the blocks, a second forming the result).
    """
    import torch

    rows, cols = weight.shape
    out = torch.empty((rows, cols), dtype=dtype or weight.dtype)
    a, b = lora_a.float(), lora_b.float()
    step = max(1, BLOCK_ELEMENTS // max(cols, 1))

    def summed(start: int, end: int) -> torch.Tensor:
        # In place: one float32 block at a time beside the output (W + delta * scale, as peft
        # forms it; the in-place add upcasts a 16-bit W exactly).
        delta = (b @ a[:, start:end]).T if transposed else b[start:end] @ a
        return delta.mul_(scale).add_(weight[start:end])

    blocks = [(start, min(rows, start + step)) for start in range(0, rows, step)]
    if magnitude is None:
        for start, end in blocks:
            out[start:end] = summed(start, end)
        return out
    m = magnitude.float()
    if not transposed:
        for start, end in blocks:
            block = summed(start, end)
            norm = torch.linalg.norm(block, dim=1)
            out[start:end] = block.mul_((m[start:end] / norm).view(-1, 1))
        return out
    squares = torch.zeros(cols, dtype=torch.float64)
    for start, end in blocks:
        squares += summed(start, end).square_().sum(dim=0, dtype=torch.float64)
    factor = (m / squares.sqrt().float()).view(1, -1)
    for start, end in blocks:
        out[start:end] = summed(start, end).mul_(factor)
    return out


def open_adapter(
    ref: str,
    base: ModelSource,
    adapter: str,
    revision: str | None = None,
    *,
    owns_base: bool = True,
) -> LoraSource:
    """`base` with the adapter at `adapter` (a local folder or a hub id) applied on read.
    Every check is made here, from headers and the adapter's config: none reads a weight.
    Without `owns_base`, closing the result leaves `base` open (a pipeline stage's planned
    output, which later stages read too)."""
    shown = f"{adapter}@{revision}" if revision else adapter
    who = f"model '{ref}': adapter '{shown}'"
    folder = _adapter_folder(who, adapter, revision)
    settings = read_settings(who, folder)
    weights = next((folder / n for n in ADAPTER_WEIGHTS if (folder / n).is_file()), None)
    if weights is None:
        raise MergeError(
            f"{who}: {folder} has {CONFIG_FILE} but no adapter weights "
            f"({' or '.join(ADAPTER_WEIGHTS)})",
            "copy or download the adapter's weights file next to its adapter_config.json",
        )
    from mergesmith.sources.open import _source

    source = _source(who, folder, [weights], weights.suffix == ".safetensors")
    try:
        patches = plan_patches(who, base.tensors, source.tensors, settings)
    except BaseException:
        source.close()
        raise
    return LoraSource(ref, base, source, patches, [folder / CONFIG_FILE, weights], owns_base)


def _adapter_folder(who: str, adapter: str, revision: str | None) -> Path:
    target = Path(adapter).expanduser()
    if target.exists():
        if revision is not None:
            raise MergeError(
                f"{who}: a local adapter cannot have an @revision",
                "drop the @revision, or use a hub id",
            )
        if target.is_file():
            if target.name in (*ADAPTER_WEIGHTS, CONFIG_FILE):
                return target.parent
            raise MergeError(
                f"{who}: {target} is a file, not a PEFT adapter folder",
                "point the part after '+' at the folder holding adapter_config.json",
            )
        return target
    from mergesmith.sources.open import _looks_like_hub_id

    if _looks_like_hub_id(adapter):
        return fetch_adapter(who, adapter, revision)
    raise MergeError(
        f"{who}: no such folder, and not a hub id (org/name)",
        "check the path after '+'; relative paths are taken from the current directory",
    )


def fetch_adapter(who: str, repo_id: str, revision: str | None) -> Path:
    """The hub cache folder holding the adapter's config and weights (fetched like a model's
    files, through sources/hub.py's listing and downloads: only these two files)."""
    from mergesmith.sources import hub as hubs

    hub = hubs._import_hub(who)
    with hubs._quiet_hub_logs():
        if revision and hubs._COMMIT.fullmatch(revision):
            pinned = hubs._snapshot(hub, repo_id, revision)
            if pinned is not None and _has_adapter_files(pinned):
                return pinned  # a commit never changes: the cache has what the hub has
        names = hubs._listing(hub, who, repo_id, revision)
        if names is None:
            return hubs._cached_snapshot(hub, who, repo_id, revision, weights=False)
        at = f" at revision '{revision}'" if revision else ""
        if CONFIG_FILE not in names:
            raise MergeError(
                f"{who}: the hub repository {repo_id}{at} has no {CONFIG_FILE}, so it is not "
                "a PEFT adapter",
                "after '+' name a LoRA adapter repository; a whole model is merged as a model",
            )
        weights = next((n for n in ADAPTER_WEIGHTS if n in names), None)
        if weights is None:
            raise MergeError(
                f"{who}: the hub repository {repo_id}{at} has {CONFIG_FILE} but no "
                f"{' or '.join(ADAPTER_WEIGHTS)}",
                "try another revision of the adapter",
            )
        hubs._download(hub, who, repo_id, CONFIG_FILE, revision)
        return hubs._download(hub, who, repo_id, weights, revision).parent


def _has_adapter_files(folder: Path) -> bool:
    return (folder / CONFIG_FILE).is_file() and any((folder / n).is_file() for n in ADAPTER_WEIGHTS)


def plan_patches(
    who: str,
    model: dict[str, TensorMeta],
    adapter: dict[str, TensorMeta],
    settings: LoraSettings,
) -> dict[str, TensorPatch]:
    """Which model tensor each adapter tensor changes, and how; a MergeError for the first
    adapter tensor that does not fit the model (with a count of the others)."""
    modules: dict[str, dict[str, str]] = {}
    replaced: dict[str, str] = {}
    problems: list[MergeError] = []
    for key in sorted(adapter):
        name = key.removeprefix(PEFT_PREFIX)
        found = _LORA_KEY.fullmatch(name)
        if found:
            modules.setdefault(found["module"], {})[found["part"]] = key
            continue
        if any(part.startswith("lora_") for part in name.split(".")) or any(
            part in ("modules_to_save", "original_module") for part in name.split(".")
        ):
            raise MergeError(
                f"{who}: adapter tensor '{key}' is not one mergesmith knows how to apply",
                "LoRA weights (lora_A, lora_B, lora_embedding_A/B, lora_magnitude_vector) and "
                "whole module weights, as PEFT's save_pretrained() writes them, are applied",
            )
        target = name.replace(".base_layer.", ".")
        problem = _check_replacement(who, key, target, model, adapter)
        if problem:
            problems.append(problem)
        else:
            replaced[target] = key
    patches: dict[str, TensorPatch] = {
        name: TensorPatch(replace=key) for name, key in replaced.items()
    }
    for module, parts in sorted(modules.items()):
        try:
            patch = _lora_patch(who, module, parts, model, adapter, settings)
        except MergeError as exc:
            problems.append(exc)
            continue
        name = f"{module}.weight"
        patches[name] = TensorPatch(
            replace=replaced.get(name),
            lora_a=patch.lora_a,
            lora_b=patch.lora_b,
            scale=patch.scale,
            transposed=patch.transposed,
            magnitude=patch.magnitude,
        )
    if problems:
        more = f" (and {len(problems) - 1} more like it)" if len(problems) > 1 else ""
        raise MergeError(problems[0].message + more, problems[0].hint)
    if not patches:
        raise MergeError(f"{who}: the adapter holds no weights", "use a trained adapter")
    return patches


def _check_replacement(
    who: str,
    key: str,
    target: str,
    model: dict[str, TensorMeta],
    adapter: dict[str, TensorMeta],
) -> MergeError | None:
    meta = model.get(target)
    shape = adapter[key].shape
    if meta is None:
        return MergeError(
            f"{who}: adapter tensor '{key}' replaces '{target}', which the model does not have",
            _FIX_IT,
        )
    if meta.shape != shape:
        return MergeError(
            f"{who}: adapter tensor '{key}' is {list(shape)} but the model's '{target}' is "
            f"{list(meta.shape)}",
            f"{_FIX_IT} (a resized vocabulary is not supported: merge it with PEFT)",
        )
    return None


def _lora_patch(
    who: str,
    module: str,
    parts: dict[str, str],
    model: dict[str, TensorMeta],
    adapter: dict[str, TensorMeta],
    settings: LoraSettings,
) -> TensorPatch:
    """The patch for one LoRA module, after checking its shapes against the model's weight."""
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    a_key = parts.get("lora_embedding_A" if embedding else "lora_A.weight")
    b_key = parts.get("lora_embedding_B" if embedding else "lora_B.weight")
    where = f"{who}: module '{module}'"
    if a_key is None or b_key is None or (embedding and "lora_A.weight" in parts):
        raise MergeError(
            f"{where} has {', '.join(sorted(parts))} but not a matching A and B",
            "the adapter file is incomplete; save it again with PEFT",
        )
    magnitude = parts.get("lora_magnitude_vector")
    if settings.use_dora and magnitude is None:
        raise MergeError(
            f"{where}: use_dora is set but the module has no lora_magnitude_vector",
            "the adapter file is incomplete; save it again with PEFT",
        )
    if magnitude is not None and not settings.use_dora:
        raise MergeError(
            f"{where} has a DoRA lora_magnitude_vector but {CONFIG_FILE} does not set use_dora",
            "fix use_dora in adapter_config.json to match how the adapter was trained",
        )
    name = f"{module}.weight"
    meta = model.get(name)
    if meta is None:
        hint = _FIX_IT + (f" ({settings.base_model})" if settings.base_model else "")
        raise MergeError(f"{where} matches no tensor of the model (no '{name}')", hint)
    a_shape, b_shape = adapter[a_key].shape, adapter[b_key].shape
    shapes = f"A {list(a_shape)}, B {list(b_shape)}"
    if len(a_shape) != 2 or len(b_shape) != 2 or a_shape[0] != b_shape[1]:
        raise MergeError(
            f"{where}: {shapes} are not the two factors of a rank-r update",
            "the adapter file is damaged; save it again with PEFT",
        )
    if len(meta.shape) != 2 or meta.dtype not in FLOATING:
        raise MergeError(
            f"{where}: the model's '{name}' is {meta.dtype} {list(meta.shape)}; only 2-D "
            "float weights (Linear, Conv1D, Embedding) take a LoRA here",
            "merge the adapter with PEFT's merge_and_unload() and use the merged folder",
        )
    rank = settings.rank(module)
    if a_shape[0] != rank:
        raise MergeError(
            f"{where}: rank {a_shape[0]} ({shapes}) but {CONFIG_FILE} gives it rank {rank}",
            "fix r / rank_pattern in adapter_config.json to match the adapter's tensors",
        )
    if embedding:
        # lora_embedding_A is (r, vocab), lora_embedding_B (dim, r); the weight (vocab, dim).
        transposed = True
        fits = meta.shape == (a_shape[1], b_shape[0])
        outputs = b_shape[0]
    else:
        # lora_A is (r, in), lora_B (out, r); nn.Linear stores (out, in), Conv1D (in, out).
        straight, flipped = (b_shape[0], a_shape[1]), (a_shape[1], b_shape[0])
        fits = meta.shape in (straight, flipped)
        # peft takes the orientation from the layer's type; the shapes tell it, and for a square
        # weight the adapter's fan_in_fan_out (which peft sets from the layer type) does.
        transposed = meta.shape == flipped and (meta.shape != straight or settings.fan_in_fan_out)
        outputs = b_shape[0]
    if not fits:
        raise MergeError(
            f"{where}: {shapes} do not fit the model's '{name}' {list(meta.shape)}",
            _FIX_IT + (f" ({settings.base_model})" if settings.base_model else ""),
        )
    if magnitude is not None and adapter[magnitude].shape != (outputs,):
        raise MergeError(
            f"{where}: lora_magnitude_vector is {list(adapter[magnitude].shape)}, not "
            f"[{outputs}] (one value per output)",
            "the adapter file is damaged; save it again with PEFT",
        )
    return TensorPatch(
        lora_a=a_key,
        lora_b=b_key,
        scale=settings.scale(module),
        transposed=transposed,
        magnitude=magnitude,
    )
