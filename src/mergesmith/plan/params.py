"""Parameter resolution: each parameter's value for one tensor of one model.

Precedence, first defined wins: the model's own block (per-model parameters only), the slice's,
the module's (`modules:` form), the top level, then the method's default. Gradients and filters
are applied here, so a job holds plain values.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from mergesmith.config import ModelInput, Recipe, resolve_setting
from mergesmith.methods.registry import MergeMethod, ParamSpec
from mergesmith.plan.problems import Findings

# A quoted number ('0.5'), which mergekit's pydantic reads as a number too.
_NUMBER = re.compile(r"[-+]?(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+)?")

Block = Mapping[str, Any]


class ParamResolver:
    def __init__(self, recipe: Recipe, method: MergeMethod, findings: Findings) -> None:
        self.recipe = recipe
        self.method = method
        self.findings = findings

    def global_params(
        self, group_block: Block, group_where: str, tensor: str, t: float
    ) -> dict[str, Any]:
        blocks = (
            (group_block, group_where),
            (self.recipe.module_parameters, self._module_level),
            (self.recipe.parameters, self._top_level),
        )
        return {
            spec.name: self._resolve(spec, blocks, tensor, t, None)
            for spec in self.method.params
            if not spec.per_model
        }

    def model_params(
        self, group_block: Block, group_where: str, entry: ModelInput, tensor: str, t: float
    ) -> dict[str, Any]:
        blocks = (
            (entry.parameters, entry.where or group_where),
            (group_block, group_where),
            (self.recipe.module_parameters, self._module_level),
            (self.recipe.parameters, self._top_level),
        )
        values = {
            spec.name: self._resolve(spec, blocks, tensor, t, entry.ref.text)
            for spec in self.method.params
            if spec.per_model
        }
        why = self.method.check_model(values) if self.method.check_model else None
        if why:
            self.findings.problem(
                f"{entry.where or self.recipe.source_name}: model '{entry.ref.text}': {why}",
                "change the model's parameters",
                key=f"model:{entry.ref.text}:{why}",
            )
        return values

    def _top_level(self, name: str) -> str:
        return self.recipe.where("parameters", name)

    def _module_level(self, name: str) -> str:
        return self.recipe.where("modules", str(self.recipe.module_name), "parameters", name)

    def _resolve(
        self,
        spec: ParamSpec,
        blocks: Iterable[tuple[Block, str | Callable[[str], str]]],
        tensor: str,
        t: float,
        model: str | None,
    ) -> Any:
        """The first block's value (each block with where its settings are written)."""
        blocks = list(blocks)
        for block, where in blocks:
            if spec.name not in block:
                continue
            setting = block[spec.name]
            if setting is None:
                return None
            value = resolve_setting(setting, tensor, t)
            if value is not None:
                line = where(spec.name) if callable(where) else where
                return self._coerce(spec, value, model, tensor, line)
        if spec.required:
            whose = f"model '{model}'" if model else "the merge"
            where = (
                "under that model's parameters (or the top-level 'parameters:' to apply it to all)"
                if model
                else "under the top-level 'parameters:'"
            )
            first = blocks[0][1]
            line = first(spec.name) if callable(first) else first
            self.findings.problem(
                f"{line or self.recipe.source_name}: {self.method.name} needs '{spec.name}' for "
                f"{whose} "
                f"(tensor '{tensor}' has none)",
                f"add '{spec.name}: VALUE' {where}",
                key=f"required:{spec.name}:{model}",
            )
            return None
        return spec.default

    def _coerce(
        self, spec: ParamSpec, value: Any, model: str | None, tensor: str, where: str
    ) -> Any:
        value, bad = coerce(spec, value)
        if bad is None and spec.check is not None:
            bad = spec.check(value)
        if bad:
            whose = f" for model '{model}'" if model else ""
            self.findings.problem(
                f"{where or self.recipe.source_name}: parameter '{spec.name}'{whose}: {bad} "
                f"(first at tensor '{tensor}')",
                f"change '{spec.name}' ({spec.help}); 'mergesmith methods' lists the parameters",
                key=f"value:{spec.name}:{model}:{bad}",
            )
            return spec.default if not spec.required else value
        return value


def coerce(spec: ParamSpec, value: Any) -> tuple[Any, str | None]:
    """(the value as the parameter's kind, why it cannot be one or None)."""
    if spec.kind in (float, int) and isinstance(value, str) and _NUMBER.fullmatch(value):
        value = float(value)
    if spec.kind is float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            return value, f"must be a number, got {value!r}"
        return float(value), None
    if spec.kind is int:
        if isinstance(value, bool) or not isinstance(value, int | float) or value != int(value):
            return value, f"must be a whole number, got {value!r}"
        return int(value), None
    if spec.kind is bool:
        if isinstance(value, bool):
            return value, None
        if isinstance(value, int | float) and value in (0, 1):
            return bool(value), None
        return value, f"must be true or false, got {value!r}"
    if spec.choices and value not in spec.choices:
        shown = ", ".join("null" if c is None else str(c) for c in spec.choices)
        return value, f"must be one of {shown}, got {value!r}"
    return value, None
