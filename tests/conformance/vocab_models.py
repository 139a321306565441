"""Tiny Llama-shaped model folders whose tokenizers differ, for the vocabulary-alignment tests.

Tokenizer merges (`tokenizer_source`, `tokenizer:`) only mean something when the inputs'
vocabularies differ, and the toy families of `mergesmith.toymodels` all share one word-level
tokenizer. These builders write real BPE tokenizers (trained by the `tokenizers` library on a
tiny fixed corpus, so deterministic and fast) through transformers' `save_pretrained`, which is
exactly what mergekit and `AutoTokenizer` read. Embedding-like tensors have one row per token of
the model's own vocabulary (but see `vwide` and `vpadded`), and a fine-tune's row for a token the
base also has is the base's row *for that token string* plus noise: merges by token string are
then meaningful (close to the base), while a merge that wrongly goes by id gives rows that are
visibly different. Tokens the base lacks get fresh rows drawn like the base's.

The models (keys of `make_vocab_models`):

- `vbase`: the base; BPE over CORPUS plus `<unk>`, `<s>`, `</s>`; a chat template of its own.
- `vsame`: a fine-tune with the very same tokenizer.
- `vchat`: a fine-tune whose tokenizer adds `<|im_start|>`, `<|im_end|>` (special) and two
  normal tokens; its chat template is CHAT_TEMPLATE_TUNED.
- `vperm`: a fine-tune whose BPE was trained on another corpus (new letters shift every id, some
  tokens exist only here, some base tokens are missing); it also has `<|im_end|>`, at another id
  than `vchat`'s, and the same chat template as `vchat`.
- `vpadded`: a fine-tune with the base's tokenizer and four more embedding rows than tokens
  (config `vocab_size` > len(tokenizer)), as in checkpoints padded to a round row count.
- `vwide`: a base-like model (base tensors + noise) whose tokenizer has four more tokens than
  the base but only two more embedding rows: config `vocab_size` < len(tokenizer), as in
  checkpoints whose tokenizer grew after training. mergekit strips the two extra tokens when
  this model is the base with `tokenizer_source: base`.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from mergesmith.toymodels import (
    ToyShape,
    base_tensors,
    finetune_tensors,
    llama_config,
    save_model,
)

SEED = 1234
SHAPE = ToyShape(hidden=32, layers=2, intermediate=64, vocab=0, heads=4, kv_heads=2)
# Room for one forward pass over every token id as one sequence.
MAX_POSITIONS = 512
SPECIALS = ("<unk>", "<s>", "</s>")
VOCAB_TENSORS = ("model.embed_tokens.weight", "lm_head.weight")

CORPUS = (
    "the merge of two models is a model",
    "task vectors add to the base weights",
    "sign election trims small deltas before the merge",
    "tokens align by their strings and not by their ids",
    "a linear merge weights every model",
    "slerp walks the sphere between two models",
    "the base model keeps its vocabulary",
    "fine tuned models learn new tokens",
)
# Words with letters CORPUS lacks (j, q, x, z): the alphabet, hence every id, shifts.
CORPUS_EXTRA = (
    "jazzy quixotic zebras jump over the merge",
    "the quiz on vectors was a jolly exercise",
    "zero sized experts quickly join the model",
)

CHAT_TEMPLATE_BASE = (
    "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}assistant:{% endif %}"
)
# Trailing whitespace on purpose: mergekit's `chat_template: auto` strips the winner.
CHAT_TEMPLATE_TUNED = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}\n\n"
)

CHAT_TOKENS = ("<|im_start|>", "<|im_end|>")
CHAT_NORMAL_TOKENS = ("mergesmith", "vocabularies")
WIDE_TOKENS = (("<extra_0>", True), ("wide", False), ("<extra_1>", True), ("wider", False))
WIDE_KEPT = 2  # embedding rows `vwide` has beyond the base's vocabulary

MODEL_NAMES = ("vbase", "vsame", "vchat", "vperm", "vpadded", "vwide")
PADDED_EXTRA = 4  # rows `vpadded` has beyond its vocabulary


def train_bpe(corpus: Sequence[str], vocab_size: int) -> Any:
    """A BPE `tokenizers.Tokenizer` trained on `corpus` (whitespace pre-tokenized)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE(unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.BPEDecoder()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIALS),
        min_frequency=1,
        show_progress=False,
    )
    tokenizer.train_from_iterator(list(corpus), trainer)
    return tokenizer


def fast_tokenizer(
    tokenizer: Any,
    *,
    chat_template: str | None,
    added: Sequence[tuple[str, bool]] = (),
) -> Any:
    """`tokenizer` as a transformers fast tokenizer with `added` (content, special) tokens
    appended after its vocabulary, in order."""
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=MAX_POSITIONS,
    )
    for content, special in added:
        fast.add_tokens([AddedToken(content, special=special, normalized=not special)], special)
    if chat_template is not None:
        fast.chat_template = chat_template
    return fast


