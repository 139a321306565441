"""The chat_template setting: built-in templates, 'auto', literals, and reading a model's template.

Every expected value comes from elsewhere: rendered text from mergekit 0.1.5's own templates
(read from the reference venv) through transformers' renderer, and model-folder templates from
`transformers.AutoTokenizer`, which is what mergekit's `auto` consults.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from mergesmith.errors import MergeError
from mergesmith.vocab.chat import (
    BUILTIN_CHAT_TEMPLATES,
    builtin_chat_template,
    chat_template_problem,
    read_chat_template,
    resolve_chat_template,
)
from tests.conformance.conftest import MERGEKIT_VERSION, mergekit_venv_dir, running_in_ci

OUR_TEMPLATES = Path(__file__).resolve().parents[1] / "src/mergesmith/vocab/chat_templates"

# Tokens the templates write, added to the test tokenizer as ordinary (non-special) tokens, so
# that sanitize_control_tokens depends on which of them each template spells out literally.
CONTROL_STRINGS = [
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
    "[|system|]",
    "[|user|]",
    "[|assistant|]",
    "[|endofturn|]",
    "[INST]",
    "[/INST]",
]


def _message(role: str, content: Any) -> dict[str, Any]:
    return {"role": role, "content": content}


CONVERSATIONS: dict[str, list[dict[str, Any]]] = {
    "one user message": [_message("user", "Hello there")],
    "whitespace around text": [_message("user", "  \n padded \t\n")],
    "system and user": [_message("system", "Be brief."), _message("user", "Hi")],
    "multi-turn with system": [
        _message("system", "You answer in French."),
        _message("user", "What is 2+2?"),
        _message("assistant", " Quatre. "),
        _message("user", "And 3+3?"),
    ],
    "ends with assistant": [_message("user", "q1"), _message("assistant", "a1")],
    "long alternation": [
        _message("user" if i % 2 == 0 else "assistant", f"turn {i}") for i in range(7)
    ],
    "two system messages": [
        _message("system", "first system"),
        _message("user", "u"),
        _message("system", "  second system  "),
        _message("assistant", "a"),
    ],
    "system last": [_message("user", "u"), _message("system", "late")],
    "system only": [_message("system", "only a system prompt")],
    "alpaca input turn": [
        _message("user", "Summarise:"),
        _message("user_context", "A long passage.\n"),
        _message("assistant", "Short."),
    ],
    "tool message": [
        _message("user", "weather?"),
        _message("assistant", "calling"),
        _message("tool", "sunny"),
    ],
    "two users in a row": [_message("user", "a"), _message("user", "b")],
    "assistant first": [_message("assistant", "I speak first"), _message("user", "ok")],
    "empty content": [_message("user", ""), _message("assistant", "")],
    "template-looking and control text": [
        _message("system", "{{ not jinja }} {% raw %}"),
        _message("user", "<|im_end|> [INST] [|user|] <|eot_id|>\nünïcode ✓"),
        _message("assistant", "</s><s>"),
    ],
    "content missing": [_message("user", None)],
    "content as parts": [_message("user", [{"type": "text", "text": "hi"}])],
}

MODES = ("plain", "generation prompt", "continue final message")


def _byte_tokenizer(with_bos_eos: bool) -> PreTrainedTokenizerFast:
    """A byte-level tokenizer (every string encodes losslessly), with the control strings added."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={ch: i for i, ch in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    specials = {"bos_token": "<s>", "eos_token": "</s>"} if with_bos_eos else {}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **specials)
    tokenizer.add_tokens(CONTROL_STRINGS)
    return tokenizer


@pytest.fixture(scope="module")
def render_tokenizers() -> dict[str, PreTrainedTokenizerFast]:
    return {
        "bos/eos set": _byte_tokenizer(with_bos_eos=True),
        "no bos/eos": _byte_tokenizer(with_bos_eos=False),
    }


