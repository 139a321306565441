"""Language-model quality benchmark: merging a small Llama's domain experts with the mergesmith CLI.

The merging papers fine-tune one pre-trained model into task experts and merge them. Here, in
miniature and on the CPU, with nothing downloaded:

* the domains are texts that ship with the machine: Python source (the standard library), C
  headers (/usr/include, else Python's own headers), English prose (license texts and the
  Python reference's topic pages) and Perl modules (/usr/share/perl*, when present);
* the base is a transformers `LlamaForCausalLM` with a byte-level vocabulary, pre-trained on an
  even mix of the domains; each expert is the base fine-tuned on one domain;
* every model is a Hugging Face folder in bfloat16 (config.json, model.safetensors and a
  byte-level tokenizer built with `tokenizers`), the way fine-tunes are published;
* every merge is `python -m mergesmith run recipe.yml out`, a subprocess, as a user runs it, and
  every model is evaluated after loading its folder with `AutoModelForCausalLM` and
  `AutoTokenizer`;
* the score is held-out perplexity per byte on each domain (files split off before training);
  each method's density / lambda / select_topk is chosen per seed on a validation split and
  reported on a separate test split, mean and spread over seeds.

It also measures how often bf16 task vectors tie exactly at the magnitude cut-off and how the
kept share of those ties is spread over a matrix's rows (`tie_statistics`).

Run: `make quality` (three seeds, all methods) or `python examples/quality_lm/run_quality_lm.py
--help`. A fast version runs in the test suite (tests/test_quality_lm.py).
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import os
import platform
import subprocess
import sys
import sysconfig
import time
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

HERE = Path(__file__).resolve().parent
DEFAULT_RESULTS = HERE / "results"
DEFAULT_WORK = HERE / "work"

EOS = "<|endoftext|>"
VOCAB_SIZE = 257  # the 256 bytes (token id = byte value) and EOS


# ---------------------------------------------------------------------------------------------
# Domains: text that ships with the machine or with Python


@dataclass(frozen=True)
class Corpus:
    """One domain's bytes, split by file: train, val and test never share a file."""

    name: str
    source: str
    train: bytes
    val: bytes
    test: bytes


def _stdlib() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


_PYTHON_SKIP = {
    "test",
    "tests",
    "idlelib",
    "site-packages",
    "dist-packages",
    "__pycache__",
    "pydoc_data",
    "lib2to3",
    "turtledemo",
    "encodings",  # mostly generated code-page tables
}


def _python_files() -> tuple[str, list[Path]]:
    root = _stdlib()
    files = [p for p in root.rglob("*.py") if not _PYTHON_SKIP & set(p.relative_to(root).parts)]
    return f"{root}/**/*.py", sorted(files)


def _c_files() -> tuple[str, list[Path]]:
    # Python's own headers are the fallback: present wherever Python's C API is. C++ library
    # headers (c++/, llvm*/) are left out: this is the C domain.
    for root in (Path("/usr/include"), Path(sysconfig.get_paths()["include"])):
        files = sorted(
            p
            for p in (root.rglob("*.h") if root.is_dir() else [])
            if not any(part.startswith(("c++", "llvm")) for part in p.relative_to(root).parts)
        )
        if len(files) >= 20:
            return f"{root}/**/*.h", files
    return "none", []


def _perl_files() -> tuple[str, list[Path]]:
    roots = sorted(Path("/usr/share").glob("perl*"))
    files = sorted(p for root in roots for p in root.rglob("*.pm"))
    return "/usr/share/perl*/**/*.pm", files


def _prose_documents() -> tuple[str, list[tuple[str, bytes]]]:
    """License texts (deduplicated: several names link to one file) and the Python reference's
    topic pages, which are English reST."""
    from pydoc_data.topics import topics

    documents: dict[str, bytes] = {}
    licenses = Path("/usr/share/common-licenses")
    if licenses.is_dir():
        for path in sorted(licenses.iterdir()):
            real = path.resolve()
            if real.is_file():
                documents.setdefault(str(real), real.read_bytes())
    for name in sorted(topics):
        documents[f"topics/{name}"] = topics[name].encode("utf-8")
    return "/usr/share/common-licenses + pydoc_data.topics", sorted(documents.items())


DOMAIN_SOURCES: dict[str, Callable[[], tuple[str, list[Path]]]] = {
    "python": _python_files,
    "c": _c_files,
    "perl": _perl_files,
}
ALL_DOMAINS: tuple[str, ...] = ("python", "c", "prose", "perl")

# Each file contributes at most its first DOC_CAP bytes, so a few huge files cannot make a domain.
DOC_CAP = 16_384
DATA_SEED = 20240601  # fixed: the data is the same for every seed; seeds vary the models


def load_corpus(name: str, train_bytes: int, held_out_bytes: int) -> Corpus:
    """Up to `train_bytes` of training text and `held_out_bytes` each of validation and test.
    A file goes to test, val or train by a hash of its name (1 in 10 each to test and val), and
    files are read in a fixed shuffled order until each split is full."""
    if name == "prose":
        source, documents = _prose_documents()
        named = [(doc_name, lambda data=data: data) for doc_name, data in documents]
    else:
        source, files = DOMAIN_SOURCES[name]()
        named = [(str(p), lambda p=p: p.read_bytes()) for p in files]
    if not named:
        raise RuntimeError(f"no text found for domain {name!r} ({source})")
    order = np.random.default_rng(DATA_SEED).permutation(len(named))
    splits: dict[str, list[bytes]] = {"train": [], "val": [], "test": []}
    caps = {"train": train_bytes, "val": held_out_bytes, "test": held_out_bytes}
    sizes = dict.fromkeys(splits, 0)
    for i in order:
        doc_name, read = named[int(i)]
        bucket = zlib.crc32(doc_name.encode()) % 10
        split = "test" if bucket == 0 else "val" if bucket == 1 else "train"
        if sizes[split] >= caps[split]:
            if all(sizes[s] >= caps[s] for s in splits):
                break
            continue
        try:
            data = read()[:DOC_CAP]
        except OSError:
            continue
        splits[split].append(data)
        sizes[split] += len(data)
    joined = {s: b"\n".join(parts)[: caps[s]] for s, parts in splits.items()}
    return Corpus(name, source, joined["train"], joined["val"], joined["test"])