def _config(rows: int) -> dict:
    config = llama_config(replace(SHAPE, vocab=rows), torch.float32)
    config["max_position_embeddings"] = MAX_POSITIONS
    return config


def _fresh_rows(count: int, seed: int) -> dict[str, torch.Tensor]:
    """Rows for tokens the base lacks, drawn like the base's own rows."""
    g = torch.Generator().manual_seed(seed)
    return {name: 0.05 * torch.randn((count, SHAPE.hidden), generator=g) for name in VOCAB_TENSORS}


def _aligned(
    base: Mapping[str, torch.Tensor],
    base_vocab: Mapping[str, int],
    vocab: Mapping[str, int],
    rows: int,
    seed: int,
) -> dict[str, torch.Tensor]:
    """The base's tensors with embedding rows re-indexed to `vocab` by token string; rows of
    tokens the base lacks (and of ids no token uses) are fresh."""
    by_id = {i: t for t, i in vocab.items() if i < rows}
    out = {name: tensor.clone() for name, tensor in base.items()}
    fresh = _fresh_rows(rows, seed)
    for name in VOCAB_TENSORS:
        table = fresh[name].clone()
        for i, token in by_id.items():
            if token in base_vocab:
                table[i] = base[name][base_vocab[token]]
        out[name] = table
    return out


def _save(folder: Path, tensors: Mapping[str, torch.Tensor], rows: int, tokenizer: Any) -> Path:
    """A model folder as a user downloads it: weights, config.json (vocab_size = `rows`), the
    tokenizer as transformers saves it (tokenizer.json, tokenizer_config.json,
    chat_template.jinja), generation_config.json."""
    save_model(folder, dict(tensors), _config(rows))
    tokenizer.save_pretrained(str(folder))
    generation = {"bos_token_id": 1, "eos_token_id": 2}
    (folder / "generation_config.json").write_text(json.dumps(generation), encoding="utf-8")
    return folder


def make_vocab_models(root: Path) -> dict[str, Path]:
    """Write the six models under `root` (float32, single-file safetensors, byte-identical on
    every run); returns name -> folder. A few seconds, most of them importing transformers."""
    root.mkdir(parents=True, exist_ok=True)
    base_bpe = train_bpe(CORPUS, 96)
    base_tok = fast_tokenizer(base_bpe, chat_template=CHAT_TEMPLATE_BASE)
    base_vocab = dict(base_tok.get_vocab())
    n_base = len(base_vocab)
    base = base_tensors(replace(SHAPE, vocab=n_base), SEED)
    paths = {"vbase": _save(root / "vbase", base, n_base, base_tok)}

    same = finetune_tensors(base, SEED + 1)
    same_tok = fast_tokenizer(train_bpe(CORPUS, 96), chat_template=None)
    paths["vsame"] = _save(root / "vsame", same, n_base, same_tok)

    chat_added = [(t, True) for t in CHAT_TOKENS] + [(t, False) for t in CHAT_NORMAL_TOKENS]
    chat_tok = fast_tokenizer(
        train_bpe(CORPUS, 96), chat_template=CHAT_TEMPLATE_TUNED, added=chat_added
    )
    chat_vocab = dict(chat_tok.get_vocab())
    chat = finetune_tensors(
        _aligned(base, base_vocab, chat_vocab, len(chat_vocab), SEED + 20), SEED + 2
    )
    paths["vchat"] = _save(root / "vchat", chat, len(chat_vocab), chat_tok)

    perm_tok = fast_tokenizer(
        train_bpe(CORPUS + CORPUS_EXTRA, 110),
        chat_template=CHAT_TEMPLATE_TUNED,
        added=[("<|im_end|>", True)],
    )
    perm_vocab = dict(perm_tok.get_vocab())
    perm = finetune_tensors(
        _aligned(base, base_vocab, perm_vocab, len(perm_vocab), SEED + 30), SEED + 3
    )
    paths["vperm"] = _save(root / "vperm", perm, len(perm_vocab), perm_tok)

    wide_tok = fast_tokenizer(
        train_bpe(CORPUS, 96), chat_template=CHAT_TEMPLATE_BASE, added=WIDE_TOKENS
    )
    wide_vocab = dict(wide_tok.get_vocab())
    wide_rows = n_base + WIDE_KEPT
    wide = finetune_tensors(_aligned(base, base_vocab, wide_vocab, wide_rows, SEED + 40), SEED + 4)
    paths["vwide"] = _save(root / "vwide", wide, wide_rows, wide_tok)

    padded_tok = fast_tokenizer(train_bpe(CORPUS, 96), chat_template=None)
    padded_rows = n_base + PADDED_EXTRA
    padded = finetune_tensors(
        _aligned(base, base_vocab, base_vocab, padded_rows, SEED + 50), SEED + 5
    )
    paths["vpadded"] = _save(root / "vpadded", padded, padded_rows, padded_tok)
    return paths