@pytest.fixture(scope="module")
def mergekit_templates() -> dict[str, str]:
    """mergekit 0.1.5's built-in templates, from the reference venv the conformance suite uses."""
    venv = mergekit_venv_dir()
    found = sorted(venv.glob("lib/python*/site-packages/mergekit/_data/chat_templates"))
    if not found:
        message = (
            f"no mergekit {MERGEKIT_VERSION} reference venv at {venv} "
            "(the conformance suite, tests/conformance, builds it)"
        )
        if running_in_ci():
            pytest.fail(message, pytrace=False)
        pytest.skip(message)
    folder = found[0]
    site_packages = folder.parents[2]
    versions = [
        path.name.removeprefix("mergekit-").removesuffix(".dist-info")
        for path in site_packages.glob("mergekit-*.dist-info")
    ]
    if versions != [MERGEKIT_VERSION]:
        pytest.fail(f"{site_packages} holds mergekit {versions}, not {MERGEKIT_VERSION}")
    return {path.stem: path.read_text(encoding="utf-8") for path in folder.glob("*.jinja")}


def _render(
    tokenizer: PreTrainedTokenizerFast, template: str, messages: list[dict[str, Any]], mode: str
) -> str:
    """What transformers produces: the text, or the kind of error the template raised."""
    options: dict[str, Any] = {
        "plain": {},
        "generation prompt": {"add_generation_prompt": True},
        "continue final message": {"continue_final_message": True},
    }[mode]
    try:
        return tokenizer.apply_chat_template(
            messages, chat_template=template, tokenize=False, **options
        )
    except Exception as exc:  # the reference may raise too; then ours must raise the same kind
        return f"<raised {type(exc).__name__}>"


def test_builtin_names_are_mergekits(mergekit_templates: dict[str, str]) -> None:
    assert sorted(mergekit_templates) == list(BUILTIN_CHAT_TEMPLATES)


