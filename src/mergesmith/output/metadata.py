"""The files beside the weights: config.json, tokenizer, model card, the recipe itself."""

from __future__ import annotations

import json
import shutil
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from mergesmith.dtypes import CONFIG_NAME
from mergesmith.output.writer import NO_SPACE
from mergesmith.plan import Plan
from mergesmith.sources.base import ModelSource
from mergesmith.sources.files import TOKENIZER_FILES
from mergesmith.vocab.tokenizers import quiet_transformers

RECIPE_FILE = "mergesmith_config.yml"


def output_dtype(plan: Plan) -> str | None:
    counts = Counter(job.dtype for job in plan.jobs if not job.copy_only)
    return counts.most_common(1)[0][0] if counts else None


def write_config(plan: Plan, sources: dict[str, ModelSource], folder: Path) -> None:
    source = sources.get(plan.config_model) if plan.config_model else None
    config: dict[str, Any] | None = dict(source.config) if source and source.config else None
    if config is None:
        return
    dtype = output_dtype(plan)
    if dtype in CONFIG_NAME:
        config["torch_dtype"] = CONFIG_NAME[dtype]
        if "dtype" in config:
            config["dtype"] = CONFIG_NAME[dtype]
    if plan.num_layers is not None:
        for key in ("num_hidden_layers", "n_layer", "num_layers"):
            if key in config:
                config[key] = plan.num_layers
    if plan.vocab is not None:
        # The rows written, which is what the model's embeddings will be loaded with.
        text = config.get("text_config")
        holder = text if isinstance(text, dict) and "vocab_size" in text else config
        holder["vocab_size"] = plan.vocab.rows
    write_text(folder / "config.json", json.dumps(config, indent=2) + "\n")


def write_tokenizer(plan: Plan, folder: Path) -> list[str]:
    """The output tokenizer: the one the plan built or loaded (for a tokenizer setting or a chat
    template), else the tokenizer source's files copied as they are; with its generation config.
    Returns the names of the files written."""
    before = {p.name for p in folder.iterdir()}
    names = list(TOKENIZER_FILES)
    if plan.tokenizer is not None:
        if plan.chat_template is not None:
            plan.tokenizer.chat_template = plan.chat_template
        with quiet_transformers(), _naming(folder):
            plan.tokenizer.save_pretrained(str(folder))
        names = ["generation_config.json"]
    if plan.tokenizer_folder is not None:
        for name in names:
            path = plan.tokenizer_folder / name
            if path.is_file():
                with _naming(folder / name):
                    shutil.copyfile(path, folder / name)
    return sorted({p.name for p in folder.iterdir()} - before)


def write_card(plan: Plan, folder: Path) -> None:
    recipe = plan.recipe
    models = [ref.text for ref in recipe.referenced_models()]
    lines = [
        "---",
        "library_name: transformers",
        "tags:",
        "- mergesmith",
        "- merge",
        "---",
        "# Merged model",
        "",
        f"Made with [mergesmith](https://github.com/) using the `{plan.method.name}` method "
        f"(seed {plan.seed}).",
        "",
        "## Models",
        "",
        *[
            f"- {m}" + (" (base)" if recipe.base_model and m == recipe.base_model.text else "")
            for m in models
        ],
        "",
        "## Recipe",
        "",
        "```yaml",
        recipe.text.rstrip(),
        "```",
        "",
    ]
    write_text(folder / "README.md", "\n".join(lines))
    write_text(folder / RECIPE_FILE, recipe.text)


@contextmanager
def _naming(path: Path) -> Iterator[None]:
    """A full disk while writing `path` is reported as `path`: the error itself may name no
    file, or (copyfile) the source being read."""
    try:
        yield
    except OSError as exc:
        if exc.filename is None or exc.errno in NO_SPACE:
            raise OSError(exc.errno, exc.strerror, str(path)) from None
        raise


def write_text(path: Path, text: str) -> None:
    with _naming(path):
        path.write_text(text, encoding="utf-8")