def as_tokens(data: bytes) -> torch.Tensor:
    """Byte-level token ids: the byte values themselves."""
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).long()


def eval_windows(data: bytes, count: int, context: int) -> torch.Tensor:
    """`count` windows of `context` tokens at evenly spaced offsets: a fixed evaluation set."""
    tokens = as_tokens(data)
    if tokens.numel() <= context:
        raise RuntimeError(f"held-out split of {tokens.numel()} bytes is shorter than a window")
    starts = torch.linspace(0, tokens.numel() - context, count).long()
    return torch.stack([tokens[s : s + context] for s in starts.tolist()])


# ---------------------------------------------------------------------------------------------
# Tokenizer, model, training


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet (what `tokenizers`' ByteLevel pre-tokenizer emits): printable
    bytes stand for themselves, the others for the code points from 256 up, in byte order."""
    printable = [*range(33, 127), *range(161, 173), *range(174, 256)]
    chars = {b: chr(b) for b in printable}
    extra = 0
    for b in range(256):
        if b not in chars:
            chars[b] = chr(256 + extra)
            extra += 1
    return chars


def build_tokenizer():
    """A byte-level tokenizer (id = byte value, plus EOS) that AutoTokenizer loads: GPT-2's
    byte-to-unicode alphabet with no merges, so every byte is one token."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {char: byte for byte, char in _bytes_to_unicode().items()}
    vocab[EOS] = 256
    tokenizer = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token=EOS, bos_token=EOS)


@dataclass(frozen=True)
class LMConfig:
    """Model size, training schedule and data sizes of one benchmark run."""

    hidden_size: int = 64
    layers: int = 2
    heads: int = 4
    intermediate_size: int = 192
    context: int = 128
    batch_size: int = 16
    base_steps: int = 300
    base_lr: float = 3e-3
    # Fine-tuning moves each weight by a small fraction of its size, as LLM fine-tunes do: at
    # 1e-3 the experts forget the other domains and every merge but averaging lands below
    # the base; at 3e-5 all merges are alike (measured while sizing this benchmark).
    expert_steps: int = 100
    expert_lr: float = 1e-4
    warmup: int = 20
    train_bytes: int = 1_000_000
    held_out_bytes: int = 131_072
    val_windows: int = 40
    test_windows: int = 64

    def key(self) -> str:
        """Identifies trained checkpoints: a cached model is reused only under the same model,
        training and data settings (the evaluation windows play no part)."""
        fields = asdict(self)
        for name in ("val_windows", "test_windows"):
            fields.pop(name)
        return json.dumps(fields, sort_keys=True)


def make_model(config: LMConfig, seed: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    model_config = LlamaConfig(
        vocab_size=VOCAB_SIZE,
        hidden_size=config.hidden_size,
        intermediate_size=config.intermediate_size,
        num_hidden_layers=config.layers,
        num_attention_heads=config.heads,
        num_key_value_heads=config.heads,
        max_position_embeddings=config.context,
        tie_word_embeddings=False,
        bos_token_id=256,
        eos_token_id=256,
    )
    return LlamaForCausalLM(model_config)


def train(
    model: torch.nn.Module,
    domains: Sequence[torch.Tensor],
    *,
    steps: int,
    lr: float,
    config: LMConfig,
    seed: int,
) -> float:
    """AdamW with warmup then cosine decay to a tenth, on random windows; each sequence of a
    batch comes from a domain drawn uniformly. No weight decay: it would add a shrinking
    component shared by every expert's task vector. Returns the mean loss of the last 20
    steps."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), weight_decay=0.0)

    def schedule(step: int) -> float:
        if step < config.warmup:
            return (step + 1) / config.warmup
        progress = (step - config.warmup) / max(1, steps - config.warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, schedule)
    generator = torch.Generator().manual_seed(seed)
    model.train()
    losses = []
    for _ in range(steps):
        picks = torch.randint(len(domains), (config.batch_size,), generator=generator)
        rows = []
        for d in picks.tolist():
            tokens = domains[d]
            start = int(torch.randint(tokens.numel() - config.context, (1,), generator=generator))
            rows.append(tokens[start : start + config.context])
        batch = torch.stack(rows)
        loss = model(input_ids=batch, labels=batch).loss
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        scheduler.step()
        losses.append(float(loss.detach()))
    model.eval()
    return float(np.mean(losses[-20:]))


def save_folder(model: torch.nn.Module, folder: Path, config: LMConfig, extra: dict) -> None:
    """A bfloat16 Hugging Face folder with the byte-level tokenizer, plus a note of how it was
    trained (`train.json`, which also marks the folder complete for reuse)."""
    folder.mkdir(parents=True, exist_ok=True)
    model.to(torch.bfloat16).save_pretrained(folder, safe_serialization=True)
    model.to(torch.float32)
    build_tokenizer().save_pretrained(folder)
    (folder / "train.json").write_text(json.dumps({"config": config.key(), **extra}) + "\n")


def is_trained(folder: Path, config: LMConfig) -> bool:
    note = folder / "train.json"
    if not note.is_file() or not (folder / "model.safetensors").is_file():
        return False
    return json.loads(note.read_text()).get("config") == config.key()


def load_for_training(folder: Path):
    """The saved bf16 weights as float32: experts start from exactly the base that is merged."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)


# ---------------------------------------------------------------------------------------------
# Evaluation: held-out negative log-likelihood per byte, through transformers


@torch.no_grad()
def evaluate(folder: Path, windows: dict[str, dict[str, torch.Tensor]]) -> dict[str, dict]:
    """Mean NLL per predicted byte (nats) of the folder's model, per split and domain, after
    loading the folder as a user would. Checks that its tokenizer maps text to byte values."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder)
    probe = "def f(x):\n    return x  # héllo\n"
    if tokenizer(probe)["input_ids"] != list(probe.encode("utf-8")):
        raise RuntimeError(f"{folder}: tokenizer does not map text to its bytes")
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model.eval()
    scores: dict[str, dict[str, float]] = {}
    for split, per_domain in windows.items():
        scores[split] = {}
        for domain, rows in per_domain.items():
            total = 0.0
            for chunk in rows.split(64):
                total += float(model(input_ids=chunk, labels=chunk).loss) * chunk.shape[0]
            scores[split][domain] = total / rows.shape[0]
    return scores


# ---------------------------------------------------------------------------------------------
# Methods and their grids


@dataclass(frozen=True)
class Setting:
    """One point of a method's grid: per-model and global recipe parameters."""

    per_model: dict[str, Any] = field(default_factory=dict)
    global_: dict[str, Any] = field(default_factory=dict)

    def label(self) -> str:
        items = {**self.per_model, **self.global_}
        items.pop("weight", None)
        return ", ".join(f"{k}={v:g}" for k, v in items.items()) or "-"


@dataclass(frozen=True)
class MethodSpec:
    label: str
    merge_method: str
    grid: tuple[Setting, ...]
    uses_base: bool = True


def _grid(
    densities: Iterable[float], lambdas: Iterable[float], **per_model: float
) -> tuple[Setting, ...]:
    return tuple(
        Setting({"weight": 1.0, "density": d, **per_model}, {"lambda": lam})
        for d, lam in itertools.product(densities, lambdas)
    )


# Lambdas bracket both kinds of combine: summing methods (task arithmetic, DARE-TIES) whose
# natural scale is 1/K (K = 4 experts: task arithmetic at 0.25 is plain averaging, the `linear`
# row), and those that divide by the agreeing weights (TIES, DELLA), whose papers use 1. While
# sizing the benchmark, task arithmetic at lambda 0.75 and 1 lost to the base, and TIES and
# DELLA did best at the low end of a 0.5-1.5 grid, so the grids reach down to 0.2-0.3.
FULL_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("linear", "linear", (Setting({"weight": 1.0}),), uses_base=False),
    MethodSpec(
        "task_arithmetic",
        "task_arithmetic",
        tuple(Setting({"weight": 1.0}, {"lambda": lam}) for lam in (0.3, 0.4, 0.5)),
    ),
    MethodSpec("ties", "ties", _grid((0.2, 0.5, 0.8), (0.3, 0.5, 1.0))),
    MethodSpec("dare_ties", "dare_ties", _grid((0.2, 0.5, 0.8), (0.2, 0.3, 0.5))),
    MethodSpec("della", "della", _grid((0.3, 0.5, 0.7), (0.3, 0.5, 1.0), epsilon=0.1)),
    MethodSpec("model_stock", "model_stock", (Setting(),)),
    MethodSpec("sce", "sce", tuple(Setting({}, {"select_topk": t}) for t in (0.1, 0.5, 1.0))),
)

