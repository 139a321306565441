"""Turn a model reference (local folder or hub id) into a ModelSource."""

from __future__ import annotations

import json
import os
from pathlib import Path

from mergesmith.errors import MergeError
from mergesmith.sources.base import ModelSource

WEIGHT_LAYOUTS = (
    ("model.safetensors.index.json", "safetensors"),
    ("model.safetensors", "safetensors"),
    ("pytorch_model.bin.index.json", "pickle"),
    ("pytorch_model.bin", "pickle"),
)
# Small files worth fetching from a hub repository beside the weights.
SIDE_FILES = (
    "config.json",
    "generation_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "vocab.txt",
    "added_tokens.json",
    "chat_template.jinja",
)


def open_model(ref: str, path: str, revision: str | None = None) -> ModelSource:
    """Open a model from a local folder, or from the Hugging Face hub (cache first)."""
    folder = Path(path).expanduser()
    if folder.exists():
        if revision is not None:
            raise MergeError(
                f"model '{ref}': a local folder cannot have an @revision",
                "drop the @revision, or use a hub id",
            )
        return _open_folder(ref, folder)
    if _looks_like_hub_id(path):
        return _open_folder(ref, _fetch_from_hub(ref, path, revision))
    raise MergeError(
        f"model '{ref}': no such folder, and not a hub id (org/name)",
        "check the path; relative paths are taken from the current directory",
    )


def open_tokenizer_folder(ref: str, path: str, revision: str | None = None) -> Path:
    """A folder holding a model's tokenizer files, for a tokenizer source that is not merged:
    its weights are never opened (on the hub, never downloaded)."""
    folder = Path(path).expanduser()
    if folder.is_dir():
        return folder
    if _looks_like_hub_id(path):
        from huggingface_hub import hf_hub_download

        found = None
        for name in SIDE_FILES:
            try:
                found = Path(hf_hub_download(path, name, revision=revision)).parent
            except Exception:  # absent, or unreachable: the check below says which matters
                continue
        if found is None or not (found / "tokenizer_config.json").is_file():
            raise MergeError(
                f"tokenizer source '{ref}': no tokenizer found on the hub or in the local cache",
                "check the id and revision; offline, download the model first",
            )
        return found
    raise MergeError(
        f"tokenizer source '{ref}': no such folder, and not a hub id (org/name)",
        "name a model folder or hub id, 'base' or 'union'",
    )


def _looks_like_hub_id(path: str) -> bool:
    parts = path.split("/")
    return (
        1 <= len(parts) <= 2
        and all(parts)
        and not path.startswith((".", "~"))
        and all(c.isalnum() or c in "-_." for part in parts for c in part)
    )


def _open_folder(ref: str, folder: Path) -> ModelSource:
    from mergesmith.sources.pickle_file import PickleSource
    from mergesmith.sources.safetensors_file import SafetensorsSource

    if not folder.is_dir():
        raise MergeError(
            f"model '{ref}': {folder} is a file, not a model folder",
            f"point the recipe at the folder that holds it ({folder.parent})",
        )
    if not os.access(folder, os.R_OK | os.X_OK):
        raise MergeError(f"model '{ref}': folder {folder} is not readable", "check its permissions")
    for name, kind in WEIGHT_LAYOUTS:
        candidate = folder / name
        _refuse_broken_link(ref, candidate)
        if not candidate.is_file():
            continue
        files = _shards(ref, candidate) if name.endswith(".index.json") else [candidate]
        if kind == "safetensors":
            return SafetensorsSource(ref, folder, files)
        return PickleSource(ref, folder, files)
    raise MergeError(
        f"model '{ref}': {folder} holds no model.safetensors, sharded safetensors index, "
        "or pytorch_model.bin",
        "point the recipe at the folder that contains the weights",
    )


def _shards(ref: str, index_path: Path) -> list[Path]:
    try:
        index = json.loads(index_path.read_text(encoding="utf-8"))
        weight_map = index["weight_map"]
        names = list(dict.fromkeys(weight_map.values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as exc:
        raise MergeError(
            f"{index_path}: not a valid index file ({exc.__class__.__name__})",
            "it must be JSON with a 'weight_map' of tensor name -> shard file",
        ) from None
    files = []
    for name in names:
        shard = index_path.parent / name
        _refuse_broken_link(ref, shard)
        if not shard.is_file():
            raise MergeError(
                f"{index_path}: lists shard '{name}', which is missing from {index_path.parent}",
                "download the missing shard",
            )
        files.append(shard)
    return files


def _refuse_broken_link(ref: str, path: Path) -> None:
    """A weights file that is a link to nothing (a cleaned hub cache, say) is named as such."""
    if path.is_symlink() and not path.exists():
        raise MergeError(
            f"model '{ref}': {path} is a link to {path.readlink()}, which does not exist",
            "download the model again, or fix the link",
        )


def _fetch_from_hub(ref: str, repo_id: str, revision: str | None) -> Path:
    """Fetch only what a merge needs: side files, the index, and the shards it names."""
    try:
        from huggingface_hub import hf_hub_download
        from huggingface_hub.errors import EntryNotFoundError, LocalEntryNotFoundError
    except ImportError:  # pragma: no cover - huggingface_hub is a dependency
        raise MergeError(
            f"model '{ref}': huggingface_hub is not installed", "pip install huggingface_hub"
        ) from None

    def fetch(filename: str) -> Path | None:
        try:
            return Path(hf_hub_download(repo_id, filename, revision=revision))
        except (EntryNotFoundError, LocalEntryNotFoundError):
            return None
        except Exception as exc:  # the hub client raises many kinds; all mean "cannot fetch"
            raise MergeError(
                f"model '{ref}': cannot fetch {filename} from the hub ({exc.__class__.__name__}: "
                f"{str(exc).splitlines()[0][:160] if str(exc) else ''})",
                "check the repository id and your network, or set HF_HUB_OFFLINE=1 to use the "
                "local cache",
            ) from None

    folder: Path | None = None
    for name, _kind in WEIGHT_LAYOUTS:
        found = fetch(name)
        if found is None:
            continue
        folder = found.parent
        if name.endswith(".index.json"):
            index = json.loads(found.read_text(encoding="utf-8"))
            for shard in dict.fromkeys(index.get("weight_map", {}).values()):
                if fetch(shard) is None:
                    raise MergeError(
                        f"model '{ref}': index lists shard '{shard}' that the hub does not have",
                        "the repository is incomplete at this revision; try another revision",
                    )
        break
    if folder is None:
        raise MergeError(
            f"model '{ref}': no weights found on the hub or in the local cache",
            "check the id and revision; offline, download the model first",
        )
    for name in SIDE_FILES:
        fetch(name)
    return folder
