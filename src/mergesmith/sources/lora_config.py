"""A PEFT adapter's `adapter_config.json`: what mergesmith applies, ignores, or refuses.

Every option of peft's LoraConfig (peft 0.21) is in one of three groups, so that an adapter is
never merged differently from how peft would merge it:

- applied: the options that decide the merged weights (rank and alpha with their per-module
  patterns, rsLoRA, fan_in_fan_out, DoRA, modules_to_save);
- ignored: options that only shape training or adapter creation (dropout, which layers were
  given adapters: the adapter's tensors say that), or bookkeeping (task type, versions);
- refused: options whose merge we do not implement (LoRA variants with their own merge rule,
  trainable tokens, LoRA biases, layer replication, ...), and initialisations that changed the
  base weights when the adapter was created (PiSSA, OLoRA, CorDA, LoftQ, LoRA-GA): such an
  adapter only fits the modified base, which is not the model in the recipe.

An option we do not know is refused when it is set (anything but null, false, or empty), since
a later peft may give it a meaning for the merge; left at its default it is harmless.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mergesmith.errors import MergeError

CONFIG_FILE = "adapter_config.json"
_MERGE_WITH_PEFT = (
    "merge the adapter with PEFT's merge_and_unload() and save the result, then use that "
    "folder in the recipe"
)

# Options that only matter while training or while the adapter is being created.
IGNORED = frozenset(
    {
        "task_type",
        "base_model_name_or_path",
        "revision",
        "inference_mode",
        "auto_mapping",
        "peft_version",
        "lora_dropout",
        "target_modules",  # which modules have adapters: the adapter's tensors say that
        "exclude_modules",
        "layers_to_transform",
        "layers_pattern",
        "runtime_config",  # ephemeral GPU offload while training
        "megatron_core",  # the module path used only with megatron_config (refused if set)
        "qalora_group_size",  # only with use_qalora (refused if set)
        "loftq_config",  # read only by the initialisations refused below
        "eva_config",
        "corda_config",
        "lora_ga_config",
        "ensure_weight_tying",
    }
)
# Options whose merge mergesmith does not implement, refused when set, with what they are.
REFUSED = {
    "layer_replication": "duplicated layers built at load time",
    "use_qalora": "QA-LoRA, for quantized models",
    "alora_invocation_tokens": "activated LoRA, which peft cannot merge either",
    "target_parameters": "LoRA on bare parameters such as MoE experts",
    "trainable_token_indices": "trainable token rows",
    "lora_bias": "a trained bias on lora_B",
    "megatron_config": "Megatron parallel layers",
    "arrow_config": "Arrow routing between adapters",
    "use_bdlora": "block-diagonal LoRA",
    "monteclora_config": "MonteCLoRA",
    "velora_config": "VeLoRA",
    "kasa_config": "KaSA, which also changes the base weights",
}
# Initialisations that rewrite the base weights when the adapter is created (peft's
# `path_initial_model_for_weight_conversion` turns such an adapter into a plain one).
_BASE_CHANGING_INITS = ("pissa", "olora", "corda", "loftq", "lora_ga")
APPLIED = frozenset(
    {
        "peft_type",
        "r",
        "lora_alpha",
        "use_rslora",
        "fan_in_fan_out",
        "use_dora",
        "rank_pattern",
        "alpha_pattern",
        "modules_to_save",  # the saved modules are whole tensors in the adapter file
        "bias",
        "init_lora_weights",
    }
)


@dataclass(frozen=True)
class LoraSettings:
    """The options of one adapter that decide its merged weights."""

    r: int
    alpha: float
    use_rslora: bool = False
    fan_in_fan_out: bool = False
    use_dora: bool = False
    rank_pattern: dict[str, int] = field(default_factory=dict)
    alpha_pattern: dict[str, float] = field(default_factory=dict)
    base_model: str | None = None  # base_model_name_or_path, for hints only

    def rank(self, module: str) -> int:
        """The rank peft gives `module` (its name in the model, e.g.
        `model.layers.0.self_attn.q_proj`): the first `rank_pattern` key matching it, else r."""
        return _pattern_value(self.rank_pattern, module, self.r)

    def scale(self, module: str) -> float:
        """peft's `scaling`: alpha / r, or alpha / sqrt(r) with rsLoRA; per-module alpha and
        rank from the patterns."""
        r = self.rank(module)
        alpha = _pattern_value(self.alpha_pattern, module, self.alpha)
        return alpha / math.sqrt(r) if self.use_rslora else alpha / r


def _pattern_value(pattern: dict[str, Any], module: str, default: Any) -> Any:
    """peft's `get_pattern_key`: keys are regular expressions matched against the end of the
    module name, at a dot boundary; the first key in the file's order wins."""
    for key, value in pattern.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def read_settings(who: str, folder: Path) -> LoraSettings:
    """The settings in `folder`/adapter_config.json, or a MergeError naming the first option we
    cannot apply as peft would."""
    path = folder / CONFIG_FILE
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise MergeError(
            f"{who}: {folder} has no {CONFIG_FILE}, so it is not a PEFT adapter",
            "point the part after '+' at the folder PEFT's save_pretrained() wrote",
        ) from None
    except (OSError, UnicodeDecodeError, ValueError) as exc:
        raise MergeError(
            f"{who}: {path} cannot be read as JSON ({exc.__class__.__name__})",
            "restore the file from where the adapter came from",
        ) from None
    if not isinstance(data, dict):
        raise MergeError(f"{who}: {path} is not a JSON object", "restore the file")
    peft_type = data.get("peft_type")
    if str(peft_type).upper() != "LORA":
        raise MergeError(
            f"{who}: {CONFIG_FILE} has peft_type {peft_type!r}; only LoRA adapters are applied",
            _MERGE_WITH_PEFT,
        )
    for key, value in data.items():
        if key in APPLIED or key in IGNORED or not _is_set(value):
            continue
        what = REFUSED.get(key, "an option mergesmith does not know")
        raise MergeError(
            f"{who}: {CONFIG_FILE} sets {key} = {_short(value)} ({what}), which mergesmith does "
            "not apply",
            _MERGE_WITH_PEFT,
        )
    bias = data.get("bias", "none")
    if bias not in (None, "none"):
        raise MergeError(
            f"{who}: {CONFIG_FILE} sets bias = {bias!r} (trained biases), which mergesmith does "
            "not apply",
            _MERGE_WITH_PEFT,
        )
    init = data.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        raise MergeError(
            f"{who}: {CONFIG_FILE} sets init_lora_weights = {init!r}, an initialisation that "
            "changed the base weights: the adapter fits that changed copy, not the base model",
            "convert it to a plain LoRA first (peft's save_pretrained with "
            "path_initial_model_for_weight_conversion), or " + _MERGE_WITH_PEFT,
        )
    return LoraSettings(
        r=_number(who, data, "r", 8, int),
        alpha=_number(who, data, "lora_alpha", 8, float),
        use_rslora=_flag(who, data, "use_rslora"),
        fan_in_fan_out=_flag(who, data, "fan_in_fan_out"),
        use_dora=_flag(who, data, "use_dora"),
        rank_pattern=_pattern(who, data, "rank_pattern", int),
        alpha_pattern=_pattern(who, data, "alpha_pattern", float),
        base_model=data.get("base_model_name_or_path")
        if isinstance(data.get("base_model_name_or_path"), str)
        else None,
    )


