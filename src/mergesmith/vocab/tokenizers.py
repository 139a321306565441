"""Loading a model's tokenizer, and cutting one down to the rows its embeddings have.

Only tokenizer files are read here (through `transformers`, which the output must load with
anyway), so everything about the output vocabulary is known before a weight is read.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mergesmith.errors import MergeError

Tokenizer = Any  # transformers.PreTrainedTokenizerBase; imported lazily (it takes seconds)


@contextmanager
def quiet_transformers() -> Iterator[None]:
    """transformers logs and warns freely while loading; our own messages say what matters."""
    import transformers

    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        transformers.logging.set_verbosity(verbosity)


def load_tokenizer(model: str, folder: Path) -> Tokenizer:
    """The model's tokenizer as transformers loads it (the fast one), or a MergeError."""
    import transformers

    try:
        with quiet_transformers():
            return transformers.AutoTokenizer.from_pretrained(str(folder), use_fast=True)
    except Exception as exc:  # any failure inside transformers means the same to the user
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise MergeError(
            f"model '{model}': its tokenizer in {folder} cannot be loaded "
            f"({exc.__class__.__name__}{': ' + reason[:200] if reason else ''})",
            "restore the tokenizer files (tokenizer.json, tokenizer_config.json) from the "
            "model's source, or take the tokenizer from another model",
        ) from None


def embedding_rows(config: dict[str, Any] | None, tokenizer: Tokenizer) -> int:
    """How many token ids the model has embedding rows for: its config's vocab_size, as mergekit
    reads it, else every id of its tokenizer."""
    for holder in (config or {}, (config or {}).get("text_config") or {}):
        value = holder.get("vocab_size")
        if isinstance(value, int) and not isinstance(value, bool) and value > 0:
            return value
    return len(tokenizer.get_vocab())


def strip_to_rows(model: str, tokenizer: Tokenizer, rows: int) -> Tokenizer:
    """The tokenizer without its tokens of id `rows` or more (tokens the model has no embedding
    row for, such as a tokenizer padded past the embeddings). Unchanged if there are none."""
    unused = {tok for tok, i in tokenizer.get_vocab().items() if i >= rows}
    if not unused:
        return tokenizer
    kind = _model_kind(tokenizer)
    if kind not in ("BPE", "WordLevel"):
        raise MergeError(
            f"model '{model}': its tokenizer has {len(unused)} token(s) past its {rows} "
            f"embedding rows, and a {kind} tokenizer cannot be cut down to them",
            "take the output tokenizer from another model (tokenizer_source), or fix the "
            "model's vocab_size in config.json",
        )
    from tokenizers import Tokenizer as BackendTokenizer

    data = json.loads(tokenizer._tokenizer.to_str())
    data["added_tokens"] = [t for t in data["added_tokens"] if t["id"] < rows]
    vocab = data["model"]["vocab"]
    for token in unused:
        vocab.pop(token, None)
    if kind == "BPE":
        data["model"]["merges"] = [
            m for m in data["model"]["merges"] if not unused.intersection(_merge_parts(m))
        ]
    tokenizer._tokenizer = BackendTokenizer.from_str(json.dumps(data))
    return tokenizer


def _model_kind(tokenizer: Tokenizer) -> str:
    backend = getattr(tokenizer, "_tokenizer", None)
    if backend is None:
        return "slow (no tokenizer.json)"
    return json.loads(backend.to_str())["model"]["type"]


def _merge_parts(merge: str | list[str]) -> list[str]:
    return merge.split(" ") if isinstance(merge, str) else list(merge)


def copy_tokenizer(tokenizer: Tokenizer, scratch: Path) -> Tokenizer:
    """An independent copy, made as a user would: saved and loaded again."""
    import transformers

    with quiet_transformers():
        tokenizer.save_pretrained(str(scratch))
        return transformers.AutoTokenizer.from_pretrained(str(scratch), use_fast=True)
