"""The recipe's tokenizer settings as data: `tokenizer_source` or a `tokenizer:` block.

Both keys of mergekit 0.1.5 become one `TokenizerSpec`: which tokenizer the output gets
(`base`, `union`, or a model's), what rows chosen tokens take, and whether the vocabulary is
padded. Model names stay as the recipe wrote them; the plan checks that they are recipe models.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from mergesmith.errors import MergeError

Where = Callable[[tuple[str | int, ...]], str]


@dataclass(frozen=True)
class ZeroRow:
    """`{kind: zero}`: the token's row is all zeros."""


@dataclass(frozen=True)
class ModelRow:
    """A row of one model: the token's own row there (neither field set), the row of another of
    its tokens (`token`), or the row at an id of its tokenizer (`token_id`)."""

    model: str
    token: str | None = None
    token_id: int | None = None


@dataclass(frozen=True)
class TokenRule:
    """`tokenizer.tokens.<token>`: where the token's row comes from when a model lacks it (or,
    with `force`, for every model)."""

    source: ModelRow | ZeroRow | None
    force: bool
    where: str


@dataclass(frozen=True)
class TokenizerSpec:
    source: str  # "base", "union", or a model as the recipe names it
    tokens: Mapping[str, TokenRule]
    pad_to_multiple_of: int | None
    where: str

    @property
    def source_model(self) -> str | None:
        return None if self.source in ("base", "union") else self.source


def tokenizer_spec(
    tokenizer_source: str | None, block: Mapping[str, Any] | None, where: Where
) -> tuple[TokenizerSpec | None, list[MergeError]]:
    """The spec from the recipe's keys (already checked for unknown keys), and its problems."""
    if tokenizer_source is not None and block is not None:
        return None, [
            MergeError(
                f"{where(('tokenizer',))}: the recipe sets both 'tokenizer_source' and "
                "'tokenizer:'",
                "keep one: 'tokenizer: {source: ...}' holds what tokenizer_source says",
            )
        ]
    if tokenizer_source is not None:
        return TokenizerSpec(tokenizer_source, {}, None, where(("tokenizer_source",))), []
    if block is None:
        return None, []
    problems: list[MergeError] = []
    pad = block.get("pad_to_multiple_of")
    if pad is not None and pad < 1:
        problems.append(
            MergeError(
                f"{where(('tokenizer', 'pad_to_multiple_of'))}: pad_to_multiple_of must be a "
                f"positive number of rows, got {pad}",
                "use a multiple such as 64, or leave it out",
            )
        )
    rules = {}
    for token, entry in (block.get("tokens") or {}).items():
        path = ("tokenizer", "tokens", token)
        try:
            source = _row_source(entry.get("source"), where((*path, "source")))
        except MergeError as exc:
            problems.append(exc)
            continue
        force = bool(entry.get("force", False))
        if force and source is None:
            problems.append(
                MergeError(
                    f"{where(path)}: token {token!r} has 'force: true' but no source",
                    "give it a source (a model, {kind: model_token, ...} or {kind: zero}) "
                    "to use for every model",
                )
            )
        rules[token] = TokenRule(source, force, where(path))
    spec = TokenizerSpec(block.get("source", "union"), rules, pad, where(("tokenizer",)))
    return spec, problems


def _row_source(value: Any, where: str) -> ModelRow | ZeroRow | None:
    if value is None:
        return None
    if isinstance(value, str):
        return ModelRow(value)
    if not isinstance(value, dict):
        raise MergeError(
            f"{where}: a token's source must be a model or a mapping, got {value!r}",
            _SOURCE_FORMS,
        )
    kind = value.get("kind")
    allowed = {"zero": {"kind"}, "model_token": {"kind", "model", "token", "token_id"}}
    if kind not in allowed:
        raise MergeError(f"{where}: unknown source kind {kind!r}", _SOURCE_FORMS)
    extra = sorted(set(value) - allowed[kind])
    if extra:
        raise MergeError(f"{where}: unknown key '{extra[0]}' in a {kind} source", _SOURCE_FORMS)
    if kind == "zero":
        return ZeroRow()
    model, token, token_id = value.get("model"), value.get("token"), value.get("token_id")
    if not isinstance(model, str):
        raise MergeError(f"{where}: a model_token source needs 'model: NAME'", _SOURCE_FORMS)
    if (token is None) == (token_id is None):
        raise MergeError(
            f"{where}: a model_token source needs exactly one of 'token' and 'token_id'",
            _SOURCE_FORMS,
        )
    if token is not None and not isinstance(token, str):
        raise MergeError(f"{where}: 'token' must be a string, got {token!r}", _SOURCE_FORMS)
    if token_id is not None and (
        isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0
    ):
        raise MergeError(
            f"{where}: 'token_id' must be a token id (0 or more), got {token_id!r}", _SOURCE_FORMS
        )
    return ModelRow(model, token, token_id)


_SOURCE_FORMS = (
    "use a model name, {kind: model_token, model: NAME, token: TEXT} (or token_id: N), "
    "or {kind: zero}"
)