QUICK_METHODS: tuple[MethodSpec, ...] = (
    MethodSpec("linear", "linear", (Setting({"weight": 1.0}),), uses_base=False),
    MethodSpec("ties", "ties", _grid((0.5,), (0.5,))),
)


def build_recipe(spec: MethodSpec, setting: Setting, base: Path, experts: Sequence[Path]) -> dict:
    recipe: dict[str, Any] = {"merge_method": spec.merge_method}
    if spec.uses_base:
        recipe["base_model"] = str(base)
    recipe["models"] = [
        {"model": str(p), **({"parameters": dict(setting.per_model)} if setting.per_model else {})}
        for p in experts
    ]
    if setting.global_:
        recipe["parameters"] = dict(setting.global_)
    recipe["dtype"] = "bfloat16"
    return recipe


def start_merge(recipe: dict, folder: Path, seed: int, threads: int) -> subprocess.Popen:
    """Start `python -m mergesmith run recipe.yml folder` (a subprocess, as a user runs it)."""
    import yaml

    folder.parent.mkdir(parents=True, exist_ok=True)
    recipe_path = folder.parent / f"{folder.name}.yml"
    recipe_path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    command = [sys.executable, "-m", "mergesmith", "run", str(recipe_path), str(folder)]
    command += ["--seed", str(seed), "--threads", str(threads), "--overwrite", "--quiet"]
    return subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def finish_merge(process: subprocess.Popen) -> None:
    _, stderr = process.communicate()
    if process.returncode != 0:
        raise RuntimeError(f"mergesmith run failed ({process.returncode}):\n{stderr[-3000:]}")


# ---------------------------------------------------------------------------------------------
# One seed


@dataclass
class Outcome:
    """A row of the table in one seed: NLL per domain on val and test (nats per byte)."""

    setting: str
    val: dict[str, float]
    test: dict[str, float]

    @property
    def val_mean(self) -> float:
        return float(np.mean(list(self.val.values())))

    @property
    def test_mean(self) -> float:
        return float(np.mean(list(self.test.values())))


@dataclass
class SeedResult:
    seed: int
    domains: list[str]
    base: Outcome
    experts: dict[str, Outcome]  # by the expert's own domain
    methods: dict[str, Outcome]  # the setting chosen on validation
    grid: dict[str, list[Outcome]]  # every setting tried
    train_seconds: float
    merge_seconds: float
    ties: dict[str, Any] | None = None

    def row(self, name: str) -> Outcome:
        if name == BASE_ROW:
            return self.base
        if name == EXPERT_ROW:
            own = {d: self.experts[d].test[d] for d in self.domains}
            own_val = {d: self.experts[d].val[d] for d in self.domains}
            return Outcome("own domain", own_val, own)
        if name.startswith("expert:"):
            return self.experts[name.removeprefix("expert:")]
        return self.methods[name]


BASE_ROW = "base"
EXPERT_ROW = "experts (own domain)"


