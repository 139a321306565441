"""Each model's embedding rows, re-indexed by token string to the output vocabulary.

For a group of models merged together (the `models:` list, or one slice's sources), a
`RowPlan` says, for every output token and every model, which of the model's rows it takes, or
which shared default row: decided from tokenizer files before any weight is read, applied to
each vocabulary tensor (`embed_tokens`, `lm_head`) as the job reads it.

The default rows are mergekit 0.1.5's: a token configured under `tokenizer.tokens` takes its
source's row; otherwise a token only one model has takes that model's row, one no model has is
zero, one the base has takes the base's row, and any other takes the mean of its owners' rows.
A model that has the token keeps its own row unless the token is `force`d. Padding rows (from
`pad_to_multiple_of`) are the mean of that model's aligned token rows.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from mergesmith.errors import MergeError
from mergesmith.vocab.build import MISSING, OutputVocab
from mergesmith.vocab.spec import ModelRow, TokenRule, ZeroRow


@dataclass(frozen=True)
class _Default:
    """A shared row: the mean of `(model index, row)` pairs (one pair: a copy), or zeros."""

    parts: tuple[tuple[int, int], ...]


class RowPlan:
    """Where each model's output rows come from, for one group of models (in job order)."""

    def __init__(
        self,
        models: tuple[str, ...],
        rows: int,
        real_rows: int,
        own: list[list[int]],
        defaults: list[_Default],
        default_of: dict[int, int],
        forced: set[int],
    ) -> None:
        self.models = models
        self.rows = rows
        self.real_rows = real_rows
        self.defaults = defaults
        # Per model: output ids that take its own rows (and which), and ids that take defaults.
        self.own_ids: list[torch.Tensor] = []
        self.own_rows: list[torch.Tensor] = []
        self.default_ids: list[torch.Tensor] = []
        self.default_slots: list[torch.Tensor] = []
        self.highest_row: list[int] = []  # the largest own row each model is read at
        for rows_of in own:
            mine = [(i, r) for i, r in enumerate(rows_of) if r != MISSING and i not in forced]
            others = sorted({i for i, r in enumerate(rows_of) if r == MISSING} | forced)
            self.own_ids.append(torch.tensor([i for i, _ in mine], dtype=torch.long))
            self.own_rows.append(torch.tensor([r for _, r in mine], dtype=torch.long))
            self.default_ids.append(torch.tensor(others, dtype=torch.long))
            self.default_slots.append(
                torch.tensor([default_of[i] for i in others], dtype=torch.long)
            )
            self.highest_row.append(max((r for _, r in mine), default=-1))

    def align(self, tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
        """The models' vocabulary tensors (in this plan's model order), each re-indexed to the
        output ids: `rows` rows, other dimensions unchanged, each in its own dtype."""
        defaults = self._default_rows(tensors)
        out = []
        for k, tensor in enumerate(tensors):
            aligned = tensor.new_empty((self.rows, *tensor.shape[1:]))
            aligned[self.own_ids[k]] = tensor.index_select(0, self.own_rows[k])
            if len(self.default_ids[k]):
                aligned[self.default_ids[k]] = defaults[self.default_slots[k]].to(tensor.dtype)
            if self.rows > self.real_rows:
                mean = aligned[: self.real_rows].to(torch.float32).mean(dim=0)
                aligned[self.real_rows :] = mean.to(tensor.dtype)
            out.append(aligned)
        return out

    def _default_rows(self, tensors: Sequence[torch.Tensor]) -> torch.Tensor:
        shape = tensors[0].shape[1:]
        rows = torch.zeros((len(self.defaults), *shape), dtype=torch.float32)
        for slot, default in enumerate(self.defaults):
            for model, row in default.parts:
                rows[slot] += tensors[model][row].to(torch.float32)
            if len(default.parts) > 1:
                rows[slot] /= len(default.parts)
        return rows

    def extra_bytes(self, row_numel: int, itemsize: int) -> int:
        """Memory the aligned copies hold beyond the inputs themselves."""
        return len(self.models) * self.rows * row_numel * itemsize + (
            len(self.defaults) * row_numel * 4
        )


def row_plan(
    vocab: OutputVocab, models: tuple[str, ...], base: str | None, warn: Callable[[str], None]
) -> RowPlan:
    """The row plan for `models` merged together; `base` counts only if it is among them."""
    order = sorted(vocab.tokens.items(), key=lambda item: item[1])
    rules = vocab.spec.tokens
    own = [vocab.row_of[m] for m in models]
    base_index = models.index(base) if base in models else None
    defaults: list[_Default] = []
    default_of: dict[int, int] = {}
    forced: set[int] = set()
    for i, (token, _) in enumerate(order):
        rule = rules.get(token)
        owners = [k for k in range(len(models)) if own[k][i] != MISSING]
        forced_here = rule is not None and rule.force
        if len(owners) == len(models) and not forced_here:
            continue  # every model has its own row: no default needed
        if forced_here:
            forced.add(i)
        if rule is not None and rule.source is not None:
            default = _configured(vocab, models, token, rule, i)
        elif len(owners) == 1:
            default = _Default(((owners[0], own[owners[0]][i]),))
        elif not owners:
            warn(f"token {token!r} is in no model's vocabulary; its rows are zero")
            default = _Default(())
        elif base_index is not None and base_index in owners:
            default = _Default(((base_index, own[base_index][i]),))
        else:
            default = _Default(tuple((k, own[k][i]) for k in owners))
        default_of[i] = len(defaults)
        defaults.append(default)
    return RowPlan(models, vocab.rows, vocab.real_rows, own, defaults, default_of, forced)


def _configured(
    vocab: OutputVocab, models: tuple[str, ...], token: str, rule: TokenRule, i: int
) -> _Default:
    source = rule.source
    if isinstance(source, ZeroRow):
        return _Default(())
    assert isinstance(source, ModelRow)
    if source.model not in models:
        raise MergeError(
            f"{rule.where}: token {token!r} takes its row from '{source.model}', which is not "
            "merged here",
            "name a model merged in this recipe (or in the slice holding the embeddings)",
        )
    k = models.index(source.model)
    if source.token is not None:
        row = vocab.model_tokens[source.model][source.token]
    elif source.token_id is not None:
        row = source.token_id
    else:
        row = vocab.row_of[source.model][i]
    return _Default(((k, row),))


def check_sources(vocab: OutputVocab) -> list[MergeError]:
    """Token sources that cannot be read, found from tokenizers alone: a model not in the
    recipe, a token its tokenizer lacks, an id past its rows."""
    problems = []
    for token, rule in vocab.spec.tokens.items():
        source = rule.source
        if not isinstance(source, ModelRow):
            continue
        if source.model not in vocab.row_of:
            problems.append(
                MergeError(
                    f"{rule.where}: token {token!r} takes its row from '{source.model}', which "
                    "is not a model of this recipe",
                    f"use one of: {', '.join(vocab.row_of)}",
                )
            )
            continue
        rows = vocab.model_rows[source.model]
        own = vocab.model_tokens[source.model]
        if source.token is not None and source.token not in own:
            problems.append(
                MergeError(
                    f"{rule.where}: model '{source.model}' has no token {source.token!r}",
                    "name a token of that model's tokenizer, or give token_id",
                )
            )
        elif source.token is not None and own[source.token] >= rows:
            problems.append(
                MergeError(
                    f"{rule.where}: token {source.token!r} of '{source.model}' has id "
                    f"{own[source.token]}, past its {rows} embedding rows",
                    "name a token the model has a row for",
                )
            )
        elif source.token_id is not None and source.token_id >= rows:
            problems.append(
                MergeError(
                    f"{rule.where}: token_id {source.token_id} is out of range for "
                    f"'{source.model}' (its embeddings have {rows} rows)",
                    f"use an id from 0 to {rows - 1}",
                )
            )
        elif source.token is None and source.token_id is None:
            row = vocab.row_of[source.model][vocab.tokens[token]]
            if row == MISSING or row >= rows:
                problems.append(
                    MergeError(
                        f"{rule.where}: token {token!r} takes its row from "
                        f"'{source.model}', which has no row for it",
                        "take the row of another model, or of one of its tokens "
                        "({kind: model_token, model: NAME, token: TEXT})",
                    )
                )
    return problems
