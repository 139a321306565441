"""The output vocabulary: its tokenizer, and where each model keeps each of its tokens.

As mergekit 0.1.5 builds it: the base's tokenizer (cut to the base's embedding rows), a
recipe model's tokenizer, or the union (the base's, then every token another model has that it
lacks, appended in model order and then id order: ordinary tokens first, then added tokens with
the settings of the first model that has them). Tokens named under `tokenizer.tokens` are
appended if missing. Tokens are matched by their string, never by id.

One difference: mergekit appends a union's new tokens in the order of a hash map that changes
from one process to the next; we append them by id, so the ids are the same on every run.
"""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from mergesmith.config import Recipe
from mergesmith.errors import MergeError
from mergesmith.sources.base import ModelSource
from mergesmith.vocab.spec import TokenizerSpec
from mergesmith.vocab.tokenizers import (
    Tokenizer,
    copy_tokenizer,
    embedding_rows,
    load_tokenizer,
    quiet_transformers,
    strip_to_rows,
)

MISSING = -1  # the model has no row for this output token


@dataclass
class OutputVocab:
    spec: TokenizerSpec
    tokenizer: Tokenizer
    tokens: dict[str, int]  # the output tokenizer's token -> id
    rows: int  # rows of the written embeddings: len(tokens), padded
    # model -> its row for each output id (MISSING where it lacks the token); a row at or past
    # the model's embedding rows is kept here and refused where a tensor would read it.
    row_of: dict[str, list[int]]
    model_rows: dict[str, int]  # model -> rows its config declares
    model_tokens: dict[str, dict[str, int]]  # model -> its own tokenizer's token -> id
    described: str = ""  # how the vocabulary was made, for `validate`
    warnings: list[str] = field(default_factory=list)

    @property
    def real_rows(self) -> int:
        """Rows that belong to a token; the rest, if any, are padding."""
        return len(self.tokens)

    def first_token_past(self, model: str, rows: int) -> tuple[str, int]:
        """The first output token (by output id) that `model` keeps at row `rows` or later."""
        by_id = sorted(self.tokens.items(), key=lambda item: item[1])
        for (token, _), row in zip(by_id, self.row_of[model], strict=True):
            rule = self.spec.tokens.get(token)
            if row >= rows and not (rule and rule.force):
                return token, row
        raise ValueError(f"'{model}' keeps no token at row {rows} or later")


def build_vocab(
    recipe: Recipe, sources: Mapping[str, ModelSource], target_folder: Path | None
) -> OutputVocab:
    """Build the output tokenizer and every model's row map from tokenizer files alone;
    `target_folder` holds the tokenizer of a model named as the source (merged or not)."""
    spec = recipe.tokenizer
    assert spec is not None
    refs = [ref.text for ref in recipe.referenced_models()]
    base = recipe.base_model.text if recipe.base_model else refs[0]
    target = spec.source_model
    warnings: list[str] = []
    tokenizers: dict[str, Tokenizer] = {}
    model_rows: dict[str, int] = {}
    for ref in [base, *[r for r in refs if r != base]]:
        tokenizer = load_tokenizer(ref, sources[ref].folder)
        model_rows[ref] = embedding_rows(sources[ref].config, tokenizer)
        if ref == base:
            tokenizer = strip_to_rows(ref, tokenizer, model_rows[ref])
        tokenizers[ref] = tokenizer
    with tempfile.TemporaryDirectory(prefix="mergesmith-tokenizer-") as scratch:
        if target is not None:
            # The model's own tokenizer, as it ships (mergekit does not cut this one).
            assert target_folder is not None
            out = load_tokenizer(target, target_folder)
            described = f"the tokenizer of '{target}'"
        elif spec.source == "base":
            out = copy_tokenizer(tokenizers[base], Path(scratch))
            described = f"the base's tokenizer ('{base}')"
        else:
            out = _union(base, tokenizers, model_rows, Path(scratch), warnings)
            described = f"the union of {len(tokenizers)} tokenizers"
        with quiet_transformers():
            for token in spec.tokens:
                if token not in out.get_vocab():
                    out.add_tokens(token)
        tokens = dict(out.get_vocab())
    if sorted(tokens.values()) != list(range(len(tokens))):
        raise MergeError(
            f"{spec.where}: the output tokenizer's ids are not 0..{len(tokens) - 1} without gaps",
            "take the tokenizer from a model whose tokenizer numbers its tokens contiguously",
        )
    rows = len(tokens)
    pad = spec.pad_to_multiple_of
    if pad and rows % pad:
        rows += pad - rows % pad
    model_tokens = {ref: dict(tok.get_vocab()) for ref, tok in tokenizers.items()}
    by_id = sorted(tokens, key=tokens.__getitem__)
    row_of = {ref: [model_tokens[ref].get(token, MISSING) for token in by_id] for ref in refs}
    return OutputVocab(
        spec, out, tokens, rows, row_of, model_rows, model_tokens, described, warnings
    )


def _union(
    base: str,
    tokenizers: Mapping[str, Tokenizer],
    model_rows: Mapping[str, int],
    scratch: Path,
    warnings: list[str],
) -> Tokenizer:
    """The base's tokenizer plus every token another model has a row for and the base lacks."""
    ordinary: dict[str, None] = {}  # insertion-ordered set
    added: dict[str, object] = {}  # content -> the AddedToken of the first model that has it
    warned: set[str] = set()
    for ref, tokenizer in tokenizers.items():
        rows = model_rows[ref]
        # By id: get_vocab() comes from a Rust hash map whose order changes from one process to
        # the next (mergekit iterates it as is, so its union's new ids change between runs).
        for token, i in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1]):
            if i < rows:
                ordinary.setdefault(token, None)
        for i, info in sorted(tokenizer.added_tokens_decoder.items(), key=lambda item: item[0]):
            if i >= rows:
                continue
            first = added.setdefault(info.content, info)
            if first is not info and first != info and info.content not in warned:
                warned.add(info.content)
                warnings.append(
                    f"token {info.content!r} is an added token with different settings in "
                    f"'{ref}' than in an earlier model; the first model's settings are kept"
                )
    out = copy_tokenizer(tokenizers[base], scratch)
    base_vocab = tokenizers[base].get_vocab()
    with quiet_transformers():
        for token in ordinary:
            if token not in added and token not in base_vocab:
                out.add_tokens(token)
        for info in added.values():
            out.add_tokens(info)
    return out