def run_seed(
    seed: int,
    corpora: dict[str, Corpus],
    methods: Sequence[MethodSpec],
    work_dir: Path,
    config: LMConfig,
    *,
    threads: int = 2,
    tie_densities: Sequence[float] = (),
    log: Callable[[str], None] = print,
) -> SeedResult:
    """Pre-train the base, fine-tune one expert per domain (reusing folders trained under the
    same config), merge with every setting of every method, evaluate all."""
    domains = list(corpora)
    train_tokens = {d: as_tokens(c.train) for d, c in corpora.items()}
    windows = {
        split: {
            d: eval_windows(getattr(c, split), count, config.context) for d, c in corpora.items()
        }
        for split, count in (("val", config.val_windows), ("test", config.test_windows))
    }
    seed_dir = work_dir / f"seed{seed}"
    base_dir = seed_dir / "base"
    started = time.perf_counter()
    if not is_trained(base_dir, config):
        model = make_model(config, seed)
        loss = train(
            model,
            [train_tokens[d] for d in domains],
            steps=config.base_steps,
            lr=config.base_lr,
            config=config,
            seed=seed,
        )
        note = {"domains": domains, "final_loss": loss}
        save_folder(model, base_dir, config, {**note, "seconds": time.perf_counter() - started})
        log(f"seed {seed}: base pre-trained, final loss {loss:.3f}")
    expert_dirs: dict[str, Path] = {}
    for i, domain in enumerate(domains):
        folder = seed_dir / f"expert_{domain}"
        expert_dirs[domain] = folder
        if is_trained(folder, config):
            continue
        expert_started = time.perf_counter()
        model = load_for_training(base_dir)
        loss = train(
            model,
            [train_tokens[domain]],
            steps=config.expert_steps,
            lr=config.expert_lr,
            config=config,
            seed=seed * 1000 + i + 1,
        )
        seconds = time.perf_counter() - expert_started
        note = {"domain": domain, "final_loss": loss, "seconds": seconds}
        save_folder(model, folder, config, note)
        log(f"seed {seed}: expert {domain} fine-tuned, final loss {loss:.3f}")
    # Folders reused from an earlier run report the time they took to train then.
    train_seconds = sum(
        json.loads((folder / "train.json").read_text()).get("seconds", 0.0)
        for folder in (base_dir, *expert_dirs.values())
    )

    started = time.perf_counter()
    base = Outcome("-", **evaluate(base_dir, windows))
    experts = {d: Outcome("-", **evaluate(expert_dirs[d], windows)) for d in domains}
    # Each merge runs while the previous one is evaluated: starting Python and torch is most of
    # a merge's time at this size.
    jobs = [(spec, i, setting) for spec in methods for i, setting in enumerate(spec.grid)]
    experts_in_order = [expert_dirs[d] for d in domains]

    def start(n: int) -> tuple[Path, subprocess.Popen]:
        spec, i, setting = jobs[n]
        folder = seed_dir / "merged" / f"{spec.label}-{i}"
        recipe = build_recipe(spec, setting, base_dir, experts_in_order)
        return folder, start_merge(recipe, folder, seed, threads)

    grid: dict[str, list[Outcome]] = {spec.label: [] for spec in methods}
    running = start(0) if jobs else None
    for n, (spec, _, setting) in enumerate(jobs):
        assert running is not None
        folder, process = running
        finish_merge(process)
        running = start(n + 1) if n + 1 < len(jobs) else None
        grid[spec.label].append(Outcome(setting.label(), **evaluate(folder, windows)))
    chosen = {label: min(tried, key=lambda o: o.val_mean) for label, tried in grid.items()}
    merge_seconds = time.perf_counter() - started
    ties = None
    if tie_densities:
        ties = tie_statistics(base_dir, [expert_dirs[d] for d in domains], tie_densities)
    return SeedResult(
        seed, domains, base, experts, chosen, grid, train_seconds, merge_seconds, ties
    )


# ---------------------------------------------------------------------------------------------
# Ties at the magnitude cut-off, on the bf16 experts


ROW_BINS = 10