def _is_set(value: Any) -> bool:
    return value not in (None, False, "") and value != {} and value != []


def _short(value: Any) -> str:
    text = json.dumps(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(who: str, key: str, value: Any, expected: str) -> MergeError:
    return MergeError(
        f"{who}: {CONFIG_FILE}: {key} = {_short(value)} is not {expected}",
        "restore the file from where the adapter came from",
    )


def _number(who: str, data: dict[str, Any], key: str, default: float, kind: type) -> Any:
    value = data.get(key, default)
    if value is None:
        value = default
    if isinstance(value, bool) or not isinstance(value, int | float) or not value > 0:
        raise _bad(who, key, value, "a positive number")
    if kind is int and value != int(value):
        raise _bad(who, key, value, "a whole number")
    return kind(value)


def _flag(who: str, data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise _bad(who, key, value, "true or false")
    return value


def _pattern(who: str, data: dict[str, Any], key: str, kind: type) -> dict[str, Any]:
    value = data.get(key) or {}
    if not isinstance(value, dict):
        raise _bad(who, key, value, "a mapping of module patterns to numbers")
    out = {}
    for pattern, number in value.items():
        try:
            re.compile(pattern)
        except re.error as exc:
            raise _bad(who, key, pattern, f"a valid regular expression ({exc})") from None
        out[pattern] = _number(who, {key: number}, key, 1, kind)
    return out
