"""Vocabularies that cannot be aligned are refused before any weight is read, naming the model."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tokenizers import Tokenizer, models, pre_tokenizers

from tests.conftest import run_cli, write_recipe


def unigram_with_extra_tokens(folder: Path, tokens: int) -> None:
    """A Unigram tokenizer (SentencePiece's kind) with more tokens than the model has rows."""
    vocab = [("<unk>", 0.0)] + [(f"piece{i}", -float(i)) for i in range(tokens - 1)]
    backend = Tokenizer(models.Unigram(vocab, unk_id=0))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")


def test_a_tokenizer_that_cannot_be_cut_to_its_rows_is_refused(family, tmp_path: Path) -> None:
    base, tuned = family
    odd = tmp_path / "odd-base"
    shutil.copytree(base, odd)
    unigram_with_extra_tokens(odd, 130)  # the toy embeddings have 128 rows
    recipe = write_recipe(
        tmp_path,
        f"merge_method: linear\nbase_model: {odd}\nmodels:\n"
        f"  - model: {odd}\n    parameters: {{weight: 1}}\n"
        f"  - model: {tuned[0]}\n    parameters: {{weight: 1}}\n"
        "tokenizer_source: base\n",
    )
    done = run_cli("run", recipe, tmp_path / "out")
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert f"model '{odd}'" in done.stderr and "Unigram tokenizer cannot be cut" in done.stderr
    assert "2 token(s) past its 128 embedding rows" in done.stderr
    assert not (tmp_path / "out").exists()
