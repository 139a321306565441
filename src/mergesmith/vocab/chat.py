"""The recipe's `chat_template:` setting: checking it, and turning it into template text.

A recipe may name a built-in template (the five mergekit 0.1.5 ships), say `auto` (the template
most of the input models share), or give a Jinja template itself. The built-ins live in
`chat_templates/*.jinja` beside this module and render exactly what mergekit's do.

Model folders are read here without transformers, but in the order transformers 5 uses, so a
template found here is the one `AutoTokenizer.from_pretrained(folder).chat_template` gives.
"""

from __future__ import annotations

import difflib
import json
from collections import Counter
from collections.abc import Sequence
from importlib import resources
from pathlib import Path
from typing import Any

from mergesmith.errors import MergeError

BUILTIN_CHAT_TEMPLATES: tuple[str, ...] = ("alpaca", "chatml", "exaone", "llama3", "mistral")

AUTO = "auto"

# mergekit's tests for "this is a name, not a template", and for "too short to be a template".
_NAME_MAX_CHARS = 256
_TEMPLATE_MIN_CHARS = 20

# Where transformers 5 looks, in its order: the template file (plus named extras beside it)
# wins over the tokenizer config. chat_template.json is read only by processors, not tokenizers.
_TEMPLATE_FILE = "chat_template.jinja"
_EXTRA_TEMPLATES_DIR = "additional_chat_templates"
_TOKENIZER_CONFIG = "tokenizer_config.json"
_DEFAULT = "default"


def _looks_like_name(setting: str) -> bool:
    return len(setting) < _NAME_MAX_CHARS and "\n" not in setting and "{" not in setting


def chat_template_problem(setting: str) -> str | None:
    """Why a recipe's chat_template value cannot be used, or None.

    Checked when the recipe is read, before any model is opened. A value that looks like a name
    (no '{', no newline, under 256 characters) must be 'auto' or a built-in name; anything else
    must look like a Jinja template (at least 20 characters, with a '{'), as mergekit requires.
    """
    builtins = ", ".join(BUILTIN_CHAT_TEMPLATES)
    if _looks_like_name(setting):
        if setting == AUTO or setting in BUILTIN_CHAT_TEMPLATES:
            return None
        # cutoff=0: always offer the nearest name, however far; lower-cased so 'ChatML' finds it.
        closest = difflib.get_close_matches(setting.lower(), BUILTIN_CHAT_TEMPLATES, n=1, cutoff=0)
        return (
            f"chat_template {setting!r} is not a built-in template; the closest is "
            f"{closest[0]!r} (built-in: {builtins}; or 'auto', or a Jinja template)"
        )
    if len(setting) < _TEMPLATE_MIN_CHARS or "{" not in setting:
        preview = setting if len(setting) <= 40 else setting[:40] + "..."
        return (
            f"chat_template {preview!r} is neither a template name nor a Jinja template "
            f"(a template has at least {_TEMPLATE_MIN_CHARS} characters and a '{{'); "
            f"built-in names: {builtins}, or 'auto'"
        )
    return None


def builtin_chat_template(name: str) -> str:
    """The text of the built-in template `name` (one of BUILTIN_CHAT_TEMPLATES)."""
    if name not in BUILTIN_CHAT_TEMPLATES:
        raise MergeError(
            f"no built-in chat template named {name!r}",
            f"use one of {', '.join(BUILTIN_CHAT_TEMPLATES)}",
        )
    folder = resources.files("mergesmith.vocab").joinpath("chat_templates")
    return folder.joinpath(f"{name}.jinja").read_text(encoding="utf-8")


def _read_text(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise MergeError(f"{path}: cannot read the chat template: {exc}") from None


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise MergeError(
            f"{path}: cannot read it as JSON: {exc}",
            "repair or remove the file; it holds the model's tokenizer settings",
        ) from None


def _default_of_config_value(value: Any, path: Path) -> str | None:
    """The default template from tokenizer_config.json's "chat_template" value."""
    if isinstance(value, str):
        return value
    if isinstance(value, list):
        # The saved form of several named templates: [{"name": ..., "template": ...}, ...].
        named = {}
        for entry in value:
            if not (isinstance(entry, dict) and "name" in entry and "template" in entry):
                raise MergeError(
                    f"{path}: a 'chat_template' list entry is not a {{'name', 'template'}} object",
                    'give each named template as {"name": ..., "template": ...}',
                )
            named[entry["name"]] = entry["template"]
        value = named
    if isinstance(value, dict):
        # Like mergekit, only the template named "default" counts (not e.g. "tool_use").
        default = value.get(_DEFAULT)
        return default if isinstance(default, str) else None
    return None


def read_chat_template(folder: Path) -> str | None:
    """The chat template a model folder ships, read from its files without loading transformers.

    chat_template.jinja if present, else tokenizer_config.json's "chat_template" (a string, or a
    list of {"name", "template"} entries of which the one named "default" is used); None when
    there is none. As in transformers 5: templates in additional_chat_templates/*.jinja take the
    place of the config's even when none of them is the default (so the folder then has none,
    unless that folder holds default.jinja, which beats chat_template.jinja), and
    chat_template.json, which only processors read, is ignored. An empty chat_template.jinja
    gives "". Unreadable JSON raises MergeError naming the file.
    """
    folder = Path(folder)
    templates: dict[str, str] = {}
    main_file = folder / _TEMPLATE_FILE
    if main_file.is_file():
        templates[_DEFAULT] = _read_text(main_file)
    extra_dir = folder / _EXTRA_TEMPLATES_DIR
    if extra_dir.is_dir():
        for path in sorted(extra_dir.glob("*.jinja")):
            if path.is_file():
                templates[path.name.removesuffix(".jinja")] = _read_text(path)
    if templates:
        return templates.get(_DEFAULT)

    config_path = folder / _TOKENIZER_CONFIG
    if not config_path.is_file():
        return None
    config = _read_json(config_path)
    if not isinstance(config, dict):
        raise MergeError(f"{config_path}: expected a JSON object, found {type(config).__name__}")
    return _default_of_config_value(config.get("chat_template"), config_path)


def resolve_chat_template(setting: str, model_templates: Sequence[str | None]) -> str | None:
    """The template text to write for a recipe's chat_template `setting`.

    'auto': the most common template among `model_templates` (the input models' own, in the
    recipe's model order), compared and returned stripped of surrounding whitespace; on a tie the
    one seen first wins; None if no model has a non-blank one. A built-in name: its text.
    Anything else is a literal Jinja template and is returned as given.
    """
    problem = chat_template_problem(setting)
    if problem is not None:
        raise MergeError(problem, "fix 'chat_template' in the recipe")
    if setting == AUTO:
        stripped = [template.strip() for template in model_templates if template]
        # Counter keeps first-seen order among equal counts, which is the tie rule we promise.
        counts = Counter(template for template in stripped if template)
        return counts.most_common(1)[0][0] if counts else None
    if setting in BUILTIN_CHAT_TEMPLATES:
        return builtin_chat_template(setting)
    return setting