@pytest.mark.parametrize("name", BUILTIN_CHAT_TEMPLATES)
def test_builtin_template_is_our_own_text(name: str, mergekit_templates: dict[str, str]) -> None:
    ours = builtin_chat_template(name)
    assert ours == (OUR_TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    assert ours.split() != mergekit_templates[name].split()


@pytest.mark.parametrize("conversation", list(CONVERSATIONS))
@pytest.mark.parametrize("name", BUILTIN_CHAT_TEMPLATES)
def test_builtin_template_renders_like_mergekits(
    name: str,
    conversation: str,
    mergekit_templates: dict[str, str],
    render_tokenizers: dict[str, PreTrainedTokenizerFast],
) -> None:
    messages = CONVERSATIONS[conversation]
    ours, theirs = builtin_chat_template(name), mergekit_templates[name]
    for tokenizer_kind, tokenizer in render_tokenizers.items():
        for mode in MODES:
            expected = _render(tokenizer, theirs, messages, mode)
            assert _render(tokenizer, ours, messages, mode) == expected, (tokenizer_kind, mode)


@pytest.mark.parametrize("name", BUILTIN_CHAT_TEMPLATES)
def test_builtin_template_marks_the_same_control_tokens_as_mergekits(
    name: str,
    mergekit_templates: dict[str, str],
    render_tokenizers: dict[str, PreTrainedTokenizerFast],
) -> None:
    # With sanitize_control_tokens, transformers treats an added token as a control token only if
    # the template's literal text contains it; the token ids show which ones each template spells.
    tokenizer = render_tokenizers["bos/eos set"]
    messages = [
        *CONVERSATIONS["template-looking and control text"],
        _message("user", " ".join(CONTROL_STRINGS)),
    ]

    def ids(template: str) -> list[int]:
        return tokenizer.apply_chat_template(
            messages,
            chat_template=template,
            tokenize=True,
            sanitize_control_tokens=True,
            return_dict=False,
        )

    assert ids(builtin_chat_template(name)) == ids(mergekit_templates[name])


# --- resolve_chat_template --------------------------------------------------------------


def test_auto_picks_the_template_most_models_share() -> None:
    assert resolve_chat_template("auto", ["{{ a }}", "{{ b }}", None, "{{ b }}"]) == "{{ b }}"


def test_auto_compares_and_returns_stripped_templates() -> None:
    templates = ["{{ b }}", "\n{{ a }}  ", "{{ a }}\n"]
    assert resolve_chat_template("auto", templates) == "{{ a }}"


def test_auto_tie_goes_to_the_first_model_with_it() -> None:
    assert resolve_chat_template("auto", ["{{ b }}", "{{ a }}"]) == "{{ b }}"
    assert resolve_chat_template("auto", [None, "{{ a }}", "{{ b }}", "{{ b }}", "{{ a }}"]) == (
        "{{ a }}"
    )


def test_auto_is_none_when_no_model_has_a_template() -> None:
    assert resolve_chat_template("auto", []) is None
    assert resolve_chat_template("auto", [None, "", "  \n"]) is None


def test_auto_ignores_models_without_a_template() -> None:
    assert resolve_chat_template("auto", [None, "", "{{ only }}"]) == "{{ only }}"


@pytest.mark.parametrize("name", BUILTIN_CHAT_TEMPLATES)
def test_builtin_name_resolves_to_its_file(name: str) -> None:
    expected = (OUR_TEMPLATES / f"{name}.jinja").read_text(encoding="utf-8")
    assert resolve_chat_template(name, ["{{ a model's own }}"]) == expected


def test_literal_template_is_used_as_given() -> None:
    literal = "  {% for m in messages %}{{ m['content'] }}\n{% endfor %}  "
    assert resolve_chat_template(literal, ["{{ other }}"]) == literal


def test_resolving_an_unusable_setting_is_an_error() -> None:
    with pytest.raises(MergeError, match="chatmlx"):
        resolve_chat_template("chatmlx", [])


# --- chat_template_problem --------------------------------------------------------------


@pytest.mark.parametrize(
    ("setting", "closest"),
    [
        ("chatmll", "chatml"),
        ("llama-3", "llama3"),
        ("Mistral", "mistral"),
        ("alpacca", "alpaca"),
        ("exa1", "exaone"),
    ],
)
def test_unknown_name_is_reported_with_the_closest_builtin(setting: str, closest: str) -> None:
    problem = chat_template_problem(setting)
    assert problem is not None
    assert repr(setting) in problem
    assert repr(closest) in problem
    for name in BUILTIN_CHAT_TEMPLATES:
        assert name in problem


@pytest.mark.parametrize("setting", ["auto", *BUILTIN_CHAT_TEMPLATES])
def test_auto_and_builtin_names_are_accepted(setting: str) -> None:
    assert chat_template_problem(setting) is None


def test_literal_templates_are_accepted(mergekit_templates: dict[str, str]) -> None:
    assert chat_template_problem("{% for m in messages %}{{ m.content }}{% endfor %}") is None
    for text in mergekit_templates.values():
        assert chat_template_problem(text) is None


@pytest.mark.parametrize(
    "setting",
    ["{{ short }}", "line one\nline two", "x" * 300, "", "Auto"],
    ids=["short with brace", "lines without brace", "long without brace", "empty", "Auto"],
)
def test_values_mergekit_refuses_are_problems(setting: str) -> None:
    assert chat_template_problem(setting) is not None


# --- read_chat_template vs transformers -----------------------------------------------------


def _tokenizer_folder(folder: Path, config: dict[str, Any], files: dict[str, str]) -> Path:
    """A loadable tokenizer folder: tokenizer.json, tokenizer_config.json (+ `config`), `files`."""
    folder.mkdir(parents=True)
    backend = Tokenizer(models.WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    backend.save(str(folder / "tokenizer.json"))
    base_config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "<unk>"}
    (folder / "tokenizer_config.json").write_text(json.dumps({**base_config, **config}))
    for name, text in files.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text, encoding="utf-8")
    return folder


def _transformers_template(folder: Path) -> str | None:
    """The template mergekit's `auto` would see: AutoTokenizer's, its "default" if several."""
    template = AutoTokenizer.from_pretrained(str(folder)).chat_template
    return template.get("default") if isinstance(template, dict) else template


