"""Turn a model reference (a local folder, a checkpoint file, or a hub id) into a ModelSource."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mergesmith.errors import MergeError
from mergesmith.sources.base import ModelSource
from mergesmith.sources.files import (
    CHECKPOINT_SUFFIXES,
    LOOKED_FOR,
    choose_weights,
    is_checkpoint_name,
    is_index_name,
    is_safetensors_name,
)


def open_model(
    ref: str,
    path: str,
    revision: str | None = None,
    adapter: str | None = None,
    adapter_revision: str | None = None,
) -> ModelSource:
    """Open a model from a local folder or checkpoint file, or from the Hugging Face hub
    (cache first when offline); with `adapter`, that PEFT LoRA adapter is applied to its
    tensors as they are read (sources/lora.py).

    A model given as a file takes its config.json (and tokenizer files) from the folder it
    lies in, if that folder has them; otherwise it has no config, and the output none either.
    """
    source = _open_model(ref, path, revision)
    if adapter is None:
        return source
    from mergesmith.sources.lora import open_adapter

    try:
        return open_adapter(ref, source, adapter, adapter_revision)
    except BaseException:
        source.close()
        raise


def _open_model(ref: str, path: str, revision: str | None) -> ModelSource:
    target = Path(path).expanduser()
    if target.exists() or target.is_symlink():
        if revision is not None:
            raise MergeError(
                f"model '{ref}': a local path cannot have an @revision",
                "drop the @revision, or use a hub id",
            )
        return open_local(ref, target)
    if _looks_like_hub_id(path):
        from mergesmith.sources.hub import fetch_model

        return open_local(ref, fetch_model(ref, path, revision))
    if is_checkpoint_name(path):
        raise MergeError(
            f"model '{ref}': no such file",
            "check the path; relative paths are taken from the current directory",
        )
    raise MergeError(
        f"model '{ref}': no such folder or file, and not a hub id (org/name)",
        "check the path; relative paths are taken from the current directory",
    )


def open_tokenizer_folder(ref: str, path: str, revision: str | None = None) -> Path:
    """A folder holding a model's tokenizer files, for a tokenizer source that is not merged:
    its weights are never opened (on the hub, never downloaded)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if folder.is_file():
        return folder.parent
    if _looks_like_hub_id(path):
        from mergesmith.sources.hub import fetch_tokenizer

        return fetch_tokenizer(ref, path, revision)
    raise MergeError(
        f"tokenizer source '{ref}': no such folder, and not a hub id (org/name)",
        "name a model folder or hub id, 'base' or 'union'",
    )


def open_local(ref: str, target: Path) -> ModelSource:
    """Open a model folder, or one checkpoint file (its folder then stands for the model's)."""
    _refuse_broken_link(ref, target)
    if target.is_file():
        name = target.name
        if not (is_checkpoint_name(name) or is_index_name(name)):
            raise MergeError(
                f"model '{ref}': {target} is not a checkpoint file "
                f"({', '.join(CHECKPOINT_SUFFIXES)} or a sharded checkpoint's .index.json)",
                f"point the recipe at the weights file, or at the folder that holds the model "
                f"({target.parent})",
            )
        return _open_files(ref, target.parent, target)
    if not target.is_dir():
        raise MergeError(
            f"model '{ref}': {target} is neither a file nor a folder",
            "point the recipe at a model folder or checkpoint file",
        )
    folder = target
    if not os.access(folder, os.R_OK | os.X_OK):
        raise MergeError(f"model '{ref}': folder {folder} is not readable", "check its permissions")
    names = [p.name for p in folder.iterdir() if p.is_file() or p.is_symlink()]
    choice = choose_weights(names)
    if len(choice.picked) == 1:
        return _open_files(ref, folder, folder / choice.picked[0])
    if choice.picked:
        shards = [folder / name for name in choice.picked]
        for shard in shards:
            _refuse_broken_link(ref, shard)
        return _source(ref, folder, shards, is_safetensors_name(choice.picked[0]))
    if choice.missing:
        raise MergeError(
            f"model '{ref}': {folder} holds an incomplete set of shards and no index: "
            f"{', '.join(choice.missing)} missing",
            "download the missing shard(s)",
        )
    if choice.candidates:
        raise MergeError(
            f"model '{ref}': {folder} holds several checkpoint files that are not one sharded "
            f"set ({', '.join(choice.candidates)})",
            f"point the recipe at the one to merge, e.g. {folder / choice.candidates[0]}",
        )
    ignored = (
        f"; not a whole model, so ignored: {', '.join(choice.ignored)}" if choice.ignored else ""
    )
    adapter = any(name.startswith("adapter_model.") for name in choice.ignored)
    raise MergeError(
        f"model '{ref}': {folder} holds no weights (looked for {LOOKED_FOR}){ignored}",
        "this is a LoRA adapter: name it after its base model, as MODEL+ADAPTER"
        if adapter
        else "point the recipe at the folder or file that contains the weights",
    )


def _open_files(ref: str, folder: Path, file: Path) -> ModelSource:
    """Open one weights file, or the shards an index file names."""
    _refuse_broken_link(ref, file)
    if is_index_name(file.name):
        shards = _shards(ref, file)
        safetensors = all(is_safetensors_name(s.name) for s in shards)
        return _source(ref, folder, shards, safetensors)
    return _source(ref, folder, [file], is_safetensors_name(file.name))


def _source(ref: str, folder: Path, files: list[Path], safetensors: bool) -> ModelSource:
    from mergesmith.sources.pickle_file import PickleSource
    from mergesmith.sources.safetensors_file import SafetensorsSource

    if safetensors:
        return SafetensorsSource(ref, folder, files)
    return PickleSource(ref, folder, files)


def _looks_like_hub_id(path: str) -> bool:
    """org/name (or a bare name), as the hub spells ids; a checkpoint file name never is one."""
    parts = path.split("/")
    return (
        1 <= len(parts) <= 2
        and all(parts)
        and not path.startswith((".", "~"))
        and all(c.isalnum() or c in "-_." for part in parts for c in part)
        and not is_checkpoint_name(path)
    )


def _shards(ref: str, index_path: Path) -> list[Path]:
    files = []
    for name in shard_names(index_path):
        shard = index_path.parent / name
        _refuse_broken_link(ref, shard)
        if not shard.is_file():
            raise MergeError(
                f"{index_path}: lists shard '{name}', which is missing from {index_path.parent}",
                "download the missing shard",
            )
        files.append(shard)
    return files


def shard_names(index_path: Path) -> list[str]:
    """The shard files an index names, in order of first mention (for fetching them)."""
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        return [str(n) for n in dict.fromkeys(index["weight_map"].values())]
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MergeError(
            f"{index_path}: not a valid index file ({exc.__class__.__name__})",
            "it must be JSON with a 'weight_map' of tensor name -> shard file",
        ) from None


def _refuse_broken_link(ref: str, path: Path) -> None:
    """A weights file that is a link to nothing (a cleaned hub cache, say) is named as such."""
    if path.is_symlink() and not path.exists():
        raise MergeError(
            f"model '{ref}': {path} is a link to {path.readlink()}, which does not exist",
            "download the model again, or fix the link",
        )