def _spread_keep(tied: np.ndarray, need: int) -> np.ndarray:
    """SEMANTICS.md 3, written out independently of mergesmith: of the T tied entries in
    flat-index order, the j-th (from 0) is kept when floor((j+1) need / T) > floor(j need / T)."""
    j = np.cumsum(tied) - 1
    total = int(tied.sum())
    return tied & (((j + 1) * need) // total > (j * need) // total)


def _index_keep(tied: np.ndarray, need: int) -> np.ndarray:
    """The round-1 rule: the `need` tied entries of lowest flat index."""
    return tied & (np.cumsum(tied) <= need)


def tie_statistics(
    base_dir: Path, expert_dirs: Sequence[Path], densities: Sequence[float]
) -> dict[str, Any]:
    """For every 2-D weight of every expert and each density: how many entries of the task
    vector tie exactly at the magnitude cut-off, how many of those TIES keeps, and the kept share
    of the tied entries per tenth of the rows, under the round-1 rule (lower flat index first),
    under SEMANTICS.md's spread rule, and as mergesmith computes it (the family pass a `ties`
    merge runs, here on one model so that its output is base + the trimmed delta).

    A cut-off of 0 (more zero deltas than the density drops) ties only zero deltas, which are
    the same kept or not: such tensors count in `zero_cut_share` and nowhere else."""
    from safetensors.torch import load_file

    from mergesmith.methods.task_arithmetic import merge_task_vectors

    base = load_file(base_dir / "model.safetensors")
    rules = ("index", "spread", "mergesmith")
    stats: dict[str, Any] = {}
    for density in densities:
        numel = tied_total = need_total = kept_total = tensors = zero_cut = 0
        kept_tied_by_bin = {r: np.zeros(ROW_BINS) for r in rules}
        tied_by_bin = np.zeros(ROW_BINS)
        matches = dict.fromkeys(("index", "spread"), True)
        for folder in expert_dirs:
            expert = load_file(folder / "model.safetensors")
            for name, b in sorted(base.items()):
                if b.dim() != 2:
                    continue
                tensors += 1
                delta = (expert[name].float() - b.float()).reshape(-1)
                magnitude = delta.abs().numpy()
                n = magnitude.size
                k = max(1, math.floor(density * n))
                cut = np.partition(magnitude, n - k)[n - k]
                if cut == 0:
                    zero_cut += 1
                    continue
                above = magnitude > cut
                tied = magnitude == cut
                need = k - int(above.sum())
                library = merge_task_vectors(
                    b,
                    [expert[name]],
                    [1.0],
                    densities=[density],
                    sparsifier="magnitude",
                    out_dtype=torch.float32,
                )
                kept_by = {
                    "index": above | _index_keep(tied, need),
                    "spread": above | _spread_keep(tied, need),
                    "mergesmith": (library.reshape(-1) != b.float().reshape(-1)).numpy(),
                }
                for rule in ("index", "spread"):
                    same = np.array_equal(kept_by[rule], kept_by["mergesmith"])
                    matches[rule] = matches[rule] and same
                bins = (np.arange(n) // b.shape[1]) * ROW_BINS // b.shape[0]
                tied_by_bin += np.bincount(bins, weights=tied, minlength=ROW_BINS)
                for rule in rules:
                    kept_tied = kept_by[rule] & tied
                    kept_tied_by_bin[rule] += np.bincount(
                        bins, weights=kept_tied, minlength=ROW_BINS
                    )
                numel += n
                tied_total += int(tied.sum())
                need_total += need
                kept_total += k
        stats[f"{density:g}"] = {
            "entries": numel,
            "tensors": tensors,
            "zero_cut_tensors": zero_cut,
            "tied": tied_total,
            "tied_kept": need_total,
            "kept": kept_total,
            "tied_by_row_bin": tied_by_bin.tolist(),
            "kept_tied_by_row_bin": {r: v.tolist() for r, v in kept_tied_by_bin.items()},
            "mergesmith_matches": matches,
        }
    return stats


def tie_shares(stats: dict[str, Any]) -> dict[str, float]:
    """Entries tied at the cut-off over all entries; tied entries kept over tied entries; kept
    entries that were tied over kept entries; tensors whose cut-off is 0."""
    return {
        "tied_share": stats["tied"] / max(1, stats["entries"]),
        "tied_kept_share": stats["tied_kept"] / max(1, stats["tied"]),
        "kept_from_ties": stats["tied_kept"] / max(1, stats["kept"]),
        "zero_cut_share": stats["zero_cut_tensors"] / max(1, stats["tensors"]),
    }


def tied_kept_share_by_bin(stats: dict[str, Any], rule: str) -> list[float]:
    tied = np.array(stats["tied_by_row_bin"])
    return (np.array(stats["kept_tied_by_row_bin"][rule]) / np.maximum(tied, 1)).tolist()


def merge_tie_stats(per_seed: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Pool the per-seed tie statistics: counts add up."""
    pooled: dict[str, Any] = {}
    for density in per_seed[0]:
        items = [s[density] for s in per_seed]
        total = {
            key: sum(i[key] for i in items)
            for key in ("entries", "tensors", "zero_cut_tensors", "tied", "tied_kept", "kept")
        }
        total["tied_by_row_bin"] = np.sum([i["tied_by_row_bin"] for i in items], axis=0).tolist()
        total["kept_tied_by_row_bin"] = {
            r: np.sum([i["kept_tied_by_row_bin"][r] for i in items], axis=0).tolist()
            for r in items[0]["kept_tied_by_row_bin"]
        }
        total["mergesmith_matches"] = {
            r: all(i["mergesmith_matches"][r] for i in items)
            for r in items[0]["mergesmith_matches"]
        }
        pooled[density] = total
    return pooled


def mergesmith_rule(ties: dict[str, Any]) -> str:
    """Which rule the library's kept sets matched at every density and seed."""
    for rule in ("spread", "index"):
        if all(s["mergesmith_matches"][rule] for s in ties.values()):
            return rule
    return "neither"


# ---------------------------------------------------------------------------------------------
# All seeds, the report


@dataclass
class QualityResult:
    seeds: list[int]
    domains: list[str]
    sources: dict[str, str]
    rows: list[str]
    per_seed: list[SeedResult]
    config: LMConfig
    quick: bool
    machine: str
    seconds: float
    ties: dict[str, Any] | None = None

    def test_nll(self, row: str) -> list[float]:
        """Mean test NLL over domains, per seed."""
        return [s.row(row).test_mean for s in self.per_seed]

    def domain_nll(self, row: str, domain: str) -> list[float]:
        return [s.row(row).test[domain] for s in self.per_seed]

    def gain_retained(self, row: str) -> list[float]:
        """Per seed, the mean over domains of (base NLL - row NLL) / (base NLL - expert NLL):
        1 is the expert's own improvement on its domain, 0 the base."""
        per_domain = [self.domain_gain_retained(row, d) for d in self.domains]
        return [float(np.mean(shares)) for shares in zip(*per_domain, strict=True)]

    def domain_gain_retained(self, row: str, domain: str) -> list[float]:
        """Per seed, (base NLL - row NLL) / (base NLL - expert NLL) on one domain."""
        return [
            (s.base.test[domain] - s.row(row).test[domain])
            / (s.base.test[domain] - s.experts[domain].test[domain])
            for s in self.per_seed
        ]

    def settings(self, row: str) -> list[str]:
        return [s.methods[row].setting for s in self.per_seed if row in s.methods]

    def to_json(self) -> dict[str, Any]:
        return {
            "seeds": self.seeds,
            "domains": self.domains,
            "sources": self.sources,
            "config": asdict(self.config),
            "quick": self.quick,
            "machine": self.machine,
            "seconds": self.seconds,
            "rows": {
                row: {
                    "test_nll_mean_over_domains": self.test_nll(row),
                    "test_nll_by_domain": {d: self.domain_nll(row, d) for d in self.domains},
                    "gain_retained": self.gain_retained(row),
                    "settings": self.settings(row),
                }
                for row in self.rows
            },
            "grid": {
                label: [
                    {
                        "setting": o.setting,
                        "val_mean": [s.grid[label][i].val_mean for s in self.per_seed],
                        "test_mean": [s.grid[label][i].test_mean for s in self.per_seed],
                    }
                    for i, o in enumerate(self.per_seed[0].grid[label])
                ]
                for label in self.per_seed[0].grid
            },
            "ties": self.ties,
        }


def machine_description() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    memory = ""
    try:
        kib = int(Path("/proc/meminfo").read_text().split()[1])  # MemTotal, the first line
        memory = f", {kib / 2**20:.1f} GiB RAM"
    except (OSError, ValueError, IndexError):
        pass
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return (
        f"{cpu}, {os.cpu_count()} cores{memory} (load average {load:.1f} at start), "
        f"{platform.system()} {platform.release()}, Python {platform.python_version()}, "
        f"torch {torch.__version__}"
    )


def run_quality(
    seeds: Sequence[int],
    *,
    quick: bool = False,
    config: LMConfig | None = None,
    domains: Sequence[str] | None = None,
    out_dir: Path | None = None,
    work_dir: Path | None = None,
    methods: Sequence[MethodSpec] | None = None,
    tie_densities: Sequence[float] = (),
    threads: int = 2,
    compare_with: Path | None = None,
    log: Callable[[str], None] = print,
) -> QualityResult:
    """Run every seed and, with `out_dir`, write latest.md, latest.json and the plots there."""
    import tempfile

    from transformers.utils import logging as transformers_logging

    transformers_logging.disable_progress_bar()
    started = time.perf_counter()
    machine = machine_description()
    config = config or LMConfig()
    methods = methods if methods is not None else (QUICK_METHODS if quick else FULL_METHODS)
    names = list(domains or ALL_DOMAINS)
    corpora: dict[str, Corpus] = {}
    for name in names:
        try:
            corpora[name] = load_corpus(name, config.train_bytes, config.held_out_bytes)
        except RuntimeError as exc:
            if name != "perl":  # the one optional domain
                raise
            log(f"skipping domain perl: {exc}")
    # Tiny models train faster on one thread; several only contend on a small machine.
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    per_seed = []
    try:
        with tempfile.TemporaryDirectory(prefix="mergesmith-quality-lm-") as tmp:
            root = work_dir if work_dir is not None else Path(tmp)
            for seed in seeds:
                result = run_seed(
                    seed,
                    corpora,
                    methods,
                    root,
                    config,
                    threads=threads,
                    tie_densities=tie_densities,
                    log=log,
                )
                log(
                    f"seed {seed}: trained in {result.train_seconds:.0f} s, merged and "
                    f"evaluated in {result.merge_seconds:.0f} s"
                )
                per_seed.append(result)
    finally:
        torch.set_num_threads(previous)
    rows = [EXPERT_ROW, *(m.label for m in methods), BASE_ROW]
    rows += [f"expert:{d}" for d in corpora]
    ties = merge_tie_stats([s.ties for s in per_seed]) if tie_densities else None
    result = QualityResult(
        seeds=list(seeds),
        domains=list(corpora),
        sources={d: c.source for d, c in corpora.items()},
        rows=rows,
        per_seed=per_seed,
        config=config,
        quick=quick,
        machine=machine,
        seconds=time.perf_counter() - started,
        ties=ties,
    )
    if out_dir is not None:
        write_report(result, out_dir, compare_with)
    return result


# The papers' claims, as pairs (better, worse) in mean held-out NLL.
PAPER_CLAIMS: tuple[tuple[str, str, str], ...] = (
    ("TIES (Yadav et al. 2023)", "ties", "task_arithmetic"),
    ("TIES (Yadav et al. 2023)", "task_arithmetic", "linear"),
    ("DARE (Yu et al. 2024)", "dare_ties", "ties"),
    ("DELLA (Deep et al. 2024)", "della", "dare_ties"),
    ("DELLA (Deep et al. 2024)", "della", "ties"),
    ("Model Stock (Jang et al. 2024)", "model_stock", "linear"),
    ("SCE (Wan et al. 2024, FuseChat 2.0)", "sce", "ties"),
    ("SCE (Wan et al. 2024, FuseChat 2.0)", "sce", "task_arithmetic"),
)


def claim_lines(result: QualityResult) -> list[str]:
    """Paired per-seed gaps in mean test NLL: positive when the claimed-better method wins."""
    lines = []
    for paper, better, worse in PAPER_CLAIMS:
        if better not in result.rows or worse not in result.rows:
            continue
        gaps = [w - b for b, w in zip(result.test_nll(better), result.test_nll(worse), strict=True)]
        held = sum(g > 0 for g in gaps)
        mean = float(np.mean(gaps))
        verdict = "holds" if held == len(gaps) else "reversed" if held == 0 else "mixed"
        lines.append(
            f"- {paper}: {better} < {worse} in NLL: {verdict} ({held}/{len(gaps)} seeds; mean "
            f"gap {mean:+.4f} nats/byte, min {min(gaps):+.4f}, max {max(gaps):+.4f})"
        )
    return lines


def _mean_std(values: Sequence[float], digits: int = 3) -> str:
    if len(values) < 2:
        return f"{np.mean(values):.{digits}f}"
    return f"{np.mean(values):.{digits}f} ± {np.std(values, ddof=1):.{digits}f}"


def table(result: QualityResult) -> str:
    head = ["row", "chosen setting (seeds)", "mean NLL", "avg ppl", "gain retained"]
    head += [f"{d} ppl" for d in result.domains]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in result.rows:
        settings = result.settings(row)
        counts = {s: settings.count(s) for s in dict.fromkeys(settings)}
        chosen = "; ".join(f"{s} ({c})" for s, c in counts.items())
        nll = result.test_nll(row)
        cells = [
            row,
            chosen,
            _mean_std(nll, 4),
            f"{math.exp(np.mean(nll)):.3f}",
            _mean_std(result.gain_retained(row), 2),
        ]
        cells += [f"{math.exp(np.mean(result.domain_nll(row, d))):.3f}" for d in result.domains]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def grid_table(result: QualityResult) -> str:
    """Every setting tried: mean test NLL over domains and seeds, and how often it won on val."""
    lines = ["| method | setting | mean test NLL | chosen on val (seeds) |", "|---|---|---|---|"]
    for label, tried in result.per_seed[0].grid.items():
        if len(tried) < 2:
            continue
        for i, outcome in enumerate(tried):
            values = [s.grid[label][i].test_mean for s in result.per_seed]
            wins = sum(s.methods[label].setting == outcome.setting for s in result.per_seed)
            lines.append(f"| {label} | {outcome.setting} | {np.mean(values):.4f} | {wins} |")
    return "\n".join(lines)


def tie_lines(ties: dict[str, Any]) -> list[str]:
    lines = [
        "| density | entries tied at the cut-off | share of them kept | kept entries that are "
        "tied | tied kept, first tenth of rows: index / spread / mergesmith | last tenth: index "
        "/ spread / mergesmith | matrices whose cut-off is 0 |",
        "|---|---|---|---|---|---|---|",
    ]
    for density, s in ties.items():
        by_bin = {r: tied_kept_share_by_bin(s, r) for r in ("index", "spread", "mergesmith")}
        first = " / ".join(f"{by_bin[r][0]:.2f}" for r in by_bin)
        last = " / ".join(f"{by_bin[r][-1]:.2f}" for r in by_bin)
        shares = tie_shares(s)
        lines.append(
            f"| {density} | {shares['tied_share']:.1%} | {shares['tied_kept_share']:.1%} | "
            f"{shares['kept_from_ties']:.1%} | {first} | {last} | {shares['zero_cut_share']:.0%} |"
        )
    lines.append("")
    lines.append(f"mergesmith's kept sets match the **{mergesmith_rule(ties)}** rule exactly.")
    return lines


def comparison_lines(result: QualityResult, other_path: Path) -> list[str]:
    """This run against a stored run (the same trained models under the other tie rule)."""
    other = json.loads(other_path.read_text())
    # The same models only if the base and the experts score the same (trained afresh on
    # another machine or torch, they may not be).
    same_models = other.get("seeds") == result.seeds and all(
        np.allclose(other["rows"][row]["test_nll_mean_over_domains"], result.test_nll(row))
        for row in (BASE_ROW, *(f"expert:{d}" for d in result.domains))
        if row in other["rows"]
    )
    models = (
        "the same seeds and trained models, so the differences are the tie rule's alone"
        if same_models
        else "models trained afresh, so the differences include training noise"
    )
    lines = [
        f"Against `{other_path.name}` (tie rule: {other.get('tie_rule', '?')}; {models}):",
        "",
        "| row | mean test NLL, this run | stored run | difference |",
        "|---|---|---|---|",
    ]
    for row in result.rows:
        stored = other["rows"].get(row)
        if stored is None or row.startswith("expert"):
            continue
        ours = float(np.mean(result.test_nll(row)))
        theirs = float(np.mean(stored["test_nll_mean_over_domains"]))
        lines.append(f"| {row} | {ours:.5f} | {theirs:.5f} | {ours - theirs:+.5f} |")
    lines += ["", "Every setting of the methods whose trim depends on the tie rule:", ""]
    lines += ["| method | setting | this run | stored run | difference |", "|---|---|---|---|---|"]
    for label in ("ties", "della"):
        stored_grid = {g["setting"]: g for g in other.get("grid", {}).get(label, [])}
        for i, outcome in enumerate(result.per_seed[0].grid.get(label, [])):
            if outcome.setting not in stored_grid:
                continue
            ours = float(np.mean([s.grid[label][i].test_mean for s in result.per_seed]))
            theirs = float(np.mean(stored_grid[outcome.setting]["test_mean"]))
            cells = [
                label,
                outcome.setting,
                f"{ours:.5f}",
                f"{theirs:.5f}",
                f"{ours - theirs:+.5f}",
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return lines


NOTES = """\
Notes on the setup and on reading the numbers:

- The experts' learning rate decides how mergeable they are. While sizing the benchmark, at
  1e-3 (ten times this one) each expert forgot the other domains and every merge but averaging
  scored below the base; at 3e-5 all merges were alike. At 1e-4 fine-tuning moves weights by a
  small fraction of their size, as fine-tunes of large models do.
- Each expert is worse than the base off its own domain (the `expert:` rows): a model this small
  cannot hold four specialisations at once, so merges keep only part of the experts' gains.
- The gaps between the best merges are small next to the spread between seeds (which is mostly
  the base's own level), but paired per seed they are consistent in sign (see the orderings).
- Choosing a setting on 40 validation windows per domain is noisy at these gaps: compare the
  chosen settings with the grid's test means.
"""


def write_report(result: QualityResult, out_dir: Path, compare_with: Path | None = None) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    c = result.config
    params = sum(
        n * m
        for n, m in [
            (VOCAB_SIZE, c.hidden_size * 2),
            (c.layers, 4 * c.hidden_size**2 + 3 * c.hidden_size * c.intermediate_size),
        ]
    )
    text = [
        "# Language-model merge quality: domain experts of a small Llama",
        "",
        f"Measured on: {result.machine}. This run took {result.seconds / 60:.1f} min "
        f"(`examples/quality_lm/run_quality_lm.py`); per seed, training the base and the "
        f"experts took {np.mean([s.train_seconds for s in result.per_seed]):.0f} s (in the run "
        "that trained them, from their train.json) and the merges and evaluations "
        f"{np.mean([s.merge_seconds for s in result.per_seed]):.0f} s.",
        "",
        f"Model: `LlamaForCausalLM`, byte-level vocabulary ({VOCAB_SIZE}), hidden {c.hidden_size}, "
        f"{c.layers} layers, {c.heads} heads, MLP {c.intermediate_size}, context {c.context} "
        f"(~{params / 1e3:.0f}k parameters). Base: {c.base_steps} AdamW steps (lr {c.base_lr:g}, "
        f"batch {c.batch_size}) on an even mix of the domains; experts: {c.expert_steps} steps "
        f"(lr {c.expert_lr:g}) on one domain each; all saved in bfloat16 and merged to bfloat16 "
        "by `python -m mergesmith run`.",
        "",
        "Domains (train / val / test split by file): "
        + "; ".join(f"{d} ({s})" for d, s in result.sources.items())
        + ".",
        "",
        f"Seeds {result.seeds}. NLL = held-out negative log-likelihood in nats per byte, mean "
        "over the domains (mean ± sample std over seeds); avg ppl = exp(mean NLL); per-domain "
        "columns are perplexity per byte, exp(mean NLL over seeds). Gain retained = mean over "
        "domains of (base NLL - NLL) / (base NLL - that domain's expert NLL). Each method's "
        "setting is chosen per seed on the validation split (mean NLL over domains); the "
        "table reports the test split.",
        "",
        table(result),
        "",
        "## The papers' orderings",
        "",
        *claim_lines(result),
        "",
        "## Every setting tried",
        "",
        grid_table(result),
        "",
        NOTES,
    ]
    if result.ties is not None:
        text += [
            "## Ties at the magnitude cut-off (TIES trim) on these bf16 experts",
            "",
            "Every 2-D weight of every expert's task vector, pooled over seeds. *Tied*: entries "
            "whose |delta| equals the cut-off exactly, of which TIES keeps only some. Per tenth "
            "of a matrix's rows: the share of those tied entries that is kept under the round-1 "
            "rule (`index`: lowest flat index first), under SEMANTICS.md 3's rule (`spread`: "
            "spread evenly in flat-index order) and by mergesmith as built. Figure: "
            "`ties_rows.png`.",
            "",
            *tie_lines(result.ties),
            "",
        ]
    if compare_with is not None and compare_with.is_file():
        text += ["## The two tie rules", "", *comparison_lines(result, compare_with), ""]
    (out_dir / "latest.md").write_text("\n".join(text))
    payload = result.to_json()
    if result.ties is not None:
        payload["tie_rule"] = mergesmith_rule(result.ties)
    (out_dir / "latest.json").write_text(json.dumps(payload, indent=2) + "\n")
    plot(result, out_dir / "latest.png")
    if result.ties is not None:
        plot_ties(result.ties, out_dir / "ties_rows.png")


def plot(result: QualityResult, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result.rows if not r.startswith("expert:")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(13, 4.8), width_ratios=[1, 1.3])
    means = [float(np.mean(result.gain_retained(r))) for r in rows]
    colors = ["#999999" if r in (EXPERT_ROW, BASE_ROW) else "#4c72b0" for r in rows]
    positions = np.arange(len(rows))
    left.bar(positions, means, color=colors)
    for i, row in enumerate(rows):
        values = result.gain_retained(row)
        left.scatter([i] * len(values), values, s=8, color="black", zorder=3)
    left.axhline(0, color="black", linewidth=0.6)
    left.set_xticks(positions, rows, rotation=35, ha="right")
    left.set_ylabel("share of the experts' NLL gain retained")
    left.set_title(f"held-out test, {len(result.seeds)} seeds (dots: seeds)")

    x = np.arange(len(result.domains))
    for row in rows:
        if row in (EXPERT_ROW, BASE_ROW):
            continue
        shares = [float(np.mean(result.domain_gain_retained(row, d))) for d in result.domains]
        right.plot(x, shares, marker="o", label=row)
    right.axhline(0, color="black", linewidth=0.6)
    right.set_xticks(x, result.domains)
    right.set_ylabel("share of the domain's expert gain retained")
    right.set_title("per domain (mean over seeds; 1 = the expert, 0 = the base)")
    right.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_ties(ties: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(ties), figsize=(4.6 * len(ties), 3.8), squeeze=False)
    x = (np.arange(ROW_BINS) + 0.5) / ROW_BINS
    styles = {"index": ("round 1: lower index first", "--"), "spread": ("spread rule", "-")}
    for ax, (density, s) in zip(axes[0], ties.items(), strict=True):
        by_bin = {r: tied_kept_share_by_bin(s, r) for r in ("index", "spread", "mergesmith")}
        for rule, (label, style) in styles.items():
            ax.plot(x, by_bin[rule], style, marker="o", label=label)
        ax.plot(x, by_bin["mergesmith"], ":", marker="x", color="black", label="mergesmith now")
        shares = tie_shares(s)
        ax.axhline(shares["tied_kept_share"], color="grey", linewidth=0.6)
        ax.set_ylim(-0.05, 1.05)
        ax.set_xlabel("row position in the matrix (tenths)")
        ax.set_title(f"density {density}: {shares['tied_share']:.1%} of entries tie at the cut")
    axes[0][0].set_ylabel("share of the tied entries kept")
    axes[0][0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--quick", action="store_true", help="task arithmetic and TIES only")
    parser.add_argument("--domains", nargs="+", choices=ALL_DOMAINS, default=list(ALL_DOMAINS))
    parser.add_argument("--out", type=Path, default=DEFAULT_RESULTS, help="results folder")
    parser.add_argument("--work", type=Path, default=DEFAULT_WORK, help="models and merges")
    parser.add_argument("--threads", type=int, default=2, help="mergesmith run --threads")
    parser.add_argument(
        "--compare-with",
        type=Path,
        default=None,
        help="a stored latest.json (another tie rule, say) to compare with",
    )
    parser.add_argument(
        "--tie-densities",
        type=float,
        nargs="*",
        default=[0.2, 0.5, 0.8],
        help="densities at which to measure ties at the magnitude cut-off",
    )
    args = parser.parse_args(argv)
    result = run_quality(
        args.seeds,
        quick=args.quick,
        domains=args.domains,
        out_dir=args.out,
        work_dir=args.work,
        tie_densities=args.tie_densities,
        threads=args.threads,
        compare_with=args.compare_with,
    )
    print()
    print(table(result))
    print()
    print("\n".join(claim_lines(result)))
    if result.ties is not None:
        print("\n".join(tie_lines(result.ties)))
    print(f"\n{result.seconds:.0f} s in all; results in {args.out}")
    return 0 if all(math.isfinite(np.mean(result.test_nll(r))) for r in result.rows) else 1


if __name__ == "__main__":
    sys.exit(main())