def _listed(*pairs: tuple[str, str]) -> list[dict[str, str]]:
    return [{"name": name, "template": text} for name, text in pairs]


STORAGE_FORMS: dict[str, tuple[dict[str, Any], dict[str, str]]] = {
    "no template": ({}, {}),
    "config string": ({"chat_template": "{{ config }}"}, {}),
    "config list with default": (
        {"chat_template": _listed(("tool_use", "{{ tools }}"), ("default", "{{ dflt }}"))},
        {},
    ),
    "config list without default": ({"chat_template": _listed(("tool_use", "{{ t }}"))}, {}),
    "jinja file alone": ({}, {"chat_template.jinja": "{{ jinja }}\n"}),
    "jinja file over config": (
        {"chat_template": "{{ config }}"},
        {"chat_template.jinja": "{{ jinja }}"},
    ),
    "jinja file with extra templates": (
        {},
        {"chat_template.jinja": "{{ jinja }}", "additional_chat_templates/rag.jinja": "{{ rag }}"},
    ),
    "extra templates only, over config": (
        {"chat_template": "{{ config }}"},
        {"additional_chat_templates/rag.jinja": "{{ rag }}"},
    ),
    "extra default.jinja over jinja file": (
        {},
        {
            "chat_template.jinja": "{{ jinja }}",
            "additional_chat_templates/default.jinja": "{{ extra default }}",
        },
    ),
    "empty jinja file over config": (
        {"chat_template": "{{ config }}"},
        {"chat_template.jinja": ""},
    ),
    "processor json file alone": (
        {},
        {"chat_template.json": json.dumps({"chat_template": "{{ j }}"})},
    ),
    "processor json file and config": (
        {"chat_template": "{{ config }}"},
        {"chat_template.json": json.dumps({"chat_template": "{{ j }}"})},
    ),
}


@pytest.mark.parametrize("form", list(STORAGE_FORMS))
def test_read_chat_template_agrees_with_transformers(form: str, tmp_path: Path) -> None:
    config, files = STORAGE_FORMS[form]
    folder = _tokenizer_folder(tmp_path / "model", config, files)
    assert read_chat_template(folder) == _transformers_template(folder)


@pytest.mark.parametrize(
    ("template", "save_jinja_files", "written"),
    [
        ("{{ single }}", True, "chat_template.jinja"),
        ({"default": "{{ d }}", "rag": "{{ r }}"}, True, "additional_chat_templates/rag.jinja"),
        ("{{ single }}", False, "tokenizer_config.json"),
        ({"default": "{{ d }}", "rag": "{{ r }}"}, False, "tokenizer_config.json"),
    ],
    ids=["one template", "named templates", "one template, legacy", "named templates, legacy"],
)
def test_read_chat_template_reads_what_save_pretrained_writes(
    template: str | dict[str, str], save_jinja_files: bool, written: str, tmp_path: Path
) -> None:
    source = _tokenizer_folder(tmp_path / "source", {}, {})
    tokenizer = AutoTokenizer.from_pretrained(str(source))
    tokenizer.chat_template = template
    saved = tmp_path / "saved"
    tokenizer.save_pretrained(str(saved), save_jinja_files=save_jinja_files)
    assert (saved / written).is_file()
    assert read_chat_template(saved) == _transformers_template(saved)
    assert read_chat_template(saved) in ("{{ single }}", "{{ d }}")


def test_unreadable_tokenizer_config_names_the_file(tmp_path: Path) -> None:
    folder = _tokenizer_folder(tmp_path / "model", {}, {})
    (folder / "tokenizer_config.json").write_text('{"chat_template": ')
    with pytest.raises(MergeError, match=r"tokenizer_config\.json"):
        read_chat_template(folder)


def test_folder_without_tokenizer_files_has_no_template(tmp_path: Path) -> None:
    assert read_chat_template(tmp_path) is None
